//! Our own server: with our client, nbdinfo and qemu-img; its unix-socket
//! and writable paths; and its xapi-nbd-like minimal mode, which makes our
//! client fall back to NBD_OPT_EXPORT_NAME.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cbtvault_nbd::server::{Export, MemoryExport, Server, ServerConfig};
use cbtvault_nbd::{BoxError, Client, ConnectOptions, Error, StatusExtent, TlsOptions};
use futures::future::BoxFuture;
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::common;

const MIB: usize = 1 << 20;

/// 4 MiB: data, a 2 MiB hole, data, a hole.
fn disk() -> Vec<u8> {
    let mut v = vec![0u8; 4 * MIB];
    v[..MIB].copy_from_slice(&common::pattern(MIB, 1));
    v[3 * MIB..3 * MIB + MIB / 2].copy_from_slice(&common::pattern(MIB / 2, 2));
    v
}

struct Running {
    port: u16,
    stop: CancellationToken,
    task: JoinHandle<cbtvault_nbd::Result<()>>,
}

impl Running {
    async fn shutdown(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server shuts down promptly")
            .unwrap()
            .unwrap();
    }
}

async fn start_tcp(server: &Server) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = CancellationToken::new();
    let s = server.clone();
    let token = stop.clone();
    let task = tokio::spawn(async move { s.serve_tcp(listener, token).await });
    Running { port, stop, task }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_connections_to_an_immutable_export_without_multi_conn() {
    let data = disk();
    let mut config = ServerConfig::default();
    config.multi_conn = false;
    let server = Server::new(config);
    server.add_export("disk", Arc::new(MemoryExport::new(data.clone())));
    server.set_default_export("disk");
    let srv = start_tcp(&server).await;
    let opts = ConnectOptions::tcp("127.0.0.1", srv.port, "disk").with_connections(3);
    // An export that may change gets one connection...
    let client = Client::connect(&opts).await.unwrap();
    assert_eq!(client.connections(), 1);
    client.disconnect().await;
    // ...a snapshot, that never does, all it asks for.
    let mut snapshot = opts.clone();
    snapshot.immutable = true;
    let client = Client::connect(&snapshot).await.unwrap();
    assert_eq!(client.connections(), 3);
    assert!(client.read(0, data.len()).await.unwrap()[..] == data[..]);
    client.disconnect().await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_server_with_our_client() {
    let data = disk();
    let server = Server::new(ServerConfig::default());
    server.add_export("disk", Arc::new(MemoryExport::new(data.clone())));
    server.set_default_export("disk");
    let srv = start_tcp(&server).await;

    let opts = ConnectOptions::tcp("127.0.0.1", srv.port, "disk")
        .with_meta_context("base:allocation")
        .with_connections(2);
    let client = Client::connect(&opts).await.unwrap();
    assert_eq!(client.connections(), 2);
    assert!(client.structured_replies());
    assert!(
        !client.extended_headers(),
        "our server refuses extended headers"
    );
    assert!(client.is_read_only());
    assert!(client.read(0, data.len()).await.unwrap()[..] == data[..]);
    let ext = client
        .block_status("base:allocation", 0, data.len() as u64)
        .await
        .unwrap();
    let (m, h) = (MIB as u64, StatusExtent::HOLE | StatusExtent::ZERO);
    assert_eq!(
        ext,
        vec![
            StatusExtent {
                offset: 0,
                length: m,
                flags: 0
            },
            StatusExtent {
                offset: m,
                length: 2 * m,
                flags: h
            },
            StatusExtent {
                offset: 3 * m,
                length: m / 2,
                flags: 0
            },
            StatusExtent {
                offset: 3 * m + m / 2,
                length: m / 2,
                flags: h
            },
        ]
    );
    assert!(matches!(
        client.write(0, &[0; 512]).await,
        Err(Error::InvalidRequest(_))
    ));

    // The default export under the empty name; an unknown name is refused.
    let c2 = Client::connect(&ConnectOptions::tcp("127.0.0.1", srv.port, ""))
        .await
        .unwrap();
    assert_eq!(c2.size(), data.len() as u64);
    let err = Client::connect(&ConnectOptions::tcp("127.0.0.1", srv.port, "nope"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::UnknownExport { .. }), "{err}");

    // Shutdown is graceful even with idle clients connected.
    srv.shutdown().await;
    assert!(c2.read(0, 4096).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_maps_and_qemu_img_converts_our_export() {
    if !common::have("nbdinfo", "nbdinfo_maps_and_qemu_img_converts_our_export")
        || !common::have("qemu-img", "nbdinfo_maps_and_qemu_img_converts_our_export")
    {
        return;
    }
    let data = disk();
    let server = Server::new(ServerConfig::default());
    server.add_export("", Arc::new(MemoryExport::new(data.clone())));
    server.add_export("second", Arc::new(MemoryExport::new(vec![1; 8192])));
    let srv = start_tcp(&server).await;
    let uri = format!("nbd://127.0.0.1:{}", srv.port);

    let listing = tokio::task::spawn_blocking({
        let uri = uri.clone();
        move || common::run(Command::new("nbdinfo").arg("--list").arg(uri))
    })
    .await
    .unwrap();
    assert!(listing.contains("second"), "{listing}");

    let out = tokio::task::spawn_blocking({
        let uri = uri.clone();
        move || common::run(Command::new("nbdinfo").arg("--map").arg(uri))
    })
    .await
    .unwrap();
    let map: Vec<(u64, u64, u32)> = out
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((
                f.first()?.parse().ok()?,
                f.get(1)?.parse().ok()?,
                f.get(2)?.parse().ok()?,
            ))
        })
        .collect();
    let m = MIB as u64;
    assert_eq!(
        map,
        vec![
            (0, m, 0),
            (m, 2 * m, 3),
            (3 * m, m / 2, 0),
            (3 * m + m / 2, m / 2, 3)
        ],
        "{out}"
    );

    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("out.raw");
    tokio::task::spawn_blocking({
        let target = target.clone();
        move || {
            common::run(
                Command::new("qemu-img")
                    .args(["convert", "-f", "raw", "-O", "raw"])
                    .arg(format!("{uri}/"))
                    .arg(&target),
            )
        }
    })
    .await
    .unwrap();
    assert!(std::fs::read(&target).unwrap() == data);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writable_export_over_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("srv.sock");
    let export = Arc::new(MemoryExport::writable(vec![0x11; 2 * MIB]));
    let server = Server::new(ServerConfig::default());
    server.add_export("w", export.clone());
    let listener = UnixListener::bind(&path).unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (s, t) = (server.clone(), stop.clone());
        async move { s.serve_unix(listener, t).await }
    });
    let uri = format!("nbd+unix:///w?socket={}", path.display());
    let client = Client::connect(&ConnectOptions::from_uri(&uri).unwrap())
        .await
        .unwrap();
    assert!(!client.is_read_only());
    let block = common::pattern(100_000, 5);
    client.write(4096, &block).await.unwrap();
    client.write_zeroes(MIB as u64, 65_536).await.unwrap();
    client.flush().await.unwrap();
    let mut want = vec![0x11; 2 * MIB];
    want[4096..4096 + block.len()].copy_from_slice(&block);
    want[MIB..MIB + 65_536].fill(0);
    assert!(client.read(0, want.len()).await.unwrap()[..] == want[..]);
    client.disconnect().await;
    assert!(export.contents() == want);
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// Fails reads that touch `[bad, bad+64K)`.
struct Flaky {
    inner: MemoryExport,
    bad: u64,
}

impl Export for Flaky {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, BoxError>> {
        if offset < self.bad + 65_536 && offset + u64::from(len) > self.bad {
            return Box::pin(async { Err(std::io::Error::other("disk on fire").into()) });
        }
        self.inner.read(offset, len)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minimal_mode_makes_the_client_fall_back_to_export_name() {
    let dir = tempfile::tempdir().unwrap();
    let certs = common::make_certs(dir.path());
    let data = disk();
    let mut config = ServerConfig::minimal(common::server_tls(&certs));
    config.max_connections = 2;
    let server = Server::new(config);
    let export: Arc<dyn Export> = Arc::new(Flaky {
        inner: MemoryExport::new(data.clone()),
        bad: 2 * MIB as u64,
    });
    server.set_export_hook(Arc::new(move |name: &str| {
        if name == "vdi-1?session_id=good" {
            Ok(export.clone())
        } else {
            Err("invalid session".into())
        }
    }));
    let srv = start_tcp(&server).await;
    let tls = TlsOptions::pinned_pem(certs.cert_pem.clone());
    let opts = ConnectOptions::tcp("127.0.0.1", srv.port, "vdi-1?session_id=good")
        .with_tls(tls.clone())
        .with_meta_context("base:allocation");

    let client = Client::connect(&opts).await.unwrap();
    assert!(client.uses_export_name_fallback());
    assert!(!client.structured_replies());
    assert!(client.is_read_only());
    assert_eq!(client.block_sizes().0, 512);
    let first = client.read(0, 2 * MIB).await.unwrap();
    assert!(first[..] == data[..2 * MIB]);
    // Unaligned reads are aligned by the client (the server refuses others).
    let odd = client.read(1_000_001, 333_333).await.unwrap();
    assert!(odd[..] == data[1_000_001..1_333_334]);
    assert!(matches!(
        client.block_status("base:allocation", 0, 4096).await,
        Err(Error::Unsupported { .. })
    ));
    // A server error is reported; the server closes, the client reconnects.
    let err = client.read(2 * MIB as u64, 4096).await.unwrap_err();
    assert_eq!(err.server_errno(), Some(5), "{err}");
    let tail = client.read(3 * MIB as u64, MIB).await.unwrap();
    assert!(tail[..] == data[3 * MIB..]);

    // Connection limit: with one slot taken, a second fits, a third not.
    let second = Client::connect(&opts).await.unwrap();
    let mut third = opts.clone();
    third.retries = 0;
    assert!(
        Client::connect(&third).await.is_err(),
        "connection limit of 2"
    );
    second.disconnect().await;
    let mut patient = opts.clone();
    patient.retry_backoff = Duration::from_millis(50);
    patient.retries = 6;
    Client::connect(&patient).await.unwrap().disconnect().await;

    // Authentication through the export-name hook.
    let bad = ConnectOptions::tcp("127.0.0.1", srv.port, "vdi-1?session_id=bad").with_tls(tls);
    let err = Client::connect(&bad).await.unwrap_err();
    assert!(matches!(err, Error::Handshake { .. }), "{err}");
    // TLS is required.
    let plain = ConnectOptions::tcp("127.0.0.1", srv.port, "vdi-1?session_id=good");
    let err = Client::connect(&plain).await.unwrap_err();
    assert!(matches!(err, Error::TlsRequired { .. }), "{err}");

    client.disconnect().await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_over_unix_socket_with_a_ca() {
    let dir = tempfile::tempdir().unwrap();
    let certs = common::make_certs(&dir.path().join("pki"));
    let config = ServerConfig::default().with_tls(common::server_tls(&certs), true);
    let server = Server::new(config);
    let data = disk();
    server.add_export("d", Arc::new(MemoryExport::new(data.clone())));
    let path = dir.path().join("tls.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (s, t) = (server.clone(), stop.clone());
        async move { s.serve_unix(listener, t).await }
    });
    // Over a unix socket the name checked defaults to "localhost".
    let uri = format!(
        "nbds+unix:///d?socket={}&tls-certificates={}",
        path.display(),
        certs.dir.display()
    );
    let opts = ConnectOptions::from_uri(&uri)
        .unwrap()
        .with_meta_context("base:allocation");
    let client = Client::connect(&opts).await.unwrap();
    assert!(client.read(0, data.len()).await.unwrap()[..] == data[..]);
    assert_eq!(
        client
            .block_status("base:allocation", 0, 4096)
            .await
            .unwrap()[0]
            .flags,
        0
    );
    client.disconnect().await;
    let plain = ConnectOptions::unix(&path, "d");
    assert!(matches!(
        Client::connect(&plain).await,
        Err(Error::TlsRequired { .. })
    ));
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// Speaks raw option requests to the server through an in-memory pipe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn option_replies_by_hand() {
    use bytes::{BufMut, BytesMut};
    use cbtvault_nbd::proto;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let server = Server::new(ServerConfig::default());
    server.add_export("", Arc::new(MemoryExport::new(vec![0; 4096])));
    let (mut c, s) = tokio::io::duplex(64 * 1024);
    let task = tokio::spawn({
        let server = server.clone();
        async move {
            server
                .serve_stream(s, "pipe", CancellationToken::new())
                .await
        }
    });
    let mut greeting = [0u8; 18];
    c.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    c.write_u32(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES)
        .await
        .unwrap();

    async fn ask(c: &mut tokio::io::DuplexStream, option: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut b = BytesMut::new();
        proto::put_option(&mut b, option, data);
        c.write_all(&b).await.unwrap();
        let mut replies = Vec::new();
        loop {
            assert_eq!(c.read_u64().await.unwrap(), proto::OPTION_REPLY_MAGIC);
            assert_eq!(c.read_u32().await.unwrap(), option);
            let kind = c.read_u32().await.unwrap();
            let mut d = vec![0; c.read_u32().await.unwrap() as usize];
            c.read_exact(&mut d).await.unwrap();
            let last = kind == proto::REP_ACK || kind & proto::REP_ERR_BIT != 0;
            replies.push((kind, d));
            if last {
                return replies;
            }
        }
    }
    let mut meta = BytesMut::new();
    proto::put_string(&mut meta, "");
    meta.put_u32(0);
    let r = ask(&mut c, proto::OPT_LIST_META_CONTEXT, &meta).await;
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].0, proto::REP_META_CONTEXT);
    assert_eq!(&r[0].1[4..], b"base:allocation");
    let r = ask(&mut c, proto::OPT_SET_META_CONTEXT, &meta).await;
    assert_eq!(
        r[0].0,
        proto::REP_ERR_INVALID,
        "SET before structured replies"
    );
    assert_eq!(ask(&mut c, 99, &[]).await[0].0, proto::REP_ERR_UNSUP);
    assert_eq!(
        ask(&mut c, proto::OPT_STARTTLS, &[]).await[0].0,
        proto::REP_ERR_POLICY
    );
    let mut go = BytesMut::new();
    proto::put_string(&mut go, "missing");
    go.put_u16(0);
    assert_eq!(
        ask(&mut c, proto::OPT_GO, &go).await[0].0,
        proto::REP_ERR_UNKNOWN
    );
    go.truncate(3);
    assert_eq!(
        ask(&mut c, proto::OPT_GO, &go).await[0].0,
        proto::REP_ERR_INVALID
    );
    let list = ask(&mut c, proto::OPT_LIST, &[]).await;
    assert_eq!(list.len(), 2, "one export and the ACK");
    assert_eq!(
        ask(&mut c, proto::OPT_ABORT, &[]).await[0].0,
        proto::REP_ACK
    );
    task.await.unwrap().unwrap();
}
