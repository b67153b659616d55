//! The client's XML-RPC codec against an independent one: a server built
//! on Python's standard `xmlrpc.server`, started on a free loopback port.
//! The simulator shares the client's codec, so a mistake made the same way
//! on both sides would cancel out there; here it cannot.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cbtvault_xenapi::{Client, ClientOptions, Error, Password, TransportChoice, Value, XapiError};

/// XAPI's reply conventions on top of Python's marshalling: the Python
/// side reports what it decoded, and sends values of every kind back.
const SERVER: &str = r#"
import sys
from xmlrpc.server import SimpleXMLRPCServer
import xmlrpc.client

server = SimpleXMLRPCServer(("127.0.0.1", 0), logRequests=False, allow_none=True)

def ok(v):
    return {"Status": "Success", "Value": v}

def login(user, password, version, originator):
    if password != "pw-\u00e9\u2713":
        return {"Status": "Failure",
                "ErrorDescription": ["SESSION_AUTHENTICATION_FAILED", user, "Authentication failure"]}
    return ok("OpaqueRef:py-session")

def describe(v):
    if isinstance(v, dict):
        return {"dict": {k: describe(x) for k, x in v.items()}}
    if isinstance(v, list):
        return {"list": [describe(x) for x in v]}
    if isinstance(v, xmlrpc.client.DateTime):
        return {"DateTime": v.value}
    return {type(v).__name__: repr(v)}

def echo(session, *args):
    return ok({"session": session, "args": [describe(a) for a in args]})

def values(session):
    return ok({
        "int_as_string": "9223372036854775807",
        "negative_as_string": "-9223372036854775808",
        "i4": -5,
        "text": "h\u00e9llo \u2713 \u65e5\u672c <&>",
        "empty_struct": {},
        "empty_array": [],
        "empty_string": "",
        "flag": True,
        "double": 0.1,
        "none": None,
        "when": xmlrpc.client.DateTime("20240131T12:00:00Z"),
        "nested": {"a": [{"b": []}]},
    })

def failure(session):
    return {"Status": "Failure", "ErrorDescription": ["VDI_IN_USE", "OpaqueRef:v\u00e9", "destroy"]}

def fault(session):
    raise ValueError("boom \u2713")

server.register_function(login, "session.login_with_password")
server.register_function(echo, "test.echo")
server.register_function(values, "test.values")
server.register_function(failure, "test.failure")
server.register_function(fault, "test.fault")
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

/// The Python server; killed when dropped.
struct PythonServer {
    child: Child,
    port: u16,
}

impl PythonServer {
    fn start() -> PythonServer {
        let mut child = Command::new("python3")
            .args(["-c", SERVER])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs (this test needs it; it does not skip)");
        let stdout = child.stdout.take().expect("piped stdout");
        // The first line is the port; a dead interpreter ends the stream.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the Python server prints its port within 30 s");
        let port = line.trim().parse().unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("the Python server did not start: {line:?}")
        });
        PythonServer { child, port }
    }
}

impl Drop for PythonServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn client(server: &PythonServer, password: &str) -> Result<Client, Error> {
    let mut o = ClientOptions::new(
        &format!("http://127.0.0.1:{}/", server.port),
        "root",
        Password::new(password),
    )
    .unwrap();
    o.transport = TransportChoice::XmlRpc;
    o.rpc_timeout = Duration::from_secs(20);
    Client::connect(o).await
}

fn field<'a>(v: &'a Value, k: &str) -> &'a Value {
    v.as_struct()
        .and_then(|m| m.get(k))
        .unwrap_or_else(|| panic!("no {k} in {v:?}"))
}

/// Python's view of one decoded parameter: `{type: repr}`.
fn seen(kind: &str, repr: &str) -> Value {
    Value::Struct(BTreeMap::from([(kind.to_owned(), Value::from(repr))]))
}

#[tokio::test]
async fn the_xmlrpc_codec_agrees_with_pythons() {
    let py = PythonServer::start();
    // Non-ASCII in a call (the password) decodes on the Python side.
    let c = client(&py, "pw-\u{e9}\u{2713}").await.expect("login");
    assert_eq!(c.session().unwrap().as_str(), "OpaqueRef:py-session");

    // Encoding: what Python decodes from the client's call.
    let args = vec![
        Value::Int(i64::MAX),
        Value::Int(i64::MIN),
        Value::from("h\u{e9}llo \u{2713} \u{65e5}\u{672c} <&>"),
        Value::Struct(BTreeMap::new()),
        Value::Array(vec![]),
        Value::from(""),
        Value::Bool(true),
        Value::Double(0.1),
        Value::Nil,
        Value::DateTime("20240131T12:00:00Z".into()),
    ];
    let reply = c.call("test.echo", args).await.unwrap();
    assert_eq!(
        field(&reply, "session"),
        &Value::from("OpaqueRef:py-session")
    );
    let got = field(&reply, "args").as_array().unwrap();
    let empty = |k: &str, v: Value| Value::Struct(BTreeMap::from([(k.to_owned(), v)]));
    assert_eq!(
        got,
        [
            // XAPI ints travel as decimal strings, all 64 bits of them.
            seen("str", "'9223372036854775807'"),
            seen("str", "'-9223372036854775808'"),
            seen("str", "'h\u{e9}llo \u{2713} \u{65e5}\u{672c} <&>'"),
            empty("dict", Value::Struct(BTreeMap::new())),
            empty("list", Value::Array(vec![])),
            seen("str", "''"),
            seen("bool", "True"),
            seen("float", "0.1"),
            seen("NoneType", "None"),
            seen("DateTime", "20240131T12:00:00Z"),
        ]
    );

    // Decoding: what the client reads from Python's reply.
    let v = c.call("test.values", vec![]).await.unwrap();
    assert_eq!(field(&v, "int_as_string").as_i64(), Some(i64::MAX));
    assert_eq!(field(&v, "negative_as_string").as_i64(), Some(i64::MIN));
    assert_eq!(field(&v, "i4"), &Value::Int(-5));
    assert_eq!(
        field(&v, "text"),
        &Value::from("h\u{e9}llo \u{2713} \u{65e5}\u{672c} <&>")
    );
    assert_eq!(field(&v, "empty_struct"), &Value::Struct(BTreeMap::new()));
    assert_eq!(field(&v, "empty_array"), &Value::Array(vec![]));
    assert_eq!(field(&v, "empty_string"), &Value::from(""));
    assert_eq!(field(&v, "flag"), &Value::Bool(true));
    assert_eq!(field(&v, "double"), &Value::Double(0.1));
    assert_eq!(field(&v, "none"), &Value::Nil);
    assert_eq!(
        field(&v, "when"),
        &Value::DateTime("20240131T12:00:00Z".into())
    );
    let nested = field(field(&v, "nested"), "a").as_array().unwrap();
    assert_eq!(field(&nested[0], "b"), &Value::Array(vec![]));

    // A XAPI failure: typed, non-ASCII parameters intact.
    let err = c.call("test.failure", vec![]).await.unwrap_err();
    assert_eq!(
        err.xapi(),
        Some(&XapiError::VdiInUse {
            vdi: "OpaqueRef:v\u{e9}".into(),
            operation: "destroy".into()
        })
    );
    // An XML-RPC fault: an error naming it, never a panic or a success.
    let err = c.call("test.fault", vec![]).await.unwrap_err();
    let text = format!("{err}: {err:?}");
    assert!(text.contains("fault") && text.contains("boom"), "{text}");
    // An unknown method is a fault from Python too.
    assert!(c.call("test.nothing", vec![]).await.is_err());

    // A refused login from an independent server reads as one.
    let err = client(&py, "wrong").await.unwrap_err();
    assert_eq!(
        err.xapi(),
        Some(&XapiError::SessionAuthenticationFailed {
            user: "root".into(),
            message: "Authentication failure".into()
        })
    );
}
