//! The client against a hostile server: a recorded, valid server side of a
//! whole session (greeting, option replies, NBD_INFO, simple and
//! structured replies, block status, error chunks), mutated or replaced by
//! random bytes, is played over a real unix socket. Every case must end in
//! data of the right length or a typed error, within a deadline, without
//! a panic and without any allocation beyond [`ALLOC_LIMIT`].

use std::path::Path;
use std::time::Duration;

use cbtvault_nbd::proto::{self, Request};
use cbtvault_nbd::{Client, ConnectOptions, Error, StatusExtent};
use proptest::prelude::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

use super::mutate::{Script, apply, mutations};
use super::watch::{runtime, watch};

/// Export size: big, so that lengths the client asks for are big.
const SIZE: u64 = 1 << 40;
/// The block-status request of the session: 1 GiB.
const STATUS_LEN: u64 = 1 << 30;
const CONTEXT: u32 = 7;
/// Largest single allocation a case may make. The client's own buffers
/// are 256 KiB; nothing a peer merely claims may cost more than this.
pub const ALLOC_LIMIT: usize = 4 << 20;
/// A case that takes longer than this hangs.
const DEADLINE: Duration = Duration::from_secs(20);

/// How the recorded server negotiates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Extended headers (64-bit lengths), structured replies.
    Extended,
    /// Structured replies with compact headers.
    Structured,
    /// Neither: simple replies.
    Simple,
    /// NBD_OPT_GO refused: EXPORT_NAME, as xapi-nbd.
    ExportName,
}

const KINDS: [Kind; 4] = [
    Kind::Extended,
    Kind::Structured,
    Kind::Simple,
    Kind::ExportName,
];

fn option_reply(s: &mut Script, option: u32, reply: u32, data: &Script) {
    s.u64(proto::OPTION_REPLY_MAGIC)
        .u32(option)
        .u32(reply)
        .sized(4, data);
}

fn chunk(s: &mut Script, kind: Kind, flags: u16, chunk_type: u16, cookie: u64, payload: &Script) {
    if kind == Kind::Extended {
        s.u32(proto::EXT_REPLY_MAGIC)
            .u16(flags)
            .u16(chunk_type)
            .u64(cookie)
            .u64(0)
            .sized(8, payload);
    } else {
        s.u32(proto::STRUCTURED_REPLY_MAGIC)
            .u16(flags)
            .u16(chunk_type)
            .u64(cookie)
            .sized(4, payload);
    }
}

/// The server side of: connect, read(0, 4096), block_status(0, 1 GiB)
/// when structured, read(8192, 4096) answered with EIO.
fn server_script(kind: Kind) -> Script {
    let mut s = Script::default();
    let no_zeroes = kind != Kind::ExportName;
    s.u64(proto::NBDMAGIC)
        .u64(proto::IHAVEOPT)
        .u16(proto::FLAG_FIXED_NEWSTYLE | if no_zeroes { proto::FLAG_NO_ZEROES } else { 0 });
    let empty = Script::default();
    let (ext, structured) = match kind {
        Kind::Extended => (proto::REP_ACK, proto::REP_ACK),
        Kind::Structured => (proto::REP_ERR_UNSUP, proto::REP_ACK),
        _ => (proto::REP_ERR_UNSUP, proto::REP_ERR_UNSUP),
    };
    option_reply(&mut s, proto::OPT_EXTENDED_HEADERS, ext, &empty);
    if kind != Kind::Extended {
        option_reply(&mut s, proto::OPT_STRUCTURED_REPLY, structured, &empty);
    }
    let is_structured = matches!(kind, Kind::Extended | Kind::Structured);
    if is_structured {
        let mut ctx = Script::default();
        ctx.u32(CONTEXT).raw(proto::BASE_ALLOCATION.as_bytes());
        option_reply(
            &mut s,
            proto::OPT_SET_META_CONTEXT,
            proto::REP_META_CONTEXT,
            &ctx,
        );
        option_reply(&mut s, proto::OPT_SET_META_CONTEXT, proto::REP_ACK, &empty);
    }
    if kind == Kind::ExportName {
        let mut msg = Script::default();
        msg.raw(b"use NBD_OPT_EXPORT_NAME");
        option_reply(&mut s, proto::OPT_GO, proto::REP_ERR_UNSUP, &msg);
        s.u64(SIZE)
            .u16(proto::TFLAG_HAS_FLAGS | proto::TFLAG_READ_ONLY);
        s.raw(&[0; proto::EXPORT_NAME_PADDING]);
    } else {
        let mut info = Script::default();
        info.u16(proto::INFO_EXPORT)
            .len(8, SIZE)
            .u16(proto::TFLAG_HAS_FLAGS | proto::TFLAG_READ_ONLY);
        option_reply(&mut s, proto::OPT_GO, proto::REP_INFO, &info);
        let mut sizes = Script::default();
        sizes
            .u16(proto::INFO_BLOCK_SIZE)
            .len(4, 1)
            .len(4, 4096)
            .len(4, u64::from(proto::DEFAULT_MAX_PAYLOAD));
        option_reply(&mut s, proto::OPT_GO, proto::REP_INFO, &sizes);
        option_reply(&mut s, proto::OPT_GO, proto::REP_ACK, &empty);
    }
    s.mark();

    // Cookie 1: read(0, 4096).
    if is_structured {
        let mut data = Script::default();
        data.u64(0).raw(&[0xab; 2048]);
        chunk(&mut s, kind, 0, proto::CHUNK_OFFSET_DATA, 1, &data);
        let mut hole = Script::default();
        hole.u64(2048).len(4, 2048);
        chunk(&mut s, kind, 0, proto::CHUNK_OFFSET_HOLE, 1, &hole);
        chunk(
            &mut s,
            kind,
            proto::REPLY_FLAG_DONE,
            proto::CHUNK_NONE,
            1,
            &empty,
        );
    } else {
        s.u32(proto::SIMPLE_REPLY_MAGIC).u32(0).u64(1);
        s.raw(&[0xab; 2048]).raw(&[0; 2048]);
    }
    s.mark();
    // Cookie 2: block_status(0, 1 GiB), two extents.
    let error_cookie = if is_structured {
        let mut status = Script::default();
        status.u32(CONTEXT);
        if kind == Kind::Extended {
            status.len(4, 2);
            status.len(8, STATUS_LEN / 4).u64(0);
            status.len(8, STATUS_LEN * 3 / 4).u64(3);
            chunk(
                &mut s,
                kind,
                proto::REPLY_FLAG_DONE,
                proto::CHUNK_BLOCK_STATUS_EXT,
                2,
                &status,
            );
        } else {
            status.len(4, STATUS_LEN / 4).u32(0);
            status.len(4, STATUS_LEN * 3 / 4).u32(3);
            chunk(
                &mut s,
                kind,
                proto::REPLY_FLAG_DONE,
                proto::CHUNK_BLOCK_STATUS,
                2,
                &status,
            );
        }
        s.mark();
        3
    } else {
        2
    };
    // Then read(8192, 4096) fails with EIO.
    if is_structured {
        let mut err = Script::default();
        err.u32(proto::EIO).len(2, 9).raw(b"disk gone");
        chunk(
            &mut s,
            kind,
            proto::REPLY_FLAG_DONE,
            proto::CHUNK_ERROR,
            error_cookie,
            &err,
        );
    } else {
        s.u32(proto::SIMPLE_REPLY_MAGIC)
            .u32(proto::EIO)
            .u64(error_cookie);
    }
    s
}

/// What the client made of one session.
#[derive(Debug)]
struct Session {
    connected: Result<(), Error>,
    first_read: Option<Result<Vec<u8>, Error>>,
    status: Option<Result<Vec<StatusExtent>, Error>>,
    failing_read: Option<Result<usize, Error>>,
}

/// Reads the client's side of the handshake, up to the option that ends
/// it.
async fn client_options<R: AsyncRead + Unpin>(r: &mut R, last: u32) -> std::io::Result<()> {
    r.read_u32().await?;
    loop {
        let mut head = [0u8; 16];
        r.read_exact(&mut head).await?;
        let option = u32::from_be_bytes([head[8], head[9], head[10], head[11]]);
        let len = u32::from_be_bytes([head[12], head[13], head[14], head[15]]);
        tokio::io::copy(&mut (&mut *r).take(u64::from(len)), &mut tokio::io::sink()).await?;
        if option == last || option == proto::OPT_ABORT {
            return Ok(());
        }
    }
}

/// Waits for the client, for at most `patience` if given.
async fn patiently(
    patience: Option<Duration>,
    f: impl Future<Output = std::io::Result<()>>,
) -> std::io::Result<()> {
    match patience {
        None => f.await,
        Some(d) => tokio::time::timeout(d, f).await.unwrap_or(Ok(())),
    }
}

/// Serves the segments of a server script to every connection on a unix
/// socket: the handshake at once, then each later segment after one
/// request, then closes the sending side. With `patience`, a client that
/// stays silent that long (waiting for bytes a mutation removed) is
/// answered anyway, so a mutated case does not sit out the client's
/// timeouts.
async fn play(
    dir: &Path,
    kind: Kind,
    segments: Vec<Vec<u8>>,
    patience: Option<Duration>,
) -> std::path::PathBuf {
    let path = dir.join("nbd.sock");
    let listener = UnixListener::bind(&path).expect("bind a unix socket");
    let (last, request_len) = match kind {
        Kind::ExportName => (proto::OPT_EXPORT_NAME, proto::REQUEST_LEN),
        Kind::Extended => (proto::OPT_GO, proto::EXT_REQUEST_LEN),
        _ => (proto::OPT_GO, proto::REQUEST_LEN),
    };
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let segments = segments.clone();
            tokio::spawn(async move {
                let (mut r, mut w) = stream.into_split();
                let mut segments = segments.into_iter();
                let handshake = segments.next().unwrap_or_default();
                let paced = async {
                    w.write_all(&handshake).await?;
                    patiently(patience, client_options(&mut r, last)).await?;
                    let mut request = vec![0u8; request_len];
                    for segment in segments {
                        patiently(patience, async {
                            r.read_exact(&mut request).await.map(drop)
                        })
                        .await?;
                        w.write_all(&segment).await?;
                    }
                    std::io::Result::Ok(())
                };
                let _ = paced.await;
                let _ = w.shutdown().await;
                let _ = tokio::io::copy(&mut r, &mut tokio::io::sink()).await;
            });
        }
    });
    path
}

fn options(path: &Path) -> ConnectOptions {
    let mut o = ConnectOptions::unix(path, "")
        .with_meta_context("base:allocation")
        .with_request_timeout(Some(Duration::from_secs(5)))
        .with_retries(0, Duration::from_millis(1));
    o.connect_timeout = Duration::from_secs(5);
    o
}

/// One session of the client against a server sending `segments`.
async fn session(kind: Kind, segments: Vec<Vec<u8>>, patience: Option<Duration>) -> Session {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = play(dir.path(), kind, segments, patience).await;
    let mut out = Session {
        connected: Ok(()),
        first_read: None,
        status: None,
        failing_read: None,
    };
    let client = match Client::connect(&options(&path)).await {
        Ok(c) => c,
        Err(e) => {
            out.connected = Err(e);
            return out;
        }
    };
    out.first_read = Some(client.read(0, 4096).await.map(|b| b.to_vec()));
    if client.structured_replies() {
        out.status = Some(client.block_status("base:allocation", 0, STATUS_LEN).await);
    }
    out.failing_read = Some(client.read(8192, 4096).await.map(|b| b.len()));
    client.disconnect().await;
    out
}

/// Plays `bytes`, paced at the marks of `script`, on a fresh runtime
/// with the case watched, and checks what any client may promise
/// whatever the server sent.
fn check(kind: Kind, script: &Script, bytes: &[u8]) -> Result<Session, TestCaseError> {
    check_paced(kind, script, bytes, Some(Duration::from_millis(50)))
}

/// [`check`], waiting for every request however long it takes.
fn check_patient(kind: Kind, script: &Script) -> Session {
    check_paced(kind, script, &script.bytes, None).unwrap_or_else(|e| panic!("{kind:?}: {e}"))
}

fn check_paced(
    kind: Kind,
    script: &Script,
    bytes: &[u8],
    patience: Option<Duration>,
) -> Result<Session, TestCaseError> {
    let segments = script.segments(bytes);
    let (out, watched) = watch(|| {
        runtime().block_on(async {
            tokio::time::timeout(DEADLINE, session(kind, segments, patience)).await
        })
    });
    prop_assert_eq!(watched.panics, 0, "a panic while talking to the server");
    prop_assert!(
        watched.largest_alloc <= ALLOC_LIMIT,
        "allocated {} bytes at once (limit {})",
        watched.largest_alloc,
        ALLOC_LIMIT
    );
    let Ok(out) = out else {
        return Err(TestCaseError::fail(format!(
            "the session hung for {DEADLINE:?}"
        )));
    };
    if let Some(Ok(data)) = &out.first_read {
        prop_assert_eq!(data.len(), 4096);
    }
    if let Some(Ok(data)) = &out.failing_read {
        prop_assert_eq!(*data, 4096);
    }
    if let Some(Ok(extents)) = &out.status {
        // Consecutive, non-empty, exactly covering the range asked for.
        let mut at = 0;
        for e in extents {
            prop_assert_eq!(e.offset, at);
            prop_assert!(e.length > 0);
            at += e.length;
        }
        prop_assert_eq!(at, STATUS_LEN);
    }
    Ok(out)
}

#[test]
fn recorded_sessions_are_valid() {
    for kind in KINDS {
        let out = check_patient(kind, &server_script(kind));
        assert!(out.connected.is_ok(), "{kind:?}: {:?}", out.connected);
        let mut expected = vec![0xab; 2048];
        expected.resize(4096, 0);
        match &out.first_read {
            Some(Ok(d)) => assert_eq!(*d, expected, "{kind:?}"),
            other => panic!("{kind:?}: first read gave {other:?}"),
        }
        if matches!(kind, Kind::Extended | Kind::Structured) {
            let extents = out.status.as_ref().and_then(|s| s.as_ref().ok());
            assert_eq!(
                extents.map(Vec::as_slice),
                Some(
                    &[
                        StatusExtent {
                            offset: 0,
                            length: STATUS_LEN / 4,
                            flags: 0
                        },
                        StatusExtent {
                            offset: STATUS_LEN / 4,
                            length: STATUS_LEN * 3 / 4,
                            flags: 3
                        }
                    ][..]
                ),
                "{kind:?}: {:?}",
                out.status
            );
        }
        match &out.failing_read {
            Some(Err(e)) => assert_eq!(e.server_errno(), Some(proto::EIO), "{kind:?}: {e}"),
            other => panic!("{kind:?}: failing read gave {other:?}"),
        }
    }
}

/// A structured-reply header for `cookie` claiming `length` bytes of
/// `chunk_type`, after a valid compact handshake; then nothing.
fn claim(chunk_type: u16, cookie: u64, length: u32) -> Script {
    let mut s = server_script(Kind::Structured);
    // Keep the handshake only.
    s.bytes.truncate(s.marks[0]);
    s.marks.truncate(1);
    s.lengths.clear();
    // Cookie 1 (the first read) is answered in full so the second request
    // is the one the claim is made for.
    let mut reply = Script::default();
    let mut data = Script::default();
    data.u64(0).raw(&[1; 4096]);
    chunk(
        &mut reply,
        Kind::Structured,
        proto::REPLY_FLAG_DONE,
        proto::CHUNK_OFFSET_DATA,
        1,
        &data,
    );
    s.append(&reply).mark();
    s.u32(proto::STRUCTURED_REPLY_MAGIC)
        .u16(proto::REPLY_FLAG_DONE)
        .u16(chunk_type)
        .u64(cookie)
        .u32(length);
    s.raw(b"only a few bytes follow");
    s
}

/// Regression: an OFFSET_DATA chunk claiming 1 GiB in reply to a
/// block-status request made the client allocate the whole claim before
/// reading a byte (the limit for data chunks was the request length, and
/// a block-status request covers gigabytes).
#[test]
fn data_chunk_claimed_for_block_status_allocates_nothing() {
    let out = check_patient(
        Kind::Structured,
        &claim(proto::CHUNK_OFFSET_DATA, 2, (1 << 30) + 8),
    );
    match out.status {
        Some(Err(Error::Protocol { what, .. })) => {
            assert!(what.contains("reads nothing"), "{what}")
        }
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

/// Regression: a block-status chunk claiming 16 MiB was allocated in full
/// before its bytes arrived.
#[test]
fn status_chunk_claim_costs_only_what_arrives() {
    let out = check_patient(
        Kind::Structured,
        &claim(proto::CHUNK_BLOCK_STATUS, 2, 16 << 20),
    );
    assert!(
        matches!(out.status, Some(Err(Error::Io { .. }))),
        "{:?}",
        out.status
    );
}

/// A server selecting meta context after meta context: refused past 256
/// instead of collecting them until the handshake times out.
#[test]
fn endless_meta_contexts_are_refused() {
    let mut s = Script::default();
    s.u64(proto::NBDMAGIC)
        .u64(proto::IHAVEOPT)
        .u16(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
    let empty = Script::default();
    option_reply(
        &mut s,
        proto::OPT_EXTENDED_HEADERS,
        proto::REP_ERR_UNSUP,
        &empty,
    );
    option_reply(&mut s, proto::OPT_STRUCTURED_REPLY, proto::REP_ACK, &empty);
    for i in 0..300 {
        let mut ctx = Script::default();
        ctx.u32(i).raw(proto::BASE_ALLOCATION.as_bytes());
        option_reply(
            &mut s,
            proto::OPT_SET_META_CONTEXT,
            proto::REP_META_CONTEXT,
            &ctx,
        );
    }
    let out = check_patient(Kind::Structured, &s);
    match out.connected {
        Err(Error::Handshake { what, .. }) => {
            assert!(what.contains("more than 256 meta contexts"), "{what}")
        }
        other => panic!("expected a handshake error, got {other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// A valid session with one to four mutations.
    #[test]
    fn mutated_server_sessions(kind in prop::sample::select(&KINDS[..]), m in mutations()) {
        let script = server_script(kind);
        check(kind, &script, &apply(&script, &m))?;
    }

    /// Random bytes, alone or after a valid greeting.
    #[test]
    fn random_server_bytes(
        greeting in any::<bool>(),
        noise in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut bytes = Vec::new();
        if greeting {
            bytes.extend_from_slice(&server_script(Kind::Extended).bytes[..18]);
        }
        bytes.extend_from_slice(&noise);
        check(Kind::Extended, &Script::default(), &bytes)?;
    }

    /// Pure decoders on mutated valid chunks, any type.
    #[test]
    fn chunk_decoder(kind in any::<u16>(), body in prop::collection::vec(any::<u8>(), 0..64), m in mutations()) {
        let mut s = Script::default();
        s.u32(CONTEXT).len(4, 1).len(8, 4096).u64(0).raw(&body);
        let bytes = apply(&s, &m);
        let _ = proto::decode_chunk(kind, bytes::Bytes::from(bytes.clone()));
        let _ = proto::decode_reply_header(&bytes);
        let _ = Request::decode_compact(&bytes);
    }
}
