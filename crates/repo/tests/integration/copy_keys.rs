//! Copies across keys (issue 12): unencrypted → encrypted, key A → key
//! B, encrypted → unencrypted. What a user checks: every copied restore
//! point restores byte-exact from the target, `verify --read-data`
//! passes there, the next night's copy sends only what changed, a copy
//! that failed half-way sends only the rest when run again, a map that
//! names blobs the target lost is not trusted, and no guest data is
//! readable in an encrypted target.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use cbtvault_repo::{
    BLOCK_SIZE, Backend, BackupMode, BackupSpec, COPIED_FROM, CopyReport, Error, FileKind,
    InitOptions, KdfParams, LocalBackend, Repository, RestorePointRow, Result, Secret, SourceInfo,
    VmInfo, VmMetadata,
};

use super::common::{blocks_of, data_block, snapshot};

const MARKER: &[u8] = b"CBTVAULT-COPY-ACROSS-KEYS-GUEST-MARKER";
const VM_UUID: &str = "0b5c1c1e-9f6a-4c2e-8d5e-3f2a1b0c9d8e";

fn cheap() -> KdfParams {
    KdfParams {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    }
}

fn options(passphrase: Option<&str>) -> InitOptions {
    InitOptions {
        // Small packs: a copy writes several, so one can fail half-way.
        pack_size: 256 << 10,
        encryption: passphrase.map(Secret::passphrase),
        kdf: cheap(),
        ..InitOptions::default()
    }
}

fn init(path: &Path, passphrase: Option<&str>) -> Arc<Repository> {
    Arc::new(Repository::init(path, &options(passphrase)).expect("init"))
}

fn open(path: &Path, passphrase: &str) -> Result<Repository> {
    let secret = Secret::passphrase(passphrase);
    Repository::open_keyed(path, Some(&|| Ok(secret.clone())))
}

/// A block holding the marker, different for each seed (incompressible
/// around it).
fn marker_block(seed: u64) -> Vec<u8> {
    let mut block = data_block(seed);
    block[100..100 + MARKER.len()].copy_from_slice(MARKER);
    block
}

/// A disk: `blocks` blocks, every fourth zero, the others marked.
fn disk(blocks: u64, seed: u64) -> Vec<Vec<u8>> {
    (0..blocks)
        .map(|b| {
            if b % 4 == 3 {
                vec![0; BLOCK_SIZE as usize]
            } else {
                marker_block(seed * 1000 + b)
            }
        })
        .collect()
}

/// Backs up every block of `content` (a full) or only `changed` ones on
/// top of `parent`, naming VM metadata saved by the same run.
fn back_up(
    repo: &Arc<Repository>,
    content: &[Vec<u8>],
    parent: Option<&RestorePointRow>,
    changed: &[u64],
    second: i64,
) -> Result<RestorePointRow> {
    let metadata = repo.save_vm_metadata(&VmMetadata {
        vm_uuid: VM_UUID.into(),
        time: jiff::Timestamp::from_second(1_800_000_000 + second).expect("time"),
        json: serde_json::json!({ "name_label": "guest", "night": second }),
    })?;
    let mut writer = repo.begin_backup(BackupSpec {
        disk: "d",
        size: content.len() as u64 * BLOCK_SIZE,
        parent,
        source: SourceInfo {
            provider: "file".into(),
            location: "/images/d.img".into(),
            vm: Some(VmInfo {
                uuid: VM_UUID.into(),
                name: "guest".into(),
                metadata: Some(metadata),
                ..VmInfo::default()
            }),
            ..SourceInfo::default()
        },
        time: jiff::Timestamp::from_second(1_800_000_000 + second).expect("time"),
        mode: match parent {
            None => BackupMode::Full { reason: None },
            Some(_) => BackupMode::Incremental {
                changes: "test".into(),
                changed_blocks: changed.len() as u64,
            },
        },
        compression_level: None,
        resume: None,
    })?;
    let mut encoder = repo.block_encoder(None)?;
    for (index, block) in content.iter().enumerate() {
        if parent.is_none() || changed.contains(&(index as u64)) {
            writer.push(index as u64, encoder.encode(block)?)?;
        }
    }
    let (id, _) = writer.finish(Default::default())?;
    repo.resolve(&id)
}

/// The content of every block of restore point `id`.
fn read_back(repo: &Repository, id: &str) -> Result<Vec<Vec<u8>>> {
    let point = repo.resolve(id)?;
    let reader = repo.reader()?;
    blocks_of(&point.manifest.tree(), &reader)?
        .iter()
        .map(|id| {
            if id.is_zero() {
                Ok(vec![0; BLOCK_SIZE as usize])
            } else {
                reader.read(id)
            }
        })
        .collect()
}

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

fn all(repo: &Repository) -> Result<Vec<RestorePointRow>> {
    repo.catalogue().restore_points(None)
}

/// The target id of `source` in `report`.
fn target_id(report: &CopyReport, source: &str) -> String {
    report
        .target_ids
        .get(source)
        .unwrap_or_else(|| panic!("no target id for {source}: {report:?}"))
        .clone()
}

fn verified(repo: &Repository) {
    let report = repo.verify(true, 1, &|_| {}).expect("verify");
    assert!(report.is_ok(), "{report:?}");
}

#[test]
fn an_unencrypted_repository_copies_into_an_encrypted_one_night_after_night() -> Result<()> {
    let (one, two) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let plain = init(one.path(), None);
    let mut content = disk(16, 1);
    let first = back_up(&plain, &content, None, &[], 0)?;
    let sealed = init(two.path(), Some("target"));

    let report = sealed.copy_from(&plain, &all(&plain)?, &|_| {})?;
    assert_eq!(report.copied, vec![first.id.clone()]);
    // 12 data blocks (4 are zero) and the one block-map node.
    assert_eq!(
        (report.blobs_read, report.blobs_sent),
        (12, 13),
        "{report:?}"
    );
    let t1 = target_id(&report, &first.id);
    assert_ne!(t1, first.id, "an id under another key");
    drop(sealed);

    let sealed = open(two.path(), "target")?;
    assert_eq!(read_back(&sealed, &t1)?, content);
    verified(&sealed);
    let copy = sealed.resolve(&t1)?;
    assert_eq!(
        copy.manifest.source.details.get(COPIED_FROM),
        Some(&format!("{}:{}", plain.config().id, first.id))
    );
    assert_eq!(copy.manifest.time, first.manifest.time);
    // The VM metadata came along, under the target's id for it.
    let vm = copy.manifest.source.vm.as_ref().expect("vm");
    let metadata = sealed.vm_metadata(vm.metadata.as_deref().expect("metadata"))?;
    assert_eq!(metadata.json["night"], 0);
    assert_eq!(files_containing(two.path(), MARKER), Vec::<String>::new());
    // Nor the VM's name, outside the catalogue (a local index).
    let named: Vec<_> = files_containing(two.path(), b"guest")
        .into_iter()
        .filter(|f| !f.starts_with("catalogue"))
        .collect();
    assert_eq!(named, Vec::<String>::new());
    // A rebuilt catalogue keeps what the copy learnt.
    drop(sealed);
    let secret = Secret::passphrase("target");
    cbtvault_repo::repair_keyed(
        two.path(),
        std::time::Duration::ZERO,
        Some(&|| Ok(secret.clone())),
    )?;
    let sealed = Arc::new(open(two.path(), "target")?);

    // The next night: two blocks changed, one zero block filled. Only
    // those travel, with the node above them; nothing else is read.
    for b in [0, 5, 7] {
        content[b] = marker_block(9000 + b as u64);
    }
    let second = back_up(&plain, &content, Some(&first), &[0, 5, 7], 1)?;
    let report = sealed.copy_from(&plain, &all(&plain)?, &|_| {})?;
    assert_eq!(report.present, vec![first.id.clone()]);
    assert_eq!(report.copied, vec![second.id.clone()]);
    assert_eq!((report.blobs_read, report.blobs_sent), (3, 4), "{report:?}");
    let t2 = target_id(&report, &second.id);
    assert_eq!(sealed.resolve(&t2)?.manifest.parent, Some(t1.clone()));
    assert_eq!(read_back(&sealed, &t2)?, content);
    assert_eq!(read_back(&sealed, &t1)?, disk(16, 1));

    // Nothing new: nothing read, nothing sent.
    let report = sealed.copy_from(&plain, &all(&plain)?, &|_| {})?;
    assert!(report.copied.is_empty(), "{report:?}");
    assert_eq!((report.blobs_read, report.blobs_sent), (0, 0));
    assert_eq!(report.present.len(), 2);
    verified(&sealed);
    assert_eq!(files_containing(two.path(), MARKER), Vec::<String>::new());
    Ok(())
}

#[test]
fn key_a_copies_to_key_b_and_on_to_an_unencrypted_repository() -> Result<()> {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
    let a = init(dirs[0].path(), Some("key a"));
    let content = disk(9, 2);
    let point = back_up(&a, &content, None, &[], 0)?;
    let b = init(dirs[1].path(), Some("key b"));
    let report = b.copy_from(&a, &all(&a)?, &|_| {})?;
    let in_b = target_id(&report, &point.id);
    assert_eq!(read_back(&b, &in_b)?, content);
    verified(&b);
    assert_eq!(
        files_containing(dirs[1].path(), MARKER),
        Vec::<String>::new()
    );

    let c = init(dirs[2].path(), None);
    let report = c.copy_from(&b, &all(&b)?, &|_| {})?;
    let in_c = target_id(&report, &in_b);
    assert_eq!(read_back(&c, &in_c)?, content);
    verified(&c);
    // Unencrypted again: the blocks are plain BLAKE3 ids, as a backup
    // would have stored them.
    let blocks = blocks_of(&c.resolve(&in_c)?.manifest.tree(), &c.reader()?)?;
    assert_eq!(blocks[0], cbtvault_repo::BlobId::of(&content[0]));

    // Back from B into A: A has the original, so nothing is copied.
    let report = a.copy_from(&b, &all(&b)?, &|_| {})?;
    assert!(report.copied.is_empty(), "{report:?}");
    assert_eq!(report.target_ids.get(&in_b), Some(&point.id));
    Ok(())
}

#[test]
fn a_locked_side_is_named() -> Result<()> {
    let (one, two) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let plain = init(one.path(), None);
    back_up(&plain, &disk(4, 3), None, &[], 0)?;
    drop(init(two.path(), Some("right")));
    assert!(matches!(
        open(two.path(), "wrong"),
        Err(Error::WrongKey { .. })
    ));
    let locked = Repository::open(two.path())?;
    match locked.copy_from(&plain, &all(&plain)?, &|_| {}) {
        Err(e @ Error::KeyRequired { .. }) => assert!(e.to_string().contains("the target"), "{e}"),
        other => panic!("{other:?}"),
    }
    Ok(())
}

/// A local backend whose pack writes fail once `budget` packs are written.
#[derive(Debug)]
struct FailingPacks {
    inner: LocalBackend,
    budget: AtomicUsize,
}

impl Backend for FailingPacks {
    fn write(&self, kind: FileKind, name: &str, data: &[u8]) -> Result<()> {
        if kind == FileKind::Pack
            && self
                .budget
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_err()
        {
            return Err(Error::Io {
                path: name.into(),
                source: std::io::Error::other("injected: the link went down"),
            });
        }
        self.inner.write(kind, name, data)
    }
    fn read(&self, kind: FileKind, name: &str) -> Result<Vec<u8>> {
        self.inner.read(kind, name)
    }
    fn read_at(&self, kind: FileKind, name: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.inner.read_at(kind, name, offset, len)
    }
    fn size(&self, kind: FileKind, name: &str) -> Result<u64> {
        self.inner.size(kind, name)
    }
    fn list(&self, kind: FileKind) -> Result<Vec<String>> {
        self.inner.list(kind)
    }
    fn remove(&self, kind: FileKind, name: &str) -> Result<()> {
        self.inner.remove(kind, name)
    }
    fn create(&self, kind: FileKind, name: &str, data: &[u8]) -> Result<bool> {
        self.inner.create(kind, name, data)
    }
    fn replace(&self, kind: FileKind, name: &str, data: &[u8]) -> Result<()> {
        self.inner.replace(kind, name, data)
    }
    fn list_dated(&self, kind: FileKind) -> Result<Vec<(String, Option<jiff::Timestamp>)>> {
        self.inner.list_dated(kind)
    }
    fn list_partial(&self) -> Result<Vec<String>> {
        self.inner.list_partial()
    }
    fn remove_partial(&self) -> Result<usize> {
        self.inner.remove_partial()
    }
    fn locate(&self, kind: FileKind, name: &str) -> String {
        self.inner.locate(kind, name)
    }
    fn set_aside(&self, kind: FileKind, name: &str) -> Result<String> {
        self.inner.set_aside(kind, name)
    }
}

/// Blobs the target's packs hold.
fn stored_blobs(repo: &Repository) -> Result<usize> {
    let cat = repo.catalogue();
    let mut n = 0;
    for (pack, _) in cat.packs()? {
        n += cat.blobs_in_pack(&pack)?.len();
    }
    Ok(n)
}

#[test]
fn a_copy_that_failed_half_way_sends_only_the_rest_when_run_again() -> Result<()> {
    let (one, two) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let plain = init(one.path(), None);
    // 48 blocks, 36 of them data: about 9 packs of 256 KiB.
    let content = disk(48, 4);
    let point = back_up(&plain, &content, None, &[], 0)?;
    let inner = LocalBackend::new(two.path());
    inner.create_layout()?;
    let failing = Arc::new(FailingPacks {
        inner,
        budget: AtomicUsize::new(3),
    });
    let target = Repository::init_with(two.path(), failing, &options(Some("pw")))?;
    let err = target
        .copy_from(&plain, &all(&plain)?, &|_| {})
        .expect_err("the fourth pack fails");
    let cause = std::error::Error::source(&err).map(|c| c.to_string());
    assert!(
        matches!(&err, Error::Io { .. })
            && cause.as_deref() == Some("injected: the link went down"),
        "{err:?}"
    );
    assert!(all(&target)?.is_empty(), "nothing committed");
    let kept = stored_blobs(&target)?;
    assert!(kept > 0 && kept < 36, "{kept} blobs durable");
    drop(target);

    let target = open(two.path(), "pw")?;
    let report = target.copy_from(&plain, &all(&plain)?, &|_| {})?;
    // The rest of the 36 blocks, and the node: nothing durable is sent or
    // read again.
    assert_eq!(report.blobs_sent as usize, 36 - kept + 1, "{report:?}");
    assert_eq!(report.blobs_read as usize, 36 - kept, "{report:?}");
    assert_eq!(read_back(&target, &target_id(&report, &point.id))?, content);
    verified(&target);
    Ok(())
}

#[test]
fn a_mapping_whose_blob_the_target_lost_is_not_trusted() -> Result<()> {
    let (one, two) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let plain = init(one.path(), None);
    let content = disk(8, 5);
    let point = back_up(&plain, &content, None, &[], 0)?;
    let target = init(two.path(), Some("pw"));
    let report = target.copy_from(&plain, &all(&plain)?, &|_| {})?;
    let copied = target_id(&report, &point.id);
    // The copy is forgotten and its blobs collected: the map still names
    // them.
    let plan = target.forget_plan(
        &cbtvault_repo::ForgetSelection::Ids(vec![copied.clone()]),
        true,
    )?;
    assert_eq!(target.forget(&plan)?, 1);
    target.collect_garbage(
        cbtvault_repo::GcOptions {
            max_unused: 0.0,
            ..Default::default()
        },
        std::time::Duration::ZERO,
    )?;

    let report = target.copy_from(&plain, &all(&plain)?, &|_| {})?;
    assert_eq!((report.blobs_read, report.blobs_sent), (6, 7), "{report:?}");
    assert_eq!(read_back(&target, &target_id(&report, &point.id))?, content);
    verified(&target);
    Ok(())
}
