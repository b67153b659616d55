//! The catalogue of an encrypted repository checks its rows against
//! keyed ids.

use std::sync::Arc;

use super::Catalogue;
use crate::crypto::Crypto;

impl Catalogue {
    /// Checks restore point rows with `crypto`'s ids (plain BLAKE3 until
    /// told otherwise). With [`Crypto::Locked`] rows cannot be checked and
    /// are taken as they are: nothing can be restored without the key.
    pub(crate) fn with_crypto(mut self, crypto: Arc<Crypto>) -> Catalogue {
        self.crypto = crypto;
        self
    }
}
