//! The decoders of outside data (the XenAPI base64 bitmap, the serialized
//! [`Extent`]) fed random and mutated input: a map or a typed error, never
//! a panic, and never an allocation sized by the claimed disk instead of
//! the text received.

use cbtvault_blockmap::{BLOCK_SIZE, BlockMap, Error, Extent, block_count};
use proptest::prelude::*;
use proptest::sample::Index;

/// Disk sizes around the edges: empty, one byte, block and byte
/// boundaries, and sizes no bitmap sent over the wire could describe.
fn size() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..=(64 * BLOCK_SIZE + 1),
        Just(u64::MAX),
        Just(u64::MAX - BLOCK_SIZE),
        Just(1 << 63),
        Just(16 << 40),
        any::<u64>(),
    ]
}

/// Text made mostly of the base64 alphabet, padding and whitespace.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9+/=]{0,64}",
        "[ \t\r\nA-Za-z0-9+/=_-]{0,64}",
        ".{0,32}",
    ]
}

/// What any successful decode promises.
fn check_decoded(text: &str, size: u64) -> Result<(), TestCaseError> {
    match BlockMap::from_xenapi_base64(text, size) {
        Ok(map) => {
            prop_assert_eq!(map.block_count(), block_count(size));
            prop_assert!(map.count_set() <= map.block_count());
            // Strict base64 is canonical: what decodes encodes back the same.
            prop_assert_eq!(map.to_xenapi_base64(), text.trim_ascii());
            for e in map.extents(size) {
                prop_assert!(e.checked_end().is_some_and(|end| end <= size));
            }
        }
        Err(Error::InvalidBase64(_) | Error::WrongLength { .. } | Error::PaddingBitSet { .. }) => {}
        Err(other) => prop_assert!(false, "unexpected error {other:?}"),
    }
    Ok(())
}

#[derive(Clone, Debug)]
enum Edit {
    Replace(Index, char),
    Truncate(Index),
    Insert(Index, char),
    Delete(Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    let c = prop_oneof![
        prop::sample::select(&['=', ' ', '\n', '+', '/', 'A', '/', '_', '-', 'é'][..]),
        any::<char>(),
    ];
    prop_oneof![
        (any::<Index>(), c.clone()).prop_map(|(i, c)| Edit::Replace(i, c)),
        any::<Index>().prop_map(Edit::Truncate),
        (any::<Index>(), c).prop_map(|(i, c)| Edit::Insert(i, c)),
        any::<Index>().prop_map(Edit::Delete),
    ]
}

fn apply(text: &str, edits: &[Edit]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for e in edits {
        let len = chars.len();
        match e {
            Edit::Replace(i, c) if len > 0 => chars[i.index(len)] = *c,
            Edit::Truncate(i) if len > 0 => chars.truncate(i.index(len)),
            Edit::Insert(i, c) => chars.insert(i.index(len + 1), *c),
            Edit::Delete(i) if len > 0 => {
                chars.remove(i.index(len));
            }
            _ => {}
        }
    }
    chars.into_iter().collect()
}

/// A claimed disk of 16 EiB next to a four-character bitmap is refused
/// from the lengths alone; allocating a map for the claimed size would
/// abort the process.
#[test]
fn huge_claimed_size_with_a_short_bitmap() {
    for size in [u64::MAX, 1 << 63, 16 << 40] {
        let err = BlockMap::from_xenapi_base64("gEAQ", size).unwrap_err();
        assert!(
            matches!(err, Error::WrongLength { got: 3, .. }),
            "{size}: {err:?}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn random_text(text in text(), size in size()) {
        check_decoded(&text, size)?;
    }

    /// A valid bitmap of a random map, then edited.
    #[test]
    fn mutated_bitmaps(
        bits in prop::collection::vec(any::<bool>(), 0..200),
        tail in 1..=BLOCK_SIZE,
        edits in prop::collection::vec(edit(), 0..4),
        grow in prop_oneof![Just(0u64), Just(1), Just(BLOCK_SIZE), Just(8 * BLOCK_SIZE)],
    ) {
        let blocks = bits.len() as u64;
        let mut map = BlockMap::empty(blocks);
        for (i, _) in bits.iter().enumerate().filter(|(_, b)| **b) {
            map.set(i as u64);
        }
        let size = match blocks {
            0 => 0,
            n => (n - 1) * BLOCK_SIZE + tail,
        };
        let text = map.to_xenapi_base64();
        prop_assert_eq!(BlockMap::from_xenapi_base64(&text, size).ok(), Some(map));
        let edited = apply(&text, &edits);
        // The same text against the size it was made for, and a larger one.
        check_decoded(&edited, size)?;
        check_decoded(&edited, size.saturating_add(grow))?;
    }

    /// Serialized extents as JSON: any input gives an extent or an error.
    #[test]
    fn extent_json(json in prop_oneof![
        r#"\{"offset": ?-?[0-9]{0,22}, ?"length": ?-?[0-9e.]{0,22}\}"#,
        ".{0,40}",
    ]) {
        if let Ok(e) = serde_json::from_str::<Extent>(&json) {
            let _ = e.checked_end();
        }
    }
}
