//! `event.from(classes, token, timeout)`, the way real clients wait for
//! tasks: it answers at once with the events after `token`, or waits up to
//! `timeout` seconds for one. The simulator records the events of tasks
//! (`add` when an `Async.*` call starts, `mod` when it finishes, `del` when
//! destroyed); other classes produce none. An empty token returns every
//! live task as an `add`. Tokens are decimal event numbers; an unreadable
//! one is `EVENT_FROM_TOKEN_PARSE_FAILURE [token]`, one older than the
//! kept log is `EVENTS_LOST []` (xen-api `xapi_event.ml`).

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use cbtvault_xenapi::{Value, XapiError};

use crate::model::now_datetime;
use crate::sim::Sim;

/// Events kept for late readers.
const KEPT: usize = 1000;
/// Longest wait one call may ask for.
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// One change.
#[derive(Clone, Debug)]
struct Event {
    id: u64,
    class: &'static str,
    operation: &'static str,
    r: String,
    timestamp: String,
}

/// The recent events and a bell for waiters.
#[derive(Debug, Default)]
pub struct EventLog {
    next: u64,
    log: VecDeque<Event>,
}

impl EventLog {
    fn push(&mut self, class: &'static str, operation: &'static str, r: &str) {
        self.next += 1;
        self.log.push_back(Event {
            id: self.next,
            class,
            operation,
            r: r.to_owned(),
            timestamp: now_datetime(),
        });
        while self.log.len() > KEPT {
            self.log.pop_front();
        }
    }
}

impl Sim {
    /// Records a change of `class` object `r` and wakes `event.from` callers.
    pub(crate) fn event(&self, class: &'static str, operation: &'static str, r: &str) {
        self.events().push(class, operation, r);
        self.inner.event_bell.notify_waiters();
    }
}

fn wanted(classes: &[String], class: &str) -> bool {
    classes
        .iter()
        .any(|c| c == "*" || c.eq_ignore_ascii_case(class))
}

/// `event.from`.
pub(crate) async fn from(sim: &Sim, args: &[Value]) -> Result<Value, XapiError> {
    let classes: Vec<String> = args
        .first()
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|c| c.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let token = args
        .get(1)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let timeout = match args.get(2) {
        Some(Value::Double(d)) => *d,
        Some(v) => v.as_i64().unwrap_or(0) as f64,
        None => 0.0,
    };
    let wait = Duration::try_from_secs_f64(timeout.max(0.0))
        .unwrap_or(MAX_WAIT)
        .min(MAX_WAIT);
    if token.is_empty() {
        let now = sim.events().next;
        let tasks = if wanted(&classes, "task") {
            sim.tasks().refs()
        } else {
            Vec::new()
        };
        let events = tasks
            .into_iter()
            .map(|r| event_value(sim, "task", "add", &r, now, &now_datetime()))
            .collect();
        return Ok(reply(events, now));
    }
    let since: u64 = token.parse().map_err(|_| XapiError::Other {
        code: "EVENT_FROM_TOKEN_PARSE_FAILURE".into(),
        params: vec![token.clone()],
    })?;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        // Registered before looking, so a change in between still wakes us.
        let bell = sim.inner.event_bell.notified();
        let (found, last) = {
            let log = sim.events();
            if log.log.front().is_some_and(|e| e.id > since + 1) && since < log.next {
                return Err(XapiError::Other {
                    code: "EVENTS_LOST".into(),
                    params: vec![],
                });
            }
            let found: Vec<Event> = log
                .log
                .iter()
                .filter(|e| e.id > since && wanted(&classes, e.class))
                .cloned()
                .collect();
            (found, log.next.max(since))
        };
        if !found.is_empty() || tokio::time::Instant::now() >= deadline {
            let events = found
                .iter()
                .map(|e| event_value(sim, e.class, e.operation, &e.r, e.id, &e.timestamp))
                .collect();
            return Ok(reply(events, last));
        }
        let _ = tokio::time::timeout_at(deadline, bell).await;
    }
}

fn event_value(
    sim: &Sim,
    class: &str,
    operation: &str,
    r: &str,
    id: u64,
    timestamp: &str,
) -> Value {
    let mut fields = BTreeMap::from([
        ("id".to_owned(), Value::from(id.to_string())),
        ("timestamp".to_owned(), Value::from(timestamp)),
        ("class".to_owned(), Value::from(class)),
        ("operation".to_owned(), Value::from(operation)),
        ("ref".to_owned(), Value::from(r)),
    ]);
    if operation != "del" {
        let host = sim.db().host_ref.clone();
        if let Some(snapshot) = sim.tasks().value(r, &host) {
            fields.insert("snapshot".into(), snapshot);
        }
    }
    Value::Struct(fields)
}

fn reply(events: Vec<Value>, token: u64) -> Value {
    Value::Struct(BTreeMap::from([
        ("events".to_owned(), Value::Array(events)),
        (
            "valid_ref_counts".to_owned(),
            Value::Struct(BTreeMap::new()),
        ),
        ("token".to_owned(), Value::from(token.to_string())),
    ]))
}
