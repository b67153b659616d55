//! Changed-block maps of a virtual disk divided into 64 KiB blocks.
//!
//! A [`BlockMap`] holds one bit per [`BLOCK_SIZE`] block of a disk; a set bit
//! means the block changed and must be copied by the next incremental backup.
//! The crate is pure: it parses, builds, combines and walks maps, and never
//! does I/O.
//!
//! # The XenAPI format
//!
//! XenServer's `VDI.list_changed_blocks` returns the map as standard base64
//! (RFC 4648 alphabet, `=` padding) of a bitmap that is **MSB-first**: block
//! `i` lives in byte `i / 8` under mask `0x80 >> (i % 8)`. The bitmap is
//! exactly `ceil(ceil(virtual_size / 65536) / 8)` bytes long, the unused
//! trailing bits of the last byte are zero, and there is no other padding.
//! A 20-block disk with blocks {0, 9, 19} changed is bytes `80 40 10`, i.e.
//! `"gEAQ"`. When a disk grows, a bitmap taken before the resize is simply
//! zero-extended ([`BlockMap::grown_to`]).
//!
//! ```
//! use cbtvault_blockmap::{BLOCK_SIZE, BlockMap, Extent};
//!
//! let map = BlockMap::from_xenapi_base64("gEAQ", 20 * BLOCK_SIZE)?;
//! assert_eq!(map.set_blocks().collect::<Vec<_>>(), [0, 9, 19]);
//! assert_eq!(map.runs(0).next(), Some(0..1));
//! assert_eq!(map.extents(20 * BLOCK_SIZE).nth(1), Some(Extent::new(9 * BLOCK_SIZE, BLOCK_SIZE)));
//! assert_eq!(map.to_xenapi_base64(), "gEAQ");
//! # Ok::<(), cbtvault_blockmap::Error>(())
//! ```
//!
//! # Why parsing is strict
//!
//! A bitmap of the wrong length, or one with bits set past the end of the
//! disk, means the map and the disk size we hold do not belong together
//! (a resize we missed, a different VDI, a truncated reply). Guessing there
//! would silently skip changed blocks and produce a corrupt backup, so
//! [`BlockMap::from_xenapi_base64`] rejects such input with an [`Error`] that
//! says what was expected and what was found; the caller can then fall back
//! to a full backup.
//!
//! # Dependencies
//!
//! [`bitvec`] stores the map as `BitVec<u8, Msb0>`, whose memory layout *is*
//! the XenAPI byte layout, so encoding and decoding are a plain copy of the
//! raw bytes, and its `first_one`/`first_zero`/`fill` work a byte at a time,
//! which keeps walking sparse maps of multi-terabyte disks cheap.
//! [`base64`] is the maintained, strict codec (it rejects bad padding and
//! non-canonical trailing bits) rather than a hand-rolled one.

use std::ops::Range;

use bitvec::prelude::{BitVec, Msb0};

mod runs;
mod xenapi;

pub use runs::Runs;

/// Size of one block of a changed-block map, in bytes (64 KiB).
pub const BLOCK_SIZE: u64 = 64 * 1024;

/// Number of blocks covering a disk of `virtual_size` bytes: `ceil(size / BLOCK_SIZE)`.
pub const fn block_count(virtual_size: u64) -> u64 {
    virtual_size.div_ceil(BLOCK_SIZE)
}

/// Length in bytes of the XenAPI bitmap for a map of `block_count` blocks.
pub const fn bitmap_len(block_count: u64) -> u64 {
    block_count.div_ceil(8)
}

/// A byte range of a disk, as reported by VMware's `QueryChangedDiskAreas`
/// or an NBD dirty bitmap.
#[derive(Clone, Copy, PartialEq, Eq, Debug, serde::Serialize, serde::Deserialize)]
pub struct Extent {
    /// First byte of the range.
    pub offset: u64,
    /// Number of bytes in the range.
    pub length: u64,
}

impl Extent {
    /// An extent of `length` bytes starting at `offset`.
    pub const fn new(offset: u64, length: u64) -> Self {
        Self { offset, length }
    }

    /// One past the last byte, or `None` if that does not fit in a `u64`.
    pub const fn checked_end(&self) -> Option<u64> {
        self.offset.checked_add(self.length)
    }
}

/// Everything that can go wrong building a [`BlockMap`] from outside data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The XenAPI bitmap text is not valid standard base64.
    #[error("changed-block bitmap is not valid base64")]
    InvalidBase64(#[source] base64::DecodeError),

    /// The decoded XenAPI bitmap does not have the length the disk size implies.
    #[error(
        "changed-block bitmap is {got} bytes, expected {expected} for a virtual size of \
         {virtual_size} bytes ({block_count} blocks)"
    )]
    WrongLength {
        /// Bytes implied by `virtual_size`.
        expected: u64,
        /// Bytes actually decoded.
        got: u64,
        /// Disk size the caller gave.
        virtual_size: u64,
        /// Blocks implied by `virtual_size`.
        block_count: u64,
    },

    /// The XenAPI bitmap marks a block past the end of the disk.
    #[error(
        "changed-block bitmap sets padding bit {bit}, past the last block {last_block} of a \
         disk of {virtual_size} bytes"
    )]
    PaddingBitSet {
        /// Index of the offending bit, counted like a block index.
        bit: u64,
        /// Index of the disk's last block (`block_count - 1`).
        last_block: u64,
        /// Disk size the caller gave.
        virtual_size: u64,
    },

    /// An extent reaches past the end of the map.
    #[error(
        "extent at offset {} of {} bytes ends past the disk end at byte {disk_end} \
         ({block_count} blocks)",
        extent.offset,
        extent.length
    )]
    ExtentOutOfRange {
        /// The offending extent.
        extent: Extent,
        /// `block_count * BLOCK_SIZE`, saturated at `u64::MAX`.
        disk_end: u64,
        /// Number of blocks of the map.
        block_count: u64,
    },

    /// [`BlockMap::grown_to`] was asked to make a map smaller.
    #[error("cannot shrink a changed-block map from {from} to {to} blocks")]
    Shrink {
        /// Current number of blocks.
        from: u64,
        /// Requested number of blocks.
        to: u64,
    },
}

/// One bit per [`BLOCK_SIZE`] block of a disk; a set bit marks a changed block.
///
/// Bits past the last block in the final byte are always kept zero, so the
/// raw bytes are a valid XenAPI bitmap at all times.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct BlockMap {
    bits: BitVec<u8, Msb0>,
}

/// Converts a block index or count to `usize`.
///
/// # Panics
///
/// If it does not fit, which only happens on targets narrower than 64 bits
/// with absurd disk sizes; such a map could not be allocated anyway.
fn to_usize(n: u64) -> usize {
    usize::try_from(n).expect("block count exceeds the address space")
}

impl BlockMap {
    /// A map of `block_count` blocks with nothing marked.
    ///
    /// # Panics
    ///
    /// If the map cannot be allocated (more blocks than the address space holds).
    pub fn empty(block_count: u64) -> Self {
        Self {
            bits: BitVec::repeat(false, to_usize(block_count)),
        }
    }

    /// A map of `block_count` blocks with every block marked (a full backup).
    ///
    /// # Panics
    ///
    /// As [`BlockMap::empty`].
    pub fn full(block_count: u64) -> Self {
        let mut bits = BitVec::repeat(true, to_usize(block_count));
        // `repeat` fills whole bytes; keep the padding bits zero.
        bits.set_uninitialized(false);
        Self { bits }
    }

    /// Number of blocks the map covers.
    pub fn block_count(&self) -> u64 {
        self.bits.len() as u64
    }

    /// Whether `block` is marked; `false` for blocks past the end.
    pub fn is_set(&self, block: u64) -> bool {
        usize::try_from(block)
            .ok()
            .and_then(|i| self.bits.get(i))
            .is_some_and(|bit| *bit)
    }

    /// Marks `block` as changed.
    ///
    /// # Panics
    ///
    /// If `block >= self.block_count()`: that is a bug in the caller, not bad input.
    pub fn set(&mut self, block: u64) {
        assert!(
            block < self.block_count(),
            "block {block} is past the end of a {}-block map",
            self.block_count()
        );
        self.bits.set(to_usize(block), true);
    }

    /// Marks every block in `blocks` as changed.
    ///
    /// # Panics
    ///
    /// If `blocks.end > self.block_count()` or `blocks.start > blocks.end`.
    pub fn set_range(&mut self, blocks: Range<u64>) {
        assert!(
            blocks.start <= blocks.end && blocks.end <= self.block_count(),
            "blocks {blocks:?} are not within a {}-block map",
            self.block_count()
        );
        self.bits[to_usize(blocks.start)..to_usize(blocks.end)].fill(true);
    }

    /// Number of marked blocks.
    pub fn count_set(&self) -> u64 {
        self.bits.count_ones() as u64
    }

    /// Whether any block is marked.
    pub fn any_set(&self) -> bool {
        self.bits.any()
    }

    /// The map as XenAPI bitmap bytes (MSB-first, zero padding bits).
    pub fn as_bytes(&self) -> &[u8] {
        self.bits.as_raw_slice()
    }

    /// Builds a map of `block_count` blocks marking every block that any of
    /// `extents` touches, even by one byte.
    ///
    /// Zero-length extents are ignored wherever they point. An extent ending
    /// past `block_count * BLOCK_SIZE` yields [`Error::ExtentOutOfRange`].
    ///
    /// # Panics
    ///
    /// As [`BlockMap::empty`].
    pub fn from_extents(
        block_count: u64,
        extents: impl IntoIterator<Item = Extent>,
    ) -> Result<Self, Error> {
        let mut map = Self::empty(block_count);
        let disk_end = block_count.saturating_mul(BLOCK_SIZE);
        for extent in extents {
            if extent.length == 0 {
                continue;
            }
            let end = extent.checked_end().filter(|&end| end <= disk_end).ok_or(
                Error::ExtentOutOfRange {
                    extent,
                    disk_end,
                    block_count,
                },
            )?;
            map.set_range(extent.offset / BLOCK_SIZE..(end - 1) / BLOCK_SIZE + 1);
        }
        Ok(map)
    }

    /// A copy zero-extended to `block_count` blocks, as XenServer does to an
    /// older bitmap after the disk grew. Shrinking is [`Error::Shrink`].
    pub fn grown_to(&self, block_count: u64) -> Result<Self, Error> {
        if block_count < self.block_count() {
            return Err(Error::Shrink {
                from: self.block_count(),
                to: block_count,
            });
        }
        let mut grown = self.clone();
        grown.bits.resize(to_usize(block_count), false);
        Ok(grown)
    }

    /// Marks every block marked in `other` (bitwise OR). The result covers
    /// the longer of the two maps, the shorter one being zero-extended.
    pub fn union_with(&mut self, other: &BlockMap) {
        if other.bits.len() > self.bits.len() {
            self.bits.resize(other.bits.len(), false);
        }
        // Byte-wise OR is exact because both keep their padding bits zero.
        let ours = self.bits.as_raw_mut_slice();
        for (ours, theirs) in ours.iter_mut().zip(other.bits.as_raw_slice()) {
            *ours |= *theirs;
        }
    }

    /// Unmarks every block marked in `other` (`self AND NOT other`); blocks
    /// past the end of `other` stay as they are.
    pub fn difference_with(&mut self, other: &BlockMap) {
        // Byte-wise AND NOT keeps our padding bits zero.
        let ours = self.bits.as_raw_mut_slice();
        for (ours, theirs) in ours.iter_mut().zip(other.bits.as_raw_slice()) {
            *ours &= !*theirs;
        }
    }

    /// Keeps marked only the blocks marked in `other` too (bitwise AND);
    /// blocks past the end of `other` are unmarked.
    pub fn intersection_with(&mut self, other: &BlockMap) {
        let theirs = other.bits.as_raw_slice();
        let ours = self.bits.as_raw_mut_slice();
        for (i, ours) in ours.iter_mut().enumerate() {
            *ours &= theirs.get(i).copied().unwrap_or(0);
        }
    }

    /// Indices of the marked blocks, ascending.
    pub fn set_blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.bits.iter_ones().map(|i| i as u64)
    }

    /// Coalesced runs of marked blocks as block-index ranges, ascending, each
    /// at most `max_run_blocks` long (`0` means unlimited).
    ///
    /// Cost is proportional to the number of bytes scanned plus the number
    /// of runs, so sparse maps are cheap.
    pub fn runs(&self, max_run_blocks: u64) -> Runs<'_> {
        Runs::new(&self.bits, max_run_blocks)
    }

    /// Byte extents of the coalesced runs of marked blocks, ascending.
    ///
    /// The last block of a disk is usually partial, so extents are clipped to
    /// `virtual_size`; runs starting at or past `virtual_size` are dropped.
    pub fn extents(&self, virtual_size: u64) -> impl Iterator<Item = Extent> + '_ {
        self.runs(0).map_while(move |run| {
            let offset = run.start * BLOCK_SIZE;
            let end = run.end.saturating_mul(BLOCK_SIZE).min(virtual_size);
            (offset < end).then(|| Extent::new(offset, end - offset))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_count_rounds_up() {
        assert_eq!(block_count(0), 0);
        assert_eq!(block_count(1), 1);
        assert_eq!(block_count(BLOCK_SIZE), 1);
        assert_eq!(block_count(BLOCK_SIZE + 1), 2);
        assert_eq!(block_count(u64::MAX), 1 << 48);
        assert_eq!(bitmap_len(0), 0);
        assert_eq!(bitmap_len(20), 3);
        assert_eq!(bitmap_len(24), 3);
    }

    #[test]
    fn empty_and_full() {
        let empty = BlockMap::empty(13);
        assert_eq!(empty.block_count(), 13);
        assert_eq!(empty.count_set(), 0);
        assert!(!empty.any_set());
        let full = BlockMap::full(13);
        assert_eq!(full.count_set(), 13);
        assert_eq!(full.as_bytes(), &[0xff, 0xf8]);
        assert!(!full.is_set(13));
        assert!(!full.is_set(u64::MAX));
    }

    #[test]
    fn set_is_msb_first() {
        let mut map = BlockMap::empty(20);
        for block in [0, 9, 19] {
            map.set(block);
        }
        assert_eq!(map.as_bytes(), &[0x80, 0x40, 0x10]);
        assert!(map.is_set(9) && !map.is_set(8));
        assert_eq!(map.set_blocks().collect::<Vec<_>>(), [0, 9, 19]);
    }

    #[test]
    #[should_panic(expected = "past the end")]
    fn set_past_end_panics() {
        BlockMap::empty(4).set(4);
    }

    #[test]
    fn from_extents_marks_touched_blocks() {
        let map = BlockMap::from_extents(
            10,
            [
                // Last byte of block 0 and first byte of block 1.
                Extent::new(BLOCK_SIZE - 1, 2),
                // Exactly block 3.
                Extent::new(3 * BLOCK_SIZE, BLOCK_SIZE),
                // Ignored even though it points past the end.
                Extent::new(100 * BLOCK_SIZE, 0),
                // Up to the very last byte.
                Extent::new(9 * BLOCK_SIZE + 5, BLOCK_SIZE - 5),
            ],
        )
        .unwrap();
        assert_eq!(map.set_blocks().collect::<Vec<_>>(), [0, 1, 3, 9]);
    }

    #[test]
    fn from_extents_rejects_out_of_range() {
        let err = BlockMap::from_extents(2, [Extent::new(BLOCK_SIZE, BLOCK_SIZE + 1)]).unwrap_err();
        assert!(matches!(
            err,
            Error::ExtentOutOfRange { extent, disk_end, block_count: 2 }
                if extent == Extent::new(BLOCK_SIZE, BLOCK_SIZE + 1) && disk_end == 2 * BLOCK_SIZE
        ));
        assert_eq!(
            err.to_string(),
            "extent at offset 65536 of 65537 bytes ends past the disk end at byte 131072 (2 blocks)"
        );
        let overflow = BlockMap::from_extents(2, [Extent::new(u64::MAX, 2)]);
        assert!(matches!(overflow, Err(Error::ExtentOutOfRange { .. })));
    }

    #[test]
    fn grown_to_zero_extends_and_refuses_to_shrink() {
        let mut map = BlockMap::empty(3);
        map.set(2);
        let grown = map.grown_to(20).unwrap();
        assert_eq!(grown.block_count(), 20);
        assert_eq!(grown.set_blocks().collect::<Vec<_>>(), [2]);
        assert_eq!(grown.as_bytes(), &[0x20, 0, 0]);
        assert_eq!(map.grown_to(3).unwrap(), map);
        let err = grown.grown_to(19).unwrap_err();
        assert!(matches!(err, Error::Shrink { from: 20, to: 19 }));
        assert_eq!(
            err.to_string(),
            "cannot shrink a changed-block map from 20 to 19 blocks"
        );
        // Padding bits of a full map must not leak into the grown part.
        let full = BlockMap::full(3).grown_to(9).unwrap();
        assert_eq!(full.as_bytes(), &[0xe0, 0]);
    }

    #[test]
    fn union_of_different_lengths() {
        let mut short = BlockMap::full(3);
        let mut long = BlockMap::empty(12);
        long.set(1);
        long.set(11);
        let mut a = short.clone();
        a.union_with(&long);
        long.union_with(&short);
        assert_eq!(a, long);
        assert_eq!(a.block_count(), 12);
        assert_eq!(a.set_blocks().collect::<Vec<_>>(), [0, 1, 2, 11]);
        short.union_with(&BlockMap::empty(0));
        assert_eq!(short, BlockMap::full(3));
    }

    #[test]
    fn difference_and_intersection() {
        let mut a = BlockMap::full(11);
        let mut b = BlockMap::empty(9);
        b.set_range(2..5);
        b.set(8);
        let mut diff = a.clone();
        diff.difference_with(&b);
        assert_eq!(
            diff.set_blocks().collect::<Vec<_>>(),
            [0, 1, 5, 6, 7, 9, 10]
        );
        a.intersection_with(&b);
        assert_eq!(a.set_blocks().collect::<Vec<_>>(), [2, 3, 4, 8]);
        assert_eq!(a.block_count(), 11);
        // Padding bits stay zero, so the bytes are still a XenAPI bitmap.
        let mut full = BlockMap::full(3);
        full.difference_with(&BlockMap::empty(3));
        assert_eq!(full.as_bytes(), &[0xe0]);
    }

    #[test]
    fn extents_clip_to_virtual_size() {
        let size = 4 * BLOCK_SIZE + 100;
        let mut map = BlockMap::empty(block_count(size));
        map.set_range(0..2);
        map.set(4);
        let extents: Vec<_> = map.extents(size).collect();
        assert_eq!(
            extents,
            [
                Extent::new(0, 2 * BLOCK_SIZE),
                Extent::new(4 * BLOCK_SIZE, 100)
            ]
        );
        assert_eq!(
            BlockMap::from_extents(map.block_count(), extents).unwrap(),
            map
        );
        // A smaller size drops runs that start past it.
        assert_eq!(map.extents(BLOCK_SIZE).count(), 1);
    }

    #[test]
    fn extent_serde_shape() {
        let json = serde_json::to_string(&Extent::new(1, 2)).unwrap();
        assert_eq!(json, r#"{"offset":1,"length":2}"#);
    }
}
