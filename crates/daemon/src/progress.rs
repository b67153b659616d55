//! What a running job's disks are doing, for `/status`: the runner's
//! observer, kept per job while it runs.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cbtvault_engine::{Progress, ProgressFactory};
use cbtvault_runner::Observer;
use serde_json::{Value, json};

/// One disk's current phase.
#[derive(Debug)]
struct DiskProgress {
    phase: Mutex<(String, Instant)>,
    total: AtomicU64,
    done: AtomicU64,
    finished: AtomicBool,
}

impl Progress for DiskProgress {
    fn start(&self, phase: &str, total: u64) {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = (phase.to_string(), Instant::now());
        self.total.store(total, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
        self.finished.store(false, Ordering::Relaxed);
    }

    fn advance(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }

    fn finish(&self) {
        self.finished.store(true, Ordering::Relaxed);
    }
}

/// A job run's disks.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    disks: Mutex<BTreeMap<String, Arc<DiskProgress>>>,
}

impl ProgressFactory for Tracker {
    fn disk(&self, disk: &str) -> Arc<dyn Progress> {
        let p = Arc::new(DiskProgress {
            phase: Mutex::new((String::new(), Instant::now())),
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            finished: AtomicBool::new(false),
        });
        self.disks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(disk.to_string(), p.clone());
        p
    }
}

impl Observer for Tracker {}

impl Tracker {
    /// The disks in a phase now: `[{disk, phase, done_bytes, total_bytes,
    /// eta_seconds}]` (the ETA from the phase's rate so far; null until
    /// something is done).
    pub(crate) fn running(&self) -> Vec<Value> {
        let disks = self.disks.lock().unwrap_or_else(|p| p.into_inner());
        disks
            .iter()
            .filter(|(_, p)| !p.finished.load(Ordering::Relaxed))
            .map(|(disk, p)| {
                let (phase, since) = p.phase.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let total = p.total.load(Ordering::Relaxed);
                let done = p.done.load(Ordering::Relaxed).min(total);
                let elapsed = since.elapsed().as_secs_f64();
                let eta = (done > 0 && elapsed > 0.0)
                    .then(|| (total - done) as f64 / (done as f64 / elapsed))
                    .map(|s| s.round() as u64);
                json!({
                    "disk": disk,
                    "phase": phase,
                    "done_bytes": done,
                    "total_bytes": total,
                    "eta_seconds": eta,
                })
            })
            .collect()
    }
}
