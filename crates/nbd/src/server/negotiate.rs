//! The server side of the handshake.

use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::debug;

use super::{Export, Inner, Mode};
use crate::error::{Error, Result};
use crate::handshake::BoxStream;
use crate::proto::{self, Cursor};

/// Largest option data read; longer options get ERR_TOO_BIG.
const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Context id of `base:allocation`.
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;

/// What transmission needs from the handshake.
pub(crate) struct Session {
    pub export: Arc<dyn Export>,
    pub flags: u16,
    pub structured: bool,
    pub base_allocation: bool,
}

struct Conn<'a> {
    stream: BoxStream,
    peer: &'a str,
}

impl Conn<'_> {
    async fn send(&mut self, buf: &[u8]) -> Result<()> {
        self.stream
            .write_all(buf)
            .await
            .map_err(|e| Error::io(self.peer, "sending the handshake", e))?;
        self.stream
            .flush()
            .await
            .map_err(|e| Error::io(self.peer, "sending the handshake", e))
    }

    async fn reply(&mut self, option: u32, reply: u32, data: &[u8]) -> Result<()> {
        let mut buf = BytesMut::with_capacity(20 + data.len());
        proto::put_option_reply(&mut buf, option, reply, data);
        self.send(&buf).await
    }

    async fn error(&mut self, option: u32, reply: u32, message: &str) -> Result<()> {
        debug!(
            peer = self.peer,
            option = proto::option_name(option),
            reply = proto::reply_name(reply),
            message,
            "option refused"
        );
        self.reply(option, reply, message.as_bytes()).await
    }

    async fn read(&mut self, buf: &mut [u8]) -> Result<()> {
        self.stream
            .read_exact(buf)
            .await
            .map(|_| ())
            .map_err(|e| Error::io(self.peer, "reading the handshake", e))
    }
}

fn transmission_flags(inner: &Inner, export: &dyn Export) -> u16 {
    let mut f = proto::TFLAG_HAS_FLAGS;
    if inner.config.mode == Mode::Minimal || export.read_only() {
        f |= proto::TFLAG_READ_ONLY;
    } else {
        f |= proto::TFLAG_SEND_FLUSH | proto::TFLAG_SEND_WRITE_ZEROES;
    }
    if inner.config.mode == Mode::Full && inner.config.multi_conn {
        f |= proto::TFLAG_CAN_MULTI_CONN;
    }
    f
}

/// Runs the handshake; `None` when the client aborted.
pub(crate) async fn negotiate(
    inner: &Inner,
    stream: BoxStream,
    peer: &str,
) -> Result<Option<(BoxStream, Session)>> {
    let minimal = inner.config.mode == Mode::Minimal;
    let mut c = Conn { stream, peer };
    let offered = if minimal {
        proto::FLAG_FIXED_NEWSTYLE
    } else {
        proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES
    };
    let mut hello = BytesMut::with_capacity(18);
    hello.put_u64(proto::NBDMAGIC);
    hello.put_u64(proto::IHAVEOPT);
    hello.put_u16(offered);
    c.send(&hello).await?;
    let mut cflags = [0u8; 4];
    c.read(&mut cflags).await?;
    let cflags = u32::from_be_bytes(cflags);
    if cflags & !u32::from(offered) != 0 {
        return Err(Error::handshake(
            peer,
            format!("client flags {cflags:#x} not offered"),
        ));
    }
    let no_zeroes = cflags & proto::CLIENT_NO_ZEROES != 0;

    let mut tls_done = false;
    let mut structured = false;
    // Export name and whether base:allocation was selected for it.
    let mut meta: Option<(String, bool)> = None;
    loop {
        let mut head = [0u8; 16];
        c.read(&mut head).await?;
        let mut h = Cursor::new(&head, "option header");
        let (magic, option, len) = match (h.u64(), h.u32(), h.u32()) {
            (Ok(m), Ok(o), Ok(l)) => (m, o, l),
            _ => return Err(Error::handshake(peer, "truncated option header")),
        };
        if magic != proto::IHAVEOPT {
            return Err(Error::handshake(
                peer,
                format!("bad option magic {magic:#x}"),
            ));
        }
        if len > MAX_OPTION_DATA {
            let mut sink = tokio::io::sink();
            tokio::io::copy(&mut (&mut c.stream).take(u64::from(len)), &mut sink)
                .await
                .map_err(|e| Error::io(peer, "skipping option data", e))?;
            c.error(option, proto::REP_ERR_TOO_BIG, "option data too long")
                .await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        c.read(&mut data).await?;

        let tls_needed = inner.config.require_tls && !tls_done;
        if tls_needed && option != proto::OPT_STARTTLS && option != proto::OPT_ABORT {
            if option == proto::OPT_EXPORT_NAME {
                return Err(Error::handshake(peer, "NBD_OPT_EXPORT_NAME before TLS"));
            }
            c.error(option, proto::REP_ERR_TLS_REQD, "TLS is required")
                .await?;
            continue;
        }
        match option {
            proto::OPT_ABORT => {
                let _ = c.reply(option, proto::REP_ACK, &[]).await;
                return Ok(None);
            }
            proto::OPT_STARTTLS => {
                let Some(tls) = inner.config.tls.clone() else {
                    c.error(option, proto::REP_ERR_POLICY, "TLS is not configured")
                        .await?;
                    continue;
                };
                if tls_done || len != 0 {
                    c.error(
                        option,
                        proto::REP_ERR_INVALID,
                        "TLS already started or bad data",
                    )
                    .await?;
                    continue;
                }
                c.reply(option, proto::REP_ACK, &[]).await?;
                let s = tokio_rustls::TlsAcceptor::from(tls)
                    .accept(c.stream)
                    .await
                    .map_err(|e| Error::tls(peer, e))?;
                c.stream = Box::new(s);
                tls_done = true;
                structured = false;
                meta = None;
            }
            proto::OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(export) = inner.lookup(&name) else {
                    // The protocol has no error reply here: close.
                    return Err(Error::UnknownExport {
                        peer: peer.to_owned(),
                        export: name,
                    });
                };
                let flags = transmission_flags(inner, export.as_ref());
                let mut buf = BytesMut::with_capacity(10 + proto::EXPORT_NAME_PADDING);
                buf.put_u64(export.size());
                buf.put_u16(flags);
                if !no_zeroes {
                    buf.put_bytes(0, proto::EXPORT_NAME_PADDING);
                }
                c.send(&buf).await?;
                let base_allocation = matches!(&meta, Some((n, true)) if *n == name);
                return Ok(Some((
                    c.stream,
                    Session {
                        export,
                        flags,
                        structured,
                        base_allocation,
                    },
                )));
            }
            proto::OPT_LIST if minimal => {
                c.error(option, proto::REP_ERR_POLICY, "listing is not allowed")
                    .await?;
            }
            _ if minimal => {
                c.error(option, proto::REP_ERR_UNSUP, "not supported")
                    .await?;
            }
            proto::OPT_LIST => {
                if len != 0 {
                    c.error(
                        option,
                        proto::REP_ERR_INVALID,
                        "NBD_OPT_LIST carries no data",
                    )
                    .await?;
                    continue;
                }
                let Some(names) = inner.names() else {
                    c.error(option, proto::REP_ERR_POLICY, "exports are not listed")
                        .await?;
                    continue;
                };
                for n in names {
                    let mut d = BytesMut::new();
                    proto::put_string(&mut d, &n);
                    c.reply(option, proto::REP_SERVER, &d).await?;
                }
                c.reply(option, proto::REP_ACK, &[]).await?;
            }
            proto::OPT_STRUCTURED_REPLY => {
                if len != 0 {
                    c.error(option, proto::REP_ERR_INVALID, "no data expected")
                        .await?;
                    continue;
                }
                structured = true;
                c.reply(option, proto::REP_ACK, &[]).await?;
            }
            proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                let set = option == proto::OPT_SET_META_CONTEXT;
                if set && !structured {
                    c.error(option, proto::REP_ERR_INVALID, "structured replies first")
                        .await?;
                    continue;
                }
                let parsed = parse_meta(&data);
                let Ok((name, queries)) = parsed else {
                    c.error(
                        option,
                        proto::REP_ERR_INVALID,
                        &parsed.err().unwrap_or_default(),
                    )
                    .await?;
                    continue;
                };
                if inner.lookup(&name).is_none() {
                    c.error(option, proto::REP_ERR_UNKNOWN, "no such export")
                        .await?;
                    continue;
                }
                let matched = if queries.is_empty() {
                    !set
                } else {
                    queries.iter().any(|q| {
                        q == proto::BASE_ALLOCATION
                            || (!set && (q == "base:" || q == "base:allocation"))
                    })
                };
                if matched {
                    let mut d = BytesMut::new();
                    d.put_u32(BASE_ALLOCATION_ID);
                    d.put_slice(proto::BASE_ALLOCATION.as_bytes());
                    c.reply(option, proto::REP_META_CONTEXT, &d).await?;
                }
                if set {
                    meta = Some((name, matched));
                }
                c.reply(option, proto::REP_ACK, &[]).await?;
            }
            proto::OPT_INFO | proto::OPT_GO => {
                let mut d = Cursor::new(&data, "NBD_OPT_GO data");
                let parsed: std::result::Result<(String, Vec<u16>), String> = (|| {
                    let name = d.string()?;
                    let n = d.u16()?;
                    let infos = (0..n)
                        .map(|_| d.u16())
                        .collect::<std::result::Result<_, _>>()?;
                    if !d.is_empty() {
                        return Err("trailing data".into());
                    }
                    Ok((name, infos))
                })();
                let (name, infos) = match parsed {
                    Ok(p) => p,
                    Err(e) => {
                        c.error(option, proto::REP_ERR_INVALID, &e).await?;
                        continue;
                    }
                };
                let Some(export) = inner.lookup(&name) else {
                    c.error(option, proto::REP_ERR_UNKNOWN, "no such export")
                        .await?;
                    continue;
                };
                let flags = transmission_flags(inner, export.as_ref());
                let mut d = BytesMut::new();
                d.put_u16(proto::INFO_EXPORT);
                d.put_u64(export.size());
                d.put_u16(flags);
                c.reply(option, proto::REP_INFO, &d).await?;
                let mut d = BytesMut::new();
                d.put_u16(proto::INFO_BLOCK_SIZE);
                d.put_u32(1);
                d.put_u32(4096);
                d.put_u32(inner.config.max_payload);
                c.reply(option, proto::REP_INFO, &d).await?;
                if infos.contains(&proto::INFO_NAME) {
                    let mut d = BytesMut::new();
                    d.put_u16(proto::INFO_NAME);
                    d.put_slice(name.as_bytes());
                    c.reply(option, proto::REP_INFO, &d).await?;
                }
                c.reply(option, proto::REP_ACK, &[]).await?;
                if option == proto::OPT_GO {
                    let base_allocation = matches!(&meta, Some((n, true)) if *n == name);
                    return Ok(Some((
                        c.stream,
                        Session {
                            export,
                            flags,
                            structured,
                            base_allocation,
                        },
                    )));
                }
            }
            _ => {
                c.error(option, proto::REP_ERR_UNSUP, "not supported")
                    .await?;
            }
        }
    }
}

/// Export name and queries of LIST/SET_META_CONTEXT.
fn parse_meta(data: &[u8]) -> std::result::Result<(String, Vec<String>), String> {
    let mut d = Cursor::new(data, "meta context request");
    let name = d.string()?;
    let n = d.u32()?;
    if n > 128 {
        return Err(format!("{n} queries is too many"));
    }
    let queries = (0..n)
        .map(|_| d.string())
        .collect::<std::result::Result<Vec<_>, _>>()?;
    if !d.is_empty() {
        return Err("trailing data".into());
    }
    Ok((name, queries))
}
