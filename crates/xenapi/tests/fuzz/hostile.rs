//! The client against a hostile host over a real socket: a valid login,
//! then replies whose HTTP framing or body is mutated (a `Content-Length`
//! of 4 GiB, chunk sizes past the data, a cut body, garbage). Every call
//! must end in a value or a typed error within its timeout, without a
//! panic and without allocating what the host merely claims.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cbtvault_xenapi::rpc::{jsonrpc, xmlrpc};
use cbtvault_xenapi::{
    Client, ClientOptions, Password, Response, Transport, TransportChoice, Value, VdiRef,
};
use proptest::prelude::*;
use proptest::sample::Index;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use super::codecs::replies;
use super::watch::{runtime, watch};

const ALLOC_LIMIT: usize = 4 << 20;
const DEADLINE: Duration = Duration::from_secs(30);

/// A whole HTTP response with a correct `Content-Length`.
fn http(content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

fn login(transport: Transport) -> Vec<u8> {
    let ok = Response::Success(Value::from("OpaqueRef:session"));
    match transport {
        Transport::JsonRpc => http(
            "application/json",
            &jsonrpc::encode_response(jsonrpc::Version::V2, &serde_json::json!(1), &ok),
        ),
        _ => http("text/xml", xmlrpc::encode_response(&ok).as_bytes()),
    }
}

/// Serves `responses` in order, one per request on any connection; after
/// the last one, or after any response marked to close, the connection
/// is closed.
async fn host(responses: Vec<(Vec<u8>, bool)>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let queue = Arc::new(Mutex::new(responses.into_iter()));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let queue = queue.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut r = BufReader::new(r);
                loop {
                    let mut length = 0usize;
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; length.min(1 << 20)];
                    if r.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let next = queue.lock().unwrap_or_else(|p| p.into_inner()).next();
                    let Some((bytes, close)) = next else { return };
                    if w.write_all(&bytes).await.is_err() || close {
                        let _ = w.shutdown().await;
                        return;
                    }
                }
            });
        }
    });
    port
}

/// Logs in, then makes three calls that decode records.
async fn session(transport: Transport, responses: Vec<(Vec<u8>, bool)>) -> Vec<String> {
    let port = host(responses).await;
    let mut o = ClientOptions::new(
        &format!("http://127.0.0.1:{port}"),
        "root",
        Password::new("pw"),
    )
    .expect("options");
    o.transport = match transport {
        Transport::JsonRpc => TransportChoice::JsonRpc,
        _ => TransportChoice::XmlRpc,
    };
    o.rpc_timeout = Duration::from_secs(5);
    let client = match Client::connect(o).await {
        Ok(c) => c,
        Err(e) => return vec![e.to_string()],
    };
    let vdi = VdiRef::new("OpaqueRef:1");
    vec![
        format!("{:?}", client.vdi().get_record(&vdi).await),
        format!("{:?}", client.vdi().get_nbd_info(&vdi).await),
        format!("{:?}", client.vm().get_all_records().await.map(|m| m.len())),
    ]
}

fn check(
    transport: Transport,
    responses: Vec<(Vec<u8>, bool)>,
) -> Result<Vec<String>, TestCaseError> {
    let (out, w) = watch(|| {
        runtime()
            .block_on(async { tokio::time::timeout(DEADLINE, session(transport, responses)).await })
    });
    prop_assert_eq!(w.panics, 0, "a panic in the client");
    prop_assert!(
        w.largest_alloc <= ALLOC_LIMIT,
        "allocated {} bytes at once (limit {ALLOC_LIMIT})",
        w.largest_alloc
    );
    out.map_err(|_| TestCaseError::fail(format!("the calls hung for {DEADLINE:?}")))
}

#[derive(Clone, Debug)]
enum HttpEdit {
    /// The body keeps its framing, its bytes change.
    Body(Index, u8),
    /// The body is cut, the header still claims the whole.
    CutBody(Index),
    /// `Content-Length` replaced.
    ContentLength(u64),
    /// Chunked encoding with a chunk size past the data.
    Chunked(u64),
    /// Any byte of the head changes.
    Head(Index, u8),
}

fn http_edit() -> impl Strategy<Value = HttpEdit> {
    prop_oneof![
        4 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| HttpEdit::Body(i, b)),
        1 => any::<Index>().prop_map(HttpEdit::CutBody),
        2 => prop_oneof![
            Just(4u64 << 30),
            Just(u64::MAX),
            Just(513u64 << 20),
            Just(0u64),
            0u64..4096
        ]
        .prop_map(HttpEdit::ContentLength),
        1 => prop_oneof![Just(4u64 << 30), Just(1u64 << 60), 0u64..100_000].prop_map(HttpEdit::Chunked),
        1 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| HttpEdit::Head(i, b)),
    ]
}

fn edited(content_type: &str, body: &[u8], edit: &HttpEdit) -> Vec<u8> {
    match edit {
        HttpEdit::Body(i, b) => {
            let mut body = body.to_vec();
            if !body.is_empty() {
                let at = i.index(body.len());
                body[at] = *b;
            }
            http(content_type, &body)
        }
        HttpEdit::CutBody(i) => {
            let mut out = http(content_type, body);
            out.truncate(out.len() - body.len() + i.index(body.len().max(1)));
            out
        }
        HttpEdit::ContentLength(n) => {
            let mut out = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {n}\r\n\r\n"
            )
            .into_bytes();
            out.extend_from_slice(body);
            out
        }
        HttpEdit::Chunked(n) => {
            let mut out = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n{n:x}\r\n"
            )
            .into_bytes();
            out.extend_from_slice(body);
            out.extend_from_slice(b"\r\n0\r\n\r\n");
            out
        }
        HttpEdit::Head(i, b) => {
            let mut out = http(content_type, body);
            let head = out.len() - body.len();
            out[i.index(head)] = *b;
            out
        }
    }
}

/// Regression-style check of the memory bound: a reply claiming 4 GiB of
/// body that sends a few bytes costs only those bytes.
#[test]
fn claimed_content_length_is_not_allocated() {
    for transport in [Transport::JsonRpc, Transport::XmlRpc] {
        let body = b"{\"result\": \"x\"";
        let claim = edited("application/json", body, &HttpEdit::ContentLength(4 << 30));
        let out = check(transport, vec![(login(transport), false), (claim, true)])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(out[0].starts_with("Err("), "{out:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn mutated_replies(which in prop::collection::vec((any::<Index>(), http_edit()), 1..4)) {
        let all = replies();
        for transport in [Transport::JsonRpc, Transport::XmlRpc] {
            let bodies: Vec<&Vec<u8>> = all.iter().filter(|(t, _)| *t == transport).map(|(_, b)| b).collect();
            let content_type = match transport {
                Transport::JsonRpc => "application/json",
                _ => "text/xml",
            };
            let mut responses = vec![(login(transport), false)];
            for (i, edit) in &which {
                let body = bodies[i.index(bodies.len())];
                responses.push((edited(content_type, body, edit), true));
            }
            check(transport, responses)?;
        }
    }
}
