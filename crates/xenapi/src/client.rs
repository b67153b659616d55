//! The connection to a pool: one session for the whole run, re-established
//! transparently when XAPI says `SESSION_INVALID`, over whichever wire
//! format the host speaks.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt as _;
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::Frame;
use tokio::io::AsyncRead;
use tokio_util::io::ReaderStream;
use url::Url;

use crate::error::{Error, Result, XapiError};
use crate::http::HttpClient;
use crate::rpc::{Response, Transport, xmlrpc};
use crate::tls::TlsTrust;
use crate::types::{SessionRef, TaskRecord, TaskRef, TaskStatus, VdiRef};
use crate::value::{Value, expect_string};
use cbtvault_tls_pin::Password;

/// Which wire format to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TransportChoice {
    /// JSON-RPC, falling back to XML-RPC if the host has no `/jsonrpc`.
    #[default]
    Auto,
    /// JSON-RPC only.
    JsonRpc,
    /// XML-RPC only.
    XmlRpc,
}

/// How to reach and log in to a pool.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// `https://pool-master` (or `http://…` on a lab network).
    pub url: Url,
    /// User name, e.g. `root`.
    pub username: String,
    /// Password (redacted in `Debug`).
    pub password: Password,
    /// Identifies this program to XAPI; sessions are counted and evicted
    /// per originator, so a named originator keeps a backup's session safe
    /// from other clients' leaks.
    pub originator: String,
    /// Wire format.
    pub transport: TransportChoice,
    /// TLS trust for `https` URLs; `None` is refused for `https`.
    pub tls: Option<TlsTrust>,
    /// Limit for one HTTP exchange.
    pub rpc_timeout: Duration,
    /// Limit for one asynchronous task; `None` waits as long as it takes.
    pub task_timeout: Option<Duration>,
    /// First and longest pause between polls of a task, on a host without
    /// `event.from`.
    pub task_poll: (Duration, Duration),
}

impl ClientOptions {
    /// Options with the defaults: originator `cbtvault`, automatic
    /// transport, 120 s per call, tasks polled from every 50 ms up to every
    /// second, no task limit.
    pub fn new(url: &str, username: impl Into<String>, password: Password) -> Result<Self> {
        let url = Url::parse(url).map_err(|e| Error::Config(format!("bad URL {url:?}: {e}")))?;
        Ok(ClientOptions {
            url,
            username: username.into(),
            password,
            originator: "cbtvault".into(),
            transport: TransportChoice::Auto,
            tls: None,
            rpc_timeout: Duration::from_secs(120),
            task_timeout: None,
            task_poll: (Duration::from_millis(50), Duration::from_secs(1)),
        })
    }
}

struct Inner {
    http: HttpClient,
    options: ClientOptions,
    /// Resolved wire format.
    transport: RwLock<Transport>,
    /// A reply has been decoded with the current transport: no more fallback.
    transport_confirmed: AtomicBool,
    session: RwLock<Option<SessionRef>>,
    /// Serialises logins so concurrent callers that all saw
    /// `SESSION_INVALID` log in only once.
    login: tokio::sync::Mutex<()>,
    /// The host refused these credentials: no further login is tried with
    /// them (xapi answers each wrong password after 5 s, and a directory
    /// service may lock the account after a few).
    refused: RwLock<Option<XapiError>>,
    next_id: AtomicU64,
}

/// A logged-in connection to a pool. Cheap to clone; clones share the
/// session. Call [`Client::logout`] when done: sessions are a limited
/// resource on the host.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.inner.options.url.as_str())
            .field("username", &self.inner.options.username)
            .field("transport", &self.transport())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects and logs in with `session.login_with_password(user,
    /// password, "1.1", originator)`.
    pub async fn connect(options: ClientOptions) -> Result<Client> {
        let tls = match (&options.tls, options.url.scheme()) {
            (Some(trust), "https") => Some(crate::tls::client_config(trust)?),
            _ => None,
        };
        let http = HttpClient::new(&options.url, tls, options.rpc_timeout)?;
        let transport = match options.transport {
            TransportChoice::Auto | TransportChoice::JsonRpc => Transport::JsonRpc,
            TransportChoice::XmlRpc => Transport::XmlRpc,
        };
        let client = Client {
            inner: Arc::new(Inner {
                http,
                options,
                transport: RwLock::new(transport),
                transport_confirmed: AtomicBool::new(false),
                session: RwLock::new(None),
                login: tokio::sync::Mutex::new(()),
                refused: RwLock::new(None),
                next_id: AtomicU64::new(1),
            }),
        };
        client.relogin(None).await?;
        Ok(client)
    }

    /// The wire format in use.
    pub fn transport(&self) -> Transport {
        *self
            .inner
            .transport
            .read()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The current session. It changes after a transparent re-login, so
    /// read it when building an NBD export name rather than keeping it.
    pub fn session(&self) -> Option<SessionRef> {
        self.inner
            .session
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Logs out. Later calls log in again.
    pub async fn logout(&self) -> Result<()> {
        let _guard = self.inner.login.lock().await;
        let session = self
            .inner
            .session
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(session) = session {
            match self
                .rpc("session.logout", vec![Value::from(&session)])
                .await
            {
                Ok(_) | Err(Error::Xapi(XapiError::SessionInvalid { .. })) => {}
                Err(e) => return Err(e),
            }
            tracing::debug!("logged out of {}", self.inner.http.endpoint());
        }
        Ok(())
    }

    /// Logs in again unless another caller already replaced `stale`. Once
    /// the host has refused the credentials, every later login fails the
    /// same way without asking it again.
    async fn relogin(&self, stale: Option<&SessionRef>) -> Result<SessionRef> {
        let _guard = self.inner.login.lock().await;
        if let Some(current) = self.session()
            && Some(&current) != stale
        {
            return Ok(current);
        }
        if let Some(refused) = self
            .inner
            .refused
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Err(Error::Xapi(refused));
        }
        let o = &self.inner.options;
        let params = vec![
            Value::from(&o.username),
            Value::from(o.password.expose()),
            Value::from("1.1"),
            Value::from(&o.originator),
        ];
        let result = match self.rpc("session.login_with_password", params).await {
            Err(Error::Xapi(e @ XapiError::SessionAuthenticationFailed { .. })) => {
                *self
                    .inner
                    .refused
                    .write()
                    .unwrap_or_else(|e| e.into_inner()) = Some(e.clone());
                return Err(Error::Xapi(e));
            }
            other => other?,
        };
        let session = SessionRef::new(expect_string("session.login_with_password", result)?);
        tracing::debug!(
            "logged in to {} as {} over {}{}",
            self.inner.http.endpoint(),
            o.username,
            self.transport().name(),
            if stale.is_some() {
                " (the previous session was invalid)"
            } else {
                ""
            }
        );
        *self
            .inner
            .session
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(session.clone());
        Ok(session)
    }

    /// One RPC exchange, without session handling. Falls back from
    /// JSON-RPC to XML-RPC once if the host has no JSON-RPC endpoint.
    async fn rpc(&self, method: &str, params: Vec<Value>) -> Result<Value> {
        loop {
            let transport = self.transport();
            let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
            let body = transport.encode_call(method, &params, id);
            tracing::trace!("XAPI call {method} over {}", transport.name());
            let reply = self
                .inner
                .http
                .post(transport.path(), transport.content_type(), body)
                .await?;
            let is_json = reply
                .content_type
                .as_deref()
                .is_some_and(|c| c.contains("json"));
            if transport == Transport::JsonRpc
                && self.inner.options.transport == TransportChoice::Auto
                && !self.inner.transport_confirmed.load(Ordering::Relaxed)
                && (!reply.status.is_success() || !is_json)
                && matches!(reply.status.as_u16(), 200 | 404 | 405 | 501)
            {
                tracing::info!(
                    "{} has no JSON-RPC endpoint (HTTP {}), using XML-RPC",
                    self.inner.http.endpoint(),
                    reply.status
                );
                *self
                    .inner
                    .transport
                    .write()
                    .unwrap_or_else(|e| e.into_inner()) = Transport::XmlRpc;
                continue;
            }
            if !reply.status.is_success() {
                return Err(Error::HttpStatus {
                    status: reply.status.as_u16(),
                    what: format!("{method} ({} {})", transport.name(), transport.path()),
                    body: snippet(&reply.body),
                });
            }
            let response = transport.decode_response(&reply.body)?;
            self.inner
                .transport_confirmed
                .store(true, Ordering::Relaxed);
            return match response {
                Response::Success(v) => Ok(v),
                Response::Failure(description) => {
                    Err(Error::Xapi(XapiError::from_description(description)))
                }
            };
        }
    }

    /// Calls `method` with the session as first parameter, then `params`.
    /// On `SESSION_INVALID` it logs in again and retries once.
    pub async fn call(&self, method: &str, params: Vec<Value>) -> Result<Value> {
        let session = match self.session() {
            Some(s) => s,
            None => self.relogin(None).await?,
        };
        let with = |s: &SessionRef| {
            let mut all = Vec::with_capacity(params.len() + 1);
            all.push(Value::from(s));
            all.extend(params.iter().cloned());
            all
        };
        match self.rpc(method, with(&session)).await {
            Err(Error::Xapi(XapiError::SessionInvalid { .. })) => {
                tracing::info!("XAPI session no longer valid during {method}; logging in again");
                let fresh = self.relogin(Some(&session)).await?;
                self.rpc(method, with(&fresh)).await
            }
            other => other,
        }
    }

    /// Runs `Async.<method>` and waits for its task; returns the task's
    /// result decoded from its XML-RPC fragment. The task is destroyed
    /// afterwards. Failures of the task come back as [`Error::Xapi`].
    pub async fn call_async(&self, method: &str, params: Vec<Value>) -> Result<Value> {
        let task_name = format!("Async.{method}");
        let task = TaskRef::new(expect_string(
            &task_name,
            self.call(&task_name, params).await?,
        )?);
        let outcome = self.wait_task(&task, method).await;
        if let Err(e) = self.call("task.destroy", vec![Value::from(&task)]).await {
            tracing::debug!("could not destroy task {task} of {method}: {e}");
        }
        outcome
    }

    /// Waits for `task` to finish, as xapi's own clients do: between looks
    /// at the task it blocks in `event.from` until a task changes (one
    /// token taken before the first look, so no change is missed). A host
    /// that refuses `event.from` is polled instead, with growing pauses.
    async fn wait_task(&self, task: &TaskRef, method: &str) -> Result<Value> {
        let (mut pause, longest) = self.inner.options.task_poll;
        let started = tokio::time::Instant::now();
        let mut token = self.event_token().await;
        loop {
            let record = TaskRecord::from_value(
                &self
                    .call("task.get_record", vec![Value::from(task)])
                    .await?,
            )?;
            match record.status {
                TaskStatus::Success => return xmlrpc::decode_value_fragment(&record.result),
                TaskStatus::Failure => {
                    return Err(Error::Xapi(XapiError::from_description(record.error_info)));
                }
                TaskStatus::Cancelled => {
                    return Err(Error::TaskCancelled {
                        task: task.to_string(),
                        call: method.to_owned(),
                    });
                }
                TaskStatus::Pending | TaskStatus::Cancelling | TaskStatus::Other(_) => {}
            }
            let mut wait = longest.max(EVENT_WAIT);
            if let Some(limit) = self.inner.options.task_timeout {
                let spent = started.elapsed();
                if spent >= limit {
                    let _ = self.call("task.cancel", vec![Value::from(task)]).await;
                    return Err(Error::Timeout {
                        what: format!("task {task} ({method})"),
                        after: limit,
                    });
                }
                wait = wait.min(limit - spent);
            }
            token = match token {
                Some(t) => self.next_event(&t, wait).await,
                None => None,
            };
            if token.is_none() {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(longest);
            }
        }
    }

    /// A token for `event.from` on tasks, or `None` if the host has none.
    async fn event_token(&self) -> Option<String> {
        let reply = self
            .call(
                "event.from",
                vec![
                    Value::Array(vec![Value::from("task")]),
                    Value::from(""),
                    Value::Double(0.0),
                ],
            )
            .await;
        event_reply_token(reply)
    }

    /// Blocks until a task changes after `token` (or `wait` passes);
    /// returns the next token, `None` to fall back to polling.
    async fn next_event(&self, token: &str, wait: Duration) -> Option<String> {
        // Well inside the HTTP exchange's own limit.
        let wait = wait.min(self.inner.options.rpc_timeout / 2);
        let reply = self
            .call(
                "event.from",
                vec![
                    Value::Array(vec![Value::from("task")]),
                    Value::from(token),
                    Value::Double(wait.as_secs_f64()),
                ],
            )
            .await;
        event_reply_token(reply)
    }

    /// Uploads `length` bytes from `data` into `vdi`, from offset 0, with
    /// `PUT /import_raw_vdi?session_id=…&vdi=…&format=raw`.
    ///
    /// The session is checked (and renewed if needed) with a cheap call
    /// first, because a streamed body cannot be sent twice.
    pub async fn import_raw_vdi<R>(&self, vdi: &VdiRef, data: R, length: u64) -> Result<()>
    where
        R: AsyncRead + Send + Unpin + 'static,
    {
        self.import(vdi, "raw", data, length).await
    }

    /// Uploads a dynamic VHD (`length` bytes from `data`, see
    /// [`crate::vhd::SparseVhd`]) onto the existing `vdi` with
    /// `PUT /import_raw_vdi?…&format=vhd`: xapi hands it to vhd-tool,
    /// which writes only the sectors the VHD holds and leaves the rest of
    /// the VDI as it is.
    pub async fn import_vhd<R>(&self, vdi: &VdiRef, data: R, length: u64) -> Result<()>
    where
        R: AsyncRead + Send + Unpin + 'static,
    {
        self.import(vdi, "vhd", data, length).await
    }

    async fn import<R>(&self, vdi: &VdiRef, format: &str, data: R, length: u64) -> Result<()>
    where
        R: AsyncRead + Send + Unpin + 'static,
    {
        self.call("VDI.get_uuid", vec![Value::from(vdi)]).await?;
        let session = self
            .session()
            .ok_or_else(|| Error::Config("not logged in".into()))?;
        let query = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("session_id", session.as_str())
            .append_pair("vdi", vdi.as_str())
            .append_pair("format", format)
            .finish();
        let stream = ReaderStream::with_capacity(data, 1 << 20).map_ok(|b: Bytes| Frame::data(b));
        let body = StreamBody::new(stream).boxed_unsync();
        let reply = self
            .inner
            .http
            .put_stream(&format!("/import_raw_vdi?{query}"), body, length)
            .await?;
        if !reply.status.is_success() {
            return Err(Error::HttpStatus {
                status: reply.status.as_u16(),
                what: format!("PUT /import_raw_vdi of {vdi}"),
                body: snippet(&reply.body),
            });
        }
        Ok(())
    }
}

/// Longest single wait in `event.from` between looks at a task.
const EVENT_WAIT: Duration = Duration::from_secs(30);

/// The token of an `event.from` reply; `None` (poll instead) for a host
/// without it or any failure, which the next look at the task reports if
/// it matters.
fn event_reply_token(reply: Result<Value>) -> Option<String> {
    match reply {
        Ok(v) => v
            .as_struct()
            .and_then(|m| m.get("token"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        Err(e) => {
            tracing::debug!("event.from unusable, polling tasks instead: {e}");
            None
        }
    }
}

/// The start of a body, for error messages.
fn snippet(body: &Bytes) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(300)]);
    text.trim().to_owned()
}
