//! Encryption at rest: what a user relies on — a round trip, no guest
//! data in any file, a wrong passphrase refused, every damaged or swapped
//! object caught, keyed ids, and key slots changed without touching data.

use std::path::Path;
use std::sync::Arc;

use cbtvault_repo::testing::pack;
use cbtvault_repo::{
    BLOCK_SIZE, BackupMode, BackupSpec, BlobId, Error, FileKind, InitOptions, KdfParams,
    Repository, Result, Secret, SourceInfo,
};

use super::common::{blocks_of, data_block, snapshot};

const MARKER: &[u8] = b"CBTVAULT-SECRET-GUEST-MARKER";

/// Cheap Argon2id costs: the slot records them, so the tests stay fast
/// without a special path.
fn cheap() -> KdfParams {
    KdfParams {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    }
}

fn encrypted(path: &Path, passphrase: &str) -> Repository {
    let options = InitOptions {
        pack_size: 1 << 20,
        encryption: Some(Secret::passphrase(passphrase)),
        kdf: cheap(),
        ..InitOptions::default()
    };
    Repository::init(path, &options).expect("init --encrypt")
}

fn open(path: &Path, passphrase: &str) -> Result<Repository> {
    let secret = Secret::passphrase(passphrase);
    Repository::open_keyed(path, Some(&|| Ok(secret.clone())))
}

/// A block full of the marker (compressible) and a random one.
fn marker_block() -> Vec<u8> {
    MARKER
        .iter()
        .copied()
        .cycle()
        .take(BLOCK_SIZE as usize)
        .collect()
}

/// Backs up `blocks` (index, content) as a full of `disk`.
fn back_up(
    repo: &Arc<Repository>,
    disk: &str,
    size: u64,
    blocks: &[(u64, Vec<u8>)],
) -> Result<String> {
    let mut writer = repo.begin_backup(BackupSpec {
        disk,
        size,
        parent: None,
        source: SourceInfo {
            provider: "file".into(),
            location: format!("/images/{disk}.img"),
            ..SourceInfo::default()
        },
        time: jiff::Timestamp::now(),
        mode: BackupMode::Full { reason: None },
        compression_level: None,
        resume: None,
    })?;
    let mut encoder = repo.block_encoder(None)?;
    for (index, content) in blocks {
        writer.push(*index, encoder.encode(content)?)?;
    }
    Ok(writer.finish(Default::default())?.0)
}

/// The content of every block of a restore point.
fn read_back(repo: &Repository, id: &str) -> Result<Vec<Vec<u8>>> {
    let point = repo.resolve(id)?;
    let reader = repo.reader()?;
    let ids = blocks_of(&point.manifest.tree(), &reader)?;
    ids.iter()
        .map(|id| {
            if id.is_zero() {
                Ok(vec![0; BLOCK_SIZE as usize])
            } else {
                reader.read(id)
            }
        })
        .collect()
}

/// Every file under `root` whose bytes contain `needle`.
fn files_containing(root: &Path, needle: &[u8]) -> Vec<String> {
    snapshot(root)
        .into_iter()
        .filter_map(|(name, content)| {
            content
                .filter(|c| c.windows(needle.len()).any(|w| w == needle))
                .map(|_| name)
        })
        .collect()
}

#[test]
fn an_encrypted_repository_round_trips_and_holds_no_plaintext() -> Result<()> {
    let dir = tempfile::tempdir().expect("temporary directory");
    let repo = Arc::new(encrypted(dir.path(), "correct horse"));
    assert!(repo.is_encrypted());
    let blocks = vec![(0, marker_block()), (1, data_block(7)), (3, marker_block())];
    let id = back_up(&repo, "secret-disk", 4 * BLOCK_SIZE, &blocks)?;
    drop(repo);

    let repo = open(dir.path(), "correct horse")?;
    let content = read_back(&repo, &id)?;
    assert_eq!(content[0], marker_block());
    assert_eq!(content[1], data_block(7));
    assert_eq!(content[2], vec![0; BLOCK_SIZE as usize]);
    assert_eq!(content[3], marker_block());
    let report = repo.verify(true, 1, &|_| {})?;
    assert!(report.is_ok(), "{report:?}");
    // Neither the data nor the disk's name is readable in any file but the
    // catalogue (a local index that keeps the manifests' metadata).
    assert_eq!(files_containing(dir.path(), MARKER), Vec::<String>::new());
    let named: Vec<_> = files_containing(dir.path(), b"secret-disk")
        .into_iter()
        .filter(|f| !f.starts_with("catalogue"))
        .collect();
    assert_eq!(named, Vec::<String>::new());
    Ok(())
}

#[test]
fn a_wrong_passphrase_is_refused_and_no_key_gives_structure_only() -> Result<()> {
    let dir = tempfile::tempdir().expect("temporary directory");
    let repo = Arc::new(encrypted(dir.path(), "right"));
    let id = back_up(&repo, "d", BLOCK_SIZE, &[(0, data_block(1))])?;
    drop(repo);

    match open(dir.path(), "wrong") {
        Err(Error::WrongKey { tried: 1, .. }) => {}
        other => panic!("a wrong passphrase must be refused: {other:?}"),
    }
    let locked = Repository::open(dir.path())?;
    assert!(locked.crypto().is_locked());
    match read_back(&locked, &id) {
        Err(Error::KeyRequired { .. }) => {}
        other => panic!("reading without the key: {other:?}"),
    }
    let structure = locked.verify(false, 1, &|_| {})?;
    assert!(structure.is_ok(), "{structure:?}");
    assert!(matches!(
        locked.verify(true, 1, &|_| {}),
        Err(Error::KeyRequired { .. })
    ));
    assert!(matches!(
        cbtvault_repo::repair(dir.path(), std::time::Duration::ZERO),
        Err(Error::KeyRequired { .. })
    ));
    let secret = Secret::passphrase("right");
    let repaired = cbtvault_repo::repair_keyed(
        dir.path(),
        std::time::Duration::ZERO,
        Some(&|| Ok(secret.clone())),
    )?;
    assert_eq!(repaired.restore_points, 1);
    assert_eq!(repaired.blobs_quarantined, 0);
    Ok(())
}

#[test]
fn every_flipped_bit_of_a_sealed_blob_node_and_manifest_is_caught() -> Result<()> {
    let dir = tempfile::tempdir().expect("temporary directory");
    let repo = Arc::new(encrypted(dir.path(), "pw"));
    // A short disk: one small block and one small block-map node.
    let id = back_up(&repo, "tiny", 100, &[(0, MARKER.to_vec())])?;
    let packs = repo.backend().list(FileKind::Pack)?;
    assert_eq!(packs.len(), 1);
    let name = &packs[0];
    let bytes = std::fs::read(repo.backend().locate(FileKind::Pack, name)).expect("pack");
    let entries = pack::read_index(repo.backend().as_ref(), name)?;
    assert_eq!(entries.len(), 2, "one block and one node");
    for entry in &entries {
        let range = entry.offset as usize..entry.offset as usize + entry.stored_len as usize;
        let stored = &bytes[range];
        pack::decode_blob(repo.crypto(), name, entry, stored)?;
        for bit in 0..stored.len() * 8 {
            let mut damaged = stored.to_vec();
            damaged[bit / 8] ^= 1 << (bit % 8);
            match pack::decode_blob(repo.crypto(), name, entry, &damaged) {
                Err(Error::CorruptBlob { id, .. }) => assert_eq!(id, entry.id),
                other => panic!("{:?} bit {bit}: {other:?}", entry.kind),
            }
        }
    }
    // The manifest: every bit, through the file, as a restore would read it.
    let path = repo.backend().locate(FileKind::Manifest, &id);
    let good = std::fs::read(&path).expect("manifest");
    for bit in 0..good.len() * 8 {
        let mut damaged = good.clone();
        damaged[bit / 8] ^= 1 << (bit % 8);
        std::fs::write(&path, &damaged).expect("write");
        match repo.load_manifest(&id) {
            Err(Error::Manifest { name, .. }) => assert_eq!(name, id),
            other => panic!("manifest bit {bit}: {other:?}"),
        }
    }
    std::fs::write(&path, &good).expect("write");
    repo.load_manifest(&id)?;
    Ok(())
}

#[test]
fn a_manifest_swapped_between_restore_points_is_refused() -> Result<()> {
    let dir = tempfile::tempdir().expect("temporary directory");
    let repo = Arc::new(encrypted(dir.path(), "pw"));
    let a = back_up(&repo, "a", BLOCK_SIZE, &[(0, data_block(1))])?;
    let b = back_up(&repo, "b", BLOCK_SIZE, &[(0, data_block(2))])?;
    let (path_a, path_b) = (
        repo.backend().locate(FileKind::Manifest, &a),
        repo.backend().locate(FileKind::Manifest, &b),
    );
    std::fs::copy(&path_a, &path_b).expect("swap");
    match repo.load_manifest(&b) {
        Err(e @ Error::Manifest { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains(&b) && text.contains("cannot be opened"),
                "{text}"
            );
        }
        other => panic!("a swapped manifest must not open: {other:?}"),
    }
    // A blob moved under another id does not open either.
    let packs = repo.backend().list(FileKind::Pack)?;
    let entries = pack::read_index(repo.backend().as_ref(), &packs[0])?;
    let bytes = std::fs::read(repo.backend().locate(FileKind::Pack, &packs[0])).expect("pack");
    let (first, second) = (entries[0], entries[1]);
    let stored = &bytes[first.offset as usize..][..first.stored_len as usize];
    let moved = pack::PackEntry {
        id: second.id,
        ..first
    };
    assert!(pack::decode_blob(repo.crypto(), &packs[0], &moved, stored).is_err());
    Ok(())
}

#[test]
fn ids_are_keyed_per_repository_yet_deduplicate_within_one() -> Result<()> {
    let (one, two) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let (a, b) = (encrypted(one.path(), "pw"), encrypted(two.path(), "pw"));
    let content = data_block(9);
    let (in_a, in_b) = (a.blob_id(&content)?, b.blob_id(&content)?);
    assert_ne!(in_a, in_b);
    assert_ne!(in_a, BlobId::of(&content));
    assert_eq!(in_a, a.blob_id(&content)?);
    // Dedup: the same block twice is stored once.
    let a = Arc::new(a);
    back_up(
        &a,
        "d",
        2 * BLOCK_SIZE,
        &[(0, content.clone()), (1, content)],
    )?;
    let stats = a.latest("d")?.expect("restore point").manifest.stats;
    assert_eq!((stats.blocks_new, stats.blocks_dedup), (1, 1));
    Ok(())
}

#[test]
fn keys_are_added_changed_and_removed_without_rewriting_data() -> Result<()> {
    let dir = tempfile::tempdir().expect("temporary directory");
    let repo = Arc::new(encrypted(dir.path(), "first"));
    let id = back_up(&repo, "d", BLOCK_SIZE, &[(0, marker_block())])?;
    drop(repo);
    let data = |root: &Path| {
        snapshot(root)
            .into_iter()
            .filter(|(name, _)| name.starts_with("packs") || name.starts_with("manifests"))
            .collect::<Vec<_>>()
    };
    let before = data(dir.path());

    let repo = open(dir.path(), "first")?;
    let first_slot = repo.current_key_slot().expect("unlocked").to_string();
    let second = repo.key_add(&Secret::passphrase("second"), cheap())?;
    assert_eq!(repo.key_list()?.len(), 2);
    drop(repo);

    let repo = open(dir.path(), "second")?;
    assert_eq!(repo.current_key_slot(), Some(second.as_str()));
    let third = repo.key_passwd(&Secret::passphrase("third"), cheap())?;
    let slots: Vec<String> = repo.key_list()?.into_iter().map(|s| s.id).collect();
    assert!(slots.contains(&third) && slots.contains(&first_slot) && !slots.contains(&second));
    drop(repo);
    assert!(matches!(
        open(dir.path(), "second"),
        Err(Error::WrongKey { .. })
    ));

    let repo = open(dir.path(), "third")?;
    assert!(repo.key_remove(&third).is_err(), "not the key in use");
    repo.key_remove(&first_slot)?;
    drop(repo);
    assert!(matches!(
        open(dir.path(), "first"),
        Err(Error::WrongKey { .. })
    ));

    // The last slot stays, whoever asks.
    let repo = open(dir.path(), "third")?;
    let key_file = repo.key_add(&Secret::key_file(vec![42; 64]), cheap())?;
    drop(repo);
    let secret = Secret::key_file(vec![42; 64]);
    let by_file = Repository::open_keyed(dir.path(), Some(&|| Ok(secret.clone())))?;
    assert_eq!(by_file.current_key_slot(), Some(key_file.as_str()));
    let remaining: Vec<String> = by_file.key_list()?.into_iter().map(|s| s.id).collect();
    by_file.key_remove(
        &remaining
            .iter()
            .find(|s| **s != key_file)
            .expect("other")
            .clone(),
    )?;
    drop(by_file);
    let fresh = Repository::open(dir.path())?;
    assert!(matches!(
        fresh.key_remove(&key_file),
        Err(Error::LastKeySlot)
    ));

    assert_eq!(data(dir.path()), before, "no data file was rewritten");
    let secret = Secret::key_file(vec![42; 64]);
    let repo = Repository::open_keyed(dir.path(), Some(&|| Ok(secret.clone())))?;
    assert_eq!(read_back(&repo, &id)?[0], marker_block());
    Ok(())
}

#[test]
fn gc_rewrites_sealed_packs_and_everything_left_still_restores() -> Result<()> {
    let dir = tempfile::tempdir().expect("temporary directory");
    let repo = Arc::new(encrypted(dir.path(), "pw"));
    let gone = back_up(
        &repo,
        "d",
        2 * BLOCK_SIZE,
        &[(0, data_block(1)), (1, data_block(2))],
    )?;
    let kept = back_up(
        &repo,
        "d",
        2 * BLOCK_SIZE,
        &[(0, data_block(1)), (1, data_block(3))],
    )?;
    let plan = repo.forget_plan(
        &cbtvault_repo::ForgetSelection::Ids(vec![gone.clone()]),
        false,
    )?;
    assert_eq!(repo.forget(&plan)?, 1);
    let report = repo.collect_garbage(
        cbtvault_repo::GcOptions {
            max_unused: 0.0,
            ..Default::default()
        },
        std::time::Duration::ZERO,
    )?;
    assert!(report.packs_written >= 1, "{report:?}");
    let verified = repo.verify(true, 1, &|_| {})?;
    assert!(verified.is_ok(), "{verified:?}");
    let content = read_back(&repo, &kept)?;
    assert_eq!((&content[0], &content[1]), (&data_block(1), &data_block(3)));
    // Without the key gc refuses (it must walk every block map).
    drop(repo);
    assert!(matches!(
        Repository::open(dir.path())?
            .collect_garbage(Default::default(), std::time::Duration::ZERO),
        Err(Error::KeyRequired { .. })
    ));
    Ok(())
}
