//! `/metrics`: what runs did, in Prometheus' text format.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use cbtvault_runner::JobReport;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabel {
    job: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DiskLabel {
    job: String,
    disk: String,
}

/// The daemon's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    runs: Family<JobLabel, Counter>,
    failures: Family<JobLabel, Counter>,
    bytes_read: Family<JobLabel, Counter>,
    bytes_stored: Family<JobLabel, Counter>,
    blocks_changed: Family<JobLabel, Counter>,
    duration: Family<JobLabel, Gauge<f64, AtomicU64>>,
    last_success: Family<DiskLabel, Gauge>,
    repository_size: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            runs: Family::default(),
            failures: Family::default(),
            bytes_read: Family::default(),
            bytes_stored: Family::default(),
            blocks_changed: Family::default(),
            duration: Family::default(),
            last_success: Family::default(),
            repository_size: Gauge::default(),
        };
        if let Ok(mut r) = m.registry.lock() {
            r.register("cbtvault_job_runs", "Job runs finished", m.runs.clone());
            r.register(
                "cbtvault_job_failures",
                "Disks that failed (after their retries), and runs that could not start",
                m.failures.clone(),
            );
            r.register(
                "cbtvault_bytes_read",
                "Bytes read from the disks",
                m.bytes_read.clone(),
            );
            r.register(
                "cbtvault_bytes_stored",
                "Bytes newly stored in the repository (compressed)",
                m.bytes_stored.clone(),
            );
            r.register(
                "cbtvault_blocks_changed",
                "Blocks read because they changed (all of them on a full backup)",
                m.blocks_changed.clone(),
            );
            r.register(
                "cbtvault_job_last_duration_seconds",
                "How long the job's last run took",
                m.duration.clone(),
            );
            r.register(
                "cbtvault_disk_last_success_timestamp_seconds",
                "When the disk's newest restore point was committed (Unix time)",
                m.last_success.clone(),
            );
            r.register(
                "cbtvault_repository_size_bytes",
                "Bytes of packs in the repository",
                m.repository_size.clone(),
            );
        }
        m
    }
}

impl Metrics {
    /// Counts a finished run.
    pub fn record(&self, report: &JobReport) {
        let job = JobLabel {
            job: report.job.clone(),
        };
        self.runs.get_or_create(&job).inc();
        let secs = report.finished.duration_since(report.started).as_secs_f64();
        self.duration.get_or_create(&job).set(secs);
        for d in &report.disks {
            match &d.outcome {
                Ok(o) => {
                    let s = &o.manifest.stats;
                    self.bytes_read.get_or_create(&job).inc_by(s.bytes_read);
                    self.bytes_stored.get_or_create(&job).inc_by(s.bytes_stored);
                    self.blocks_changed
                        .get_or_create(&job)
                        .inc_by(s.blocks_read);
                    self.last_success
                        .get_or_create(&DiskLabel {
                            job: report.job.clone(),
                            disk: o.manifest.disk.clone(),
                        })
                        .set(report.finished.as_second());
                }
                Err(_) => {
                    self.failures.get_or_create(&job).inc();
                }
            }
        }
    }

    /// Counts a run that could not start.
    pub fn record_failed_start(&self, job: &str) {
        let job = JobLabel { job: job.into() };
        self.runs.get_or_create(&job).inc();
        self.failures.get_or_create(&job).inc();
    }

    /// Counts a maintenance run (gc, verify); a verify that found damage
    /// is a failure.
    pub fn record_task(&self, name: &str, ok: bool) {
        let job = JobLabel { job: name.into() };
        self.runs.get_or_create(&job).inc();
        if !ok {
            self.failures.get_or_create(&job).inc();
        }
    }

    pub fn set_repository_size(&self, bytes: u64) {
        self.repository_size
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// The text a scrape gets.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Ok(r) = self.registry.lock() {
            // Writing into a String cannot fail.
            let _ = prometheus_client::encoding::text::encode(&mut text, &r);
        }
        text
    }
}
