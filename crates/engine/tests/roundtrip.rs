//! Backup → restore round trips on an in-memory disk and a repository
//! whose files are in memory: what a user checks after a backup (it
//! restores byte-exact, an incremental read only what changed) and after
//! a failed one (a clear error, and no restore point to be seen).

mod support;

use cbtvault_blockmap::{BLOCK_SIZE, BlockMap};
use cbtvault_engine::{Changes, Error};
use cbtvault_repo::BackupMode;
use cbtvault_testkit::MemDisk;
use support::{MemSource, back_up, full, job, memory_repo, restored, visible};
use tokio_util::sync::CancellationToken;

/// 40 blocks and a partial one: the last block is short.
const SIZE: u64 = 40 * BLOCK_SIZE + 4096;

fn tracked(map: BlockMap) -> Changes {
    Changes::Blocks {
        map,
        origin: "test".into(),
    }
}

#[tokio::test]
async fn a_full_backup_restores_byte_exact() {
    let (_dir, _mem, repo) = memory_repo();
    let disk = MemDisk::generated(SIZE, 1);
    let out = back_up(
        &repo,
        MemSource::new(&disk),
        job("d0", full()),
        CancellationToken::new(),
    )
    .await
    .expect("backup");
    assert!(matches!(out.manifest.mode, BackupMode::Full { .. }));
    assert_eq!(out.manifest.virtual_size, SIZE);
    assert!(restored(&repo, &out.restore_point) == disk.bytes());
}

#[tokio::test]
async fn an_incremental_restores_byte_exact_and_its_parent_still_does() {
    let (_dir, _mem, repo) = memory_repo();
    let disk = MemDisk::generated(SIZE, 2);
    let first = back_up(
        &repo,
        MemSource::new(&disk),
        job("d0", full()),
        CancellationToken::new(),
    )
    .await
    .expect("full");
    let before = disk.bytes();
    disk.write(3 * BLOCK_SIZE + 100, &[0xab; 5000]);
    disk.write(17 * BLOCK_SIZE, &vec![0x5a; 2 * BLOCK_SIZE as usize]);
    disk.write(SIZE - 10, &[1; 10]);
    let changes = disk.take_changes();
    let second = back_up(
        &repo,
        MemSource::new(&disk),
        job("d0", tracked(changes.clone())),
        CancellationToken::new(),
    )
    .await
    .expect("incremental");
    assert_eq!(
        second.manifest.parent.as_deref(),
        Some(first.restore_point.as_str())
    );
    assert!(matches!(
        second.manifest.mode,
        BackupMode::Incremental {
            changed_blocks: 4,
            ..
        }
    ));
    assert!(restored(&repo, &second.restore_point) == disk.bytes());
    assert!(restored(&repo, &first.restore_point) == before);
}

/// Invariant 1: an incremental reads every block the map marks, once, and
/// nothing else.
#[tokio::test]
async fn an_incremental_reads_only_the_marked_blocks() {
    let (_dir, _mem, repo) = memory_repo();
    let disk = MemDisk::generated(SIZE, 3);
    back_up(
        &repo,
        MemSource::new(&disk),
        job("d0", full()),
        CancellationToken::new(),
    )
    .await
    .expect("full");
    for block in [0u64, 1, 2, 9, 25, 40] {
        disk.write(block * BLOCK_SIZE, &[block as u8 + 1; 300]);
    }
    let changes = disk.take_changes();
    disk.reset_reads();
    let out = back_up(
        &repo,
        MemSource::new(&disk),
        job("d0", tracked(changes.clone())),
        CancellationToken::new(),
    )
    .await
    .expect("incremental");
    let reads = disk.reads_per_block();
    for (block, &count) in reads.iter().enumerate() {
        let expected = u64::from(changes.is_set(block as u64));
        assert_eq!(count, expected, "block {block} was read {count} times");
    }
    assert_eq!(out.manifest.stats.blocks_read, changes.count_set());
    assert!(restored(&repo, &out.restore_point) == disk.bytes());
}

#[tokio::test]
async fn a_map_of_the_wrong_size_is_refused() {
    let (_dir, mem, repo) = memory_repo();
    let disk = MemDisk::generated(SIZE, 4);
    back_up(
        &repo,
        MemSource::new(&disk),
        job("d0", full()),
        CancellationToken::new(),
    )
    .await
    .expect("full");
    let wrong = BlockMap::full(10);
    let err = back_up(
        &repo,
        MemSource::new(&disk),
        job("d0", tracked(wrong)),
        CancellationToken::new(),
    )
    .await
    .expect_err("a map of 10 blocks for a disk of 41");
    assert!(matches!(err, Error::MapMismatch { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("\"d0\"") && text.contains("10 blocks") && text.contains("41"),
        "{text}"
    );
    assert_eq!(visible(&repo, &mem), (1, 1), "only the full is there");
}

#[tokio::test]
async fn a_cancelled_backup_leaves_nothing_visible() {
    let (_dir, mem, repo) = memory_repo();
    let disk = MemDisk::generated(SIZE, 5);
    let cancel = CancellationToken::new();
    let source = MemSource::cancelling(&disk, 5, cancel.clone());
    let err = back_up(&repo, source, job("d0", full()), cancel)
        .await
        .expect_err("cancelled");
    assert!(matches!(err, Error::Cancelled), "{err:?}");
    assert_eq!(visible(&repo, &mem), (0, 0));
    assert!(repo.latest("d0").expect("latest").is_none());
    // The disk is not left locked: the next backup runs.
    let out = back_up(
        &repo,
        MemSource::new(&disk),
        job("d0", full()),
        CancellationToken::new(),
    )
    .await
    .expect("backup after a cancelled one");
    assert!(restored(&repo, &out.restore_point) == disk.bytes());
}

#[tokio::test]
async fn a_source_that_fails_mid_read_names_disk_and_offset() {
    let (_dir, mem, repo) = memory_repo();
    let disk = MemDisk::generated(SIZE, 6);
    // Every block holds data, so the failing one is read.
    disk.write(0, &vec![7; SIZE as usize]);
    disk.fail_reads_from(Some(12 * BLOCK_SIZE + 1));
    let err = back_up(
        &repo,
        MemSource::new(&disk),
        job("vm7-disk0", full()),
        CancellationToken::new(),
    )
    .await
    .expect_err("the read fails");
    let text = err.to_string();
    let offset = 12 * BLOCK_SIZE;
    assert!(
        text.contains("\"vm7-disk0\"") && text.contains(&format!("offset {offset}")),
        "{text}"
    );
    let cause = std::error::Error::source(&err)
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(cause.contains("injected I/O error"), "{cause}");
    assert_eq!(visible(&repo, &mem), (0, 0));
}
