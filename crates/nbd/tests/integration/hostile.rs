//! Hostile servers: in-test TCP servers that negotiate correctly and then
//! lie. Every lie must give a typed error, never a panic or wrong data.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use cbtvault_nbd::proto::{self, Request};
use cbtvault_nbd::{Client, ConnectOptions, Error};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SIZE: u64 = 1 << 20;
const CONTEXT: u32 = 5;

/// What the fake server does with a request: bytes to send, then whether
/// to hang up.
type Script = Arc<dyn Fn(&Request) -> (Vec<u8>, bool) + Send + Sync>;

async fn handshake(s: &mut TcpStream) -> std::io::Result<()> {
    let mut b = BytesMut::new();
    b.put_u64(proto::NBDMAGIC);
    b.put_u64(proto::IHAVEOPT);
    b.put_u16(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
    s.write_all(&b).await?;
    s.read_u32().await?;
    loop {
        let _magic = s.read_u64().await?;
        let opt = s.read_u32().await?;
        let len = s.read_u32().await?;
        let mut data = vec![0; len as usize];
        s.read_exact(&mut data).await?;
        let mut b = BytesMut::new();
        match opt {
            proto::OPT_STRUCTURED_REPLY => {
                proto::put_option_reply(&mut b, opt, proto::REP_ACK, &[])
            }
            proto::OPT_SET_META_CONTEXT => {
                let mut d = BytesMut::new();
                d.put_u32(CONTEXT);
                d.put_slice(b"base:allocation");
                proto::put_option_reply(&mut b, opt, proto::REP_META_CONTEXT, &d);
                proto::put_option_reply(&mut b, opt, proto::REP_ACK, &[]);
            }
            proto::OPT_GO => {
                let mut d = BytesMut::new();
                d.put_u16(proto::INFO_EXPORT);
                d.put_u64(SIZE);
                d.put_u16(proto::TFLAG_HAS_FLAGS | proto::TFLAG_READ_ONLY);
                proto::put_option_reply(&mut b, opt, proto::REP_INFO, &d);
                proto::put_option_reply(&mut b, opt, proto::REP_ACK, &[]);
                s.write_all(&b).await?;
                return Ok(());
            }
            _ => proto::put_option_reply(&mut b, opt, proto::REP_ERR_UNSUP, &[]),
        }
        s.write_all(&b).await?;
    }
}

async fn fake_server(script: Script) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let script = script.clone();
            tokio::spawn(async move {
                if handshake(&mut s).await.is_err() {
                    return;
                }
                let mut head = [0u8; proto::REQUEST_LEN];
                while s.read_exact(&mut head).await.is_ok() {
                    let Ok(req) = Request::decode_compact(&head) else {
                        return;
                    };
                    if req.kind == proto::CMD_DISC {
                        return;
                    }
                    let (bytes, hang_up) = script(&req);
                    if s.write_all(&bytes).await.is_err() || hang_up {
                        return;
                    }
                }
            });
        }
    });
    port
}

fn opts(port: u16) -> ConnectOptions {
    let mut o = ConnectOptions::tcp("127.0.0.1", port, "")
        .with_meta_context("base:allocation")
        .with_request_timeout(Some(Duration::from_secs(5)));
    o.retries = 0;
    o
}

fn data_chunk(cookie: u64, flags: u16, offset: u64, len: usize) -> Vec<u8> {
    let mut b = BytesMut::new();
    proto::put_chunk_header(
        &mut b,
        flags,
        proto::CHUNK_OFFSET_DATA,
        cookie,
        8 + len as u32,
    );
    b.put_u64(offset);
    b.put_bytes(0x5a, len);
    b.to_vec()
}

const DONE: u16 = proto::REPLY_FLAG_DONE;

async fn read_error(script: Script) -> Error {
    let port = fake_server(script).await;
    let client = Client::connect(&opts(port)).await.unwrap();
    let err = client
        .read(4096, 8192)
        .await
        .expect_err("a lying server must not produce data");
    // The connection is written off; the next request fails cleanly too.
    assert!(client.read(0, 512).await.is_err());
    err
}

fn assert_protocol(e: &Error, needle: &str) {
    match e {
        Error::Protocol { what, .. } => assert!(what.contains(needle), "{what:?} lacks {needle:?}"),
        other => panic!("expected a protocol error about {needle:?}, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_reply_magic() {
    let e = read_error(Arc::new(|_| {
        (
            vec![0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            false,
        )
    }))
    .await;
    assert_protocol(&e, "bad reply magic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_cookie() {
    let e = read_error(Arc::new(|r| {
        let mut b = BytesMut::new();
        proto::put_chunk_header(&mut b, DONE, proto::CHUNK_NONE, r.cookie + 99, 0);
        (b.to_vec(), false)
    }))
    .await;
    assert_protocol(&e, "unknown cookie");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_outside_the_request() {
    let e = read_error(Arc::new(|r| {
        (data_chunk(r.cookie, DONE, r.offset + r.length, 512), false)
    }))
    .await;
    assert_protocol(&e, "outside the request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_data_than_asked() {
    let e = read_error(Arc::new(|r| {
        (
            data_chunk(r.cookie, DONE, r.offset, r.length as usize + 512),
            false,
        )
    }))
    .await;
    assert_protocol(&e, "at most");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_that_ends_short() {
    let e = read_error(Arc::new(|r| {
        (
            data_chunk(r.cookie, DONE, r.offset, r.length as usize / 2),
            false,
        )
    }))
    .await;
    assert_protocol(&e, "ended after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_chunks() {
    let e = read_error(Arc::new(|r| {
        let mut v = data_chunk(r.cookie, 0, r.offset, r.length as usize / 2);
        v.extend(data_chunk(
            r.cookie,
            DONE,
            r.offset + 512,
            r.length as usize / 2,
        ));
        (v, false)
    }))
    .await;
    assert_protocol(&e, "overlaps");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_reply_to_a_structured_read() {
    let e = read_error(Arc::new(|r| {
        let mut b = BytesMut::new();
        proto::put_simple_reply(&mut b, 0, r.cookie);
        b.put_bytes(0, r.length as usize);
        (b.to_vec(), false)
    }))
    .await;
    assert_protocol(&e, "simple reply");
}

/// One-byte chunks at every other byte: more separate pieces than one
/// per 512 bytes of the request is refused before the map of covered
/// ranges grows with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scattered_read_reply() {
    let e = read_error(Arc::new(|r| {
        let v = (0..r.length / 2)
            .flat_map(|i| data_chunk(r.cookie, 0, r.offset + 2 * i, 1))
            .collect();
        (v, false)
    }))
    .await;
    assert_protocol(&e, "scattered into more than 17 separate pieces");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_reply_then_reset() {
    let e = read_error(Arc::new(|r| {
        let mut v = data_chunk(r.cookie, DONE, r.offset, r.length as usize);
        v.truncate(100);
        (v, true)
    }))
    .await;
    assert!(matches!(e, Error::Io { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reply_times_out() {
    let port = fake_server(Arc::new(|_| (Vec::new(), false))).await;
    let o = opts(port).with_request_timeout(Some(Duration::from_millis(300)));
    let client = Client::connect(&o).await.unwrap();
    let e = client.read(0, 4096).await.unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_block_status() {
    let zero_len: Script = Arc::new(|r| {
        let mut b = BytesMut::new();
        proto::put_chunk_header(&mut b, DONE, proto::CHUNK_BLOCK_STATUS, r.cookie, 12);
        b.put_u32(CONTEXT);
        b.put_u32(0);
        b.put_u32(0);
        (b.to_vec(), false)
    });
    let wrong_context: Script = Arc::new(|r| {
        let mut b = BytesMut::new();
        proto::put_chunk_header(&mut b, DONE, proto::CHUNK_BLOCK_STATUS, r.cookie, 12);
        b.put_u32(CONTEXT + 1);
        b.put_u32(4096);
        b.put_u32(0);
        (b.to_vec(), false)
    });
    for (script, needle) in [(zero_len, "length 0"), (wrong_context, "no extents")] {
        let port = fake_server(script).await;
        let client = Client::connect(&opts(port)).await.unwrap();
        let e = client
            .block_status("base:allocation", 0, SIZE)
            .await
            .unwrap_err();
        assert_protocol(&e, needle);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_greeting() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        if let Ok((mut s, _)) = l.accept().await {
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await;
        }
    });
    let e = Client::connect(&opts(port)).await.unwrap_err();
    assert!(matches!(e, Error::Handshake { .. }), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random bytes as the reply (sometimes after a valid header for the
    /// right cookie): an error or exactly the right length, never a panic.
    #[test]
    fn random_replies_never_panic(noise in proptest::collection::vec(any::<u8>(), 0..300), header in 0u8..3) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let script: Script = Arc::new(move |r| {
                let mut b = BytesMut::new();
                match header {
                    0 => {}
                    1 => proto::put_chunk_header(&mut b, DONE, proto::CHUNK_OFFSET_DATA, r.cookie, noise.len() as u32),
                    _ => b.put_u32(proto::STRUCTURED_REPLY_MAGIC),
                }
                b.put_slice(&noise);
                (b.to_vec(), true)
            });
            let port = fake_server(script).await;
            let client = Client::connect(&opts(port).with_request_timeout(Some(Duration::from_secs(2)))).await.unwrap();
            if let Ok(d) = client.read(0, 8192).await {
                assert_eq!(d.len(), 8192);
            }
        });
    }
}
