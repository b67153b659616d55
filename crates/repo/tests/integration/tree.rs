//! Block maps: building, walking, incremental builds and diffs, checked
//! against plain lists of block ids.

use std::collections::BTreeMap;

use cbtvault_repo::testing::tree::{self, BuildStats, Cursor, Tree, TreeBuilder, Visitor};
use cbtvault_repo::{BlobId, Result, TreeShape};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError};

use super::common::{MemStore, Rng, random_ids};

type Outcome = std::result::Result<(), TestCaseError>;

/// Sizes where the tree changes shape, then anything up to 40 000 blocks.
const EDGES: [u64; 11] = [0, 1, 2, 127, 128, 129, 255, 256, 16383, 16384, 16385];

fn block_count() -> impl Strategy<Value = u64> {
    prop_oneof![
        1 => proptest::sample::select(EDGES.to_vec()),
        3 => 0..=40_000u64,
    ]
}

/// Percent of zero blocks: none, all, or anything between.
fn zero_percent() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0u64), Just(100u64), 0..=100u64]
}

/// Builds a tree pushing every block.
fn build_full(store: &MemStore, ids: &[BlobId]) -> Result<Tree> {
    let mut sink = store;
    let mut builder = TreeBuilder::new(ids.len() as u64, None);
    for (block, id) in ids.iter().enumerate() {
        builder.push(block as u64, *id, &mut sink)?;
    }
    Ok(builder.finish(&mut sink)?.0)
}

/// Builds a tree pushing only the non-zero blocks, as a full backup that
/// skips holes does.
fn build_sparse(store: &MemStore, ids: &[BlobId]) -> Result<Tree> {
    let mut sink = store;
    let mut builder = TreeBuilder::new(ids.len() as u64, None);
    for (block, id) in ids.iter().enumerate().filter(|(_, id)| !id.is_zero()) {
        builder.push(block as u64, *id, &mut sink)?;
    }
    Ok(builder.finish(&mut sink)?.0)
}

/// Builds a tree of `blocks` blocks on top of `base`, pushing only `changes`.
fn build_incremental(
    store: &MemStore,
    base: Tree,
    blocks: u64,
    changes: &BTreeMap<u64, BlobId>,
) -> Result<(Tree, BuildStats)> {
    let mut sink = store;
    let mut builder = TreeBuilder::new(blocks, Some(Cursor::new(base, store)));
    for (block, id) in changes {
        builder.push(*block, *id, &mut sink)?;
    }
    builder.finish(&mut sink)
}

/// The non-zero blocks of a list, as walk should report them.
fn nonzero(ids: &[BlobId]) -> Vec<(u64, BlobId)> {
    ids.iter()
        .enumerate()
        .filter(|(_, id)| !id.is_zero())
        .map(|(block, id)| (block as u64, *id))
        .collect()
}

/// Collects the non-zero blocks a walk reports, checking each leaf's
/// position and length against the tree's shape.
struct Collect {
    shape: TreeShape,
    found: Vec<(u64, BlobId)>,
    bad_leaves: Vec<String>,
}

impl Visitor for Collect {
    fn leaf(&mut self, first: u64, ids: &[BlobId]) -> Result<()> {
        let expected_len = (self.shape.blocks - first.min(self.shape.blocks)).min(tree::FANOUT);
        if !first.is_multiple_of(tree::FANOUT) || ids.len() as u64 != expected_len {
            self.bad_leaves
                .push(format!("leaf at {first} with {} ids", ids.len()));
        }
        self.found.extend(
            ids.iter()
                .enumerate()
                .filter(|(_, id)| !id.is_zero())
                .map(|(i, id)| (first + i as u64, *id)),
        );
        Ok(())
    }
}

fn walk_nonzero(
    tree: &Tree,
    store: &MemStore,
) -> std::result::Result<Vec<(u64, BlobId)>, TestCaseError> {
    let mut collect = Collect {
        shape: tree.shape,
        found: Vec::new(),
        bad_leaves: Vec::new(),
    };
    tree::walk(tree, store, &mut collect)?;
    prop_assert!(
        collect.bad_leaves.is_empty(),
        "misplaced leaves: {:?}",
        collect.bad_leaves
    );
    Ok(collect.found)
}

/// Blocks reported by `tree::diff`, runs expanded, in reporting order.
fn diff_blocks(a: &Tree, b: &Tree, store: &MemStore) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    tree::diff(a, b, store, &mut |first, count| {
        out.extend(first..first + count)
    })?;
    Ok(out)
}

/// Block-by-block comparison; blocks past the end of a list are zero.
fn naive_diff(a: &[BlobId], b: &[BlobId]) -> Vec<u64> {
    let at = |ids: &[BlobId], i: usize| ids.get(i).copied().unwrap_or(BlobId::ZERO);
    (0..a.len().max(b.len()))
        .filter(|&i| at(a, i) != at(b, i))
        .map(|i| i as u64)
        .collect()
}

fn check_walk(blocks: u64, seed: u64, zeros: u64, zero_runs: u64) -> Outcome {
    let ids = random_ids(blocks, seed, zeros, zero_runs);
    let store = MemStore::default();
    let tree = build_full(&store, &ids)?;
    prop_assert_eq!(tree.shape.blocks, blocks);
    let expected = nonzero(&ids);
    prop_assert_eq!(walk_nonzero(&tree, &store)?, expected.clone());
    if expected.is_empty() {
        prop_assert!(
            tree.root.is_zero(),
            "an all-zero disk must have the zero root"
        );
        prop_assert_eq!(store.len(), 0, "all-zero subtrees must not be stored");
    }
    // The same blocks always give the same root, holes pushed or not.
    let again = build_full(&MemStore::default(), &ids)?;
    prop_assert_eq!(again.root, tree.root);
    let sparse_store = MemStore::default();
    let sparse = build_sparse(&sparse_store, &ids)?;
    prop_assert_eq!(sparse, tree, "skipping zero blocks changed the tree");
    prop_assert_eq!(walk_nonzero(&sparse, &sparse_store)?, expected);
    Ok(())
}

/// Changes `changed`% of the blocks of a disk of `base_blocks` blocks that
/// becomes `new_blocks` long; the incremental must equal a full rebuild.
fn check_incremental(
    base_blocks: u64,
    new_blocks: u64,
    seed: u64,
    zeros: u64,
    changed: u64,
) -> Outcome {
    let base_ids = random_ids(base_blocks, seed, zeros, 20);
    let store = MemStore::default();
    let base = build_full(&store, &base_ids)?;

    let mut rng = Rng::new(seed ^ 0x5eed);
    let mut changes = BTreeMap::new();
    let mut expected: Vec<BlobId> = (0..new_blocks as usize)
        .map(|i| base_ids.get(i).copied().unwrap_or(BlobId::ZERO))
        .collect();
    for (block, slot) in expected.iter_mut().enumerate() {
        if rng.below(1000) < changed * 10 {
            let id = if rng.chance(20) {
                BlobId::ZERO
            } else {
                rng.id()
            };
            changes.insert(block as u64, id);
            *slot = id;
        }
    }

    let (incremental, _) = build_incremental(&store, base, new_blocks, &changes)?;
    let rebuilt = build_full(&MemStore::default(), &expected)?;
    prop_assert_eq!(incremental, rebuilt, "incremental and full rebuild differ");
    prop_assert_eq!(walk_nonzero(&incremental, &store)?, nonzero(&expected));
    Ok(())
}

/// k scattered changes on a disk of `blocks` blocks store at most k·depth
/// new nodes (and at least the path to the first change).
fn check_incremental_cost(blocks: u64, seed: u64, k: usize) -> Outcome {
    let ids = random_ids(blocks, seed, 10, 0);
    let store = MemStore::default();
    let base = build_full(&store, &ids)?;
    let mut rng = Rng::new(seed.rotate_left(17));
    let mut changes = BTreeMap::new();
    while changes.len() < k.min(blocks as usize) {
        changes.insert(rng.below(blocks), rng.id());
    }
    let before = store.inserted();
    let (tree, stats) = build_incremental(&store, base, blocks, &changes)?;
    let new_nodes = store.inserted() - before;
    let depth = tree.shape.depth() as usize;
    let bound = changes.len() * depth;
    prop_assert!(
        new_nodes <= bound,
        "{new_nodes} new nodes for {} changes at depth {depth}",
        changes.len()
    );
    prop_assert!(
        stats.nodes as usize <= bound,
        "builder wrote {} nodes",
        stats.nodes
    );
    prop_assert!(
        new_nodes >= depth,
        "only {new_nodes} new nodes: the changed path was not rewritten"
    );
    let mut expected = ids;
    for (block, id) in &changes {
        expected[*block as usize] = *id;
    }
    prop_assert_eq!(walk_nonzero(&tree, &store)?, nonzero(&expected));
    Ok(())
}

/// Two disks of `a_blocks` and `b_blocks` blocks, the second derived from
/// the first with `changed`% of the common blocks changed.
fn check_diff(a_blocks: u64, b_blocks: u64, seed: u64, changed: u64) -> Outcome {
    let a_ids = random_ids(a_blocks, seed, 30, 20);
    let mut rng = Rng::new(!seed);
    let b_ids: Vec<BlobId> = (0..b_blocks as usize)
        .map(|i| match a_ids.get(i) {
            Some(id) if !rng.chance(changed) => *id,
            _ if rng.chance(30) => BlobId::ZERO,
            _ => rng.id(),
        })
        .collect();
    let store = MemStore::default();
    let a = build_full(&store, &a_ids)?;
    let b = build_full(&store, &b_ids)?;
    let expected = naive_diff(&a_ids, &b_ids);
    prop_assert_eq!(diff_blocks(&a, &b, &store)?, expected.clone());
    prop_assert_eq!(diff_blocks(&b, &a, &store)?, expected);
    prop_assert_eq!(diff_blocks(&a, &a, &store)?, Vec::<u64>::new());
    Ok(())
}

#[test]
fn walk_at_shape_edges() -> Outcome {
    for (i, blocks) in EDGES.into_iter().enumerate() {
        for zeros in [0, 50, 100] {
            check_walk(blocks, i as u64, zeros, 10)?;
        }
    }
    Ok(())
}

#[test]
fn incremental_at_shape_edges() -> Outcome {
    for (i, base) in EDGES.into_iter().enumerate() {
        for new in EDGES {
            check_incremental(base, new, i as u64 + new, 30, 2)?;
        }
    }
    Ok(())
}

#[test]
fn diff_at_shape_edges() -> Outcome {
    for (i, a) in EDGES.into_iter().enumerate() {
        for b in EDGES {
            check_diff(a, b, i as u64 * 31 + b, 1)?;
        }
    }
    Ok(())
}

#[test]
fn push_out_of_order_or_past_the_end_is_refused() -> Outcome {
    let store = MemStore::default();
    let mut sink = &store;
    let mut builder = TreeBuilder::new(10, None);
    builder.push(5, BlobId::of(b"five"), &mut sink)?;
    prop_assert!(builder.push(5, BlobId::of(b"again"), &mut sink).is_err());
    prop_assert!(builder.push(3, BlobId::of(b"back"), &mut sink).is_err());
    prop_assert!(builder.push(10, BlobId::of(b"past"), &mut sink).is_err());
    let (tree, _) = builder.finish(&mut sink)?;
    let mut expected = vec![BlobId::ZERO; 10];
    expected[5] = BlobId::of(b"five");
    prop_assert_eq!(walk_nonzero(&tree, &store)?, nonzero(&expected));
    Ok(())
}

proptest! {
    // No regression files: tests write nothing outside temporary directories.
    #![proptest_config(Config { cases: 64, failure_persistence: None, ..Config::default() })]

    #[test]
    fn walk_yields_exactly_the_nonzero_blocks(
        blocks in block_count(),
        seed in any::<u64>(),
        zeros in zero_percent(),
        zero_runs in 0..=100u64,
    ) {
        check_walk(blocks, seed, zeros, zero_runs)?;
    }

    #[test]
    fn incremental_equals_full_rebuild(
        base_blocks in block_count(),
        seed in any::<u64>(),
        zeros in zero_percent(),
        growth in prop_oneof![Just(0i64), 1..=300i64, 0..=20_000i64, -300..=0i64],
        changed in prop_oneof![Just(0u64), 0..=3u64, 0..=100u64],
    ) {
        let new_blocks = base_blocks.saturating_add_signed(growth);
        check_incremental(base_blocks, new_blocks, seed, zeros, changed)?;
    }

    #[test]
    fn scattered_incremental_stores_only_changed_paths(
        blocks in prop_oneof![proptest::sample::select(EDGES[1..].to_vec()), 1..=40_000u64],
        seed in any::<u64>(),
        k in 1..=16usize,
    ) {
        check_incremental_cost(blocks, seed, k)?;
    }

    #[test]
    fn diff_reports_exactly_the_differing_blocks(
        a_blocks in block_count(),
        b_blocks in block_count(),
        seed in any::<u64>(),
        changed in prop_oneof![Just(0u64), 0..=2u64, 0..=100u64],
    ) {
        check_diff(a_blocks, b_blocks, seed, changed)?;
    }
}
