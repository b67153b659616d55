//! Helpers shared by the integration tests.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::Path;

use cbtvault_repo::testing::tree::{NodeSink, NodeStore, Tree, TreeBuilder, Visitor, walk};
use cbtvault_repo::{
    BLOCK_SIZE, BackupMode, BackupStats, BlobId, Error, FANOUT, InitOptions, Manifest, PackWriter,
    Repository, Result, SourceInfo,
};
use tempfile::TempDir;

/// Block-map nodes kept in memory. Loads check each node against its id;
/// `inserted` counts nodes that were not stored before.
#[derive(Default)]
pub struct MemStore {
    nodes: RefCell<HashMap<BlobId, Vec<u8>>>,
    inserted: Cell<usize>,
}

impl MemStore {
    /// Nodes stored so far that were new to the store.
    pub fn inserted(&self) -> usize {
        self.inserted.get()
    }

    /// Number of distinct nodes held.
    pub fn len(&self) -> usize {
        self.nodes.borrow().len()
    }
}

impl NodeStore for MemStore {
    fn load_node(&self, id: &BlobId) -> Result<Vec<u8>> {
        let bytes = self
            .nodes
            .borrow()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::CorruptNode {
                id: *id,
                what: "not in the store".into(),
            })?;
        if BlobId::of(&bytes) != *id {
            return Err(Error::CorruptNode {
                id: *id,
                what: "content does not match its id".into(),
            });
        }
        Ok(bytes)
    }
}

/// The store is shared by a base tree's cursor (reading) and a builder
/// (writing), so the sink is a shared reference.
impl NodeSink for &MemStore {
    fn store_node(&mut self, bytes: Vec<u8>) -> Result<BlobId> {
        let id = BlobId::of(&bytes);
        if self.nodes.borrow_mut().insert(id, bytes).is_none() {
            self.inserted.set(self.inserted.get() + 1);
        }
        Ok(id)
    }
}

/// A small deterministic generator (SplitMix64).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// A random non-zero id.
    pub fn id(&mut self) -> BlobId {
        let mut bytes = [0u8; 32];
        for chunk in bytes.chunks_exact_mut(8) {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        bytes[0] |= 1;
        BlobId(bytes)
    }
}

/// Block ids of a sparse disk: whole 128-block stretches are zero with
/// probability `zero_runs`%, other blocks with probability `zeros`%.
pub fn random_ids(blocks: u64, seed: u64, zeros: u64, zero_runs: u64) -> Vec<BlobId> {
    let mut rng = Rng::new(seed);
    let mut ids = Vec::with_capacity(blocks as usize);
    let mut run_is_zero = false;
    for i in 0..blocks {
        if i.is_multiple_of(FANOUT) {
            run_is_zero = rng.chance(zero_runs);
        }
        ids.push(if run_is_zero || rng.chance(zeros) {
            BlobId::ZERO
        } else {
            rng.id()
        });
    }
    ids
}

/// A full 64 KiB block of incompressible content, different for each seed.
pub fn data_block(seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; BLOCK_SIZE as usize];
    let mut hasher = blake3::Hasher::new();
    hasher.update(&seed.to_le_bytes());
    hasher.finalize_xof().fill(&mut out);
    out
}

/// A repository in a fresh temporary directory.
pub fn new_repo(pack_size: u64) -> (TempDir, Repository) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let options = InitOptions {
        pack_size,
        ..InitOptions::default()
    };
    let repo = Repository::init(dir.path(), &options).expect("init");
    (dir, repo)
}

/// A manifest for a disk of `blocks` blocks whose block map has `root`.
pub fn manifest(disk: &str, blocks: u64, root: BlobId, second: i64) -> Manifest {
    Manifest {
        format: 1,
        disk: disk.into(),
        source: SourceInfo {
            provider: "file".into(),
            location: format!("/images/{disk}.img"),
            ..SourceInfo::default()
        },
        time: jiff::Timestamp::from_second(1_800_000_000 + second).expect("valid time"),
        virtual_size: blocks * BLOCK_SIZE,
        block_size: BLOCK_SIZE,
        root,
        fanout: FANOUT,
        parent: None,
        mode: BackupMode::Full { reason: None },
        stats: BackupStats::default(),
    }
}

/// Builds the block map of `ids` (blocks already stored) into `writer`,
/// flushes it and commits a restore point of `disk`.
pub fn commit_disk(
    repo: &Repository,
    writer: &mut PackWriter,
    disk: &str,
    ids: &[BlobId],
    second: i64,
) -> Result<String> {
    let mut builder = TreeBuilder::new(ids.len() as u64, None);
    for (block, id) in ids.iter().enumerate() {
        builder.push(block as u64, *id, writer)?;
    }
    let (tree, _) = builder.finish(writer)?;
    writer.flush()?;
    repo.commit(&manifest(disk, tree.shape.blocks, tree.root, second))
}

/// Every directory and file under `root` (relative path, and content for
/// files), sorted.
pub fn snapshot(root: &Path) -> Vec<(String, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("dir entry").path();
            let rel = path
                .strip_prefix(root)
                .expect("under root")
                .display()
                .to_string();
            if path.is_dir() {
                out.push((rel, None));
                dirs.push(path);
            } else {
                out.push((rel, Some(std::fs::read(&path).expect("read file"))));
            }
        }
    }
    out.sort();
    out
}

/// Pack files on storage.
pub fn pack_files(repo: &Repository) -> Vec<String> {
    repo.backend()
        .list(cbtvault_repo::FileKind::Pack)
        .expect("list packs")
}

/// Every block id of a block map, zero blocks included.
pub fn blocks_of(tree: &Tree, store: &dyn NodeStore) -> Result<Vec<BlobId>> {
    struct Blocks(Vec<BlobId>);
    impl Visitor for Blocks {
        fn leaf(&mut self, first: u64, ids: &[BlobId]) -> Result<()> {
            let first = first as usize;
            self.0[first..first + ids.len()].copy_from_slice(ids);
            Ok(())
        }
    }
    let mut blocks = Blocks(vec![BlobId::ZERO; tree.shape.blocks as usize]);
    walk(tree, store, &mut blocks)?;
    Ok(blocks.0)
}
