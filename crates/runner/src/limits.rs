//! How many disks run at once: per job, per pool or host, and overall.
//!
//! Each limit is a semaphore. A disk holds permits of all three while its
//! source is read, taken in one order (job, place, overall) so that no two
//! disks wait on each other. A pool's limit counts NBD connections
//! (xapi-nbd allows 16 per host); a QEMU host's counts disks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Limits shared by every job a process runs.
#[derive(Debug)]
pub struct Limits {
    overall: Arc<Semaphore>,
    overall_size: usize,
    /// Per pool or QEMU host, by its name, created on first use.
    places: Mutex<HashMap<String, (Arc<Semaphore>, usize)>>,
}

impl Limits {
    /// At most `disks` disks at once, all jobs together.
    pub fn new(disks: usize) -> Limits {
        let disks = disks.max(1);
        Limits {
            overall: Arc::new(Semaphore::new(disks)),
            overall_size: disks,
            places: Mutex::new(HashMap::new()),
        }
    }

    /// The semaphore of place `key` (`pool:NAME`, `qemu:NAME`), of `size`
    /// permits the first time it is asked for.
    pub(crate) fn place(&self, key: &str, size: usize) -> (Arc<Semaphore>, usize) {
        let mut places = self.places.lock().unwrap_or_else(|e| e.into_inner());
        places
            .entry(key.to_string())
            .or_insert_with(|| (Arc::new(Semaphore::new(size.max(1))), size.max(1)))
            .clone()
    }
}

/// The semaphores one job's disks take permits of, in order.
#[derive(Clone, Debug)]
pub(crate) struct JobLimits {
    /// (semaphore, its size, permits per disk)
    order: Vec<(Arc<Semaphore>, usize, usize)>,
}

/// Permits held while a disk (or the disks of one VM snapshot) is read.
#[derive(Debug)]
pub(crate) struct Held {
    _permits: Vec<OwnedSemaphorePermit>,
}

impl JobLimits {
    /// `parallel` disks of the job at once, `per_disk` units of the place's
    /// limit for each disk.
    pub(crate) fn new(
        limits: &Limits,
        parallel: usize,
        place: (&str, usize),
        per_disk: usize,
    ) -> JobLimits {
        let parallel = parallel.max(1);
        let (place_sem, place_size) = limits.place(place.0, place.1);
        JobLimits {
            order: vec![
                (Arc::new(Semaphore::new(parallel)), parallel, 1),
                (place_sem, place_size, per_disk.max(1)),
                (limits.overall.clone(), limits.overall_size, 1),
            ],
        }
    }

    /// Waits for room for `disks` disks at once (capped by each limit, so a
    /// VM with more disks than a limit still runs, as many at a time as fit).
    pub(crate) async fn acquire(&self, disks: usize) -> Held {
        let mut permits = Vec::with_capacity(self.order.len());
        for (sem, size, per_disk) in &self.order {
            let wanted = (disks.max(1) * per_disk).min(*size);
            // The semaphores are never closed.
            if let Ok(p) = sem.clone().acquire_many_owned(wanted as u32).await {
                permits.push(p);
            }
        }
        Held { _permits: permits }
    }

    /// How many disks of one capture may read at once within the limits.
    pub(crate) fn disks_at_once(&self) -> usize {
        self.order
            .iter()
            .map(|(_, size, per_disk)| (size / per_disk).max(1))
            .min()
            .unwrap_or(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_disk_waits_while_the_place_is_full_and_runs_when_it_frees() {
        let limits = Limits::new(8);
        // Two jobs on one pool of 4 connections, 2 per disk.
        let a = JobLimits::new(&limits, 4, ("pool:p", 4), 2);
        let b = JobLimits::new(&limits, 4, ("pool:p", 4), 2);
        let first = a.acquire(1).await;
        let second = b.acquire(1).await;
        let third = b.acquire(1);
        tokio::pin!(third);
        assert!(
            futures::poll!(&mut third).is_pending(),
            "a third disk fits no connections"
        );
        drop(first);
        let _third = third.await;
        drop(second);
    }

    #[tokio::test]
    async fn a_capture_larger_than_a_limit_takes_the_whole_limit_instead_of_waiting_forever() {
        let limits = Limits::new(2);
        let job = JobLimits::new(&limits, 8, ("qemu:h", 3), 1);
        assert_eq!(job.disks_at_once(), 2, "the overall limit is the tightest");
        let _all = job.acquire(10).await;
        let other = JobLimits::new(&limits, 8, ("qemu:h", 3), 1);
        let waiting = other.acquire(1);
        tokio::pin!(waiting);
        assert!(futures::poll!(&mut waiting).is_pending());
    }
}
