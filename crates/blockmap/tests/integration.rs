//! Property tests of the public API of `cbtvault-blockmap`.

use cbtvault_blockmap::{BLOCK_SIZE, BlockMap, Extent, block_count};
use proptest::prelude::*;

/// Bits of a map with a random density, so both sparse maps and long runs show up.
fn bits(max_blocks: usize) -> impl Strategy<Value = Vec<bool>> {
    (0.0..=1.0f64).prop_flat_map(move |density| {
        prop::collection::vec(prop::bool::weighted(density), 0..max_blocks)
    })
}

fn map_of(bits: &[bool]) -> BlockMap {
    let mut map = BlockMap::empty(bits.len() as u64);
    for (block, _) in bits.iter().enumerate().filter(|(_, set)| **set) {
        map.set(block as u64);
    }
    map
}

/// A map and a virtual size whose block count matches it (last block possibly partial).
fn map_and_size() -> impl Strategy<Value = (Vec<bool>, u64)> {
    (bits(5000), 1..=BLOCK_SIZE).prop_map(|(bits, tail)| {
        let size = match bits.len() as u64 {
            0 => 0,
            n => (n - 1) * BLOCK_SIZE + tail,
        };
        (bits, size)
    })
}

/// Reference MSB-first packing, written independently of the crate.
fn pack(bits: &[bool]) -> Vec<u8> {
    let mut bytes = vec![0u8; bits.len().div_ceil(8)];
    for (i, _) in bits.iter().enumerate().filter(|(_, set)| **set) {
        bytes[i / 8] |= 0x80 >> (i % 8);
    }
    bytes
}

proptest! {
    #[test]
    fn xenapi_base64_round_trip((bits, size) in map_and_size()) {
        prop_assert_eq!(block_count(size), bits.len() as u64);
        let map = map_of(&bits);
        prop_assert_eq!(map.as_bytes().to_vec(), pack(&bits));
        let text = map.to_xenapi_base64();
        let parsed = BlockMap::from_xenapi_base64(&text, size).unwrap();
        prop_assert_eq!(&parsed, &map);
        for (block, &set) in bits.iter().enumerate() {
            prop_assert_eq!(parsed.is_set(block as u64), set);
        }
        prop_assert_eq!(parsed.count_set(), bits.iter().filter(|b| **b).count() as u64);
    }

    #[test]
    fn runs_cover_exactly_the_set_bits(bits in bits(5000), max in 0..12u64) {
        let map = map_of(&bits);
        let runs: Vec<_> = map.runs(max).collect();
        let mut covered = vec![false; bits.len()];
        let mut previous: Option<std::ops::Range<u64>> = None;
        for run in &runs {
            prop_assert!(run.start < run.end, "empty run {:?}", run);
            if max > 0 {
                prop_assert!(run.end - run.start <= max, "run {:?} longer than {}", run, max);
            }
            if let Some(prev) = &previous {
                prop_assert!(prev.end <= run.start, "{:?} then {:?}", prev, run);
                // Touching runs are only allowed where the limit forced a split.
                if prev.end == run.start {
                    prop_assert!(max > 0 && prev.end - prev.start == max, "{:?} then {:?}", prev, run);
                }
            }
            for block in run.clone() {
                covered[block as usize] = true;
            }
            previous = Some(run.clone());
        }
        prop_assert_eq!(covered, bits);
    }

    #[test]
    fn set_blocks_lists_the_set_bits(bits in bits(2000)) {
        let map = map_of(&bits);
        let expected: Vec<u64> = (0..bits.len() as u64).filter(|&i| bits[i as usize]).collect();
        prop_assert_eq!(map.set_blocks().collect::<Vec<_>>(), expected);
    }

    #[test]
    fn extents_round_trip((bits, size) in map_and_size()) {
        let map = map_of(&bits);
        let extents: Vec<Extent> = map.extents(size).collect();
        for extent in &extents {
            prop_assert!(extent.length > 0);
            prop_assert!(extent.checked_end().is_some_and(|end| end <= size));
        }
        let rebuilt = BlockMap::from_extents(map.block_count(), extents).unwrap();
        prop_assert_eq!(rebuilt, map);
    }

    #[test]
    fn union_is_commutative_or(a in bits(3000), b in bits(3000)) {
        let (ma, mb) = (map_of(&a), map_of(&b));
        let mut ab = ma.clone();
        ab.union_with(&mb);
        let mut ba = mb.clone();
        ba.union_with(&ma);
        prop_assert_eq!(&ab, &ba);
        let len = a.len().max(b.len());
        prop_assert_eq!(ab.block_count(), len as u64);
        let expected: Vec<bool> = (0..len)
            .map(|i| a.get(i).copied().unwrap_or(false) || b.get(i).copied().unwrap_or(false))
            .collect();
        prop_assert_eq!(&ab, &map_of(&expected));
        // The result must still encode as a valid bitmap of its own length.
        let parsed = BlockMap::from_xenapi_base64(&ab.to_xenapi_base64(), len as u64 * BLOCK_SIZE);
        prop_assert_eq!(parsed.unwrap(), ab);
    }

    #[test]
    fn grown_to_keeps_bits_and_pads_with_zero(bits in bits(2000), extra in 0..100u64) {
        let map = map_of(&bits);
        let grown = map.grown_to(map.block_count() + extra).unwrap();
        prop_assert_eq!(grown.block_count(), map.block_count() + extra);
        prop_assert_eq!(grown.set_blocks().collect::<Vec<_>>(), map.set_blocks().collect::<Vec<_>>());
    }
}
