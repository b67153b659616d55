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

/// What a parameter should be, for calls that get past the type checks.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Class(&'static str),
    Str,
    Int,
    Map,
    Create,
    VbdCreate,
    Base64,
    Blocks,
}

use Kind::*;

/// Every method the simulator knows with its parameters (after the
/// session), some it does not, and odd names. `sim.churn` is left out:
/// it is a load generator that writes as many blocks as asked, by design;
/// `session.logout` too, which would only end the fuzzing session.
const METHODS: &[(&str, &[Kind])] = &[
    ("session.login_with_password", &[Str, Str, Str]),
    ("VDI.get_record", &[Class("VDI")]),
    ("VDI.get_all_records", &[]),
    ("VDI.get_by_uuid", &[Str]),
    ("VDI.get_by_name_label", &[Str]),
    ("VDI.get_virtual_size", &[Class("VDI")]),
    ("VDI.get_nothing", &[Class("VDI")]),
    ("VDI.snapshot", &[Class("VDI"), Map]),
    ("VDI.enable_cbt", &[Class("VDI")]),
    ("VDI.disable_cbt", &[Class("VDI")]),
    ("VDI.list_changed_blocks", &[Class("VDI"), Class("VDI")]),
    ("VDI.get_nbd_info", &[Class("VDI")]),
    ("VDI.create", &[Create]),
    ("VDI.resize", &[Class("VDI"), Int]),
    ("VDI.resize_online", &[Class("VDI"), Int]),
    ("VDI.add_to_other_config", &[Class("VDI"), Str, Str]),
    ("VDI.remove_from_other_config", &[Class("VDI"), Str]),
    ("VDI.set_other_config", &[Class("VDI"), Map]),
    ("VDI.set_name_label", &[Class("VDI"), Str]),
    ("VDI.data_destroy", &[Class("VDI")]),
    ("VDI.destroy", &[Class("VDI")]),
    ("VM.get_all_records", &[]),
    ("VM.get_record", &[Class("VM")]),
    ("VM.snapshot", &[Class("VM"), Str]),
    ("VM.destroy", &[Class("VM")]),
    ("VBD.create", &[VbdCreate]),
    ("VBD.plug", &[Class("VBD")]),
    ("VBD.unplug", &[Class("VBD")]),
    ("VBD.destroy", &[Class("VBD")]),
    ("SR.get_all", &[]),
    ("SR.get_record", &[Class("SR")]),
    ("task.get_record", &[Str]),
    ("task.cancel", &[Str]),
    ("task.destroy", &[Str]),
    ("host.get_server_certificate", &[Class("host")]),
    ("pool.get_all_records", &[]),
    ("Async.VDI.snapshot", &[Class("VDI"), Map]),
    (
        "Async.VDI.list_changed_blocks",
        &[Class("VDI"), Class("VDI")],
    ),
    ("Async.VDI.create", &[Create]),
    ("Async.VDI.resize", &[Class("VDI"), Int]),
    ("Async.VDI.get_record", &[Class("VDI")]),
    ("Async.", &[]),
    ("sim.write", &[Class("VDI"), Int, Base64]),
    ("sim.fault_cbt_bypass", &[Class("VDI"), Int, Base64]),
    ("sim.read", &[Class("VDI"), Int, Int]),
    ("sim.write_blocks", &[Class("VDI"), Blocks, Int]),
    ("sim.resize", &[Class("VDI"), Int]),
    ("sim.plug", &[Class("VDI"), Class("VM")]),
    ("sim.unplug", &[Class("VDI")]),
    ("sim.nbd_connections", &[]),
    ("sim.nothing", &[]),
    ("nothing", &[]),
    ("", &[]),
    (".", &[]),
    ("VDI.", &[]),
];

/// References that exist when the fuzzing starts, by class, and the
/// session.
#[derive(Clone, Debug)]
pub struct Known {
    pub session: String,
    pub refs: BTreeMap<&'static str, Vec<String>>,
}

impl Known {
    fn all(&self) -> Vec<String> {
        self.refs.values().flatten().cloned().collect()
    }

    fn of(&self, class: &str) -> Vec<String> {
        match self.refs.get(class) {
            Some(r) if !r.is_empty() => r.clone(),
            _ => vec!["OpaqueRef:NULL".to_owned()],
        }
    }
}

pub async fn known(addr: std::net::SocketAddr) -> Known {
    let session = login(addr).await;
    let mut refs = BTreeMap::new();
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
            refs.insert(
                class,
                items
                    .into_iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect(),
            );
        }
    }
    Known { session, refs }
}

fn hostile_int() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(i64::MAX),
        Just(i64::MIN),
        Just(-1i64),
        Just(0i64),
        Just(1 << 44),
        Just((16i64 << 40) + 1),
        Just(1 << 62),
        0i64..(2 << 20),
    ]
}

/// Any parameter: a known reference, a string, an int (often huge or
/// negative), or a nested value.
fn param(refs: Vec<String>) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        3 => prop::sample::select(refs).prop_map(Value::String),
        1 => Just(Value::from("OpaqueRef:NULL")),
        1 => ".{0,12}".prop_map(Value::String),
        2 => hostile_int().prop_map(Value::Int),
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

fn record(fields: Vec<(&str, Value)>) -> Value {
    Value::Struct(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

/// A parameter of `kind`, mostly well typed, sometimes anything.
fn arg(kind: Kind, known: &Known) -> BoxedStrategy<Value> {
    let typed: BoxedStrategy<Value> = match kind {
        Class(c) => prop::sample::select(known.of(c))
            .prop_map(Value::String)
            .boxed(),
        Str => prop_oneof![
            ".{0,12}",
            Just("root".to_owned()),
            Just(PASSWORD.to_owned())
        ]
        .prop_map(Value::String)
        .boxed(),
        // As a digit string half the time, as XML-RPC carries ints.
        Int => (hostile_int(), any::<bool>())
            .prop_map(|(i, s)| {
                if s {
                    Value::String(i.to_string())
                } else {
                    Value::Int(i)
                }
            })
            .boxed(),
        Map => prop::collection::btree_map(".{0,6}", ".{0,6}", 0..3)
            .prop_map(|m| {
                Value::Struct(m.into_iter().map(|(k, v)| (k, Value::String(v))).collect())
            })
            .boxed(),
        Create => (
            prop::sample::select(known.of("SR")),
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
                record(vec![
                    ("SR", Value::String(sr)),
                    ("virtual_size", Value::Int(size)),
                    ("type", Value::from(t)),
                    ("name_label", Value::from("fuzz")),
                ])
            })
            .boxed(),
        VbdCreate => (
            prop::sample::select(known.of("VM")),
            prop::sample::select(known.of("VDI")),
            prop_oneof![Just("RO"), Just("RW"), Just("x")],
        )
            .prop_map(|(vm, vdi, mode)| {
                record(vec![
                    ("VM", Value::String(vm)),
                    ("VDI", Value::String(vdi)),
                    ("mode", Value::from(mode)),
                    ("type", Value::from("Disk")),
                    ("userdevice", Value::from("autodetect")),
                ])
            })
            .boxed(),
        Base64 => prop::collection::vec(any::<u8>(), 0..4096)
            .prop_map(|b| {
                use base64::Engine as _;
                Value::String(base64::engine::general_purpose::STANDARD.encode(b))
            })
            .boxed(),
        Blocks => prop::collection::vec(prop_oneof![0i64..32, hostile_int()], 0..6)
            .prop_map(|b| Value::Array(b.into_iter().map(Value::Int).collect()))
            .boxed(),
    };
    prop_oneof![4 => typed, 1 => param(known.all())].boxed()
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
    prop::sample::select(METHODS).prop_flat_map(move |(method, kinds)| {
        let typed: Vec<BoxedStrategy<Value>> = kinds.iter().map(|k| arg(*k, &known)).collect();
        let any_count = prop::collection::vec(param(known.all()), 0..4);
        let params = prop_oneof![5 => typed.prop_map(|v| v), 1 => any_count];
        let session = known.session.clone();
        let login = method == "session.login_with_password";
        (
            any::<bool>(),
            prop_oneof![8 => Just(!login), 1 => Just(login)],
            params,
            prop::option::weighted(
                0.2,
                prop::collection::vec((any::<Index>(), any::<u8>()), 1..4),
            ),
        )
            .prop_map(move |(xml, with_session, mut params, edits)| {
                if with_session {
                    params.insert(0, Value::from(session.as_str()));
                }
                Call {
                    xml,
                    method: method.to_owned(),
                    params,
                    edits: edits.unwrap_or_default(),
                }
            })
    })
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
    let sr = known.of("SR").remove(0);
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
