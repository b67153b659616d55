//! gc and repair: what they remove, what they keep, and what they rebuild.

use std::collections::BTreeSet;
use std::time::Duration;

use cbtvault_repo::ForgetSelection;
use cbtvault_repo::repair;
use cbtvault_repo::testing::pack::{BlobKind, Compression, PackBuilder};
use cbtvault_repo::{BlobId, Error, FileKind, Repository, Result};
use cbtvault_repo::{GcOptions, GcReport};

use super::common::{self, commit_disk, data_block, new_repo, pack_files};

fn gc(repo: &Repository) -> Result<GcReport> {
    repo.collect_garbage(GcOptions::default(), Duration::ZERO)
}

/// Forgets one restore point, as `cbtvault forget ID --allow-forget-last`.
fn forget(repo: &Repository, id: &str) -> Result<()> {
    let plan = repo.forget_plan(&ForgetSelection::Ids(vec![id.to_string()]), true)?;
    assert_eq!(repo.forget(&plan)?, 1);
    Ok(())
}

/// Pack files on storage and packs in the catalogue must be the same set.
fn assert_packs_consistent(repo: &Repository) -> Result<()> {
    let indexed: Vec<String> = repo
        .catalogue()
        .packs()?
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    assert_eq!(pack_files(repo), indexed, "storage and catalogue disagree");
    Ok(())
}

fn assert_verifies(repo: &Repository) -> Result<()> {
    let report = repo.verify(true, 2, &|_| {})?;
    assert!(report.is_ok(), "{report:?}");
    Ok(())
}

/// Every block id of a restore point's block map.
fn blocks_of(repo: &Repository, id: &str) -> Result<Vec<BlobId>> {
    common::blocks_of(&repo.resolve(id)?.manifest.tree(), &repo.reader()?)
}

#[test]
fn gc_after_forget_removes_only_unreferenced_data() -> Result<()> {
    let (_dir, repo) = new_repo(32 << 20);
    let mut writer = repo.pack_writer(None)?;
    let a = writer.add(BlobKind::Data, &data_block(1))?;
    let b = writer.add(BlobKind::Data, &data_block(2))?;
    writer.flush()?;
    let c = writer.add(BlobKind::Data, &data_block(3))?;
    writer.flush()?;
    let forgotten = commit_disk(&repo, &mut writer, "vm1", &[a, b], 0)?;
    let kept = commit_disk(&repo, &mut writer, "vm1", &[a, BlobId::ZERO, c], 10)?;
    assert_eq!(pack_files(&repo).len(), 4);

    forget(&repo, &forgotten)?;
    assert!(matches!(
        repo.resolve(&forgotten),
        Err(Error::UnknownRestorePoint(_))
    ));
    let report = gc(&repo)?;
    // b and the forgotten block map's only node are gone; the pack that
    // held that node is deleted, and the pack of a and b is rewritten.
    assert_eq!(report.blobs_removed, 2, "{report:?}");
    assert_eq!(report.packs_deleted, 1, "{report:?}");
    assert_eq!(report.packs_rewritten, 1, "{report:?}");
    assert_eq!(report.packs_written, 1, "{report:?}");
    assert_eq!(pack_files(&repo).len(), 3);
    assert_packs_consistent(&repo)?;

    let reader = repo.reader()?;
    assert!(matches!(reader.read(&b), Err(Error::MissingBlob { .. })));
    assert_eq!(reader.read(&a)?, data_block(1));
    assert_eq!(reader.read(&c)?, data_block(3));
    assert_eq!(blocks_of(&repo, &kept)?, [a, BlobId::ZERO, c]);
    assert_verifies(&repo)?;

    // Nothing is left to collect.
    let again = gc(&repo)?;
    assert_eq!(
        (
            again.blobs_removed,
            again.packs_deleted,
            again.packs_rewritten
        ),
        (0, 0, 0),
        "{again:?}"
    );
    assert_verifies(&repo)?;
    Ok(())
}

#[test]
fn gc_keeps_live_packs_of_small_blobs() -> Result<()> {
    // A well-compressible block and a two-block map: packs whose index is
    // bigger than their data, every blob in them live.
    let (_dir, repo) = new_repo(32 << 20);
    let mut writer = repo.pack_writer(None)?;
    let block = vec![7u8; 65536];
    let id = writer.add(BlobKind::Data, &block)?;
    writer.flush()?;
    let rp = commit_disk(&repo, &mut writer, "vm1", &[id, BlobId::ZERO], 0)?;
    let packs = pack_files(&repo);

    for _ in 0..2 {
        let report = gc(&repo)?;
        assert_eq!(report.blobs_removed, 0, "{report:?}");
        assert_eq!(report.packs_deleted, 0, "{report:?}");
        assert_packs_consistent(&repo)?;
        assert_eq!(repo.reader()?.read(&id)?, block);
        assert_eq!(blocks_of(&repo, &rp)?, [id, BlobId::ZERO]);
        assert_verifies(&repo)?;
    }
    assert_eq!(pack_files(&repo).len(), packs.len());
    Ok(())
}

/// Writes a pack of one blob, stored as given, straight to storage without
/// indexing it, as a crash between the two steps leaves it.
fn write_unindexed_pack(
    repo: &Repository,
    id: BlobId,
    compression: Compression,
    raw_len: u32,
    stored: &[u8],
) -> Result<String> {
    let mut builder = PackBuilder::with_capacity(stored.len());
    builder.push(id, BlobKind::Data, compression, raw_len, stored);
    let pack = builder.finish();
    repo.backend()
        .write(FileKind::Pack, &pack.name, &pack.bytes)?;
    Ok(pack.name)
}

/// As above, for a block stored raw.
fn write_unindexed_block(repo: &Repository, content: &[u8]) -> Result<(String, BlobId)> {
    let id = BlobId::of(content);
    let name = write_unindexed_pack(repo, id, Compression::None, content.len() as u32, content)?;
    Ok((name, id))
}

#[test]
fn gc_indexes_pack_files_the_catalogue_does_not_know() -> Result<()> {
    let (_dir, repo) = new_repo(32 << 20);
    let (used_pack, used) = write_unindexed_block(&repo, &data_block(1))?;
    let (unused_pack, _) = write_unindexed_block(&repo, &data_block(2))?;
    assert!(matches!(
        repo.reader()?.read(&used),
        Err(Error::MissingBlob { .. })
    ));
    let mut writer = repo.pack_writer(None)?;
    let rp = commit_disk(&repo, &mut writer, "vm1", &[used], 0)?;

    let report = gc(&repo)?;
    assert_eq!(report.packs_indexed, 2, "{report:?}");
    // The pack nothing references is indexed, then collected.
    assert_eq!(report.packs_deleted, 1, "{report:?}");
    let files = pack_files(&repo);
    assert!(
        files.contains(&used_pack) && !files.contains(&unused_pack),
        "{files:?}"
    );
    assert_packs_consistent(&repo)?;
    assert_eq!(repo.reader()?.read(&used)?, data_block(1));
    assert_eq!(blocks_of(&repo, &rp)?, [used]);
    assert_verifies(&repo)?;
    Ok(())
}

#[test]
fn gc_never_deletes_the_pack_it_just_wrote() -> Result<()> {
    // Pack P holds a small block x and a big block z. A second pack R holds
    // only x, stored the same way (two backups stored x at once), so the
    // catalogue places nothing in R. Once z is dead, rewriting P yields a
    // pack identical to R, under R's name, while R itself is dropped.
    let (_dir, repo) = new_repo(32 << 20);
    let mut writer = repo.pack_writer(None)?;
    let small = vec![7u8; 65536];
    let x = writer.add(BlobKind::Data, &small)?;
    let z = writer.add(BlobKind::Data, &data_block(1))?;
    writer.flush()?;
    let loc = repo.reader()?.locate(&x)?;
    let stored = repo.backend().read_at(
        FileKind::Pack,
        &loc.pack,
        loc.entry.offset,
        loc.entry.stored_len as usize,
    )?;
    let twin = write_unindexed_pack(&repo, x, loc.entry.compression, loc.entry.raw_len, &stored)?;
    let uses_z = commit_disk(&repo, &mut writer, "vm1", &[z], 0)?;
    let uses_x = commit_disk(
        &repo,
        &mut writer,
        "vm2",
        &[x, BlobId::ZERO, BlobId::ZERO],
        0,
    )?;
    forget(&repo, &uses_z)?;

    let report = gc(&repo)?;
    assert_eq!(report.packs_rewritten, 1, "{report:?}");
    assert!(pack_files(&repo).contains(&twin));
    assert_packs_consistent(&repo)?;
    assert_eq!(repo.reader()?.read(&x)?, small);
    assert_eq!(blocks_of(&repo, &uses_x)?, [x, BlobId::ZERO, BlobId::ZERO]);
    assert_verifies(&repo)?;
    Ok(())
}

#[test]
fn gc_dry_run_changes_nothing() -> Result<()> {
    let (_dir, repo) = new_repo(32 << 20);
    let mut writer = repo.pack_writer(None)?;
    let a = writer.add(BlobKind::Data, &data_block(1))?;
    writer.flush()?;
    let rp = commit_disk(&repo, &mut writer, "vm1", &[a], 0)?;
    forget(&repo, &rp)?;
    let before = pack_files(&repo);
    let report = repo.collect_garbage(
        GcOptions {
            dry_run: true,
            ..GcOptions::default()
        },
        Duration::ZERO,
    )?;
    assert_eq!(report.packs_deleted, 2, "{report:?}");
    assert_eq!(pack_files(&repo), before);
    assert_eq!(repo.reader()?.read(&a)?, data_block(1));
    Ok(())
}

#[test]
fn repair_rebuilds_a_deleted_catalogue() -> Result<()> {
    let (dir, repo) = new_repo(200_000);
    let mut writer = repo.pack_writer(None)?;
    let blocks: Vec<Vec<u8>> = (0..6).map(data_block).collect();
    let mut ids = Vec::new();
    for content in &blocks {
        ids.push(writer.add(BlobKind::Data, content)?);
    }
    let mut first = ids.clone();
    first.resize(1000, BlobId::ZERO);
    let rp1 = commit_disk(&repo, &mut writer, "vm1", &first, 0)?;
    let rp2 = commit_disk(&repo, &mut writer, "vm2", &ids[2..], 10)?;
    let packs = pack_files(&repo);
    drop(writer);
    drop(repo);

    for suffix in ["", "-wal", "-shm"] {
        let path = dir.path().join(format!("catalogue.sqlite{suffix}"));
        if path.exists() {
            std::fs::remove_file(&path).expect("delete catalogue");
        }
    }
    let broken = Repository::open(dir.path());
    assert!(matches!(broken, Err(Error::Catalogue { .. })), "{broken:?}");

    let report = repair(dir.path(), Duration::ZERO)?;
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    assert_eq!(report.restore_points, 2);
    assert_eq!(report.packs_indexed, packs.len());

    let repo = Repository::open(dir.path())?;
    let points: BTreeSet<String> = repo.catalogue().restore_point_ids()?.into_iter().collect();
    assert_eq!(points, BTreeSet::from([rp1.clone(), rp2.clone()]));
    assert_eq!(repo.resolve("vm2@latest")?.id, rp2);
    assert_eq!(blocks_of(&repo, &rp1)?, first);
    assert_eq!(blocks_of(&repo, &rp2)?, ids[2..]);
    let reader = repo.reader()?;
    for (id, content) in ids.iter().zip(&blocks) {
        assert_eq!(&reader.read(id)?, content);
    }
    assert_packs_consistent(&repo)?;
    assert_verifies(&repo)?;
    Ok(())
}

#[test]
fn a_run_whose_process_died_is_closed_as_interrupted_on_the_next_open() -> Result<()> {
    let (dir, repo) = new_repo(32 << 20);
    // A backup that started and never ended (its process was killed).
    let dead = repo
        .catalogue()
        .start_run(cbtvault_repo::BACKUP_RUN, Some("vm1"))?;
    // One that is still running: its process holds the disk's lock.
    let alive = repo
        .catalogue()
        .start_run(cbtvault_repo::BACKUP_RUN, Some("vm2"))?;
    let _held = repo.lock_disk("vm2")?;
    drop(repo);

    let repo = Repository::open(dir.path())?;
    let runs = repo.catalogue().runs(10)?;
    let status = |id: i64| runs.iter().find(|r| r.id == id).map(|r| r.status.clone());
    assert_eq!(status(dead).as_deref(), Some("interrupted"), "{runs:?}");
    assert_eq!(status(alive).as_deref(), Some("running"), "{runs:?}");
    Ok(())
}

#[test]
fn repair_salvages_a_pack_whose_index_and_catalogue_are_both_gone() -> Result<()> {
    let (dir, repo) = new_repo(32 << 20);
    let mut writer = repo.pack_writer(None)?;
    let a = writer.add(BlobKind::Data, &data_block(1))?;
    let b = writer.add(BlobKind::Data, &data_block(2))?;
    writer.flush()?;
    let rp = commit_disk(&repo, &mut writer, "vm1", &[a, b], 0)?;
    drop(writer);
    drop(repo);
    // Wreck the data pack's index and trailer, and lose the catalogue.
    let mut packs = Vec::new();
    for sub in std::fs::read_dir(dir.path().join("packs"))
        .unwrap()
        .flatten()
    {
        packs.extend(
            std::fs::read_dir(sub.path())
                .unwrap()
                .flatten()
                .map(|e| e.path()),
        );
    }
    for pack in packs {
        let mut bytes = std::fs::read(&pack).unwrap();
        if bytes.len() > 2 * 65536 {
            let n = bytes.len();
            for byte in &mut bytes[n - 60..] {
                *byte = 0;
            }
            std::fs::write(&pack, bytes).unwrap();
        }
    }
    for f in [
        "catalogue.sqlite",
        "catalogue.sqlite-wal",
        "catalogue.sqlite-shm",
    ] {
        let _ = std::fs::remove_file(dir.path().join(f));
    }
    let report = repair(dir.path(), Duration::ZERO)?;
    assert_eq!(report.packs_salvaged, 1, "{report:?}");
    let repo = Repository::open(dir.path())?;
    assert_eq!(blocks_of(&repo, &rp)?, [a, b]);
    let reader = repo.reader()?;
    assert_eq!(reader.read(&a)?, data_block(1));
    assert_eq!(reader.read(&b)?, data_block(2));
    assert!(repo.verify(true, 1, &|_| {})?.is_ok());
    Ok(())
}
