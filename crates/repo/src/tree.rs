//! Block maps as Merkle trees.
//!
//! A restore point's block map lists the id of every block of the disk. It
//! is stored as a tree of fixed fan-out [`FANOUT`]: level 0 are block ids,
//! a node at level `L` holds the ids of up to `FANOUT` subtrees of level
//! `L-1`, and the tree is exactly as deep as the disk needs. The subtree at
//! `(level, index)` always covers blocks `[index·F^level, (index+1)·F^level)`
//! clipped to the disk, whatever the disk's size, so two restore points of a
//! disk share every subtree whose blocks did not change.
//!
//! A subtree whose blocks are all zero has the id [`BlobId::ZERO`] and is
//! not stored. Nodes are content addressed like blocks: an incremental writes
//! only the nodes on the paths to changed blocks, and its metadata grows
//! with the change, not with the disk. Every restore point still has a
//! complete tree of its own, so restores never replay a chain.

use crate::BlobId;
use crate::error::{Error, Result};

/// Children per node. 128 ids make a 4 KiB node: small enough that a
/// scattered change rewrites little, large enough to keep trees shallow
/// (four levels cover 16 TiB of 64 KiB blocks).
pub const FANOUT: u64 = 128;
/// Node header magic.
pub const NODE_MAGIC: [u8; 4] = *b"CBTN";
/// Size of a node's header: magic, level, reserved byte, child count (u16 LE).
pub const NODE_HEADER_LEN: usize = 8;

/// The shape of a tree, fixed by the number of blocks of the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TreeShape {
    /// Blocks of the disk.
    pub blocks: u64,
}

impl TreeShape {
    /// Number of node levels above the blocks (at least 1).
    pub fn depth(&self) -> u32 {
        let mut depth = 1;
        let mut span = FANOUT;
        while span < self.blocks {
            depth += 1;
            span = span.saturating_mul(FANOUT);
        }
        depth
    }

    /// Blocks covered by one subtree of `level`.
    pub fn span(level: u32) -> u64 {
        FANOUT.saturating_pow(level)
    }

    /// Number of subtrees at `level` (blocks at level 0).
    pub fn count_at(&self, level: u32) -> u64 {
        self.blocks.div_ceil(Self::span(level))
    }

    /// Children of the node `(level, index)`, level >= 1.
    pub fn children_of(&self, level: u32, index: u64) -> u64 {
        self.count_at(level - 1)
            .saturating_sub(index * FANOUT)
            .min(FANOUT)
    }

    /// End (exclusive, in blocks) of the subtree `(level, index)`.
    fn end_of(&self, level: u32, index: u64) -> u64 {
        ((index + 1).saturating_mul(Self::span(level))).min(self.blocks)
    }
}

/// A stored tree: its root and shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tree {
    pub root: BlobId,
    pub shape: TreeShape,
}

/// Reads verified node content by id.
pub trait NodeStore {
    /// The node's bytes; the implementation checks them against `id`.
    fn load_node(&self, id: &BlobId) -> Result<Vec<u8>>;
}

/// Stores nodes; storing a node that exists already is a no-op.
pub trait NodeSink {
    /// Stores `bytes` and returns their id, which the sink computes: the
    /// repository's (keyed in an encrypted one).
    fn store_node(&mut self, bytes: Vec<u8>) -> Result<BlobId>;
}

/// Serialises a node.
pub fn encode_node(level: u32, children: &[BlobId]) -> Vec<u8> {
    let mut out = Vec::with_capacity(NODE_HEADER_LEN + 32 * children.len());
    out.extend_from_slice(&NODE_MAGIC);
    out.push(level as u8);
    out.push(0);
    out.extend_from_slice(&(children.len() as u16).to_le_bytes());
    for c in children {
        out.extend_from_slice(&c.0);
    }
    out
}

/// Parses a node and checks it has the level and child count its place in
/// the tree demands.
pub fn decode_node(id: &BlobId, bytes: &[u8], level: u32, children: u64) -> Result<Vec<BlobId>> {
    let corrupt = |what: String| Error::CorruptNode { id: *id, what };
    if bytes.len() < NODE_HEADER_LEN || bytes[..4] != NODE_MAGIC {
        return Err(corrupt("not a block-map node".into()));
    }
    let found_level = u32::from(bytes[4]);
    let count = u64::from(u16::from_le_bytes([bytes[6], bytes[7]]));
    if found_level != level || count != children {
        return Err(corrupt(format!(
            "level {found_level} with {count} children where level {level} with {children} was expected"
        )));
    }
    let body = &bytes[NODE_HEADER_LEN..];
    if body.len() as u64 != 32 * count {
        return Err(corrupt(format!(
            "{} bytes of ids for {count} children",
            body.len()
        )));
    }
    Ok(body
        .chunks_exact(32)
        .map(|c| BlobId(c.try_into().unwrap_or([0; 32])))
        .collect())
}

/// Random access to a tree's subtrees, cheap when visited in ascending order
/// (it caches the last node read at each level).
///
/// It reads nodes through a borrowed store; the repository's backup writer
/// gives it one it owns (`H`), so that the writer can move between threads.
pub struct Cursor<'s, H = &'s dyn NodeStore> {
    tree: Tree,
    store: H,
    cache: Vec<Option<(u64, Vec<BlobId>)>>,
    _store: std::marker::PhantomData<&'s ()>,
}

impl<'s> Cursor<'s> {
    /// A cursor over `tree`, reading nodes from `store`.
    pub fn new(tree: Tree, store: &'s dyn NodeStore) -> Self {
        Cursor::with_store(tree, store)
    }
}

impl<H: std::ops::Deref<Target: NodeStore>> Cursor<'_, H> {
    /// A cursor over `tree` reading nodes through `store`, a handle it owns.
    pub(crate) fn with_store(tree: Tree, store: H) -> Self {
        let depth = tree.shape.depth() as usize;
        Cursor {
            tree,
            store,
            cache: vec![None; depth + 1],
            _store: std::marker::PhantomData,
        }
    }

    /// The tree this cursor reads.
    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    /// The id of subtree `(level, index)`; [`BlobId::ZERO`] past the end.
    pub fn subtree(&mut self, level: u32, index: u64) -> Result<BlobId> {
        let depth = self.tree.shape.depth();
        if index >= self.tree.shape.count_at(level) || level > depth {
            return Ok(BlobId::ZERO);
        }
        if level == depth {
            return Ok(self.tree.root);
        }
        let parent = index / FANOUT;
        let slot = (index % FANOUT) as usize;
        let children = self.node(level + 1, parent)?;
        Ok(children.get(slot).copied().unwrap_or(BlobId::ZERO))
    }

    /// The children of node `(level, index)`.
    pub fn node(&mut self, level: u32, index: u64) -> Result<&[BlobId]> {
        let cached = matches!(&self.cache[level as usize], Some((i, _)) if *i == index);
        if !cached {
            let id = self.subtree(level, index)?;
            let count = self.tree.shape.children_of(level, index);
            let children = if id.is_zero() {
                vec![BlobId::ZERO; count as usize]
            } else {
                let bytes = self.store.load_node(&id)?;
                decode_node(&id, &bytes, level, count)?
            };
            self.cache[level as usize] = Some((index, children));
        }
        Ok(self.cache[level as usize]
            .as_ref()
            .map(|(_, c)| c.as_slice())
            .unwrap_or(&[]))
    }
}

/// Counts of what a [`TreeBuilder`] produced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BuildStats {
    /// Nodes handed to the sink (it may already hold some of them).
    pub nodes: u64,
    /// Their total size.
    pub node_bytes: u64,
}

/// Builds a tree from block ids given in ascending block order.
///
/// Blocks that are not pushed are taken from the `base` tree (the parent
/// restore point of an incremental), whole subtrees at a time where the base
/// has them, or are zero when there is no base (blocks a full backup skipped
/// as holes) or the disk grew past the base.
pub struct TreeBuilder<'s, H = &'s dyn NodeStore> {
    shape: TreeShape,
    depth: u32,
    base: Option<Cursor<'s, H>>,
    /// Byte lengths of the new disk's and the base's last blocks, when
    /// known: a base block whose length differs from the new disk's at the
    /// same place (the old or new tail after a resize) is never taken.
    tails: Option<Tails>,
    pending: Vec<Vec<BlobId>>,
    next: u64,
    root: Option<BlobId>,
    stats: BuildStats,
}

/// Where the last blocks of the new disk and of the base end.
#[derive(Clone, Copy, Debug)]
struct Tails {
    size: u64,
    base_size: u64,
}

impl Tails {
    /// Length of block `b` in a disk of `size` bytes.
    fn len(size: u64, b: u64) -> u64 {
        size.saturating_sub(b.saturating_mul(BLOCK)).min(BLOCK)
    }

    /// True when some block of `[start, end)` has a different length in
    /// the base than in the new disk.
    fn differ(&self, start: u64, end: u64) -> bool {
        [self.size, self.base_size]
            .into_iter()
            .filter(|s| !s.is_multiple_of(BLOCK))
            .map(|s| s / BLOCK)
            .any(|b| {
                (start..end).contains(&b) && Self::len(self.size, b) != Self::len(self.base_size, b)
            })
    }
}

const BLOCK: u64 = crate::repository::BLOCK_SIZE;

impl<'s> TreeBuilder<'s> {
    /// A builder for a disk of `blocks` whole blocks.
    pub fn new(blocks: u64, base: Option<Cursor<'s>>) -> Self {
        Self::with_tails(blocks, base, None)
    }

    /// A builder for a disk of `size` bytes whose base disk had
    /// `base_size` bytes. Blocks whose length changed with the size (a
    /// partial last block before or after) must be pushed: the base's copy
    /// would have the wrong length, and [`TreeBuilder::push`]'s gaps and
    /// [`TreeBuilder::finish`] fail rather than take it.
    pub fn for_disk(size: u64, base: Option<(Cursor<'s>, u64)>) -> Self {
        Self::for_disk_with(size, base)
    }
}

impl<'s, H: std::ops::Deref<Target: NodeStore>> TreeBuilder<'s, H> {
    /// [`TreeBuilder::for_disk`] with a base cursor that owns its store.
    pub(crate) fn for_disk_with(size: u64, base: Option<(Cursor<'s, H>, u64)>) -> Self {
        let blocks = size.div_ceil(BLOCK);
        match base {
            Some((cursor, base_size)) => {
                Self::with_tails(blocks, Some(cursor), Some(Tails { size, base_size }))
            }
            None => Self::with_tails(blocks, None, None),
        }
    }

    fn with_tails(blocks: u64, base: Option<Cursor<'s, H>>, tails: Option<Tails>) -> Self {
        let shape = TreeShape { blocks };
        let depth = shape.depth();
        TreeBuilder {
            shape,
            depth,
            base,
            tails,
            pending: vec![Vec::new(); depth as usize + 1],
            next: 0,
            root: None,
            stats: BuildStats::default(),
        }
    }

    /// Next block index the builder expects.
    pub fn position(&self) -> u64 {
        self.next
    }

    /// Sets block `block` to `id` (`BlobId::ZERO` for a zero block). Blocks
    /// between the previous push and this one come from the base.
    pub fn push(&mut self, block: u64, id: BlobId, sink: &mut dyn NodeSink) -> Result<()> {
        if block < self.next || block >= self.shape.blocks {
            return Err(Error::InvalidArgument(format!(
                "block {block} pushed out of order (next is {}, disk has {})",
                self.next, self.shape.blocks
            )));
        }
        self.fill_to(block, sink)?;
        self.append(0, id, sink)
    }

    /// Takes the remaining blocks from the base and returns the root.
    pub fn finish(mut self, sink: &mut dyn NodeSink) -> Result<(Tree, BuildStats)> {
        self.fill_to(self.shape.blocks, sink)?;
        let root = match self.root {
            Some(root) => root,
            // Only an empty disk closes no node.
            None if self.shape.blocks == 0 => BlobId::ZERO,
            // Anything else is a bug that must not pass as an all-zero disk.
            None => {
                return Err(Error::InvalidArgument(format!(
                    "block map of {} blocks did not close its root",
                    self.shape.blocks
                )));
            }
        };
        Ok((
            Tree {
                root,
                shape: self.shape,
            },
            self.stats,
        ))
    }

    fn fill_to(&mut self, target: u64, sink: &mut dyn NodeSink) -> Result<()> {
        while self.next < target {
            let mut chosen = None;
            // Take the largest aligned subtree that fits before `target`.
            for level in (0..self.depth).rev() {
                let span = TreeShape::span(level);
                if !self.next.is_multiple_of(span) {
                    continue;
                }
                let index = self.next / span;
                if self.shape.end_of(level, index) > target {
                    continue;
                }
                if let Some(id) = self.base_subtree(level, index)? {
                    chosen = Some((level, id));
                    break;
                }
            }
            let (level, id) = chosen.ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "cannot take block {} from the base tree (its length changed with the disk size, so it must be read)",
                    self.next
                ))
            })?;
            self.append(level, id, sink)?;
        }
        Ok(())
    }

    /// The base's id for subtree `(level, index)` when it covers exactly
    /// the same blocks in the base as in the new tree.
    fn base_subtree(&mut self, level: u32, index: u64) -> Result<Option<BlobId>> {
        let Some(base) = self.base.as_mut() else {
            return Ok(Some(BlobId::ZERO));
        };
        let base_shape = base.tree().shape;
        let start = index.saturating_mul(TreeShape::span(level));
        if start >= base_shape.blocks {
            // The disk grew: unmarked blocks of the new region are zero.
            return Ok(Some(BlobId::ZERO));
        }
        let end = self.shape.end_of(level, index);
        if level > base_shape.depth()
            || base_shape.end_of(level, index) != end
            || self.tails.is_some_and(|t| t.differ(start, end))
        {
            return Ok(None);
        }
        base.subtree(level, index).map(Some)
    }

    /// Appends subtree `id` of `level` to its parent node, closing nodes
    /// that become complete.
    fn append(&mut self, level: u32, id: BlobId, sink: &mut dyn NodeSink) -> Result<()> {
        let start = self.next;
        self.next = self.shape.end_of(level, start / TreeShape::span(level));
        let mut level = level + 1;
        let mut id = id;
        loop {
            let slot = &mut self.pending[level as usize];
            slot.push(id);
            // The node being filled is the one containing `start`, whether
            // or not its earlier siblings were built here or taken whole.
            let index = start / TreeShape::span(level);
            if (slot.len() as u64) < self.shape.children_of(level, index) {
                return Ok(());
            }
            let children = std::mem::take(slot);
            id = if children.iter().all(BlobId::is_zero) {
                BlobId::ZERO
            } else {
                let bytes = encode_node(level, &children);
                self.stats.nodes += 1;
                self.stats.node_bytes += bytes.len() as u64;
                sink.store_node(bytes)?
            };
            if level == self.depth {
                self.root = Some(id);
                return Ok(());
            }
            level += 1;
        }
    }
}

/// What [`walk`] reports.
pub trait Visitor {
    /// A node about to be read; return false to skip its subtree (its id is
    /// known already). Zero subtrees are never reported.
    fn node(&mut self, _level: u32, _index: u64, _id: &BlobId) -> Result<bool> {
        Ok(true)
    }
    /// The block ids of one level-1 node, starting at block `first`.
    fn leaf(&mut self, first: u64, ids: &[BlobId]) -> Result<()>;
}

/// Visits every non-zero subtree of `tree` in block order.
pub fn walk(tree: &Tree, store: &dyn NodeStore, visitor: &mut dyn Visitor) -> Result<()> {
    visit(tree, store, visitor, tree.shape.depth(), 0, tree.root)
}

fn visit(
    tree: &Tree,
    store: &dyn NodeStore,
    v: &mut dyn Visitor,
    level: u32,
    index: u64,
    id: BlobId,
) -> Result<()> {
    if id.is_zero() || !v.node(level, index, &id)? {
        return Ok(());
    }
    let bytes = store.load_node(&id)?;
    let children = decode_node(&id, &bytes, level, tree.shape.children_of(level, index))?;
    if level == 1 {
        return v.leaf(index * FANOUT, &children);
    }
    for (slot, child) in children.into_iter().enumerate() {
        visit(
            tree,
            store,
            v,
            level - 1,
            index * FANOUT + slot as u64,
            child,
        )?;
    }
    Ok(())
}

/// Calls `differs(first, count)` for each run of blocks whose ids differ
/// between `a` and `b`, skipping shared subtrees. Blocks past the end of the
/// smaller disk count as zero.
pub fn diff(
    a: &Tree,
    b: &Tree,
    store: &dyn NodeStore,
    differs: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let mut ca = Cursor::new(*a, store);
    let mut cb = Cursor::new(*b, store);
    let blocks = a.shape.blocks.max(b.shape.blocks);
    let top = a.shape.depth().max(b.shape.depth());
    diff_at(&mut ca, &mut cb, blocks, top, 0, differs)
}

fn diff_at(
    a: &mut Cursor<'_>,
    b: &mut Cursor<'_>,
    blocks: u64,
    level: u32,
    index: u64,
    differs: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let comparable = |c: &mut Cursor<'_>| -> Result<Option<BlobId>> {
        if level > c.tree().shape.depth() {
            Ok(None)
        } else {
            c.subtree(level, index).map(Some)
        }
    };
    let (ha, hb) = (comparable(a)?, comparable(b)?);
    if ha.is_some() && ha == hb {
        return Ok(());
    }
    if level == 0 {
        differs(index, 1);
        return Ok(());
    }
    let first_child = index * FANOUT;
    let span = TreeShape::span(level - 1);
    for child in first_child..first_child + FANOUT {
        if child * span >= blocks {
            break;
        }
        diff_at(a, b, blocks, level - 1, child, differs)?;
    }
    Ok(())
}
