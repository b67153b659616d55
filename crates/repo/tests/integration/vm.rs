//! Restore points that know their VM, and saved VM metadata.

use cbtvault_repo::testing::pack::BlobKind;
use cbtvault_repo::{FileKind, Repository, Result, VmInfo, VmMetadata};

use super::common::{commit_disk, data_block, new_repo};

fn vm_info(metadata: Option<String>) -> VmInfo {
    VmInfo {
        uuid: "6f1b7c52-0000-4000-8000-000000000001".into(),
        name: "web-1".into(),
        host: "pool-a".into(),
        disk_label: Some("web-1 root".into()),
        device: Some("0".into()),
        metadata,
    }
}

fn metadata(second: i64) -> VmMetadata {
    VmMetadata {
        vm_uuid: "6f1b7c52-0000-4000-8000-000000000001".into(),
        time: jiff::Timestamp::from_second(1_800_000_000 + second).unwrap(),
        json: serde_json::json!({
            "VM": {"name_label": "web-1", "memory_static_max": "4294967296"},
            "VBDs": [{"userdevice": "0", "bootable": true}],
            "VIFs": [{"device": "0", "MAC": "aa:bb:cc:dd:ee:ff", "network": "net-1"}],
        }),
    }
}

/// A manifest written before restore points knew their VM has no `vm`
/// key; it still loads (with no VM), and one without a VM is written the
/// same way, so its id does not change.
#[test]
fn a_manifest_without_a_vm_still_loads() -> Result<()> {
    let (dir, repo) = new_repo(32 << 20);
    // What the previous release wrote, byte for byte in form.
    let old = r#"{
  "format": 1,
  "disk": "vm1-disk0",
  "source": {
    "provider": "file",
    "location": "/images/vm1.img",
    "details": {
      "job": "nightly"
    }
  },
  "time": "2026-11-20T03:00:00Z",
  "virtual_size": 0,
  "block_size": 65536,
  "root": "0000000000000000000000000000000000000000000000000000000000000000",
  "fanout": 128,
  "parent": null,
  "mode": {
    "kind": "full"
  },
  "stats": {
    "blocks_total": 0,
    "blocks_read": 0,
    "bytes_read": 0,
    "blocks_zero": 0,
    "blocks_dedup": 0,
    "blocks_new": 0,
    "bytes_new": 0,
    "bytes_stored": 0,
    "nodes_new": 0,
    "duration_ms": 0
  }
}"#;
    let id = hex::encode(blake3::hash(old.as_bytes()).as_bytes());
    repo.backend()
        .write(FileKind::Manifest, &id, old.as_bytes())?;
    drop(repo);
    let repo = Repository::open(dir.path())?;
    let row = repo.resolve(&id)?;
    assert_eq!(row.manifest.disk, "vm1-disk0");
    assert_eq!(row.manifest.source.vm, None);
    // Written again, it is the same bytes: the id is stable.
    assert_eq!(
        cbtvault_repo::testing::manifest::encode(&row.manifest, &cbtvault_repo::Crypto::Plain)
            .unwrap()
            .1,
        old.as_bytes()
    );
    Ok(())
}

/// A restore point committed with a VM keeps it through the catalogue,
/// a reopen and a repair.
#[test]
fn a_restore_point_keeps_its_vm() -> Result<()> {
    let (dir, repo) = new_repo(32 << 20);
    let mut writer = repo.pack_writer(None)?;
    let a = writer.add(BlobKind::Data, &data_block(1))?;
    writer.flush()?;
    let plain = commit_disk(&repo, &mut writer, "web-1-xvda", &[a], 0)?;
    let mut m = repo.resolve(&plain)?.manifest;
    m.time += jiff::SignedDuration::from_secs(60);
    m.source.vm = Some(vm_info(None));
    let with_vm = repo.commit(&m)?;
    drop(writer);
    assert_eq!(
        repo.resolve(&with_vm)?.manifest.source.vm,
        Some(vm_info(None))
    );
    let listed = repo.catalogue().restore_points(None)?;
    assert_eq!(listed.len(), 2);
    drop(repo);
    cbtvault_repo::repair(dir.path(), std::time::Duration::ZERO)?;
    let repo = Repository::open(dir.path())?;
    assert_eq!(
        repo.resolve(&with_vm)?.manifest.source.vm,
        Some(vm_info(None))
    );
    assert_eq!(repo.resolve(&plain)?.manifest.source.vm, None);
    Ok(())
}

/// VM metadata is saved once per content, read back exactly, listed per
/// VM, and survives a reopen.
#[test]
fn vm_metadata_is_saved_listed_and_read_back() -> Result<()> {
    let (dir, repo) = new_repo(32 << 20);
    let first = repo.save_vm_metadata(&metadata(0))?;
    assert_eq!(
        repo.save_vm_metadata(&metadata(0))?,
        first,
        "same content, same id"
    );
    let second = repo.save_vm_metadata(&metadata(86_400))?;
    let other = repo.save_vm_metadata(&VmMetadata {
        vm_uuid: "another-vm".into(),
        ..metadata(10)
    })?;
    assert_ne!(first, second);
    assert_eq!(repo.vm_metadata(&first)?, metadata(0));
    let of_vm: Vec<String> = repo
        .vm_metadata_list(Some("6f1b7c52-0000-4000-8000-000000000001"))?
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(of_vm, [first.clone(), second.clone()], "oldest first");
    assert_eq!(repo.vm_metadata_list(None)?.len(), 3);
    assert!(
        dir.path()
            .join("vms")
            .join(format!("{other}.json"))
            .is_file()
    );
    drop(repo);
    let repo = Repository::open(dir.path())?;
    assert_eq!(repo.vm_metadata(&second)?, metadata(86_400));
    // An id that is no id reads nothing from storage.
    assert!(repo.vm_metadata("../manifests/x").is_err());
    Ok(())
}

/// A file written by a run that died before indexing it is listed.
#[test]
fn vm_metadata_not_yet_indexed_is_listed() -> Result<()> {
    let (dir, repo) = new_repo(32 << 20);
    let id = repo.save_vm_metadata(&metadata(0))?;
    // As if the process died between the file and its catalogue row.
    rusqlite::Connection::open(dir.path().join("catalogue.sqlite"))
        .and_then(|c| c.execute("DELETE FROM vm_metadata", []))
        .unwrap();
    assert_eq!(repo.vm_metadata_list(None)?.len(), 1);
    assert_eq!(repo.vm_metadata_list(None)?[0].id, id);
    Ok(())
}

/// Damaged VM metadata is reported by verify, refused when read, and set
/// aside by repair; a restore point naming missing metadata is reported
/// but still restores.
#[test]
fn damaged_vm_metadata_is_found_and_set_aside() -> Result<()> {
    let (dir, repo) = new_repo(32 << 20);
    let id = repo.save_vm_metadata(&metadata(0))?;
    let mut writer = repo.pack_writer(None)?;
    let a = writer.add(BlobKind::Data, &data_block(1))?;
    writer.flush()?;
    let rp = commit_disk(&repo, &mut writer, "web-1-xvda", &[a], 0)?;
    let mut m = repo.resolve(&rp)?.manifest;
    m.source.vm = Some(vm_info(Some(id.clone())));
    m.time += jiff::SignedDuration::from_secs(1);
    repo.commit(&m)?;
    drop(writer);
    assert!(repo.verify(false, 1, &|_| {})?.is_ok());

    let path = dir.path().join("vms").join(format!("{id}.json"));
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x20;
    std::fs::write(&path, &bytes).unwrap();
    let err = repo.vm_metadata(&id).unwrap_err().to_string();
    assert!(err.contains(&id) && err.contains("damaged"), "{err}");
    let report = repo.verify(false, 1, &|_| {})?;
    let objects: Vec<&str> = report.problems.iter().map(|p| p.object.as_str()).collect();
    assert!(
        objects.contains(&format!("VM metadata {id}").as_str()),
        "{:?}",
        report.problems
    );
    drop(repo);

    let repaired = cbtvault_repo::repair(dir.path(), std::time::Duration::ZERO)?;
    assert!(
        repaired.set_aside.iter().any(|s| s.contains(&id)),
        "{:?}",
        repaired.set_aside
    );
    assert!(!path.exists());
    let repo = Repository::open(dir.path())?;
    assert!(repo.vm_metadata_list(None)?.is_empty());
    let report = repo.verify(true, 1, &|_| {})?;
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(report.problems[0].problem.contains("is missing"));
    assert!(report.damaged.is_empty(), "the disks still restore");
    Ok(())
}

/// A catalogue of schema 2 (before VM metadata) gains its table in place.
#[test]
fn a_schema_2_catalogue_is_upgraded() -> Result<()> {
    let (dir, repo) = new_repo(32 << 20);
    drop(repo);
    let conn = rusqlite::Connection::open(dir.path().join("catalogue.sqlite")).unwrap();
    conn.execute_batch("DROP TABLE vm_metadata; PRAGMA user_version = 2;")
        .unwrap();
    drop(conn);
    let repo = Repository::open(dir.path())?;
    let id = repo.save_vm_metadata(&metadata(0))?;
    assert_eq!(repo.vm_metadata_list(None)?[0].id, id);
    let conn = rusqlite::Connection::open(dir.path().join("catalogue.sqlite")).unwrap();
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, 6);
    Ok(())
}

/// gc removes VM metadata that no restore point refers to once it is old
/// enough that no run can still be about to commit a restore point naming
/// it; referenced and recent metadata stay.
#[test]
fn gc_removes_old_vm_metadata_no_restore_point_refers_to() -> Result<()> {
    let (_dir, repo) = new_repo(32 << 20);
    let at = |time: jiff::Timestamp| VmMetadata {
        time,
        ..metadata(0)
    };
    let long_ago = |s: i64| jiff::Timestamp::from_second(1_700_000_000 + s).unwrap();
    let referenced = repo.save_vm_metadata(&at(long_ago(1)))?;
    let orphan = repo.save_vm_metadata(&at(long_ago(2)))?;
    let recent = repo.save_vm_metadata(&at(jiff::Timestamp::now()))?;
    let mut writer = repo.pack_writer(None)?;
    let a = writer.add(BlobKind::Data, &data_block(1))?;
    writer.flush()?;
    let plain = commit_disk(&repo, &mut writer, "web-1-xvda", &[a], 0)?;
    drop(writer);
    let mut m = repo.resolve(&plain)?.manifest;
    m.time += jiff::SignedDuration::from_secs(60);
    m.source.vm = Some(vm_info(Some(referenced.clone())));
    repo.commit(&m)?;

    let dry = repo.collect_garbage(
        cbtvault_repo::GcOptions {
            dry_run: true,
            ..Default::default()
        },
        std::time::Duration::ZERO,
    )?;
    assert_eq!(dry.vm_metadata_removed, 1);
    assert!(
        repo.vm_metadata(&orphan).is_ok(),
        "a dry run removes nothing"
    );

    let report = repo.collect_garbage(Default::default(), std::time::Duration::ZERO)?;
    assert_eq!(report.vm_metadata_removed, 1);
    assert!(repo.vm_metadata(&orphan).is_err());
    assert!(repo.vm_metadata(&referenced).is_ok());
    assert!(repo.vm_metadata(&recent).is_ok());
    let listed: Vec<String> = repo
        .vm_metadata_list(None)?
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert!(!listed.contains(&orphan));
    assert!(repo.verify(false, 1, &|_| {})?.is_ok());
    Ok(())
}
