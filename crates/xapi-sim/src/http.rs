//! The HTTP side of the simulated host: XML-RPC at `POST /` (and
//! `/RPC2`), JSON-RPC at `POST /jsonrpc`, and `PUT /import_raw_vdi`. One
//! port serves plain HTTP and HTTPS: a connection whose first byte is a
//! TLS handshake record (0x16) gets TLS with the host certificate.
//! Malformed calls get an HTTP 500 HTML page, as xapi answers them.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cbtvault_blockmap::BLOCK_SIZE;
use cbtvault_xenapi::Response;
use cbtvault_xenapi::rpc::{jsonrpc, xmlrpc};
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::dispatch;
use crate::sim::Sim;

/// Largest RPC body accepted.
const MAX_CALL: usize = 64 << 20;
/// Import writes are gathered into chunks of this size.
const CHUNK: usize = 1 << 20;

type Reply = http::Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Reply {
    let mut r = http::Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

/// xapi's answer to a request it cannot parse.
fn error_page(detail: &str) -> Reply {
    let escaped = detail
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    let body = format!(
        "<html><body><h1>HTTP 500 internal server error</h1>An unexpected error occurred; \
         please wait a while and try again. If the problem persists, please contact your \
         support representative.<h1> Additional information </h1>{escaped}</body></html>"
    );
    reply(StatusCode::INTERNAL_SERVER_ERROR, "text/html", body)
}

/// Accepts connections until `shutdown`, serving each on `tracker`.
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
    match (req.method().clone(), path.as_str()) {
        (Method::POST, "/" | "/RPC2") => match read_body(req).await {
            Ok(body) => xml_call(&sim, &body).await,
            Err(e) => error_page(&e),
        },
        (Method::POST, "/jsonrpc") if sim.config().jsonrpc => match read_body(req).await {
            Ok(body) => json_call(&sim, &body).await,
            Err(e) => error_page(&e),
        },
        (Method::PUT, "/import_raw_vdi") => import_raw_vdi(&sim, req).await,
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/html",
            "<html><body><h1>HTTP 404 not found</h1></body></html>",
        ),
    }
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, String> {
    Limited::new(req.into_body(), MAX_CALL)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| format!("cannot read the request: {e}"))
}

fn outcome(r: Result<cbtvault_xenapi::Value, cbtvault_xenapi::XapiError>) -> Response {
    match r {
        Ok(v) => Response::Success(v),
        Err(e) => Response::Failure(e.description()),
    }
}

async fn xml_call(sim: &Sim, body: &[u8]) -> Reply {
    let Ok(text) = std::str::from_utf8(body) else {
        return error_page("Xmlrpc.Parse_error: the request is not UTF-8");
    };
    let (method, params) = match xmlrpc::decode_call(text) {
        Ok(x) => x,
        Err(e) => return error_page(&format!("Xmlrpc.Parse_error: {e}")),
    };
    let response = outcome(dispatch::call(sim, &method, params).await);
    reply(
        StatusCode::OK,
        "text/xml",
        xmlrpc::encode_response(&response),
    )
}

async fn json_call(sim: &Sim, body: &[u8]) -> Reply {
    let call = match jsonrpc::decode_call(body) {
        Ok(c) => c,
        Err(e) => return error_page(&format!("Jsonrpc.Malformed_method_request: {e}")),
    };
    let response = outcome(dispatch::call(sim, &call.method, call.params).await);
    reply(
        StatusCode::OK,
        "application/json",
        jsonrpc::encode_response(call.version, &call.id, &response),
    )
}

/// `PUT /import_raw_vdi?session_id=…&vdi=…&format=raw`: the body is
/// written from offset 0. All-zero blocks over zeros are skipped so the
/// file stays sparse; every block written is marked in the VDI's CBT log,
/// as tapdisk would.
async fn import_raw_vdi(sim: &Sim, req: Request<Incoming>) -> Reply {
    let query = req.uri().query().unwrap_or_default().to_owned();
    let param = |name: &str| {
        url::form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    };
    let text = |status: StatusCode, msg: String| reply(status, "text/plain", msg);
    let Some(session) = param("session_id") else {
        return text(StatusCode::UNAUTHORIZED, "no session_id\n".into());
    };
    if sim.sessions().check(&session).is_err() {
        return text(StatusCode::UNAUTHORIZED, "session is invalid\n".into());
    }
    let format = param("format").unwrap_or_else(|| "raw".into());
    if format != "raw" && format != "vhd" {
        return text(
            StatusCode::BAD_REQUEST,
            format!("format {format} is not supported by the simulator\n"),
        );
    }
    let Some(vdi_ref) = param("vdi") else {
        return text(StatusCode::BAD_REQUEST, "no vdi\n".into());
    };
    let target = {
        let db = sim.db();
        db.vdis
            .get(&vdi_ref)
            .map(|v| (v.uuid.clone(), v.virtual_size, v.vdi_type.clone()))
    };
    let Some((uuid, size, vdi_type)) = target else {
        return text(
            StatusCode::NOT_FOUND,
            format!("HANDLE_INVALID VDI {vdi_ref}\n"),
        );
    };
    if vdi_type == "cbt_metadata" {
        return text(
            StatusCode::BAD_REQUEST,
            format!("VDI_INCOMPATIBLE_TYPE {vdi_ref} cbt_metadata\n"),
        );
    }
    if format == "vhd" {
        return import_vhd(sim, req, &vdi_ref, &uuid, size).await;
    }
    // Fault: this upload breaks after `n` bytes.
    let break_after = {
        let mut faults = sim.faults();
        match faults.import_break {
            Some((0, bytes)) => {
                faults.import_break = None;
                Some(bytes)
            }
            Some((n, bytes)) => {
                faults.import_break = Some((n - 1, bytes));
                None
            }
            None => None,
        }
    };
    let mut body = req.into_body();
    let mut pending: Vec<u8> = Vec::with_capacity(CHUNK);
    let mut offset = 0u64;
    let mut written: Vec<u64> = Vec::new();
    loop {
        let frame = match body.frame().await {
            None => break,
            Some(Ok(f)) => f,
            Some(Err(e)) => {
                return text(StatusCode::BAD_REQUEST, format!("upload broke: {e}\n"));
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while pending.len() >= CHUNK {
            let rest = pending.split_off(CHUNK);
            let chunk = std::mem::replace(&mut pending, rest);
            match write_chunk(sim, &uuid, size, offset, chunk).await {
                Ok(blocks) => written.extend(blocks),
                Err(msg) => return text(StatusCode::BAD_REQUEST, msg),
            }
            offset += CHUNK as u64;
            if break_after.is_some_and(|b| offset >= b) {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("VDI_IO_ERROR: the upload broke after {offset} bytes (injected)\n"),
                );
            }
        }
    }
    let pending_len = pending.len() as u64;
    if !pending.is_empty() {
        match write_chunk(sim, &uuid, size, offset, pending).await {
            Ok(blocks) => written.extend(blocks),
            Err(msg) => return text(StatusCode::BAD_REQUEST, msg),
        }
    }
    *sim.inner
        .last_import
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = (offset + pending_len, (offset + pending_len) / 512);
    let saved = sim.mutate(|db, store| {
        if let Some(v) = db.vdis.get_mut(&vdi_ref) {
            v.physical_utilisation = store.allocated(&uuid);
            if v.cbt_enabled {
                for b in &written {
                    db.cbt.mark_write(&uuid, b * BLOCK_SIZE, BLOCK_SIZE);
                }
            }
        }
        Ok(())
    });
    match saved {
        Ok(()) => reply(StatusCode::OK, "text/plain", ""),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

/// `PUT /import_raw_vdi?…&format=vhd` onto an existing VDI, as xapi hands
/// it to vhd-tool: the dynamic VHD is parsed strictly as it streams in
/// (footer and header checksums, the disk size against the VDI's, every
/// BAT entry past the headers and in stream order, the trailing footer),
/// and only the sectors its bitmaps mark are written; each write dirties
/// the VDI's CBT log like a guest write. Header and BAT errors are found
/// before anything is written. Real xapi has already answered `200 OK`
/// when vhd-tool fails and fails the import task with `INTERNAL_ERROR`;
/// the simulator answers `500` with that error, so a client sees it.
async fn import_vhd(
    sim: &Sim,
    req: Request<Incoming>,
    vdi_ref: &str,
    uuid: &str,
    size: u64,
) -> Reply {
    use futures::TryStreamExt;
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = received.clone();
    let stream = http_body_util::BodyStream::new(req.into_body())
        .try_filter_map(|f| futures::future::ready(Ok(f.into_data().ok())))
        .map_ok(move |b: Bytes| {
            counter.fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
            b
        })
        .map_err(std::io::Error::other);
    let reader = tokio_util::io::StreamReader::new(stream);
    let bridge = tokio_util::io::SyncIoBridge::new(reader);
    let (worker, target) = (sim.clone(), uuid.to_owned());
    let outcome = tokio::task::spawn_blocking(move || {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let result = cbtvault_xenapi::vhd::VhdReader::open(std::io::BufReader::new(bridge), size)
            .and_then(|r| {
                r.for_each_run(|at, data| {
                    worker.store().write_at(&target, at, data)?;
                    runs.push((at, data.len() as u64));
                    Ok(())
                })
            });
        (result, runs)
    })
    .await;
    let (result, runs) = match outcome {
        Ok(x) => x,
        Err(e) => {
            return reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("INTERNAL_ERROR: {e}\n"),
            );
        }
    };
    let sectors: u64 = runs.iter().map(|(_, len)| len / 512).sum();
    *sim.inner
        .last_import
        .lock()
        .unwrap_or_else(|e| e.into_inner()) =
        (received.load(std::sync::atomic::Ordering::Relaxed), sectors);
    let saved = sim.mutate(|db, store| {
        if let Some(v) = db.vdis.get_mut(vdi_ref) {
            v.physical_utilisation = store.allocated(uuid);
            if v.cbt_enabled {
                for (at, len) in &runs {
                    db.cbt.mark_write(uuid, *at, *len);
                }
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        let mut msg = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            msg.push_str(&format!(": {s}"));
            source = s.source();
        }
        return reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("INTERNAL_ERROR: Caught exception: vhd-tool: {msg}\n"),
        );
    }
    match saved {
        Ok(()) => reply(StatusCode::OK, "text/plain", ""),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{e}\n"),
        ),
    }
}

/// Writes one aligned chunk; returns the blocks actually written.
async fn write_chunk(
    sim: &Sim,
    uuid: &str,
    size: u64,
    offset: u64,
    chunk: Vec<u8>,
) -> Result<Vec<u64>, String> {
    if offset + chunk.len() as u64 > size {
        return Err(format!("upload is larger than the VDI ({size} bytes)\n"));
    }
    let (sim, uuid) = (sim.clone(), uuid.to_owned());
    tokio::task::spawn_blocking(move || {
        let mut written = Vec::new();
        let mut existing = vec![0u8; BLOCK_SIZE as usize];
        for (i, block) in chunk.chunks(BLOCK_SIZE as usize).enumerate() {
            let at = offset + (i as u64) * BLOCK_SIZE;
            if block.iter().all(|b| *b == 0) {
                let existing = &mut existing[..block.len()];
                sim.store()
                    .read_at(&uuid, at, existing)
                    .map_err(|e| e.to_string())?;
                if existing.iter().all(|b| *b == 0) {
                    continue;
                }
            }
            sim.store()
                .write_at(&uuid, at, block)
                .map_err(|e| e.to_string())?;
            written.push(at / BLOCK_SIZE);
        }
        Ok(written)
    })
    .await
    .map_err(|e| e.to_string())?
}
