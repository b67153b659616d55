//! The NBD client: options, connection pool, request splitting and retry.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use rustls_pki_types::ServerName;
use tokio::net::{TcpStream, UnixStream};
use tracing::warn;

use crate::conn::{Cmd, Conn, Reply};
use crate::error::{Error, Result};
use crate::handshake::{self, BoxStream, Negotiated};
pub use crate::options::{Address, ConnectOptions, StatusExtent};
use crate::proto;
use crate::tls;

struct Slot {
    current: RwLock<Option<Arc<Conn>>>,
    /// Held while reconnecting; remembers the last failed attempt so that
    /// requests queued behind it share its result instead of each trying.
    reconnect: tokio::sync::Mutex<Option<(Instant, Error)>>,
}

struct Inner {
    opts: ConnectOptions,
    peer: String,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    info: Negotiated,
    slots: Vec<Slot>,
    next: AtomicUsize,
    closed: AtomicBool,
}

/// A connected NBD client. Cheap to clone; all methods take `&self` and
/// may run concurrently: requests are pipelined on the connection(s).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("peer", &self.inner.peer)
            .field("export", &self.inner.opts.export)
            .field("size", &self.inner.info.size)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects, negotiates and opens the connections asked for.
    pub async fn connect(opts: &ConnectOptions) -> Result<Client> {
        let peer = opts.address.to_string();
        let tls = match &opts.tls {
            None => None,
            Some(t) => {
                let config = tls::client_config(t)?;
                let host = match &opts.address {
                    Address::Tcp { host, .. } => Some(host.as_str()),
                    Address::Unix(_) => None,
                };
                Some((
                    tokio_rustls::TlsConnector::from(config),
                    tls::server_name(t, host)?,
                ))
            }
        };
        let mut attempt = 0;
        let first = loop {
            match open(opts, &peer, tls.as_ref()).await {
                Ok(c) => break c,
                Err(e) if e.is_transport() && attempt < opts.retries => {
                    attempt += 1;
                    warn!(peer, error = %e, attempt, "connecting failed; retrying");
                    tokio::time::sleep(backoff(opts.retry_backoff, attempt)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let info = first.negotiated().clone();
        let mut conns = vec![Arc::new(first)];
        let wanted = opts.connections.max(1);
        if wanted > 1 {
            // Multi-conn is about caches seeing each other's writes: an
            // export that never changes needs no such promise.
            if info.flags & proto::TFLAG_CAN_MULTI_CONN != 0 || opts.immutable {
                let more = futures::future::try_join_all(
                    (1..wanted).map(|_| open(opts, &peer, tls.as_ref())),
                )
                .await?;
                conns.extend(more.into_iter().map(Arc::new));
            } else {
                warn!(
                    peer,
                    wanted,
                    "the server does not set CAN_MULTI_CONN and the export may change; using one connection"
                );
            }
        }
        let slots = conns
            .into_iter()
            .map(|c| Slot {
                current: RwLock::new(Some(c)),
                reconnect: tokio::sync::Mutex::new(None),
            })
            .collect();
        Ok(Client {
            inner: Arc::new(Inner {
                opts: opts.clone(),
                peer,
                tls,
                info,
                slots,
                next: AtomicUsize::new(0),
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.info.size
    }

    /// Transmission flags (`NBD_FLAG_*`).
    pub fn flags(&self) -> u16 {
        self.inner.info.flags
    }

    pub fn can_multi_conn(&self) -> bool {
        self.flags() & proto::TFLAG_CAN_MULTI_CONN != 0
    }

    pub fn is_read_only(&self) -> bool {
        self.flags() & proto::TFLAG_READ_ONLY != 0
    }

    /// Names of the meta contexts the server selected.
    pub fn meta_contexts(&self) -> Vec<String> {
        self.inner
            .info
            .contexts
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Minimum, preferred and maximum block sizes in force.
    pub fn block_sizes(&self) -> (u32, u32, u32) {
        let i = &self.inner.info;
        (i.min_block, i.preferred_block, i.max_payload)
    }

    /// Whether the server refused NBD_OPT_GO and EXPORT_NAME was used.
    pub fn uses_export_name_fallback(&self) -> bool {
        self.inner.info.export_name_fallback
    }

    /// Whether structured replies (needed for block status) are in use.
    pub fn structured_replies(&self) -> bool {
        self.inner.info.structured
    }

    /// Whether extended headers (64-bit lengths) are in use.
    pub fn extended_headers(&self) -> bool {
        self.inner.info.extended
    }

    /// Connections in use.
    pub fn connections(&self) -> usize {
        self.inner.slots.len()
    }

    fn align(&self) -> u64 {
        u64::from(self.inner.info.min_block.max(1))
    }

    fn check_range(&self, what: &str, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(Error::InvalidRequest(format!(
                "{what} at offset {offset}, length {len} goes past the end of the export ({} bytes)",
                self.size()
            ))),
        }
    }

    fn check_writable(&self, what: &str) -> Result<()> {
        if self.is_read_only() {
            return Err(Error::InvalidRequest(format!(
                "{what}: the export is read-only"
            )));
        }
        Ok(())
    }

    /// Parallel requests worth keeping in flight for one call.
    fn window(&self) -> usize {
        self.inner.opts.inflight.max(1) * self.inner.slots.len()
    }

    /// Reads `len` bytes at `offset`, splitting and aligning as the server
    /// requires.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        let len64 = len as u64;
        self.check_range("read", offset, len64)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let align = self.align();
        let start = offset / align * align;
        let end = (offset + len64).div_ceil(align) * align;
        let end = end.min(self.size().max(offset + len64));
        let piece = (u64::from(self.inner.info.max_payload) / align * align).max(align);
        let pieces: Vec<(u64, u32)> = (0..)
            .map(|i| start + i * piece)
            .take_while(|&o| o < end)
            .map(|o| (o, (end - o).min(piece) as u32))
            .collect();
        let parts: Vec<Bytes> = futures::stream::iter(pieces)
            .map(|(o, l)| async move {
                match self.run(|_| Ok(Cmd::Read { offset: o, len: l })).await? {
                    Reply::Data(d) => Ok(d),
                    other => Err(self.unexpected("read", other)),
                }
            })
            .buffered(self.window())
            .try_collect()
            .await?;
        let skip = (offset - start) as usize;
        if parts.len() == 1 {
            return Ok(parts[0].slice(skip..skip + len));
        }
        let mut out = BytesMut::with_capacity((end - start) as usize);
        for p in parts {
            out.extend_from_slice(&p);
        }
        Ok(out.freeze().slice(skip..skip + len))
    }

    fn unexpected(&self, what: &str, reply: Reply) -> Error {
        Error::protocol(
            &self.inner.peer,
            format!("{what}: unexpected reply {reply:?}"),
        )
    }

    /// Writes `data` at `offset` (which must respect the server's minimum
    /// block size).
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_writable("write")?;
        self.check_range("write", offset, data.len() as u64)?;
        let align = self.align();
        if !offset.is_multiple_of(align) || !(data.len() as u64).is_multiple_of(align) {
            return Err(Error::InvalidRequest(format!(
                "write at offset {offset}, length {} is not aligned to the server's {align}-byte blocks",
                data.len()
            )));
        }
        let data = Bytes::copy_from_slice(data);
        let piece = (self.inner.info.max_payload as usize / align as usize * align as usize).max(1);
        let pieces: Vec<(u64, Bytes)> = (0..data.len())
            .step_by(piece)
            .map(|i| {
                (
                    offset + i as u64,
                    data.slice(i..(i + piece).min(data.len())),
                )
            })
            .collect();
        self.run_all(
            pieces
                .into_iter()
                .map(|(o, d)| Cmd::Write { offset: o, data: d }),
        )
        .await
    }

    async fn run_all(&self, cmds: impl Iterator<Item = Cmd>) -> Result<()> {
        futures::stream::iter(cmds)
            .map(|c| async move { self.run(|_| Ok(c.clone())).await.map(|_| ()) })
            .buffer_unordered(self.window())
            .try_collect::<Vec<()>>()
            .await
            .map(|_| ())
    }

    /// Writes zeros over `[offset, offset+len)`, with NBD_CMD_WRITE_ZEROES
    /// if the server offers it, else with ordinary writes.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable("write_zeroes")?;
        self.check_range("write_zeroes", offset, len)?;
        let align = self.align();
        if !offset.is_multiple_of(align) || !len.is_multiple_of(align) {
            return Err(Error::InvalidRequest(format!(
                "write_zeroes at offset {offset}, length {len} is not aligned to {align}-byte blocks"
            )));
        }
        if self.flags() & proto::TFLAG_SEND_WRITE_ZEROES != 0 {
            let piece = (1u64 << 30).max(align);
            let cmds = (0..len.div_ceil(piece)).map(|i| Cmd::WriteZeroes {
                offset: offset + i * piece,
                len: (len - i * piece).min(piece),
            });
            return self.run_all(cmds).await;
        }
        let piece = u64::from(self.inner.info.max_payload).min(4 << 20) / align * align;
        let zeros = Bytes::from(vec![0u8; piece.min(len) as usize]);
        let cmds = (0..len.div_ceil(piece)).map(|i| Cmd::Write {
            offset: offset + i * piece,
            data: zeros.slice(..(len - i * piece).min(piece) as usize),
        });
        self.run_all(cmds).await
    }

    /// Asks the server to make completed writes durable (a no-op if it
    /// does not offer FLUSH).
    pub async fn flush(&self) -> Result<()> {
        if self.flags() & proto::TFLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        self.run(|_| Ok(Cmd::Flush)).await.map(|_| ())
    }

    /// Block status of `[offset, offset+len)` in one meta context, as
    /// consecutive extents covering exactly that range (adjacent extents with
    /// equal flags merged). Loops while the server answers short.
    pub async fn block_status(
        &self,
        context: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<StatusExtent>> {
        self.check_range("block_status", offset, len)?;
        if !self.inner.info.structured {
            return Err(Error::Unsupported {
                peer: self.inner.peer.clone(),
                what: "block status (it needs structured replies)".into(),
            });
        }
        let align = self.align();
        let max_req = if self.inner.info.extended {
            1u64 << 40
        } else {
            u64::from(u32::MAX) / align * align
        };
        let end = offset + len;
        let mut cur = offset;
        let mut out: Vec<StatusExtent> = Vec::new();
        while cur < end {
            let want = (end - cur).min(max_req);
            let reply = self
                .run(|info| {
                    let id = context_id(info, context, &self.inner.peer)?;
                    Ok(Cmd::BlockStatus {
                        context: id,
                        offset: cur,
                        len: want,
                    })
                })
                .await?;
            let Reply::Status(extents) = reply else {
                return Err(self.unexpected("block_status", reply));
            };
            for (l, flags) in extents {
                if cur >= end {
                    break;
                }
                let l = l.min(end - cur);
                match out.last_mut() {
                    Some(last) if last.flags == flags => last.length += l,
                    _ => out.push(StatusExtent {
                        offset: cur,
                        length: l,
                        flags,
                    }),
                }
                cur += l;
            }
        }
        Ok(out)
    }

    /// Waits for requests in flight, sends NBD_CMD_DISC on every connection
    /// and closes them. Later requests fail with [`Error::Closed`].
    pub async fn disconnect(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        let conns: Vec<Arc<Conn>> = self
            .inner
            .slots
            .iter()
            .filter_map(|s| s.current.write().unwrap_or_else(|p| p.into_inner()).take())
            .collect();
        futures::future::join_all(conns.iter().map(|c| c.disconnect())).await;
    }

    /// Runs one command with reconnects and retries; `make` builds it for
    /// the connection chosen (context ids are per connection).
    async fn run(&self, make: impl Fn(&Negotiated) -> Result<Cmd>) -> Result<Reply> {
        let opts = &self.inner.opts;
        let mut transport = 0;
        let mut server = 0;
        loop {
            let i = self.inner.next.fetch_add(1, Ordering::Relaxed) % self.inner.slots.len();
            let result = async {
                let conn = self.conn(i).await?;
                let cmd = make(conn.negotiated())?;
                conn.request(cmd).await
            }
            .await;
            match result {
                Ok(r) => return Ok(r),
                Err(e) if e.is_transport() && transport < opts.retries && !self.is_closed() => {
                    transport += 1;
                    warn!(peer = self.inner.peer, error = %e, attempt = transport, "request failed; reconnecting and retrying");
                    tokio::time::sleep(backoff(opts.retry_backoff, transport)).await;
                }
                Err(e) if e.server_errno().is_some() && server < opts.server_error_retries => {
                    server += 1;
                    warn!(peer = self.inner.peer, error = %e, attempt = server, "server error; retrying");
                    tokio::time::sleep(backoff(opts.retry_backoff, server)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }

    /// The live connection of slot `i`, reconnecting if it died.
    async fn conn(&self, i: usize) -> Result<Arc<Conn>> {
        let slot = &self.inner.slots[i];
        let live = |slot: &Slot| {
            slot.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .filter(|c| !c.is_dead())
                .cloned()
        };
        if let Some(c) = live(slot) {
            return Ok(c);
        }
        let mut last_failure = slot.reconnect.lock().await;
        if let Some(c) = live(slot) {
            return Ok(c);
        }
        if self.is_closed() {
            return Err(Error::InvalidRequest("the client was disconnected".into()));
        }
        if let Some((when, e)) = last_failure.as_ref()
            && when.elapsed() < self.inner.opts.retry_backoff
        {
            return Err(e.clone());
        }
        let c = match open(&self.inner.opts, &self.inner.peer, self.inner.tls.as_ref()).await {
            Ok(c) => c,
            Err(e) => {
                *last_failure = Some((Instant::now(), e.clone()));
                return Err(e);
            }
        };
        *last_failure = None;
        let n = c.negotiated();
        if n.size != self.inner.info.size || n.min_block != self.inner.info.min_block {
            return Err(Error::handshake(
                &self.inner.peer,
                format!(
                    "after reconnecting the export has size {} (was {}), minimum block {} (was {})",
                    n.size, self.inner.info.size, n.min_block, self.inner.info.min_block
                ),
            ));
        }
        tracing::info!(peer = self.inner.peer, slot = i, "reconnected");
        let c = Arc::new(c);
        *slot.current.write().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
        Ok(c)
    }
}

fn context_id(info: &Negotiated, name: &str, peer: &str) -> Result<u32> {
    info.contexts
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, id)| *id)
        .ok_or_else(|| {
            if info.contexts.is_empty() && !info.structured {
                Error::Unsupported {
                    peer: peer.to_owned(),
                    what: "meta contexts".into(),
                }
            } else {
                Error::InvalidRequest(format!(
                    "meta context {name:?} was not negotiated (selected: {:?}); add it to ConnectOptions::meta_contexts",
                    info.contexts.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>()
                ))
            }
        })
}

fn backoff(base: Duration, attempt: u32) -> Duration {
    base.saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(Duration::from_secs(5))
}

/// Opens one socket, negotiates and starts the connection's tasks.
async fn open(
    opts: &ConnectOptions,
    peer: &str,
    tls: Option<&(tokio_rustls::TlsConnector, ServerName<'static>)>,
) -> Result<Conn> {
    let connect_err = |e: std::io::Error| Error::Connect {
        peer: peer.to_owned(),
        source: Arc::new(e),
    };
    let negotiate = async {
        let stream: BoxStream = match &opts.address {
            Address::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(connect_err)?;
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
            Address::Unix(path) => Box::new(UnixStream::connect(path).await.map_err(connect_err)?),
        };
        let tls = tls.map(|(connector, name)| handshake::Tls {
            connector,
            name: name.clone(),
        });
        handshake::negotiate(stream, peer, opts, tls).await
    };
    let (stream, neg) = tokio::time::timeout(opts.connect_timeout, negotiate)
        .await
        .map_err(|_| {
            connect_err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no completed handshake within {:?}", opts.connect_timeout),
            ))
        })??;
    Ok(Conn::start(
        stream,
        peer.to_owned(),
        neg,
        opts.inflight,
        opts.request_timeout,
    ))
}
