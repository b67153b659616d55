//! The server's transmission phase: read requests, serve them (several at
//! once in full mode, one at a time in minimal mode), write replies.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::limits::Activity;
use super::negotiate::{BASE_ALLOCATION_ID, Session};
use super::{Export, Inner, Mode, errno_of};
use crate::claimed::read_claimed;
use crate::error::{Error, Result};
use crate::handshake::BoxStream;
use crate::proto::{self, Request};

/// A reply: header (with any small payload) and optional bulk data.
type Out = (Bytes, Option<Bytes>);

/// What serving one request produced.
struct Served {
    reply: Out,
    /// The request failed (minimal mode closes after it).
    failed: bool,
}

/// A reply on its way to the writer, holding its request's share of the
/// connection's window and of the server's byte budget until written.
struct Queued {
    reply: Out,
    _slot: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
    _budget: Option<OwnedSemaphorePermit>,
    activity: Arc<Activity>,
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.activity.reply_done();
    }
}

/// How long replies still get written after shutdown.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);
/// Bytes a reply write may take before the client must have taken some.
const WRITE_PIECE: usize = 256 * 1024;
/// What a request that is not a READ or WRITE counts against the byte
/// windows (its reply is small, but not nothing).
const SMALL_REQUEST: u32 = 4096;

pub(crate) async fn serve(
    inner: &Inner,
    stream: BoxStream,
    session: Session,
    peer: &str,
    shutdown: CancellationToken,
    activity: &Arc<Activity>,
) -> Result<()> {
    let (r, w) = tokio::io::split(stream);
    let mut r = BufReader::with_capacity(64 * 1024, r);
    let minimal = inner.config.mode == Mode::Minimal;
    let inflight = if minimal {
        1
    } else {
        inner.config.inflight.max(1)
    };
    let idle_timeout = inner.config.idle_timeout;
    // The queue adds nothing to the window: a reply holds its slot in it.
    let (tx, rx) = mpsc::channel::<Queued>(inflight);
    let writer_gone = CancellationToken::new();
    let writer = tokio::spawn(write_replies(
        w,
        rx,
        peer.to_owned(),
        activity.clone(),
        idle_timeout,
        writer_gone.clone(),
    ));

    let slots = Arc::new(Semaphore::new(inflight));
    let window = inner.config.connection_bytes.max(SMALL_REQUEST);
    let bytes = Arc::new(Semaphore::new(window as usize));
    let total = inner.config.total_bytes.max(SMALL_REQUEST);
    let session = Arc::new(session);
    let max_payload = inner.config.max_payload;
    let mut tasks = JoinSet::new();
    // Ends the connection early: shutdown, eviction, or a writer that
    // cannot write any more (its client went).
    let stop = || async {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = activity.evicted.cancelled() => {}
            _ = writer_gone.cancelled() => {}
        }
    };
    let result: Result<()> = async {
        loop {
            let mut head = [0u8; proto::REQUEST_LEN];
            {
                let read = r.read_exact(&mut head);
                tokio::pin!(read);
                loop {
                    let check = idle_timeout.unwrap_or(std::time::Duration::from_secs(3600));
                    tokio::select! {
                        _ = stop() => return Ok(()),
                        res = &mut read => match res {
                            Ok(_) => break,
                            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                            Err(e) => return Err(Error::io(peer, "reading a request", e)),
                        },
                        _ = tokio::time::sleep(check) => {
                            if let (Some(limit), Some(idle)) = (idle_timeout, activity.idle_for())
                                && idle >= limit
                            {
                                debug!(peer, "idle for {idle:?}: closing");
                                return Ok(());
                            }
                        }
                    }
                }
            }
            let req = Request::decode_compact(&head).map_err(|e| Error::protocol(peer, e))?;
            if req.kind == proto::CMD_DISC {
                return Ok(());
            }
            activity.request_read();
            // Counted from here, so a reply dropped on any path uncounts it.
            let weight = match req.kind {
                proto::CMD_READ | proto::CMD_WRITE if req.length <= u64::from(max_payload) => {
                    (req.length as u32).max(SMALL_REQUEST)
                }
                _ => SMALL_REQUEST,
            };
            // Backpressure: nothing more is read from this client until
            // the window has room, i.e. until it takes earlier replies.
            let acquired = tokio::select! {
                _ = stop() => None,
                p = async {
                    let slot = slots.clone().acquire_owned().await.ok()?;
                    let mine = bytes.clone().acquire_many_owned(weight.min(window)).await.ok()?;
                    let budget = budget_permit(inner, weight.min(total)).await?;
                    Some((slot, mine, budget))
                } => p,
            };
            let Some((slot, mine, budget)) = acquired else {
                activity.reply_done();
                return Ok(());
            };
            let mut payload = None;
            if req.kind == proto::CMD_WRITE {
                if req.length > u64::from(max_payload) {
                    activity.reply_done();
                    return Err(Error::protocol(
                        peer,
                        format!("write of {} bytes is over the limit", req.length),
                    ));
                }
                // The data must come within the idle timeout too.
                let read = async {
                    let read = read_claimed(&mut r, req.length as usize);
                    match idle_timeout {
                        Some(t) => tokio::time::timeout(t, read).await.unwrap_or_else(|_| {
                            Err(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "the write data did not come within the idle timeout",
                            ))
                        }),
                        None => read.await,
                    }
                };
                let buf = tokio::select! {
                    _ = stop() => { activity.reply_done(); return Ok(()) }
                    b = read => b,
                };
                let buf = match buf {
                    Ok(b) => b,
                    Err(e) => {
                        activity.reply_done();
                        return Err(Error::io(peer, "reading write data", e));
                    }
                };
                activity.touch();
                payload = Some(Bytes::from(buf));
            }
            let session = session.clone();
            let tx = tx.clone();
            let activity = activity.clone();
            let fut = async move {
                let served = handle(&session, req, payload, max_payload, minimal).await;
                let failed = served.failed;
                let queued = Queued {
                    reply: served.reply,
                    _slot: slot,
                    _bytes: Some(mine),
                    _budget: Some(budget),
                    activity,
                };
                // Fails only when the writer is gone; the reply is dropped.
                let _ = tx.send(queued).await;
                failed
            };
            if minimal {
                // One at a time, and an error ends the connection.
                if fut.await {
                    return Ok(());
                }
            } else {
                tasks.spawn(fut);
                while tasks.try_join_next().is_some() {}
            }
        }
    }
    .await;
    if writer_gone.is_cancelled() || activity.evicted.is_cancelled() {
        // Nobody will read these replies: drop the work.
        tasks.abort_all();
    }
    let writer_abort = writer.abort_handle();
    let finish = async {
        while tasks.join_next().await.is_some() {}
        drop(tx);
        writer.await
    };
    // On shutdown, replies to what was read get a grace period; a client
    // that does not take them does not hold the server up.
    let grace = async {
        shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let written = tokio::select! {
        w = finish => Some(w),
        _ = activity.evicted.cancelled() => None,
        _ = grace => None,
    };
    writer_abort.abort();
    match written {
        None | Some(Ok(Ok(()))) => {}
        Some(Ok(Err(e))) => return Err(Error::io(peer, "sending replies", e)),
        Some(Err(e)) => {
            return Err(Error::protocol(peer, format!("reply writer failed: {e}")));
        }
    }
    result
}

/// A share of the server's byte budget. While it is used up, a client
/// that does not take its replies is dropped to free what it holds.
async fn budget_permit(inner: &Inner, n: u32) -> Option<OwnedSemaphorePermit> {
    loop {
        match inner.budget.clone().try_acquire_many_owned(n) {
            Ok(p) => return Some(p),
            Err(tokio::sync::TryAcquireError::Closed) => return None,
            Err(tokio::sync::TryAcquireError::NoPermits) => {}
        }
        inner.connections.evict_stalled();
        tokio::select! {
            p = inner.budget.clone().acquire_many_owned(n) => return p.ok(),
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
        }
    }
}

/// Writes replies in order, batching what is queued into one flush. Ends
/// (and cancels `gone`) when the connection is done, the client stops
/// taking bytes for `idle_timeout`, or a write fails.
async fn write_replies(
    w: tokio::io::WriteHalf<BoxStream>,
    mut rx: mpsc::Receiver<Queued>,
    peer: String,
    activity: Arc<Activity>,
    idle_timeout: Option<std::time::Duration>,
    gone: CancellationToken,
) -> std::io::Result<()> {
    let _gone = gone.drop_guard();
    let mut w = BufWriter::with_capacity(WRITE_PIECE, w);
    let stalled = || {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client took no reply bytes for the idle timeout",
        )
    };
    // Each piece must be taken within the idle timeout: a slow client
    // that reads is fine, one that stops reading is not.
    async fn timed<F: std::future::Future<Output = std::io::Result<()>>>(
        t: Option<std::time::Duration>,
        f: F,
        stalled: impl Fn() -> std::io::Error,
    ) -> std::io::Result<()> {
        match t {
            Some(t) => tokio::time::timeout(t, f).await.map_err(|_| stalled())?,
            None => f.await,
        }
    }
    let result = async {
        while let Some(mut item) = rx.recv().await {
            activity.set_writing(true);
            loop {
                timed(idle_timeout, w.write_all(&item.reply.0), stalled).await?;
                if let Some(d) = &item.reply.1 {
                    for piece in d.chunks(WRITE_PIECE) {
                        timed(idle_timeout, w.write_all(piece), stalled).await?;
                        activity.touch();
                    }
                }
                match rx.try_recv() {
                    Ok(next) => item = next,
                    Err(_) => break,
                }
            }
            timed(idle_timeout, w.flush(), stalled).await?;
            drop(item);
            activity.set_writing(false);
        }
        Ok(())
    }
    .await;
    activity.set_writing(false);
    if result.is_ok() {
        let _ = w.shutdown().await;
    }
    debug!(peer, "writer done");
    result
}

fn error_reply(session: &Session, req: &Request, errno: u32, message: &str) -> Served {
    let mut b = BytesMut::new();
    if session.structured {
        proto::put_error_chunk(&mut b, proto::REPLY_FLAG_DONE, req.cookie, errno, message);
    } else {
        proto::put_simple_reply(&mut b, errno, req.cookie);
    }
    Served {
        reply: (b.freeze(), None),
        failed: true,
    }
}

fn ok_reply(session: &Session, req: &Request) -> Served {
    let mut b = BytesMut::new();
    if session.structured {
        proto::put_chunk_header(
            &mut b,
            proto::REPLY_FLAG_DONE,
            proto::CHUNK_NONE,
            req.cookie,
            0,
        );
    } else {
        proto::put_simple_reply(&mut b, 0, req.cookie);
    }
    Served {
        reply: (b.freeze(), None),
        failed: false,
    }
}

async fn handle(
    session: &Session,
    req: Request,
    payload: Option<Bytes>,
    max_payload: u32,
    minimal: bool,
) -> Served {
    let export: &dyn Export = session.export.as_ref();
    let size = export.size();
    let in_range = req
        .offset
        .checked_add(req.length)
        .is_some_and(|e| e <= size);
    let read_only = session.flags & proto::TFLAG_READ_ONLY != 0;
    let einval = |what: &str| error_reply(session, &req, proto::EINVAL, what);
    match req.kind {
        proto::CMD_READ => {
            if minimal && (!req.offset.is_multiple_of(512) || !req.length.is_multiple_of(512)) {
                return einval("reads must be aligned to 512 bytes");
            }
            if !in_range {
                return einval("read past the end of the export");
            }
            if req.length > u64::from(max_payload) {
                return error_reply(session, &req, proto::EOVERFLOW, "read too large");
            }
            if req.length == 0 {
                return einval("read of length 0");
            }
            let data = match export.read(req.offset, req.length as u32).await {
                Ok(d) if d.len() as u64 == req.length => d,
                Ok(d) => {
                    let m = format!(
                        "export returned {} bytes for a read of {}",
                        d.len(),
                        req.length
                    );
                    return error_reply(session, &req, proto::EIO, &m);
                }
                Err(e) => return error_reply(session, &req, errno_of(&e), &e.to_string()),
            };
            let mut b = BytesMut::new();
            if session.structured {
                let len = 8 + data.len() as u32;
                proto::put_chunk_header(
                    &mut b,
                    proto::REPLY_FLAG_DONE,
                    proto::CHUNK_OFFSET_DATA,
                    req.cookie,
                    len,
                );
                b.put_u64(req.offset);
            } else {
                proto::put_simple_reply(&mut b, 0, req.cookie);
            }
            Served {
                reply: (b.freeze(), Some(data)),
                failed: false,
            }
        }
        proto::CMD_WRITE if minimal || read_only => {
            error_reply(session, &req, proto::EPERM, "read-only export")
        }
        proto::CMD_WRITE => {
            if !in_range {
                return einval("write past the end of the export");
            }
            match export.write(req.offset, payload.unwrap_or_default()).await {
                Ok(()) => ok_reply(session, &req),
                Err(e) => error_reply(session, &req, errno_of(&e), &e.to_string()),
            }
        }
        proto::CMD_WRITE_ZEROES if !minimal && !read_only => {
            if !in_range {
                return einval("write past the end of the export");
            }
            match export.write_zeroes(req.offset, req.length).await {
                Ok(()) => ok_reply(session, &req),
                Err(e) => error_reply(session, &req, errno_of(&e), &e.to_string()),
            }
        }
        proto::CMD_FLUSH if !minimal && !read_only => match export.flush().await {
            Ok(()) => ok_reply(session, &req),
            Err(e) => error_reply(session, &req, errno_of(&e), &e.to_string()),
        },
        proto::CMD_BLOCK_STATUS if !minimal => {
            if !session.structured || !session.base_allocation {
                return einval("no meta context selected");
            }
            if !in_range || req.length == 0 {
                return einval("block status outside the export");
            }
            let extents = match export.block_status(req.offset, req.length).await {
                Ok(e) => e,
                Err(e) => return error_reply(session, &req, errno_of(&e), &e.to_string()),
            };
            let mut body = BytesMut::new();
            body.put_u32(BASE_ALLOCATION_ID);
            let mut covered = 0u64;
            for e in extents {
                if covered >= req.length {
                    break;
                }
                let len = e.length.min(req.length - covered);
                if len == 0 {
                    continue;
                }
                body.put_u32(len as u32);
                body.put_u32(e.flags);
                covered += len;
                if req.flags & proto::CMDFLAG_REQ_ONE != 0 {
                    break;
                }
            }
            if covered == 0 {
                return error_reply(session, &req, proto::EIO, "the export gave no extents");
            }
            let mut b = BytesMut::new();
            proto::put_chunk_header(
                &mut b,
                proto::REPLY_FLAG_DONE,
                proto::CHUNK_BLOCK_STATUS,
                req.cookie,
                body.len() as u32,
            );
            b.put_slice(&body);
            Served {
                reply: (b.freeze(), None),
                failed: false,
            }
        }
        _ => einval("command not supported"),
    }
}
