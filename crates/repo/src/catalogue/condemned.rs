//! The `condemned` table (schema 5): this host's copy of the packs gc
//! records in the repository condemn (`condemn.rs`), brought up to date
//! by every refresh. A blob whose indexed copy is in a condemned pack is
//! not "stored" for deduplication ([`Catalogue::contains`]): a backup
//! stores it again rather than build on a copy gc may delete; and a copy
//! indexed later in a pack that is not condemned takes over its row.

use std::collections::HashSet;

use rusqlite::params;

use super::Catalogue;
use crate::BlobId;
use crate::error::{Error, Result};

/// The table, created with the rest of the schema and on upgrade.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS condemned(
    pack TEXT PRIMARY KEY,
    record TEXT NOT NULL) WITHOUT ROWID;
";

impl Catalogue {
    /// True when blob `id` is stored, in a pack that no gc condemned: what
    /// a backup may deduplicate against.
    pub fn contains(&self, id: &BlobId) -> Result<bool> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT 1 FROM blobs b JOIN packs p ON p.id = b.pack WHERE b.id = ?1
                 AND NOT EXISTS (SELECT 1 FROM condemned c WHERE c.pack = p.name)",
            )
            .map_err(self.err())?;
        stmt.exists([&id.0[..]]).map_err(self.err())
    }

    /// The packs condemned by gc records, as last refreshed.
    pub fn condemned_packs(&self) -> Result<HashSet<String>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT pack FROM condemned")
            .map_err(self.err())?;
        let rows = stmt.query_map([], |r| r.get(0)).map_err(self.err())?;
        rows.collect::<rusqlite::Result<_>>().map_err(self.err())
    }

    /// Replaces the condemned set with `packs` (pack, gc record).
    pub fn set_condemned(&mut self, packs: &[(String, String)]) -> Result<()> {
        let path = self.path.clone();
        let err = |source| Error::Catalogue {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        tx.execute("DELETE FROM condemned", []).map_err(err)?;
        {
            let mut stmt = tx
                .prepare_cached("INSERT OR IGNORE INTO condemned(pack, record) VALUES (?1, ?2)")
                .map_err(err)?;
            for (pack, record) in packs {
                stmt.execute(params![pack, record]).map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }

    /// Forgets pack `name` and the blobs indexed in it (gc deleted it).
    pub fn drop_pack(&mut self, name: &str) -> Result<()> {
        self.replace_packs(&[name.to_string()], &[])
    }
}
