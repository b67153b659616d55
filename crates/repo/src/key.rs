//! Key slots: the master key of an encrypted repository, wrapped once per
//! passphrase or key file, in `keys/ID.json`.
//!
//! A slot holds the Argon2id parameters and salt that turn its secret
//! into a wrapping key, and the master key sealed with that key
//! (XChaCha20-Poly1305, associated data naming the repository and the
//! slot, so a slot copied from another repository or renamed does not
//! open). Adding, removing or changing a passphrase writes or removes one
//! small file and never touches the data: packs and manifests are sealed
//! with the master key, which stays the same.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::backend::{Backend, FileKind};
use crate::crypto::MasterKey;
use crate::error::{Error, Result};

/// The key slot format this build writes and reads.
pub const KEY_SLOT_FORMAT: u32 = 1;

/// A passphrase or the content of a key file. Kept zeroed on drop and
/// never printed.
#[derive(Clone)]
pub struct Secret {
    kind: SecretKind,
    bytes: Zeroizing<Vec<u8>>,
}

/// What a key slot is unlocked with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretKind {
    Passphrase,
    KeyFile,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({:?}, ..)", self.kind)
    }
}

impl Secret {
    /// A passphrase.
    pub fn passphrase(text: impl Into<String>) -> Secret {
        Secret {
            kind: SecretKind::Passphrase,
            bytes: Zeroizing::new(text.into().into_bytes()),
        }
    }

    /// The whole content of a key file.
    pub fn key_file(bytes: Vec<u8>) -> Secret {
        Secret {
            kind: SecretKind::KeyFile,
            bytes: Zeroizing::new(bytes),
        }
    }

    /// Which it is.
    pub fn kind(&self) -> SecretKind {
        self.kind
    }
}

/// Argon2id's cost, stored with each slot (so a slot made with other
/// costs still opens).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes over the memory.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl Default for KdfParams {
    /// 64 MiB, 3 passes, 1 lane: a fraction of a second on a server, and
    /// costly for whoever guesses passphrases on stolen slots.
    fn default() -> Self {
        KdfParams {
            memory_kib: 64 * 1024,
            iterations: 3,
            parallelism: 1,
        }
    }
}

/// The costliest parameters a slot read from storage may ask for (a
/// damaged or hostile slot must not exhaust memory).
const MAX_MEMORY_KIB: u32 = 4 * 1024 * 1024;
const MAX_ITERATIONS: u32 = 64;

/// A key slot as stored.
#[derive(Serialize, Deserialize)]
struct SlotFile {
    format: u32,
    kind: SecretKind,
    created: jiff::Timestamp,
    kdf: KdfFile,
    cipher: String,
    /// Base64 of `sealed master key ‖ nonce ‖ tag`.
    sealed_key: String,
}

#[derive(Serialize, Deserialize)]
struct KdfFile {
    algorithm: String,
    version: u32,
    #[serde(flatten)]
    params: KdfParams,
    /// Base64.
    salt: String,
}

/// One key slot as `key list` shows it (no secret in it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeySlot {
    pub id: String,
    pub kind: SecretKind,
    pub created: jiff::Timestamp,
    pub kdf: KdfParams,
}

fn wrapping_key(secret: &Secret, params: KdfParams, salt: &[u8]) -> Result<Zeroizing<[u8; 32]>> {
    let bad = |e: argon2::Error| Error::InvalidArgument(format!("Argon2id parameters: {e}"));
    let argon_params = argon2::Params::new(
        params.memory_kib,
        params.iterations,
        params.parallelism,
        Some(32),
    )
    .map_err(bad)?;
    let argon = argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon_params,
    );
    let mut key = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(&secret.bytes, salt, key.as_mut())
        .map_err(bad)?;
    Ok(key)
}

fn slot_ad(repo_id: &str, slot: &str) -> Vec<u8> {
    format!("cbtvault key slot\0{repo_id}\0{slot}").into_bytes()
}

/// Writes a new slot for `master` unlocked by `secret`; returns its id.
pub(crate) fn add_slot(
    backend: &dyn Backend,
    repo_id: &str,
    master: &MasterKey,
    secret: &Secret,
    params: KdfParams,
) -> Result<String> {
    if secret.bytes.is_empty() {
        return Err(Error::InvalidArgument(
            "an empty passphrase or key file".into(),
        ));
    }
    let mut rng = rand::rngs::OsRng;
    let mut id = [0u8; 16];
    rng.fill_bytes(&mut id);
    let id = hex::encode(id);
    let mut salt = [0u8; 16];
    rng.fill_bytes(&mut salt);
    let wrap = wrapping_key(secret, params, &salt)?;
    let cipher = XChaCha20Poly1305::new(wrap.as_ref().into());
    let mut nonce = [0u8; 24];
    rng.fill_bytes(&mut nonce);
    let mut body = master.to_bytes();
    let tag = cipher
        .encrypt_in_place_detached(&XNonce::from(nonce), &slot_ad(repo_id, &id), &mut body)
        .map_err(|_| Error::InvalidArgument("cannot seal the master key".into()))?;
    let mut sealed = body.to_vec();
    sealed.extend_from_slice(&nonce);
    sealed.extend_from_slice(&tag);
    let file = SlotFile {
        format: KEY_SLOT_FORMAT,
        kind: secret.kind,
        created: jiff::Timestamp::now(),
        kdf: KdfFile {
            algorithm: "argon2id".into(),
            version: 0x13,
            params,
            salt: B64.encode(salt),
        },
        cipher: "xchacha20-poly1305".into(),
        sealed_key: B64.encode(&sealed),
    };
    let json = serde_json::to_vec_pretty(&file)
        .map_err(|e| Error::InvalidArgument(format!("a key slot: {e}")))?;
    backend.write(FileKind::Key, &id, &json)?;
    Ok(id)
}

fn read_slot(backend: &dyn Backend, id: &str) -> Result<SlotFile> {
    let bad = |what: String| Error::KeySlot {
        slot: id.to_string(),
        what,
    };
    let bytes = backend.read(FileKind::Key, id)?;
    if bytes.len() > 64 * 1024 {
        return Err(bad("too large for a key slot".into()));
    }
    let slot: SlotFile = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    if slot.format != KEY_SLOT_FORMAT {
        return Err(bad(format!(
            "format {} is not supported (this build reads {KEY_SLOT_FORMAT})",
            slot.format
        )));
    }
    if slot.kdf.algorithm != "argon2id" || slot.kdf.version != 0x13 {
        return Err(bad(format!(
            "key derivation {} version {:#x} is not supported",
            slot.kdf.algorithm, slot.kdf.version
        )));
    }
    if slot.cipher != "xchacha20-poly1305" {
        return Err(bad(format!("cipher {} is not supported", slot.cipher)));
    }
    let p = slot.kdf.params;
    if p.memory_kib > MAX_MEMORY_KIB || p.iterations > MAX_ITERATIONS || p.parallelism > 64 {
        return Err(bad(format!(
            "Argon2id costs {p:?} are beyond what this build accepts"
        )));
    }
    Ok(slot)
}

/// Tries `secret` on one slot: `Ok(None)` when it is not this slot's.
fn try_slot(
    repo_id: &str,
    id: &str,
    slot: &SlotFile,
    secret: &Secret,
) -> Result<Option<MasterKey>> {
    let bad = |what: String| Error::KeySlot {
        slot: id.to_string(),
        what,
    };
    let salt = B64
        .decode(&slot.kdf.salt)
        .map_err(|e| bad(format!("salt: {e}")))?;
    let sealed = Zeroizing::new(
        B64.decode(&slot.sealed_key)
            .map_err(|e| bad(format!("sealed key: {e}")))?,
    );
    if sealed.len() != 64 + 24 + 16 {
        return Err(bad(format!("a sealed key of {} bytes", sealed.len())));
    }
    let wrap = wrapping_key(secret, slot.kdf.params, &salt)?;
    let cipher = XChaCha20Poly1305::new(wrap.as_ref().into());
    let mut body = Zeroizing::new(sealed[..64].to_vec());
    let opened = cipher.decrypt_in_place_detached(
        XNonce::from_slice(&sealed[64..88]),
        &slot_ad(repo_id, id),
        &mut body,
        Tag::from_slice(&sealed[88..]),
    );
    Ok(opened.ok().and_then(|()| MasterKey::from_bytes(&body)))
}

/// The slots, oldest first.
pub(crate) fn list(backend: &dyn Backend) -> Result<Vec<KeySlot>> {
    let mut out = Vec::new();
    for id in backend.list(FileKind::Key)? {
        let slot = read_slot(backend, &id)?;
        out.push(KeySlot {
            id,
            kind: slot.kind,
            created: slot.created,
            kdf: slot.kdf.params,
        });
    }
    out.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
    Ok(out)
}

/// Finds the slot `secret` opens: its id and the master key. Slots that
/// cannot be read are skipped (another may still open) and named in the
/// error if none does.
pub(crate) fn unlock(
    backend: &dyn Backend,
    repo_id: &str,
    secret: &Secret,
) -> Result<(String, MasterKey)> {
    let ids = backend.list(FileKind::Key)?;
    if ids.is_empty() {
        return Err(Error::KeySlot {
            slot: "(none)".into(),
            what: "the repository is encrypted but has no key slot in keys/".into(),
        });
    }
    let mut tried = 0;
    let mut unreadable = Vec::new();
    for id in &ids {
        let slot = match read_slot(backend, id) {
            Ok(slot) => slot,
            Err(e) => {
                tracing::warn!(slot = %id, error = %e, "key slot skipped");
                unreadable.push(e.to_string());
                continue;
            }
        };
        if slot.kind != secret.kind {
            continue;
        }
        tried += 1;
        // A damaged slot (bad salt, parameters Argon2 refuses) must not
        // keep the others from opening.
        match try_slot(repo_id, id, &slot, secret) {
            Ok(Some(key)) => return Ok((id.clone(), key)),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(slot = %id, error = %e, "key slot skipped");
                unreadable.push(e.to_string());
            }
        }
    }
    Err(Error::WrongKey {
        kind: match secret.kind {
            SecretKind::Passphrase => "passphrase",
            SecretKind::KeyFile => "key file",
        },
        tried,
        unreadable: unreadable.join("; "),
    })
}

/// Removes slot `id`, refusing to remove the last one.
pub(crate) fn remove(backend: &dyn Backend, id: &str) -> Result<()> {
    let ids = backend.list(FileKind::Key)?;
    if !ids.iter().any(|i| i == id) {
        return Err(Error::KeySlot {
            slot: id.to_string(),
            what: "no such key slot; `cbtvault key list` shows them".into(),
        });
    }
    if ids.len() == 1 {
        return Err(Error::LastKeySlot);
    }
    backend.remove(FileKind::Key, id)
}
