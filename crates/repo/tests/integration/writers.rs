//! Two hosts on one store (each with its own catalogue cache): gc on one
//! condemns while the other's operation runs, sweeps only once it ended,
//! and nothing either host committed is lost.

use std::sync::Arc;
use std::time::Duration;

use cbtvault_repo::testing::pack::BlobKind;
use cbtvault_repo::{
    Backend, BlobId, FileKind, ForgetSelection, GcOptions, InitOptions, MemoryBackend, Repository,
    Result,
};

use super::common::{blocks_of, commit_disk, data_block};

fn gc(repo: &Repository) -> Result<cbtvault_repo::GcReport> {
    let options = GcOptions {
        max_unused: 0.0,
        ..GcOptions::default()
    };
    repo.collect_garbage(options, Duration::ZERO)
}

#[test]
fn gc_condemns_beside_another_hosts_backup_and_sweeps_only_after_it_ended() -> Result<()> {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = Arc::new(MemoryBackend::new());
    let options = InitOptions {
        pack_size: 1 << 20,
        ..InitOptions::default()
    };
    let a = Repository::init_with(&dir.path().join("a"), store.clone(), &options)?;

    // Host A: a restore point, forgotten: its blocks are garbage.
    let mut w = a.pack_writer(None)?;
    let ids: Vec<BlobId> = (0..4)
        .map(|i| w.add(BlobKind::Data, &data_block(i)))
        .collect::<Result<_>>()?;
    let old = commit_disk(&a, &mut w, "old", &ids, 0)?;
    let plan = a.forget_plan(&ForgetSelection::Ids(vec![old]), true)?;
    a.forget(&plan)?;

    // Host B runs a backup that started before gc: it deduplicates
    // against a block that is garbage now.
    let b = Repository::open_cached(&dir.path().join("b"), store.clone())?;
    let running = b.lock_shared()?;
    let mut wb = b.pack_writer(None)?;
    assert!(wb.contains(&ids[0])?);

    // gc on A condemns the pack but cannot sweep it: B's backup ran then.
    let first = gc(&a)?;
    assert_eq!(first.packs_condemned, 1, "{first:?}");
    assert_eq!(
        (first.packs_swept, first.packs_waiting),
        (0, 1),
        "{first:?}"
    );
    assert_eq!(store.list(FileKind::Gc)?.len(), 1);
    let packs_before = store.list(FileKind::Pack)?;
    // A backup starting now, on either host, stores those blocks again.
    assert!(!a.pack_writer(None)?.contains(&ids[1])?);
    b.refresh()?;
    assert!(!b.pack_writer(None)?.contains(&ids[1])?);

    // B commits what it deduplicated, and ends.
    let kept = commit_disk(&b, &mut wb, "b", &ids[..1], 1)?;
    drop(running);

    // The next gc sweeps: the old pack holds a live blob again, so its
    // live blob is copied out and the pack goes; nothing waits any more.
    let second = gc(&a)?;
    assert_eq!(second.packs_waiting, 0, "{second:?}");
    assert!(second.packs_swept >= 1, "{second:?}");
    assert!(store.list(FileKind::Gc)?.is_empty(), "every record swept");
    let packs_after = store.list(FileKind::Pack)?;
    assert!(
        packs_before.iter().any(|p| !packs_after.contains(p)),
        "the condemned pack is gone"
    );

    // Both hosts restore B's point (B after a refresh finds the moved
    // copy), and verify passes on both.
    for host in [&a, &b] {
        host.refresh()?;
        let rp = host.resolve(&kept)?;
        let reader = host.reader()?;
        let blocks = blocks_of(&rp.manifest.tree(), &reader)?;
        assert_eq!(blocks, ids[..1].to_vec());
        assert_eq!(reader.read(&ids[0])?, data_block(0));
        let report = host.verify(true, 1, &|_| {})?;
        assert!(report.is_ok(), "{report:?}");
    }
    Ok(())
}

#[test]
fn one_gc_at_a_time_and_a_disk_is_backed_up_by_one_host_at_a_time() -> Result<()> {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = Arc::new(MemoryBackend::new());
    let a = Repository::init_with(&dir.path().join("a"), store.clone(), &Default::default())?;
    let b = Repository::open_cached(&dir.path().join("b"), store.clone())?;
    let held = a.lock_disk("d")?;
    // Another process of this host holds the kernel lock; another host's
    // process sees the lock object.
    assert!(
        store
            .list(FileKind::Lock)?
            .iter()
            .any(|n| n.starts_with("disk-"))
    );
    drop(held);
    assert!(store.list(FileKind::Lock)?.is_empty(), "released on drop");
    let _b_holds = b.lock_disk("d")?;
    // gc runs beside a shared holder (an operation), never beside nothing
    // it must wait for.
    let _op = a.lock_shared()?;
    gc(&a)?;
    Ok(())
}

#[test]
fn a_pack_a_killed_gc_deleted_after_condemning_it_is_not_reported_lost() -> Result<()> {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = Arc::new(MemoryBackend::new());
    let options = InitOptions {
        pack_size: 1 << 20,
        ..InitOptions::default()
    };
    let a = Repository::init_with(&dir.path().join("a"), store.clone(), &options)?;
    let mut w = a.pack_writer(None)?;
    let ids: Vec<BlobId> = (0..4)
        .map(|i| w.add(BlobKind::Data, &data_block(i)))
        .collect::<Result<_>>()?;
    let old = commit_disk(&a, &mut w, "old", &ids, 0)?;
    let mut w = a.pack_writer(None)?;
    let kept: Vec<BlobId> = (10..12)
        .map(|i| w.add(BlobKind::Data, &data_block(i)))
        .collect::<Result<_>>()?;
    let kept_id = commit_disk(&a, &mut w, "kept", &kept, 1)?;
    a.forget(&a.forget_plan(&ForgetSelection::Ids(vec![old]), true)?)?;

    // A gc condemns the forgotten pack while another host's operation
    // runs, so it cannot sweep yet.
    let b = Repository::open_cached(&dir.path().join("b"), store.clone())?;
    let running = b.lock_shared()?;
    assert_eq!(gc(&a)?.packs_condemned, 1);
    drop(running);
    // The next gc is killed mid-sweep: the pack file is deleted, its
    // record and the catalogue's row are not.
    let records = store.list(FileKind::Gc)?;
    assert_eq!(records.len(), 1);
    let record: serde_json::Value = serde_json::from_slice(&store.read(FileKind::Gc, &records[0])?)
        .expect("a gc record is JSON");
    let pack = record["packs"][0].as_str().expect("a condemned pack");
    store.remove(FileKind::Pack, pack)?;

    // Nothing is lost: verify passes, the kept point restores, and the
    // next gc finishes the sweep.
    let report = a.verify(true, 1, &|_| {})?;
    assert!(report.is_ok(), "{report:?}");
    let reader = a.reader()?;
    let rp = a.resolve(&kept_id)?;
    assert_eq!(blocks_of(&rp.manifest.tree(), &reader)?, kept);
    gc(&a)?;
    assert!(
        store.list(FileKind::Gc)?.is_empty(),
        "the sweep was finished"
    );
    assert!(a.verify(true, 1, &|_| {})?.is_ok());
    Ok(())
}
