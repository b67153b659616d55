//! The HTTPS side: the JSON API under `/sdk/vim25/`, the simulator's own
//! control calls under `/sim/` (test-only, no session: the simulator is a
//! test fixture on loopback), everything else 404. A connection whose
//! first byte is a TLS handshake record gets TLS; others plain HTTP (for
//! tests of the client's refusal of `http://`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, Answer};
use crate::sim::Sim;

const MAX_CALL: usize = 16 << 20;
const SESSION_HEADER: &str = "vmware-api-session-id";

type Reply = http::Response<Full<Bytes>>;

fn reply(status: StatusCode, body: Value) -> Reply {
    let mut r = http::Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn empty(status: StatusCode) -> Reply {
    let mut r = http::Response::new(Full::new(Bytes::new()));
    *r.status_mut() = status;
    r
}

pub(crate) async fn serve(
    listener: TcpListener,
    sim: Sim,
    tls: Arc<rustls::ServerConfig>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = shutdown.cancelled() => break,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (sim, acceptor, shutdown) = (sim.clone(), acceptor.clone(), shutdown.clone());
        tracker.spawn(async move {
            if let Err(e) = connection(tcp, sim, acceptor, shutdown).await {
                tracing::debug!("connection from {peer}: {e}");
            }
        });
    }
}

async fn connection(
    tcp: TcpStream,
    sim: Sim,
    acceptor: TlsAcceptor,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let _ = tcp.set_nodelay(true);
    let mut first = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(30), tcp.peek(&mut first))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "idle connection"))??;
    if n == 1 && first[0] == 0x16 {
        let stream = acceptor.accept(tcp).await?;
        serve_http(TokioIo::new(stream), sim, shutdown).await;
    } else {
        serve_http(TokioIo::new(tcp), sim, shutdown).await;
    }
    Ok(())
}

async fn serve_http<I>(io: I, sim: Sim, shutdown: CancellationToken)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let sim = sim.clone();
        async move { Ok::<_, Infallible>(handle(sim, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!("HTTP connection ended: {e}");
            }
        }
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}

async fn handle(sim: Sim, req: Request<Incoming>) -> Reply {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let session = req
        .headers()
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = match Limited::new(req.into_body(), MAX_CALL).collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => return empty(StatusCode::BAD_REQUEST),
    };
    if let Some(rest) = path.strip_prefix("/sim/") {
        return control(&sim, &method, rest, &body);
    }
    let Some(rest) = path.strip_prefix("/sdk/vim25/") else {
        return empty(StatusCode::NOT_FOUND);
    };
    let get = match method {
        Method::GET => true,
        Method::POST => false,
        _ => return empty(StatusCode::METHOD_NOT_ALLOWED),
    };
    let slow = sim.lock().faults.slow;
    if !slow.is_zero() {
        tokio::time::sleep(slow).await;
    }
    let logout = !get && rest.ends_with("/Logout");
    let answer = {
        let sim = sim.clone();
        let rest = rest.to_owned();
        let session = session.clone();
        // Snapshots copy images: off the executor.
        tokio::task::spawn_blocking(move || {
            api::handle(&sim, get, &rest, session.as_deref(), &body)
        })
        .await
        .unwrap_or_else(|_| {
            Answer::Fault(crate::fault::SimFault::new("SystemError", "internal error"))
        })
    };
    if logout
        && matches!(answer, Answer::Empty)
        && let Some(s) = &session
    {
        sim.lock().sessions.remove(s);
    }
    match answer {
        Answer::Value(v) => reply(StatusCode::OK, v),
        Answer::Empty => empty(StatusCode::NO_CONTENT),
        Answer::Fault(f) => reply(StatusCode::INTERNAL_SERVER_ERROR, f.to_json()),
        Answer::NoSuchPath => empty(StatusCode::NOT_FOUND),
        Answer::LoggedIn(v, token) => {
            let mut r = reply(StatusCode::OK, v);
            if let Ok(h) = header::HeaderValue::from_str(&token) {
                r.headers_mut().insert(SESSION_HEADER, h);
            }
            r
        }
    }
}

/// `/sim/…`: the control surface of the binary (tests in the same process
/// call [`Sim`]'s methods instead).
fn control(sim: &Sim, method: &Method, rest: &str, body: &[u8]) -> Reply {
    let args: Value = serde_json::from_slice(body).unwrap_or(json!({}));
    let s = |k: &str| {
        args.get(k)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let n = |k: &str| args.get(k).and_then(|v| v.as_u64()).unwrap_or_default();
    let key = || i32::try_from(n("key")).unwrap_or(2000);
    let done = |r: crate::error::Result<Value>| match r {
        Ok(v) => reply(StatusCode::OK, v),
        Err(e) => reply(StatusCode::BAD_REQUEST, json!({"error": e.to_string()})),
    };
    match (method, rest) {
        (&Method::GET, "inventory") => reply(
            StatusCode::OK,
            json!({"vms": sim.vms(), "fcds": sim.fcds()}),
        ),
        (&Method::GET, r) if r.starts_with("nbd/") => {
            let name = r.trim_start_matches("nbd/");
            match (api::export_image(sim, name), sim.nbd_port()) {
                (Some(_), Some(port)) => reply(
                    StatusCode::OK,
                    json!({"uri": format!("nbd://127.0.0.1:{port}/{name}")}),
                ),
                _ => empty(StatusCode::NOT_FOUND),
            }
        }
        (&Method::POST, "churn") => done(
            sim.churn(&s("vm"), key(), n("count") as usize, n("seed"))
                .map(|w| json!(w)),
        ),
        (&Method::POST, "resize") => {
            done(sim.resize(&s("vm"), key(), n("size")).map(|()| json!({})))
        }
        (&Method::POST, "reset-cbt") => done(sim.reset_cbt(&s("vm")).map(|()| json!({}))),
        (&Method::POST, "expire-sessions") => {
            sim.expire_sessions();
            reply(StatusCode::OK, json!({}))
        }
        (&Method::POST, "fault") => {
            match s("kind").as_str() {
                "task" => sim.fail_next_task(&s("method"), &s("fault")),
                "query" => sim.fail_next_query(),
                "slow" => sim.set_slow(Duration::from_millis(n("ms"))),
                "nbd" => sim.fail_nbd_after(n("bytes")),
                "expire-after" => sim.expire_sessions_after(n("calls") as u32),
                "clear" => sim.clear_faults(),
                other => {
                    return reply(
                        StatusCode::BAD_REQUEST,
                        json!({"error": format!("unknown fault {other:?}")}),
                    );
                }
            }
            reply(StatusCode::OK, json!({}))
        }
        _ => empty(StatusCode::NOT_FOUND),
    }
}
