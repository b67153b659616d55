//! Creating and opening repositories, writing and reading blobs, and
//! finding restore points.

use std::collections::HashMap;

use cbtvault_repo::Crypto;
use cbtvault_repo::testing::pack::BlobKind;
use cbtvault_repo::{
    BlobId, CONFIG_FILE, Error, FORMAT_VERSION, FileKind, InitOptions, Repository, Result,
    testing::manifest,
};

use super::common::{
    Rng, blocks_of, commit_disk, data_block, manifest, new_repo, pack_files, snapshot,
};

#[test]
fn init_then_open_keeps_the_configuration() -> Result<()> {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("new-repo");
    let options = InitOptions {
        compression_level: 5,
        pack_size: 1 << 20,
        ..InitOptions::default()
    };
    let created = Repository::init(&path, &options)?.config().clone();
    assert_eq!(created.format_version, FORMAT_VERSION);
    assert_eq!(created.compression_level, 5);
    assert_eq!(created.pack_size, 1 << 20);

    let opened = Repository::open(&path)?;
    assert_eq!(opened.config(), &created);
    assert!(opened.catalogue().restore_points(None)?.is_empty());

    let again = Repository::init(&path, &options);
    assert!(
        matches!(again, Err(Error::AlreadyExists { .. })),
        "{again:?}"
    );
    let elsewhere = Repository::open(dir.path());
    assert!(
        matches!(elsewhere, Err(Error::NotARepository { .. })),
        "{elsewhere:?}"
    );
    Ok(())
}

#[test]
fn init_refuses_a_non_empty_directory_and_leaves_it_alone() {
    let dir = tempfile::tempdir().expect("temporary directory");
    std::fs::write(dir.path().join("notes.txt"), b"keep me").expect("setup file");
    let before = snapshot(dir.path());
    let result = Repository::init(dir.path(), &InitOptions::default());
    assert!(matches!(result, Err(Error::NotEmpty { .. })), "{result:?}");
    assert_eq!(snapshot(dir.path()), before);
}

#[test]
fn open_refuses_an_unknown_format_version_and_changes_nothing() {
    let (dir, repo) = new_repo(1 << 20);
    drop(repo);
    let config_path = dir.path().join(CONFIG_FILE);
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).expect("read config"))
            .expect("parse config");
    config["format_version"] = 99.into();
    std::fs::write(
        &config_path,
        serde_json::to_vec_pretty(&config).expect("encode config"),
    )
    .expect("write config");

    let before = snapshot(dir.path());
    let result = Repository::open(dir.path());
    assert!(
        matches!(result, Err(Error::UnsupportedVersion { found: 99, supported }) if supported == cbtvault_repo::ENCRYPTED_FORMAT_VERSION),
        "{result:?}"
    );
    assert_eq!(
        snapshot(dir.path()),
        before,
        "a refused open must not touch the repository"
    );
}

#[test]
fn written_blobs_read_back_once_flushed() -> Result<()> {
    // Small packs, so that the blobs spread over several of them.
    let (_dir, repo) = new_repo(150_000);
    let mut writer = repo.pack_writer(None)?;
    let mut contents: Vec<Vec<u8>> = (0..9).map(data_block).collect();
    contents.push(vec![7u8; 65536]);
    contents.push(b"a short last block".to_vec());
    let mut ids = Vec::new();
    for content in &contents {
        ids.push(writer.add(BlobKind::Data, content)?);
    }
    assert_eq!(writer.add(BlobKind::Data, &contents[3])?, ids[3]);
    assert_eq!(
        writer.stats().blobs,
        contents.len() as u64,
        "a duplicate was stored twice"
    );

    let pending = *ids.last().expect("ids");
    assert!(writer.is_pending(&pending));
    let reader = repo.reader()?;
    assert!(matches!(
        reader.read(&pending),
        Err(Error::MissingBlob { .. })
    ));

    writer.flush()?;
    assert_eq!(writer.pending_len(), 0);
    assert!(
        pack_files(&repo).len() >= 3,
        "packs: {:?}",
        pack_files(&repo)
    );
    for (id, content) in ids.iter().zip(&contents) {
        assert_eq!(BlobId::of(content), *id);
        assert_eq!(&reader.read(id)?, content);
    }

    // Any order, duplicates included, comes back in the order asked.
    let mut rng = Rng::new(7);
    let order: Vec<usize> = (0..30)
        .map(|_| rng.below(ids.len() as u64) as usize)
        .collect();
    let asked: Vec<BlobId> = order.iter().map(|&i| ids[i]).collect();
    let got = reader.read_many(&asked)?;
    assert_eq!(got.len(), asked.len());
    for (slot, (result, &i)) in got.into_iter().zip(&order).enumerate() {
        assert_eq!(result?, contents[i], "slot {slot}");
    }
    // An unknown blob is an error in its own slot; the others still read.
    let unknown = [ids[0], BlobId::of(b"never stored")];
    let got = reader.read_many(&unknown)?;
    assert_eq!(got[0].as_ref().ok(), Some(&contents[0]));
    assert!(
        matches!(got[1], Err(cbtvault_repo::Error::MissingBlob { id }) if id == unknown[1]),
        "{:?}",
        got[1].as_ref().err()
    );
    Ok(())
}

#[test]
fn committed_restore_points_resolve_by_unique_prefix() -> Result<()> {
    let (_dir, repo) = new_repo(1 << 20);
    let mut writer = repo.pack_writer(None)?;
    let mut ids = vec![BlobId::ZERO; 300];
    for (block, seed) in [(0usize, 1u64), (1, 2), (200, 3), (299, 4)] {
        ids[block] = writer.add(BlobKind::Data, &data_block(seed))?;
    }
    let older = commit_disk(&repo, &mut writer, "vm1", &ids, 0)?;
    ids[1] = writer.add(BlobKind::Data, &data_block(5))?;
    let newer = commit_disk(&repo, &mut writer, "vm1", &ids, 60)?;

    let row = repo.resolve(&newer[..10])?;
    assert_eq!(row.id, newer);
    assert_eq!(repo.resolve(&newer[..10].to_ascii_uppercase())?.id, newer);
    assert_eq!(repo.resolve(&older)?.id, older);
    assert_eq!(repo.resolve("vm1@latest")?.id, newer);

    // The block map read back from the repository is the one written.
    assert_eq!(blocks_of(&row.manifest.tree(), &repo.reader()?)?, ids);

    let unknown = (0u32..)
        .map(|n| format!("{n:08x}"))
        .find(|p| !newer.starts_with(p.as_str()) && !older.starts_with(p.as_str()))
        .expect("some prefix is unused");
    assert!(matches!(
        repo.resolve(&unknown),
        Err(Error::UnknownRestorePoint(_))
    ));
    // Too short a prefix says so, rather than "no match".
    let short = repo.resolve(&newer[..3]).unwrap_err();
    assert!(short.to_string().contains("too short"), "{short}");
    assert!(matches!(
        repo.resolve("not-hex!"),
        Err(Error::UnknownRestorePoint(_))
    ));
    assert!(matches!(
        repo.resolve("vm2@latest"),
        Err(Error::UnknownRestorePoint(_))
    ));
    Ok(())
}

#[test]
fn a_prefix_shared_by_two_restore_points_is_ambiguous() -> Result<()> {
    // Find two manifests whose ids share their first four hex digits
    // (the shortest prefix resolve accepts).
    let numbered = |n: u64| {
        let mut m = manifest("vm1", 0, BlobId::ZERO, 0);
        m.stats.duration_ms = n;
        m
    };
    let mut seen: HashMap<String, u64> = HashMap::new();
    let mut pair = None;
    for n in 0u64.. {
        let (id, _) = manifest::encode(&numbered(n), &Crypto::Plain).unwrap();
        if let Some(&first) = seen.get(&id[..4]) {
            pair = Some((first, n, id[..4].to_string()));
            break;
        }
        seen.insert(id[..4].to_string(), n);
    }
    let (first, second, prefix) = pair.expect("pigeonhole guarantees a shared prefix");

    let (_dir, repo) = new_repo(1 << 20);
    let committed = [
        repo.commit(&numbered(first))?,
        repo.commit(&numbered(second))?,
    ];
    let result = repo.resolve(&prefix);
    assert!(
        matches!(&result, Err(Error::AmbiguousRestorePoint { count: 2, .. })),
        "{result:?}"
    );
    for id in &committed {
        let unique = (5..=64)
            .map(|n| &id[..n])
            .find(|p| committed.iter().filter(|c| c.starts_with(p)).count() == 1);
        let unique = unique.expect("ids differ");
        assert_eq!(&repo.resolve(unique)?.id, id);
    }
    Ok(())
}

#[test]
fn reopening_reconciles_the_catalogue_with_the_manifests() -> Result<()> {
    let (dir, repo) = new_repo(1 << 20);
    let kept = repo.commit(&manifest("vm1", 0, BlobId::ZERO, 0))?;
    let deleted = repo.commit(&manifest("vm1", 0, BlobId::ZERO, 10))?;
    drop(repo);

    std::fs::remove_file(dir.path().join("manifests").join(format!("{deleted}.json")))
        .expect("delete manifest");
    let repo = Repository::open(dir.path())?;
    let mut known = repo.catalogue().restore_point_ids()?;
    known.sort();
    assert_eq!(known, vec![kept.clone()]);
    assert!(matches!(
        repo.resolve(&deleted),
        Err(Error::UnknownRestorePoint(_))
    ));

    // A manifest written without its catalogue row (a crash in between)
    // is indexed on the next open.
    let (orphan, bytes) =
        manifest::encode(&manifest("vm2", 0, BlobId::ZERO, 20), &Crypto::Plain).unwrap();
    repo.backend().write(FileKind::Manifest, &orphan, &bytes)?;
    drop(repo);
    let repo = Repository::open(dir.path())?;
    assert_eq!(repo.resolve("vm2@latest")?.id, orphan);
    assert_eq!(repo.catalogue().restore_points(None)?.len(), 2);
    Ok(())
}

/// A repository written by the previous release (format 1: packs without
/// blob frames, catalogue schema 1) opens, reads, takes new backups, and is
/// upgraded in place: the config says 2, the catalogue gains its tables.
#[test]
fn a_format_1_repository_is_upgraded_when_opened() -> Result<()> {
    let (dir, repo) = new_repo(32 << 20);
    let mut writer = repo.pack_writer(None)?;
    let a = writer.add(BlobKind::Data, &data_block(1))?;
    writer.flush()?;
    let rp = commit_disk(&repo, &mut writer, "vm1", &[a], 0)?;
    drop(writer);
    drop(repo);
    // Back to what format 1 wrote.
    let config = dir.path().join(CONFIG_FILE);
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("\"format_version\": 2", "\"format_version\": 1"),
    )
    .unwrap();
    let conn = rusqlite::Connection::open(dir.path().join("catalogue.sqlite")).unwrap();
    conn.execute_batch(
        "DROP TABLE quarantine; DROP TABLE forgetting; DROP TABLE lost_restore_points;
         PRAGMA user_version = 1;",
    )
    .unwrap();
    drop(conn);

    let repo = Repository::open(dir.path())?;
    assert_eq!(repo.config().format_version, FORMAT_VERSION);
    assert!(
        std::fs::read_to_string(&config)
            .unwrap()
            .contains("\"format_version\": 2")
    );
    assert!(repo.catalogue().quarantined()?.is_empty());
    assert_eq!(
        blocks_of(&repo.resolve(&rp)?.manifest.tree(), &repo.reader()?)?,
        [a]
    );
    assert!(repo.verify(true, 1, &|_| {})?.is_ok());
    Ok(())
}
