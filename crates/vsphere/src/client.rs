//! The session: login, the session header on every call, one re-login on
//! `NotAuthenticated`, faults decoded, tasks waited on.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use url::Url;

use crate::error::{Error, Fault, Result};
use crate::http::HttpClient;
use crate::types::MoRef;
use cbtvault_tls_pin::Password;
use cbtvault_tls_pin::TlsTrust;

/// The JSON API release cbtvault speaks (vCenter 8.0 U2's schema).
pub const DEFAULT_RELEASE: &str = "8.0.2.0";

/// How to reach and log in to vCenter.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// `https://vc.example.com` (a path, if any, is ignored).
    pub url: Url,
    pub username: String,
    pub password: Password,
    /// Required for `https://`.
    pub tls: Option<TlsTrust>,
    /// The `{release}` of `/sdk/vim25/{release}/...`.
    pub release: String,
    /// One HTTP exchange.
    pub timeout: Duration,
    /// How long a task may run before the wait gives up.
    pub task_timeout: Duration,
}

impl ClientOptions {
    pub fn new(url: &str, username: impl Into<String>, password: Password) -> Result<Self> {
        let url = Url::parse(url).map_err(|e| Error::Config(format!("bad URL {url:?}: {e}")))?;
        Ok(ClientOptions {
            url,
            username: username.into(),
            password,
            tls: None,
            release: DEFAULT_RELEASE.into(),
            timeout: Duration::from_secs(120),
            task_timeout: Duration::from_secs(3600),
        })
    }
}

/// A logged-in vSphere session; clones share it.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: HttpClient,
    /// `/sdk/vim25/{release}`
    base: String,
    options: ClientOptions,
    /// The current session token.
    session: std::sync::Mutex<Option<String>>,
    /// Serializes re-logins, so concurrent callers log in once.
    relogin: tokio::sync::Mutex<()>,
    session_manager: String,
    vstorage_manager: Option<String>,
    root_folder: Option<MoRef>,
    view_manager: Option<String>,
    about: String,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.inner.options.url.as_str())
            .finish_non_exhaustive()
    }
}

/// Retrying calls whose session expired: the server refused them before
/// running them, so even a `*_Task` method did not start.
const RELOGIN_ONCE: usize = 2;

impl Client {
    /// Reads the service content (no session needed) and logs in.
    pub async fn connect(options: ClientOptions) -> Result<Client> {
        let tls = match &options.tls {
            Some(trust) => {
                if *trust == TlsTrust::InsecureAcceptAny {
                    tracing::warn!(
                        "TLS certificate verification is disabled: any server can impersonate vCenter"
                    );
                }
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                Some(Arc::new(trust.client_config(provider).map_err(|e| {
                    Error::Config(match &e.source {
                        Some(c) => format!("{}: {c}", e.what),
                        None => e.what,
                    })
                })?))
            }
            None => None,
        };
        let http = HttpClient::new(&options.url, tls, options.timeout)?;
        let base = format!("/sdk/vim25/{}", options.release);
        let reply = http
            .send(
                Method::GET,
                &format!("{base}/ServiceInstance/ServiceInstance/content"),
                None,
                None,
            )
            .await?;
        let content = decode("reading the service content", reply)?
            .ok_or_else(|| Error::protocol("ServiceInstance.content", "empty"))?;
        let moid = |key: &str| content.get(key).and_then(MoRef::from_json).map(|m| m.value);
        let session_manager = moid("sessionManager")
            .ok_or_else(|| Error::protocol("ServiceInstance.content", "no sessionManager"))?;
        let client = Client {
            inner: Arc::new(Inner {
                http,
                base,
                session: std::sync::Mutex::new(None),
                relogin: tokio::sync::Mutex::new(()),
                session_manager,
                vstorage_manager: moid("vStorageObjectManager"),
                root_folder: content.get("rootFolder").and_then(MoRef::from_json),
                view_manager: moid("viewManager"),
                about: content
                    .pointer("/about/fullName")
                    .and_then(|s| s.as_str())
                    .unwrap_or("vSphere")
                    .to_owned(),
                options,
            }),
        };
        client.login().await?;
        Ok(client)
    }

    /// The server's `about.fullName`.
    pub fn about(&self) -> &str {
        &self.inner.about
    }

    /// `host:port` of the server, for messages.
    pub fn endpoint(&self) -> String {
        self.inner.http.endpoint()
    }

    /// The moId of `VcenterVStorageObjectManager` (FCD calls).
    pub(crate) fn vstorage_manager(&self) -> Result<&str> {
        self.inner.vstorage_manager.as_deref().ok_or_else(|| {
            Error::protocol(
                "ServiceInstance.content",
                "no vStorageObjectManager: the server manages no First Class Disks",
            )
        })
    }

    /// The inventory's root folder and the view manager's moId.
    pub(crate) fn inventory(&self) -> Result<(&MoRef, &str)> {
        match (&self.inner.root_folder, &self.inner.view_manager) {
            (Some(root), Some(views)) => Ok((root, views)),
            _ => Err(Error::protocol(
                "ServiceInstance.content",
                "no rootFolder or viewManager: the server cannot list its VMs",
            )),
        }
    }

    pub(crate) fn task_timeout(&self) -> Duration {
        self.inner.options.task_timeout
    }

    fn current_session(&self) -> Option<String> {
        self.inner
            .session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_session(&self, s: Option<String>) {
        *self.inner.session.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }

    async fn login(&self) -> Result<()> {
        let o = &self.inner.options;
        let body = json!({"userName": o.username, "password": o.password.expose()});
        let path = format!(
            "{}/SessionManager/{}/Login",
            self.inner.base, self.inner.session_manager
        );
        let reply = self
            .inner
            .http
            .send(Method::POST, &path, None, Some(to_bytes(&body)))
            .await?;
        let token = reply.session.clone();
        decode(
            &format!("logging in to {} as {}", self.endpoint(), o.username),
            reply,
        )?;
        let token = token.ok_or_else(|| {
            Error::protocol("SessionManager.Login", "no vmware-api-session-id header")
        })?;
        self.set_session(Some(token));
        Ok(())
    }

    /// Logs in again unless another caller already did since `stale`.
    async fn relogin(&self, stale: Option<&str>) -> Result<()> {
        let _one = self.inner.relogin.lock().await;
        if self.current_session().as_deref() != stale {
            return Ok(());
        }
        tracing::info!(server = %self.endpoint(), "vSphere session expired; logging in again");
        self.login().await
    }

    /// Ends the session.
    pub async fn logout(&self) -> Result<()> {
        let path = format!(
            "{}/SessionManager/{}/Logout",
            self.inner.base, self.inner.session_manager
        );
        let session = self.current_session();
        let reply = self
            .inner
            .http
            .send(Method::POST, &path, session.as_deref(), None)
            .await?;
        decode("logging out", reply)?;
        self.set_session(None);
        Ok(())
    }

    /// One call: `GET {moType}/{moId}/{property}` (`body` None) or
    /// `POST {moType}/{moId}/{method}`. `None` is a `204` (void method,
    /// unset property). Re-logs in once on `NotAuthenticated`.
    pub async fn call(
        &self,
        http_method: Method,
        object: &MoRef,
        name: &str,
        body: Option<Value>,
    ) -> Result<Option<Value>> {
        let path = format!(
            "{}/{}/{}/{}",
            self.inner.base, object.kind, object.value, name
        );
        let what = format!("{name} on {}", object.value);
        let body = body.map(|b| to_bytes(&b));
        let mut last = None;
        for _ in 0..RELOGIN_ONCE {
            let session = self.current_session();
            let reply = self
                .inner
                .http
                .send(http_method.clone(), &path, session.as_deref(), body.clone())
                .await?;
            if let Some(s) = &reply.session
                && session.as_deref() != Some(s.as_str())
            {
                self.set_session(Some(s.clone()));
            }
            match decode(&what, reply) {
                Err(e) if e.is_not_authenticated() => {
                    self.relogin(session.as_deref()).await?;
                    last = Some(e);
                }
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| Error::protocol(&what, "no answer")))
    }

    /// Reads a property.
    pub async fn get(&self, object: &MoRef, property: &str) -> Result<Option<Value>> {
        self.call(Method::GET, object, property, None).await
    }

    /// Invokes a method.
    pub async fn invoke(&self, object: &MoRef, method: &str, body: Value) -> Result<Option<Value>> {
        self.call(Method::POST, object, method, Some(body)).await
    }

    /// Invokes a `*_Task` method and waits for its task; returns
    /// `info.result`.
    pub async fn run_task(
        &self,
        object: &MoRef,
        method: &str,
        body: Value,
    ) -> Result<Option<Value>> {
        let what = format!("{method} on {}", object.value);
        let task = self
            .invoke(object, method, body)
            .await?
            .as_ref()
            .and_then(MoRef::from_json)
            .ok_or_else(|| Error::protocol(&what, "no Task reference"))?;
        self.wait_task(&task, &what).await
    }

    /// Polls `Task/{id}/info` (50 ms doubling to 1 s) until the task is
    /// `success` or `error`, within the task timeout.
    pub async fn wait_task(&self, task: &MoRef, what: &str) -> Result<Option<Value>> {
        let limit = self.task_timeout();
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(50);
        loop {
            let info = self
                .get(task, "info")
                .await?
                .ok_or_else(|| Error::protocol(what, "a task without info"))?;
            match info.get("state").and_then(|s| s.as_str()) {
                Some("success") => return Ok(info.get("result").cloned()),
                Some("error") => {
                    let fault = info
                        .pointer("/error/fault")
                        .cloned()
                        .and_then(Fault::from_json)
                        .unwrap_or_else(|| Fault {
                            type_name: "MethodFault".into(),
                            message: info
                                .pointer("/error/localizedMessage")
                                .and_then(|m| m.as_str())
                                .unwrap_or("no fault given")
                                .into(),
                            keys: Vec::new(),
                            invalid_property: None,
                            body: Value::Null,
                        });
                    return Err(Error::Task {
                        what: what.to_owned(),
                        task: task.value.clone(),
                        fault: Box::new(fault),
                    });
                }
                Some("queued" | "running") => {}
                other => {
                    return Err(Error::protocol(what, format!("task state {other:?}")));
                }
            }
            if started.elapsed() >= limit {
                return Err(Error::Timeout {
                    what: format!("{what} (task {})", task.value),
                    after: limit,
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }
}

fn to_bytes(v: &Value) -> Bytes {
    Bytes::from(v.to_string())
}

/// A reply as the JSON API defines it: 200 + value, 204 nothing, 500 a
/// fault; anything else is an HTTP error.
fn decode(what: &str, reply: crate::http::Reply) -> Result<Option<Value>> {
    match reply.status {
        StatusCode::OK => serde_json::from_slice(&reply.body)
            .map(Some)
            .map_err(|e| Error::protocol(what, format!("bad JSON: {e}"))),
        StatusCode::NO_CONTENT => Ok(None),
        StatusCode::INTERNAL_SERVER_ERROR => {
            let fault = serde_json::from_slice(&reply.body)
                .ok()
                .and_then(Fault::from_json);
            match fault {
                Some(fault) => Err(Error::Fault {
                    what: what.to_owned(),
                    fault: Box::new(fault),
                }),
                None => Err(Error::HttpStatus {
                    status: 500,
                    what: what.to_owned(),
                    body: snippet(&reply.body),
                }),
            }
        }
        other => Err(Error::HttpStatus {
            status: other.as_u16(),
            what: what.to_owned(),
            body: snippet(&reply.body),
        }),
    }
}

fn snippet(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned()
}
