//! Faults from nbdkit: random read errors (error filter), slow reads
//! (delay filter, proving pipelining), and a connection cut mid-read by an
//! in-test proxy (the client reconnects and finishes).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cbtvault_nbd::{Client, ConnectOptions};
use tokio::net::{TcpListener, UnixStream};

use super::common::{self, ChildGuard};

const KIB64: usize = 65_536;

fn nbdkit(socket: &Path, args: &[&str]) -> ChildGuard {
    let mut g = ChildGuard::spawn(
        Command::new("nbdkit")
            .args(["--exit-with-parent", "-f", "-U"])
            .arg(socket)
            .args(args),
    );
    common::wait_unix(socket, &mut g);
    g
}

/// nbdkit's pattern plugin: each 8-byte big-endian word holds its offset.
fn check_pattern(offset: u64, data: &Bytes) {
    assert_eq!(offset % 8, 0);
    for (i, w) in data.chunks(8).enumerate() {
        let want = (offset + 8 * i as u64).to_be_bytes();
        assert_eq!(w, &want[..w.len()], "pattern at {}", offset + 8 * i as u64);
    }
}

async fn many_reads(client: &Client, n: u64) -> Vec<(u64, cbtvault_nbd::Result<Bytes>)> {
    let futs = (0..n).map(|i| {
        let c = client.clone();
        async move {
            let off = i * 3 * KIB64 as u64;
            (off, c.read(off, KIB64).await)
        }
    });
    futures::future::join_all(futs).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_read_errors_are_reported_or_retried() {
    if !common::have("nbdkit", "random_read_errors_are_reported_or_retried") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("kit.sock");
    let trigger = dir.path().join("errors-on");
    std::fs::write(&trigger, b"").unwrap();
    let trigger_arg = format!("error-pread-file={}", trigger.display());
    let _kit = nbdkit(
        &sock,
        &[
            "--filter=error",
            "pattern",
            "size=64M",
            "error-pread-rate=10%",
            &trigger_arg,
        ],
    );

    // Without retries: each failed request reports the server's EIO, and
    // every request that succeeds carries the right data.
    let client = Client::connect(&ConnectOptions::unix(&sock, ""))
        .await
        .unwrap();
    let results = many_reads(&client, 200).await;
    let mut failed = 0;
    for (off, r) in &results {
        match r {
            Ok(d) => check_pattern(*off, d),
            Err(e) => {
                assert_eq!(e.server_errno(), Some(5), "{e}");
                failed += 1;
            }
        }
    }
    assert!(
        failed > 0 && failed < 100,
        "{failed} of 200 reads failed at a 10% error rate"
    );

    // With retries configured, all succeed.
    let patient = ConnectOptions::unix(&sock, "")
        .with_server_error_retries(10)
        .with_retries(3, Duration::from_millis(1));
    let client = Client::connect(&patient).await.unwrap();
    for (off, r) in many_reads(&client, 200).await {
        check_pattern(off, &r.unwrap());
    }
    // Errors stop when the trigger goes.
    std::fs::remove_file(&trigger).unwrap();
    let plain = Client::connect(&ConnectOptions::unix(&sock, ""))
        .await
        .unwrap();
    check_pattern(0, &plain.read(0, 4 << 20).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelining_hides_latency() {
    if !common::have("nbdkit", "pipelining_hides_latency") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("kit.sock");
    let _kit = nbdkit(
        &sock,
        &["--filter=delay", "pattern", "size=64M", "rdelay=50ms"],
    );
    let client = Client::connect(&ConnectOptions::unix(&sock, "").with_inflight(64))
        .await
        .unwrap();
    let t = Instant::now();
    let results = many_reads(&client, 64).await;
    let elapsed = t.elapsed();
    for (off, r) in results {
        check_pattern(off, &r.unwrap());
    }
    // One at a time would take 64 × 50 ms = 3.2 s.
    assert!(
        elapsed < Duration::from_millis(1600),
        "64 delayed reads took {elapsed:?}"
    );
}

/// A TCP proxy to a unix socket that cuts its first connection after
/// `cut` bytes from the server; later connections pass everything.
async fn cutting_proxy(upstream: std::path::PathBuf, cut: u64) -> (u16, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let n = count.clone();
    tokio::spawn(async move {
        while let Ok((down, _)) = l.accept().await {
            let k = n.fetch_add(1, Ordering::SeqCst);
            let up = match UnixStream::connect(&upstream).await {
                Ok(up) => up,
                Err(e) => {
                    if k < 3 {
                        eprintln!(
                            "proxy: connection {k}: cannot reach {}: {e}",
                            upstream.display()
                        );
                    }
                    continue;
                }
            };
            tokio::spawn(async move {
                let (mut ur, mut uw) = up.into_split();
                let (mut dr, mut dw) = down.into_split();
                let limit = if k == 0 { cut } else { u64::MAX };
                let to_client = async {
                    let _ = tokio::io::copy(&mut (&mut ur).take(limit), &mut dw).await;
                };
                let to_server = async {
                    let _ = tokio::io::copy(&mut dr, &mut uw).await;
                };
                tokio::select! {
                    _ = to_client => {}
                    _ = to_server => {}
                }
                // Cut only the client's side: nbdkit 1.32 can abort when a
                // socket it is still writing to is reset, so its side is
                // drained quietly instead.
                drop((dr, dw));
                let _ = tokio::io::copy(&mut ur, &mut tokio::io::sink()).await;
                drop(uw);
            });
        }
    });
    (port, count)
}

use tokio::io::AsyncReadExt as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cut_mid_read_is_survived() {
    if !common::have("nbdkit", "connection_cut_mid_read_is_survived") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("kit.sock");
    let _kit = nbdkit(&sock, &["pattern", "size=64M"]);
    let (port, conns) = cutting_proxy(sock.clone(), 3 << 20).await;
    let opts =
        ConnectOptions::tcp("127.0.0.1", port, "").with_retries(4, Duration::from_millis(20));
    let client = Client::connect(&opts).await.unwrap();
    // 16 MiB in 256 concurrent 64 KiB reads, and one large read.
    let reads = (0..256u64).map(|i| {
        let c = client.clone();
        async move { (i * KIB64 as u64, c.read(i * KIB64 as u64, KIB64).await) }
    });
    for (off, r) in futures::future::join_all(reads).await {
        check_pattern(
            off,
            &r.unwrap_or_else(|e| panic!("read at {off}: {}", super::tls::error_chain(&e))),
        );
    }
    assert!(
        conns.load(Ordering::SeqCst) >= 2,
        "the proxy never cut the connection"
    );
    check_pattern(0, &client.read(0, 48 << 20).await.unwrap());
    client.disconnect().await;
}
