//! The daemon's small HTTP side: the server for `/healthz`, `/status`,
//! `/metrics` and `POST /run/JOB`, and a plain HTTP/1.1 client for the
//! webhook and for `cbtvault run JOB` (hyper's low-level connection API:
//! the daemon talks to one address at a time and needs no pool).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::daemon::{Shared, Trigger};
use crate::error::{Error, Result};

/// Serves requests until `stop`.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "accepting an HTTP connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(req, &shared).await) }
            });
            // A client that never finishes its request is dropped.
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, error = %e, "HTTP connection ended");
            }
        });
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Full<Bytes>> {
    reply(status, "application/json", format!("{value}\n"))
}

async fn handle(req: Request<Incoming>, shared: &Arc<Shared>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/healthz") => reply(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, "/metrics") => {
            let s = shared.clone();
            let text = tokio::task::spawn_blocking(move || s.metrics_text())
                .await
                .unwrap_or_default();
            reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            )
        }
        (&Method::GET, "/status") => {
            let s = shared.clone();
            match tokio::task::spawn_blocking(move || s.status()).await {
                Ok(Ok(v)) => json(StatusCode::OK, v),
                Ok(Err(e)) => json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    serde_json::json!({ "error": crate::report::chain(&e) }),
                ),
                Err(e) => json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    serde_json::json!({ "error": e.to_string() }),
                ),
            }
        }
        (&Method::POST, p) if p.starts_with("/run/") => {
            let job = &p["/run/".len()..];
            match shared.trigger(job) {
                Trigger::Started => json(
                    StatusCode::ACCEPTED,
                    serde_json::json!({ "job": job, "started": true }),
                ),
                Trigger::Running => json(
                    StatusCode::CONFLICT,
                    serde_json::json!({ "job": job, "error": format!("job {job:?} is running now") }),
                ),
                Trigger::Unknown(known) => json(
                    StatusCode::NOT_FOUND,
                    serde_json::json!({
                        "job": job,
                        "error": format!("no job named {job:?} in the daemon's configuration"),
                        "jobs": known,
                    }),
                ),
                Trigger::ShuttingDown => json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({ "job": job, "error": "the daemon is stopping" }),
                ),
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: GET /healthz, /status, /metrics; POST /run/JOB\n",
        ),
    }
}

/// POSTs `body` (JSON) to `url`, `http://` or `https://`; an `https://`
/// server's certificate is checked against `ca` (PEM) when given, else
/// against the public roots cbtvault carries. Returns the status and the
/// answer's text.
pub async fn post(
    url: &str,
    ca: Option<&std::path::Path>,
    body: Vec<u8>,
    timeout: Duration,
) -> Result<(u16, String)> {
    let err = |what: String| Error::Http {
        url: url.into(),
        what,
    };
    let uri: hyper::Uri = url.parse().map_err(|e| err(format!("not a URL: {e}")))?;
    let tls = match uri.scheme_str() {
        Some("http") => None,
        Some("https") => Some(tls_config(ca).map_err(err)?),
        _ => return Err(err("only http:// and https:// URLs are supported".into())),
    };
    let host = uri
        .host()
        .ok_or_else(|| err("the URL has no host".into()))?
        .to_string();
    let port = uri
        .port_u16()
        .unwrap_or(if tls.is_some() { 443 } else { 80 });
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let exchange = async {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let stream = tokio::net::TcpStream::connect((bare, port))
            .await
            .map_err(|e| Error::NoDaemon {
                addr: format!("{host}:{port}"),
                source: e,
            })?;
        let req = Request::post(path)
            .header(hyper::header::HOST, format!("{host}:{port}"))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::USER_AGENT, "cbtvault")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| err(e.to_string()))?;
        let resp = match tls {
            None => exchange_over(stream, req).await,
            Some(config) => {
                let name =
                    rustls::pki_types::ServerName::try_from(bare.to_string()).map_err(|e| {
                        err(format!(
                            "{bare:?} cannot be checked against a certificate: {e}"
                        ))
                    })?;
                let stream = tokio_rustls::TlsConnector::from(config)
                    .connect(name, stream)
                    .await
                    .map_err(|e| err(format!("TLS: {e}")))?;
                exchange_over(stream, req).await
            }
        }
        .map_err(err)?;
        Ok(resp)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| err(format!("no answer within {} s", timeout.as_secs())))?
}

/// One HTTP/1 request over `stream`: the status and the answer's text.
async fn exchange_over<S>(
    stream: S,
    req: Request<Full<Bytes>>,
) -> std::result::Result<(u16, String), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

/// The TLS client configuration for an `https://` webhook: `ca`'s
/// certificates, or Mozilla's roots (webpki-roots) when none is given.
fn tls_config(
    ca: Option<&std::path::Path>,
) -> std::result::Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = match ca {
        Some(path) => cbtvault_tls_pin::TlsTrust::ca_file(path)
            .and_then(|trust| trust.client_config(provider))
            .map_err(|e| format!("webhook_ca {}: {e}", path.display()))?,
        None => {
            let roots = rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth()
        }
    };
    Ok(Arc::new(config))
}
