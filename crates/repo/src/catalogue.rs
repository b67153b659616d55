//! The SQLite catalogue: an index of disks, restore points, packs, blobs and
//! runs. Everything in it can be rebuilt from the packs and manifests
//! (`cbtvault repair`); it exists so that lookups never scan packs.
//!
//! Each thread or process opens its own connection. WAL mode lets readers
//! run beside the single writer; `synchronous=FULL` makes a committed
//! transaction durable, which the commit protocol relies on.
//!
//! Besides the index, it keeps what only it can know:
//! - `quarantine`: blobs found damaged (by verify, restore or any read).
//!   A quarantined blob has no row in `blobs`, so the next backup that
//!   meets the same content stores it again, and from then on every
//!   restore point that uses it reads the new copy (healing).
//! - `forgetting`: restore points whose manifest is being removed, so that
//!   a manifest that vanishes *without* forget is noticed;
//! - `lost_restore_points`: such vanished restore points, kept (with their
//!   manifest text) for verify to report and repair to restore.
//! - `runs`: what each backup run did, for the daemon and the reapers;
//! - `condemned`: packs gc records condemn (`catalogue/condemned.rs`);
//! - `copy_map`: what copies across keys learnt (`catalogue/copy_map.rs`).
//!
//! Schema version 2 added the first three tables; a version 1 catalogue
//! is migrated when it is opened for writing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use crate::BlobId;
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::pack::{BlobKind, Compression, PackEntry};

mod condemned;
mod copy_map;
mod job_runs;
mod keyed;
mod runs;

pub use job_runs::JobRunRow;
pub use runs::RunRow;

/// The catalogue's file name inside the repository.
pub const CATALOGUE_FILE: &str = "catalogue.sqlite";

/// Version 2 added runs, quarantine and forget bookkeeping; version 3 the
/// `vm_metadata` table; version 4 `job_runs`; version 5 `condemned`;
/// version 6 `copy_map`. Each only added tables.
const SCHEMA_VERSION: i64 = 6;

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
CREATE TABLE IF NOT EXISTS quarantine(
    id BLOB PRIMARY KEY,
    pack TEXT NOT NULL,
    offset INTEGER NOT NULL,
    reason TEXT NOT NULL,
    noticed TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS forgetting(
    id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS lost_restore_points(
    id TEXT PRIMARY KEY,
    disk TEXT NOT NULL,
    manifest TEXT NOT NULL,
    noticed TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vm_metadata(
    id TEXT PRIMARY KEY,
    vm_uuid TEXT NOT NULL,
    time_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS vm_metadata_by_vm ON vm_metadata(vm_uuid, time_ms);
";

/// Every table: a new catalogue gets them, an older one the missing ones.
const TABLES: [&str; 4] = [
    SCHEMA,
    job_runs::SCHEMA,
    condemned::SCHEMA,
    copy_map::SCHEMA,
];

/// A quarantined blob.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct QuarantinedBlob {
    pub id: BlobId,
    /// The pack that held the damaged copy.
    pub pack: String,
    pub offset: u64,
    /// What was wrong with it.
    pub reason: String,
    /// When it was found (RFC 3339).
    pub noticed: String,
}

/// A restore point whose manifest vanished without `forget`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LostRestorePoint {
    pub id: String,
    pub disk: String,
    /// The manifest as the catalogue knew it (JSON).
    pub manifest: String,
    pub noticed: String,
}

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
/// already indexed elsewhere keeps its first location, unless that is a
/// condemned pack and this one is not.
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
        "INSERT INTO blobs(id, pack, offset, stored_len, raw_len, kind, compression)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT(id) DO UPDATE SET pack = excluded.pack, offset = excluded.offset,
             stored_len = excluded.stored_len, raw_len = excluded.raw_len,
             kind = excluded.kind, compression = excluded.compression
         WHERE blobs.pack IN (SELECT p.id FROM packs p JOIN condemned c ON c.pack = p.name)
           AND excluded.pack NOT IN (SELECT p.id FROM packs p JOIN condemned c ON c.pack = p.name)"
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

/// Blobs stored again leave quarantine: the damage is healed.
fn unquarantine(tx: &rusqlite::Transaction<'_>, entries: &[PackEntry]) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached("DELETE FROM quarantine WHERE id = ?1")?;
    for e in entries {
        if stmt.execute([&e.id.0[..]])? > 0 {
            tracing::info!(blob = %e.id, "quarantined blob stored again: healed");
        }
    }
    Ok(())
}

/// A connection to the catalogue.
pub struct Catalogue {
    conn: Connection,
    path: PathBuf,
    crypto: std::sync::Arc<crate::crypto::Crypto>, // ids to check rows against (keyed.rs)
}

impl std::fmt::Debug for Catalogue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Catalogue({})", self.path.display())
    }
}

impl Catalogue {
    /// Opens (and with `create`, creates) the catalogue at `path`,
    /// migrating an older schema.
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
        if create && !path.exists() {
            // SQLite gives its WAL and shared-memory files the database
            // file's mode: owner-only from the start, whatever the umask.
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(Error::io(path))?;
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
            crypto: std::sync::Arc::new(crate::crypto::Crypto::Plain),
        };
        if create {
            cat.conn.execute_batch(&TABLES.concat()).map_err(wrap)?;
            cat.conn
                .pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(wrap)?;
        } else {
            let version: i64 = cat
                .conn
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .map_err(wrap)?;
            if (1..SCHEMA_VERSION).contains(&version) {
                // Later versions only added tables.
                cat.conn.execute_batch(&TABLES.concat()).map_err(wrap)?;
                cat.conn
                    .pragma_update(None, "user_version", SCHEMA_VERSION)
                    .map_err(wrap)?;
            } else if version != SCHEMA_VERSION {
                return Err(Error::UnsupportedVersion {
                    found: u32::try_from(version).unwrap_or(u32::MAX),
                    supported: SCHEMA_VERSION as u32,
                });
            }
        }
        Ok(cat)
    }

    /// Every row `sql` yields for `params`, mapped by `row`.
    fn query_all<T>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(self.err())?;
        let rows = stmt.query_map(params, row).map_err(self.err())?;
        rows.collect::<rusqlite::Result<_>>().map_err(self.err())
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

    /// Records a durable pack and its blobs. A blob already indexed in
    /// another pack keeps its first location.
    pub fn insert_pack(&mut self, name: &str, size: u64, entries: &[PackEntry]) -> Result<()> {
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(|source| Error::Catalogue {
            path: path.clone(),
            source,
        })?;
        index_pack(&tx, name, size, entries, false)
            .and_then(|()| unquarantine(&tx, entries))
            .and_then(|()| tx.commit())
            .map_err(|source| Error::Catalogue { path, source })
    }

    /// Takes blob `id` out of use after it was found damaged in `pack`:
    /// its index row goes (so the next backup that meets the content stores
    /// it again) and the finding is recorded. Only the location that was
    /// read is quarantined: a blob that moved meanwhile (gc, a healing
    /// backup) keeps its new, good location.
    pub fn quarantine(&self, id: &BlobId, pack: &str, offset: u64, reason: &str) -> Result<()> {
        let path = self.path.clone();
        let err = |source| Error::Catalogue {
            path: path.clone(),
            source,
        };
        let tx = self.conn.unchecked_transaction().map_err(err)?;
        let removed = tx
            .execute(
                "DELETE FROM blobs WHERE id = ?1 AND offset = ?3
                 AND pack = (SELECT id FROM packs WHERE name = ?2)",
                params![&id.0[..], pack, offset],
            )
            .map_err(err)?;
        if removed > 0 {
            tx.execute(
                "INSERT OR REPLACE INTO quarantine(id, pack, offset, reason, noticed)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    &id.0[..],
                    pack,
                    offset,
                    reason,
                    jiff::Timestamp::now().to_string()
                ],
            )
            .map_err(err)?;
            tracing::warn!(blob = %id, pack, offset, reason, "damaged blob quarantined");
        }
        tx.commit().map_err(err)
    }

    /// Quarantines every blob the catalogue places in `pack` (a pack file
    /// that is gone), and forgets the pack.
    pub fn quarantine_pack(&self, pack: &str, reason: &str) -> Result<usize> {
        let entries = self.blobs_in_pack(pack)?;
        for e in &entries {
            self.quarantine(&e.id, pack, e.offset, reason)?;
        }
        self.conn
            .execute("DELETE FROM packs WHERE name = ?1", [pack])
            .map_err(self.err())?;
        Ok(entries.len())
    }

    /// Records a quarantined blob that has no index row (repair).
    pub fn quarantine_record(
        &self,
        id: &BlobId,
        pack: &str,
        offset: u64,
        reason: &str,
    ) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO quarantine(id, pack, offset, reason, noticed)
                 SELECT ?1, ?2, ?3, ?4, ?5 WHERE NOT EXISTS (SELECT 1 FROM blobs WHERE id = ?1)",
                params![
                    &id.0[..],
                    pack,
                    offset,
                    reason,
                    jiff::Timestamp::now().to_string()
                ],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// Copies the runs, and the quarantine of blobs still not indexed,
    /// from the catalogue at `old` (repair).
    pub fn copy_history_from(&self, old: &Path) -> Result<()> {
        let old = old.to_string_lossy();
        self.conn
            .execute("ATTACH DATABASE ?1 AS old", [old.as_ref()])
            .map_err(self.err())?;
        let copied = self.conn.execute_batch(
            "INSERT INTO runs(kind, disk, pid, started, finished, status, restore_point, detail)
               SELECT kind, disk, pid, started, finished, status, restore_point, detail
               FROM old.runs ORDER BY id;
             INSERT OR IGNORE INTO quarantine(id, pack, offset, reason, noticed)
               SELECT id, pack, offset, reason, noticed FROM old.quarantine
               WHERE id NOT IN (SELECT id FROM blobs);",
        );
        let detached = self.conn.execute_batch("DETACH DATABASE old");
        copied.and(detached).map_err(self.err())
    }

    /// Restore point ids with the manifest text the catalogue keeps.
    pub fn restore_point_rows_raw(&self) -> Result<Vec<(String, String)>> {
        let rows = self.query_all("SELECT id, manifest FROM restore_points", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
        Ok(rows)
    }

    /// Blobs in quarantine.
    pub fn quarantined(&self) -> Result<Vec<QuarantinedBlob>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, pack, offset, reason, noticed FROM quarantine ORDER BY noticed, id",
            )
            .map_err(self.err())?;
        let rows: Vec<(Vec<u8>, String, u64, String, String)> = stmt
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .map_err(self.err())?
            .collect::<rusqlite::Result<_>>()
            .map_err(self.err())?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, pack, offset, reason, noticed)| {
                Some(QuarantinedBlob {
                    id: BlobId::try_from(id.as_slice()).ok()?,
                    pack,
                    offset,
                    reason,
                    noticed,
                })
            })
            .collect())
    }

    /// Why blob `id` is quarantined, if it is (and not stored again since).
    pub fn quarantined_reason(&self, id: &BlobId) -> Result<Option<String>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT reason FROM quarantine WHERE id = ?1")
            .map_err(self.err())?;
        stmt.query_row([&id.0[..]], |r| r.get(0))
            .optional()
            .map_err(self.err())
    }

    /// Ids of the quarantined blobs.
    pub fn quarantined_ids(&self) -> Result<std::collections::HashSet<BlobId>> {
        Ok(self.quarantined()?.into_iter().map(|q| q.id).collect())
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
            unquarantine(&tx, entries).map_err(err)?;
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
        let json = serde_json::to_string(manifest).map_err(|e| Error::Manifest {
            name: id.to_string(),
            what: e.to_string(),
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

    /// Drops a restore point's row (and any forget mark).
    pub fn remove_restore_point(&self, id: &str) -> Result<()> {
        self.conn
            .execute_batch("BEGIN")
            .and_then(|()| {
                self.conn
                    .execute("DELETE FROM restore_points WHERE id = ?1", [id])?;
                self.conn
                    .execute("DELETE FROM forgetting WHERE id = ?1", [id])?;
                self.conn.execute_batch("COMMIT")
            })
            .map_err(self.err())
    }

    /// Notes that `id`'s manifest is about to be removed on purpose.
    pub fn mark_forgetting(&self, id: &str) -> Result<()> {
        self.conn
            .execute("INSERT OR IGNORE INTO forgetting(id) VALUES (?1)", [id])
            .map_err(self.err())?;
        Ok(())
    }

    /// Clears a forget mark whose forget never happened.
    pub fn remove_forget_mark(&self, id: &str) -> Result<()> {
        self.conn
            .execute("DELETE FROM forgetting WHERE id = ?1", [id])
            .map_err(self.err())?;
        Ok(())
    }

    /// Restore points marked by [`Catalogue::mark_forgetting`].
    pub fn forgetting(&self) -> Result<Vec<String>> {
        let ids = self.query_all("SELECT id FROM forgetting", [], |r| r.get(0))?;
        Ok(ids)
    }

    /// Moves restore point `id`, whose manifest vanished without forget,
    /// out of the list into `lost_restore_points`.
    pub fn mark_lost(&mut self, id: &str) -> Result<()> {
        let path = self.path.clone();
        let err = |source| Error::Catalogue {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        tx.execute(
            "INSERT OR REPLACE INTO lost_restore_points(id, disk, manifest, noticed)
             SELECT r.id, d.name, r.manifest, ?2 FROM restore_points r
             JOIN disks d ON d.id = r.disk_id WHERE r.id = ?1",
            params![id, jiff::Timestamp::now().to_string()],
        )
        .map_err(err)?;
        tx.execute("DELETE FROM restore_points WHERE id = ?1", [id])
            .map_err(err)?;
        tx.commit().map_err(err)
    }

    /// Restore points whose manifest vanished without forget.
    pub fn lost_restore_points(&self) -> Result<Vec<LostRestorePoint>> {
        let rows = self.query_all(
            "SELECT id, disk, manifest, noticed FROM lost_restore_points ORDER BY id",
            [],
            |r| {
                Ok(LostRestorePoint {
                    id: r.get(0)?,
                    disk: r.get(1)?,
                    manifest: r.get(2)?,
                    noticed: r.get(3)?,
                })
            },
        )?;
        Ok(rows)
    }

    /// Drops a lost restore point's record (it was restored or given up).
    pub fn clear_lost(&self, id: &str) -> Result<()> {
        self.conn
            .execute("DELETE FROM lost_restore_points WHERE id = ?1", [id])
            .map_err(self.err())?;
        Ok(())
    }

    /// Indexes saved VM metadata (see `Repository::save_vm_metadata`).
    pub fn insert_vm_metadata(
        &mut self,
        id: &str,
        vm_uuid: &str,
        time: jiff::Timestamp,
    ) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO vm_metadata(id, vm_uuid, time_ms) VALUES (?1, ?2, ?3)",
                params![id, vm_uuid, time.as_millisecond()],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// Forgets the row of VM metadata `id` (gc removed its file).
    pub fn remove_vm_metadata(&self, id: &str) -> Result<()> {
        self.conn
            .execute("DELETE FROM vm_metadata WHERE id = ?1", params![id])
            .map_err(self.err())?;
        Ok(())
    }

    /// Saved VM metadata of `vm_uuid` (of every VM when `None`), oldest
    /// first.
    pub fn vm_metadata_rows(&self, vm_uuid: Option<&str>) -> Result<Vec<crate::VmMetadataRow>> {
        let rows: Vec<(String, String, i64)> = self.query_all(
            "SELECT id, vm_uuid, time_ms FROM vm_metadata
             WHERE ?1 IS NULL OR vm_uuid = ?1 ORDER BY time_ms, id",
            [vm_uuid],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        rows.into_iter()
            .map(|(id, vm_uuid, ms)| {
                let time =
                    jiff::Timestamp::from_millisecond(ms).map_err(|e| Error::DamagedCatalogue {
                        path: self.path.clone(),
                        what: format!("the row of VM metadata {id:?}: time {ms}: {e}"),
                    })?;
                Ok(crate::VmMetadataRow { id, vm_uuid, time })
            })
            .collect()
    }

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
                // A damaged catalogue must not hand out a wrong id or
                // manifest: the row must be exactly the manifest whose hash
                // is its id.
                let manifest = Manifest::from_json(json.as_bytes())
                    .and_then(|m| match crate::manifest::id_of(&m, &self.crypto) {
                        Ok(of) if of != id => Err("it does not match its id".into()),
                        _ => Ok(m),
                    })
                    .map_err(|what| Error::DamagedCatalogue {
                        path: self.path.clone(),
                        what: format!("the row of restore point {id:?}: {what}"),
                    })?;
                Ok(RestorePointRow { id, manifest })
            })
            .collect()
    }

    /// Ids of all restore points.
    pub fn restore_point_ids(&self) -> Result<Vec<String>> {
        let ids = self.query_all("SELECT id FROM restore_points", [], |r| r.get(0))?;
        Ok(ids)
    }

    /// Ids starting with `prefix`.
    pub fn match_prefix(&self, prefix: &str) -> Result<Vec<String>> {
        let ids = self.query_all(
            "SELECT id FROM restore_points WHERE substr(id, 1, length(?1)) = ?1",
            [prefix],
            |r| r.get(0),
        )?;
        Ok(ids)
    }

    /// Disk names.
    pub fn disks(&self) -> Result<Vec<String>> {
        let names = self.query_all("SELECT name FROM disks ORDER BY name", [], |r| r.get(0))?;
        Ok(names)
    }
}

impl Catalogue {
    /// SQLite's own structural check of the catalogue file (`PRAGMA
    /// quick_check`): the problems it finds, none when it is sound.
    pub fn quick_check(&self) -> Result<Vec<String>> {
        let lines: Vec<String> = self.query_all("PRAGMA quick_check(20)", [], |r| r.get(0))?;
        Ok(lines.into_iter().filter(|l| l != "ok").collect())
    }

    /// Moves the WAL's content into the database file and empties the WAL.
    pub fn checkpoint(&self) -> Result<()> {
        self.conn
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE); PRAGMA journal_mode=DELETE;")
            .map_err(self.err())
    }
}
