//! A small HTTP/1.1 client for one server: kept-alive connections reused
//! across calls, TLS through rustls.
//!
//! A backup talks to one vCenter, and the JSON API needs only whole JSON
//! bodies both ways, so a few idle connections to that one endpoint are all
//! the pooling needed; hyper's connection-level API gives that without a
//! general-purpose client (as `cbtvault-xenapi` does for XAPI).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use url::Url;

use crate::error::{Error, Result};

/// The session header of the JSON API, in requests and in replies.
pub(crate) const SESSION_HEADER: &str = "vmware-api-session-id";
/// Largest answer read (a VM's config with many devices is a few hundred KiB).
const MAX_REPLY: usize = 64 << 20;
const MAX_IDLE: usize = 4;

/// A reply read in full.
pub(crate) struct Reply {
    pub status: StatusCode,
    /// The `vmware-api-session-id` header, when the server sent one.
    pub session: Option<String>,
    pub body: Bytes,
}

pub(crate) struct HttpClient {
    host: String,
    port: u16,
    authority: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
    timeout: Duration,
}

impl HttpClient {
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

    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>> {
        let endpoint = self.endpoint();
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| Error::Connect {
                endpoint: endpoint.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
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
                        tracing::debug!("vSphere connection closed: {e}");
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
                        tracing::debug!("vSphere connection closed: {e}");
                    }
                });
                sender
            }
        };
        Ok(sender)
    }

    fn take_idle(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(s) = idle.pop() {
            if !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    fn put_idle(&self, sender: SendRequest<Full<Bytes>>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(sender);
        }
    }

    fn request(
        &self,
        method: &Method,
        path: &str,
        session: Option<&str>,
        body: &Option<Bytes>,
    ) -> Result<Request<Full<Bytes>>> {
        let mut req = Request::new(Full::new(body.clone().unwrap_or_default()));
        *req.method_mut() = method.clone();
        *req.uri_mut() = path
            .parse()
            .map_err(|e| Error::Config(format!("bad request path {path}: {e}")))?;
        let headers = req.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&self.authority) {
            headers.insert(header::HOST, v);
        }
        if body.is_some() {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        headers.insert(
            header::USER_AGENT,
            HeaderValue::from_static(concat!("cbtvault-vsphere/", env!("CARGO_PKG_VERSION"))),
        );
        if let Some(s) = session
            && let Ok(v) = HeaderValue::from_str(s)
        {
            headers.insert(SESSION_HEADER, v);
        }
        Ok(req)
    }

    /// Sends one request and reads the whole reply, on a pooled connection
    /// when one is idle. A pooled connection the server closed while idle
    /// (hyper reports the request as never sent) is replaced once.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        session: Option<&str>,
        body: Option<Bytes>,
    ) -> Result<Reply> {
        let work = async {
            for attempt in 0..2 {
                let (mut sender, reused) = match self.take_idle() {
                    Some(s) if attempt == 0 => (s, true),
                    _ => (self.connect().await?, false),
                };
                let req = self.request(&method, path, session, &body)?;
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
                what: format!("HTTP {method} {path} to {}", self.endpoint()),
                after: self.timeout,
            })?
    }
}

async fn read_reply(resp: http::Response<hyper::body::Incoming>, endpoint: &str) -> Result<Reply> {
    let status = resp.status();
    let session = resp
        .headers()
        .get(SESSION_HEADER)
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
            Err(other) => Error::protocol("an HTTP reply", other.to_string()),
        })?
        .to_bytes();
    Ok(Reply {
        status,
        session,
        body,
    })
}
