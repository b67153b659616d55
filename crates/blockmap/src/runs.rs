//! Coalescing marked blocks into runs, so a backup can read and write a few
//! large ranges instead of one 64 KiB block at a time.

use std::iter::FusedIterator;
use std::ops::Range;

use bitvec::prelude::{BitSlice, Msb0};

/// Iterator over coalesced runs of marked blocks, from [`BlockMap::runs`](crate::BlockMap::runs).
///
/// Yields block-index ranges in ascending order; runs longer than the limit
/// are split into consecutive pieces of at most that many blocks.
#[derive(Clone, Debug)]
pub struct Runs<'a> {
    bits: &'a BitSlice<u8, Msb0>,
    /// Next block not yet looked at.
    pos: usize,
    /// Longest run to yield; `usize::MAX` when unlimited.
    max: usize,
}

impl<'a> Runs<'a> {
    pub(crate) fn new(bits: &'a BitSlice<u8, Msb0>, max_run_blocks: u64) -> Self {
        let max = match max_run_blocks {
            0 => usize::MAX,
            // A limit larger than the address space is no limit.
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        Self { bits, pos: 0, max }
    }
}

impl Iterator for Runs<'_> {
    type Item = Range<u64>;

    fn next(&mut self) -> Option<Range<u64>> {
        // `first_one` skips whole zero bytes, which keeps sparse maps cheap.
        let start = self.pos + self.bits[self.pos..].first_one()?;
        // Search for the end only within the limit, so splitting a long run
        // costs no more than walking it once.
        let limit = self.bits.len().min(start.saturating_add(self.max));
        let end = self.bits[start..limit]
            .first_zero()
            .map_or(limit, |len| start + len);
        self.pos = end;
        Some(start as u64..end as u64)
    }
}

impl FusedIterator for Runs<'_> {}

#[cfg(test)]
mod tests {
    use crate::BlockMap;

    fn map(blocks: u64, set: &[u64]) -> BlockMap {
        let mut map = BlockMap::empty(blocks);
        for &block in set {
            map.set(block);
        }
        map
    }

    #[test]
    fn coalesces_adjacent_blocks() {
        let m = map(30, &[0, 1, 2, 5, 7, 8, 15, 16, 29]);
        let runs: Vec<_> = m.runs(0).collect();
        assert_eq!(runs, [0..3, 5..6, 7..9, 15..17, 29..30]);
        assert_eq!(m.runs(u64::MAX).collect::<Vec<_>>(), runs);
    }

    #[test]
    fn splits_at_max() {
        let mut m = BlockMap::empty(40);
        m.set_range(3..13);
        m.set_range(20..22);
        m.set(39);
        let runs: Vec<_> = m.runs(4).collect();
        assert_eq!(runs, [3..7, 7..11, 11..13, 20..22, 39..40]);
        let runs: Vec<_> = m.runs(1).collect();
        assert_eq!(runs.len() as u64, m.count_set());
        assert!(runs.iter().all(|r| r.end - r.start == 1));
        assert_eq!(m.runs(2).filter(|r| r.start >= 20).count(), 2);
    }

    #[test]
    fn full_and_empty() {
        let full = BlockMap::full(17);
        let mut runs = full.runs(0);
        assert_eq!((runs.next(), runs.next()), (Some(0..17), None));
        assert_eq!(
            BlockMap::full(17).runs(8).collect::<Vec<_>>(),
            [0..8, 8..16, 16..17]
        );
        assert_eq!(BlockMap::empty(17).runs(0).next(), None);
        assert_eq!(BlockMap::empty(0).runs(0).next(), None);
    }

    #[test]
    fn sparse_large_map() {
        // 8 TiB disk: a naive per-bit walk would be slow in debug builds.
        let blocks = 1 << 27;
        let mut m = BlockMap::empty(blocks);
        m.set(12_345);
        m.set_range(blocks - 3..blocks);
        let runs: Vec<_> = m.runs(2).collect();
        assert_eq!(
            runs,
            [12_345..12_346, blocks - 3..blocks - 1, blocks - 1..blocks]
        );
    }
}
