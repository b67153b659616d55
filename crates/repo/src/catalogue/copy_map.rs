//! The `copy_map` table (schema 6): what copies across keys learnt, so
//! that the next copy from the same source reads only blocks it never
//! mapped (`rekey.rs`). Each row says which blob of this repository holds
//! the content of a blob of a source repository: `source` is the source
//! repository's id, `key` the source blob's id hashed with this
//! repository's id function (keyed in an encrypted one, so that the plain
//! ids of an unencrypted source, which would confirm guessed content, are
//! never written beside a sealed repository), `target` this repository's
//! blob id. A row is a hint, never a promise: the blob it names may have
//! gone since (gc, quarantine), so a copy uses it only while
//! [`Catalogue::contains`] says the blob is stored. Repair carries the
//! rows of the old catalogue over when it can read them; they cannot be
//! rebuilt from the store.

use rusqlite::{OptionalExtension, params};

use super::Catalogue;
use crate::BlobId;
use crate::error::{Error, Result};

/// The table, created with the rest of the schema and on upgrade.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS copy_map(
    source TEXT NOT NULL,
    key BLOB NOT NULL,
    target BLOB NOT NULL,
    PRIMARY KEY(source, key)) WITHOUT ROWID;
";

impl Catalogue {
    /// The blob of this repository that a copy from repository `source`
    /// recorded for the source blob whose map key is `key`, if any (it
    /// may no longer be stored).
    pub(crate) fn copy_map_get(&self, source: &str, key: &[u8; 32]) -> Result<Option<BlobId>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT target FROM copy_map WHERE source = ?1 AND key = ?2")
            .map_err(self.err())?;
        let raw: Option<Vec<u8>> = stmt
            .query_row(params![source, &key[..]], |r| r.get(0))
            .optional()
            .map_err(self.err())?;
        match raw {
            None => Ok(None),
            Some(raw) => {
                BlobId::try_from(raw.as_slice())
                    .map(Some)
                    .map_err(|_| Error::DamagedCatalogue {
                        path: self.path.clone(),
                        what: format!(
                            "a copy_map row of source repository {source} holds a malformed blob id"
                        ),
                    })
            }
        }
    }

    /// Records `(key, target)` pairs learnt copying from repository
    /// `source`, in one transaction.
    pub(crate) fn copy_map_put(
        &mut self,
        source: &str,
        pairs: &[([u8; 32], BlobId)],
    ) -> Result<()> {
        if pairs.is_empty() {
            return Ok(());
        }
        let path = self.path.clone();
        let err = |source| Error::Catalogue {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO copy_map(source, key, target) VALUES (?1, ?2, ?3)",
                )
                .map_err(err)?;
            for (key, target) in pairs {
                stmt.execute(params![source, &key[..], &target.0[..]])
                    .map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }

    /// Copies the rows of the catalogue at `old` (repair; an old catalogue
    /// without the table fails, and costs only re-reads).
    pub(crate) fn copy_map_from(&self, old: &std::path::Path) -> Result<()> {
        let old = old.to_string_lossy();
        self.conn
            .execute("ATTACH DATABASE ?1 AS old", [old.as_ref()])
            .map_err(self.err())?;
        let copied = self.conn.execute_batch(
            "INSERT OR IGNORE INTO copy_map(source, key, target)
               SELECT source, key, target FROM old.copy_map
               WHERE length(key) = 32 AND length(target) = 32;",
        );
        let detached = self.conn.execute_batch("DETACH DATABASE old");
        copied.and(detached).map_err(self.err())
    }

    /// Rows recorded for copies from repository `source`.
    pub fn copy_map_len(&self, source: &str) -> Result<u64> {
        self.conn
            .query_row(
                "SELECT count(*) FROM copy_map WHERE source = ?1",
                [source],
                |r| r.get(0),
            )
            .map_err(self.err())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A schema 5 catalogue (before copies across keys) gains the table in
    /// place, and rows round-trip.
    #[test]
    fn a_schema_5_catalogue_is_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sqlite");
        drop(Catalogue::open(&path, true).unwrap());
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("DROP TABLE copy_map; PRAGMA user_version = 5;")
            .unwrap();
        drop(conn);
        let mut cat = Catalogue::open(&path, false).unwrap();
        let version: i64 = cat
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, 6);
        let (key, target) = ([7u8; 32], BlobId([9; 32]));
        assert_eq!(cat.copy_map_get("src", &key).unwrap(), None);
        cat.copy_map_put("src", &[(key, target)]).unwrap();
        assert_eq!(cat.copy_map_get("src", &key).unwrap(), Some(target));
        assert_eq!(cat.copy_map_get("other", &key).unwrap(), None);
        assert_eq!(cat.copy_map_len("src").unwrap(), 1);
    }
}
