//! The client side of the fixed-newstyle handshake.
//!
//! Order, as the protocol document and QEMU require: STARTTLS first (a
//! server forgets everything negotiated before it), then extended headers
//! or else structured replies, then SET_META_CONTEXT, then GO with a request
//! for block sizes. A server that answers GO with `NBD_REP_ERR_UNSUP`
//! (XenServer's xapi-nbd) is spoken to with NBD_OPT_EXPORT_NAME instead.

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, warn};

use crate::claimed::read_claimed;
use crate::client::ConnectOptions;
use crate::error::{Error, Result};
use crate::proto::{self, Cursor};

/// Any byte stream a connection can run over (TCP, unix, TLS).
pub(crate) trait AsyncStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncStream for T {}
pub(crate) type BoxStream = Box<dyn AsyncStream>;

/// Largest option reply accepted (names and messages are at most 4 KiB).
const MAX_OPTION_REPLY: u32 = 1 << 20;
/// Most meta contexts accepted from one SET_META_CONTEXT: a handful are
/// asked for; an endless list would only pile up.
const MAX_CONTEXTS: usize = 256;

/// What one handshake settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Negotiated {
    pub size: u64,
    pub flags: u16,
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_payload: u32,
    pub structured: bool,
    pub extended: bool,
    /// Selected meta contexts: (name, per-connection id).
    pub contexts: Vec<(String, u32)>,
    /// GO was refused and EXPORT_NAME used (xapi-nbd).
    pub export_name_fallback: bool,
}

pub(crate) struct Tls<'a> {
    pub connector: &'a tokio_rustls::TlsConnector,
    pub name: rustls_pki_types::ServerName<'static>,
}

struct Io<'a> {
    stream: BoxStream,
    peer: &'a str,
}

impl Io<'_> {
    async fn read(&mut self, buf: &mut [u8], during: &str) -> Result<()> {
        self.stream
            .read_exact(buf)
            .await
            .map(|_| ())
            .map_err(|e| Error::io(self.peer, during, e))
    }

    async fn write(&mut self, data: &[u8], during: &str) -> Result<()> {
        self.stream
            .write_all(data)
            .await
            .map_err(|e| Error::io(self.peer, during, e))?;
        self.stream
            .flush()
            .await
            .map_err(|e| Error::io(self.peer, during, e))
    }

    async fn send_option(&mut self, option: u32, data: &[u8]) -> Result<()> {
        let mut buf = BytesMut::with_capacity(16 + data.len());
        proto::put_option(&mut buf, option, data);
        self.write(&buf, proto::option_name(option)).await
    }

    /// Reads one option reply for `option`: (reply type, data).
    async fn reply(&mut self, option: u32) -> Result<(u32, Vec<u8>)> {
        let during = format!("the reply to {}", proto::option_name(option));
        let mut head = [0u8; 20];
        self.read(&mut head, &during).await?;
        let mut c = Cursor::new(&head, "option reply");
        let magic = c.u64().map_err(|e| Error::handshake(self.peer, e))?;
        let echoed = c.u32().map_err(|e| Error::handshake(self.peer, e))?;
        let reply = c.u32().map_err(|e| Error::handshake(self.peer, e))?;
        let len = c.u32().map_err(|e| Error::handshake(self.peer, e))?;
        if magic != proto::OPTION_REPLY_MAGIC {
            return Err(Error::handshake(
                self.peer,
                format!("bad option reply magic {magic:#x} in {during}"),
            ));
        }
        if echoed != option {
            return Err(Error::handshake(
                self.peer,
                format!("{during} names option {echoed}"),
            ));
        }
        if len > MAX_OPTION_REPLY {
            return Err(Error::handshake(
                self.peer,
                format!("{during} claims {len} bytes of data"),
            ));
        }
        let data = read_claimed(&mut self.stream, len as usize)
            .await
            .map_err(|e| Error::io(self.peer, &during, e))?;
        Ok((reply, data))
    }

    fn refused(&self, option: u32, reply: u32, data: &[u8]) -> Error {
        if reply == proto::REP_ERR_TLS_REQD {
            return Error::TlsRequired {
                peer: self.peer.to_owned(),
            };
        }
        Error::OptionRefused {
            peer: self.peer.to_owned(),
            option: proto::option_name(option),
            reply: proto::reply_name(reply),
            message: String::from_utf8_lossy(data).into_owned(),
        }
    }

    fn unexpected(&self, option: u32, reply: u32) -> Error {
        Error::handshake(
            self.peer,
            format!(
                "unexpected {} ({reply:#x}) in the reply to {}",
                proto::reply_name(reply),
                proto::option_name(option)
            ),
        )
    }

    /// Sends an option that carries no data and expects a plain ACK:
    /// `Ok(true)` on ACK, `Ok(false)` on an error reply other than TLS_REQD.
    async fn simple_option(&mut self, option: u32) -> Result<bool> {
        self.send_option(option, &[]).await?;
        let (reply, data) = self.reply(option).await?;
        match reply {
            proto::REP_ACK => Ok(true),
            proto::REP_ERR_TLS_REQD => Err(self.refused(option, reply, &data)),
            r if r & proto::REP_ERR_BIT != 0 => {
                debug!(
                    peer = self.peer,
                    option = proto::option_name(option),
                    reply = proto::reply_name(r),
                    "option refused"
                );
                Ok(false)
            }
            r => Err(self.unexpected(option, r)),
        }
    }
}

/// Runs the whole handshake on a fresh stream.
pub(crate) async fn negotiate(
    stream: BoxStream,
    peer: &str,
    opts: &ConnectOptions,
    tls: Option<Tls<'_>>,
) -> Result<(BoxStream, Negotiated)> {
    let mut io = Io { stream, peer };
    let mut greeting = [0u8; 18];
    io.read(&mut greeting, "the server greeting").await?;
    let mut c = Cursor::new(&greeting, "greeting");
    let magic = c.u64().map_err(|e| Error::handshake(peer, e))?;
    let newstyle = c.u64().map_err(|e| Error::handshake(peer, e))?;
    let hflags = c.u16().map_err(|e| Error::handshake(peer, e))?;
    if magic != proto::NBDMAGIC {
        return Err(Error::handshake(
            peer,
            format!("bad greeting magic {magic:#x}: not an NBD server"),
        ));
    }
    if newstyle == proto::OLDSTYLE_MAGIC {
        return Err(Error::Unsupported {
            peer: peer.to_owned(),
            what: "the oldstyle handshake".into(),
        });
    }
    if newstyle != proto::IHAVEOPT {
        return Err(Error::handshake(
            peer,
            format!("bad newstyle magic {newstyle:#x}"),
        ));
    }
    if hflags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(Error::Unsupported {
            peer: peer.to_owned(),
            what: "servers without fixed newstyle negotiation".into(),
        });
    }
    let no_zeroes = hflags & proto::FLAG_NO_ZEROES != 0;
    let cflags = proto::CLIENT_FIXED_NEWSTYLE
        | if no_zeroes {
            proto::CLIENT_NO_ZEROES
        } else {
            0
        };
    io.write(&cflags.to_be_bytes(), "the client flags").await?;

    if let Some(tls) = tls {
        io.send_option(proto::OPT_STARTTLS, &[]).await?;
        let (reply, data) = io.reply(proto::OPT_STARTTLS).await?;
        match reply {
            proto::REP_ACK => {}
            r if r & proto::REP_ERR_BIT != 0 => {
                return Err(io.refused(proto::OPT_STARTTLS, r, &data));
            }
            r => return Err(io.unexpected(proto::OPT_STARTTLS, r)),
        }
        let stream = tls
            .connector
            .connect(tls.name, io.stream)
            .await
            .map_err(|e| Error::tls(peer, e))?;
        io.stream = Box::new(stream);
        debug!(peer, "TLS established");
    }

    let mut extended = false;
    let mut structured = false;
    if opts.extended_headers && io.simple_option(proto::OPT_EXTENDED_HEADERS).await? {
        extended = true;
        structured = true;
    }
    if !structured {
        structured = io.simple_option(proto::OPT_STRUCTURED_REPLY).await?;
    }

    let mut contexts = Vec::new();
    if structured && !opts.meta_contexts.is_empty() {
        let mut data = BytesMut::new();
        proto::put_string(&mut data, &opts.export);
        data.put_u32(opts.meta_contexts.len() as u32);
        for q in &opts.meta_contexts {
            proto::put_string(&mut data, q);
        }
        io.send_option(proto::OPT_SET_META_CONTEXT, &data).await?;
        loop {
            let (reply, data) = io.reply(proto::OPT_SET_META_CONTEXT).await?;
            match reply {
                proto::REP_ACK => break,
                proto::REP_META_CONTEXT => {
                    if contexts.len() >= MAX_CONTEXTS {
                        return Err(Error::handshake(
                            peer,
                            format!(
                                "more than {MAX_CONTEXTS} meta contexts selected for {} queries",
                                opts.meta_contexts.len()
                            ),
                        ));
                    }
                    let mut c = Cursor::new(&data, "NBD_REP_META_CONTEXT");
                    let id = c.u32().map_err(|e| Error::handshake(peer, e))?;
                    let name = String::from_utf8(c.rest().to_vec())
                        .map_err(|_| Error::handshake(peer, "meta context name is not UTF-8"))?;
                    contexts.push((name, id));
                }
                proto::REP_ERR_TLS_REQD => {
                    return Err(io.refused(proto::OPT_SET_META_CONTEXT, reply, &data));
                }
                r if r & proto::REP_ERR_BIT != 0 => {
                    warn!(
                        peer,
                        reply = proto::reply_name(r),
                        "the server refused meta contexts; block status is unavailable"
                    );
                    contexts.clear();
                    break;
                }
                r => return Err(io.unexpected(proto::OPT_SET_META_CONTEXT, r)),
            }
        }
    }

    let mut go = BytesMut::new();
    proto::put_string(&mut go, &opts.export);
    go.put_u16(1);
    go.put_u16(proto::INFO_BLOCK_SIZE);
    io.send_option(proto::OPT_GO, &go).await?;
    let mut export = None;
    let mut sizes = None;
    loop {
        let (reply, data) = io.reply(proto::OPT_GO).await?;
        match reply {
            proto::REP_ACK => break,
            proto::REP_INFO => {
                let mut c = Cursor::new(&data, "NBD_REP_INFO");
                let parsed: std::result::Result<(), String> = (|| {
                    match c.u16()? {
                        proto::INFO_EXPORT => export = Some((c.u64()?, c.u16()?)),
                        proto::INFO_BLOCK_SIZE => sizes = Some((c.u32()?, c.u32()?, c.u32()?)),
                        _ => {}
                    }
                    Ok(())
                })();
                parsed.map_err(|e| Error::handshake(peer, e))?;
            }
            proto::REP_ERR_UNSUP => {
                tracing::info!(
                    peer,
                    "the server does not support NBD_OPT_GO; falling back to NBD_OPT_EXPORT_NAME (simple replies, 512-byte alignment)"
                );
                return export_name(io, opts, no_zeroes, structured, extended).await;
            }
            proto::REP_ERR_UNKNOWN => {
                return Err(Error::UnknownExport {
                    peer: peer.to_owned(),
                    export: opts.export.clone(),
                });
            }
            r if r & proto::REP_ERR_BIT != 0 => return Err(io.refused(proto::OPT_GO, r, &data)),
            r => return Err(io.unexpected(proto::OPT_GO, r)),
        }
    }
    let (size, flags) =
        export.ok_or_else(|| Error::handshake(peer, "NBD_OPT_GO ended without NBD_INFO_EXPORT"))?;
    let (min_block, preferred_block, max_payload) = match sizes {
        Some((min, pref, max)) => {
            if !min.is_power_of_two() || min > 65536 || max < min || pref < min {
                return Err(Error::handshake(
                    peer,
                    format!("invalid block sizes: minimum {min}, preferred {pref}, maximum {max}"),
                ));
            }
            (min, pref, max.min(proto::DEFAULT_MAX_PAYLOAD) / min * min)
        }
        None => (1, 4096, proto::DEFAULT_MAX_PAYLOAD),
    };
    let n = Negotiated {
        size,
        flags,
        min_block,
        preferred_block,
        max_payload,
        structured,
        extended,
        contexts,
        export_name_fallback: false,
    };
    debug!(peer, ?n, "negotiated");
    Ok((io.stream, n))
}

async fn export_name(
    mut io: Io<'_>,
    opts: &ConnectOptions,
    no_zeroes: bool,
    structured: bool,
    extended: bool,
) -> Result<(BoxStream, Negotiated)> {
    io.send_option(proto::OPT_EXPORT_NAME, opts.export.as_bytes())
        .await?;
    let mut reply = vec![
        0u8;
        10 + if no_zeroes {
            0
        } else {
            proto::EXPORT_NAME_PADDING
        }
    ];
    io.stream.read_exact(&mut reply).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::handshake(
                io.peer,
                format!(
                    "the server closed the connection after NBD_OPT_EXPORT_NAME: export {:?} is unknown or not permitted",
                    opts.export
                ),
            )
        } else {
            Error::io(io.peer, "the reply to NBD_OPT_EXPORT_NAME", e)
        }
    })?;
    let mut c = Cursor::new(&reply, "NBD_OPT_EXPORT_NAME reply");
    let size = c.u64().map_err(|e| Error::handshake(io.peer, e))?;
    let flags = c.u16().map_err(|e| Error::handshake(io.peer, e))?;
    let n = Negotiated {
        size,
        flags,
        min_block: 512,
        preferred_block: 4096,
        max_payload: proto::DEFAULT_MAX_PAYLOAD,
        structured,
        extended,
        contexts: Vec::new(),
        export_name_fallback: true,
    };
    debug!(peer = io.peer, ?n, "negotiated with NBD_OPT_EXPORT_NAME");
    Ok((io.stream, n))
}
