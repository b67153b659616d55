//! The `job_runs` table: the daemon's run history, one row per job run
//! (schema 4). `cbtvault runs` lists it, `cbtvault status` shows each
//! job's last outcome, and the daemon's `catch_up` asks when a job last
//! started.

use rusqlite::params;

use super::Catalogue;
use crate::error::Result;

/// The table, created with the rest of the schema and on upgrade from
/// versions before 4.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS job_runs(
    id INTEGER PRIMARY KEY,
    job TEXT NOT NULL,
    started TEXT NOT NULL,
    finished TEXT NOT NULL,
    outcome TEXT NOT NULL,
    disks_ok INTEGER NOT NULL,
    disks_failed INTEGER NOT NULL,
    report TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS job_runs_by_job ON job_runs(job, id);
";

/// One job run as the history records it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct JobRunRow {
    /// Assigned on insert; ignored by [`Catalogue::record_job_run`].
    pub id: i64,
    pub job: String,
    /// RFC 3339, UTC.
    pub started: String,
    /// RFC 3339, UTC.
    pub finished: String,
    /// `ok`, `partial` (some disks failed), `failed` (no disk backed up,
    /// or the job could not start) or `cancelled`.
    pub outcome: String,
    pub disks_ok: u32,
    pub disks_failed: u32,
    /// The run's report, as JSON text.
    pub report: String,
}

const COLUMNS: &str = "id, job, started, finished, outcome, disks_ok, disks_failed, report";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRunRow> {
    Ok(JobRunRow {
        id: r.get(0)?,
        job: r.get(1)?,
        started: r.get(2)?,
        finished: r.get(3)?,
        outcome: r.get(4)?,
        disks_ok: r.get(5)?,
        disks_failed: r.get(6)?,
        report: r.get(7)?,
    })
}

impl Catalogue {
    /// Records a finished job run; returns its id.
    pub fn record_job_run(&self, run: &JobRunRow) -> Result<i64> {
        self.conn
            .execute(
                "INSERT INTO job_runs(job, started, finished, outcome, disks_ok, disks_failed, report)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    run.job,
                    run.started,
                    run.finished,
                    run.outcome,
                    run.disks_ok,
                    run.disks_failed,
                    run.report
                ],
            )
            .map_err(self.err())?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Job runs, newest first (at most `limit`), of `job` or of all jobs.
    pub fn job_runs(&self, job: Option<&str>, limit: usize) -> Result<Vec<JobRunRow>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        match job {
            Some(job) => self.query_all(
                &format!("SELECT {COLUMNS} FROM job_runs WHERE job = ?1 ORDER BY id DESC LIMIT ?2"),
                params![job, limit],
                row,
            ),
            None => self.query_all(
                &format!("SELECT {COLUMNS} FROM job_runs ORDER BY id DESC LIMIT ?1"),
                params![limit],
                row,
            ),
        }
    }

    /// The newest run of `job`.
    pub fn last_job_run(&self, job: &str) -> Result<Option<JobRunRow>> {
        Ok(self.job_runs(Some(job), 1)?.pop())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(job: &str, outcome: &str) -> JobRunRow {
        JobRunRow {
            id: 0,
            job: job.into(),
            started: "2026-11-29T01:30:00Z".into(),
            finished: "2026-11-29T01:31:00Z".into(),
            outcome: outcome.into(),
            disks_ok: 1,
            disks_failed: 0,
            report: "{}".into(),
        }
    }

    #[test]
    fn runs_are_kept_per_job_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalogue::open(&dir.path().join("c.sqlite"), true).unwrap();
        cat.record_job_run(&run("a", "ok")).unwrap();
        cat.record_job_run(&run("b", "failed")).unwrap();
        cat.record_job_run(&run("a", "partial")).unwrap();
        let a = cat.job_runs(Some("a"), 10).unwrap();
        assert_eq!(
            a.iter().map(|r| r.outcome.as_str()).collect::<Vec<_>>(),
            ["partial", "ok"]
        );
        assert_eq!(cat.job_runs(None, 10).unwrap().len(), 3);
        assert_eq!(cat.last_job_run("b").unwrap().unwrap().outcome, "failed");
        assert!(cat.last_job_run("c").unwrap().is_none());
    }

    /// A schema 3 catalogue (before the run history) gains the table in place.
    #[test]
    fn a_schema_3_catalogue_is_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sqlite");
        drop(Catalogue::open(&path, true).unwrap());
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("DROP TABLE job_runs; PRAGMA user_version = 3;")
            .unwrap();
        drop(conn);
        let cat = Catalogue::open(&path, false).unwrap();
        cat.record_job_run(&run("a", "ok")).unwrap();
        let version: i64 = cat
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, 6, "upgraded to the current schema");
    }
}
