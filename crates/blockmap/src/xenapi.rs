//! XenAPI `VDI.list_changed_blocks` encoding: standard base64 of an
//! MSB-first bitmap (see the crate documentation).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bitvec::prelude::BitVec;

use crate::{BlockMap, Error, bitmap_len, block_count, to_usize};

impl BlockMap {
    /// Parses the base64 bitmap returned by XenAPI `VDI.list_changed_blocks`
    /// for a disk of `virtual_size` bytes.
    ///
    /// ASCII whitespace around the text is ignored. Anything else that is
    /// not exactly the expected bitmap is an error: invalid base64
    /// ([`Error::InvalidBase64`]), a length other than
    /// `ceil(ceil(virtual_size / 65536) / 8)` bytes ([`Error::WrongLength`]),
    /// or a set bit past the last block ([`Error::PaddingBitSet`]).
    pub fn from_xenapi_base64(text: &str, virtual_size: u64) -> Result<Self, Error> {
        let blocks = block_count(virtual_size);
        let expected = bitmap_len(blocks);
        let bytes = STANDARD
            .decode(text.trim_ascii())
            .map_err(Error::InvalidBase64)?;
        if bytes.len() as u64 != expected {
            return Err(Error::WrongLength {
                expected,
                got: bytes.len() as u64,
                virtual_size,
                block_count: blocks,
            });
        }
        let mut bits = BitVec::from_vec(bytes);
        // The length matched, so the padding is fewer than 8 bits of the last byte.
        if let Some(offset) = bits[to_usize(blocks)..].first_one() {
            return Err(Error::PaddingBitSet {
                bit: blocks + offset as u64,
                last_block: blocks.saturating_sub(1),
                virtual_size,
            });
        }
        bits.truncate(to_usize(blocks));
        Ok(Self { bits })
    }

    /// Encodes the map the way XenAPI `VDI.list_changed_blocks` does
    /// (standard base64 with padding; `""` for a zero-block map).
    pub fn to_xenapi_base64(&self) -> String {
        STANDARD.encode(self.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use crate::{BLOCK_SIZE, BlockMap, Error};

    const SIZE_20: u64 = 20 * BLOCK_SIZE;

    #[test]
    fn xenserver_example() {
        let map = BlockMap::from_xenapi_base64("gEAQ", SIZE_20).unwrap();
        assert_eq!(map.block_count(), 20);
        assert_eq!(map.set_blocks().collect::<Vec<_>>(), [0, 9, 19]);
        assert_eq!(map.to_xenapi_base64(), "gEAQ");

        let mut built = BlockMap::empty(20);
        for block in [0, 9, 19] {
            built.set(block);
        }
        assert_eq!(built, map);
    }

    #[test]
    fn whitespace_around_is_tolerated() {
        let map = BlockMap::from_xenapi_base64(" \t\r\ngEAQ\n", SIZE_20).unwrap();
        assert_eq!(map.to_xenapi_base64(), "gEAQ");
    }

    #[test]
    fn whitespace_inside_is_rejected() {
        let err = BlockMap::from_xenapi_base64("gE\nAQ", SIZE_20).unwrap_err();
        assert!(matches!(err, Error::InvalidBase64(_)));
    }

    #[test]
    fn too_short_is_rejected() {
        // "gEA=" is two bytes; 20 blocks need three.
        let err = BlockMap::from_xenapi_base64("gEA=", SIZE_20).unwrap_err();
        assert!(matches!(
            err,
            Error::WrongLength {
                expected: 3,
                got: 2,
                virtual_size: SIZE_20,
                block_count: 20
            }
        ));
        assert_eq!(
            err.to_string(),
            "changed-block bitmap is 2 bytes, expected 3 for a virtual size of 1310720 bytes \
             (20 blocks)"
        );
    }

    #[test]
    fn too_long_is_rejected() {
        // Four bytes: a bitmap for a 25..=32-block disk.
        let err = BlockMap::from_xenapi_base64("gEAQAA==", SIZE_20).unwrap_err();
        assert!(matches!(
            err,
            Error::WrongLength {
                expected: 3,
                got: 4,
                ..
            }
        ));
    }

    #[test]
    fn non_zero_padding_bit_is_rejected() {
        // 80 40 18: bit 20 is the first padding bit.
        let err = BlockMap::from_xenapi_base64("gEAY", SIZE_20).unwrap_err();
        assert!(matches!(
            err,
            Error::PaddingBitSet {
                bit: 20,
                last_block: 19,
                virtual_size: SIZE_20
            }
        ));
        assert_eq!(
            err.to_string(),
            "changed-block bitmap sets padding bit 20, past the last block 19 of a disk of \
             1310720 bytes"
        );
        // 80 40 11: the very last bit of the byte.
        let err = BlockMap::from_xenapi_base64("gEAR", SIZE_20).unwrap_err();
        assert!(matches!(err, Error::PaddingBitSet { bit: 23, .. }));
    }

    #[test]
    fn invalid_base64_is_rejected() {
        for text in ["gE@Q", "gEA", "gEAQ=", "gEB=", "-_-_"] {
            let err = BlockMap::from_xenapi_base64(text, SIZE_20).unwrap_err();
            assert!(matches!(err, Error::InvalidBase64(_)), "{text}: {err:?}");
            assert_eq!(err.to_string(), "changed-block bitmap is not valid base64");
            assert!(std::error::Error::source(&err).is_some());
        }
    }

    #[test]
    fn empty_disk() {
        let map = BlockMap::from_xenapi_base64("", 0).unwrap();
        assert_eq!(map.block_count(), 0);
        assert_eq!(map.to_xenapi_base64(), "");
        assert_eq!(BlockMap::empty(0).to_xenapi_base64(), "");
        assert_eq!(BlockMap::full(0).to_xenapi_base64(), "");
        let err = BlockMap::from_xenapi_base64("AA==", 0).unwrap_err();
        assert!(matches!(
            err,
            Error::WrongLength {
                expected: 0,
                got: 1,
                ..
            }
        ));
    }

    #[test]
    fn size_not_a_multiple_of_block_size() {
        // 9 blocks and one byte: 10 blocks, two bitmap bytes.
        let size = 9 * BLOCK_SIZE + 1;
        let map = BlockMap::from_xenapi_base64("AEA=", size).unwrap();
        assert_eq!(map.block_count(), 10);
        assert_eq!(map.set_blocks().collect::<Vec<_>>(), [9]);
        assert_eq!(map.to_xenapi_base64(), "AEA=");
        let err = BlockMap::from_xenapi_base64("ACA=", size).unwrap_err();
        assert!(matches!(err, Error::PaddingBitSet { bit: 10, .. }));
        // One block of one byte.
        let map = BlockMap::from_xenapi_base64("gA==", 1).unwrap();
        assert_eq!(map, BlockMap::full(1));
    }

    #[test]
    fn full_map_encodes_with_zero_padding() {
        assert_eq!(BlockMap::full(20).to_xenapi_base64(), "///w");
        assert_eq!(
            BlockMap::from_xenapi_base64("///w", SIZE_20).unwrap(),
            BlockMap::full(20)
        );
    }

    #[test]
    fn grown_disk_accepts_zero_extended_bitmap() {
        let old = BlockMap::from_xenapi_base64("gEAQ", SIZE_20).unwrap();
        let new = BlockMap::from_xenapi_base64("gEAQAA==", 32 * BLOCK_SIZE).unwrap();
        assert_eq!(old.grown_to(32).unwrap(), new);
    }
}
