//! A small HTTP/1.1 client for one host: kept-alive connections reused for
//! RPC calls, optional TLS, and streaming uploads.
//!
//! XAPI is HTTP/1.1 only and a backup talks to one pool master, so a pool
//! of idle connections to that one endpoint is all that is needed; hyper's
//! connection-level API gives that without a general-purpose client.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use url::Url;

use crate::error::{Error, Result};

/// A request body: whole or streamed.
pub(crate) type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// Largest reply body read (a `get_all_records` of a big pool is tens of MiB).
const MAX_REPLY: usize = 512 << 20;
/// Idle connections kept.
const MAX_IDLE: usize = 4;

/// A reply read in full.
pub(crate) struct Reply {
    pub status: StatusCode,
    pub content_type: Option<String>,
    pub body: Bytes,
}

/// Connections to one host.
pub(crate) struct HttpClient {
    host: String,
    port: u16,
    /// `host:port` for the `Host` header and messages.
    authority: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    idle: Mutex<Vec<SendRequest<Body>>>,
    timeout: Duration,
}

impl HttpClient {
    /// A client for the host of `url` (`http` or `https`).
    pub fn new(
        url: &Url,
        tls: Option<Arc<rustls::ClientConfig>>,
        timeout: Duration,
    ) -> Result<Self> {
        let host = url
            .host_str()
            .ok_or_else(|| Error::Config(format!("{url} has no host")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = url
            .port_or_known_default()
            .ok_or_else(|| Error::Config(format!("{url} has no port")))?;
        let tls = match (url.scheme(), tls) {
            ("https", Some(config)) => {
                let name = ServerName::try_from(host.clone())
                    .map_err(|e| Error::Config(format!("bad host name {host}: {e}")))?;
                Some((TlsConnector::from(config), name))
            }
            ("https", None) => {
                return Err(Error::Config(
                    "an https URL needs a TLS trust setting (pinned certificate, CA, or \
                     explicitly insecure)"
                        .into(),
                ));
            }
            ("http", _) => None,
            (other, _) => return Err(Error::Config(format!("unsupported URL scheme {other}"))),
        };
        let authority = match url.port() {
            Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
            None => url.host_str().unwrap_or_default().to_owned(),
        };
        Ok(HttpClient {
            host,
            port,
            authority,
            tls,
            idle: Mutex::new(Vec::new()),
            timeout,
        })
    }

    /// `host:port`, for messages.
    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    async fn connect(&self) -> Result<SendRequest<Body>> {
        let endpoint = self.endpoint();
        let connect_err = |source| Error::Connect {
            endpoint: endpoint.clone(),
            source,
        };
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(connect_err)?;
        tcp.set_nodelay(true).map_err(connect_err)?;
        let http_err = |source| Error::Http {
            endpoint: endpoint.clone(),
            source,
        };
        let sender = match &self.tls {
            Some((connector, name)) => {
                let stream = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| Error::tls_connect(&endpoint, e))?;
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(http_err)?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!("XAPI connection closed: {e}");
                    }
                });
                sender
            }
            None => {
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                    .await
                    .map_err(http_err)?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!("XAPI connection closed: {e}");
                    }
                });
                sender
            }
        };
        Ok(sender)
    }

    fn take_idle(&self) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(sender) = idle.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    fn put_idle(&self, sender: SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(sender);
        }
    }

    fn request(&self, method: Method, path: &str, content_type: &str, body: Body) -> Request<Body> {
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = path.parse().unwrap_or_else(|_| http::Uri::from_static("/"));
        let headers = req.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&self.authority) {
            headers.insert(header::HOST, v);
        }
        if let Ok(v) = HeaderValue::from_str(content_type) {
            headers.insert(header::CONTENT_TYPE, v);
        }
        headers.insert(
            header::USER_AGENT,
            HeaderValue::from_static(concat!("cbtvault-xenapi/", env!("CARGO_PKG_VERSION"))),
        );
        req
    }

    /// POSTs `body` to `path` and reads the whole reply, on a pooled
    /// connection when one is idle.
    pub async fn post(&self, path: &str, content_type: &str, body: Vec<u8>) -> Result<Reply> {
        let body = Bytes::from(body);
        let work = async {
            // A pooled connection may have been closed by the server while
            // idle; a request that hyper reports as never sent is retried
            // once on a fresh connection.
            for attempt in 0..2 {
                let (mut sender, reused) = match self.take_idle() {
                    Some(s) if attempt == 0 => (s, true),
                    _ => (self.connect().await?, false),
                };
                let full = Full::new(body.clone())
                    .map_err(|never| match never {})
                    .boxed_unsync();
                let req = self.request(Method::POST, path, content_type, full);
                if sender.ready().await.is_err() {
                    if reused {
                        continue;
                    }
                    return Err(Error::Connect {
                        endpoint: self.endpoint(),
                        source: std::io::Error::other("connection closed before the request"),
                    });
                }
                match sender.send_request(req).await {
                    Ok(resp) => {
                        let reply = read_reply(resp, &self.endpoint()).await?;
                        self.put_idle(sender);
                        return Ok(reply);
                    }
                    Err(e) if reused && e.is_canceled() => continue,
                    Err(source) => {
                        return Err(Error::Http {
                            endpoint: self.endpoint(),
                            source,
                        });
                    }
                }
            }
            Err(Error::Connect {
                endpoint: self.endpoint(),
                source: std::io::Error::other("no usable connection"),
            })
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| Error::Timeout {
                what: format!("HTTP POST {path} to {}", self.endpoint()),
                after: self.timeout,
            })?
    }

    /// PUTs a streamed body of exactly `length` bytes on a fresh connection
    /// and reads the reply. No overall timeout: uploads take as long as the
    /// data takes.
    pub async fn put_stream(&self, path_and_query: &str, body: Body, length: u64) -> Result<Reply> {
        let mut sender = self.connect().await?;
        let mut req = self.request(
            Method::PUT,
            path_and_query,
            "application/octet-stream",
            body,
        );
        req.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        sender.ready().await.map_err(|source| Error::Http {
            endpoint: self.endpoint(),
            source,
        })?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|source| Error::Http {
                endpoint: self.endpoint(),
                source,
            })?;
        read_reply(resp, &self.endpoint()).await
    }
}

async fn read_reply(resp: http::Response<hyper::body::Incoming>, endpoint: &str) -> Result<Reply> {
    let status = resp.status();
    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = Limited::new(resp.into_body(), MAX_REPLY)
        .collect()
        .await
        .map_err(|e| match e.downcast::<hyper::Error>() {
            Ok(source) => Error::Http {
                endpoint: endpoint.to_owned(),
                source: *source,
            },
            Err(other) => Error::Protocol {
                transport: "HTTP",
                detail: other.to_string(),
            },
        })?
        .to_bytes();
    Ok(Reply {
        status,
        content_type,
        body,
    })
}
