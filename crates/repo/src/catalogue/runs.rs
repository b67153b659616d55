//! The `runs` table: what each backup (and each noted hypervisor step of
//! earlier versions) did, when, and how it ended.

use rusqlite::params;

use super::Catalogue;
use crate::error::Result;

/// One run as the `runs` table records it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RunRow {
    pub id: i64,
    pub kind: String,
    pub disk: String,
    pub status: String,
    pub restore_point: String,
    pub detail: String,
    pub started: String,
    pub finished: String,
}

impl Catalogue {
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
        let rows = self.query_all("SELECT id, coalesce(detail, '') FROM runs WHERE kind = ?1 AND disk = ?2 AND finished IS NULL", [kind, disk], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows)
    }

    /// Closes runs of `kind` on `disk` still marked running: the caller
    /// holds the disk's lock, so their process is gone. Their detail text
    /// stays for the reapers ([`Catalogue::unfinished_runs`] is a different
    /// kind of run). Returns how many were closed.
    pub fn close_stale_runs(&self, kind: &str, disk: &str) -> Result<usize> {
        self.conn
            .execute(
                "UPDATE runs SET finished = ?3, status = 'interrupted'
                 WHERE kind = ?1 AND disk = ?2 AND finished IS NULL",
                params![kind, disk, jiff::Timestamp::now().to_string()],
            )
            .map_err(self.err())
    }

    /// Disks with runs of `kind` still marked running.
    pub fn disks_with_running(&self, kind: &str) -> Result<Vec<String>> {
        let disks = self.query_all("SELECT DISTINCT disk FROM runs WHERE kind = ?1 AND finished IS NULL AND disk IS NOT NULL", [kind], |r| r.get(0))?;
        Ok(disks)
    }

    /// Runs as recorded, newest first (at most `limit`).
    pub fn runs(&self, limit: usize) -> Result<Vec<RunRow>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, kind, coalesce(disk, ''), status, coalesce(restore_point, ''),
                        coalesce(detail, ''), started, coalesce(finished, '')
                 FROM runs ORDER BY id DESC LIMIT ?1",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map([limit as i64], |r| {
                Ok(RunRow {
                    id: r.get(0)?,
                    kind: r.get(1)?,
                    disk: r.get(2)?,
                    status: r.get(3)?,
                    restore_point: r.get(4)?,
                    detail: r.get(5)?,
                    started: r.get(6)?,
                    finished: r.get(7)?,
                })
            })
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
