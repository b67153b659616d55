//! A host's cache of block-map nodes, for repositories in object storage.
//!
//! An incremental walks its parent's block map down to every changed
//! block, and a restore walks the whole map: one node per 64 blocks, each
//! a separate small read. Locally that is a page-cache hit; in a bucket it
//! is one request of 10–50 ms, which made an S3 incremental ten times
//! slower than a local one (docs/benchmarks.md). So a repository opened
//! through a local cache directory ([`Repository::open_cached`]) keeps the
//! nodes it writes and reads in `nodes.sqlite` there, and reads them from
//! the bucket only when they are not there.
//!
//! # Trust
//! Nothing here is trusted: a node is content-addressed, so a cached node
//! is used only when its bytes hash to the id asked for (keyed in an
//! encrypted repository), and otherwise dropped and read from the store.
//! A node stays valid for as long as its id is asked for, whatever gc
//! did meanwhile, so the cache needs no invalidation — only a bound: past
//! [`MAX_NODES`] rows the oldest go. The file is a cache, not state: it is
//! written without fsync, may be deleted at any time, and a damaged one is
//! set aside and made again. Failures to use it are logged and never fail
//! a backup or a restore.
//!
//! What it holds is what the catalogue beside it holds already (blob ids,
//! keyed in an encrypted repository), never guest data.
//!
//! # Locking
//! One connection per [`BlobReader`] or [`PackWriter`] (both belong to
//! one thread); SQLite's WAL lets readers and writers of several threads
//! and processes share the file, and a busy cache is skipped, not waited
//! for beyond [`BUSY_WAIT`].
//!
//! [`Repository::open_cached`]: crate::Repository::open_cached
//! [`BlobReader`]: crate::BlobReader
//! [`PackWriter`]: crate::PackWriter

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use crate::BlobId;

/// The cache's file in the repository's local cache directory.
pub(crate) const NODE_CACHE_FILE: &str = "nodes.sqlite";

/// Rows kept: 131072 nodes of at most 2 KiB, about 256 MiB, enough for
/// the block maps of 8 TiB of disks.
const MAX_NODES: i64 = 1 << 17;

/// How long a statement waits for another connection's write.
const BUSY_WAIT: Duration = Duration::from_millis(200);

/// One connection to a host's node cache.
pub(crate) struct NodeCache {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for NodeCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCache")
            .field("path", &self.path)
            .finish()
    }
}

impl NodeCache {
    /// Opens (or makes) the cache in `dir`; `None`, with a warning, when
    /// it cannot be used — the repository then reads every node from the
    /// store, as it would without a cache.
    pub(crate) fn open(dir: &Path) -> Option<NodeCache> {
        let path = dir.join(NODE_CACHE_FILE);
        match Self::try_open(&path) {
            Ok(cache) => Some(cache),
            Err(e) => {
                tracing::warn!(cache = %path.display(), error = %e, "the block-map node cache cannot be used; nodes are read from the store");
                // Only a file that is not a database (or is corrupt) is set
                // aside for the next open to make anew; a busy or locked
                // one is another process's live cache.
                if matches!(
                    e.sqlite_error_code(),
                    Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
                ) {
                    let aside = path.with_extension("sqlite.damaged");
                    let _ = std::fs::rename(&path, aside);
                }
                None
            }
        }
    }

    fn try_open(path: &Path) -> rusqlite::Result<NodeCache> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(BUSY_WAIT)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=OFF;
             CREATE TABLE IF NOT EXISTS nodes(id BLOB NOT NULL UNIQUE, bytes BLOB NOT NULL);",
        )?;
        Ok(NodeCache {
            conn,
            path: path.to_path_buf(),
        })
    }

    /// The bytes cached for `id`, when they hash to it (`hash` is the
    /// repository's id function); a row that does not is removed.
    pub(crate) fn get(
        &self,
        id: &BlobId,
        hash: impl Fn(&[u8]) -> Option<[u8; 32]>,
    ) -> Option<Vec<u8>> {
        let found: rusqlite::Result<Option<Vec<u8>>> = self
            .conn
            .prepare_cached("SELECT bytes FROM nodes WHERE id = ?1")
            .and_then(|mut s| s.query_row(params![&id.0[..]], |r| r.get(0)).optional());
        match found {
            Ok(Some(bytes)) if hash(&bytes) == Some(id.0) => Some(bytes),
            Ok(Some(_)) => {
                tracing::warn!(cache = %self.path.display(), node = %id, "a cached block-map node does not match its id; reading it from the store");
                let _ = self
                    .conn
                    .execute("DELETE FROM nodes WHERE id = ?1", params![&id.0[..]]);
                None
            }
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(cache = %self.path.display(), error = %e, "node cache lookup failed");
                None
            }
        }
    }

    /// Keeps `bytes`, the node `id`, and drops the oldest rows past the bound.
    pub(crate) fn put(&self, id: &BlobId, bytes: &[u8]) {
        let put = self
            .conn
            .prepare_cached("INSERT OR IGNORE INTO nodes(id, bytes) VALUES (?1, ?2)")
            .and_then(|mut s| s.execute(params![&id.0[..], bytes]));
        let trim = |rowid: i64| {
            if rowid % 1024 == 0 {
                self.conn.execute(
                    "DELETE FROM nodes WHERE rowid <= ?1 - ?2",
                    params![rowid, MAX_NODES],
                )?;
            }
            Ok(())
        };
        if let Err(e) = put.and_then(|_| trim(self.conn.last_insert_rowid())) {
            tracing::debug!(cache = %self.path.display(), error = %e, "node cache insert failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blake(data: &[u8]) -> Option<[u8; 32]> {
        Some(*blake3::hash(data).as_bytes())
    }

    #[test]
    fn a_node_comes_back_only_while_it_matches_its_id() {
        let dir = tempfile::tempdir().unwrap();
        let cache = NodeCache::open(dir.path()).unwrap();
        let node = b"a block-map node".to_vec();
        let id = BlobId(*blake3::hash(&node).as_bytes());
        assert_eq!(cache.get(&id, blake), None);
        cache.put(&id, &node);
        assert_eq!(cache.get(&id, blake), Some(node.clone()));
        // Another process's connection sees it too.
        let other = NodeCache::open(dir.path()).unwrap();
        assert_eq!(other.get(&id, blake), Some(node));
        // A row whose bytes were damaged is dropped, never returned.
        cache
            .conn
            .execute("UPDATE nodes SET bytes = x'00'", [])
            .unwrap();
        assert_eq!(cache.get(&id, blake), None);
        let rows: i64 = cache
            .conn
            .query_row("SELECT count(*) FROM nodes", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 0);
    }

    #[test]
    fn a_damaged_file_is_set_aside_and_made_again() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(NODE_CACHE_FILE), vec![0x5a; 8192]).unwrap();
        assert!(NodeCache::open(dir.path()).is_none());
        let cache = NodeCache::open(dir.path()).expect("a new cache");
        let id = BlobId(*blake3::hash(b"n").as_bytes());
        cache.put(&id, b"n");
        assert_eq!(cache.get(&id, blake), Some(b"n".to_vec()));
    }

    #[test]
    fn the_oldest_rows_go_past_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let cache = NodeCache::open(dir.path()).unwrap();
        cache
            .conn
            .execute(
                "INSERT INTO nodes(rowid, id, bytes) VALUES (?1, x'01', x'01')",
                params![1],
            )
            .unwrap();
        // The next insert lands at rowid MAX_NODES + 1024, a trim point.
        cache
            .conn
            .execute(
                "INSERT INTO nodes(rowid, id, bytes) VALUES (?1, x'02', x'02')",
                params![MAX_NODES + 1023],
            )
            .unwrap();
        let node = b"newest".to_vec();
        let id = BlobId(*blake3::hash(&node).as_bytes());
        cache.put(&id, &node);
        let oldest: i64 = cache
            .conn
            .query_row("SELECT min(rowid) FROM nodes", [], |r| r.get(0))
            .unwrap();
        assert!(oldest > 1, "the oldest row stayed");
        assert_eq!(cache.get(&id, blake), Some(node));
    }
}
