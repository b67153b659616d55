//! Encryption at rest: the one type every encode and decode path goes
//! through ([`Crypto`]), so that an unencrypted repository is simply the
//! identity case.
//!
//! An encrypted repository has a master key of two random 32-byte halves
//! ([`MasterKey`]): one seals objects with XChaCha20-Poly1305, the other
//! keys BLAKE3 for ids (`blake3::keyed_hash`), so that ids say nothing
//! about content while equal content still gets one id (deduplication
//! within the repository). A sealed object is laid out as
//! `ciphertext ‖ nonce (24) ‖ tag (16)`: the nonce is random per object
//! (192 bits, so random nonces never collide in practice), and trailing
//! it lets a buffer be sealed in place and only grow at its end. The
//! associated data binds the object to what it is and where it belongs
//! (`"cbtvault\0" ‖ kind ‖ id or name`), so a blob moved under another id,
//! or a manifest copied over another, fails to open.

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use rand::RngCore;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::BlobId;
use crate::error::{Error, Result};

/// Bytes a sealed object has beyond its plaintext (nonce and tag).
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;

/// The repository's master key: the encryption key and the id key.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterKey {
    pub(crate) encrypt: [u8; 32],
    pub(crate) id: [u8; 32],
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// A new random key, from the operating system's generator.
    pub(crate) fn random() -> MasterKey {
        let mut key = MasterKey {
            encrypt: [0; 32],
            id: [0; 32],
        };
        rand::rngs::OsRng.fill_bytes(&mut key.encrypt);
        rand::rngs::OsRng.fill_bytes(&mut key.id);
        key
    }

    /// The 64 bytes a key slot wraps.
    pub(crate) fn to_bytes(&self) -> zeroize::Zeroizing<Vec<u8>> {
        let mut out = zeroize::Zeroizing::new(Vec::with_capacity(64));
        out.extend_from_slice(&self.encrypt);
        out.extend_from_slice(&self.id);
        out
    }

    /// The inverse of [`MasterKey::to_bytes`].
    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<MasterKey> {
        let (encrypt, id) = bytes.split_at_checked(32)?;
        Some(MasterKey {
            encrypt: encrypt.try_into().ok()?,
            id: id.try_into().ok()?,
        })
    }
}

/// What a sealed object is, bound into its associated data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sealed {
    /// A blob of a pack (a block or a block-map node; the pack's
    /// [`crate::pack::BlobKind`] byte goes with it).
    Blob(u8),
    Manifest,
    VmMetadata,
    Journal,
}

impl Sealed {
    fn tag(self) -> [u8; 2] {
        match self {
            Sealed::Blob(kind) => [b'b', kind],
            Sealed::Manifest => [b'm', 0],
            Sealed::VmMetadata => [b'v', 0],
            Sealed::Journal => [b'j', 0],
        }
    }
}

/// How a repository's objects are encoded: as they are (an unencrypted
/// repository), sealed with its key, or — an encrypted repository opened
/// without its key — not at all: ids cannot be computed and nothing can
/// be opened, yet the structure (pack framing, indices, files) can be
/// checked.
pub enum Crypto {
    Plain,
    Keyed(Box<Keys>),
    Locked,
}

/// The cipher and id key of an unlocked repository.
pub struct Keys {
    master: MasterKey,
    cipher: XChaCha20Poly1305,
    /// Tells two keys apart without revealing either (see
    /// [`Crypto::fingerprint`]).
    fingerprint: [u8; 32],
}

impl Keys {
    /// The master key, to wrap in a new key slot.
    pub(crate) fn master(&self) -> &MasterKey {
        &self.master
    }
}

impl std::fmt::Debug for Crypto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Crypto::Plain => "Crypto::Plain",
            Crypto::Keyed(_) => "Crypto::Keyed(..)",
            Crypto::Locked => "Crypto::Locked",
        })
    }
}

impl Crypto {
    /// Seals and ids with `key`.
    pub(crate) fn keyed(key: &MasterKey) -> Crypto {
        let cipher = XChaCha20Poly1305::new((&key.encrypt).into());
        let fingerprint = *blake3::keyed_hash(&key.id, b"cbtvault key fingerprint").as_bytes();
        // The cipher zeroes its copy of the key on drop, the master key too.
        Crypto::Keyed(Box::new(Keys {
            master: key.clone(),
            cipher,
            fingerprint,
        }))
    }

    /// True unless the repository is unencrypted.
    pub fn is_encrypted(&self) -> bool {
        !matches!(self, Crypto::Plain)
    }

    /// True for an encrypted repository opened without its key.
    pub fn is_locked(&self) -> bool {
        matches!(self, Crypto::Locked)
    }

    /// Something equal for two repositories exactly when their objects
    /// are interchangeable (both unencrypted, or the same master key);
    /// a keyed hash, so it reveals nothing of the key.
    pub(crate) fn fingerprint(&self) -> Result<Option<[u8; 32]>> {
        match self {
            Crypto::Plain => Ok(None),
            Crypto::Keyed(keys) => Ok(Some(keys.fingerprint)),
            Crypto::Locked => Err(Error::KeyRequired {
                what: "comparing repository keys".into(),
            }),
        }
    }

    fn keys(&self, what: &str) -> Result<Option<&Keys>> {
        match self {
            Crypto::Plain => Ok(None),
            Crypto::Keyed(keys) => Ok(Some(keys)),
            Crypto::Locked => Err(Error::KeyRequired { what: what.into() }),
        }
    }

    /// The 32-byte hash that names `data`: BLAKE3, keyed in an encrypted
    /// repository.
    pub(crate) fn hash(&self, data: &[u8]) -> Result<[u8; 32]> {
        Ok(match self.keys("computing an id")? {
            None => *blake3::hash(data).as_bytes(),
            Some(keys) => *blake3::keyed_hash(&keys.master.id, data).as_bytes(),
        })
    }

    /// The id of a blob's content.
    pub fn blob_id(&self, content: &[u8]) -> Result<BlobId> {
        self.hash(content).map(BlobId)
    }

    /// The id of a manifest or VM metadata file: the hex of [`Crypto::hash`].
    pub(crate) fn hex_id(&self, bytes: &[u8]) -> Result<String> {
        self.hash(bytes).map(hex::encode)
    }

    /// Seals `buf` in place (it grows by [`SEAL_OVERHEAD`]); a no-op for an
    /// unencrypted repository.
    pub(crate) fn seal(&self, what: Sealed, name: &[u8], buf: &mut Vec<u8>) -> Result<()> {
        let Some(keys) = self.keys("writing")? else {
            return Ok(());
        };
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let nonce = XNonce::from(nonce);
        let tag = keys
            .cipher
            .encrypt_in_place_detached(&nonce, &associated(what, name), buf)
            // Only a buffer past the cipher's 256 GiB limit fails.
            .map_err(|_| Error::InvalidArgument("an object too large to seal".into()))?;
        buf.reserve(SEAL_OVERHEAD);
        buf.extend_from_slice(&nonce);
        buf.extend_from_slice(&tag);
        Ok(())
    }

    /// Opens a sealed object into `out` (which is cleared first); with an
    /// unencrypted repository, copies it. The error says why in words
    /// (the caller names the object).
    pub(crate) fn open_into(
        &self,
        what: Sealed,
        name: &[u8],
        sealed: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), OpenError> {
        out.clear();
        let keys = match self.keys("reading") {
            Ok(None) => {
                out.extend_from_slice(sealed);
                return Ok(());
            }
            Ok(Some(keys)) => keys,
            Err(e) => return Err(OpenError::Key(e)),
        };
        let body_len = sealed.len().checked_sub(SEAL_OVERHEAD).ok_or_else(|| {
            OpenError::Damaged(format!("{} bytes, too short to be sealed", sealed.len()))
        })?;
        let (body, trailer) = sealed.split_at(body_len);
        let (nonce, tag) = trailer.split_at(NONCE_LEN);
        out.extend_from_slice(body);
        keys.cipher
            .decrypt_in_place_detached(
                XNonce::from_slice(nonce),
                &associated(what, name),
                out,
                Tag::from_slice(tag),
            )
            .map_err(|_| {
                out.clear();
                OpenError::Damaged(
                    "authentication failed: it was changed, or moved from another name".into(),
                )
            })
    }

    /// [`Crypto::open_into`] into a new buffer.
    pub(crate) fn open(
        &self,
        what: Sealed,
        name: &[u8],
        sealed: &[u8],
    ) -> Result<Vec<u8>, OpenError> {
        let mut out = Vec::with_capacity(sealed.len());
        self.open_into(what, name, sealed, &mut out)?;
        Ok(out)
    }
}

/// Why a sealed object did not open.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// The repository was opened without its key.
    Key(Error),
    /// The object is damaged, swapped or not this repository's.
    Damaged(String),
}

impl OpenError {
    /// As a repository error: a missing key as such, damage through
    /// `damaged` (which names the object).
    pub(crate) fn or_damaged(self, damaged: impl FnOnce(String) -> Error) -> Error {
        match self {
            OpenError::Key(e) => e,
            OpenError::Damaged(what) => damaged(what),
        }
    }
}

fn associated(what: Sealed, name: &[u8]) -> Vec<u8> {
    let mut ad = Vec::with_capacity(12 + name.len());
    ad.extend_from_slice(b"cbtvault\0");
    ad.extend_from_slice(&what.tag());
    ad.extend_from_slice(name);
    ad
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_binding() {
        let crypto = Crypto::keyed(&MasterKey::random());
        let mut buf = b"guest data".to_vec();
        crypto.seal(Sealed::Manifest, b"a", &mut buf).unwrap();
        assert_eq!(buf.len(), 10 + SEAL_OVERHEAD);
        assert!(!buf.windows(5).any(|w| w == b"guest"));
        assert_eq!(
            crypto.open(Sealed::Manifest, b"a", &buf).unwrap(),
            b"guest data"
        );
        // Another name, another kind or another key: refused.
        assert!(crypto.open(Sealed::Manifest, b"b", &buf).is_err());
        assert!(crypto.open(Sealed::Journal, b"a", &buf).is_err());
        let other = Crypto::keyed(&MasterKey::random());
        assert!(other.open(Sealed::Manifest, b"a", &buf).is_err());
        assert!(crypto.open(Sealed::Manifest, b"a", &buf[..10]).is_err());
    }

    #[test]
    fn ids_are_keyed() {
        let (a, b) = (
            Crypto::keyed(&MasterKey::random()),
            Crypto::keyed(&MasterKey::random()),
        );
        let data = b"same content";
        assert_eq!(a.blob_id(data).unwrap(), a.blob_id(data).unwrap());
        assert_ne!(a.blob_id(data).unwrap(), b.blob_id(data).unwrap());
        assert_ne!(a.blob_id(data).unwrap(), BlobId::of(data));
        assert_eq!(Crypto::Plain.blob_id(data).unwrap(), BlobId::of(data));
        assert!(matches!(
            Crypto::Locked.blob_id(data),
            Err(Error::KeyRequired { .. })
        ));
    }
}
