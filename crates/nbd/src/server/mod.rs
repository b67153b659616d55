//! The NBD server: exports, configuration, and the accept loops.
//!
//! Memory is bounded whatever clients do: at most `max_connections`
//! connections; on each, at most `inflight` requests and
//! `connection_bytes` bytes (or one request of up to `max_payload`) between
//! reading a request and writing its reply, and no request is read while
//! that window is full (a client that does not read its replies stops
//! being read); across all connections at most `total_bytes`; option data
//! is capped at 64 KiB. When a client goes, its queued replies and the
//! reads not yet done are dropped.
//!
//! Fairness: a peer (IP address, or user id on a unix socket) has at most
//! `max_connections_per_peer` connections. A newcomer beyond its peer's
//! share or the total takes the place of a connection that waits on its
//! own client (in the handshake, idle, or not reading replies), oldest
//! first; if every one is busy it is closed at once (see `limits`). The
//! handshake must end within `handshake_timeout`; a connection whose client
//! neither sends requests nor takes replies for `idle_timeout` is closed.
//!
//! Shutdown through the `CancellationToken` stops accepting, lets every
//! connection finish the requests it has read, and returns when all are
//! closed.

mod limits;
mod negotiate;
mod transmit;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::error::{BoxError, Error, Result};
use crate::proto;

/// One extent of a block-status answer, starting where the previous one
/// ended. `flags` are `base:allocation` flags ([`Extent::HOLE`],
/// [`Extent::ZERO`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    pub flags: u32,
}

impl Extent {
    pub const HOLE: u32 = proto::STATE_HOLE;
    pub const ZERO: u32 = proto::STATE_ZERO;
}

/// A disk the server exports. Errors are reported to the client as NBD
/// errors: an `std::io::Error` maps by kind (`InvalidInput` → EINVAL,
/// `PermissionDenied` → EPERM, `Unsupported` → ENOTSUP, `StorageFull` →
/// ENOSPC, anything else → EIO).
pub trait Export: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// Exactly `len` bytes at `offset` (the range is checked beforehand).
    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, BoxError>>;

    /// Allocation of `[offset, offset+len)` as consecutive extents from
    /// `offset`; they may cover less than asked (the client asks again) and
    /// are clipped if they cover more. The default reports all data.
    fn block_status(&self, _offset: u64, len: u64) -> BoxFuture<'_, Result<Vec<Extent>, BoxError>> {
        Box::pin(async move {
            Ok(vec![Extent {
                length: len,
                flags: 0,
            }])
        })
    }

    /// Whether writes are refused. Default true.
    fn read_only(&self) -> bool {
        true
    }

    /// Writes `data` at `offset`; only called when `read_only` is false.
    fn write(&self, _offset: u64, _data: Bytes) -> BoxFuture<'_, Result<(), BoxError>> {
        Box::pin(async { Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied).into()) })
    }

    /// Writes zeros; by default with `write` in pieces of 1 MiB.
    fn write_zeroes(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<(), BoxError>> {
        Box::pin(async move {
            let piece = 1u64 << 20;
            let zeros = Bytes::from(vec![0u8; piece.min(len) as usize]);
            let mut done = 0;
            while done < len {
                let n = piece.min(len - done);
                self.write(offset + done, zeros.slice(..n as usize)).await?;
                done += n;
            }
            Ok(())
        })
    }

    /// Makes completed writes durable.
    fn flush(&self) -> BoxFuture<'_, Result<(), BoxError>> {
        Box::pin(async { Ok(()) })
    }
}

/// An export held in memory, for tests and simulators. Zero-filled 4 KiB
/// blocks are reported as holes.
pub struct MemoryExport {
    data: RwLock<Vec<u8>>,
    writable: bool,
}

impl MemoryExport {
    /// A read-only export of `data`.
    pub fn new(data: Vec<u8>) -> Self {
        MemoryExport {
            data: RwLock::new(data),
            writable: false,
        }
    }

    /// A writable export of `data`.
    pub fn writable(data: Vec<u8>) -> Self {
        MemoryExport {
            data: RwLock::new(data),
            writable: true,
        }
    }

    /// A copy of the current contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Export for MemoryExport {
    fn size(&self) -> u64 {
        self.data.read().unwrap_or_else(|p| p.into_inner()).len() as u64
    }

    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, BoxError>> {
        let d = self.data.read().unwrap_or_else(|p| p.into_inner());
        let r = d
            .get(offset as usize..offset as usize + len as usize)
            .map(Bytes::copy_from_slice)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput).into());
        Box::pin(async move { r })
    }

    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Vec<Extent>, BoxError>> {
        const BLOCK: u64 = 4096;
        let d = self.data.read().unwrap_or_else(|p| p.into_inner());
        let end = (offset + len).min(d.len() as u64);
        let mut out: Vec<Extent> = Vec::new();
        let mut cur = offset;
        while cur < end {
            let next = ((cur / BLOCK + 1) * BLOCK).min(end);
            let zero = d[cur as usize..next as usize].iter().all(|&b| b == 0);
            let flags = if zero { Extent::HOLE | Extent::ZERO } else { 0 };
            match out.last_mut() {
                Some(e) if e.flags == flags => e.length += next - cur,
                _ => out.push(Extent {
                    length: next - cur,
                    flags,
                }),
            }
            cur = next;
        }
        Box::pin(async move { Ok(out) })
    }

    fn read_only(&self) -> bool {
        !self.writable
    }

    fn write(&self, offset: u64, data: Bytes) -> BoxFuture<'_, Result<(), BoxError>> {
        let mut d = self.data.write().unwrap_or_else(|p| p.into_inner());
        let r = match d.get_mut(offset as usize..offset as usize + data.len()) {
            Some(dst) if self.writable => {
                dst.copy_from_slice(&data);
                Ok(())
            }
            Some(_) => Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied).into()),
            None => Err(std::io::Error::from(std::io::ErrorKind::InvalidInput).into()),
        };
        Box::pin(async move { r })
    }
}

/// How much of the protocol the server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Fixed newstyle with LIST, INFO/GO, structured replies, meta
    /// contexts, multi-conn.
    Full,
    /// Imitates XenServer's xapi-nbd: EXPORT_NAME only (other options get
    /// ERR_UNSUP, LIST ERR_POLICY), no NO_ZEROES, read-only, simple replies,
    /// reads aligned to 512 bytes, and any error reply closes the connection.
    Minimal,
}

/// Server settings.
#[derive(Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    pub mode: Mode,
    /// TLS, offered through STARTTLS.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Refuse everything but STARTTLS until TLS is up (FORCEDTLS).
    pub require_tls: bool,
    /// Connections served at once. Default 64.
    pub max_connections: usize,
    /// Connections from one IP address (or one user on a unix socket).
    /// Default 16.
    pub max_connections_per_peer: usize,
    /// A newcomer over a limit replaces the connection that waited longest
    /// on its client, instead of being closed. Default true (false in
    /// minimal mode, like xapi-nbd).
    pub evict_waiting: bool,
    /// Requests between being read and their reply written, per
    /// connection. Default 16.
    pub inflight: usize,
    /// Bytes of requests between being read and their reply written, per
    /// connection (one larger request, up to `max_payload`, goes alone).
    /// Default 16 MiB.
    pub connection_bytes: u32,
    /// The same across all connections. Default 128 MiB.
    pub total_bytes: u32,
    /// Largest READ/WRITE payload. Default 32 MiB.
    pub max_payload: u32,
    /// Announce CAN_MULTI_CONN (full mode). Default true.
    pub multi_conn: bool,
    /// Time a client has to finish the handshake. Default 10 s.
    pub handshake_timeout: std::time::Duration,
    /// A connection whose client sends no request and takes no reply
    /// bytes for this long is closed; `None`: never. Default 5 minutes.
    pub idle_timeout: Option<std::time::Duration>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            mode: Mode::Full,
            tls: None,
            require_tls: false,
            max_connections: 64,
            max_connections_per_peer: 16,
            evict_waiting: true,
            inflight: 16,
            connection_bytes: 16 << 20,
            total_bytes: 128 << 20,
            max_payload: proto::DEFAULT_MAX_PAYLOAD,
            multi_conn: true,
            handshake_timeout: std::time::Duration::from_secs(10),
            idle_timeout: Some(std::time::Duration::from_secs(300)),
        }
    }
}

impl ServerConfig {
    /// xapi-nbd's behaviour: minimal mode, TLS required, 16 connections.
    pub fn minimal(tls: Arc<rustls::ServerConfig>) -> Self {
        ServerConfig {
            mode: Mode::Minimal,
            tls: Some(tls),
            require_tls: true,
            max_connections: 16,
            // xapi-nbd limits only the total.
            max_connections_per_peer: usize::MAX,
            evict_waiting: false,
            inflight: 1,
            connection_bytes: proto::DEFAULT_MAX_PAYLOAD,
            total_bytes: 256 << 20,
            max_payload: proto::DEFAULT_MAX_PAYLOAD,
            multi_conn: false,
            handshake_timeout: std::time::Duration::from_secs(30),
            idle_timeout: Some(std::time::Duration::from_secs(300)),
        }
    }

    pub fn with_tls(mut self, tls: Arc<rustls::ServerConfig>, required: bool) -> Self {
        self.tls = Some(tls);
        self.require_tls = required;
        self
    }
}

/// Resolves an export name to an export, e.g. after checking a session
/// token in it. An error refuses the client.
pub type ExportHook = dyn Fn(&str) -> Result<Arc<dyn Export>, BoxError> + Send + Sync;

#[derive(Default)]
struct Registry {
    exports: BTreeMap<String, Arc<dyn Export>>,
    default: Option<String>,
    hook: Option<Arc<ExportHook>>,
}

pub(crate) struct Inner {
    pub(crate) config: ServerConfig,
    registry: RwLock<Registry>,
    pub(crate) connections: Arc<limits::Registry>,
    /// Bytes of requests in flight across connections.
    pub(crate) budget: Arc<Semaphore>,
}

impl Inner {
    /// The export for a name (the default one for ""), if any.
    pub(crate) fn lookup(&self, name: &str) -> Option<Arc<dyn Export>> {
        let r = self.registry.read().unwrap_or_else(|p| p.into_inner());
        if let Some(hook) = r.hook.clone() {
            drop(r);
            return match hook(name) {
                Ok(e) => Some(e),
                Err(e) => {
                    warn!(export = name, error = %e, "export refused by the hook");
                    None
                }
            };
        }
        let key = if name.is_empty() {
            r.default.as_deref().unwrap_or("")
        } else {
            name
        };
        r.exports.get(key).cloned()
    }

    /// Names for NBD_OPT_LIST; `None` when exports come from a hook.
    pub(crate) fn names(&self) -> Option<Vec<String>> {
        let r = self.registry.read().unwrap_or_else(|p| p.into_inner());
        if r.hook.is_some() {
            return None;
        }
        Some(r.exports.keys().cloned().collect())
    }
}

/// An NBD server. Cheap to clone; exports may be added while serving.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

impl Server {
    pub fn new(config: ServerConfig) -> Server {
        let connections = Arc::new(limits::Registry::new(
            config.max_connections,
            config.max_connections_per_peer,
            config.evict_waiting,
        ));
        let budget = Arc::new(Semaphore::new(config.total_bytes.max(1) as usize));
        Server {
            inner: Arc::new(Inner {
                config,
                registry: RwLock::new(Registry::default()),
                connections,
                budget,
            }),
        }
    }

    fn registry(&self) -> std::sync::RwLockWriteGuard<'_, Registry> {
        self.inner
            .registry
            .write()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Adds (or replaces) an export.
    pub fn add_export(&self, name: impl Into<String>, export: Arc<dyn Export>) {
        self.registry().exports.insert(name.into(), export);
    }

    /// Removes an export; connections already using it keep it.
    pub fn remove_export(&self, name: &str) {
        self.registry().exports.remove(name);
    }

    /// The export served for the empty name.
    pub fn set_default_export(&self, name: impl Into<String>) {
        self.registry().default = Some(name.into());
    }

    /// Resolve every export name with `hook` instead of the registry.
    pub fn set_export_hook(&self, hook: Arc<ExportHook>) {
        self.registry().hook = Some(hook);
    }

    /// Accepts TCP clients until `shutdown`, then waits for them to finish.
    pub async fn serve_tcp(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<()> {
        let tracker = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((s, addr)) => {
                    let _ = s.set_nodelay(true);
                    let key = limits::PeerKey::ip(addr.ip());
                    self.spawn(&tracker, s, key, addr.to_string(), shutdown.clone());
                }
                Err(e) => accept_error(e).await?,
            }
        }
        tracker.close();
        tracker.wait().await;
        Ok(())
    }

    /// Accepts unix-socket clients until `shutdown`, then waits for them.
    pub async fn serve_unix(
        &self,
        listener: UnixListener,
        shutdown: CancellationToken,
    ) -> Result<()> {
        let tracker = TaskTracker::new();
        let mut n = 0u64;
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((s, _)) => {
                    n += 1;
                    let key = match s.peer_cred() {
                        Ok(c) => limits::PeerKey::Uid(c.uid()),
                        Err(_) => limits::PeerKey::Unknown,
                    };
                    self.spawn(
                        &tracker,
                        s,
                        key,
                        format!("unix client {n}"),
                        shutdown.clone(),
                    );
                }
                Err(e) => accept_error(e).await?,
            }
        }
        tracker.close();
        tracker.wait().await;
        Ok(())
    }

    fn spawn<S>(
        &self,
        tracker: &TaskTracker,
        stream: S,
        key: limits::PeerKey,
        peer: String,
        shutdown: CancellationToken,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let admitted = match self.inner.connections.admit(key) {
            Ok(a) => a,
            Err(why) => {
                warn!(peer, "server busy: {why}; closing the new connection");
                return;
            }
        };
        let server = self.clone();
        tracker.spawn(async move {
            let activity = admitted.activity.clone();
            let r = server.serve_with(stream, &peer, shutdown, activity).await;
            drop(admitted);
            if let Err(e) = r {
                debug!(peer, error = %e, "connection ended with an error");
            }
        });
    }

    /// Serves one already-accepted connection to its end.
    pub async fn serve_stream<S>(
        &self,
        stream: S,
        peer: &str,
        shutdown: CancellationToken,
    ) -> Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = self.inner.connections.detached();
        self.serve_with(stream, peer, shutdown, activity).await
    }

    async fn serve_with<S>(
        &self,
        stream: S,
        peer: &str,
        shutdown: CancellationToken,
        activity: Arc<limits::Activity>,
    ) -> Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let negotiated = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = activity.evicted.cancelled() => return Ok(()),
            n = tokio::time::timeout(
                self.inner.config.handshake_timeout,
                negotiate::negotiate(&self.inner, Box::new(stream), peer),
            ) => n.map_err(|_| Error::handshake(peer, "the client did not finish the handshake in time"))??,
        };
        let Some((stream, session)) = negotiated else {
            return Ok(());
        };
        info!(peer, size = session.export.size(), "client connected");
        activity.established();
        transmit::serve(&self.inner, stream, session, peer, shutdown, &activity).await
    }
}

async fn accept_error(e: std::io::Error) -> Result<()> {
    // Running out of descriptors is transient; anything else is fatal.
    warn!(error = %e, "accept failed");
    if matches!(e.raw_os_error(), Some(23 | 24))
        || e.kind() == std::io::ErrorKind::ConnectionAborted
    {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        Ok(())
    } else {
        Err(Error::Serve {
            what: "accepting a connection".into(),
            source: Arc::new(e),
        })
    }
}

/// The NBD errno for an export's error.
pub(crate) fn errno_of(e: &BoxError) -> u32 {
    use std::io::ErrorKind as K;
    match e.downcast_ref::<std::io::Error>().map(|e| e.kind()) {
        Some(K::InvalidInput) => proto::EINVAL,
        Some(K::PermissionDenied | K::ReadOnlyFilesystem) => proto::EPERM,
        Some(K::Unsupported) => proto::ENOTSUP,
        Some(K::StorageFull) => proto::ENOSPC,
        Some(K::OutOfMemory) => proto::ENOMEM,
        _ => proto::EIO,
    }
}
