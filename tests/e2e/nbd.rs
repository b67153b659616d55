//! The binary against real NBD peers: qemu-nbd (full reads, dirty bitmaps,
//! a writable restore target), nbdkit (faults and latency), and the
//! project's own server read by nbdinfo, nbdcopy and qemu-img.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// A server process killed when the test ends.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn need(tool: &str) {
    let found = Command::new("which")
        .arg(tool)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(found, "{tool} is not installed: run scripts/install-deps");
}

fn wait_for_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_nbd(image: &Path, socket: &Path, extra: &[&str]) -> Peer {
    need("qemu-nbd");
    let child = Command::new("qemu-nbd")
        .args(["--persistent", "--shared=8", "-k"])
        .arg(socket)
        .args(extra)
        .arg(image)
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu-nbd");
    wait_for_socket(socket);
    Peer(child)
}

fn uri(socket: &Path) -> String {
    format!("nbd+unix:///?socket={}", socket.display())
}

/// A qcow2 disk with data, a persistent dirty bitmap `b0`, and writes after it.
fn qcow2_with_bitmap(s: &Scratch) -> (PathBuf, Vec<(u64, u64)>) {
    need("qemu-img");
    let img = s.path("disk.qcow2");
    sh(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "64M"],
    );
    sh(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 0 2M",
            "-c",
            "write -P 0xcd 10M 64k",
            img.to_str().unwrap(),
        ],
    );
    sh(
        "qemu-img",
        &[
            "bitmap",
            "--add",
            "--granularity",
            "65536",
            img.to_str().unwrap(),
            "b0",
        ],
    );
    // After the bitmap: 3 blocks in 2 places, one write straddling a boundary.
    let writes = vec![(20 << 20, 128 << 10), (40 * MIB + 65536 - 512, 1024)];
    let mut args = vec!["-f".to_string(), "qcow2".to_string()];
    for (off, len) in &writes {
        args.extend(["-c".to_string(), format!("write -P 0x5e {off} {len}")]);
    }
    args.push(img.to_str().unwrap().to_string());
    sh(
        "qemu-io",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    (img, writes)
}

fn raw_of(s: &Scratch, qcow2: &Path, name: &str) -> PathBuf {
    let raw = s.path(name);
    sh(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            qcow2.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    raw
}

#[test]
fn qemu_nbd_full_then_dirty_bitmap_incremental() {
    let s = Scratch::new();
    let (img, _) = qcow2_with_bitmap(&s);
    let sock = s.path("q.sock");
    let _peer = qemu_nbd(&img, &sock, &["-r", "-f", "qcow2", "-B", "b0"]);
    let repo = s.repo();
    let repo = repo.to_str().unwrap();
    let full = the_restore_point(&s.ok(&[
        "backup",
        "--json",
        "--repo",
        repo,
        "--disk",
        "q",
        "--source",
        &uri(&sock),
    ]));
    // base:allocation: only the allocated clusters are read.
    assert_eq!(
        full["stats"]["bytes_read"],
        (2 * MIB + 65536 + 2 * 65536 + 2 * 65536)
    );
    let incr = the_restore_point(&s.ok(&[
        "backup",
        "--json",
        "--repo",
        repo,
        "--disk",
        "q",
        "--source",
        &uri(&sock),
        "--dirty-bitmap",
        "b0",
    ]));
    // The bitmap marks 2 + 2 blocks (the second write straddles a boundary).
    assert_eq!(incr["mode"]["changed_blocks"], 4);
    assert_eq!(incr["stats"]["blocks_read"], 4);
    assert_eq!(incr["stats"]["bytes_read"], 4 * 65536);
    let raw = raw_of(&s, &img, "disk.raw");
    assert_same_file(&raw, &s.restore(&id(&incr), "incr.img"));
    assert_same_file(&raw, &s.restore(&id(&full), "full.img"));
}

#[test]
fn restore_into_a_writable_nbd_export() {
    let s = Scratch::new();
    let image = s.image("src.img", 16, 70);
    let rp = id(&s.backup("d", &image, None));
    // A target holding old data everywhere: zero blocks must be written as zeros.
    let target = s.path("target.img");
    std::fs::write(&target, vec![0x77u8; 16 << 20]).unwrap();
    let sock = s.path("t.sock");
    let peer = qemu_nbd(&target, &sock, &["-f", "raw"]);
    s.ok(&["restore", "--quiet", &rp, "--to", &uri(&sock)]);
    drop(peer);
    assert_same_file(&image, &target);
}

#[test]
fn served_restore_point_reads_back_with_nbdinfo_nbdcopy_and_qemu_img() {
    need("nbdcopy");
    let s = Scratch::new();
    let image = s.image("src.img", 12, 71);
    let rp = id(&s.backup("d", &image, None));
    let sock = s.path("serve.sock");
    let child = s
        .command()
        .args(["serve", "--quiet", &rp])
        .arg(format!("--listen=unix:{}", sock.display()))
        .spawn()
        .expect("serve");
    let _server = Peer(child);
    wait_for_socket(&sock);
    let copied = s.path("copied.img");
    sh("nbdcopy", &[&uri(&sock), copied.to_str().unwrap()]);
    assert_same_file(&image, &copied);
    let converted = s.path("converted.img");
    sh(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri(&sock),
            converted.to_str().unwrap(),
        ],
    );
    assert_same_file(&image, &converted);
    let map = sh("nbdinfo", &["--map", &uri(&sock)]);
    // The generated image has zero runs; they must be reported as holes.
    assert!(map.contains("hole,zero") && map.contains("data"), "{map}");
    let restored = s.restore(&rp, "restored.img");
    assert_same_file(&restored, &copied);
}

fn nbdkit(socket: &Path, args: &[&str]) -> Peer {
    need("nbdkit");
    let child = Command::new("nbdkit")
        .args(["--foreground", "--exit-with-parent", "-U"])
        .arg(socket)
        .args(args)
        .stderr(Stdio::null())
        .spawn()
        .expect("start nbdkit");
    wait_for_socket(socket);
    Peer(child)
}

#[test]
fn failing_reads_fail_the_backup_clearly_and_commit_nothing() {
    let s = Scratch::new();
    let sock = s.path("err.sock");
    let _peer = nbdkit(
        &sock,
        &[
            "--filter=error",
            "pattern",
            "size=32M",
            "error-pread-rate=100%",
            "error-pread=EIO",
        ],
    );
    let err = s.fails(&["backup", "--disk", "e", "--source", &uri(&sock)]);
    assert!(err.contains("offset"), "names where: {err}");
    assert!(s.list().is_empty());
    let (ok, report) = s.verify(true);
    assert!(ok, "{report}");
}

#[test]
fn slow_server_is_read_correctly_with_requests_in_flight() {
    let s = Scratch::new();
    let sock = s.path("slow.sock");
    let _peer = nbdkit(
        &sock,
        &["--filter=delay", "pattern", "size=8M", "rdelay=40ms"],
    );
    let rp = the_restore_point(&s.ok(&[
        "backup",
        "--json",
        "--disk",
        "slow",
        "--source",
        &uri(&sock),
        "--read-size-kib",
        "256",
        "--inflight",
        "16",
    ]));
    assert_eq!(rp["stats"]["bytes_read"], 8 * MIB);
    let restored = s.restore(&id(&rp), "slow.img");
    let data = std::fs::read(restored).unwrap();
    // nbdkit's pattern plugin: each 8-byte word holds its own offset, big endian.
    for (i, word) in data.chunks(8).enumerate().step_by(4099) {
        assert_eq!(word, (i as u64 * 8).to_be_bytes());
    }
}

#[test]
fn the_check_before_irreversible_steps_catches_a_different_snapshot() {
    let s = Scratch::new();
    let image = s.image("src.img", 8, 72);
    let rp = id(&s.backup("d", &image, None));
    let other = s.path("other.img");
    std::fs::copy(&image, &other).unwrap();
    let (changed, _) = s.churn(&other, 0.5, 73, "c.b64");
    let repo = std::sync::Arc::new(cbtvault_repo::Repository::open(&s.repo()).unwrap());
    let row = repo.resolve(&rp).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let check =
        |path: &std::path::Path, sock_name: &str, focus: Option<&cbtvault_blockmap::BlockMap>| {
            let sock = s.path(sock_name);
            let _peer = qemu_nbd(path, &sock, &["-r", "-f", "raw"]);
            rt.block_on(async {
                let opts = cbtvault_nbd::ConnectOptions::from_uri(&uri(&sock)).unwrap();
                let client = cbtvault_nbd::Client::connect(&opts).await.unwrap();
                let r = cbtvault_engine::nbd::verify_sample(
                    &client,
                    &repo,
                    &row.id,
                    &row.manifest,
                    16,
                    focus,
                )
                .await;
                client.disconnect().await;
                r
            })
        };
    check(&image, "same.sock", None).expect("the snapshot it came from passes");
    let err = check(&other, "other.sock", Some(&changed)).expect_err("a different disk fails");
    assert!(
        err.to_string().contains("differs from restore point"),
        "{err}"
    );
}
