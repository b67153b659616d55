//! Lock objects: locks that live in the repository itself, so that
//! processes on different hosts sharing one repository (an S3 bucket, a
//! shared directory) see each other. Kernel locks (`lock.rs`) still keep
//! the processes of one host apart, and tell at once when one dies; a lock
//! object adds who holds what, for every host.
//!
//! A lock object (`locks/NAME.json`, [`FileKind::Lock`], format in
//! `docs/formats.md`) names its owner (host, boot id, pid and the
//! process's start time), what it is for, when it started, its last
//! heartbeat and its expiry. Its holder renews it every
//! [`LockTtl::heartbeat`] from a thread of its own (expiry = heartbeat +
//! TTL) and removes it when done. Another process judges it **stale**:
//! - on the same host (same host name and boot id), at once when the
//!   owning process is gone (no such pid, or a pid reused by another
//!   process: its start time differs) — a killed process never makes the
//!   next run wait;
//! - on the same host name with another boot id (the host rebooted), at once;
//! - from another host, once its expiry has passed (its heartbeats stopped).
//!
//! Two uses: **exclusive** lock objects (`disk-KEY`, `gc`, `keys`,
//! `repair`) are created
//! with [`Backend::create`] — one conditional write where the store offers
//! it (`link` on a directory, `If-None-Match: *` on S3), so of two hosts
//! only one gets it — then read back (a store that ignores the condition
//! lets the last writer win; the loser sees someone else's token and backs
//! off). A stale one is removed and taken. **Operation** lock objects
//! (`op-TOKEN`) are many: every operation that reads or adds data
//! registers one, so that gc knows what runs, since when, and what it must
//! wait for (`condemn.rs`).
//!
//! A holder whose heartbeat cannot be written past its expiry, or whose
//! object was taken over, has lost it: [`Lease::is_lost`] says so, and a
//! backup refuses to commit then ([`crate::Error::LockLost`]).
//!
//! Lock objects carry no guest data (no sealing in an encrypted
//! repository) and are not history (removable in an append-only one).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, FileKind, is_not_found};
use crate::error::{Error, Result};

/// The lock-object format this build writes and reads.
pub const LOCK_FORMAT: u32 = 1;

/// How long a lock object lives without a heartbeat, and how often its
/// holder renews it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockTtl {
    pub ttl: Duration,
    pub heartbeat: Duration,
}

impl Default for LockTtl {
    /// Five minutes, renewed every minute: a host that died holds its
    /// locks for at most five minutes.
    fn default() -> Self {
        LockTtl {
            ttl: Duration::from_secs(300),
            heartbeat: Duration::from_secs(60),
        }
    }
}

/// Who holds a lock object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub host: String,
    pub boot_id: String,
    pub pid: u32,
    /// The process's start time in clock ticks since boot (`/proc/PID/stat`
    /// field 22), to tell a reused pid; 0 when unknown.
    pub pid_start: u64,
}

impl Owner {
    /// This process.
    pub fn current() -> Owner {
        static ME: OnceLock<Owner> = OnceLock::new();
        ME.get_or_init(|| Owner {
            host: host_name(),
            boot_id: read_trimmed("/proc/sys/kernel/random/boot_id"),
            pid: std::process::id(),
            pid_start: process_start(std::process::id()).unwrap_or(0),
        })
        .clone()
    }
}

/// A lock object's content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRecord {
    pub format: u32,
    /// `operation`, `disk`, `gc`, `keys` or `repair`.
    pub kind: String,
    /// What it is for, for messages (`a backup of disk "d"`).
    pub what: String,
    pub owner: Owner,
    /// Random: tells this holding from a later one of the same name.
    pub token: String,
    pub started: jiff::Timestamp,
    pub heartbeat: jiff::Timestamp,
    pub expires: jiff::Timestamp,
}

impl LockRecord {
    fn new(kind: &str, what: &str, owner: Owner, ttl: Duration) -> LockRecord {
        let now = jiff::Timestamp::now();
        LockRecord {
            format: LOCK_FORMAT,
            kind: kind.to_string(),
            what: what.to_string(),
            owner,
            token: hex::encode(rand::random::<[u8; 12]>()),
            started: now,
            heartbeat: now,
            expires: now + ttl_span(ttl),
        }
    }

    fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Why this lock object is stale as seen by `me` at `now`, if it is.
    pub fn stale(&self, me: &Owner, now: jiff::Timestamp) -> Option<String> {
        let o = &self.owner;
        if o.host == me.host && o.boot_id == me.boot_id {
            if o.pid == me.pid && o.pid_start == me.pid_start {
                return None;
            }
            return (!process_alive(o.pid, o.pid_start))
                .then(|| format!("its process {} on this host is gone", o.pid));
        }
        if o.host == me.host {
            return Some(format!("host {} rebooted since", o.host));
        }
        (now > self.expires).then(|| {
            format!(
                "no heartbeat from host {} since {} (expired {})",
                o.host, self.heartbeat, self.expires
            )
        })
    }

    /// The holder, for messages.
    pub fn describe(&self) -> String {
        format!(
            "{} (host {}, pid {}, since {}, last heartbeat {})",
            self.what, self.owner.host, self.owner.pid, self.started, self.heartbeat
        )
    }
}

fn ttl_span(ttl: Duration) -> jiff::SignedDuration {
    jiff::SignedDuration::try_from(ttl).unwrap_or(jiff::SignedDuration::from_secs(300))
}

/// Reads lock object `name`: `Ok(None)` when it is gone.
pub fn read(backend: &dyn Backend, name: &str) -> Result<Option<LockRecord>> {
    match backend.read(FileKind::Lock, name) {
        Ok(bytes) => serde_json::from_slice::<LockRecord>(&bytes)
            .map(Some)
            .map_err(|e| {
                Error::InvalidArgument(format!(
                    "lock object {}: not a lock object ({e}); if no cbtvault runs, remove it",
                    backend.locate(FileKind::Lock, name)
                ))
            }),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The lock objects in force: stale ones are removed (and logged) on the
/// way, unreadable ones are skipped with a warning.
pub fn live(backend: &dyn Backend) -> Result<Vec<(String, LockRecord)>> {
    let (me, now) = (Owner::current(), jiff::Timestamp::now());
    let mut out = Vec::new();
    for name in backend.list(FileKind::Lock)? {
        match read(backend, &name) {
            Ok(Some(record)) => match record.stale(&me, now) {
                Some(why) => {
                    tracing::info!(lock = %name, holder = %record.describe(), %why, "removing a stale lock object");
                    backend.remove(FileKind::Lock, &name)?;
                }
                None => out.push((name, record)),
            },
            Ok(None) => {}
            Err(e) => tracing::warn!(lock = %name, error = %e, "lock object skipped"),
        }
    }
    Ok(out)
}

/// A lock object this process holds: renewed by a heartbeat thread,
/// removed when dropped.
#[derive(Debug)]
pub struct Lease {
    shared: Arc<Shared>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    backend: Arc<dyn Backend>,
    name: String,
    record: Mutex<LockRecord>,
    ttl: LockTtl,
    lost: AtomicBool,
}

impl Shared {
    /// Writes a heartbeat, unless the object is no longer ours.
    fn renew(&self) {
        let mut record = self.record.lock().unwrap_or_else(|e| e.into_inner());
        match read(self.backend.as_ref(), &self.name) {
            Ok(Some(current)) if current.token == record.token => {}
            Ok(other) => {
                tracing::error!(lock = %self.name, holder = ?other.map(|o| o.describe()), "this process's lock object was taken over or removed: what it guards is no longer safe");
                self.lost.store(true, Ordering::SeqCst);
                return;
            }
            Err(e) => {
                tracing::warn!(lock = %self.name, error = %e, "could not read the lock object for a heartbeat")
            }
        }
        let now = jiff::Timestamp::now();
        let mut next = record.clone();
        next.heartbeat = now;
        next.expires = now + ttl_span(self.ttl.ttl);
        match self
            .backend
            .replace(FileKind::Lock, &self.name, &next.to_json())
        {
            Ok(()) => *record = next,
            Err(e) if now > record.expires => {
                tracing::error!(lock = %self.name, error = %e, "no heartbeat written before the lock object expired: it is lost");
                self.lost.store(true, Ordering::SeqCst);
            }
            Err(e) => {
                tracing::warn!(lock = %self.name, error = %e, "heartbeat not written; retrying")
            }
        }
    }
}

/// The leases this process holds, to tell whether one was lost.
static HELD: Mutex<Vec<std::sync::Weak<Shared>>> = Mutex::new(Vec::new());

/// The name of a lock object this process holds but lost, if any: what it
/// guards is no longer safe to commit.
pub fn lost() -> Option<String> {
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    held.retain(|w| w.strong_count() > 0);
    held.iter()
        .filter_map(std::sync::Weak::upgrade)
        .find(|s| s.lost.load(Ordering::SeqCst))
        .map(|s| s.name.clone())
}

impl Lease {
    fn start(backend: Arc<dyn Backend>, name: String, record: LockRecord, ttl: LockTtl) -> Lease {
        let shared = Arc::new(Shared {
            backend,
            name,
            record: Mutex::new(record),
            ttl,
            lost: AtomicBool::new(false),
        });
        HELD.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(&shared));
        let (stop, rx) = mpsc::channel::<()>();
        let beat = shared.clone();
        let thread = std::thread::Builder::new()
            .name("cbtvault-heartbeat".into())
            .spawn(move || {
                loop {
                    match rx.recv_timeout(beat.ttl.heartbeat) {
                        Err(RecvTimeoutError::Timeout) => beat.renew(),
                        _ => return,
                    }
                }
            })
            .ok();
        if thread.is_none() {
            tracing::warn!("no heartbeat thread: the lock object expires after its TTL");
        }
        Lease {
            shared,
            stop: Some(stop),
            thread,
        }
    }

    /// The lock object's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Its content as last written.
    pub fn record(&self) -> LockRecord {
        self.shared
            .record
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// True when a heartbeat found the object taken over, or could not be
    /// written before it expired.
    pub fn is_lost(&self) -> bool {
        self.shared.lost.load(Ordering::SeqCst)
    }

    /// Renews it now (tests; the heartbeat thread does it otherwise).
    pub fn renew(&self) {
        self.shared.renew();
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let s = &self.shared;
        let token = s
            .record
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .token
            .clone();
        // Only our own holding is removed, never a successor's.
        match read(s.backend.as_ref(), &s.name) {
            Ok(Some(current)) if current.token == token => {
                if let Err(e) = s.backend.remove(FileKind::Lock, &s.name) {
                    tracing::warn!(lock = %s.name, error = %e, "lock object not removed; it goes stale when this process ends");
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(lock = %s.name, error = %e, "lock object not removed; it goes stale when this process ends")
            }
        }
    }
}

/// Registers an operation (`op-TOKEN`): many at once, never refused.
pub fn register(backend: &Arc<dyn Backend>, what: &str, ttl: LockTtl) -> Result<Lease> {
    let record = LockRecord::new("operation", what, Owner::current(), ttl.ttl);
    let name = format!("op-{}", record.token);
    backend.create(FileKind::Lock, &name, &record.to_json())?;
    Ok(Lease::start(backend.clone(), name, record, ttl))
}

/// Takes exclusive lock object `name` (`kind` and `what` say what for),
/// retrying for up to `wait`; a stale holder is removed and the lock taken.
pub fn acquire(
    backend: &Arc<dyn Backend>,
    name: &str,
    kind: &str,
    what: &str,
    wait: Duration,
    ttl: LockTtl,
) -> Result<Lease> {
    acquire_as(backend, name, kind, what, wait, ttl, Owner::current())
}

pub(crate) fn acquire_as(
    backend: &Arc<dyn Backend>,
    name: &str,
    kind: &str,
    what: &str,
    wait: Duration,
    ttl: LockTtl,
    owner: Owner,
) -> Result<Lease> {
    let deadline = Instant::now() + wait;
    loop {
        let record = LockRecord::new(kind, what, owner.clone(), ttl.ttl);
        let created = backend.create(FileKind::Lock, name, &record.to_json())?;
        // Read back: on a store that ignored the condition the last writer
        // wins, and a create retried after a lost answer finds its own.
        let holder = read(backend.as_ref(), name)?;
        match holder {
            Some(h) if h.token == record.token => {
                return Ok(Lease::start(backend.clone(), name.to_string(), record, ttl));
            }
            Some(h) => {
                if created {
                    tracing::warn!(lock = %name, "the store did not refuse a second lock object: conditional writes look unsupported, the last writer holds it");
                }
                if let Some(why) = h.stale(&owner, jiff::Timestamp::now()) {
                    tracing::info!(lock = %name, holder = %h.describe(), %why, "taking over a stale lock object");
                    backend.remove(FileKind::Lock, name)?;
                    continue;
                }
                if Instant::now() >= deadline {
                    return Err(Error::Locked {
                        what: what.to_string(),
                        holder: h.describe(),
                    });
                }
            }
            None if Instant::now() >= deadline && !created => {
                return Err(Error::Locked {
                    what: what.to_string(),
                    holder: "another process (its lock object came and went)".into(),
                });
            }
            None => {}
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A short, stable id of this host (its name), for names of partial files.
pub fn host_key() -> String {
    static KEY: OnceLock<String> = OnceLock::new();
    KEY.get_or_init(|| hex::encode(&blake3::hash(host_name().as_bytes()).as_bytes()[..4]))
        .clone()
}

fn host_name() -> String {
    let name = read_trimmed("/proc/sys/kernel/hostname");
    if name.is_empty() {
        std::env::var("HOSTNAME").unwrap_or_else(|_| "unknown".into())
    } else {
        name
    }
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Process `pid`'s start time (`/proc/PID/stat` field 22), if it runs.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; it ends at the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// True when process `pid` of this host runs (and, when `start` is not 0,
/// is the process that started then, not a later one with its pid).
pub fn process_alive(pid: u32, start: u64) -> bool {
    match process_start(pid) {
        None => false,
        Some(s) => start == 0 || s == start,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemoryBackend;

    fn other_host() -> Owner {
        Owner {
            host: "elsewhere".into(),
            boot_id: "b".into(),
            pid: 1,
            pid_start: 1,
        }
    }

    fn short() -> LockTtl {
        LockTtl {
            ttl: Duration::from_millis(600),
            heartbeat: Duration::from_millis(100),
        }
    }

    #[test]
    fn an_exclusive_lock_object_is_refused_while_its_heartbeat_renews_it() {
        let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
        // Held by a process of another host, whose heartbeats keep coming.
        let held = acquire_as(
            &backend,
            "gc",
            "gc",
            "gc",
            Duration::ZERO,
            short(),
            other_host(),
        )
        .unwrap();
        let first = held.record();
        std::thread::sleep(Duration::from_millis(900));
        let renewed = read(backend.as_ref(), "gc").unwrap().unwrap();
        assert!(renewed.heartbeat > first.heartbeat, "heartbeats renew it");
        assert!(renewed.expires > first.expires);
        let err = acquire(
            &backend,
            "gc",
            "gc",
            "gc",
            Duration::from_millis(200),
            short(),
        )
        .unwrap_err();
        assert!(
            matches!(&err, Error::Locked { holder, .. } if holder.contains("elsewhere")),
            "{err}"
        );
        assert!(!held.is_lost());
        drop(held);
        assert!(
            read(backend.as_ref(), "gc").unwrap().is_none(),
            "removed on drop"
        );
        acquire(&backend, "gc", "gc", "gc", Duration::ZERO, short()).unwrap();
    }

    #[test]
    fn another_hosts_lock_object_is_stale_after_its_expiry_and_taken_over() {
        let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
        // A host that died: its object stays, with no heartbeat.
        let dead = LockRecord::new("disk", "a backup", other_host(), short().ttl);
        backend
            .write(FileKind::Lock, "disk-1", &dead.to_json())
            .unwrap();
        let now = jiff::Timestamp::now();
        assert!(dead.stale(&Owner::current(), now).is_none());
        assert!(acquire(&backend, "disk-1", "disk", "d", Duration::ZERO, short()).is_err());
        let later = now + jiff::SignedDuration::from_secs(1);
        assert!(dead.stale(&Owner::current(), later).is_some());
        let lease = acquire(
            &backend,
            "disk-1",
            "disk",
            "d",
            Duration::from_secs(2),
            short(),
        )
        .unwrap();
        assert_eq!(lease.record().owner, Owner::current());
        // The dead host's entry was taken over: `live` lists only ours.
        let live = live(backend.as_ref()).unwrap();
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].1.token, lease.record().token);
    }

    #[test]
    fn a_dead_process_of_this_host_is_stale_at_once_and_a_taken_over_lease_is_lost() {
        let me = Owner::current();
        let dead = Owner {
            pid: u32::MAX - 1,
            ..me.clone()
        };
        let record = LockRecord::new("disk", "a backup", dead, Duration::from_secs(3600));
        assert!(record.stale(&me, jiff::Timestamp::now()).is_some());
        let rebooted = Owner {
            boot_id: "before".into(),
            ..me.clone()
        };
        let record = LockRecord::new("disk", "a backup", rebooted, Duration::from_secs(3600));
        assert!(record.stale(&me, jiff::Timestamp::now()).is_some());

        let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
        let lease = register(&backend, "a restore", short()).unwrap();
        assert!(live(backend.as_ref()).unwrap().len() == 1);
        let mut stolen = lease.record();
        stolen.token = "someone else".into();
        backend
            .replace(FileKind::Lock, lease.name(), &stolen.to_json())
            .unwrap();
        lease.renew();
        assert!(lease.is_lost());
        let name = lease.name().to_string();
        drop(lease);
        assert!(
            read(backend.as_ref(), &name).unwrap().is_some(),
            "a successor's object is never removed"
        );
    }
}
