//! Writing restore points through the repository's backup writer: what it
//! commits, what it takes from the parent, and the runs it records.

use std::sync::Arc;

use cbtvault_repo::{BLOCK_SIZE, BackupMode, BackupSpec, BlobId, Repository, Result, SourceInfo};

use super::common::{blocks_of, data_block, new_repo};

fn spec<'a>(
    disk: &'a str,
    size: u64,
    parent: Option<&'a cbtvault_repo::RestorePointRow>,
) -> BackupSpec<'a> {
    BackupSpec {
        disk,
        size,
        parent,
        source: SourceInfo::default(),
        time: jiff::Timestamp::now(),
        mode: BackupMode::Full { reason: None },
        compression_level: None,
        resume: None,
    }
}

/// Encodes and pushes `blocks` (index, content) in order.
fn push_all(
    repo: &Repository,
    writer: &mut cbtvault_repo::BackupWriter,
    blocks: &[(u64, Vec<u8>)],
) -> Result<()> {
    let mut encoder = repo.block_encoder(None)?.clone();
    for (index, content) in blocks {
        writer.push(*index, encoder.encode(content)?)?;
    }
    Ok(())
}

#[test]
fn a_full_then_an_incremental_commit_what_was_pushed_and_take_the_rest_from_the_parent()
-> Result<()> {
    let (_dir, repo) = new_repo(1 << 20);
    let repo = Arc::new(repo);
    let zero = vec![0u8; BLOCK_SIZE as usize];
    let full = [
        (0, data_block(1)),
        (1, zero.clone()),
        (2, data_block(2)),
        (3, data_block(1)),
        (4, data_block(3)),
    ];
    let mut writer = repo.begin_backup(spec("d0", 5 * BLOCK_SIZE, None))?;
    assert!(
        writer.blocks_to_reread()?.is_empty(),
        "a full reads what it is given"
    );
    push_all(&repo, &mut writer, &full)?;
    let (first, manifest) = writer.finish(Default::default())?;
    assert_eq!(manifest.stats.blocks_new, 3);
    assert_eq!(manifest.stats.blocks_zero, 1);
    assert_eq!(
        manifest.stats.blocks_dedup, 1,
        "the repeated block is stored once"
    );
    assert_eq!(manifest.stats.blocks_total, 5);
    assert_eq!(repo.latest("d0")?.map(|rp| rp.id), Some(first.clone()));
    let runs = repo.catalogue().runs(10)?;
    assert_eq!(runs[0].status, "ok");
    assert_eq!(runs[0].restore_point, first);

    // The disk grows by half a block; only block 1 changed.
    let parent = repo.resolve(&first)?;
    let size = 5 * BLOCK_SIZE + BLOCK_SIZE / 2;
    let mut writer = repo.begin_backup(spec("d0", size, Some(&parent)))?;
    assert_eq!(
        writer.blocks_to_reread()?,
        vec![5..6],
        "the new partial last block must be read"
    );
    let tail = data_block(9)[..(BLOCK_SIZE / 2) as usize].to_vec();
    push_all(&repo, &mut writer, &[(1, data_block(4)), (5, tail.clone())])?;
    let (second, manifest) = writer.finish(Default::default())?;
    assert_eq!(manifest.parent.as_deref(), Some(first.as_str()));
    assert_eq!(manifest.virtual_size, size);

    let reader = repo.reader()?;
    let ids = blocks_of(&manifest.tree(), &reader)?;
    let expected: Vec<BlobId> = [
        data_block(1),
        data_block(4),
        data_block(2),
        data_block(1),
        data_block(3),
        tail,
    ]
    .iter()
    .map(|b| BlobId::of(b))
    .collect();
    assert_eq!(ids, expected);
    for (id, content) in ids.iter().zip([data_block(1), data_block(4)]) {
        assert_eq!(reader.read(id)?, content);
    }
    assert_eq!(repo.latest("d0")?.map(|rp| rp.id), Some(second));
    Ok(())
}

#[test]
fn a_writer_dropped_or_failed_commits_nothing_and_closes_its_run_as_failed() -> Result<()> {
    let (_dir, repo) = new_repo(1 << 20);
    let repo = Arc::new(repo);
    let mut writer = repo.begin_backup(spec("d0", 2 * BLOCK_SIZE, None))?;
    push_all(&repo, &mut writer, &[(0, data_block(1))])?;
    assert_eq!(repo.catalogue().runs(1)?[0].status, "running");
    drop(writer);
    assert!(repo.catalogue().restore_points(None)?.is_empty());
    assert_eq!(repo.catalogue().runs(1)?[0].status, "failed");

    let writer = repo.begin_backup(spec("d0", 2 * BLOCK_SIZE, None))?;
    writer.fail("the source went away");
    let run = &repo.catalogue().runs(1)?[0];
    assert_eq!(
        (run.status.as_str(), run.detail.as_str()),
        ("failed", "the source went away")
    );
    assert!(repo.catalogue().restore_points(None)?.is_empty());
    Ok(())
}

#[test]
fn blocks_are_pushed_in_order_and_never_longer_than_a_block() -> Result<()> {
    let (_dir, repo) = new_repo(1 << 20);
    let repo = Arc::new(repo);
    let mut encoder = repo.block_encoder(None)?;
    assert!(encoder.encode(&vec![1u8; BLOCK_SIZE as usize + 1]).is_err());
    let mut writer = repo.begin_backup(spec("d0", 4 * BLOCK_SIZE, None))?;
    writer.push(2, encoder.encode(&data_block(1))?)?;
    assert!(writer.push(1, encoder.encode(&data_block(2))?).is_err());
    Ok(())
}

#[test]
fn a_suspended_backup_keeps_what_it_read_through_gc_and_the_next_one_resumes_from_it() -> Result<()>
{
    use cbtvault_blockmap::BlockMap;
    let (_dir, repo) = new_repo(1 << 20);
    let repo = Arc::new(repo);
    let size = 6 * BLOCK_SIZE;
    let mut writer = repo.begin_backup(spec("d0", size, None))?;
    push_all(
        &repo,
        &mut writer,
        &(0..6).map(|i| (i, data_block(i))).collect::<Vec<_>>(),
    )?;
    let (first, _) = writer.finish(Default::default())?;
    let parent = repo.resolve(&first)?;

    // Blocks 1, 2, 4 and 5 changed; the backup stops after reading 1 and 2
    // from snapshot "s1".
    let mut writer = repo.begin_backup(spec("d0", size, Some(&parent)))?;
    push_all(
        &repo,
        &mut writer,
        &[(1, data_block(11)), (2, data_block(12))],
    )?;
    assert_eq!(writer.suspend("s1", "stopped")?, 2);
    let run = &repo.catalogue().runs(1)?[0];
    assert_eq!(run.status, "failed");
    assert!(run.detail.contains("2 blocks kept"), "{}", run.detail);
    assert_eq!(repo.latest("d0")?.map(|rp| rp.id), Some(first.clone()));

    // gc keeps what the record needs.
    repo.collect_garbage(Default::default(), std::time::Duration::ZERO)?;
    let record = repo.resumable("d0")?.expect("a resume record");
    assert_eq!(
        (
            record.snapshot.as_str(),
            record.parent.as_deref(),
            record.size
        ),
        ("s1", Some(first.as_str()), size)
    );
    assert_eq!(record.done.set_blocks().collect::<Vec<_>>(), [1, 2]);

    // By the next snapshot, block 2 changed again (and 4, 5 as before):
    // block 1 is kept, block 2 read again, the rest taken from the parent.
    let mut changed_since = BlockMap::empty(6);
    changed_since.set(2);
    let resume = record.resume(&changed_since);
    assert_eq!(resume.kept.set_blocks().collect::<Vec<_>>(), [1]);
    assert_eq!(resume.reread.set_blocks().collect::<Vec<_>>(), [2]);
    let mut s = spec("d0", size, Some(&parent));
    s.resume = Some(&resume);
    let mut writer = repo.begin_backup(s)?;
    push_all(
        &repo,
        &mut writer,
        &[
            (2, data_block(22)),
            (4, data_block(14)),
            (5, data_block(15)),
        ],
    )?;
    let (second, manifest) = writer.finish(Default::default())?;
    let ids = blocks_of(&manifest.tree(), &repo.reader()?)?;
    let expected: Vec<BlobId> = [0, 11, 22, 3, 14, 15]
        .iter()
        .map(|&i| BlobId::of(&data_block(i)))
        .collect();
    assert_eq!(ids, expected);
    assert_eq!(manifest.parent.as_deref(), Some(first.as_str()));
    assert!(
        repo.resumable("d0")?.is_none(),
        "the commit drops the record"
    );
    assert_eq!(repo.latest("d0")?.map(|rp| rp.id), Some(second));

    // A record that does not fit the backup is refused, not used.
    let mut writer = repo.begin_backup(spec("d0", size, None))?;
    push_all(&repo, &mut writer, &[(0, data_block(30))])?;
    writer.suspend("s2", "stopped")?;
    let wrong = repo
        .resumable("d0")?
        .expect("a record")
        .resume(&BlockMap::empty(6));
    let mut s = spec("d0", size, Some(&parent));
    s.resume = Some(&wrong);
    assert!(repo.begin_backup(s).is_err());
    Ok(())
}

#[test]
fn a_backup_stopped_before_any_block_keeps_no_record() -> Result<()> {
    let (_dir, repo) = new_repo(1 << 20);
    let repo = Arc::new(repo);
    let writer = repo.begin_backup(spec("d0", 2 * BLOCK_SIZE, None))?;
    assert_eq!(writer.suspend("s1", "stopped")?, 0);
    assert!(repo.resumable("d0")?.is_none());
    Ok(())
}
