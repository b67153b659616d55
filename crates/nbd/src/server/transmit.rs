//! The server's transmission phase: read requests, serve them (several at
//! once in full mode, one at a time in minimal mode), write replies.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::debug;

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

pub(crate) async fn serve(
    inner: &Inner,
    stream: BoxStream,
    session: Session,
    peer: &str,
    shutdown: CancellationToken,
) -> Result<()> {
    let (r, w) = tokio::io::split(stream);
    let mut r = BufReader::with_capacity(64 * 1024, r);
    let minimal = inner.config.mode == Mode::Minimal;
    let inflight = if minimal {
        1
    } else {
        inner.config.inflight.max(1)
    };
    let (tx, mut rx) = mpsc::channel::<Out>(inflight);
    let writer_peer = peer.to_owned();
    let writer = tokio::spawn(async move {
        let mut w = BufWriter::with_capacity(256 * 1024, w);
        while let Some(mut item) = rx.recv().await {
            loop {
                w.write_all(&item.0).await?;
                if let Some(d) = &item.1 {
                    w.write_all(d).await?;
                }
                match rx.try_recv() {
                    Ok(next) => item = next,
                    Err(_) => break,
                }
            }
            w.flush().await?;
        }
        let _ = w.shutdown().await;
        debug!(peer = writer_peer, "writer done");
        Ok::<(), std::io::Error>(())
    });

    let window = Arc::new(Semaphore::new(inflight));
    let session = Arc::new(session);
    let max_payload = inner.config.max_payload;
    let mut tasks = JoinSet::new();
    let result: Result<()> = async {
        loop {
            let mut head = [0u8; proto::REQUEST_LEN];
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                res = r.read_exact(&mut head) => match res {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(Error::io(peer, "reading a request", e)),
                },
            }
            let req = Request::decode_compact(&head).map_err(|e| Error::protocol(peer, e))?;
            if req.kind == proto::CMD_DISC {
                return Ok(());
            }
            let permit = window
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| Error::protocol(peer, "request window closed"))?;
            let mut payload = None;
            if req.kind == proto::CMD_WRITE {
                if req.length > u64::from(max_payload) {
                    return Err(Error::protocol(
                        peer,
                        format!("write of {} bytes is over the limit", req.length),
                    ));
                }
                let buf = read_claimed(&mut r, req.length as usize)
                    .await
                    .map_err(|e| Error::io(peer, "reading write data", e))?;
                payload = Some(Bytes::from(buf));
            }
            let session = session.clone();
            let tx = tx.clone();
            let fut = async move {
                let served = handle(&session, req, payload, max_payload, minimal).await;
                let failed = served.failed;
                let _ = tx.send(served.reply).await;
                drop(permit);
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
    while tasks.join_next().await.is_some() {}
    drop(tx);
    match writer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(Error::io(peer, "sending replies", e)),
        Err(e) => {
            return Err(Error::protocol(peer, format!("reply writer failed: {e}")));
        }
    }
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
