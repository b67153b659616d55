//! How many disks run at once: per job, per pool or host, and overall.
//!
//! Each limit is an engine [`Limit`]; a disk's read holds permits of the
//! job's, its place's and the process's, taken in that order (the engine's
//! [`Slots`]) so that no two reads wait on each other crosswise. A pool's
//! limit counts NBD connections (xapi-nbd allows 16 per host); the others
//! count disks. A job also starts no more captures (snapshots) than it may
//! read at once, so a long queue never holds snapshots that wait.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cbtvault_engine::{Limit, Slots};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Limits shared by every job a process runs.
#[derive(Debug)]
pub struct Limits {
    overall: Limit,
    /// Per pool (`pool:NAME`) or QEMU host (`qemu:NAME`), made on first use.
    places: Mutex<HashMap<String, Limit>>,
}

/// How a place's limit counts.
pub(crate) enum PlaceLimit {
    /// NBD connections (a XenServer pool).
    Connections(usize),
    /// Disks (a QEMU host).
    Disks(usize),
}

impl Limits {
    /// At most `disks` disks at once, all jobs together.
    pub fn new(disks: usize) -> Limits {
        Limits {
            overall: Limit::disks(disks),
            places: Mutex::new(HashMap::new()),
        }
    }

    /// The limit of place `key`, as `limit` says the first time it is asked
    /// for.
    fn place(&self, key: &str, limit: PlaceLimit) -> Limit {
        let mut places = self.places.lock().unwrap_or_else(|e| e.into_inner());
        places
            .entry(key.to_string())
            .or_insert_with(|| match limit {
                PlaceLimit::Connections(n) => Limit::new(n),
                PlaceLimit::Disks(n) => Limit::disks(n),
            })
            .clone()
    }
}

/// One job run's limits.
#[derive(Clone, Debug)]
pub(crate) struct JobLimits {
    /// Captures started and not yet finished.
    captures: Arc<Semaphore>,
    /// What each disk's read holds.
    pub(crate) slots: Slots,
}

impl JobLimits {
    /// `parallel` disks of the job at once, at `place`.
    pub(crate) fn new(limits: &Limits, parallel: usize, place: (&str, PlaceLimit)) -> JobLimits {
        let parallel = parallel.max(1);
        JobLimits {
            captures: Arc::new(Semaphore::new(parallel)),
            slots: Slots(vec![
                Limit::disks(parallel),
                limits.place(place.0, place.1),
                limits.overall.clone(),
            ]),
        }
    }

    /// Waits until the job may start one more capture. (The semaphore is
    /// never closed; if it were, there would be no limit: `None`.)
    pub(crate) async fn start_capture(&self) -> Option<OwnedSemaphorePermit> {
        self.captures.clone().acquire_owned().await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::sync::CancellationToken;

    #[tokio::test]
    async fn a_disk_waits_while_its_pool_has_no_connection_free() {
        let limits = Limits::new(8);
        // Two jobs on one pool of 4 connections; each disk opens 2.
        let a = JobLimits::new(&limits, 4, ("pool:p", PlaceLimit::Connections(4)));
        let b = JobLimits::new(&limits, 4, ("pool:p", PlaceLimit::Connections(4)));
        let cancel = CancellationToken::new();
        let first = a.slots.acquire(2, &cancel).await.unwrap();
        let _second = b.slots.acquire(2, &cancel).await.unwrap();
        let third = b.slots.acquire(2, &cancel);
        tokio::pin!(third);
        assert!(
            futures::poll!(&mut third).is_pending(),
            "no connection is free"
        );
        drop(first);
        third.await.unwrap();
    }

    #[tokio::test]
    async fn the_overall_limit_counts_disks_across_jobs_and_a_job_its_own() {
        let limits = Limits::new(2);
        let cancel = CancellationToken::new();
        let a = JobLimits::new(&limits, 1, ("qemu:h", PlaceLimit::Disks(4)));
        let b = JobLimits::new(&limits, 4, ("qemu:g", PlaceLimit::Disks(4)));
        let _a1 = a.slots.acquire(1, &cancel).await.unwrap();
        // Job a is full at one disk...
        let a2 = a.slots.acquire(1, &cancel);
        tokio::pin!(a2);
        assert!(futures::poll!(&mut a2).is_pending());
        // ...job b takes the last disk overall...
        let _b1 = b.slots.acquire(1, &cancel).await.unwrap();
        let b2 = b.slots.acquire(1, &cancel);
        tokio::pin!(b2);
        assert!(futures::poll!(&mut b2).is_pending());
        // ...and a cancelled wait ends at once.
        cancel.cancel();
        assert!(b2.await.is_err());
    }

    #[tokio::test]
    async fn a_job_starts_no_more_captures_than_it_reads_at_once() {
        let limits = Limits::new(8);
        let job = JobLimits::new(&limits, 2, ("pool:p", PlaceLimit::Connections(16)));
        let _one = job.start_capture().await;
        let two = job.start_capture().await;
        let three = job.start_capture();
        tokio::pin!(three);
        assert!(futures::poll!(&mut three).is_pending());
        drop(two);
        let _three = three.await;
    }
}
