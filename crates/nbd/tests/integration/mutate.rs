//! What a hostile peer sends: a valid byte script with its length fields
//! marked, and mutations of it (bit flips, truncation, insertion,
//! deletion, and length fields set to huge or off-by-a-little values).

use proptest::prelude::*;
use proptest::sample::Index;

/// Bytes one peer sends, with the place and width of every length field.
#[derive(Clone, Debug, Default)]
pub struct Script {
    pub bytes: Vec<u8>,
    /// (offset, width in bytes) of each length field.
    pub lengths: Vec<(usize, usize)>,
    /// Where the peer pauses for the other side (a reply waits for its
    /// request).
    pub marks: Vec<usize>,
}

impl Script {
    /// Marks a pause here.
    pub fn mark(&mut self) -> &mut Self {
        self.marks.push(self.bytes.len());
        self
    }

    /// The bytes cut at the marks, the marks kept at their original
    /// offsets (clamped) whatever the mutations did to the length.
    pub fn segments(&self, bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut start = 0;
        for &m in &self.marks {
            let end = m.clamp(start, bytes.len());
            out.push(bytes[start..end].to_vec());
            start = end;
        }
        out.push(bytes[start..].to_vec());
        out
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(b);
        self
    }

    /// A length field of 2, 4 or 8 bytes.
    pub fn len(&mut self, width: usize, v: u64) -> &mut Self {
        self.lengths.push((self.bytes.len(), width));
        match width {
            2 => self.u16(v as u16),
            4 => self.u32(v as u32),
            _ => self.u64(v),
        }
    }

    /// A u32 length, then the bytes.
    pub fn string(&mut self, s: &[u8]) -> &mut Self {
        self.len(4, s.len() as u64).raw(s)
    }

    /// Appends another script, keeping its length fields marked.
    pub fn append(&mut self, other: &Script) -> &mut Self {
        let base = self.bytes.len();
        self.lengths
            .extend(other.lengths.iter().map(|&(at, w)| (base + at, w)));
        self.marks.extend(other.marks.iter().map(|&at| base + at));
        self.bytes.extend_from_slice(&other.bytes);
        self
    }

    /// `width`-byte length of `body`, then `body`.
    pub fn sized(&mut self, width: usize, body: &Script) -> &mut Self {
        self.len(width, body.bytes.len() as u64).append(body)
    }
}

/// One change to a script.
#[derive(Clone, Debug)]
pub enum Mutation {
    Flip(Index, u8),
    Truncate(Index),
    Insert(Index, Vec<u8>),
    Delete(Index, usize),
    /// Overwrites bytes anywhere with a big-endian value.
    Overwrite(Index, u64, usize),
    /// Sets one marked length field.
    Length(Index, LengthValue),
}

/// What a length field becomes.
#[derive(Clone, Debug)]
pub enum LengthValue {
    /// The largest value of the field's width.
    Max,
    /// 2^(8·width − 1).
    HighBit,
    /// A fixed huge value, cut to the field's width.
    Huge(u64),
    /// The original plus a small delta.
    Nudge(i8),
    Zero,
}

const HUGE: &[u64] = &[
    1 << 32,
    (1 << 32) - 1,
    1 << 40,
    (1 << 31) - 1,
    32 << 20,
    (32 << 20) + 1,
    (16 << 20) + 9,
    (1 << 20) + 1,
    4097,
    u64::MAX - 7,
];

fn length_value() -> impl Strategy<Value = LengthValue> {
    prop_oneof![
        Just(LengthValue::Max),
        Just(LengthValue::HighBit),
        Just(LengthValue::Zero),
        prop::sample::select(HUGE).prop_map(LengthValue::Huge),
        (-9i8..=9).prop_map(LengthValue::Nudge),
    ]
}

pub fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => (any::<Index>(), 1usize..16).prop_map(|(i, n)| Mutation::Delete(i, n)),
        1 => (any::<Index>(), prop::sample::select(HUGE), prop::sample::select(&[2usize, 4, 8][..]))
            .prop_map(|(i, v, w)| Mutation::Overwrite(i, v, w)),
        4 => (any::<Index>(), length_value()).prop_map(|(i, v)| Mutation::Length(i, v)),
    ]
}

/// One to four mutations.
pub fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(mutation(), 1..=4)
}

fn put(bytes: &mut [u8], at: usize, width: usize, v: u64) {
    let be = v.to_be_bytes();
    for (i, b) in be[8 - width..].iter().enumerate() {
        if let Some(slot) = bytes.get_mut(at + i) {
            *slot = *b;
        }
    }
}

fn get(bytes: &[u8], at: usize, width: usize) -> u64 {
    (0..width).fold(0, |v, i| {
        (v << 8) | u64::from(bytes.get(at + i).copied().unwrap_or(0))
    })
}

/// Applies `mutations` in order. Length fields are found by their
/// original offsets, so apply `Length` before edits that shift bytes.
pub fn apply(script: &Script, mutations: &[Mutation]) -> Vec<u8> {
    let mut out = script.bytes.clone();
    for m in mutations {
        let len = out.len();
        match m {
            Mutation::Flip(i, bit) if len > 0 => out[i.index(len)] ^= 1 << bit,
            Mutation::Truncate(i) if len > 0 => out.truncate(i.index(len)),
            Mutation::Insert(i, b) => {
                let at = i.index(len + 1);
                out.splice(at..at, b.iter().copied());
            }
            Mutation::Delete(i, n) if len > 0 => {
                let at = i.index(len);
                out.drain(at..(at + n).min(len));
            }
            Mutation::Overwrite(i, v, w) if len > 0 => put(&mut out, i.index(len), *w, *v),
            Mutation::Length(i, value) if !script.lengths.is_empty() => {
                let (at, width) = script.lengths[i.index(script.lengths.len())];
                let bits = 8 * width as u32;
                let max = if width == 8 {
                    u64::MAX
                } else {
                    (1 << bits) - 1
                };
                let v = match value {
                    LengthValue::Max => max,
                    LengthValue::HighBit => 1 << (bits - 1),
                    LengthValue::Huge(h) => h & max,
                    LengthValue::Nudge(d) => {
                        get(&out, at, width).wrapping_add(*d as i64 as u64) & max
                    }
                    LengthValue::Zero => 0,
                };
                put(&mut out, at, width, v);
            }
            _ => {}
        }
    }
    out
}
