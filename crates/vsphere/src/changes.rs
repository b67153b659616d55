//! From pages of changed areas to a map of 64 KiB blocks.
//!
//! One query covers `[startOffset, startOffset + length)`; the caller asks
//! again from its end until the disk is covered. Extents are byte ranges
//! at any alignment, in no promised order, and may reach past their page:
//! each is clipped to its page and to the disk, then widened to every
//! block it touches. A false positive costs a block read; a missed change
//! would be silent corruption, so the rounding always goes outwards.

use std::future::Future;

use cbtvault_blockmap::{BLOCK_SIZE, BlockMap, block_count};

use crate::error::{Error, Result};
use crate::types::DiskChangeInfo;

/// What the pages said, widened.
#[derive(Clone, Debug)]
pub struct ChangedAreas {
    pub map: BlockMap,
    /// Bytes the extents covered (after clipping), before widening.
    pub changed_bytes: u64,
    /// Queries made.
    pub pages: u64,
}

/// Marks the blocks `[start, start+length)` touches, clipped to
/// `[lo, hi)`. Negative or empty extents mark nothing.
pub fn mark(map: &mut BlockMap, start: i64, length: i64, lo: u64, hi: u64) -> u64 {
    let (Ok(start), Ok(length)) = (u64::try_from(start), u64::try_from(length)) else {
        return 0;
    };
    let end = start.saturating_add(length).min(hi);
    let start = start.max(lo);
    if start >= end {
        return 0;
    }
    map.set_range(start / BLOCK_SIZE..end.div_ceil(BLOCK_SIZE));
    end - start
}

/// Asks `query(start_offset)` page by page from 0 until `capacity` is
/// covered. A page that does not advance is a protocol error (it would
/// loop for ever).
pub async fn changed_blocks<F, Fut>(capacity: u64, what: &str, mut query: F) -> Result<ChangedAreas>
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Result<DiskChangeInfo>>,
{
    let mut map = BlockMap::empty(block_count(capacity));
    let mut changed_bytes = 0;
    let mut pages = 0;
    let mut offset = 0u64;
    while offset < capacity {
        let page = query(offset).await?;
        pages += 1;
        let (Ok(start), Ok(length)) =
            (u64::try_from(page.start_offset), u64::try_from(page.length))
        else {
            return Err(Error::protocol(what, "a negative startOffset or length"));
        };
        if start > offset || length == 0 || start.saturating_add(length) <= offset {
            return Err(Error::protocol(
                what,
                format!("the page from {start} of {length} bytes does not continue from {offset}"),
            ));
        }
        let end = start.saturating_add(length).min(capacity);
        for e in &page.changed_area {
            changed_bytes += mark(&mut map, e.start, e.length, start, end);
        }
        offset = end;
    }
    Ok(ChangedAreas {
        map,
        changed_bytes,
        pages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::DiskChangeExtent;

    fn page(start: i64, length: i64, areas: &[(i64, i64)]) -> DiskChangeInfo {
        DiskChangeInfo {
            start_offset: start,
            length,
            changed_area: areas
                .iter()
                .map(|&(start, length)| DiskChangeExtent { start, length })
                .collect(),
        }
    }

    #[test]
    fn one_byte_at_an_odd_offset_marks_its_block() {
        let mut map = BlockMap::empty(4);
        mark(&mut map, 3 * 65536 + 12345, 1, 0, 4 * 65536);
        assert_eq!(map.set_blocks().collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn an_extent_across_a_boundary_marks_both_blocks() {
        let mut map = BlockMap::empty(4);
        mark(&mut map, 65535, 2, 0, 4 * 65536);
        assert_eq!(map.set_blocks().collect::<Vec<_>>(), [0, 1]);
    }

    #[tokio::test]
    async fn pages_until_covered_and_clips_to_each_page() {
        let cap = 10 * 65536 + 100; // a partial last block
        let pages = [
            page(0, 3 * 65536, &[(10, 5), (3 * 65536 - 1, 500)]), // the second reaches past its page
            page(3 * 65536, 5 * 65536, &[]),
            page(8 * 65536, 1 << 40, &[(10 * 65536 + 99, 1000)]),
        ];
        let mut calls = Vec::new();
        let r = changed_blocks(cap, "test", |off| {
            calls.push(off);
            let p = pages.iter().find(|p| p.start_offset as u64 == off).cloned();
            async move { p.ok_or_else(|| Error::protocol("test", "no page")) }
        })
        .await
        .unwrap();
        assert_eq!(calls, [0, 3 * 65536, 8 * 65536]);
        assert_eq!(r.pages, 3);
        assert_eq!(r.map.set_blocks().collect::<Vec<_>>(), [0, 2, 10]);
        assert_eq!(r.changed_bytes, 5 + 1 + 1);
    }

    #[tokio::test]
    async fn a_page_that_does_not_advance_is_an_error() {
        let r = changed_blocks(65536, "test", |_| async { Ok(page(0, 0, &[])) }).await;
        assert!(matches!(r, Err(Error::Protocol { .. })));
    }
}
