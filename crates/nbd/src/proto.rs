//! Wire constants and the pure (I/O-free) encoding and decoding of NBD
//! messages. All integers are big-endian. Decoders take byte slices and
//! return `Err(String)` describing what is wrong; callers add the peer.
//! Nothing here panics on any input.

use bytes::{Buf, BufMut, Bytes, BytesMut};

// Handshake magics.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1;
pub const CLIENT_NO_ZEROES: u32 = 2;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_BIT: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR_BIT | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR_BIT | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR_BIT | 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR_BIT | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR_BIT | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR_BIT | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR_BIT | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR_BIT | 9;
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_ERR_BIT | 10;

// NBD_INFO types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Requests.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXT_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const REQUEST_LEN: usize = 28;
pub const EXT_REQUEST_LEN: usize = 32;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMDFLAG_FUA: u16 = 1;
pub const CMDFLAG_NO_HOLE: u16 = 2;
pub const CMDFLAG_DF: u16 = 4;
pub const CMDFLAG_REQ_ONE: u16 = 8;

// Replies.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXT_REPLY_MAGIC: u32 = 0x6e8a_278c;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const STRUCTURED_REPLY_LEN: usize = 20;
pub const EXT_REPLY_LEN: usize = 32;

pub const REPLY_FLAG_DONE: u16 = 1;
pub const CHUNK_NONE: u16 = 0;
pub const CHUNK_OFFSET_DATA: u16 = 1;
pub const CHUNK_OFFSET_HOLE: u16 = 2;
pub const CHUNK_BLOCK_STATUS: u16 = 5;
pub const CHUNK_BLOCK_STATUS_EXT: u16 = 6;
pub const CHUNK_ERROR_BIT: u16 = 1 << 15;
pub const CHUNK_ERROR: u16 = CHUNK_ERROR_BIT | 1;
pub const CHUNK_ERROR_OFFSET: u16 = CHUNK_ERROR_BIT | 2;

// Errors (NBD's own numbering, as Linux).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

// base:allocation flags.
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;
/// qemu:dirty-bitmap:NAME flag.
pub const STATE_DIRTY: u32 = 1;

/// The meta context every server here understands.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Maximum payload when the server gives no block sizes (2^25).
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Longest string (export name, context name, message) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// The zero padding after the EXPORT_NAME reply without NO_ZEROES.
pub const EXPORT_NAME_PADDING: usize = 124;

/// The name of an option, for messages.
pub fn option_name(option: u32) -> &'static str {
    match option {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_LIST => "NBD_OPT_LIST",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        _ => "an unknown option",
    }
}

/// The name of an option reply type, for messages.
pub fn reply_name(reply: u32) -> &'static str {
    match reply {
        REP_ACK => "NBD_REP_ACK",
        REP_SERVER => "NBD_REP_SERVER",
        REP_INFO => "NBD_REP_INFO",
        REP_META_CONTEXT => "NBD_REP_META_CONTEXT",
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        REP_ERR_EXT_HEADER_REQD => "NBD_REP_ERR_EXT_HEADER_REQD",
        r if r & REP_ERR_BIT != 0 => "an unknown error reply",
        _ => "an unknown reply",
    }
}

/// The name of a command, for messages.
pub fn command_name(command: u16) -> &'static str {
    match command {
        CMD_READ => "NBD_CMD_READ",
        CMD_WRITE => "NBD_CMD_WRITE",
        CMD_DISC => "NBD_CMD_DISC",
        CMD_FLUSH => "NBD_CMD_FLUSH",
        CMD_TRIM => "NBD_CMD_TRIM",
        CMD_CACHE => "NBD_CMD_CACHE",
        CMD_WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
        CMD_BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
        _ => "an unknown command",
    }
}

/// Appends an option request: IHAVEOPT, option, length, data.
pub fn put_option(buf: &mut BytesMut, option: u32, data: &[u8]) {
    buf.put_u64(IHAVEOPT);
    buf.put_u32(option);
    buf.put_u32(data.len() as u32);
    buf.put_slice(data);
}

/// Appends an option reply header and data.
pub fn put_option_reply(buf: &mut BytesMut, option: u32, reply: u32, data: &[u8]) {
    buf.put_u64(OPTION_REPLY_MAGIC);
    buf.put_u32(option);
    buf.put_u32(reply);
    buf.put_u32(data.len() as u32);
    buf.put_slice(data);
}

/// Appends a u32-length-prefixed string.
pub fn put_string(buf: &mut BytesMut, s: &str) {
    buf.put_u32(s.len() as u32);
    buf.put_slice(s.as_bytes());
}

/// A reader over option data that reports truncation instead of panicking.
pub struct Cursor<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Cursor { buf, what }
    }

    fn need(&self, n: usize) -> Result<(), String> {
        if self.buf.len() < n {
            Err(format!(
                "{} is truncated: needed {n} more bytes, {} left",
                self.what,
                self.buf.len()
            ))
        } else {
            Ok(())
        }
    }

    pub fn u16(&mut self) -> Result<u16, String> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }

    pub fn u32(&mut self) -> Result<u32, String> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }

    pub fn u64(&mut self) -> Result<u64, String> {
        self.need(8)?;
        Ok(self.buf.get_u64())
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], String> {
        self.need(n)?;
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// A u32 length then that many bytes of UTF-8 (at most [`MAX_STRING`]).
    pub fn string(&mut self) -> Result<String, String> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return Err(format!("{}: string of {n} bytes is too long", self.what));
        }
        let b = self.bytes(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{}: string is not UTF-8", self.what))
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// A transmission-phase request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
}

impl Request {
    /// Appends the request header, compact or extended.
    pub fn encode(&self, extended: bool, buf: &mut BytesMut) {
        if extended {
            buf.put_u32(EXT_REQUEST_MAGIC);
            buf.put_u16(self.flags);
            buf.put_u16(self.kind);
            buf.put_u64(self.cookie);
            buf.put_u64(self.offset);
            buf.put_u64(self.length);
        } else {
            buf.put_u32(REQUEST_MAGIC);
            buf.put_u16(self.flags);
            buf.put_u16(self.kind);
            buf.put_u64(self.cookie);
            buf.put_u64(self.offset);
            // The caller keeps compact lengths within u32.
            buf.put_u32(u32::try_from(self.length).unwrap_or(u32::MAX));
        }
    }

    /// Decodes a compact (28-byte) request header.
    pub fn decode_compact(buf: &[u8]) -> Result<Request, String> {
        let mut c = Cursor::new(buf, "request header");
        let magic = c.u32()?;
        if magic != REQUEST_MAGIC {
            return Err(format!("bad request magic {magic:#010x}"));
        }
        Ok(Request {
            flags: c.u16()?,
            kind: c.u16()?,
            cookie: c.u64()?,
            offset: c.u64()?,
            length: u64::from(c.u32()?),
        })
    }
}

/// The header of a transmission-phase reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple {
        error: u32,
        cookie: u64,
    },
    Chunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        /// Only in extended headers; 0 otherwise.
        offset: u64,
        length: u64,
    },
}

impl ReplyHeader {
    pub fn cookie(&self) -> u64 {
        match self {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Chunk { cookie, .. } => *cookie,
        }
    }
}

/// How long the whole reply header is, given its first four bytes.
pub fn reply_header_len(magic: u32) -> Option<usize> {
    match magic {
        SIMPLE_REPLY_MAGIC => Some(SIMPLE_REPLY_LEN),
        STRUCTURED_REPLY_MAGIC => Some(STRUCTURED_REPLY_LEN),
        EXT_REPLY_MAGIC => Some(EXT_REPLY_LEN),
        _ => None,
    }
}

/// Decodes a reply header (magic included).
pub fn decode_reply_header(buf: &[u8]) -> Result<ReplyHeader, String> {
    let mut c = Cursor::new(buf, "reply header");
    let magic = c.u32()?;
    let header = match magic {
        SIMPLE_REPLY_MAGIC => ReplyHeader::Simple {
            error: c.u32()?,
            cookie: c.u64()?,
        },
        STRUCTURED_REPLY_MAGIC => ReplyHeader::Chunk {
            flags: c.u16()?,
            kind: c.u16()?,
            cookie: c.u64()?,
            offset: 0,
            length: u64::from(c.u32()?),
        },
        EXT_REPLY_MAGIC => ReplyHeader::Chunk {
            flags: c.u16()?,
            kind: c.u16()?,
            cookie: c.u64()?,
            offset: c.u64()?,
            length: c.u64()?,
        },
        other => return Err(format!("bad reply magic {other:#010x}")),
    };
    if !c.is_empty() {
        return Err("reply header has trailing bytes".into());
    }
    Ok(header)
}

/// A decoded structured-reply chunk payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    None,
    Data {
        offset: u64,
        data: Bytes,
    },
    Hole {
        offset: u64,
        length: u32,
    },
    /// Extents as (length, flags); both compact and extended forms.
    Status {
        context: u32,
        extents: Vec<(u64, u64)>,
    },
    Error {
        errno: u32,
        message: String,
        offset: Option<u64>,
    },
}

/// Decodes the payload of a chunk of type `kind`.
pub fn decode_chunk(kind: u16, mut payload: Bytes) -> Result<Chunk, String> {
    let len = payload.len();
    match kind {
        CHUNK_NONE => {
            if len != 0 {
                return Err(format!("NBD_REPLY_TYPE_NONE with {len} bytes of payload"));
            }
            Ok(Chunk::None)
        }
        CHUNK_OFFSET_DATA => {
            if len < 9 {
                return Err(format!("OFFSET_DATA chunk of {len} bytes carries no data"));
            }
            let offset = payload.get_u64();
            Ok(Chunk::Data {
                offset,
                data: payload,
            })
        }
        CHUNK_OFFSET_HOLE => {
            if len != 12 {
                return Err(format!("OFFSET_HOLE chunk of {len} bytes (expected 12)"));
            }
            let offset = payload.get_u64();
            let length = payload.get_u32();
            if length == 0 {
                return Err("OFFSET_HOLE chunk of length 0".into());
            }
            Ok(Chunk::Hole { offset, length })
        }
        CHUNK_BLOCK_STATUS => {
            if len < 12 || !(len - 4).is_multiple_of(8) {
                return Err(format!("BLOCK_STATUS chunk of {len} bytes is malformed"));
            }
            let context = payload.get_u32();
            let mut extents = Vec::with_capacity((len - 4) / 8);
            while payload.has_remaining() {
                let l = payload.get_u32();
                let f = payload.get_u32();
                extents.push((u64::from(l), u64::from(f)));
            }
            Ok(Chunk::Status { context, extents })
        }
        CHUNK_BLOCK_STATUS_EXT => {
            if len < 24 || !(len - 8).is_multiple_of(16) {
                return Err(format!(
                    "BLOCK_STATUS_EXT chunk of {len} bytes is malformed"
                ));
            }
            let context = payload.get_u32();
            let count = payload.get_u32() as usize;
            if count != (len - 8) / 16 {
                return Err(format!(
                    "BLOCK_STATUS_EXT chunk claims {count} extents but carries {}",
                    (len - 8) / 16
                ));
            }
            let mut extents = Vec::with_capacity(count);
            while payload.has_remaining() {
                let l = payload.get_u64();
                let f = payload.get_u64();
                extents.push((l, f));
            }
            Ok(Chunk::Status { context, extents })
        }
        k if k & CHUNK_ERROR_BIT != 0 => {
            let mut c = Cursor::new(&payload, "error chunk");
            let errno = c.u32()?;
            let mlen = c.u16()? as usize;
            let message = String::from_utf8_lossy(c.bytes(mlen)?).into_owned();
            let offset = if k == CHUNK_ERROR_OFFSET {
                Some(c.u64()?)
            } else {
                None
            };
            if errno == 0 {
                return Err("error chunk with error number 0".into());
            }
            Ok(Chunk::Error {
                errno,
                message,
                offset,
            })
        }
        other => Err(format!("unknown chunk type {other}")),
    }
}

/// Appends a structured (compact) chunk header.
pub fn put_chunk_header(buf: &mut BytesMut, flags: u16, kind: u16, cookie: u64, length: u32) {
    buf.put_u32(STRUCTURED_REPLY_MAGIC);
    buf.put_u16(flags);
    buf.put_u16(kind);
    buf.put_u64(cookie);
    buf.put_u32(length);
}

/// Appends a simple reply header.
pub fn put_simple_reply(buf: &mut BytesMut, error: u32, cookie: u64) {
    buf.put_u32(SIMPLE_REPLY_MAGIC);
    buf.put_u32(error);
    buf.put_u64(cookie);
}

/// Appends a whole NBD_REPLY_TYPE_ERROR chunk.
pub fn put_error_chunk(buf: &mut BytesMut, flags: u16, cookie: u64, errno: u32, message: &str) {
    let msg = &message.as_bytes()[..message.len().min(MAX_STRING)];
    put_chunk_header(buf, flags, CHUNK_ERROR, cookie, 6 + msg.len() as u32);
    buf.put_u32(errno);
    buf.put_u16(msg.len() as u16);
    buf.put_slice(msg);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip_compact() {
        let r = Request {
            flags: CMDFLAG_FUA,
            kind: CMD_WRITE,
            cookie: 42,
            offset: 1 << 40,
            length: 4096,
        };
        let mut b = BytesMut::new();
        r.encode(false, &mut b);
        assert_eq!(b.len(), REQUEST_LEN);
        assert_eq!(Request::decode_compact(&b).unwrap(), r);
        let mut e = BytesMut::new();
        r.encode(true, &mut e);
        assert_eq!(e.len(), EXT_REQUEST_LEN);
    }

    #[test]
    fn reply_headers() {
        let mut b = BytesMut::new();
        put_chunk_header(&mut b, REPLY_FLAG_DONE, CHUNK_OFFSET_DATA, 7, 100);
        let h = decode_reply_header(&b).unwrap();
        assert_eq!(
            h,
            ReplyHeader::Chunk {
                flags: 1,
                kind: 1,
                cookie: 7,
                offset: 0,
                length: 100
            }
        );
        assert!(decode_reply_header(&[0, 1, 2, 3]).is_err());
        assert!(decode_reply_header(&b[..10]).is_err());
    }

    #[test]
    fn chunks() {
        let mut b = BytesMut::new();
        b.put_u32(3);
        b.put_u32(4096);
        b.put_u32(3);
        assert_eq!(
            decode_chunk(CHUNK_BLOCK_STATUS, b.freeze()).unwrap(),
            Chunk::Status {
                context: 3,
                extents: vec![(4096, 3)]
            }
        );
        assert!(decode_chunk(CHUNK_BLOCK_STATUS, Bytes::from_static(&[0; 5])).is_err());
        assert!(decode_chunk(CHUNK_OFFSET_DATA, Bytes::from_static(&[0; 8])).is_err());
        assert!(decode_chunk(CHUNK_ERROR, Bytes::from_static(&[0, 0, 0, 5, 0, 9])).is_err());
        assert!(decode_chunk(77, Bytes::new()).is_err());
    }

    proptest::proptest! {
        #[test]
        fn decoders_never_panic(kind in proptest::prelude::any::<u16>(), data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = decode_chunk(kind, Bytes::from(data.clone()));
            let _ = decode_reply_header(&data);
            let _ = Request::decode_compact(&data);
            let mut c = Cursor::new(&data, "fuzz");
            let _ = c.string();
        }
    }
}
