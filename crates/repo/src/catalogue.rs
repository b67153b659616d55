//! The SQLite catalogue: an index of disks, restore points, packs, blobs and
//! runs. Everything in it can be rebuilt from the packs and manifests
//! (`cbtvault repair`); it exists so that lookups never scan packs.
//!
//! Each thread or process opens its own connection. WAL mode lets readers
//! run beside the single writer; `synchronous=FULL` makes a committed
//! transaction durable, which the commit protocol relies on.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use crate::BlobId;
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::pack::{BlobKind, Compression, PackEntry};

/// The catalogue's file name inside the repository.
pub const CATALOGUE_FILE: &str = "catalogue.sqlite";
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS disks(
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS restore_points(
    id TEXT PRIMARY KEY,
    disk_id INTEGER NOT NULL REFERENCES disks(id),
    time_ms INTEGER NOT NULL,
    virtual_size INTEGER NOT NULL,
    parent TEXT,
    manifest TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS restore_points_by_disk ON restore_points(disk_id, time_ms);
CREATE TABLE IF NOT EXISTS packs(
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS blobs(
    id BLOB PRIMARY KEY,
    pack INTEGER NOT NULL REFERENCES packs(id),
    offset INTEGER NOT NULL,
    stored_len INTEGER NOT NULL,
    raw_len INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    compression INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blobs_by_pack ON blobs(pack);
CREATE TABLE IF NOT EXISTS runs(
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    disk TEXT,
    pid INTEGER NOT NULL,
    started TEXT NOT NULL,
    finished TEXT,
    status TEXT NOT NULL,
    restore_point TEXT,
    detail TEXT);
";

/// Where a blob is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobLocation {
    /// The pack's name.
    pub pack: String,
    /// The blob's entry in it.
    pub entry: PackEntry,
}

/// A restore point as the catalogue lists it.
#[derive(Clone, Debug)]
pub struct RestorePointRow {
    pub id: String,
    pub manifest: Manifest,
}

/// Records pack `name` and its blobs in `tx`. Without `replace`, a blob
/// already indexed elsewhere keeps its first location.
fn index_pack(
    tx: &rusqlite::Transaction<'_>,
    name: &str,
    size: u64,
    entries: &[PackEntry],
    replace: bool,
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT OR IGNORE INTO packs(name, size) VALUES (?1, ?2)",
        params![name, size],
    )?;
    let pack_id: i64 =
        tx.query_row("SELECT id FROM packs WHERE name = ?1", [name], |r| r.get(0))?;
    let mut stmt = tx.prepare_cached(if replace {
        "INSERT OR REPLACE INTO blobs(id, pack, offset, stored_len, raw_len, kind, compression)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
    } else {
        "INSERT OR IGNORE INTO blobs(id, pack, offset, stored_len, raw_len, kind, compression)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
    })?;
    for e in entries {
        stmt.execute(params![
            &e.id.0[..],
            pack_id,
            e.offset,
            e.stored_len,
            e.raw_len,
            e.kind as u8,
            e.compression as u8
        ])?;
    }
    Ok(())
}

/// A connection to the catalogue.
pub struct Catalogue {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for Catalogue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Catalogue({})", self.path.display())
    }
}

impl Catalogue {
    /// Opens (and with `create`, creates) the catalogue at `path`.
    pub fn open(path: &Path, create: bool) -> Result<Catalogue> {
        let flags = if create {
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE
        } else {
            OpenFlags::SQLITE_OPEN_READ_WRITE
        } | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        if !create && !path.exists() {
            return Err(Error::Catalogue {
                path: path.to_path_buf(),
                source: rusqlite::Error::InvalidPath(path.to_path_buf()),
            });
        }
        let wrap = |source| Error::Catalogue {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open_with_flags(path, flags).map_err(wrap)?;
        conn.busy_timeout(Duration::from_secs(60)).map_err(wrap)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;",
        )
        .map_err(wrap)?;
        let cat = Catalogue {
            conn,
            path: path.to_path_buf(),
        };
        if create {
            cat.conn.execute_batch(SCHEMA).map_err(wrap)?;
            cat.conn
                .pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(wrap)?;
        } else {
            let version: i64 = cat
                .conn
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .map_err(wrap)?;
            if version != SCHEMA_VERSION {
                return Err(Error::UnsupportedVersion {
                    found: version as u32,
                    supported: SCHEMA_VERSION as u32,
                });
            }
        }
        Ok(cat)
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> Error + '_ {
        |source| Error::Catalogue {
            path: self.path.clone(),
            source,
        }
    }

    /// Where blob `id` is stored, if it is.
    pub fn locate(&self, id: &BlobId) -> Result<Option<BlobLocation>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT p.name, b.offset, b.stored_len, b.raw_len, b.kind, b.compression
                 FROM blobs b JOIN packs p ON p.id = b.pack WHERE b.id = ?1",
            )
            .map_err(self.err())?;
        let row = stmt
            .query_row([&id.0[..]], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, u64>(1)?,
                    r.get::<_, u32>(2)?,
                    r.get::<_, u32>(3)?,
                    r.get::<_, u8>(4)?,
                    r.get::<_, u8>(5)?,
                ))
            })
            .optional()
            .map_err(self.err())?;
        let Some((pack, offset, stored_len, raw_len, kind, compression)) = row else {
            return Ok(None);
        };
        let bad = |what: &str| Error::CorruptBlob {
            id: *id,
            pack: pack.clone(),
            offset,
            what: format!("catalogue holds an unknown {what}; run `cbtvault repair`"),
        };
        let entry = PackEntry {
            id: *id,
            kind: BlobKind::from_u8(kind).ok_or_else(|| bad("kind"))?,
            compression: Compression::from_u8(compression).ok_or_else(|| bad("compression"))?,
            offset,
            stored_len,
            raw_len,
        };
        Ok(Some(BlobLocation { pack, entry }))
    }

    /// True when blob `id` is stored.
    pub fn contains(&self, id: &BlobId) -> Result<bool> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT 1 FROM blobs WHERE id = ?1")
            .map_err(self.err())?;
        stmt.exists([&id.0[..]]).map_err(self.err())
    }

    /// Records a durable pack and its blobs. A blob already indexed in
    /// another pack keeps its first location.
    pub fn insert_pack(&mut self, name: &str, size: u64, entries: &[PackEntry]) -> Result<()> {
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(|source| Error::Catalogue {
            path: path.clone(),
            source,
        })?;
        index_pack(&tx, name, size, entries, false)
            .and_then(|()| tx.commit())
            .map_err(|source| Error::Catalogue { path, source })
    }

    /// Packs known to the catalogue, with their sizes.
    pub fn packs(&self) -> Result<Vec<(String, u64)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, size FROM packs ORDER BY name")
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.err())?;
        rows.collect::<rusqlite::Result<_>>().map_err(self.err())
    }

    /// The blobs the catalogue places in `pack`.
    pub fn blobs_in_pack(&self, pack: &str) -> Result<Vec<PackEntry>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT b.id FROM blobs b JOIN packs p ON p.id = b.pack WHERE p.name = ?1",
            )
            .map_err(self.err())?;
        let ids: Vec<Vec<u8>> = stmt
            .query_map([pack], |r| r.get(0))
            .map_err(self.err())?
            .collect::<rusqlite::Result<_>>()
            .map_err(self.err())?;
        let mut out = Vec::with_capacity(ids.len());
        for raw in ids {
            let id = BlobId::try_from(raw.as_slice()).map_err(|_| Error::CorruptPack {
                pack: pack.to_string(),
                what: "catalogue holds a malformed blob id; run `cbtvault repair`".into(),
            })?;
            if let Some(loc) = self.locate(&id)? {
                out.push(loc.entry);
            }
        }
        Ok(out)
    }

    /// Replaces the index of several packs at once (garbage collection):
    /// removes `dead` packs and their blobs, and indexes `added` packs
    /// whose blobs take over from the removed ones.
    pub fn replace_packs(
        &mut self,
        dead: &[String],
        added: &[(String, u64, Vec<PackEntry>)],
    ) -> Result<()> {
        let path = self.path.clone();
        let err = |source| Error::Catalogue {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        for name in dead {
            tx.execute(
                "DELETE FROM blobs WHERE pack = (SELECT id FROM packs WHERE name = ?1)",
                [name],
            )
            .map_err(err)?;
            tx.execute("DELETE FROM packs WHERE name = ?1", [name])
                .map_err(err)?;
        }
        for (name, size, entries) in added {
            // The new packs take over: their locations replace the old ones.
            index_pack(&tx, name, *size, entries, true).map_err(err)?;
        }
        tx.commit().map_err(err)
    }

    /// Records a restore point (idempotent).
    pub fn insert_restore_point(&mut self, id: &str, manifest: &Manifest) -> Result<()> {
        let path = self.path.clone();
        let err = |source| Error::Catalogue {
            path: path.clone(),
            source,
        };
        let json = serde_json::to_string(manifest).map_err(|source| Error::Manifest {
            name: id.to_string(),
            source,
        })?;
        let tx = self.conn.transaction().map_err(err)?;
        tx.execute(
            "INSERT OR IGNORE INTO disks(name) VALUES (?1)",
            [&manifest.disk],
        )
        .map_err(err)?;
        tx.execute(
            "INSERT OR IGNORE INTO restore_points(id, disk_id, time_ms, virtual_size, parent, manifest)
             VALUES (?1, (SELECT id FROM disks WHERE name = ?2), ?3, ?4, ?5, ?6)",
            params![
                id,
                manifest.disk,
                manifest.time.as_millisecond(),
                manifest.virtual_size,
                manifest.parent,
                json
            ],
        )
        .map_err(err)?;
        tx.commit().map_err(err)
    }

    /// Forgets a restore point.
    pub fn remove_restore_point(&self, id: &str) -> Result<()> {
        self.conn
            .execute("DELETE FROM restore_points WHERE id = ?1", [id])
            .map_err(self.err())?;
        Ok(())
    }

    /// Restore points, oldest first, optionally of one disk.
    pub fn restore_points(&self, disk: Option<&str>) -> Result<Vec<RestorePointRow>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT r.id, r.manifest FROM restore_points r JOIN disks d ON d.id = r.disk_id
                 WHERE ?1 IS NULL OR d.name = ?1 ORDER BY r.time_ms, r.id",
            )
            .map_err(self.err())?;
        let rows: Vec<(String, String)> = stmt
            .query_map([disk], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.err())?
            .collect::<rusqlite::Result<_>>()
            .map_err(self.err())?;
        rows.into_iter()
            .map(|(id, json)| {
                let manifest = serde_json::from_str(&json).map_err(|source| Error::Manifest {
                    name: id.clone(),
                    source,
                })?;
                Ok(RestorePointRow { id, manifest })
            })
            .collect()
    }

    /// Ids of all restore points.
    pub fn restore_point_ids(&self) -> Result<Vec<String>> {
        let mut stmt = self
            .conn
            .prepare("SELECT id FROM restore_points")
            .map_err(self.err())?;
        let ids = stmt
            .query_map([], |r| r.get(0))
            .map_err(self.err())?
            .collect::<rusqlite::Result<_>>()
            .map_err(self.err())?;
        Ok(ids)
    }

    /// Ids starting with `prefix`.
    pub fn match_prefix(&self, prefix: &str) -> Result<Vec<String>> {
        let mut stmt = self
            .conn
            .prepare("SELECT id FROM restore_points WHERE substr(id, 1, length(?1)) = ?1")
            .map_err(self.err())?;
        let ids = stmt
            .query_map([prefix], |r| r.get(0))
            .map_err(self.err())?
            .collect::<rusqlite::Result<_>>()
            .map_err(self.err())?;
        Ok(ids)
    }

    /// Disk names.
    pub fn disks(&self) -> Result<Vec<String>> {
        let mut stmt = self
            .conn
            .prepare("SELECT name FROM disks ORDER BY name")
            .map_err(self.err())?;
        let names = stmt
            .query_map([], |r| r.get(0))
            .map_err(self.err())?
            .collect::<rusqlite::Result<_>>()
            .map_err(self.err())?;
        Ok(names)
    }

    /// Records the start of a run and returns its id.
    pub fn start_run(&self, kind: &str, disk: Option<&str>) -> Result<i64> {
        self.conn
            .execute(
                "INSERT INTO runs(kind, disk, pid, started, status) VALUES (?1, ?2, ?3, ?4, 'running')",
                params![kind, disk, std::process::id(), jiff::Timestamp::now().to_string()],
            )
            .map_err(self.err())?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Runs of `kind` on `disk` that never recorded an end (their process
    /// died), with their detail text.
    pub fn unfinished_runs(&self, kind: &str, disk: &str) -> Result<Vec<(i64, String)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, coalesce(detail, '') FROM runs WHERE kind = ?1 AND disk = ?2 AND finished IS NULL")
            .map_err(self.err())?;
        let rows = stmt
            .query_map([kind, disk], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.err())?
            .collect::<rusqlite::Result<_>>()
            .map_err(self.err())?;
        Ok(rows)
    }

    /// Notes what a running run needs found again if it dies.
    pub fn set_run_detail(&self, run: i64, detail: &str) -> Result<()> {
        self.conn
            .execute(
                "UPDATE runs SET detail = ?2 WHERE id = ?1",
                params![run, detail],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// Records how a run ended.
    pub fn finish_run(
        &self,
        run: i64,
        status: &str,
        restore_point: Option<&str>,
        detail: &str,
    ) -> Result<()> {
        self.conn
            .execute(
                "UPDATE runs SET finished = ?2, status = ?3, restore_point = ?4, detail = ?5 WHERE id = ?1",
                params![run, jiff::Timestamp::now().to_string(), status, restore_point, detail],
            )
            .map_err(self.err())?;
        Ok(())
    }
}

impl Catalogue {
    /// Moves the WAL's content into the database file and empties the WAL.
    pub fn checkpoint(&self) -> Result<()> {
        self.conn
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE); PRAGMA journal_mode=DELETE;")
            .map_err(self.err())
    }
}
