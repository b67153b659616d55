//! Issue 8, defects 3 and 8: what a local path may be. A source is a
//! regular file or a block device (a FIFO hung the backup, `/dev/zero`
//! committed a 0-byte "full"); a restore writes into an existing file or
//! block device in place (it replaced a device node with a regular file)
//! and refuses character devices, FIFOs and sockets.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// Runs `command`, failing the test if it has not ended within `limit`: a
/// hang fails the test instead of blocking CI. Output goes through files so
/// that a full pipe can never pass for a hang.
pub(crate) fn output_within(s: &Scratch, mut command: Command, limit: Duration) -> Output {
    let mut run = spawn_logged(s, &mut command);
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = run.child.try_wait().expect("wait for cbtvault") {
            return Output {
                status,
                stdout: std::fs::read(&run.stdout).unwrap_or_default(),
                stderr: std::fs::read(&run.stderr).unwrap_or_default(),
            };
        }
        if Instant::now() >= deadline {
            let _ = run.child.kill();
            let _ = run.child.wait();
            panic!(
                "cbtvault did not finish within {limit:?} (it hangs):\n{}",
                String::from_utf8_lossy(&std::fs::read(&run.stderr).unwrap_or_default())
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child whose stdout and stderr go to files.
pub(crate) struct Logged {
    pub(crate) child: std::process::Child,
    pub(crate) stdout: PathBuf,
    pub(crate) stderr: PathBuf,
}

pub(crate) fn spawn_logged(s: &Scratch, command: &mut Command) -> Logged {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let (out, err) = (
        s.path(&format!("out-{n}.txt")),
        s.path(&format!("err-{n}.txt")),
    );
    let child = command
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("spawn cbtvault");
    Logged {
        child,
        stdout: out,
        stderr: err,
    }
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().expect("mkfifo");
    assert!(status.success());
}

fn run_within(s: &Scratch, args: &[&str]) -> Output {
    let mut c = s.command();
    c.args(args);
    output_within(s, c, Duration::from_secs(30))
}

fn refused(s: &Scratch, args: &[&str], expect: &str) -> String {
    let out = run_within(s, args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "cbtvault {args:?} must fail");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains(expect), "expected {expect:?} in:\n{stderr}");
    stderr
}

#[test]
fn a_source_that_is_not_a_file_or_block_device_is_refused_at_once() {
    let s = Scratch::new();
    let fifo = s.path("pipe");
    mkfifo(&fifo);
    let stderr = refused(
        &s,
        &[
            "backup",
            "--disk",
            "d",
            "--source",
            &format!("file:{}", fifo.display()),
        ],
        "FIFO",
    );
    assert!(stderr.contains(fifo.to_str().unwrap()), "{stderr}");
    let stderr = refused(
        &s,
        &["backup", "--disk", "d", "--source", "file:/dev/zero"],
        "character device",
    );
    assert!(stderr.contains("/dev/zero"), "{stderr}");
    refused(
        &s,
        &[
            "backup",
            "--disk",
            "d",
            "--source",
            &format!("file:{}", s.dir.path().display()),
        ],
        "directory",
    );
    assert!(s.list().is_empty(), "nothing is committed");
}

fn backed_up(s: &Scratch) -> (PathBuf, String) {
    let image = s.image("disk.img", 3, 1);
    let rp = s.backup("d", &image, None);
    (image, id(&rp))
}

#[test]
fn restore_refuses_character_devices_fifos_and_sockets() {
    let s = Scratch::new();
    let (_, rp) = backed_up(&s);
    // A private null device, not /dev/null itself: a restore that replaced
    // the node (the defect) must not break the machine it runs on.
    let null = s.path("null");
    if Command::new("mknod")
        .arg(&null)
        .args(["c", "1", "3"])
        .status()
        .is_ok_and(|st| st.success())
    {
        refused(
            &s,
            &["restore", &rp, "--force", "--to", null.to_str().unwrap()],
            "character device",
        );
        assert!(
            std::fs::metadata(&null)
                .unwrap()
                .file_type()
                .is_char_device(),
            "the device node is still a character device"
        );
    } else {
        eprintln!("skipped the character device: mknod needs root");
    }
    let fifo = s.path("pipe");
    mkfifo(&fifo);
    refused(
        &s,
        &["restore", &rp, "--force", "--to", fifo.to_str().unwrap()],
        "FIFO",
    );
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    let socket = s.path("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    refused(
        &s,
        &["restore", &rp, "--force", "--to", socket.to_str().unwrap()],
        "socket",
    );
    assert!(std::fs::metadata(&socket).unwrap().file_type().is_socket());
}

#[test]
fn restore_over_an_existing_file_writes_it_in_place() {
    let s = Scratch::new();
    let (image, rp) = backed_up(&s);
    let target = s.path("existing.img");
    std::fs::write(&target, vec![0x5a; 5 << 20]).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o640)).unwrap();
    let link = s.path("hard-link.img");
    std::fs::hard_link(&target, &link).unwrap();
    let inode = std::fs::metadata(&target).unwrap().ino();
    refused(
        &s,
        &["restore", &rp, "--to", target.to_str().unwrap()],
        "--force",
    );
    s.ok(&[
        "restore",
        "--quiet",
        &rp,
        "--force",
        "--to",
        target.to_str().unwrap(),
    ]);
    let meta = std::fs::metadata(&target).unwrap();
    assert_eq!(
        meta.ino(),
        inode,
        "the same file, not a new one renamed over it"
    );
    assert_eq!(meta.permissions().mode() & 0o777, 0o640, "its mode is kept");
    assert_same_file(&image, &target);
    assert_same_file(&image, &link);
}

#[test]
fn a_restored_new_file_is_private_whatever_the_umask() {
    let s = Scratch::new();
    let (image, rp) = backed_up(&s);
    let to = s.path("new.img");
    let out = Command::new("sh")
        .args(["-c", "umask 000; exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_cbtvault"))
        .args(["restore", "--quiet", "--repo"])
        .arg(s.repo())
        .args([&rp, "--to", to.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = std::fs::metadata(&to).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "a VM's disk is readable by its owner only");
    assert_same_file(&image, &to);
}

/// A loop device over a scratch file, detached on drop.
struct Loop {
    device: PathBuf,
}

impl Loop {
    /// `None` when loop devices cannot be set up here (not root, no
    /// loop driver): the test then says so and skips.
    fn attach(backing: &Path) -> Option<Loop> {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(backing)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "skipped: losetup cannot attach a loop device here: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        let device = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Some(Loop {
            device: device.into(),
        })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

#[test]
fn restore_into_a_block_device_writes_the_device_in_place() {
    let s = Scratch::new();
    let (image, rp) = backed_up(&s);
    let size = std::fs::metadata(&image).unwrap().len();
    // A device 1 MiB larger than the disk, full of a pattern: the restore
    // must zero the disk's zero blocks and leave the rest of the device.
    let backing = s.path("device.raw");
    std::fs::write(&backing, vec![0x77; (size + MIB) as usize]).unwrap();
    let Some(dev) = Loop::attach(&backing) else {
        return;
    };
    let device = dev.device.to_str().unwrap();
    refused(&s, &["restore", &rp, "--to", device], "--force");
    s.ok(&["restore", "--quiet", &rp, "--force", "--to", device]);
    assert!(
        std::fs::metadata(&dev.device)
            .unwrap()
            .file_type()
            .is_block_device(),
        "the device node is still a block device"
    );
    let content = std::fs::read(&dev.device).unwrap();
    let expected = std::fs::read(&image).unwrap();
    assert_eq!(content.len() as u64, size + MIB);
    assert!(
        content[..size as usize] == expected[..],
        "the disk is on the device"
    );
    assert!(
        content[size as usize..].iter().all(|&b| b == 0x77),
        "bytes past the disk are left alone"
    );
    drop(dev);

    // A device smaller than the disk is refused before anything is written.
    let small = s.path("small.raw");
    std::fs::write(&small, vec![0x33; (size - MIB) as usize]).unwrap();
    let Some(dev) = Loop::attach(&small) else {
        return;
    };
    refused(
        &s,
        &[
            "restore",
            &rp,
            "--force",
            "--to",
            dev.device.to_str().unwrap(),
        ],
        "holds",
    );
    let content = std::fs::read(&dev.device).unwrap();
    assert!(content.iter().all(|&b| b == 0x33), "nothing was written");
}

#[test]
fn a_block_device_is_a_source() {
    let s = Scratch::new();
    let image = s.image("disk.img", 2, 4);
    let Some(dev) = Loop::attach(&image) else {
        return;
    };
    let rp = s.ok(&[
        "backup",
        "--json",
        "--disk",
        "dev",
        "--source",
        &format!("file:{}", dev.device.display()),
    ]);
    let rp = the_restore_point(&rp);
    assert_eq!(rp["virtual_size"], 2 * MIB, "{rp}");
    assert_same_file(&image, &s.restore(&id(&rp), "from-device.img"));
}
