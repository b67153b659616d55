//! One pipelined client connection: a writer task, a reader task and a
//! table of requests in flight, matched by cookie.
//!
//! A request registers itself in the table, then hands its encoded header
//! (and payload) to the writer task, then waits for the reader task to
//! complete it. The reader validates every reply against the request it
//! names: a chunk outside the request, overlapping data, a reply that ends
//! short, an unknown cookie or bad magic fails the connection with
//! [`Error::Protocol`] and nothing received for the request is handed on.
//! Any failure fails every request in flight (each gets a copy of the
//! reason) and the connection is never used again; the client reconnects.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter, ReadHalf, WriteHalf};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::claimed::read_claimed;
use crate::error::{Error, Result};
use crate::handshake::{BoxStream, Negotiated};
use crate::proto::{self, Chunk, ReplyHeader};

/// A command as the client issues it.
#[derive(Debug, Clone)]
pub(crate) enum Cmd {
    Read { offset: u64, len: u32 },
    Write { offset: u64, data: Bytes },
    WriteZeroes { offset: u64, len: u64 },
    Flush,
    BlockStatus { context: u32, offset: u64, len: u64 },
}

impl Cmd {
    fn parts(&self) -> (u16, u64, u64) {
        match self {
            Cmd::Read { offset, len } => (proto::CMD_READ, *offset, u64::from(*len)),
            Cmd::Write { offset, data } => (proto::CMD_WRITE, *offset, data.len() as u64),
            Cmd::WriteZeroes { offset, len } => (proto::CMD_WRITE_ZEROES, *offset, *len),
            Cmd::Flush => (proto::CMD_FLUSH, 0, 0),
            Cmd::BlockStatus { offset, len, .. } => (proto::CMD_BLOCK_STATUS, *offset, *len),
        }
    }
}

/// What a completed request yields.
#[derive(Debug)]
pub(crate) enum Reply {
    Done,
    Data(Bytes),
    /// Extents of the requested context, as (length, flags).
    Status(Vec<(u64, u64)>),
}

struct Pending {
    kind: u16,
    offset: u64,
    length: u64,
    context: u32,
    tx: oneshot::Sender<Result<Reply>>,
    /// READ: the data so far (holes stay zero) and the ranges covered.
    buf: BytesMut,
    covered: BTreeMap<u64, u64>,
    covered_bytes: u64,
    extents: Option<Vec<(u64, u64)>>,
    error: Option<Error>,
}

#[derive(Default)]
struct Table {
    map: HashMap<u64, Pending>,
    failed: Option<Error>,
}

struct Shared {
    peer: String,
    neg: Negotiated,
    table: Mutex<Table>,
    cancel: CancellationToken,
}

impl Shared {
    fn table(&self) -> MutexGuard<'_, Table> {
        // A poisoned lock only means another task panicked mid-update; the
        // table itself is still consistent enough to fail everything.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the connection dead and fails every request in flight.
    fn fail(&self, e: Error) {
        let (drained, e) = {
            let mut t = self.table();
            let e = t.failed.get_or_insert(e).clone();
            (t.map.drain().collect::<Vec<_>>(), e)
        };
        self.cancel.cancel();
        for (_, p) in drained {
            let _ = p.tx.send(Err(e.clone()));
        }
    }
}

enum Outgoing {
    Request {
        header: Bytes,
        payload: Option<Bytes>,
    },
    Disconnect {
        header: Bytes,
    },
}

/// A negotiated, running connection.
pub(crate) struct Conn {
    shared: Arc<Shared>,
    out: mpsc::Sender<Outgoing>,
    window: Semaphore,
    window_size: u32,
    next_cookie: AtomicU64,
    timeout: Option<Duration>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
    }
}

impl Conn {
    /// Starts the reader and writer tasks on a negotiated stream.
    pub(crate) fn start(
        stream: BoxStream,
        peer: String,
        neg: Negotiated,
        inflight: usize,
        timeout: Option<Duration>,
    ) -> Conn {
        let inflight = inflight.clamp(1, 1024);
        let shared = Arc::new(Shared {
            peer,
            neg,
            table: Mutex::new(Table::default()),
            cancel: CancellationToken::new(),
        });
        let (r, w) = tokio::io::split(stream);
        let (tx, rx) = mpsc::channel(inflight);
        tokio::spawn(writer(
            BufWriter::with_capacity(256 * 1024, w),
            rx,
            shared.clone(),
        ));
        tokio::spawn(reader(
            BufReader::with_capacity(256 * 1024, r),
            shared.clone(),
        ));
        Conn {
            shared,
            out: tx,
            window: Semaphore::new(inflight),
            window_size: inflight as u32,
            next_cookie: AtomicU64::new(1),
            timeout,
        }
    }

    pub(crate) fn negotiated(&self) -> &Negotiated {
        &self.shared.neg
    }

    /// Whether the connection has failed or been closed.
    pub(crate) fn is_dead(&self) -> bool {
        self.shared.table().failed.is_some() || self.shared.cancel.is_cancelled()
    }

    fn dead_error(&self) -> Error {
        self.shared
            .table()
            .failed
            .clone()
            .unwrap_or_else(|| Error::Closed {
                peer: self.shared.peer.clone(),
                why: "the connection's tasks ended".into(),
            })
    }

    /// Issues one request and waits for its complete, validated reply.
    pub(crate) async fn request(&self, cmd: Cmd) -> Result<Reply> {
        let _permit = self.window.acquire().await.map_err(|_| self.dead_error())?;
        let (kind, offset, length) = cmd.parts();
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let (context, payload) = match &cmd {
            Cmd::BlockStatus { context, .. } => (*context, None),
            Cmd::Write { data, .. } => (0, Some(data.clone())),
            _ => (0, None),
        };
        let buf = if kind == proto::CMD_READ {
            BytesMut::zeroed(length as usize)
        } else {
            BytesMut::new()
        };
        {
            let mut t = self.shared.table();
            if let Some(e) = &t.failed {
                return Err(e.clone());
            }
            t.map.insert(
                cookie,
                Pending {
                    kind,
                    offset,
                    length,
                    context,
                    tx,
                    buf,
                    covered: BTreeMap::new(),
                    covered_bytes: 0,
                    extents: None,
                    error: None,
                },
            );
        }
        let req = proto::Request {
            flags: 0,
            kind,
            cookie,
            offset,
            length,
        };
        let mut header = BytesMut::with_capacity(proto::EXT_REQUEST_LEN);
        req.encode(self.shared.neg.extended, &mut header);
        let msg = Outgoing::Request {
            header: header.freeze(),
            payload,
        };
        if self.out.send(msg).await.is_err() {
            return Err(self.dead_error());
        }
        let reply = match self.timeout {
            None => rx.await,
            Some(d) => {
                match tokio::time::timeout(d, rx).await {
                    Ok(r) => r,
                    Err(_) => {
                        let command = proto::command_name(kind);
                        self.shared.fail(Error::Closed {
                        peer: self.shared.peer.clone(),
                        why: format!("abandoned after {command} at offset {offset} got no reply within {d:?}"),
                    });
                        return Err(Error::Timeout {
                            peer: self.shared.peer.clone(),
                            command,
                            offset,
                            length,
                            after: d,
                        });
                    }
                }
            }
        };
        reply.unwrap_or_else(|_| Err(self.dead_error()))
    }

    /// Waits for the requests in flight, sends NBD_CMD_DISC and closes.
    pub(crate) async fn disconnect(&self) {
        // Requests in flight get a bounded time to finish.
        let grace = self.timeout.unwrap_or(Duration::from_secs(30));
        let permits = tokio::time::timeout(grace, self.window.acquire_many(self.window_size)).await;
        {
            let mut t = self.shared.table();
            if t.failed.is_some() {
                return;
            }
            t.failed = Some(Error::Closed {
                peer: self.shared.peer.clone(),
                why: "disconnected by the client".into(),
            });
        }
        let mut header = BytesMut::new();
        proto::Request {
            flags: 0,
            kind: proto::CMD_DISC,
            cookie: 0,
            offset: 0,
            length: 0,
        }
        .encode(self.shared.neg.extended, &mut header);
        let _ = self
            .out
            .send(Outgoing::Disconnect {
                header: header.freeze(),
            })
            .await;
        // The writer closes its half after DISC; then the tasks end.
        let _ = tokio::time::timeout(Duration::from_secs(5), self.out.closed()).await;
        self.shared.cancel.cancel();
        drop(permits);
    }
}

async fn writer(
    mut w: BufWriter<WriteHalf<BoxStream>>,
    mut rx: mpsc::Receiver<Outgoing>,
    shared: Arc<Shared>,
) {
    let peer = shared.peer.clone();
    let result: std::io::Result<()> = async {
        loop {
            let msg = tokio::select! {
                _ = shared.cancel.cancelled() => return Ok(()),
                m = rx.recv() => m,
            };
            let Some(mut msg) = msg else { return Ok(()) };
            loop {
                match msg {
                    Outgoing::Request { header, payload } => {
                        w.write_all(&header).await?;
                        if let Some(p) = payload {
                            w.write_all(&p).await?;
                        }
                    }
                    Outgoing::Disconnect { header } => {
                        w.write_all(&header).await?;
                        w.flush().await?;
                        let _ = w.shutdown().await;
                        return Ok(());
                    }
                }
                match rx.try_recv() {
                    Ok(next) => msg = next,
                    Err(_) => break,
                }
            }
            w.flush().await?;
        }
    }
    .await;
    rx.close();
    if let Err(e) = result {
        shared.fail(Error::io(&peer, "sending requests", e));
    }
}

async fn reader(mut r: BufReader<ReadHalf<BoxStream>>, shared: Arc<Shared>) {
    let e = tokio::select! {
        _ = shared.cancel.cancelled() => Error::Closed { peer: shared.peer.clone(), why: "closed".into() },
        e = read_loop(&mut r, &shared) => e,
    };
    debug!(peer = shared.peer, error = %e, "reader ends");
    shared.fail(e);
}

/// Reads replies until something goes wrong; returns why it stopped.
async fn read_loop(r: &mut BufReader<ReadHalf<BoxStream>>, shared: &Shared) -> Error {
    let peer = shared.peer.as_str();
    loop {
        let mut head = [0u8; proto::EXT_REPLY_LEN];
        if let Err(e) = r.read_exact(&mut head[..4]).await {
            let idle = shared.table().map.is_empty();
            return if e.kind() == std::io::ErrorKind::UnexpectedEof && idle {
                Error::Closed {
                    peer: peer.to_owned(),
                    why: "the server closed the connection".into(),
                }
            } else {
                Error::io(peer, "reading a reply", e)
            };
        }
        let magic = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let Some(hlen) = proto::reply_header_len(magic) else {
            return Error::protocol(peer, format!("bad reply magic {magic:#010x}"));
        };
        if let Err(e) = r.read_exact(&mut head[4..hlen]).await {
            return Error::io(peer, "reading a reply header", e);
        }
        let header = match proto::decode_reply_header(&head[..hlen]) {
            Ok(h) => h,
            Err(e) => return Error::protocol(peer, e),
        };
        let cookie = header.cookie();
        let Some(mut p) = shared.table().map.remove(&cookie) else {
            return Error::protocol(peer, format!("reply for unknown cookie {cookie}"));
        };
        match handle(r, shared, header, &mut p).await {
            Ok(false) => {
                // More chunks to come, unless the connection failed meanwhile.
                let mut t = shared.table();
                match t.failed.clone() {
                    Some(e) => {
                        drop(t);
                        let _ = p.tx.send(Err(e.clone()));
                        return e;
                    }
                    None => {
                        t.map.insert(cookie, p);
                    }
                }
            }
            Ok(true) => {
                let close = shared.neg.export_name_fallback && p.error.is_some();
                finish(shared, p);
                if close {
                    return Error::Closed {
                        peer: peer.to_owned(),
                        why: "a server without NBD_OPT_GO ends the connection after an error reply"
                            .into(),
                    };
                }
            }
            Err(e) => {
                let _ = p.tx.send(Err(e.clone()));
                return e;
            }
        }
    }
}

fn server_error(shared: &Shared, p: &Pending, errno: u32, message: String) -> Error {
    Error::Server {
        peer: shared.peer.clone(),
        command: proto::command_name(p.kind),
        offset: p.offset,
        length: p.length,
        errno,
        message,
    }
}

/// Applies one reply (header and payload) to its request; `Ok(true)` when
/// the request is complete.
async fn handle(
    r: &mut BufReader<ReadHalf<BoxStream>>,
    shared: &Shared,
    header: ReplyHeader,
    p: &mut Pending,
) -> Result<bool> {
    let peer = shared.peer.as_str();
    let command = proto::command_name(p.kind);
    let (req_offset, req_length) = (p.offset, p.length);
    let bad = |what: String| {
        Error::protocol(
            peer,
            format!("{command} at offset {req_offset}, length {req_length}: {what}"),
        )
    };
    match header {
        ReplyHeader::Simple { error, .. } => {
            if error != 0 {
                p.error = Some(server_error(shared, p, error, String::new()));
                return Ok(true);
            }
            match p.kind {
                proto::CMD_READ if shared.neg.structured => Err(bad(
                    "simple reply to a read after structured replies were negotiated".into(),
                )),
                proto::CMD_READ => {
                    r.read_exact(&mut p.buf)
                        .await
                        .map_err(|e| Error::io(peer, format!("reading {command} data"), e))?;
                    p.covered_bytes = p.length;
                    Ok(true)
                }
                proto::CMD_BLOCK_STATUS => Err(bad("simple reply without extents".into())),
                _ => Ok(true),
            }
        }
        ReplyHeader::Chunk {
            flags,
            kind,
            length,
            ..
        } => {
            if !shared.neg.structured {
                return Err(bad(
                    "structured reply chunk, but structured replies were not negotiated".into(),
                ));
            }
            // Judged on the header alone, before any payload is read: the
            // length is only the server's claim.
            let reads = matches!(kind, proto::CHUNK_OFFSET_DATA | proto::CHUNK_OFFSET_HOLE);
            if reads && p.kind != proto::CMD_READ {
                return Err(bad(
                    "data chunk in reply to a command that reads nothing".into()
                ));
            }
            let status = matches!(
                kind,
                proto::CHUNK_BLOCK_STATUS | proto::CHUNK_BLOCK_STATUS_EXT
            );
            if status && p.kind != proto::CMD_BLOCK_STATUS {
                return Err(bad("block status chunk in reply to another command".into()));
            }
            let limit = match kind {
                proto::CHUNK_OFFSET_DATA => p.length + 8,
                proto::CHUNK_BLOCK_STATUS | proto::CHUNK_BLOCK_STATUS_EXT => 8 + 16 * (1 << 20),
                proto::CHUNK_OFFSET_HOLE => 12,
                proto::CHUNK_NONE => 0,
                _ => 4 + 2 + proto::MAX_STRING as u64 + 8,
            };
            if length > limit {
                return Err(bad(format!(
                    "chunk of type {kind} with {length} bytes of payload (at most {limit} expected)"
                )));
            }
            let done = flags & proto::REPLY_FLAG_DONE != 0;
            if kind == proto::CHUNK_OFFSET_DATA && p.kind == proto::CMD_READ && length > 8 {
                // Read the data straight into place, after checking its range.
                let offset = r
                    .read_u64()
                    .await
                    .map_err(|e| Error::io(peer, format!("reading {command} data"), e))?;
                let rel = cover(p, offset, length - 8).map_err(bad)?;
                let end = rel + (length - 8) as usize;
                r.read_exact(&mut p.buf[rel..end])
                    .await
                    .map_err(|e| Error::io(peer, format!("reading {command} data"), e))?;
                return Ok(done);
            }
            let payload = read_claimed(r, length as usize)
                .await
                .map_err(|e| Error::io(peer, format!("reading a {command} reply chunk"), e))?;
            let chunk = proto::decode_chunk(kind, Bytes::from(payload)).map_err(bad)?;
            match chunk {
                Chunk::None if done => {}
                Chunk::None => return Err(bad("NBD_REPLY_TYPE_NONE without the DONE flag".into())),
                Chunk::Data { offset, data } => {
                    let rel = cover(p, offset, data.len() as u64).map_err(bad)?;
                    p.buf[rel..rel + data.len()].copy_from_slice(&data);
                }
                Chunk::Hole { offset, length } => {
                    // The buffer starts zeroed, so a hole only needs covering.
                    cover(p, offset, u64::from(length)).map_err(bad)?;
                }
                Chunk::Status { context, extents } => {
                    if extents.iter().any(|&(l, _)| l == 0) {
                        return Err(bad("block status extent of length 0".into()));
                    }
                    if context == p.context {
                        if p.extents.is_some() {
                            return Err(bad(format!(
                                "two block status chunks for context {context}"
                            )));
                        }
                        p.extents = Some(extents);
                    }
                }
                Chunk::Error {
                    errno,
                    message,
                    offset,
                } => {
                    if let Some(o) = offset
                        && (o < p.offset || o >= p.offset.saturating_add(p.length))
                    {
                        return Err(bad(format!(
                            "error chunk names offset {o}, outside the request"
                        )));
                    }
                    if p.error.is_none() {
                        p.error = Some(server_error(shared, p, errno, message));
                    }
                }
            }
            Ok(done)
        }
    }
}

/// Records that `[offset, offset+len)` was answered; returns its position
/// in the request's buffer. Refuses ranges outside the request or
/// overlapping an earlier chunk.
fn cover(p: &mut Pending, offset: u64, len: u64) -> std::result::Result<usize, String> {
    let end = offset.checked_add(len).ok_or("chunk range overflows")?;
    let req_end = p.offset + p.length;
    if offset < p.offset || end > req_end {
        return Err(format!(
            "chunk [{offset}, {end}) lies outside the request [{}, {req_end})",
            p.offset
        ));
    }
    let rel = offset - p.offset;
    let rel_end = end - p.offset;
    if let Some((_, &prev_end)) = p.covered.range(..rel_end).next_back()
        && prev_end > rel
    {
        return Err(format!("chunk [{offset}, {end}) overlaps an earlier chunk"));
    }
    // Adjacent ranges merge, so a reply in order keeps one entry however
    // many chunks it has. A reply scattered into more separate pieces than
    // one per 512 bytes is refused: that bounds the map by the request.
    let mut start = rel;
    let mut stop = rel_end;
    if let Some((&s, &e)) = p.covered.range(..rel).next_back()
        && e == rel
    {
        start = s;
    }
    if let Some(e) = p.covered.remove(&rel_end) {
        stop = e;
    }
    p.covered.insert(start, stop);
    if p.covered.len() as u64 > 1 + p.length / 512 {
        return Err(format!(
            "the reply is scattered into more than {} separate pieces",
            1 + p.length / 512
        ));
    }
    p.covered_bytes += len;
    Ok(rel as usize)
}

/// Completes a request whose last chunk arrived.
fn finish(shared: &Shared, mut p: Pending) {
    let result = if let Some(e) = p.error.take() {
        Err(e)
    } else {
        match p.kind {
            proto::CMD_READ if p.covered_bytes != p.length => Err(Error::protocol(
                &shared.peer,
                format!(
                    "NBD_CMD_READ at offset {}, length {}: the reply ended after {} bytes",
                    p.offset, p.length, p.covered_bytes
                ),
            )),
            proto::CMD_READ => Ok(Reply::Data(std::mem::take(&mut p.buf).freeze())),
            proto::CMD_BLOCK_STATUS => match p.extents.take() {
                Some(e) => Ok(Reply::Status(e)),
                None => Err(Error::protocol(
                    &shared.peer,
                    format!(
                        "NBD_CMD_BLOCK_STATUS at offset {}: no extents for context {}",
                        p.offset, p.context
                    ),
                )),
            },
            _ => Ok(Reply::Done),
        }
    };
    if let Err(Error::Protocol { .. }) = &result {
        // A short reply is the server's fault; the connection is suspect.
        if let Err(e) = &result {
            shared.fail(e.clone());
        }
    }
    let _ = p.tx.send(result);
}
