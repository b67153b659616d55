//! The client against a hostile QMP peer over an in-memory duplex stream:
//! a recorded, valid monitor session (greeting, replies matched by id,
//! events, an error reply) with its JSON mutated node by node or byte by
//! byte, or replaced by random bytes. Every command must end in a value
//! or a typed error, without a panic, within a deadline, and without an
//! allocation beyond the limit.

use std::time::Duration;

use cbtvault_qmp::{Options, Qmp};
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::watch::{runtime, watch};

const ALLOC_LIMIT: usize = 4 << 20;
const DEADLINE: Duration = Duration::from_secs(20);

/// What the monitor sends: the greeting, then one segment per command.
fn session() -> Vec<Value> {
    vec![
        json!({"QMP": {"version": {"qemu": {"micro": 1, "minor": 2, "major": 8}, "package": "Debian 1:8.2.1"}, "capabilities": ["oob"]}}),
        json!({"return": {}, "id": 1}),
        json!([
            {"event": "JOB_STATUS_CHANGE", "data": {"status": "running", "id": "job0"}, "timestamp": {"seconds": 1_700_000_000, "microseconds": 5}},
            {"return": {"qemu": {"micro": 1, "minor": 2, "major": 8}, "package": ""}, "id": 2}
        ]),
        json!({"return": [{
            "node-name": "disk", "drv": "qcow2", "ro": false, "file": "/images/d.qcow2",
            "image": {"virtual-size": 1_099_511_627_776u64, "filename": "/images/d.qcow2", "format": "qcow2"},
            "dirty-bitmaps": [{"name": "cbt-1", "recording": true, "persistent": true, "busy": false,
                "granularity": 65536, "count": 131072, "inconsistent": false}]
        }], "id": 3}),
        json!({"return": [{"id": "job0", "type": "backup", "status": "concluded",
            "current-progress": 10, "total-progress": 10, "error": "No space left on device"}], "id": 4}),
        json!([
            {"event": "BLOCK_JOB_COMPLETED", "data": {"device": "job0", "len": 10, "offset": 10, "speed": 0, "type": "backup"}},
            {"return": [{"device": "job0", "type": "backup", "len": 10, "offset": 10, "busy": false,
                "paused": false, "ready": true, "status": "ready"}], "id": 5}
        ]),
        json!({"error": {"class": "GenericError", "desc": "Dirty bitmap 'b' not found"}, "id": 6}),
    ]
}

/// A segment as lines: an array stands for several messages.
fn lines(segment: &Value) -> String {
    match segment {
        Value::Array(items) if items.iter().all(Value::is_object) => {
            items.iter().map(|m| format!("{m}\n")).collect()
        }
        other => format!("{other}\n"),
    }
}

/// Plays `segments` to the client: the first at once, each later one
/// after a line from the client or `patience` of silence; then closes.
async fn monitor<S>(stream: S, segments: Vec<Vec<u8>>, patience: Option<Duration>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (r, mut w) = tokio::io::split(stream);
    let mut r = BufReader::new(r);
    let mut line = String::new();
    for (i, segment) in segments.iter().enumerate() {
        if i > 0 {
            line.clear();
            let read = r.read_line(&mut line);
            let got = match patience {
                None => read.await.ok(),
                Some(d) => tokio::time::timeout(d, read).await.unwrap_or(Ok(1)).ok(),
            };
            if got == Some(0) {
                break;
            }
        }
        if w.write_all(segment).await.is_err() {
            return;
        }
    }
    let _ = w.shutdown().await;
    // Drain until the client goes, so its writes never fail on us.
    let mut sink = tokio::io::sink();
    let _ = tokio::io::copy(&mut r, &mut sink).await;
}

/// What the client made of a session, one entry per step.
async fn client(segments: Vec<Vec<u8>>, patience: Option<Duration>) -> Vec<String> {
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    tokio::spawn(monitor(theirs, segments, patience));
    let options = Options {
        greeting_timeout: Duration::from_secs(5),
        command_timeout: Duration::from_secs(5),
        event_capacity: 8,
    };
    let qmp = match Qmp::from_stream(ours, "fuzz peer".into(), options).await {
        Ok(q) => q,
        Err(e) => return vec![format!("connect: {e}")],
    };
    let mut out = vec![format!("greeting: {}", qmp.greeting().version)];
    out.push(format!(
        "{:?}",
        qmp.query_version().await.map(|v| v.to_string())
    ));
    out.push(format!("{:?}", qmp.query_named_block_nodes().await));
    out.push(format!("{:?}", qmp.query_jobs().await));
    out.push(format!("{:?}", qmp.query_block_jobs().await));
    out.push(format!(
        "{:?}",
        qmp.block_dirty_bitmap_remove("disk", "b").await
    ));
    let event = qmp
        .wait_event(
            "JOB_STATUS_CHANGE",
            |e| e.data_str("id") == Some("job0"),
            Duration::from_millis(10),
        )
        .await;
    out.push(format!("{event:?}"));
    out.push(format!("{} events left", qmp.take_events().len()));
    out
}

fn check(segments: Vec<Vec<u8>>, patience: Option<Duration>) -> Result<Vec<String>, TestCaseError> {
    let (out, w) = watch(|| {
        runtime()
            .block_on(async { tokio::time::timeout(DEADLINE, client(segments, patience)).await })
    });
    prop_assert_eq!(w.panics, 0, "a panic in the client");
    prop_assert!(
        w.largest_alloc <= ALLOC_LIMIT,
        "allocated {} bytes at once (limit {ALLOC_LIMIT})",
        w.largest_alloc
    );
    out.map_err(|_| TestCaseError::fail(format!("the session hung for {DEADLINE:?}")))
}

fn bytes(segments: &[Value]) -> Vec<Vec<u8>> {
    segments.iter().map(|s| lines(s).into_bytes()).collect()
}

#[test]
fn recorded_session_is_valid() {
    let out = check(bytes(&session()), None).unwrap();
    assert_eq!(out[0], "greeting: 8.2.1 (Debian 1:8.2.1)");
    assert_eq!(out[1], "Ok(\"8.2.1\")");
    assert!(out[2].contains("virtual_size: 1099511627776"), "{}", out[2]);
    assert!(out[3].contains("status: Concluded"), "{}", out[3]);
    assert!(out[4].contains("status: Ready"), "{}", out[4]);
    assert!(out[5].contains("not found"), "{}", out[5]);
    assert!(
        out[6].starts_with("Ok(Event { name: \"JOB_STATUS_CHANGE\""),
        "{}",
        out[6]
    );
    assert_eq!(out[7], "1 events left");
}

/// A greeting that never ends: cut at 64 KiB, with memory to match.
#[test]
fn endless_greeting_is_not_qmp() {
    let out = check(vec![vec![b'{'; 2 << 20]], None).unwrap();
    assert!(out[0].contains("is not a QMP monitor"), "{out:?}");
}

/// A flood of events keeps only the newest `event_capacity`.
#[test]
fn event_flood_is_bounded() {
    let mut segments = bytes(&session());
    let flood: String = (0..20_000)
        .map(|i| format!("{{\"event\": \"X\", \"data\": {{\"n\": {i}}}}}\n"))
        .collect();
    segments[1].splice(0..0, flood.into_bytes());
    let out = check(segments, None).unwrap();
    // Eight kept after the flood, two more events pushed two out, one
    // taken by the wait.
    assert_eq!(out[7], "7 events left", "{out:?}");
}

/// Regression: large events were kept up to the event count (4096 by
/// default) whatever their size, so a monitor sending 1 MiB events could
/// make the client hold gigabytes. At most 16 MiB of events are kept.
#[test]
fn large_events_are_bounded_in_bytes() {
    let mut segments = bytes(&session());
    let big = "y".repeat(1 << 20);
    let flood: String = (0..40)
        .map(|i| format!("{{\"event\": \"BIG\", \"data\": {{\"n\": {i}, \"pad\": \"{big}\"}}}}\n"))
        .collect();
    segments[1].splice(0..0, flood.into_bytes());
    let (out, _) = watch(|| {
        runtime().block_on(async {
            let (ours, theirs) = tokio::io::duplex(64 * 1024);
            tokio::spawn(monitor(theirs, segments, None));
            let qmp = Qmp::from_stream(ours, "fuzz peer".into(), Options::default())
                .await
                .expect("connected");
            let kept = qmp.buffered_events();
            let bytes: usize = kept.iter().map(|e| e.data.to_string().len()).sum();
            (kept.len(), bytes)
        })
    });
    let (count, bytes) = out;
    assert!(count > 0, "the newest events are kept");
    assert!(bytes <= 16 << 20, "{count} events of {bytes} bytes kept");
}

/// Values a hostile monitor might put anywhere in a message.
fn weird() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(-1)),
        Just(json!(0.5)),
        Just(json!(true)),
        Just(json!("")),
        Just(json!([])),
        Just(json!({})),
        Just(json!({"return": {}, "id": 1})),
        Just(json!({"event": 5})),
        (1usize..200).prop_map(|depth| (0..depth).fold(json!(0), |v, _| json!([v]))),
        (0usize..100_000).prop_map(|n| Value::String("x".repeat(n))),
        ".{0,12}".prop_map(Value::String),
        any::<i64>().prop_map(|i| json!(i)),
    ]
}

/// Every node of a value, as a path of indexes and keys.
fn paths(v: &Value, at: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    out.push(at.clone());
    match v {
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                at.push(json!(i));
                paths(item, at, out);
                at.pop();
            }
        }
        Value::Object(m) => {
            for (k, item) in m {
                at.push(json!(k));
                paths(item, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

fn node<'a>(v: &'a mut Value, path: &[Value]) -> &'a mut Value {
    path.iter().fold(v, |v, step| match step {
        Value::Number(i) => &mut v[i.as_u64().unwrap_or(0) as usize],
        Value::String(k) => &mut v[k.as_str()],
        _ => v,
    })
}

#[derive(Clone, Debug)]
enum Edit {
    /// Replaces a node of a segment.
    Node(Index, Index, Value),
    /// Removes a member or element.
    Remove(Index, Index),
    Flip(Index, Index, u8),
    Truncate(Index, Index),
    Insert(Index, Index, Vec<u8>),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (any::<Index>(), any::<Index>(), weird()).prop_map(|(s, n, v)| Edit::Node(s, n, v)),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(s, n)| Edit::Remove(s, n)),
        2 => (any::<Index>(), any::<Index>(), 0u8..8).prop_map(|(s, i, b)| Edit::Flip(s, i, b)),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(s, i)| Edit::Truncate(s, i)),
        1 => (any::<Index>(), any::<Index>(), prop_oneof![
            Just(b"\n".to_vec()),
            Just(b"1e400".to_vec()),
            Just(b"\"\\ud800\"".to_vec()),
            Just(b"{".to_vec()),
            Just(b"\xff\xfe".to_vec()),
            prop::collection::vec(any::<u8>(), 1..8),
        ]).prop_map(|(s, i, b)| Edit::Insert(s, i, b)),
    ]
}

/// Node edits first (on the values), then byte edits (on the lines).
fn apply(edits: &[Edit]) -> Vec<Vec<u8>> {
    let mut values = session();
    for e in edits {
        let (s, n, replacement) = match e {
            Edit::Node(s, n, v) => (s, n, Some(v)),
            Edit::Remove(s, n) => (s, n, None),
            _ => continue,
        };
        let seg = &mut values[s.index(7)];
        let mut all = Vec::new();
        paths(seg, &mut Vec::new(), &mut all);
        let path = &all[n.index(all.len())];
        match (replacement, path.split_last()) {
            (Some(v), _) => *node(seg, path) = v.clone(),
            (None, Some((last, parent))) => match (node(seg, parent), last) {
                (Value::Object(m), Value::String(k)) => {
                    m.remove(k);
                }
                (Value::Array(a), Value::Number(i)) => {
                    a.remove(i.as_u64().unwrap_or(0) as usize);
                }
                _ => {}
            },
            (None, None) => {}
        }
    }
    let mut out = bytes(&values);
    for e in edits {
        let seg = match e {
            Edit::Flip(s, ..) | Edit::Truncate(s, _) | Edit::Insert(s, ..) => {
                let i = s.index(out.len());
                &mut out[i]
            }
            _ => continue,
        };
        let len = seg.len();
        match e {
            Edit::Flip(_, i, b) if len > 0 => seg[i.index(len)] ^= 1 << b,
            Edit::Truncate(_, i) if len > 0 => seg.truncate(i.index(len)),
            Edit::Insert(_, i, b) => {
                let at = i.index(len + 1);
                seg.splice(at..at, b.iter().copied());
            }
            _ => {}
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn mutated_sessions(edits in prop::collection::vec(edit(), 1..4)) {
        check(apply(&edits), Some(Duration::from_millis(20)))?;
    }

    /// Random bytes as the greeting or after it.
    #[test]
    fn random_bytes(after_greeting in any::<bool>(), noise in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut segments = vec![noise];
        if after_greeting {
            segments.insert(0, bytes(&session()).remove(0));
        }
        let out = check(segments, Some(Duration::from_millis(20)))?;
        if !after_greeting {
            prop_assert!(out[0].starts_with("connect: "), "{:?}", out);
        }
    }
}
