//! Hostile XML-RPC and JSON-RPC clients: calls of every method with
//! random parameters (real references, huge and negative integers, wrong
//! types, nested values), with and without a session, then byte-edited,
//! posted over a real socket. Every request gets an HTTP answer (200 with
//! a well-formed XAPI reply, or xapi's 500 page), nothing panics, no
//! allocation grows past the limit, and the simulator still answers
//! afterwards.

use std::collections::BTreeMap;
use std::time::Duration;

use cbtvault_xapi_sim::{PoolSpec, SimConfig, Simulator};
use cbtvault_xenapi::rpc::{jsonrpc, xmlrpc};
use cbtvault_xenapi::{Response, Transport, Value};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestRunner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::watch::{count_panics, largest_alloc, panics};

pub const PASSWORD: &str = "fuzz-pw";
/// A 16 TiB VDI's changed-block bitmap is 32 MiB, its base64 43 MiB; the
/// replies that carry it are the largest thing a call can make.
const ALLOC_LIMIT: usize = 192 << 20;

pub fn config(dir: &std::path::Path) -> SimConfig {
    let mut config = SimConfig::new(dir, PASSWORD);
    config.pool = PoolSpec {
        vms: 2,
        disks_per_vm: 1,
        disk_size: 1 << 20,
        initial_blocks: 4,
    };
    config.data_destroy_timeout = Duration::from_millis(50);
    config
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Posts one body on a fresh connection; (status, body).
pub async fn post(
    addr: std::net::SocketAddr,
    transport: Transport,
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(addr).await?;
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        transport.path(),
        transport.content_type(),
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out[..out.len().min(64)]).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| out[i + 4..].to_vec())
        .unwrap_or_default();
    Ok((status, body))
}

pub fn encode(transport: Transport, method: &str, params: &[Value]) -> Vec<u8> {
    match transport {
        Transport::JsonRpc => jsonrpc::encode_call(method, params, 1),
        _ => xmlrpc::encode_call(method, params).into_bytes(),
    }
}

pub fn decode(transport: Transport, body: &[u8]) -> Option<Response> {
    match transport {
        Transport::JsonRpc => jsonrpc::decode_response(body).ok(),
        _ => xmlrpc::decode_response(std::str::from_utf8(body).ok()?).ok(),
    }
}

/// Logs in; the session reference.
pub async fn login(addr: std::net::SocketAddr) -> String {
    let params = [
        Value::from("root"),
        Value::from(PASSWORD),
        Value::from("1.1"),
        Value::from("fuzz"),
    ];
    let body = encode(Transport::JsonRpc, "session.login_with_password", &params);
    let (_, reply) = post(addr, Transport::JsonRpc, &body).await.expect("login");
    match decode(Transport::JsonRpc, &reply) {
        Some(Response::Success(Value::String(s))) => s,
        other => panic!("login failed: {other:?}"),
    }
}

/// Every method the simulator knows, some it does not, and odd names.
/// `sim.churn` is left out: it is a load generator, writing as many
/// blocks as asked, by design. `session.logout` too, which would only end
/// the fuzzing session.
const METHODS: &[&str] = &[
    "session.login_with_password",
    "VDI.get_record",
    "VDI.get_all_records",
    "VDI.get_by_uuid",
    "VDI.get_by_name_label",
    "VDI.get_virtual_size",
    "VDI.get_nothing",
    "VDI.snapshot",
    "VDI.enable_cbt",
    "VDI.disable_cbt",
    "VDI.list_changed_blocks",
    "VDI.get_nbd_info",
    "VDI.create",
    "VDI.resize",
    "VDI.resize_online",
    "VDI.add_to_other_config",
    "VDI.remove_from_other_config",
    "VDI.set_other_config",
    "VDI.set_name_label",
    "VDI.data_destroy",
    "VDI.destroy",
    "VM.get_all_records",
    "VM.get_record",
    "VM.snapshot",
    "VM.destroy",
    "VBD.create",
    "VBD.plug",
    "VBD.unplug",
    "VBD.destroy",
    "SR.get_all",
    "task.get_record",
    "task.cancel",
    "task.destroy",
    "host.get_server_certificate",
    "pool.get_all_records",
    "session.get_record",
    "Async.VDI.snapshot",
    "Async.VDI.list_changed_blocks",
    "Async.VDI.create",
    "Async.VDI.get_record",
    "Async.",
    "sim.write",
    "sim.read",
    "sim.write_blocks",
    "sim.resize",
    "sim.plug",
    "sim.unplug",
    "sim.nbd_connections",
    "sim.nothing",
    "nothing",
    "",
    ".",
    "VDI.",
];

/// References that exist when the fuzzing starts, and the session.
#[derive(Clone, Debug)]
pub struct Known {
    pub session: String,
    pub refs: Vec<String>,
}

pub async fn known(addr: std::net::SocketAddr) -> Known {
    let session = login(addr).await;
    let mut refs = Vec::new();
    for class in ["VDI", "VM", "VBD", "SR", "host"] {
        let body = encode(
            Transport::JsonRpc,
            &format!("{class}.get_all"),
            &[Value::from(session.as_str())],
        );
        let (_, reply) = post(addr, Transport::JsonRpc, &body)
            .await
            .expect("get_all");
        if let Some(Response::Success(Value::Array(items))) = decode(Transport::JsonRpc, &reply) {
            refs.extend(
                items
                    .into_iter()
                    .filter_map(|v| v.as_str().map(str::to_owned)),
            );
        }
    }
    Known { session, refs }
}

/// One parameter: a known reference, a string, an int (often huge or
/// negative), or a nested value.
fn param(refs: Vec<String>) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        3 => prop::sample::select(refs).prop_map(Value::String),
        1 => Just(Value::from("OpaqueRef:NULL")),
        1 => ".{0,12}".prop_map(Value::String),
        2 => prop_oneof![
            Just(i64::MAX),
            Just(i64::MIN),
            Just(-1i64),
            Just(0i64),
            Just(1 << 44),
            Just((16i64 << 40) + 1),
            Just(1 << 62),
            0i64..(1 << 21),
        ]
        .prop_map(Value::Int),
        1 => Just(Value::from("AAECAwQFBgc=")),
        1 => any::<bool>().prop_map(Value::Bool),
        1 => Just(Value::Nil),
        1 => any::<f64>().prop_map(Value::Double),
    ];
    leaf.prop_recursive(2, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("SR".to_owned()),
                    Just("virtual_size".to_owned()),
                    Just("type".to_owned()),
                    Just("VM".to_owned()),
                    Just("VDI".to_owned()),
                    Just("mode".to_owned()),
                    Just("other_config".to_owned()),
                    ".{0,6}",
                ],
                inner,
                0..6
            )
            .prop_map(Value::Struct),
        ]
    })
}

/// A `VDI.create` record with a hostile size.
fn create_args(refs: Vec<String>) -> impl Strategy<Value = Value> {
    (
        prop::sample::select(refs),
        prop_oneof![
            Just(i64::MAX),
            Just(1i64 << 50),
            Just(16i64 << 40),
            0i64..(1 << 24),
            Just(-5)
        ],
        prop_oneof![Just("user"), Just("cbt_metadata"), Just("system")],
    )
        .prop_map(|(sr, size, t)| {
            Value::Struct(BTreeMap::from([
                ("SR".to_owned(), Value::String(sr)),
                ("virtual_size".to_owned(), Value::Int(size)),
                ("type".to_owned(), Value::from(t)),
                ("name_label".to_owned(), Value::from("fuzz")),
            ]))
        })
}

/// A whole call: transport, method, parameters, byte edits.
#[derive(Clone, Debug)]
pub struct Call {
    pub xml: bool,
    pub method: String,
    pub params: Vec<Value>,
    pub edits: Vec<(Index, u8)>,
}

pub fn call(known: Known) -> impl Strategy<Value = Call> {
    let refs = known.refs.clone();
    (
        any::<bool>(),
        prop::sample::select(METHODS),
        prop_oneof![4 => Just(true), 1 => Just(false)],
        prop::collection::vec(param(refs.clone()), 0..4),
        prop::option::weighted(0.2, create_args(refs)),
        prop::option::weighted(
            0.25,
            prop::collection::vec((any::<Index>(), any::<u8>()), 1..4),
        ),
    )
        .prop_map(
            move |(xml, method, with_session, mut params, create, edits)| {
                if let Some(c) = create {
                    params.insert(0, c);
                }
                if with_session {
                    params.insert(0, Value::from(known.session.as_str()));
                }
                Call {
                    xml,
                    method: method.to_owned(),
                    params,
                    edits: edits.unwrap_or_default(),
                }
            },
        )
}

/// Sends one call; checks the answer is HTTP 200 with a well-formed
/// reply, or the 500 page.
pub async fn send(addr: std::net::SocketAddr, c: &Call) -> Result<(), String> {
    let transport = if c.xml {
        Transport::XmlRpc
    } else {
        Transport::JsonRpc
    };
    let mut body = encode(transport, &c.method, &c.params);
    for (i, b) in &c.edits {
        let at = i.index(body.len());
        body[at] = *b;
    }
    let (status, reply) =
        tokio::time::timeout(Duration::from_secs(30), post(addr, transport, &body))
            .await
            .map_err(|_| "no answer within 30 s".to_owned())?
            .map_err(|e| format!("connection failed: {e}"))?;
    match status {
        200 if decode(transport, &reply).is_some() => Ok(()),
        200 => Err(format!(
            "HTTP 200 with a malformed reply: {}",
            String::from_utf8_lossy(&reply[..reply.len().min(300)])
        )),
        500 if c.edits.is_empty() && decode(transport, &body).is_some() => {
            Err("HTTP 500 for a well-formed call".into())
        }
        500 => Ok(()),
        other => Err(format!(
            "HTTP {other}: {}",
            String::from_utf8_lossy(&reply[..reply.len().min(300)])
        )),
    }
}

#[test]
fn hostile_calls() {
    count_panics();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let rt = runtime();
    let sim = rt
        .block_on(Simulator::start(config(dir.path())))
        .expect("simulator");
    let addr = sim.addr();
    let known = rt.block_on(known(addr));
    let before = panics();
    let mut runner = TestRunner::new(Config {
        cases: 256,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&call(known), |c| {
        let sent = rt.block_on(send(addr, &c));
        prop_assert_eq!(panics(), before, "the simulator panicked on {:?}", c);
        prop_assert!(
            largest_alloc() <= ALLOC_LIMIT,
            "{} bytes allocated at once",
            largest_alloc()
        );
        sent.map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // Still serving.
    let session = rt.block_on(login(addr));
    assert!(session.starts_with("OpaqueRef:"), "{session}");
    rt.block_on(sim.shutdown());
}

/// Regression: a client could create (or grow a VDI to) any size the
/// file system allows; on tmpfs that is 8 EiB, and enabling CBT then
/// allocated a bitmap of terabytes. Sizes past 16 TiB are refused as the
/// storage manager refuses them.
#[test]
fn vdi_sizes_past_16_tib_are_refused() {
    count_panics();
    // tmpfs lets a sparse file be that large; elsewhere the file system
    // may refuse first, which hides the allocation.
    let base = std::path::Path::new("/dev/shm");
    let dir = if base.is_dir() {
        tempfile::tempdir_in(base)
    } else {
        tempfile::tempdir()
    }
    .expect("a temporary directory");
    let rt = runtime();
    let sim = rt
        .block_on(Simulator::start(config(dir.path())))
        .expect("simulator");
    let addr = sim.addr();
    let known = rt.block_on(known(addr));
    let sr = known.refs.iter().find(|r| {
        let body = encode(
            Transport::JsonRpc,
            "SR.get_record",
            &[Value::from(known.session.as_str()), Value::from(r.as_str())],
        );
        let (_, reply) = rt
            .block_on(post(addr, Transport::JsonRpc, &body))
            .expect("SR.get_record");
        matches!(
            decode(Transport::JsonRpc, &reply),
            Some(Response::Success(_))
        )
    });
    let sr = sr.expect("an SR").clone();
    let rpc = |method: &str, params: Vec<Value>| {
        let mut all = vec![Value::from(known.session.as_str())];
        all.extend(params);
        let body = encode(Transport::JsonRpc, method, &all);
        let (_, reply) = rt
            .block_on(post(addr, Transport::JsonRpc, &body))
            .expect(method);
        decode(Transport::JsonRpc, &reply).expect("a reply")
    };
    let args = |size: i64| {
        Value::Struct(BTreeMap::from([
            ("SR".to_owned(), Value::from(sr.as_str())),
            ("virtual_size".to_owned(), Value::Int(size)),
            ("type".to_owned(), Value::from("user")),
        ]))
    };
    let refused = |r: &Response| matches!(r, Response::Failure(d) if d.first().map(String::as_str) == Some("SR_BACKEND_FAILURE_79"));
    let r = rpc("VDI.create", vec![args(64 << 40)]);
    assert!(refused(&r), "{r:?}");
    // Just under the limit (and under ext4's largest file): made, with
    // CBT, and not growable past the limit.
    let Response::Success(Value::String(vdi)) =
        rpc("VDI.create", vec![args((16 << 40) - (1 << 20))])
    else {
        panic!("a VDI of almost 16 TiB is allowed");
    };
    let r = rpc("VDI.enable_cbt", vec![Value::from(vdi.as_str())]);
    assert!(matches!(r, Response::Success(_)), "{r:?}");
    let r = rpc(
        "VDI.resize",
        vec![Value::from(vdi.as_str()), Value::Int((16 << 40) + 65536)],
    );
    assert!(refused(&r), "{r:?}");
    assert!(
        largest_alloc() <= ALLOC_LIMIT,
        "{} bytes at once",
        largest_alloc()
    );
    assert_eq!(panics(), 0);
    rt.block_on(sim.shutdown());
}
