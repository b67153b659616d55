//! Sessions and their limits, as xapi enforces them (`xapi_globs.ml`,
//! `db_gc_util.ml`): at most 500 sessions per originator and 400
//! anonymous ones (empty originator); a login over the limit destroys the
//! least recently used sessions of its group; a session idle longer than
//! the inactivity timeout (a day) is gone. Sessions live in memory only,
//! so a restart invalidates them all, as a host restart does.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cbtvault_xenapi::XapiError;

use crate::model::{new_ref, new_uuid, now_datetime};

/// Session limits.
#[derive(Clone, Copy, Debug)]
pub struct SessionLimits {
    /// Sessions per non-empty originator (xapi: 500).
    pub per_originator: usize,
    /// Sessions with an empty originator (xapi: 400).
    pub anonymous: usize,
    /// Idle time after which a session is invalid (xapi: 86400 s).
    pub inactive_timeout: Duration,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            per_originator: 500,
            anonymous: 400,
            inactive_timeout: Duration::from_secs(86_400),
        }
    }
}

/// One session.
#[derive(Clone, Debug)]
pub struct Session {
    /// UUID.
    pub uuid: String,
    /// User name.
    pub user: String,
    /// Originator given at login.
    pub originator: String,
    /// Login time, XAPI text.
    pub created: String,
    /// Last use.
    pub last_active: Instant,
    /// Order of last use, to break ties between equal instants.
    pub last_seq: u64,
}

/// All live sessions.
#[derive(Debug, Default)]
pub struct Sessions {
    map: HashMap<String, Session>,
    limits: SessionLimits,
    seq: u64,
}

impl Sessions {
    /// An empty table with `limits`.
    pub fn new(limits: SessionLimits) -> Self {
        Sessions {
            map: HashMap::new(),
            limits,
            seq: 0,
        }
    }

    /// Creates a session, evicting the least recently used ones of its
    /// group over the limit. Returns its reference.
    pub fn login(&mut self, user: &str, originator: &str) -> String {
        let limit = if originator.is_empty() {
            self.limits.anonymous
        } else {
            self.limits.per_originator
        };
        let mut group: Vec<(u64, String)> = self
            .map
            .iter()
            .filter(|(_, s)| s.originator == originator)
            .map(|(r, s)| (s.last_seq, r.clone()))
            .collect();
        if group.len() >= limit {
            group.sort();
            let excess = group.len() + 1 - limit.max(1);
            for (_, r) in group.into_iter().take(excess) {
                tracing::debug!("session limit for originator {originator:?}: evicting {r}");
                self.map.remove(&r);
            }
        }
        let r = new_ref();
        self.seq += 1;
        self.map.insert(
            r.clone(),
            Session {
                uuid: new_uuid(),
                user: user.to_owned(),
                originator: originator.to_owned(),
                created: now_datetime(),
                last_active: Instant::now(),
                last_seq: self.seq,
            },
        );
        r
    }

    /// Validates and touches a session.
    pub fn check(&mut self, r: &str) -> Result<&Session, XapiError> {
        let timeout = self.limits.inactive_timeout;
        let expired = match self.map.get(r) {
            None => true,
            Some(s) => s.last_active.elapsed() > timeout,
        };
        if expired {
            self.map.remove(r);
            return Err(XapiError::SessionInvalid {
                handle: r.to_owned(),
            });
        }
        self.seq += 1;
        let seq = self.seq;
        let s = self
            .map
            .get_mut(r)
            .ok_or_else(|| XapiError::SessionInvalid {
                handle: r.to_owned(),
            })?;
        s.last_active = Instant::now();
        s.last_seq = seq;
        Ok(s)
    }

    /// Whether `r` is live, without touching it.
    #[cfg(test)]
    pub fn is_valid(&self, r: &str) -> bool {
        self.map
            .get(r)
            .is_some_and(|s| s.last_active.elapsed() <= self.limits.inactive_timeout)
    }

    /// Ends a session.
    pub fn logout(&mut self, r: &str) {
        self.map.remove(r);
    }

    /// Invalidates every session (the "session expiry" fault).
    pub fn expire_all(&mut self) -> usize {
        let n = self.map.len();
        self.map.clear();
        n
    }

    /// Number of live sessions.
    pub fn count(&self) -> usize {
        self.map.len()
    }

    /// A session by reference.
    pub fn get(&self, r: &str) -> Option<&Session> {
        self.map.get(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_evict_the_least_recently_used_of_the_group() {
        let mut s = Sessions::new(SessionLimits {
            per_originator: 2,
            anonymous: 1,
            inactive_timeout: Duration::from_secs(60),
        });
        let a = s.login("root", "app");
        let b = s.login("root", "app");
        s.check(&a).unwrap(); // a is now more recent than b
        let anon = s.login("root", "");
        let c = s.login("root", "app");
        assert!(s.is_valid(&a) && s.is_valid(&c) && s.is_valid(&anon));
        assert_eq!(
            s.check(&b).unwrap_err(),
            XapiError::SessionInvalid { handle: b.clone() }
        );
        let anon2 = s.login("root", "");
        assert!(!s.is_valid(&anon) && s.is_valid(&anon2));
        assert!(s.is_valid(&a), "other groups are untouched");
        assert_eq!(s.expire_all(), 3);
        assert!(s.check(&a).is_err());
    }

    #[test]
    fn idle_sessions_expire() {
        let mut s = Sessions::new(SessionLimits {
            inactive_timeout: Duration::ZERO,
            ..SessionLimits::default()
        });
        let a = s.login("root", "x");
        std::thread::sleep(Duration::from_millis(5));
        assert!(s.check(&a).is_err());
    }
}
