//! The provider lifecycle driven by `drive`, with a provider that serves
//! its disks from cbtvault's own NBD server on a unix socket and can be
//! made to fail at each step: whatever fails, finish aborts the disks that
//! were not committed and checked, and the disks' locks are free after.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cbtvault_engine::nbd::NbdSource;
use cbtvault_engine::{
    BackupOptions, Changes, DriveContext, Error, Limit, NoProgress, PreparedDisk, Progress,
    ProgressFactory, Provider, Result, Slots, drive, lock_disk,
};
use cbtvault_nbd::ConnectOptions;
use cbtvault_nbd::server::{MemoryExport, Server, ServerConfig};
use cbtvault_repo::{InitOptions, Repository, RestorePointRow};
use tokio_util::sync::CancellationToken;

const SIZE: usize = 8 * 65536;

fn image(seed: u8) -> Vec<u8> {
    (0..SIZE)
        .map(|i| ((i / 7) as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Where the fake provider fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fail {
    Nowhere,
    Prepare,
    /// Opening this disk for the read.
    Open(usize),
    /// The check finds other data than was read (the view changed).
    Check(usize),
    /// The commit step of this disk.
    Commit(usize),
}

struct Fake {
    socket: PathBuf,
    disks: Vec<String>,
    fail: Fail,
    /// What finish was told, per disk: committed or aborted.
    finished: Arc<Mutex<Vec<(String, bool)>>>,
    /// How often each view was opened.
    opened: Mutex<BTreeMap<String, usize>>,
}

struct View {
    index: usize,
    disk: String,
}

impl Provider for Fake {
    type View = View;

    fn label(&self) -> String {
        "fake capture".into()
    }

    async fn prepare(&mut self, repo: &Arc<Repository>) -> Result<Vec<PreparedDisk<View>>> {
        let mut out = Vec::new();
        for (index, disk) in self.disks.iter().enumerate() {
            let locks = lock_disk(repo, disk).await?;
            if self.fail == Fail::Prepare && index == self.disks.len() - 1 {
                return Err(Error::Source {
                    disk: disk.clone(),
                    what: "the hypervisor refused the snapshot".into(),
                    source: None,
                });
            }
            out.push(PreparedDisk {
                disk: disk.clone(),
                id: format!("id-{index}"),
                locks,
                changes: Changes::Full {
                    reason: Some("first backup of this disk".into()),
                },
                time: jiff::Timestamp::now(),
                connections: 2,
                vm: None,
                resume: None,
                suspend_as: None,
                view: View {
                    index,
                    disk: disk.clone(),
                },
            });
        }
        Ok(out)
    }

    async fn open(&self, view: &View) -> Result<NbdSource> {
        let n = {
            let mut opened = self.opened.lock().unwrap();
            let n = opened.entry(view.disk.clone()).or_default();
            *n += 1;
            *n
        };
        if self.fail == Fail::Open(view.index) {
            return Err(Error::Source {
                disk: view.disk.clone(),
                what: "no NBD host accepted the connection".into(),
                source: None,
            });
        }
        // The second open is the check; a changed view serves other data.
        let export = if n > 1 && self.fail == Fail::Check(view.index) {
            "changed".to_string()
        } else {
            format!("disk{}", view.index)
        };
        NbdSource::connect(
            ConnectOptions::unix(self.socket.clone(), export),
            view.disk.clone(),
        )
        .await
    }

    async fn finish(&mut self, outcomes: Vec<(View, Option<RestorePointRow>)>) -> Vec<Result<()>> {
        let mut out = Vec::new();
        for (view, committed) in outcomes {
            self.finished
                .lock()
                .unwrap()
                .push((view.disk.clone(), committed.is_some()));
            out.push(
                if committed.is_some() && self.fail == Fail::Commit(view.index) {
                    Err(Error::Source {
                        disk: view.disk,
                        what: "VDI.data_destroy of the new snapshot".into(),
                        source: None,
                    })
                } else {
                    Ok(())
                },
            );
        }
        out
    }
}

struct PerDisk(Mutex<Vec<String>>);

impl ProgressFactory for PerDisk {
    fn disk(&self, disk: &str) -> Arc<dyn Progress> {
        self.0.lock().unwrap().push(disk.to_string());
        Arc::new(NoProgress)
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    repo: Arc<Repository>,
    socket: PathBuf,
    stop: CancellationToken,
}

async fn setup(disks: usize) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::init(&dir.path().join("repo"), &InitOptions::default()).unwrap();
    let server = Server::new(ServerConfig::default());
    for i in 0..disks {
        server.add_export(
            format!("disk{i}"),
            Arc::new(MemoryExport::new(image(i as u8))),
        );
    }
    server.add_export("changed", Arc::new(MemoryExport::new(image(200))));
    let socket = dir.path().join("nbd.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move { server.serve_unix(listener, token).await });
    Setup {
        _dir: dir,
        repo: Arc::new(repo),
        socket,
        stop,
    }
}

fn fake(s: &Setup, disks: usize, fail: Fail) -> Fake {
    Fake {
        socket: s.socket.clone(),
        disks: (0..disks).map(|i| format!("d{i}")).collect(),
        fail,
        finished: Arc::default(),
        opened: Mutex::default(),
    }
}

fn context(parallel: usize) -> DriveContext {
    let backup = BackupOptions {
        workers: 1,
        ..Default::default()
    };
    let mut ctx = DriveContext::new(
        backup,
        Arc::new(PerDisk(Mutex::default())),
        CancellationToken::new(),
    );
    ctx.parallel = parallel;
    ctx.verify_samples = 4;
    ctx
}

/// Runs `drive` with a bound, so a hang fails the test instead of CI.
async fn run(p: &mut Fake, s: &Setup, ctx: &DriveContext) -> Result<Vec<cbtvault_engine::DiskRun>> {
    tokio::time::timeout(Duration::from_secs(60), drive(p, s.repo.clone(), ctx))
        .await
        .expect("drive finished within a minute")
}

/// Every disk's lock can be taken again: drive let go of all of them.
async fn assert_unlocked(s: &Setup, p: &Fake) {
    for d in &p.disks {
        lock_disk(&s.repo, d)
            .await
            .unwrap_or_else(|e| panic!("disk {d} is still locked: {e}"));
    }
}

fn finished(p: &Fake) -> Vec<(String, bool)> {
    let mut f = p.finished.lock().unwrap().clone();
    f.sort();
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_disk_is_read_checked_and_committed() {
    let s = setup(3).await;
    let mut p = fake(&s, 3, Fail::Nowhere);
    let mut ctx = context(2);
    // Limits narrower than a disk's connections still let it run.
    ctx.slots = Slots(vec![Limit::new(1), Limit::new(16)]);
    let runs = run(&mut p, &s, &ctx).await.unwrap();
    assert_eq!(runs.len(), 3);
    for (i, r) in runs.iter().enumerate() {
        let outcome = r.outcome.as_ref().unwrap();
        assert_eq!(r.disk, format!("d{i}"));
        assert_eq!(r.full_reason.as_deref(), Some("first backup of this disk"));
        let latest = s.repo.latest(&r.disk).unwrap().unwrap();
        assert_eq!(latest.id, outcome.restore_point);
        assert_eq!(latest.manifest.virtual_size, SIZE as u64);
    }
    assert_eq!(
        finished(&p),
        vec![
            ("d0".into(), true),
            ("d1".into(), true),
            ("d2".into(), true)
        ]
    );
    // Read once, then opened again for the check.
    assert!(p.opened.lock().unwrap().values().all(|&n| n == 2));
    assert_eq!(ctx.slots.0[0].available(), 1);
    assert_unlocked(&s, &p).await;
    s.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_prepare_reads_nothing_and_leaves_no_lock() {
    let s = setup(2).await;
    let mut p = fake(&s, 2, Fail::Prepare);
    let err = run(&mut p, &s, &context(2)).await.unwrap_err();
    assert!(err.to_string().contains("refused the snapshot"), "{err}");
    assert!(finished(&p).is_empty());
    assert!(p.opened.lock().unwrap().is_empty());
    assert!(s.repo.latest("d0").unwrap().is_none());
    assert_unlocked(&s, &p).await;
    s.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_cannot_be_opened_is_aborted_and_the_others_commit() {
    let s = setup(2).await;
    let mut p = fake(&s, 2, Fail::Open(0));
    let runs = run(&mut p, &s, &context(2)).await.unwrap();
    let err = runs[0].outcome.as_ref().unwrap_err();
    assert!(err.to_string().contains("no NBD host"), "{err}");
    assert!(runs[1].outcome.is_ok());
    assert_eq!(
        finished(&p),
        vec![("d0".into(), false), ("d1".into(), true)]
    );
    assert!(s.repo.latest("d0").unwrap().is_none());
    assert!(s.repo.latest("d1").unwrap().is_some());
    assert_unlocked(&s, &p).await;
    s.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_that_finds_other_data_aborts_the_disk() {
    let s = setup(1).await;
    let mut p = fake(&s, 1, Fail::Check(0));
    let runs = run(&mut p, &s, &context(1)).await.unwrap();
    let err = runs[0].outcome.as_ref().unwrap_err();
    assert!(
        err.to_string()
            .contains("check before the irreversible step"),
        "{err}"
    );
    // The snapshot is kept (aborted, not committed on the hypervisor).
    assert_eq!(finished(&p), vec![("d0".into(), false)]);
    assert_unlocked(&s, &p).await;
    s.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_step_is_the_disks_failure() {
    let s = setup(2).await;
    let mut p = fake(&s, 2, Fail::Commit(1));
    let runs = run(&mut p, &s, &context(1)).await.unwrap();
    assert!(runs[0].outcome.is_ok());
    let err = runs[1].outcome.as_ref().unwrap_err();
    assert!(err.to_string().contains("data_destroy"), "{err}");
    assert_eq!(finished(&p), vec![("d0".into(), true), ("d1".into(), true)]);
    assert_unlocked(&s, &p).await;
    s.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_aborts_every_disk() {
    let s = setup(2).await;
    let mut p = fake(&s, 2, Fail::Nowhere);
    let ctx = context(2);
    ctx.cancel.cancel();
    let runs = run(&mut p, &s, &ctx).await.unwrap();
    for r in &runs {
        assert!(
            matches!(r.outcome, Err(Error::Cancelled)),
            "{:?}",
            r.outcome
        );
    }
    assert_eq!(
        finished(&p),
        vec![("d0".into(), false), ("d1".into(), false)]
    );
    assert!(s.repo.latest("d0").unwrap().is_none());
    assert_unlocked(&s, &p).await;
    s.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_waiting_for_a_limit_stops_on_cancel() {
    let s = setup(1).await;
    let mut p = fake(&s, 1, Fail::Nowhere);
    let mut ctx = context(1);
    let limit = Limit::new(1);
    ctx.slots = Slots(vec![limit.clone()]);
    // Another job holds the only connection.
    let cancel = CancellationToken::new();
    let held = Slots(vec![limit]).acquire(1, &cancel).await.unwrap();
    let stopper = ctx.cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        stopper.cancel();
    });
    let runs = run(&mut p, &s, &ctx).await.unwrap();
    assert!(matches!(runs[0].outcome, Err(Error::Cancelled)));
    assert_eq!(finished(&p), vec![("d0".into(), false)]);
    assert!(p.opened.lock().unwrap().is_empty());
    drop(held);
    assert_unlocked(&s, &p).await;
    s.stop.cancel();
}
