//! The server against a hostile client: a recorded, valid client side of a
//! session (flags, LIST, STRUCTURED_REPLY, LIST/SET_META_CONTEXT, INFO,
//! GO or EXPORT_NAME, then READ, WRITE, BLOCK_STATUS, WRITE_ZEROES,
//! FLUSH, an unknown command and DISC), mutated or replaced by random
//! bytes, is fed to [`Server::serve_stream`] through an in-memory duplex
//! stream. The server must end the session with Ok or a typed error,
//! within a deadline, without a panic and without any allocation beyond
//! the limit.

use std::sync::Arc;
use std::time::Duration;

use cbtvault_nbd::proto;
use cbtvault_nbd::server::{MemoryExport, Mode, Server, ServerConfig};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::fuzz::ALLOC_LIMIT;
use super::mutate::{Script, apply, mutations};
use super::watch::{runtime, watch};

const EXPORT_SIZE: usize = 1 << 20;
const DEADLINE: Duration = Duration::from_secs(20);

fn option(s: &mut Script, option: u32, data: &Script) {
    s.u64(proto::IHAVEOPT).u32(option).sized(4, data);
}

fn request(s: &mut Script, kind: u16, cookie: u64, offset: u64, length: u32) {
    s.u32(proto::REQUEST_MAGIC)
        .u16(0)
        .u16(kind)
        .u64(cookie)
        .u64(offset)
        .len(4, u64::from(length));
}

/// Meta-context request data: export "" and the queries.
fn meta(queries: &[&str]) -> Script {
    let mut d = Script::default();
    d.string(b"").len(4, queries.len() as u64);
    for q in queries {
        d.string(q.as_bytes());
    }
    d
}

/// The client side of a whole session; `minimal` speaks to a server in
/// xapi-nbd mode (EXPORT_NAME, simple replies).
fn client_script(minimal: bool) -> Script {
    let mut s = Script::default();
    let empty = Script::default();
    if minimal {
        s.u32(proto::CLIENT_FIXED_NEWSTYLE);
        option(&mut s, proto::OPT_LIST, &empty);
        let mut name = Script::default();
        name.raw(b"");
        option(&mut s, proto::OPT_EXPORT_NAME, &name);
    } else {
        s.u32(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES);
        option(&mut s, proto::OPT_LIST, &empty);
        option(&mut s, proto::OPT_STRUCTURED_REPLY, &empty);
        option(&mut s, proto::OPT_LIST_META_CONTEXT, &meta(&["base:"]));
        option(
            &mut s,
            proto::OPT_SET_META_CONTEXT,
            &meta(&["base:allocation"]),
        );
        for (opt, info) in [
            (proto::OPT_INFO, proto::INFO_NAME),
            (proto::OPT_GO, proto::INFO_BLOCK_SIZE),
        ] {
            let mut d = Script::default();
            d.string(b"").len(2, 1).u16(info);
            option(&mut s, opt, &d);
        }
    }
    request(&mut s, proto::CMD_READ, 1, 0, 4096);
    request(&mut s, proto::CMD_WRITE, 2, 4096, 512);
    s.raw(&[0x5a; 512]);
    request(&mut s, proto::CMD_BLOCK_STATUS, 3, 0, EXPORT_SIZE as u32);
    request(&mut s, proto::CMD_WRITE_ZEROES, 4, 8192, 8192);
    request(&mut s, proto::CMD_FLUSH, 5, 0, 0);
    request(&mut s, 77, 6, 0, 0);
    request(&mut s, proto::CMD_READ, 7, EXPORT_SIZE as u64 - 512, 512);
    request(&mut s, proto::CMD_DISC, 8, 0, 0);
    s
}

/// How the session ended, and the export's contents after it.
type Outcome = (Result<(), cbtvault_nbd::Error>, Vec<u8>);

async fn session(minimal: bool, bytes: Vec<u8>) -> Outcome {
    let mut config = ServerConfig::default();
    config.handshake_timeout = Duration::from_secs(5);
    if minimal {
        config.mode = Mode::Minimal;
    }
    let server = Server::new(config);
    let export = Arc::new(MemoryExport::writable(vec![0; EXPORT_SIZE]));
    server.add_export("", export.clone());
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let (mut r, mut w) = tokio::io::split(theirs);
    let client = async move {
        let _ = w.write_all(&bytes).await;
        let _ = w.shutdown().await;
        // Keep the write half open until the server is done with us.
        w
    };
    let drain = async move {
        let mut buf = vec![0u8; 64 * 1024];
        while matches!(r.read(&mut buf).await, Ok(n) if n > 0) {}
    };
    let serve = server.serve_stream(ours, "fuzz client", CancellationToken::new());
    let (result, _, _) = tokio::join!(serve, client, drain);
    (result, export.contents())
}

fn check(minimal: bool, bytes: Vec<u8>) -> Result<Outcome, TestCaseError> {
    let (out, watched) = watch(|| {
        runtime().block_on(async { tokio::time::timeout(DEADLINE, session(minimal, bytes)).await })
    });
    prop_assert_eq!(watched.panics, 0, "a panic while serving the client");
    prop_assert!(
        watched.largest_alloc <= ALLOC_LIMIT,
        "allocated {} bytes at once (limit {})",
        watched.largest_alloc,
        ALLOC_LIMIT
    );
    out.map_err(|_| TestCaseError::fail(format!("the session hung for {DEADLINE:?}")))
}

#[test]
fn recorded_client_sessions_are_valid() {
    let (result, contents) = check(false, client_script(false).bytes).unwrap();
    result.unwrap();
    assert_eq!(contents[4096..4608], [0x5a; 512]);
    // Minimal mode is read-only: the session ends at the refused write.
    let (result, contents) = check(true, client_script(true).bytes).unwrap();
    result.unwrap();
    assert!(contents.iter().all(|&b| b == 0));
}

/// Regression: a WRITE header claiming 32 MiB made the server allocate
/// all of it before a byte of data arrived.
#[test]
fn write_claim_costs_only_what_arrives() {
    let mut s = client_script(false);
    let at = s
        .bytes
        .windows(4)
        .position(|w| w == proto::REQUEST_MAGIC.to_be_bytes())
        .expect("a request");
    s.bytes.truncate(at);
    request(&mut s, proto::CMD_WRITE, 1, 0, proto::DEFAULT_MAX_PAYLOAD);
    s.raw(b"a few bytes, then the client goes");
    let (result, _) = check(false, s.bytes).unwrap();
    assert!(
        matches!(result, Err(cbtvault_nbd::Error::Io { .. })),
        "{result:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn mutated_client_sessions(minimal in any::<bool>(), m in mutations()) {
        let _ = check(minimal, apply(&client_script(minimal), &m))?;
    }

    /// Random bytes, alone or after valid client flags.
    #[test]
    fn random_client_bytes(
        minimal in any::<bool>(),
        flags in any::<bool>(),
        noise in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut bytes = Vec::new();
        if flags {
            bytes.extend_from_slice(&client_script(minimal).bytes[..4]);
        }
        bytes.extend_from_slice(&noise);
        let _ = check(minimal, bytes)?;
    }
}
