//! The daemon's life: start, schedule, run, reload, stop.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use cbtvault_config::{Config, Maintenance, Task, WebhookOn};
use cbtvault_repo::{DataCheck, Repository};
use cbtvault_runner::{JobSpec, Runner};
use jiff::Timestamp;
use rand::Rng;
use sd_notify::NotifyState;
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::progress::Tracker;
use crate::report;
use crate::schedule::Plan;
use crate::status::Live;

/// How long in-flight runs get to abort cleanly after SIGTERM. The runner
/// gives each capture 60 s to leave the hypervisor clean; this covers that
/// and the bookkeeping after it, and stays under systemd's default
/// `TimeoutStopSec` of 90 s.
pub const STOP_BOUND: Duration = Duration::from_secs(85);
/// The longest the scheduler sleeps before looking at the clock again
/// (the wall clock may jump: a suspended host, an NTP step).
const MAX_SLEEP: Duration = Duration::from_secs(30);

/// Threads a scheduled verify reads with: the backups come first.
const VERIFY_THREADS: usize = 2;

/// A scheduled job or maintenance task: its plan and next time.
struct Scheduled {
    plan: Plan,
    next: Option<Timestamp>,
}

/// What `POST /run/JOB` got.
pub(crate) enum Trigger {
    Started,
    Running,
    Unknown(Vec<String>),
    ShuttingDown,
}

/// The daemon's state, shared by the scheduler, the runs and the HTTP
/// server.
pub(crate) struct Shared {
    config_path: PathBuf,
    config: RwLock<Arc<Config>>,
    scheduled: Mutex<HashMap<String, Scheduled>>,
    /// Jobs running now (or waiting out their random delay), and since when.
    running: Mutex<HashMap<String, Timestamp>>,
    /// The disks of running jobs.
    progress: Mutex<HashMap<String, Arc<Tracker>>>,
    runner: Runner,
    metrics: Metrics,
    /// Stop taking work (SIGTERM).
    stop: CancellationToken,
    /// Abort in-flight runs; cancelled right after `stop`.
    cancel: CancellationToken,
    /// Wakes the scheduler after a reload.
    wake: Notify,
    /// Runs to start, to the task that spawns them (see [`run`]).
    starts: mpsc::UnboundedSender<Start>,
}

/// A run to start.
struct Start {
    job: String,
    delay: Duration,
    why: &'static str,
}

fn plans(config: &Config) -> Result<HashMap<String, Scheduled>> {
    let now = Timestamp::now();
    let mut out = HashMap::new();
    let schedules = config
        .jobs
        .iter()
        .filter_map(|j| Some((&j.name, j.schedule.as_ref()?)))
        .chain(config.maintenance.iter().map(|m| (&m.name, &m.schedule)));
    for (name, schedule) in schedules {
        let plan = Plan::new(name, schedule)?;
        let next = plan.next_after(now);
        out.insert(name.clone(), Scheduled { plan, next });
    }
    Ok(out)
}

/// The history row of a run that backs up no disk (a maintenance task or
/// a copy job): `what` says which (`("task", "gc")`, `("kind", "copy")`).
fn history_row(
    name: &str,
    what: (&str, &str),
    started: Timestamp,
    outcome: &str,
    error: Option<String>,
    result: serde_json::Value,
) -> cbtvault_repo::JobRunRow {
    let finished = Timestamp::now();
    let mut report = json!({
        "job": name,
        "started": started.to_string(),
        "finished": finished.to_string(),
        "outcome": outcome,
        "error": error,
        "result": result,
        "disks_ok": 0,
        "disks_failed": 0,
        "disks": [],
    });
    report[what.0] = json!(what.1);
    cbtvault_repo::JobRunRow {
        id: 0,
        job: name.to_string(),
        started: started.to_string(),
        finished: finished.to_string(),
        outcome: outcome.into(),
        disks_ok: 0,
        disks_failed: 0,
        report: report.to_string(),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere must not stop the daemon: the data stays usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub(crate) fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn open_repo(&self) -> Result<Arc<Repository>> {
        let path = self.config().repository.path.clone();
        cbtvault_s3::open_with_key(&path, Some(&repository_secret))
            .map(Arc::new)
            .map_err(|source| Error::OpenRepository {
                path,
                source: Box::new(source),
            })
    }

    /// `/status`.
    pub(crate) fn status(&self) -> Result<serde_json::Value> {
        let repo = self.open_repo()?;
        let live = |job: &str| Live {
            running_since: lock(&self.running).get(job).copied(),
            next: lock(&self.scheduled).get(job).and_then(|s| s.next),
            disks: lock(&self.progress)
                .get(job)
                .map(|t| t.running())
                .unwrap_or_default(),
        };
        crate::status::status(&self.config(), &repo, Some(&live))
    }

    /// `/metrics`, with the repository's size as of now.
    pub(crate) fn metrics_text(&self) -> String {
        if let Some(size) = self
            .open_repo()
            .ok()
            .and_then(|r| crate::status::repository_size(&r))
        {
            self.metrics.set_repository_size(size);
        }
        self.metrics.encode()
    }

    /// `POST /run/JOB`: runs `job` now unless it runs already.
    pub(crate) fn trigger(self: &Arc<Self>, job: &str) -> Trigger {
        if self.stop.is_cancelled() {
            return Trigger::ShuttingDown;
        }
        let config = self.config();
        if config.job(job).is_err() && !config.maintenance.iter().any(|m| m.name == job) {
            return Trigger::Unknown(
                config
                    .jobs
                    .iter()
                    .map(|j| j.name.clone())
                    .chain(config.maintenance.iter().map(|m| m.name.clone()))
                    .collect(),
            );
        }
        if self.start(job, Duration::ZERO, "asked for") {
            Trigger::Started
        } else {
            Trigger::Running
        }
    }

    /// Starts a run of `job` after `delay`, unless one is going (a job
    /// never overlaps itself). Returns whether it started.
    fn start(self: &Arc<Self>, job: &str, delay: Duration, why: &'static str) -> bool {
        {
            let mut running = lock(&self.running);
            if running.contains_key(job) {
                return false;
            }
            running.insert(job.to_string(), Timestamp::now());
        }
        if self
            .starts
            .send(Start {
                job: job.to_string(),
                delay,
                why,
            })
            .is_err()
        {
            // The daemon is stopping.
            lock(&self.running).remove(job);
            return false;
        }
        true
    }

    /// A run started by [`Shared::start`]: its random delay, then the run.
    async fn delayed_run(self: Arc<Self>, start: Start) {
        let Start { job, delay, why } = start;
        if !delay.is_zero() {
            info!(
                job,
                delay_s = delay.as_secs(),
                "waiting out the random delay"
            );
            tokio::select! {
                _ = self.stop.cancelled() => {}
                _ = tokio::time::sleep(delay) => {}
            }
        }
        if !self.stop.is_cancelled() {
            lock(&self.running).insert(job.clone(), Timestamp::now());
            self.run(&job, why).await;
        }
        lock(&self.running).remove(&job);
    }

    /// One run: the runner, then the history, the metrics and the webhook.
    async fn run(self: &Arc<Self>, job: &str, why: &'static str) {
        let config = self.config();
        if let Some(m) = config.maintenance.iter().find(|m| m.name == job) {
            return self.maintain(m, why).await;
        }
        match cbtvault_runner::CopySpec::from_config(&config, job) {
            Ok(Some(spec)) => return self.copy(spec, why).await,
            Ok(None) => {}
            // JobSpec::from_config below reports it.
            Err(_) => {}
        }
        let started = Timestamp::now();
        info!(job, why, "run starts");
        let result = match (JobSpec::from_config(&config, job), self.open_repo()) {
            (Ok(spec), Ok(repo)) => {
                let tracker = Arc::new(Tracker::default());
                lock(&self.progress).insert(job.to_string(), tracker.clone());
                let result = self
                    .runner
                    .run(&spec, repo, tracker, self.cancel.child_token())
                    .await
                    .map_err(|e| report::chain(&e));
                lock(&self.progress).remove(job);
                result
            }
            (Err(e), _) => Err(report::chain(&e)),
            (_, Err(e)) => Err(report::chain(&e)),
        };
        let (row, failed) = match &result {
            Ok(rep) => {
                self.metrics.record(rep);
                let outcome = report::outcome(rep, self.cancel.is_cancelled());
                for d in &rep.disks {
                    match &d.outcome {
                        Ok(o) => {
                            info!(job, disk = %d.label, restore_point = %o.restore_point, "disk backed up")
                        }
                        Err(e) => {
                            warn!(job, disk = %d.label, error = %report::chain(e), "disk failed")
                        }
                    }
                }
                info!(job, outcome, "run done");
                (report::to_row(rep, outcome), outcome != "ok")
            }
            Err(e) => {
                self.metrics.record_failed_start(job);
                error!(job, error = %e, "run could not start");
                (report::failed_to_start(job, started, e), true)
            }
        };
        self.finish(&config, row, failed).await;
    }

    /// A `[[maintenance]]` run: gc or verify, on a blocking thread (neither
    /// can be cancelled midway; both leave the repository consistent if
    /// the process exits during them).
    async fn maintain(self: &Arc<Self>, m: &Maintenance, why: &'static str) {
        let config = self.config();
        let started = Timestamp::now();
        info!(task = m.name, why, "maintenance starts");
        let shared = self.clone();
        let task = m.clone();
        let result = tokio::task::spawn_blocking(move || -> Result<(bool, serde_json::Value)> {
            let repo = shared.open_repo()?;
            let wrap = |source| Error::Repository {
                path: repo.root().to_path_buf(),
                source,
            };
            match task.task {
                Task::Gc => {
                    let r = repo
                        .collect_garbage(cbtvault_repo::GcOptions::default(), task.wait())
                        .map_err(wrap)?;
                    Ok((true, json!({ "gc": r })))
                }
                Task::Verify => {
                    let check = match task.read_data_parts {
                        Some(m) => {
                            let last = repo.catalogue().last_job_run(&task.name).map_err(wrap)?;
                            next_part(last.as_ref(), m)
                        }
                        None if task.read_data => DataCheck::All,
                        None => DataCheck::None,
                    };
                    let r = repo
                        .verify_data(check, VERIFY_THREADS, &|_| {})
                        .map_err(wrap)?;
                    Ok((r.is_ok(), json!({ "verify": r })))
                }
            }
        })
        .await;
        let (ok, result, error) = match result {
            Ok(Ok((ok, r))) => (ok, r, None),
            Ok(Err(e)) => (false, serde_json::Value::Null, Some(report::chain(&e))),
            Err(e) => (false, serde_json::Value::Null, Some(e.to_string())),
        };
        let outcome = if ok { "ok" } else { "failed" };
        match &error {
            None if ok => info!(task = m.name, "maintenance done"),
            None => warn!(
                task = m.name,
                "verify found damage: `cbtvault runs --json` has the report"
            ),
            Some(e) => error!(task = m.name, error = %e, "maintenance failed"),
        }
        self.metrics.record_task(&m.name, ok);
        let task = match m.task {
            Task::Gc => "gc",
            Task::Verify => "verify",
        };
        let row = history_row(&m.name, ("task", task), started, outcome, error, result);
        self.finish(&config, row, !ok).await;
    }

    /// A copy job's run, on a blocking thread: the copy cannot be
    /// cancelled midway, and a process that exits during it leaves the
    /// target consistent (manifests go last; the next run sends the rest).
    async fn copy(self: &Arc<Self>, spec: cbtvault_runner::CopySpec, why: &'static str) {
        let config = self.config();
        let started = Timestamp::now();
        let job = spec.name.clone();
        info!(job, why, to = %spec.to.display(), "copy starts");
        let shared = self.clone();
        let result = tokio::task::spawn_blocking(move || -> Result<_> {
            let repo = shared.open_repo()?;
            cbtvault_runner::run_copy(&spec, &repo, &cbtvault_engine::NoProgress)
                .map_err(Error::from)
        })
        .await;
        let (result, error) = match result {
            Ok(Ok(r)) => {
                info!(
                    job,
                    copied = r.copy.copied.len(),
                    present = r.copy.present.len(),
                    bytes_sent = r.copy.bytes_sent,
                    forgotten = r.forgotten.values().sum::<usize>(),
                    "copy done"
                );
                (json!(r), None)
            }
            Ok(Err(e)) => (serde_json::Value::Null, Some(report::chain(&e))),
            Err(e) => (serde_json::Value::Null, Some(e.to_string())),
        };
        if let Some(e) = &error {
            error!(job, error = %e, "copy failed");
        }
        let ok = error.is_none();
        let outcome = if ok { "ok" } else { "failed" };
        self.metrics.record_task(&job, ok);
        let row = history_row(&job, ("kind", "copy"), started, outcome, error, result);
        self.finish(&config, row, !ok).await;
    }

    /// After a run: its history row, then the webhook.
    async fn finish(
        self: &Arc<Self>,
        config: &Config,
        row: cbtvault_repo::JobRunRow,
        failed: bool,
    ) {
        let job = row.job.clone();
        let shared = self.clone();
        let saved = row.clone();
        let recorded = tokio::task::spawn_blocking(move || {
            let repo = shared.open_repo()?;
            repo.catalogue()
                .record_job_run(&saved)
                .map_err(|source| Error::Repository {
                    path: repo.root().to_path_buf(),
                    source,
                })
        })
        .await;
        match recorded {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                error!(job, error = %report::chain(&e), "the run's history row was not saved")
            }
            Err(e) => error!(job, error = %e, "the run's history row was not saved"),
        }
        if let Some(url) = &config.daemon.webhook
            && (failed || config.daemon.webhook_on == WebhookOn::Always)
        {
            let body: serde_json::Value =
                serde_json::from_str(&row.report).unwrap_or(serde_json::Value::Null);
            crate::webhook::send(url, config.daemon.webhook_ca.as_deref(), &body, &self.stop).await;
        }
    }

    /// SIGHUP: reads the configuration again; a bad one is logged and the
    /// running one stays.
    fn reload(&self) {
        let new = match Config::load(&self.config_path) {
            Ok(c) => c,
            Err(e) => {
                error!(error = %report::chain(&e), "configuration not reloaded; the previous one keeps running");
                return;
            }
        };
        let mut fresh = match plans(&new) {
            Ok(p) => p,
            Err(e) => {
                error!(error = %report::chain(&e), "configuration not reloaded; the previous one keeps running");
                return;
            }
        };
        let old = self.config();
        if new.daemon.listen != old.daemon.listen {
            warn!(
                listen = %old.daemon.listen,
                "[daemon] listen changed; it takes effect when the daemon restarts"
            );
        }
        if new.limits.disks != old.limits.disks {
            warn!("[limits] disks changed; it takes effect when the daemon restarts");
        }
        {
            let mut scheduled = lock(&self.scheduled);
            // A job whose schedule did not change keeps its next time.
            for (job, s) in fresh.iter_mut() {
                if let Some(o) = scheduled.get(job)
                    && o.plan.pattern() == s.plan.pattern()
                    && o.plan.time_zone() == s.plan.time_zone()
                {
                    s.next = o.next;
                }
            }
            *scheduled = fresh;
        }
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
        self.wake.notify_one();
        info!(file = %self.config_path.display(), "configuration reloaded");
    }

    /// Starts the jobs whose time has come; sleeps until the next.
    async fn schedule(self: Arc<Self>) {
        loop {
            let now = Timestamp::now();
            let mut due = Vec::new();
            let mut earliest: Option<Timestamp> = None;
            {
                let mut scheduled = lock(&self.scheduled);
                for (job, s) in scheduled.iter_mut() {
                    if s.next.is_some_and(|t| t <= now) {
                        due.push(job.clone());
                        s.next = s.plan.next_after(now);
                    }
                    earliest = match (earliest, s.next) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
            }
            let config = self.config();
            for job in due {
                let delay = config
                    .job(&job)
                    .map(|j| j.random_delay())
                    .unwrap_or_default();
                let delay = if delay.is_zero() {
                    delay
                } else {
                    rand::thread_rng().gen_range(Duration::ZERO..=delay)
                };
                if !self.start(&job, delay, "scheduled") {
                    warn!(
                        job,
                        "scheduled run skipped: the previous run is still going"
                    );
                }
            }
            let wait = earliest
                .map(|t| Duration::try_from(t.duration_since(Timestamp::now())).unwrap_or_default())
                .unwrap_or(MAX_SLEEP)
                .min(MAX_SLEEP);
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// At start: what QEMU backups killed with an earlier daemon left in
    /// QEMU (the filter in the guest's I/O path, the export, the fleece
    /// image) goes now, not at each job's next run. Failures are logged:
    /// the job's next run cleans up too.
    async fn clean_up_qemu(&self) {
        let config = self.config();
        let Ok(repo) = self.open_repo() else {
            return;
        };
        for job in &config.jobs {
            if !matches!(job.kind, cbtvault_config::JobKind::Qemu { .. }) {
                continue;
            }
            let spec = match JobSpec::from_config(&config, &job.name) {
                Ok(spec) => spec,
                Err(e) => {
                    warn!(job = job.name, error = %e, "cannot clean up after this job");
                    continue;
                }
            };
            match cbtvault_runner::cleanup(&spec, repo.clone()).await {
                Ok(cleaned) => {
                    for c in cleaned.iter().filter(|c| !c.removed.is_empty()) {
                        info!(job = job.name, node = c.node, removed = ?c.removed, "cleaned up after a killed backup");
                    }
                }
                Err(e) => {
                    warn!(job = job.name, error = %e, "could not clean up after killed backups; the job's next run does")
                }
            }
        }
    }

    /// Jobs with `catch_up` whose scheduled time passed since their last
    /// recorded run.
    fn missed(&self) -> Vec<String> {
        let config = self.config();
        let Ok(repo) = self.open_repo() else {
            return Vec::new();
        };
        let now = Timestamp::now();
        let scheduled = lock(&self.scheduled);
        let mut out = Vec::new();
        for job in config.jobs.iter().filter(|j| j.catch_up) {
            let last = repo.catalogue().last_job_run(&job.name);
            let Ok(Some(last)) = last else { continue };
            let Ok(since) = last.started.parse::<Timestamp>() else {
                continue;
            };
            if scheduled
                .get(&job.name)
                .is_some_and(|s| s.plan.missed(since, now))
            {
                out.push(job.name.clone());
            }
        }
        out
    }
}

/// Runs the daemon on the configuration at `config_path` until SIGTERM or
/// SIGINT; then stops taking work, aborts in-flight runs cleanly (within
/// [`STOP_BOUND`]) and returns. Call it with `block_on` on a multi-thread
/// runtime: the runs are tasks local to this future (the runner's future
/// is not `Send`), while the work they spawn runs on the worker threads.
pub async fn run(config_path: &Path) -> Result<()> {
    tokio::task::LocalSet::new()
        .run_until(serve(config_path))
        .await
}

/// The secret of an encrypted repository, for a service that has no
/// terminal: a key file (`CBTVAULT_KEY_FILE`), a passphrase file's first
/// line (`CBTVAULT_PASSWORD_FILE`, e.g. a systemd credential) or
/// `CBTVAULT_PASSWORD`. Without any, an encrypted repository opens locked
/// and its jobs fail saying the key is needed.
fn repository_secret() -> cbtvault_repo::Result<cbtvault_repo::Secret> {
    let read = |path: std::ffi::OsString| {
        std::fs::read(&path).map_err(|source| cbtvault_repo::Error::Io {
            path: path.into(),
            source,
        })
    };
    if let Some(path) = std::env::var_os("CBTVAULT_KEY_FILE") {
        return Ok(cbtvault_repo::Secret::key_file(read(path)?));
    }
    if let Some(path) = std::env::var_os("CBTVAULT_PASSWORD_FILE") {
        let text = String::from_utf8_lossy(&read(path)?).into_owned();
        let line = text.lines().next().unwrap_or_default().to_string();
        return Ok(cbtvault_repo::Secret::passphrase(line));
    }
    if let Some(text) = std::env::var_os("CBTVAULT_PASSWORD") {
        return Ok(cbtvault_repo::Secret::passphrase(
            text.to_string_lossy().into_owned(),
        ));
    }
    Err(cbtvault_repo::Error::KeyRequired {
        what: "opening".into(),
    })
}

async fn serve(config_path: &Path) -> Result<()> {
    let config = Config::load(config_path)?;
    let scheduled = plans(&config)?;
    // Fail now, not at the first run, on a repository that is not there.
    cbtvault_s3::open_with_key(&config.repository.path, Some(&repository_secret)).map_err(
        |source| Error::OpenRepository {
            path: config.repository.path.clone(),
            source: Box::new(source),
        },
    )?;
    let listener = tokio::net::TcpListener::bind(&config.daemon.listen)
        .await
        .map_err(|source| Error::Listen {
            addr: config.daemon.listen.clone(),
            source,
        })?;
    let mut term = signal(SignalKind::terminate()).map_err(Error::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(Error::Signals)?;
    let mut hup = signal(SignalKind::hangup()).map_err(Error::Signals)?;
    let address = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| config.daemon.listen.clone());
    let (starts, mut to_start) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        config_path: config_path.to_path_buf(),
        runner: Runner::new(&config.limits),
        config: RwLock::new(Arc::new(config)),
        scheduled: Mutex::new(scheduled),
        running: Mutex::new(HashMap::new()),
        progress: Mutex::new(HashMap::new()),
        metrics: Metrics::default(),
        stop: CancellationToken::new(),
        cancel: CancellationToken::new(),
        wake: Notify::new(),
        starts,
    });
    let tasks = TaskTracker::new();
    info!(%address, config = %config_path.display(), "daemon started; serving /healthz, /status, /metrics and POST /run/JOB");
    for (job, s) in lock(&shared.scheduled).iter() {
        info!(job, schedule = s.plan.pattern(), time_zone = s.plan.time_zone(), next = %s.next.map(|t| t.to_string()).unwrap_or_else(|| "never".into()), "scheduled");
    }
    let server = tokio::spawn(crate::http::serve(
        listener,
        shared.clone(),
        shared.stop.clone(),
    ));
    shared.clean_up_qemu().await;
    for job in shared.missed() {
        info!(
            job,
            "a scheduled run was missed while the daemon was down; catching up"
        );
        shared.start(&job, Duration::ZERO, "catch-up");
    }
    let scheduler = tokio::spawn(shared.clone().schedule());
    // No-ops without NOTIFY_SOCKET (not under systemd).
    if let Err(e) = sd_notify::notify(&[NotifyState::Ready]) {
        warn!(error = %e, "telling systemd we are ready failed");
    }
    let watchdog = sd_notify::watchdog_enabled().map(|every| {
        let stop = shared.stop.clone();
        tokio::spawn(async move {
            loop {
                let _ = sd_notify::notify(&[NotifyState::Watchdog]);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(every / 2) => {}
                }
            }
        })
    });
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => shared.reload(),
            Some(start) = to_start.recv() => {
                tasks.spawn_local(shared.clone().delayed_run(start));
            }
        }
    }
    info!("stopping: no new runs; in-flight runs abort and leave the hypervisor clean");
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
    shared.stop.cancel();
    shared.cancel.cancel();
    to_start.close();
    while let Ok(start) = to_start.try_recv() {
        lock(&shared.running).remove(&start.job);
    }
    tasks.close();
    if tokio::time::timeout(STOP_BOUND, tasks.wait())
        .await
        .is_err()
    {
        warn!(
            bound_s = STOP_BOUND.as_secs(),
            "runs still aborting after the bound; exiting anyway (`cbtvault repair` and the next run reap leftovers)"
        );
    }
    let _ = scheduler.await;
    let _ = server.await;
    if let Some(w) = watchdog {
        w.abort();
    }
    info!("daemon stopped");
    Ok(())
}

/// `cbtvault run JOB`: asks the daemon serving `config`'s `[daemon]
/// listen` to run `job` now. Returns the daemon's answer (JSON).
pub async fn ask_to_run(config: &Config, job: &str) -> Result<(u16, serde_json::Value)> {
    let mut addr: std::net::SocketAddr = config.daemon.listen.parse().map_err(|_| Error::Http {
        url: config.daemon.listen.clone(),
        what: "[daemon] listen is not an address".into(),
    })?;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let (status, body) = crate::http::post(
        &format!("http://{addr}/run/{job}"),
        None,
        Vec::new(),
        Duration::from_secs(10),
    )
    .await?;
    Ok((
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    ))
}

/// The part of the data a rotating verify re-reads this run: the one
/// after the part the task's last run read (from its report), the first
/// when there is none or `m` changed.
fn next_part(last: Option<&cbtvault_repo::JobRunRow>, m: u32) -> DataCheck {
    let m = m.max(1);
    let previous = last
        .and_then(|row| serde_json::from_str::<serde_json::Value>(&row.report).ok())
        .and_then(|report| {
            let checked = report["result"]["verify"]["data_checked"]
                .as_str()?
                .to_string();
            match DataCheck::parse(&checked).ok()? {
                DataCheck::Part { n, m: was } if was == m => Some(n),
                _ => None,
            }
        });
    let n = previous.map_or(1, |n| n % m + 1);
    DataCheck::Part { n, m }
}

#[cfg(test)]
mod rotation_tests {
    use super::*;

    fn row(report: serde_json::Value) -> cbtvault_repo::JobRunRow {
        cbtvault_repo::JobRunRow {
            id: 1,
            job: "verify".into(),
            started: String::new(),
            finished: String::new(),
            outcome: "ok".into(),
            disks_ok: 0,
            disks_failed: 0,
            report: report.to_string(),
        }
    }

    #[test]
    fn a_rotating_verify_reads_the_next_part_and_wraps_around() {
        assert_eq!(next_part(None, 3), DataCheck::Part { n: 1, m: 3 });
        let after = |n: u32, m: u32| {
            row(json!({"result": {"verify": {"data_checked": format!("{n}/{m}")}}}))
        };
        assert_eq!(
            next_part(Some(&after(1, 3)), 3),
            DataCheck::Part { n: 2, m: 3 }
        );
        assert_eq!(
            next_part(Some(&after(3, 3)), 3),
            DataCheck::Part { n: 1, m: 3 }
        );
        // A changed setting, or a report it cannot read, starts again.
        assert_eq!(
            next_part(Some(&after(2, 5)), 3),
            DataCheck::Part { n: 1, m: 3 }
        );
        assert_eq!(
            next_part(Some(&row(json!("garbage"))), 3),
            DataCheck::Part { n: 1, m: 3 }
        );
    }
}
