//! Against qemu-nbd: full reads, block status, dirty bitmaps, writes.

use std::process::Command;

use cbtvault_nbd::{Client, ConnectOptions, StatusExtent};

use super::common::{self, ChildGuard};

const MIB: u64 = 1 << 20;

fn raw_image(dir: &std::path::Path, len: usize) -> (std::path::PathBuf, Vec<u8>) {
    let data = common::pattern(len, 7);
    let path = dir.join("disk.raw");
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_over_unix_reads_the_whole_file() {
    if !common::have("qemu-nbd", "raw_over_unix_reads_the_whole_file") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, data) = raw_image(dir.path(), 8 * MIB as usize + 4096);
    let sock = dir.path().join("nbd.sock");
    let _srv = common::qemu_nbd_unix(&sock, &["-r", "-f", "raw", img.to_str().unwrap()]);

    let opts = ConnectOptions::unix(&sock, "").with_connections(3);
    let client = Client::connect(&opts).await.unwrap();
    assert_eq!(client.size(), data.len() as u64);
    assert!(client.is_read_only());
    assert!(client.can_multi_conn(), "qemu-nbd -r sets CAN_MULTI_CONN");
    assert_eq!(client.connections(), 3);
    assert!(client.structured_replies());

    let all = client.read(0, data.len()).await.unwrap();
    assert!(all[..] == data[..], "full read differs from the file");

    // Unaligned and concurrent reads from many tasks.
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let c = client.clone();
        let off = (i * 262_147) % (data.len() as u64 - 70_000);
        let len = 1 + (i as usize * 2111) % 65_000;
        tasks.push(tokio::spawn(
            async move { (off, len, c.read(off, len).await) },
        ));
    }
    for t in tasks {
        let (off, len, got) = t.await.unwrap();
        let got = got.unwrap();
        assert_eq!(
            &got[..],
            &data[off as usize..off as usize + len],
            "read at {off}+{len}"
        );
    }
    assert!(client.read(data.len() as u64 - 10, 11).await.is_err());
    client.disconnect().await;
    assert!(client.read(0, 512).await.is_err());
}

fn qcow2_with_writes(
    dir: &std::path::Path,
    size: &str,
    writes: &[(u64, u64)],
) -> std::path::PathBuf {
    let img = dir.join("disk.qcow2");
    common::run(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg(size),
    );
    for &(off, len) in writes {
        qemu_io_write(&img, off, len);
    }
    img
}

fn qemu_io_write(img: &std::path::Path, off: u64, len: u64) {
    common::run(
        Command::new("qemu-io")
            .args(["-f", "qcow2", "-c"])
            .arg(format!("write -P 0xab {off} {len}"))
            .arg(img),
    );
}

fn expected(size: u64, writes: &[(u64, u64)]) -> Vec<u8> {
    let mut v = vec![0u8; size as usize];
    for &(o, l) in writes {
        v[o as usize..(o + l) as usize].fill(0xab);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qcow2_over_tcp_block_status_reports_holes() {
    let test = "qcow2_over_tcp_block_status_reports_holes";
    if !common::have("qemu-nbd", test)
        || !common::have("qemu-img", test)
        || !common::have("qemu-io", test)
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let writes = [(MIB, 256 * 1024), (10 * MIB, 64 * 1024)];
    let img = qcow2_with_writes(dir.path(), "16M", &writes);
    let port = common::free_port();
    let mut srv = ChildGuard::spawn(
        Command::new("qemu-nbd")
            .args([
                "--persistent",
                "--shared=4",
                "-r",
                "-f",
                "qcow2",
                "-b",
                "127.0.0.1",
                "-p",
            ])
            .arg(port.to_string())
            .arg(&img),
    );
    common::wait_tcp(port, &mut srv);

    for extended in [true, false] {
        let mut opts = ConnectOptions::from_uri(&format!("nbd://127.0.0.1:{port}/"))
            .unwrap()
            .with_meta_context("base:allocation");
        opts.extended_headers = extended;
        let client = Client::connect(&opts).await.unwrap();
        assert_eq!(client.extended_headers(), extended);
        assert_eq!(client.meta_contexts(), vec!["base:allocation".to_owned()]);
        let data = client.read(0, 16 * MIB as usize).await.unwrap();
        assert!(data[..] == expected(16 * MIB, &writes)[..]);

        let ext = client
            .block_status("base:allocation", 0, 16 * MIB)
            .await
            .unwrap();
        let hole = StatusExtent::HOLE | StatusExtent::ZERO;
        let want = vec![
            StatusExtent {
                offset: 0,
                length: MIB,
                flags: hole,
            },
            StatusExtent {
                offset: MIB,
                length: 256 * 1024,
                flags: 0,
            },
            StatusExtent {
                offset: MIB + 256 * 1024,
                length: 9 * MIB - 256 * 1024,
                flags: hole,
            },
            StatusExtent {
                offset: 10 * MIB,
                length: 64 * 1024,
                flags: 0,
            },
            StatusExtent {
                offset: 10 * MIB + 64 * 1024,
                length: 6 * MIB - 64 * 1024,
                flags: hole,
            },
        ];
        assert_eq!(ext, want, "extended headers: {extended}");
        // A window in the middle is clipped exactly.
        let ext = client
            .block_status("base:allocation", MIB + 4096, 8192)
            .await
            .unwrap();
        assert_eq!(
            ext,
            vec![StatusExtent {
                offset: MIB + 4096,
                length: 8192,
                flags: 0
            }]
        );
        assert!(
            client
                .block_status("qemu:dirty-bitmap:none", 0, 4096)
                .await
                .is_err()
        );
        client.disconnect().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_dirty_bitmap_reports_written_clusters() {
    if !common::have(
        "qemu-nbd",
        "persistent_dirty_bitmap_reports_written_clusters",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = qcow2_with_writes(dir.path(), "8M", &[(2 * MIB, 64 * 1024)]);
    common::run(
        Command::new("qemu-img")
            .args(["bitmap", "--add", "--granularity", "65536", "-f", "qcow2"])
            .arg(&img)
            .arg("b0"),
    );
    // After the bitmap exists: one whole cluster, a partial one, two clusters.
    qemu_io_write(&img, 0x30000, 0x10000);
    qemu_io_write(&img, MIB + 0x8000, 0x1000);
    qemu_io_write(&img, 4 * MIB, 0x20000);

    let sock = dir.path().join("nbd.sock");
    let _srv = common::qemu_nbd_unix(
        &sock,
        &["-r", "-f", "qcow2", "-B", "b0", img.to_str().unwrap()],
    );
    let opts = ConnectOptions::unix(&sock, "")
        .with_meta_context("base:allocation")
        .with_meta_context("qemu:dirty-bitmap:b0");
    let client = Client::connect(&opts).await.unwrap();
    let mut names = client.meta_contexts();
    names.sort();
    assert_eq!(names, ["base:allocation", "qemu:dirty-bitmap:b0"]);

    let ext = client
        .block_status("qemu:dirty-bitmap:b0", 0, 8 * MIB)
        .await
        .unwrap();
    let dirty: Vec<(u64, u64)> = ext
        .iter()
        .filter(|e| e.flags & StatusExtent::DIRTY != 0)
        .map(|e| (e.offset, e.length))
        .collect();
    assert_eq!(
        dirty,
        vec![(0x30000, 0x10000), (MIB, 0x10000), (4 * MIB, 0x20000)]
    );
    let covered: u64 = ext.iter().map(|e| e.length).sum();
    assert_eq!(covered, 8 * MIB);
    // The write before the bitmap is allocated but not dirty.
    let alloc = client
        .block_status("base:allocation", 2 * MIB, 64 * 1024)
        .await
        .unwrap();
    assert_eq!(alloc[0].flags, 0);
    client.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_zeroes_and_flush_round_trip() {
    if !common::have("qemu-nbd", "writes_zeroes_and_flush_round_trip") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, mut data) = raw_image(dir.path(), 4 * MIB as usize);
    let sock = dir.path().join("nbd.sock");
    let _srv = common::qemu_nbd_unix(&sock, &["-f", "raw", img.to_str().unwrap()]);
    let client = Client::connect(&ConnectOptions::unix(&sock, ""))
        .await
        .unwrap();
    assert!(!client.is_read_only());
    let block = common::pattern(300_000, 99);
    client.write(8192, &block).await.unwrap();
    data[8192..8192 + block.len()].copy_from_slice(&block);
    client.write_zeroes(MIB, 128 * 1024).await.unwrap();
    data[MIB as usize..MIB as usize + 128 * 1024].fill(0);
    client.flush().await.unwrap();
    let back = client.read(0, data.len()).await.unwrap();
    assert!(back[..] == data[..]);
    client.disconnect().await;
    assert!(std::fs::read(&img).unwrap() == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_and_restarted_mid_stream() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    if !common::have("qemu-nbd", "server_killed_and_restarted_mid_stream") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, data) = raw_image(dir.path(), 8 * MIB as usize);
    let sock = dir.path().join("nbd.sock");
    let args = ["-r", "-f", "raw", img.to_str().unwrap()];
    let mut srv = common::qemu_nbd_unix(&sock, &args);
    let opts =
        ConnectOptions::unix(&sock, "").with_retries(10, std::time::Duration::from_millis(25));
    let client = Client::connect(&opts).await.unwrap();

    let restarted = Arc::new(AtomicBool::new(false));
    let reader = tokio::spawn({
        let (client, restarted, data) = (client.clone(), restarted.clone(), data.clone());
        async move {
            let mut rounds_after = 0;
            let mut round = 0u64;
            while rounds_after < 5 {
                if restarted.load(Ordering::SeqCst) {
                    rounds_after += 1;
                }
                let reads = (0..16u64).map(|i| {
                    let c = client.clone();
                    let off = ((round * 16 + i) * 65_536) % (8 * MIB);
                    async move { (off, c.read(off, 65_536).await) }
                });
                for (off, r) in futures::future::join_all(reads).await {
                    let r = r.unwrap_or_else(|e| panic!("read at {off} failed: {e}"));
                    assert!(r[..] == data[off as usize..off as usize + 65_536]);
                }
                round += 1;
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            round
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    srv.kill();
    let _ = std::fs::remove_file(&sock);
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let _srv2 = common::qemu_nbd_unix(&sock, &args);
    restarted.store(true, Ordering::SeqCst);
    let rounds = reader.await.unwrap();
    assert!(rounds > 5);
}
