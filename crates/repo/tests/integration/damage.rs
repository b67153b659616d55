//! Damage: a flipped byte must be caught on read and reported by verify
//! with the restore points and disk offsets it affects.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

use cbtvault_repo::VerifyReport;
use cbtvault_repo::testing::pack::BlobKind;
use cbtvault_repo::{BLOCK_SIZE, BlobId, Error, FileKind, Repository, Result};

use super::common::{commit_disk, data_block, new_repo, pack_files};

/// Flips one byte of blob `id` where it is stored.
fn flip_byte(repo: &Repository, id: &BlobId, at: u64) -> Result<()> {
    let loc = repo.reader()?.locate(id)?;
    let path = repo.backend().locate(FileKind::Pack, &loc.pack);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open pack");
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, loc.entry.offset + at)
        .expect("read byte");
    byte[0] ^= 0xff;
    file.write_all_at(&byte, loc.entry.offset + at)
        .expect("write byte");
    Ok(())
}

fn verify_all(repo: &Repository) -> Result<VerifyReport> {
    let progress = AtomicU64::new(0);
    let report = repo.verify(true, 2, &|bytes| {
        progress.fetch_add(bytes, Ordering::Relaxed);
    })?;
    assert_eq!(
        progress.into_inner(),
        report.bytes_read,
        "progress must add up to the bytes read"
    );
    Ok(report)
}

/// Two restore points sharing block `a`; only the second uses `c`.
struct Fixture {
    a: BlobId,
    b: BlobId,
    c: BlobId,
    first: String,
    second: String,
}

fn two_restore_points(repo: &Repository) -> Result<Fixture> {
    let mut writer = repo.pack_writer(None)?;
    let a = writer.add(BlobKind::Data, &data_block(1))?;
    let b = writer.add(BlobKind::Data, &data_block(2))?;
    let c = writer.add(BlobKind::Data, &data_block(3))?;
    // The blocks get a pack of their own; each block map gets another.
    writer.flush()?;
    let mut ids = vec![BlobId::ZERO; 10];
    ids[0] = a;
    ids[1] = b;
    let first = commit_disk(repo, &mut writer, "vm1", &ids, 0)?;
    let mut ids = vec![BlobId::ZERO; 400];
    ids[0] = a;
    ids[5] = c;
    ids[300] = c;
    let second = commit_disk(repo, &mut writer, "vm2", &ids, 10)?;
    Ok(Fixture {
        a,
        b,
        c,
        first,
        second,
    })
}

#[test]
fn an_intact_repository_verifies_clean() -> Result<()> {
    let (_dir, repo) = new_repo(32 << 20);
    two_restore_points(&repo)?;
    let report = verify_all(&repo)?;
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.restore_points, 2);
    assert_eq!(report.packs, pack_files(&repo).len());
    let stored: u64 = repo.catalogue().packs()?.iter().map(|(_, size)| size).sum();
    assert_eq!(report.bytes_read, stored);
    // Three blocks, the first map's root, and the second's root and two
    // leaves (its other two leaves are all zero, so not stored).
    assert_eq!(report.blobs_read, 3 + 1 + 3);
    Ok(())
}

#[test]
fn a_flipped_byte_in_a_block_is_caught_and_located() -> Result<()> {
    let (_dir, repo) = new_repo(32 << 20);
    let f = two_restore_points(&repo)?;
    flip_byte(&repo, &f.c, 100)?;

    let reader = repo.reader()?;
    let err = reader
        .read(&f.c)
        .expect_err("a damaged blob must not be returned");
    assert!(
        matches!(&err, Error::CorruptBlob { id, .. } if *id == f.c),
        "{err:?}"
    );
    assert!(
        err.to_string().contains(&f.c.to_hex()),
        "the message must name the blob: {err}"
    );
    assert_eq!(reader.read(&f.a)?, data_block(1));
    assert_eq!(reader.read(&f.b)?, data_block(2));

    // Only the damaged slot fails in a batch read.
    let batch = reader.read_many(&[f.a, f.c, f.b])?;
    assert!(matches!(&batch[0], Ok(content) if *content == data_block(1)));
    // The first read quarantined it: from then on it reads as such.
    assert!(matches!(&batch[1], Err(Error::Quarantined { id, .. }) if *id == f.c));
    assert!(matches!(&batch[2], Ok(content) if *content == data_block(2)));

    // Quarantined, it fails even a structural check, and a full one.
    assert!(!repo.verify(false, 1, &|_| {})?.is_ok());
    let report = verify_all(&repo)?;
    assert!(!report.is_ok());
    let objects: Vec<&str> = report.problems.iter().map(|p| p.object.as_str()).collect();
    assert_eq!(objects, [format!("blob {}", f.c)]);
    assert_eq!(report.damaged.len(), 1, "{:?}", report.damaged);
    let damage = &report.damaged[0];
    assert_eq!(damage.restore_point, f.second);
    assert_eq!(damage.disk, "vm2");
    assert_eq!(damage.offsets, [5 * BLOCK_SIZE, 300 * BLOCK_SIZE]);
    Ok(())
}

#[test]
fn a_damaged_block_map_node_loses_the_blocks_below_it() -> Result<()> {
    let (_dir, repo) = new_repo(32 << 20);
    let f = two_restore_points(&repo)?;
    let first = repo.resolve(&f.first)?.manifest;
    // The first disk has 10 blocks: its root is its only node.
    flip_byte(&repo, &first.root, 20)?;

    let report = verify_all(&repo)?;
    let objects: Vec<&str> = report.problems.iter().map(|p| p.object.as_str()).collect();
    assert!(
        objects.contains(&format!("blob {}", first.root).as_str()),
        "{objects:?}"
    );
    assert_eq!(report.damaged.len(), 1, "{:?}", report.damaged);
    let damage = &report.damaged[0];
    assert_eq!(damage.restore_point, f.first);
    assert!(
        damage.offsets.contains(&0) && damage.offsets.contains(&BLOCK_SIZE),
        "{damage:?}"
    );
    assert!(
        damage
            .offsets
            .iter()
            .all(|o| o.is_multiple_of(BLOCK_SIZE) && *o < 10 * BLOCK_SIZE),
        "{damage:?}"
    );
    Ok(())
}

#[test]
fn a_missing_pack_is_reported_with_what_it_held() -> Result<()> {
    let (_dir, repo) = new_repo(32 << 20);
    let f = two_restore_points(&repo)?;
    let pack = repo.reader()?.locate(&f.b)?.pack;
    std::fs::remove_file(repo.backend().locate(FileKind::Pack, &pack)).expect("delete pack");

    let report = verify_all(&repo)?;
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.object == format!("pack {pack}") && p.problem.contains("missing")),
        "{:?}",
        report.problems
    );
    // The pack held every block, so both restore points lose theirs.
    let mut damaged: Vec<(&str, &[u64])> = report
        .damaged
        .iter()
        .map(|d| (d.restore_point.as_str(), d.offsets.as_slice()))
        .collect();
    damaged.sort();
    let mut expected: Vec<(&str, &[u64])> = vec![
        (f.first.as_str(), &[0, BLOCK_SIZE]),
        (f.second.as_str(), &[0, 5 * BLOCK_SIZE, 300 * BLOCK_SIZE]),
    ];
    expected.sort();
    assert_eq!(damaged, expected);
    Ok(())
}
