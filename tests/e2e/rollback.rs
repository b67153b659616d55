//! `restore --only-changed`: a disk holding another state of the same disk
//! is brought to a restore point writing only the blocks that differ,
//! found by hashing the target or from the block maps; file targets
//! (resized when the sizes differ) and a qemu-nbd export.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

/// Blocks of the test disk (64 MiB).
const BLOCKS: u64 = 1024;

fn rollback(s: &Scratch, rp: &str, to: &str, extra: &[&str]) -> Value {
    let mut args = vec!["restore", "--json", rp, "--to", to, "--only-changed"];
    args.extend(extra);
    let out: Value = serde_json::from_str(&s.ok(&args)).expect("restore json");
    out["stats"].clone()
}

/// A disk backed up, churned by 1%, backed up again: (image now, first
/// restore point, second, the churned block count).
fn two_states(s: &Scratch) -> (std::path::PathBuf, String, String, u64) {
    let image = s.image("disk.img", 64, 11);
    let first = id(&s.backup("d", &image, None));
    let (map, bitmap) = s.churn(&image, 0.01, 12, "c.b64");
    let second = id(&s.backup("d", &image, Some(&bitmap)));
    (image, first, second, map.count_set())
}

#[test]
fn rollback_of_a_file_writes_only_the_churned_blocks() {
    let s = Scratch::new();
    let (image, first, second, churned) = two_states(&s);
    assert!((9..=11).contains(&churned), "{churned}");
    let old = s.restore(&first, "old.img");
    let target = s.path("target.img");
    std::fs::copy(&old, &target).unwrap();

    // Forward, by hashing the target: every block compared, ~1% written.
    let stats = rollback(&s, &second, target.to_str().unwrap(), &[]);
    assert_eq!(stats["method"], "hashing");
    assert_eq!(stats["blocks_compared"], BLOCKS);
    assert_eq!(stats["blocks_written"], churned, "{stats}");
    assert_eq!(stats["target_bytes_read"], BLOCKS * 65536);
    assert_same_file(&image, &target);

    // Nothing differs any more: nothing is written.
    let stats = rollback(&s, &second, target.to_str().unwrap(), &[]);
    assert_eq!(stats["blocks_written"], 0, "{stats}");

    // Back again, from the block maps: the target is not read at all.
    let stats = rollback(
        &s,
        &first,
        target.to_str().unwrap(),
        &["--target-state", &second],
    );
    assert_eq!(stats["method"], "block-maps");
    assert_eq!(stats["blocks_written"], churned, "{stats}");
    assert_eq!(stats["target_bytes_read"], 0);
    assert_same_file(&old, &target);

    // A target written since it was restored: its own changed-block
    // bitmap (as XenServer's CBT gives it) adds those blocks.
    let written = s.restore(&first, "written.img");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&written)
        .unwrap();
    let mut since = cbtvault_blockmap::BlockMap::empty(BLOCKS);
    for b in [5u64, 6, 700] {
        std::os::unix::fs::FileExt::write_all_at(&f, &[0xA5; 65536], b * 65536).unwrap();
        since.set(b);
    }
    drop(f);
    let bitmap = s.path("since.b64");
    std::fs::write(&bitmap, since.to_xenapi_base64()).unwrap();
    let stats = rollback(
        &s,
        &second,
        written.to_str().unwrap(),
        &[
            "--target-state",
            &first,
            "--target-changed-blocks",
            bitmap.to_str().unwrap(),
        ],
    );
    assert_eq!(stats["method"], "block-maps+changed-blocks");
    assert!(
        stats["blocks_written"].as_u64().unwrap() >= churned + 2,
        "{stats}"
    );
    assert!(
        stats["blocks_written"].as_u64().unwrap() <= churned + 3,
        "{stats}"
    );
    assert_eq!(stats["target_bytes_read"], 0);
    assert_same_file(&image, &written);

    // Text output says what happened.
    let text = s.ok(&[
        "restore",
        &second,
        "--to",
        target.to_str().unwrap(),
        "--only-changed",
    ]);
    assert!(
        text.contains(&format!("{churned} of {BLOCKS} blocks differed")),
        "{text}"
    );
}

#[test]
fn rollback_resizes_a_file_of_another_size_and_refuses_bad_targets() {
    let s = Scratch::new();
    let (image, _first, second, _) = two_states(&s);
    // A longer target with garbage past the disk's end.
    let target = s.path("longer.img");
    let mut bytes = std::fs::read(&image).unwrap();
    bytes.extend(vec![0x55u8; 3 << 20]);
    bytes[100] ^= 1;
    std::fs::write(&target, &bytes).unwrap();
    let stats = rollback(&s, &second, target.to_str().unwrap(), &[]);
    assert_eq!(stats["resized_from"], (64 + 3) << 20);
    assert_eq!(stats["blocks_written"], 1, "{stats}");
    assert_same_file(&image, &target);
    // The same, said to hold the restore point already: its size shows
    // otherwise, so it is hashed rather than taken at its word.
    std::fs::write(&target, &bytes).unwrap();
    let stats = rollback(
        &s,
        &second,
        target.to_str().unwrap(),
        &["--target-state", &second],
    );
    assert_eq!(stats["method"], "hashing", "{stats}");
    assert_eq!(stats["blocks_written"], 1, "{stats}");
    assert_same_file(&image, &target);
    // A shorter one (cut mid-block): the tail is written.
    let target = s.path("shorter.img");
    let bytes = std::fs::read(&image).unwrap();
    std::fs::write(&target, &bytes[..(60 << 20) + 1000]).unwrap();
    // What the cut lost: the blocks from the cut one on that hold data
    // (the rest read as zeros once the file is lengthened).
    let lost = bytes[960 << 16..]
        .chunks(65536)
        .enumerate()
        .filter(|(i, c)| {
            let kept = if *i == 0 { 1000 } else { 0 };
            c[kept..].iter().any(|&b| b != 0)
        })
        .count();
    let stats = rollback(&s, &second, target.to_str().unwrap(), &[]);
    assert_eq!(stats["blocks_written"], lost as u64, "{stats}");
    assert_same_file(&image, &target);

    let err = s.fails(&[
        "restore",
        &second,
        "--to",
        s.path("missing.img").to_str().unwrap(),
        "--only-changed",
    ]);
    assert!(
        err.contains("does not exist") && err.contains("--only-changed"),
        "{err}"
    );
    assert!(!s.path("missing.img").exists());
    let err = s.fails(&["restore", &second, "--to", "/dev/null", "--only-changed"]);
    assert!(err.contains("character device"), "{err}");
    let err = s.fails(&[
        "restore",
        &second,
        "--to",
        "x.img",
        "--target-state",
        &second,
    ]);
    assert!(err.contains("--only-changed"), "{err}");
}

/// qemu-nbd serving `image` on `socket`, killed when dropped.
struct QemuNbd(Child);

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu_nbd(image: &Path, socket: &Path) -> QemuNbd {
    let child = Command::new("qemu-nbd")
        .args(["--persistent", "--shared=8", "-f", "raw", "-k"])
        .arg(socket)
        .arg(image)
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-nbd (run scripts/install-deps)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "qemu-nbd never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    QemuNbd(child)
}

#[test]
fn rollback_of_an_nbd_export() {
    let s = Scratch::new();
    let (image, first, second, churned) = two_states(&s);
    let target = s.restore(&first, "target.img");
    let sock = s.path("t.sock");
    let server = qemu_nbd(&target, &sock);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let stats = rollback(&s, &second, &uri, &[]);
    assert_eq!(stats["blocks_compared"], BLOCKS);
    assert_eq!(stats["blocks_written"], churned, "{stats}");
    let stats = rollback(&s, &first, &uri, &["--target-state", &second]);
    assert_eq!(stats["blocks_written"], churned, "{stats}");
    let stats = rollback(&s, &second, &uri, &["--target-state", &first]);
    assert_eq!(stats["blocks_written"], churned, "{stats}");
    drop(server);
    assert_same_file(&image, &target);

    // An export of another size cannot be resized: refused, nothing written.
    let small = s.path("small.img");
    std::fs::write(&small, vec![7u8; 1 << 20]).unwrap();
    let sock = s.path("s.sock");
    let server = qemu_nbd(&small, &sock);
    let err = s.fails(&[
        "restore",
        &second,
        "--to",
        &format!("nbd+unix:///?socket={}", sock.display()),
        "--only-changed",
    ]);
    assert!(err.contains("cannot be resized"), "{err}");
    drop(server);
    assert_eq!(std::fs::read(&small).unwrap(), vec![7u8; 1 << 20]);
}
