//! Who may connect, and who is dropped when the server is full.
//!
//! Every connection is registered with its peer (an IP address, or a unix
//! socket's user id) and what it is doing. A new client beyond its peer's
//! share takes the place of one of that peer's connections that waits on
//! its own client; beyond the total, of one of the peer with the most
//! connections. The order: a connection still in the handshake, then the
//! one idle or not taking its replies, each the oldest first. A
//! connection busy for its client is never dropped; without a connection
//! to drop, the newcomer is closed at once. A flood from the address of a
//! well-behaved client competes with it; one from elsewhere only with
//! itself, as long as the total leaves room for every peer's share.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// Who a connection comes from, for the per-peer share.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum PeerKey {
    Ip(IpAddr),
    Uid(u32),
    /// Unknown: counted only against the total.
    Unknown,
}

impl PeerKey {
    pub(crate) fn ip(ip: IpAddr) -> PeerKey {
        // An IPv4 client on a dual-stack socket is the same peer.
        match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => PeerKey::Ip(IpAddr::V4(v4)),
                None => PeerKey::Ip(ip),
            },
            v4 => PeerKey::Ip(v4),
        }
    }
}

/// A reply write that made no progress for this long means the client is
/// not reading: its connection may be dropped for a newcomer or for
/// memory another connection needs. Long enough that a reader starved of
/// CPU on a loaded host (a second was seen to drop nbdcopy) is not taken
/// for one that never reads; the memory stays bounded meanwhile, since
/// requests wait for the budget.
const STALLED: Duration = Duration::from_secs(10);

/// What one connection is doing, updated by its tasks without locks.
pub(crate) struct Activity {
    epoch: Instant,
    /// Milliseconds since `epoch` of the last request read, reply bytes
    /// written or handshake start.
    last: AtomicU64,
    established: AtomicBool,
    /// Requests read whose replies are not written yet.
    inflight: AtomicUsize,
    /// The reply writer has bytes the client has not taken.
    writing: AtomicBool,
    /// Cancelled when the connection is dropped to make room.
    pub(crate) evicted: CancellationToken,
}

impl Activity {
    pub(crate) fn new(epoch: Instant) -> Activity {
        let a = Activity {
            epoch,
            last: AtomicU64::new(0),
            established: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            writing: AtomicBool::new(false),
            evicted: CancellationToken::new(),
        };
        a.touch();
        a
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The client did something.
    pub(crate) fn touch(&self) {
        self.last.store(self.now(), Ordering::Relaxed);
    }

    pub(crate) fn established(&self) {
        self.established.store(true, Ordering::Relaxed);
        self.touch();
    }

    pub(crate) fn request_read(&self) {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        self.touch();
    }

    pub(crate) fn reply_done(&self) {
        self.inflight.fetch_sub(1, Ordering::Relaxed);
        self.touch();
    }

    pub(crate) fn set_writing(&self, on: bool) {
        self.writing.store(on, Ordering::Relaxed);
    }

    /// How long since the client last did anything, if the connection
    /// now waits on nothing but it.
    pub(crate) fn idle_for(&self) -> Option<Duration> {
        let idle = self.inflight.load(Ordering::Relaxed) == 0;
        idle.then(|| {
            Duration::from_millis(self.now().saturating_sub(self.last.load(Ordering::Relaxed)))
        })
    }

    /// Whether the writer waits on a client that does not read replies.
    fn stalled(&self, now: u64) -> bool {
        self.writing.load(Ordering::Relaxed)
            && now.saturating_sub(self.last.load(Ordering::Relaxed)) >= STALLED.as_millis() as u64
    }

    /// The eviction order of a connection that waits on its client
    /// (smaller goes first), or `None` for one busy for its client: one
    /// still in the handshake first, then one idle or not reading replies,
    /// each oldest first.
    fn eviction_rank(&self, now: u64) -> Option<(bool, u64)> {
        let established = self.established.load(Ordering::Relaxed);
        let last = self.last.load(Ordering::Relaxed);
        let waiting =
            !established || self.inflight.load(Ordering::Relaxed) == 0 || self.stalled(now);
        waiting.then_some((established, last))
    }
}

struct Entry {
    id: u64,
    peer: PeerKey,
    activity: Arc<Activity>,
}

/// The connections being served, with the limits.
pub(crate) struct Registry {
    epoch: Instant,
    total: usize,
    per_peer: usize,
    evict: bool,
    entries: Mutex<(u64, Vec<Entry>)>,
}

/// A registered connection; unregisters when dropped.
pub(crate) struct Admitted {
    registry: Arc<Registry>,
    id: u64,
    pub(crate) activity: Arc<Activity>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut e = self
            .registry
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        e.1.retain(|x| x.id != self.id);
    }
}

/// Why a client was refused.
#[derive(Debug)]
pub(crate) enum Refused {
    PeerShare(usize),
    Total(usize),
}

impl Registry {
    pub(crate) fn new(total: usize, per_peer: usize, evict: bool) -> Registry {
        Registry {
            epoch: Instant::now(),
            total: total.max(1),
            per_peer: per_peer.max(1),
            evict,
            entries: Mutex::new((0, Vec::new())),
        }
    }

    /// Registers a client from `peer`, dropping a waiting connection to
    /// make room if needed.
    pub(crate) fn admit(self: &Arc<Self>, peer: PeerKey) -> Result<Admitted, Refused> {
        let mut guard = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let (next_id, entries) = &mut *guard;
        let now = self.epoch.elapsed().as_millis() as u64;
        let counted = peer != PeerKey::Unknown;
        if counted
            && entries.iter().filter(|e| e.peer == peer).count() >= self.per_peer
            && !self.evict_one(entries, now, Some(&peer))
        {
            return Err(Refused::PeerShare(self.per_peer));
        }
        if entries.len() >= self.total && !self.evict_one(entries, now, None) {
            return Err(Refused::Total(self.total));
        }
        *next_id += 1;
        let activity = Arc::new(Activity::new(self.epoch));
        entries.push(Entry {
            id: *next_id,
            peer,
            activity: activity.clone(),
        });
        Ok(Admitted {
            registry: self.clone(),
            id: *next_id,
            activity,
        })
    }

    /// Drops the connection (of `peer`, or any) that waited longest on
    /// its client; false if every one is busy.
    fn evict_one(&self, entries: &mut Vec<Entry>, now: u64, peer: Option<&PeerKey>) -> bool {
        if !self.evict {
            return false;
        }
        // When the total is full, the victim comes from the peer with the
        // most connections: no peer loses its share to a bigger one.
        let mut shares: std::collections::HashMap<&PeerKey, usize> = Default::default();
        for e in entries.iter() {
            *shares.entry(&e.peer).or_default() += 1;
        }
        let share = |p: &PeerKey| shares.get(p).copied().unwrap_or(0);
        let victim = entries
            .iter()
            .enumerate()
            .filter(|(_, e)| peer.is_none_or(|p| &e.peer == p))
            .filter_map(|(i, e)| {
                let rank = e.activity.eviction_rank(now)?;
                Some((std::cmp::Reverse(share(&e.peer)), rank, i))
            })
            .min()
            .map(|(_, _, i)| i);
        match victim {
            Some(i) => {
                let e = entries.swap_remove(i);
                tracing::info!(peer = ?e.peer, "server full: dropping the connection that waited longest on its client");
                e.activity.evicted.cancel();
                true
            }
            None => false,
        }
    }

    /// Drops the connection whose client has not taken its replies for
    /// the longest time (at least `STALLED`), so that the memory it holds
    /// serves others; false if there is none.
    pub(crate) fn evict_stalled(&self) -> bool {
        if !self.evict {
            return false;
        }
        let mut guard = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.epoch.elapsed().as_millis() as u64;
        let victim = guard
            .1
            .iter()
            .enumerate()
            .filter(|(_, e)| e.activity.stalled(now))
            .min_by_key(|(_, e)| e.activity.last.load(Ordering::Relaxed))
            .map(|(i, _)| i);
        match victim {
            Some(i) => {
                let e = guard.1.swap_remove(i);
                tracing::info!(peer = ?e.peer, "memory budget used up: dropping a client that does not read its replies");
                e.activity.evicted.cancel();
                true
            }
            None => false,
        }
    }

    /// A detached activity record, for connections served without the
    /// registry ([`super::Server::serve_stream`]).
    pub(crate) fn detached(&self) -> Arc<Activity> {
        Arc::new(Activity::new(self.epoch))
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::PeerShare(n) => write!(f, "this peer already has {n} connections, all busy"),
            Refused::Total(n) => write!(f, "{n} connections, all busy"),
        }
    }
}
