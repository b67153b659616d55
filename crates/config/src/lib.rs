//! cbtvault's configuration file (TOML): one repository, the XenServer
//! pools, QEMU hosts and vCenters it backs up, and the jobs that say which disks,
//! when, and how long to keep them. The one-off `cbtvault backup --config
//! FILE --job NAME` and the nightly daemon read the same file.
//!
//! Loading validates everything a run would otherwise trip over halfway:
//! unknown keys (typos), references to pools or hosts that do not exist,
//! duplicate names, malformed UUIDs and times, ambiguous credentials or
//! trust settings. Passwords are never in the file itself: a pool names a
//! file or an environment variable ([`PasswordSource`]), read only by the
//! XenAPI client when it logs in. The format is documented in `docs/config.md`; `config/` has an
//! example that the tests load.
//!
//! `toml` (with serde) is used because it is the de-facto TOML parser of
//! the Rust ecosystem and reports errors with line and column; `croner`
//! parses the schedules' cron expressions (so a bad one fails on load, not
//! at the first run) and `jiff` their time zones.

mod validate;
mod vcenter;

pub use vcenter::{FcdRef, Vcenter};

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub repository: RepositoryConfig,
    /// XenServer / XCP-ng pools.
    #[serde(default, rename = "pool")]
    pub pools: Vec<Pool>,
    /// QEMU/KVM hosts (a VM's QEMU or a qemu-storage-daemon, by QMP socket).
    #[serde(default, rename = "qemu")]
    pub qemu_hosts: Vec<QemuHost>,
    /// vCenters (the vSphere JSON API).
    #[serde(default, rename = "vcenter")]
    pub vcenters: Vec<Vcenter>,
    #[serde(default, rename = "job")]
    pub jobs: Vec<Job>,
    /// Limits across every job a process runs (the daemon runs several).
    #[serde(default)]
    pub limits: Limits,
    /// The daemon's HTTP address and webhook.
    #[serde(default)]
    pub daemon: DaemonConfig,
    /// Repository upkeep the daemon runs on schedules.
    #[serde(default)]
    pub maintenance: Vec<Maintenance>,
}

/// `[[maintenance]]`: gc or verify on a schedule (the daemon only).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Maintenance {
    /// Unique among jobs and maintenance tasks: names its runs in the
    /// history, and `cbtvault run NAME`.
    pub name: String,
    pub task: Task,
    pub schedule: Schedule,
    /// verify: read and check every block, not only the structure.
    #[serde(default)]
    pub read_data: bool,
    /// verify: re-read one part in this many of the data each run, the
    /// next part each time, so the whole repository is re-read over that
    /// many runs (as `verify --read-data-subset n/m` with `n` rotating).
    pub read_data_parts: Option<u32>,
    /// gc: how long to wait for another gc (on any host) or a repair on
    /// this host, as `1h`; gc runs beside backups.
    #[serde(default = "one_hour")]
    pub wait: String,
}

impl Maintenance {
    /// `wait` as a duration (validated on load).
    pub fn wait(&self) -> std::time::Duration {
        parse_duration(&self.wait).unwrap_or(std::time::Duration::from_secs(3600))
    }
}

/// What a maintenance entry does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// `cbtvault gc`: removes what no restore point needs.
    Gc,
    /// `cbtvault verify`: checks that every restore point restores.
    Verify,
}

fn one_hour() -> String {
    "1h".into()
}

/// `[daemon]`: what only `cbtvault daemon` reads.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Where `/healthz`, `/status`, `/metrics` and `POST /run/JOB` are
    /// served: loopback by default, since they need no password.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// An `http://` or `https://` URL that receives a JSON report per run
    /// (see `webhook_on`).
    pub webhook: Option<String>,
    /// Trust an `https://` webhook's certificate through this CA (PEM)
    /// instead of the public roots cbtvault carries (Mozilla's).
    pub webhook_ca: Option<PathBuf>,
    #[serde(default)]
    pub webhook_on: WebhookOn,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            listen: default_listen(),
            webhook: None,
            webhook_ca: None,
            webhook_on: WebhookOn::default(),
        }
    }
}

/// Which runs the webhook is told about.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookOn {
    /// Runs with a failed disk, and jobs that could not start.
    #[default]
    Failure,
    /// Every run.
    Always,
}

fn default_listen() -> String {
    "127.0.0.1:9460".into()
}

/// Limits across jobs.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Disks backed up at once, all jobs together.
    #[serde(default = "eight")]
    pub disks: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { disks: eight() }
    }
}

/// Where backups go.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryConfig {
    pub path: PathBuf,
    /// zstd level for new blocks; the repository's default when absent.
    pub compression_level: Option<i32>,
}

/// How a pool's XenAPI is reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// JSON-RPC at /jsonrpc, falling back to XML-RPC when the host lacks it.
    #[default]
    Auto,
    JsonRpc,
    XmlRpc,
}

/// A XenServer / XCP-ng pool.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    pub name: String,
    /// `https://HOST[:PORT]` of the pool master.
    pub url: String,
    #[serde(default = "default_username")]
    pub username: String,
    /// A file holding the password (first line).
    pub password_file: Option<PathBuf>,
    /// An environment variable holding the password.
    pub password_env: Option<String>,
    /// Trust the pool's certificate through this CA (PEM).
    pub ca: Option<PathBuf>,
    /// Trust exactly this certificate (PEM), as XenServer hands it out.
    pub pin: Option<PathBuf>,
    /// Trust any certificate. Logged as a warning on every run.
    #[serde(default)]
    pub insecure: bool,
    /// Accept an `http://` url: the password then crosses the network in
    /// clear, so it must be asked for (a lab behind a trusted network).
    #[serde(default)]
    pub allow_insecure_http: bool,
    #[serde(default)]
    pub transport: Transport,
    /// NBD connections per disk. xapi-nbd does not announce multi-conn,
    /// but a snapshot is read-only and immutable, so several connections
    /// are safe and are opened.
    #[serde(default = "one")]
    pub nbd_connections: usize,
    /// NBD connections to the pool at once, all disks together (xapi-nbd
    /// allows 16 per host).
    #[serde(default = "sixteen")]
    pub max_nbd_connections: usize,
}

/// A QEMU/KVM host, addressed by its QMP socket.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QemuHost {
    pub name: String,
    pub qmp_socket: PathBuf,
    /// The unix socket of an NBD server QEMU already runs; without it
    /// cbtvault starts one beside the QMP socket for each backup.
    pub nbd_socket: Option<PathBuf>,
    /// Disks of this host backed up at once, all jobs together.
    #[serde(default = "four")]
    pub max_disks: usize,
    /// The VM whose disks this host serves, when QMP cannot name it (a
    /// qemu-storage-daemon serving a VM's drives). A QEMU started with
    /// `-name` is named by QMP and this is not needed.
    #[serde(default)]
    pub vm: Option<String>,
}

/// What a job backs up.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum JobKind {
    /// VDIs of a XenServer pool, by VM (all its disks) or by VDI.
    Xenserver {
        pool: String,
        #[serde(default)]
        vms: Vec<String>,
        #[serde(default)]
        vdis: Vec<String>,
        /// Snapshot all disks of a VM together with `VM.snapshot`.
        #[serde(default)]
        consistent_vm_snapshot: bool,
    },
    /// Block nodes of a QEMU host.
    Qemu { host: String, nodes: Vec<String> },
    /// VMs (every disk, from one VM snapshot) by moref (`vm-42`) or name,
    /// and First Class Disks, of a vCenter.
    Vmware {
        vcenter: String,
        #[serde(default)]
        vms: Vec<String>,
        #[serde(default)]
        fcds: Vec<FcdRef>,
    },
    /// Restore points of this repository copied into another (off-site):
    /// only what the target lacks travels; the job's retention applies to
    /// the target.
    Copy {
        /// The target repository: a path, or `s3://BUCKET/PREFIX?…`.
        to: PathBuf,
        /// The disks copied; every disk when empty.
        #[serde(default)]
        disks: Vec<String>,
    },
}

/// A backup job. (serde cannot deny unknown fields next to `flatten`;
/// `validate::job_keys` does it instead.)
#[derive(Clone, Debug, Deserialize)]
pub struct Job {
    pub name: String,
    #[serde(flatten)]
    pub kind: JobKind,
    /// Disks backed up at once.
    #[serde(default = "two")]
    pub parallel: usize,
    /// When the daemon runs it; one-off runs ignore it.
    pub schedule: Option<Schedule>,
    /// A random pause of up to this long before each scheduled run (so
    /// jobs scheduled alike do not all start at once), as `10m`.
    pub random_delay: Option<String>,
    /// Run once when the daemon starts if a scheduled time passed while it
    /// was down (since the job's last recorded run).
    #[serde(default)]
    pub catch_up: bool,
    /// What `forget` keeps after a run.
    pub retention: Option<Retention>,
    /// Further tries of a disk whose backup failed for a reason that may
    /// pass (a dropped connection, a timeout, a busy server).
    #[serde(default = "two_u32")]
    pub retries: u32,
    /// Blocks the hypervisor reported unchanged that each incremental
    /// re-reads to check the report (the CBT audit); 0 turns it off.
    #[serde(default = "sixteen")]
    pub audit_samples: usize,
    /// The pause before the first retry (doubling after each), as `30s`,
    /// `5m`.
    #[serde(default = "thirty_seconds")]
    pub retry_delay: String,
    /// Most bytes per second the job reads from its sources, all its disks
    /// together, as `100M` (K, M, G: powers of 1024); no limit when absent.
    pub bandwidth: Option<String>,
}

impl Job {
    /// `retry_delay` as a duration (validated on load).
    pub fn retry_delay(&self) -> std::time::Duration {
        parse_duration(&self.retry_delay).unwrap_or(std::time::Duration::from_secs(30))
    }

    /// `random_delay` as a duration (validated on load); zero when absent.
    pub fn random_delay(&self) -> std::time::Duration {
        self.random_delay
            .as_deref()
            .and_then(|d| parse_duration(d).ok())
            .unwrap_or_default()
    }

    /// `bandwidth` in bytes per second (validated on load).
    pub fn bandwidth_bytes(&self) -> Option<u64> {
        self.bandwidth.as_deref().and_then(|b| parse_size(b).ok())
    }
}

/// A size in bytes, with an optional K, M, G or T suffix (powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        Some('T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    digits
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| {
            format!("{text:?} is not a size (give bytes, or a number with K, M, G or T)")
        })
}

/// A duration such as `30s`, `5m`, `1h 30m` (jiff's friendly format).
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    text.trim()
        .parse::<jiff::SignedDuration>()
        .ok()
        .and_then(|d| std::time::Duration::try_from(d).ok())
        .ok_or_else(|| format!("{text:?} is not a duration (give it as 30s, 5m or 1h 30m)"))
}

/// When a job runs: `{ at = "HH:MM", days = [...] }` or
/// `{ cron = "30 1 * * mon,wed,fri" }`, in the host's local time zone or
/// in `timezone` (an IANA name such as `Europe/Paris`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// `HH:MM`, 24-hour clock.
    pub at: Option<String>,
    /// With `at`: `mon` … `sun`; every day when empty.
    #[serde(default)]
    pub days: Vec<String>,
    /// A cron expression: 5 fields (minute hour day-of-month month
    /// day-of-week), or 6 with seconds first.
    pub cron: Option<String>,
    /// The IANA time zone the times are in; the host's when absent.
    pub timezone: Option<String>,
}

impl Schedule {
    /// The schedule as a cron pattern and its time zone, or what is wrong.
    /// `at`/`days` become `0 MM HH * * DAYS`.
    pub fn compile(&self) -> Result<(croner::Cron, jiff::tz::TimeZone), String> {
        let pattern = match (&self.at, &self.cron) {
            (Some(at), None) => {
                let (h, m) = at
                    .split_once(':')
                    .filter(|(h, m)| h.len() == 2 && m.len() == 2)
                    .and_then(|(h, m)| Some((h.parse::<u8>().ok()?, m.parse::<u8>().ok()?)))
                    .filter(|(h, m)| *h < 24 && *m < 60)
                    .ok_or_else(|| format!("schedule time {at:?} is not HH:MM"))?;
                if let Some(d) = self
                    .days
                    .iter()
                    .find(|d| !validate::DAYS.contains(&d.as_str()))
                {
                    return Err(format!(
                        "unknown day {d:?} (use {})",
                        validate::DAYS.join(", ")
                    ));
                }
                let days = if self.days.is_empty() {
                    "*".to_string()
                } else {
                    self.days.join(",")
                };
                format!("0 {m} {h} * * {days}")
            }
            (None, Some(cron)) => {
                if !self.days.is_empty() {
                    return Err(
                        "schedule: days goes with at; put the days in the cron expression".into(),
                    );
                }
                cron.clone()
            }
            _ => return Err("schedule: give either at (with days) or cron".into()),
        };
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .build()
            .parse(&pattern)
            .map_err(|e| format!("schedule {pattern:?} is not a valid cron expression: {e}"))?;
        let tz = match &self.timezone {
            Some(name) => jiff::tz::TimeZone::get(name).map_err(|_| {
                format!(
                    "schedule: unknown time zone {name:?} (give an IANA name such as Europe/Paris)"
                )
            })?,
            None => jiff::tz::TimeZone::system(),
        };
        Ok((cron, tz))
    }
}

/// Retention per disk, as `cbtvault forget --keep-*`.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    pub keep_last: Option<usize>,
    pub keep_daily: Option<usize>,
    pub keep_weekly: Option<usize>,
    pub keep_monthly: Option<usize>,
}

fn default_username() -> String {
    "root".into()
}
fn one() -> usize {
    1
}
fn two() -> usize {
    2
}
fn two_u32() -> u32 {
    2
}
fn four() -> usize {
    4
}
fn eight() -> usize {
    8
}
fn sixteen() -> usize {
    16
}
fn thirty_seconds() -> String {
    "30s".into()
}

/// A configuration that cannot be used, and where.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{path}: cannot read")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid configuration")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("no job named {name:?} in the configuration ({})", job_list(.known))]
    UnknownJob {
        name: String,
        /// The jobs the configuration has.
        known: Vec<String>,
    },
}

fn job_list(known: &[String]) -> String {
    if known.is_empty() {
        "it has none".into()
    } else {
        format!("jobs: {}", known.join(", "))
    }
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates configuration text; `path` is for messages and
    /// for resolving relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Config, Error> {
        let parse_error = |source| Error::Parse {
            path: path.into(),
            source: Box::new(source),
        };
        let table: toml::Table = toml::from_str(text).map_err(parse_error)?;
        let invalid = |what: String| Error::Invalid {
            path: path.into(),
            what: match line_of_item(text, &what) {
                Some(line) => format!("line {line}: {what}"),
                None => what,
            },
        };
        validate::job_keys(&table).map_err(invalid)?;
        let mut config: Config = table.try_into().map_err(parse_error)?;
        validate::check(&config).map_err(invalid)?;
        config.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        Ok(config)
    }

    /// Relative paths are relative to the configuration file.
    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        // `s3://BUCKET/PREFIX` names a bucket, not a relative path.
        if !self.repository.path.starts_with("s3:") {
            fix(&mut self.repository.path);
        }
        for job in &mut self.jobs {
            if let JobKind::Copy { to, .. } = &mut job.kind
                && !to.starts_with("s3:")
            {
                fix(to);
            }
        }
        if let Some(p) = &mut self.daemon.webhook_ca {
            fix(p);
        }
        for pool in &mut self.pools {
            for p in [&mut pool.password_file, &mut pool.ca, &mut pool.pin]
                .into_iter()
                .flatten()
            {
                fix(p);
            }
        }
        for v in &mut self.vcenters {
            for p in [&mut v.password_file, &mut v.ca, &mut v.pin]
                .into_iter()
                .flatten()
            {
                fix(p);
            }
        }
        for host in &mut self.qemu_hosts {
            fix(&mut host.qmp_socket);
            if let Some(p) = &mut host.nbd_socket {
                fix(p);
            }
        }
    }

    /// The job named `name`.
    pub fn job(&self, name: &str) -> Result<&Job, Error> {
        self.jobs
            .iter()
            .find(|j| j.name == name)
            .ok_or_else(|| Error::UnknownJob {
                name: name.into(),
                known: self.jobs.iter().map(|j| j.name.clone()).collect(),
            })
    }

    /// The pool named `name`.
    pub fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.name == name)
    }

    /// The vCenter named `name`.
    pub fn vcenter(&self, name: &str) -> Option<&Vcenter> {
        self.vcenters.iter().find(|v| v.name == name)
    }

    /// The QEMU host named `name`.
    pub fn qemu_host(&self, name: &str) -> Option<&QemuHost> {
        self.qemu_hosts.iter().find(|h| h.name == name)
    }
}

/// The line (1-based) where the item a validation message names starts:
/// for `job "x": …`, the line of that job's `name = "x"`.
fn line_of_item(text: &str, what: &str) -> Option<usize> {
    let rest = ["job ", "pool ", "qemu host ", "vcenter ", "maintenance "]
        .iter()
        .find_map(|p| what.strip_prefix(p))?;
    let name = rest.strip_prefix('"')?.split('"').next()?;
    let quoted = format!("{name:?}");
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.starts_with("name") && l.contains(&quoted)
        })
        .map(|i| i + 1)
}

/// Where a pool's password is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PasswordSource {
    /// The first line of a file.
    File(PathBuf),
    /// An environment variable.
    Env(String),
}

impl Pool {
    /// Where the password is (validation guarantees exactly one source).
    pub fn password_source(&self) -> PasswordSource {
        match (&self.password_file, &self.password_env) {
            (Some(file), _) => PasswordSource::File(file.clone()),
            (None, Some(var)) => PasswordSource::Env(var.clone()),
            (None, None) => PasswordSource::Env(String::new()),
        }
    }
}

#[cfg(test)]
mod tests;
