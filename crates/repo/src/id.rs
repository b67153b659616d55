//! Content identifiers.

use std::fmt;
use std::str::FromStr;

/// The BLAKE3-256 hash of a blob's uncompressed content: a disk block or a
/// block-map node. [`BlobId::ZERO`] stands for "all zeros" and is never stored.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId(pub [u8; 32]);

impl BlobId {
    /// The id of an all-zero block, or of a subtree whose blocks are all zero.
    /// BLAKE3 of real content is never all zero bits in practice, so the
    /// value is free to act as a sentinel and keeps sparse disks cheap.
    pub const ZERO: BlobId = BlobId([0; 32]);

    /// Hashes `data`.
    pub fn of(data: &[u8]) -> BlobId {
        BlobId(*blake3::hash(data).as_bytes())
    }

    /// True for [`BlobId::ZERO`].
    pub fn is_zero(&self) -> bool {
        *self == BlobId::ZERO
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 12 hex characters, for messages.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobId({})", self.short())
    }
}

impl FromStr for BlobId {
    type Err = hex::FromHexError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out)?;
        Ok(BlobId(out))
    }
}

impl TryFrom<&[u8]> for BlobId {
    type Error = std::array::TryFromSliceError;
    fn try_from(value: &[u8]) -> Result<Self, Self::Error> {
        Ok(BlobId(<[u8; 32]>::try_from(value)?))
    }
}

/// Returns true when every byte of `data` is zero (vectorised by the compiler).
pub fn is_all_zero(data: &[u8]) -> bool {
    let (chunks, rest) = data.as_chunks::<16>();
    chunks.iter().all(|c| u128::from_ne_bytes(*c) == 0) && rest.iter().all(|&b| b == 0)
}

impl serde::Serialize for BlobId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for BlobId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut block = vec![0u8; 65536];
        assert!(is_all_zero(&block));
        block[65535] = 1;
        assert!(!is_all_zero(&block));
        assert!(is_all_zero(&[]));
        assert!(!is_all_zero(&[0, 0, 3]));
    }

    #[test]
    fn hex_round_trip() {
        let id = BlobId::of(b"hello");
        assert_eq!(id.to_hex().parse::<BlobId>().unwrap(), id);
        assert!("xyz".parse::<BlobId>().is_err());
        assert_ne!(BlobId::of(&[0u8; 65536]), BlobId::ZERO);
    }
}
