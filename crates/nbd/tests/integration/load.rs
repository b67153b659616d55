//! Our server under hostile clients beside a well-behaved one: clients
//! that pipeline reads and never read the replies, idle clients after the
//! handshake, silent sockets before it, and connect floods. The server's
//! memory is measured as the reply bytes its export handed out that are
//! still alive; the well-behaved client must read everything right.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use cbtvault_nbd::proto::{self, Request};
use cbtvault_nbd::server::{Export, Server, ServerConfig};
use cbtvault_nbd::{BoxError, Client, ConnectOptions};
use futures::future::BoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

use super::common;

const MIB: usize = 1 << 20;
/// Everything a test may wait for; only a hang reaches it.
const PATIENCE: Duration = Duration::from_secs(60);

/// An export whose reads are counted, with the bytes of replies still
/// alive anywhere (queued, being written) and their peak.
struct Counted {
    data: Arc<Vec<u8>>,
    reads: AtomicUsize,
    live: Arc<AtomicU64>,
    peak: Arc<AtomicU64>,
}

struct Tracked {
    data: Vec<u8>,
    live: Arc<AtomicU64>,
}

impl AsRef<[u8]> for Tracked {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.live
            .fetch_sub(self.data.len() as u64, Ordering::SeqCst);
    }
}

impl Counted {
    fn new(data: Vec<u8>) -> Arc<Counted> {
        Arc::new(Counted {
            data: Arc::new(data),
            reads: AtomicUsize::new(0),
            live: Arc::new(AtomicU64::new(0)),
            peak: Arc::new(AtomicU64::new(0)),
        })
    }
}

impl Export for Counted {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, BoxError>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let data = self.data[offset as usize..offset as usize + len as usize].to_vec();
        let now = self.live.fetch_add(u64::from(len), Ordering::SeqCst) + u64::from(len);
        self.peak.fetch_max(now, Ordering::SeqCst);
        let owner = Tracked {
            data,
            live: self.live.clone(),
        };
        Box::pin(async move { Ok(Bytes::from_owner(owner)) })
    }
}

async fn start(config: ServerConfig, export: Arc<dyn Export>) -> (SocketAddr, CancellationToken) {
    let server = Server::new(config);
    server.add_export("", export);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move { server.serve_tcp(listener, token).await });
    (addr, stop)
}

/// A TCP connection from loopback address `from` (127.0.0.x), so that
/// tests can play several peers.
async fn connect_from(from: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::from((from, 0)))?;
    s.connect(to).await
}

/// Negotiates by hand up to the transmission phase (simple replies).
async fn handshake(s: &mut TcpStream) -> std::io::Result<()> {
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await?;
    s.write_u32(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES)
        .await?;
    let mut go = BytesMut::new();
    proto::put_string(&mut go, "");
    go.put_u16(0);
    let mut b = BytesMut::new();
    proto::put_option(&mut b, proto::OPT_GO, &go);
    s.write_all(&b).await?;
    loop {
        let mut head = [0u8; 20];
        s.read_exact(&mut head).await?;
        let kind = u32::from_be_bytes([head[12], head[13], head[14], head[15]]);
        let len = u32::from_be_bytes([head[16], head[17], head[18], head[19]]);
        let mut data = vec![0u8; len.min(4096) as usize];
        s.read_exact(&mut data).await?;
        if kind == proto::REP_ACK {
            return Ok(());
        }
        if kind & proto::REP_ERR_BIT != 0 {
            return Err(std::io::Error::other("GO refused"));
        }
    }
}

/// Whether the server closed `s` (EOF or reset) within the patience.
async fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut sink = [0u8; 64 * 1024];
    tokio::time::timeout(PATIENCE, async {
        loop {
            match s.read(&mut sink).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
    })
    .await
    .unwrap_or(false)
}

fn reads(n: usize, len: u32, size: u64) -> Vec<u8> {
    let mut b = BytesMut::new();
    for i in 0..n as u64 {
        let r = Request {
            flags: 0,
            kind: proto::CMD_READ,
            cookie: i,
            offset: (i * u64::from(len)) % (size - u64::from(len) + 1),
            length: u64::from(len),
        };
        r.encode(false, &mut b);
    }
    b.to_vec()
}

/// The well-behaved reader: the whole export through our client.
async fn read_all(addr: SocketAddr, want: &[u8]) {
    let mut o = ConnectOptions::tcp("127.0.0.1", addr.port(), "")
        .with_request_timeout(Some(PATIENCE))
        .with_retries(3, Duration::from_millis(100));
    o.connect_timeout = Duration::from_secs(10);
    let client = tokio::time::timeout(PATIENCE, Client::connect(&o))
        .await
        .expect("connects in time")
        .expect("the well-behaved client gets in");
    let got = tokio::time::timeout(PATIENCE, client.read(0, want.len()))
        .await
        .expect("reads in time")
        .expect("the well-behaved client reads");
    assert!(
        got[..] == want[..],
        "the well-behaved client read wrong data"
    );
    client.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_replies_hold_bounded_memory() {
    let data = common::pattern(64 * MIB, 9);
    let export = Counted::new(data.clone());
    let mut config = ServerConfig::default();
    config.max_payload = 4 * MIB as u32;
    config.connection_bytes = 8 * MIB as u32;
    config.total_bytes = 48 * MIB as u32;
    let budget = u64::from(config.total_bytes);
    let (addr, stop) = start(config, export.clone()).await;

    // Eight clients pipeline 500 reads of 4 MiB each (14 KB of requests)
    // and never read a reply.
    let pipelined = reads(500, 4 * MIB as u32, data.len() as u64);
    let mut hostile = Vec::new();
    for _ in 0..8 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        handshake(&mut s).await.unwrap();
        s.write_all(&pipelined).await.unwrap();
        hostile.push(s);
    }
    read_all(addr, &data).await;
    assert!(
        export.peak.load(Ordering::SeqCst) <= budget,
        "replies alive at once: {} bytes, budget {budget}",
        export.peak.load(Ordering::SeqCst)
    );

    // When they go, what they queued goes too, and nothing more is read
    // for them: far fewer than the 4,000 reads they asked for.
    drop(hostile);
    let drained = tokio::time::timeout(PATIENCE, async {
        while export.live.load(Ordering::SeqCst) != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(drained.is_ok(), "replies for gone clients are dropped");
    let served = export.reads.load(Ordering::SeqCst);
    assert!(
        served < 400,
        "{served} reads served, mostly for gone clients"
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_silent_clients_and_floods_do_not_lock_others_out() {
    let data = common::pattern(4 * MIB, 10);
    let export = Counted::new(data.clone());
    let mut config = ServerConfig::default();
    // Room for two peers' shares: the reader's address and the flood's.
    config.max_connections = 32;
    config.max_connections_per_peer = 16;
    // Long enough that only making room lets the reader in.
    config.handshake_timeout = Duration::from_secs(600);
    config.idle_timeout = None;
    let (addr, stop) = start(config, export).await;

    // Fill the reader's address's share: 8 idle after the handshake, 8
    // silent before it.
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        handshake(&mut s).await.unwrap();
        held.push(s);
    }
    for _ in 0..8 {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    read_all(addr, &data).await;

    // A flood from another address: 200 connections opened and dropped
    // beside 10 readers. (From the reader's own address the newest
    // handshakes would compete with its own: the share per peer is what
    // keeps a flood from elsewhere away.)
    let flood = tokio::spawn(async move {
        for _ in 0..200 {
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_secs(5), connect_from([127, 0, 0, 2], addr))
                    .await
            {
                drop(s);
            }
        }
    });
    for _ in 0..10 {
        read_all(addr, &data).await;
    }
    tokio::time::timeout(PATIENCE, flood)
        .await
        .unwrap()
        .unwrap();
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_over_its_share_loses_its_own_oldest_waiting_connection() {
    let data = common::pattern(MIB, 11);
    let mut config = ServerConfig::default();
    config.max_connections_per_peer = 3;
    config.idle_timeout = None;
    let (addr, stop) = start(config, Counted::new(data.clone())).await;

    let mut other = connect_from([127, 0, 0, 1], addr).await.unwrap();
    handshake(&mut other).await.unwrap();
    let mut greedy = Vec::new();
    for _ in 0..3 {
        let mut s = connect_from([127, 0, 0, 2], addr).await.unwrap();
        handshake(&mut s).await.unwrap();
        greedy.push(s);
    }
    // A fourth from the same peer: its oldest goes, nobody else's.
    let mut fourth = connect_from([127, 0, 0, 2], addr).await.unwrap();
    handshake(&mut fourth).await.unwrap();
    assert!(closed_by_server(&mut greedy[0]).await);
    // The other peer's connection still answers.
    other
        .write_all(&reads(1, 4096, data.len() as u64))
        .await
        .unwrap();
    let mut reply = vec![0u8; 16 + 4096];
    tokio::time::timeout(PATIENCE, other.read_exact(&mut reply))
        .await
        .expect("a reply in time")
        .expect("the other peer keeps its connection");
    assert!(reply[16..] == data[..4096]);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_idle_connections_time_out() {
    let mut config = ServerConfig::default();
    config.handshake_timeout = Duration::from_millis(500);
    config.idle_timeout = Some(Duration::from_millis(500));
    let (addr, stop) = start(config, Counted::new(vec![1; MIB])).await;
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut idle = TcpStream::connect(addr).await.unwrap();
    handshake(&mut idle).await.unwrap();
    assert!(closed_by_server(&mut silent).await, "handshake timeout");
    assert!(closed_by_server(&mut idle).await, "idle timeout");
    stop.cancel();
}
