//! An encrypted repository seen from the outside: unlocking it when it is
//! opened, and managing its key slots (`cbtvault key add|remove|list|passwd`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::BlobId;
use crate::backend::{Backend, FileKind};
use crate::crypto::{Crypto, MasterKey};
use crate::error::{Error, Result};
use crate::key::{self, KdfParams, KeySlot, Secret};
use crate::lock::Lock;
use crate::repository::{
    BLOCK_SIZE, CONFIG_FILE, Config, ENCRYPTED_FORMAT_VERSION, EncryptionConfig, Repository,
};

/// Asked for the secret of an encrypted repository when it is opened
/// (never for an unencrypted one, so a front end prompts only when needed).
/// [`Error::KeyRequired`] from it means "no key given": the repository
/// opens locked, and only what needs no key works.
pub type KeyPrompt<'a> = &'a dyn Fn() -> Result<Secret>;

/// How an opening repository gets its key.
pub(crate) enum Unlock<'a> {
    /// Without it: an encrypted repository opens locked.
    None,
    Prompt(KeyPrompt<'a>),
    /// Known already (`init`, `repair`).
    Master(MasterKey),
}

impl Unlock<'_> {
    /// The [`Crypto`] for a repository with `config`, and the slot that
    /// opened it.
    pub(crate) fn crypto(
        self,
        config: &Config,
        backend: &dyn Backend,
    ) -> Result<(Crypto, Option<String>)> {
        if config.encryption.is_none() {
            return Ok((Crypto::Plain, None));
        }
        match self {
            Unlock::None => Ok((Crypto::Locked, None)),
            Unlock::Master(master) => Ok((Crypto::keyed(&master), None)),
            Unlock::Prompt(prompt) => {
                let secret = match prompt() {
                    // No key to be had: open locked, for what needs none.
                    Err(Error::KeyRequired { .. }) => return Ok((Crypto::Locked, None)),
                    other => other?,
                };
                let (slot, master) = key::unlock(backend, &config.id, &secret)?;
                tracing::debug!(%slot, "repository unlocked");
                Ok((Crypto::keyed(&master), Some(slot)))
            }
        }
    }
}

/// Reads and checks the configuration.
pub(crate) fn read_config(path: &Path, backend: &dyn Backend) -> Result<Config> {
    let raw = backend.read(FileKind::Config, CONFIG_FILE)?;
    let bad = |source| Error::Config {
        path: path.join(CONFIG_FILE),
        source,
    };
    let probe: serde_json::Value = serde_json::from_slice(&raw).map_err(bad)?;
    let version = probe
        .get("format_version")
        .and_then(|v| v.as_u64())
        .unwrap_or(0) as u32;
    if !(1..=ENCRYPTED_FORMAT_VERSION).contains(&version) {
        return Err(Error::UnsupportedVersion {
            found: version,
            supported: ENCRYPTED_FORMAT_VERSION,
        });
    }
    let config: Config = serde_json::from_value(probe).map_err(bad)?;
    if config.block_size != BLOCK_SIZE || config.tree_fanout != crate::tree::FANOUT {
        return Err(Error::InvalidArgument(format!(
            "{}: block size {} / fan-out {} are not supported",
            path.display(),
            config.block_size,
            config.tree_fanout
        )));
    }
    // Encryption and its format number go together: either without the
    // other is a damaged file, and guessing could write plaintext.
    match (&config.encryption, version == ENCRYPTED_FORMAT_VERSION) {
        (None, false) => {}
        (Some(e), true) if *e == EncryptionConfig::current() => {}
        (Some(e), true) => {
            return Err(Error::InvalidArgument(format!(
                "{}: encryption {e:?} is not supported by this build",
                path.display()
            )));
        }
        _ => {
            return Err(Error::InvalidArgument(format!(
                "{}: format version {version} does not match its encryption setting; the file is damaged",
                path.display()
            )));
        }
    }
    Ok(config)
}

impl Repository {
    /// How objects are sealed and ided.
    pub fn crypto(&self) -> &Arc<Crypto> {
        &self.crypto
    }

    /// True when the repository is encrypted (whether or not it was
    /// opened with its key).
    pub fn is_encrypted(&self) -> bool {
        self.config().encryption.is_some()
    }

    /// The id a block or node with this content has here (BLAKE3, keyed
    /// in an encrypted repository): to compare what a disk holds with
    /// what a restore point says.
    pub fn blob_id(&self, content: &[u8]) -> Result<BlobId> {
        self.crypto.blob_id(content)
    }

    fn require_encrypted(&self, what: &str) -> Result<()> {
        if !self.is_encrypted() {
            return Err(Error::NotEncrypted { what: what.into() });
        }
        Ok(())
    }

    /// The key slots, oldest first (their secrets are not in them).
    pub fn key_list(&self) -> Result<Vec<KeySlot>> {
        self.require_encrypted("listing keys")?;
        key::list(self.backend().as_ref())
    }

    /// The key slot this process unlocked the repository with.
    pub fn current_key_slot(&self) -> Option<&str> {
        self.unlocked_slot.as_deref()
    }

    /// Adds a key slot for `secret` (the repository must be open with its
    /// key); returns its id. No data is rewritten.
    pub fn key_add(&self, secret: &Secret, kdf: KdfParams) -> Result<String> {
        self.require_encrypted("adding a key")?;
        self.require_writable("adding a key")?;
        let _lock = self.lock_keys()?;
        self.add_slot(secret, kdf)
    }

    /// Writes a key slot for `secret`; the caller holds the keys lock.
    fn add_slot(&self, secret: &Secret, kdf: KdfParams) -> Result<String> {
        let master = self.master_key("adding a key")?;
        key::add_slot(
            self.backend().as_ref(),
            &self.config().id,
            &master,
            secret,
            kdf,
        )
    }

    /// The keys lock: one change of the key slots at a time, on any host
    /// (a kernel lock for this host's processes, and lock object `keys`
    /// for every host; tried once, never queued).
    fn lock_keys(&self) -> Result<Lock> {
        const WHAT: &str = "the key slots";
        let lock = self.lock_named("keys", "keys", WHAT)?;
        let lease = crate::lease::acquire(
            self.backend(),
            "keys",
            "keys",
            "a change of the key slots",
            Duration::ZERO,
            self.lock_ttl(),
        )
        .map_err(|e| match e {
            Error::Locked { holder, .. } => Error::Locked {
                what: WHAT.into(),
                holder,
            },
            e => e,
        })?;
        Ok(lock.with_lease(Some(lease)))
    }

    /// Removes key slot `id`: never the last one, nor the one this
    /// process unlocked with (change that one with
    /// [`Repository::key_passwd`]).
    pub fn key_remove(&self, id: &str) -> Result<()> {
        self.require_encrypted("removing a key")?;
        self.require_writable("removing a key")?;
        if self.unlocked_slot.as_deref() == Some(id) {
            return Err(Error::KeySlot {
                slot: id.to_string(),
                what: "it is the key this command was given; open the repository with another key to remove it".into(),
            });
        }
        let _lock = self.lock_keys()?;
        key::remove(self.backend().as_ref(), id)
    }

    /// Replaces the key slot this process unlocked with by one for
    /// `secret`; returns the new slot's id. The new slot is written before
    /// the old one goes, so a crash between leaves both, never neither.
    pub fn key_passwd(&self, secret: &Secret, kdf: KdfParams) -> Result<String> {
        let old = self
            .unlocked_slot
            .as_deref()
            .ok_or_else(|| Error::KeyRequired {
                what: "changing a passphrase".into(),
            })?
            .to_string();
        self.require_encrypted("changing a passphrase")?;
        self.require_writable("changing a passphrase")?;
        // One holding of the keys lock for both steps: no other change
        // of the slots runs between them.
        let _lock = self.lock_keys()?;
        let new = self.add_slot(secret, kdf)?;
        key::remove(self.backend().as_ref(), &old)?;
        Ok(new)
    }

    fn master_key(&self, what: &str) -> Result<MasterKey> {
        match self.crypto.as_ref() {
            Crypto::Keyed(keys) => Ok(keys.master().clone()),
            _ => Err(Error::KeyRequired { what: what.into() }),
        }
    }
}
