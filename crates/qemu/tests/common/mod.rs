//! A real qemu-storage-daemon for the tests, and the external tools that
//! write to the live disk (qemu-io) and read exports (nbdcopy, nbdinfo).

#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cbtvault_qemu::{DiskOptions, QemuDisk, Qmp};

pub const SIZE: u64 = 32 << 20;
pub const CLUSTER: u64 = 64 << 10;

/// A qemu-storage-daemon holding `disk.qcow2` as node `disk`, optionally
/// with an NBD server and a writable export `guest` that stands in for
/// the VM. Killed on drop.
pub struct Qsd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    guest_export: bool,
}

impl Qsd {
    /// A fresh disk whose first MiB is 0x11, then QSD with a guest export.
    pub fn new() -> Self {
        Self::with_guest_export(true)
    }

    pub fn with_guest_export(guest_export: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.qcow2");
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&image)
            .arg(SIZE.to_string()));
        run(Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0x11 0 1M"])
            .arg(&image));
        let mut qsd = Self {
            child: None,
            dir,
            guest_export,
        };
        qsd.start();
        qsd
    }

    pub fn start(&mut self) {
        let _ = std::fs::remove_file(self.qmp_socket());
        let log = File::create(self.path("qsd.log")).expect("log file");
        let mut command = Command::new("qemu-storage-daemon");
        command
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=disk-file,filename={}",
                self.path("disk.qcow2").display()
            ))
            .args(["--blockdev", "driver=qcow2,node-name=disk,file=disk-file"])
            .arg("--chardev")
            .arg(format!(
                "socket,id=qmp0,path={},server=on,wait=off",
                self.qmp_socket().display()
            ))
            .args(["--monitor", "chardev=qmp0"]);
        if self.guest_export {
            command
                .arg("--nbd-server")
                .arg(format!(
                    "addr.type=unix,addr.path={}",
                    self.nbd_socket().display()
                ))
                .args([
                    "--export",
                    "type=nbd,id=guest,node-name=disk,name=guest,writable=on",
                ]);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("qemu-storage-daemon (package qemu-utils) must be installed");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        // A socket file appears at bind(), before listen(): only a
        // connection shows the daemon is ready.
        let listening = |p: &std::path::Path| std::os::unix::net::UnixStream::connect(p).is_ok();
        while !(listening(&self.qmp_socket())
            && (!self.guest_export || listening(&self.nbd_socket())))
        {
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL: QSD gets no chance to save anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A clean stop (QMP `quit`): persistent bitmaps are written out.
    pub async fn quit(&mut self) {
        let qmp = Qmp::connect(self.qmp_socket()).await.expect("qmp");
        // The connection may close before the reply arrives.
        let _ = qmp.execute("quit", serde_json::Value::Null).await;
        if let Some(mut child) = self.child.take() {
            let status = child.wait().expect("wait");
            assert!(status.success(), "QSD exited with {status}");
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn qmp_socket(&self) -> PathBuf {
        self.path("qmp.sock")
    }

    pub fn nbd_socket(&self) -> PathBuf {
        self.path("nbd.sock")
    }

    pub fn guest_uri(&self) -> String {
        format!("nbd+unix:///guest?socket={}", self.nbd_socket().display())
    }

    /// Connects the provider to node `disk`, using QSD's NBD server.
    pub async fn disk(&self) -> QemuDisk {
        let options = DiskOptions {
            nbd_socket: self.guest_export.then(|| self.nbd_socket()),
            ..DiskOptions::default()
        };
        QemuDisk::connect_with(self.qmp_socket().into(), "disk", options)
            .await
            .expect("connect the provider")
    }

    /// A guest write of `len` bytes of `pattern` at `offset`.
    pub fn write(&self, pattern: u8, offset: u64, len: u64) {
        run(Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            &format!("write -P {pattern:#x} {offset} {len}"),
            &self.guest_uri(),
        ]));
    }

    /// The live disk's content, as the guest sees it.
    pub fn read_guest(&self) -> Vec<u8> {
        read_uri(&self.guest_uri(), &self.path("guest.raw"))
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn run(command: &mut Command) -> String {
    let output = command.output().expect("run a tool");
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Copies a whole NBD export into memory (through `scratch`) with nbdcopy.
pub fn read_uri(uri: &str, scratch: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(scratch);
    run(Command::new("nbdcopy").arg(uri).arg(scratch));
    std::fs::read(scratch).expect("read the copy")
}

/// The extents of `context` whose flags have bit 0 set (for a dirty
/// bitmap: dirty; for base:allocation: hole), as `(offset, length)`.
pub fn map(uri: &str, context: Option<&str>) -> Vec<(u64, u64, u32)> {
    let mut command = Command::new("nbdinfo");
    match context {
        Some(context) => command.arg(format!("--map={context}")),
        None => command.arg("--map"),
    };
    let out = run(command.arg(uri));
    out.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let offset = fields.next()?.parse().ok()?;
            let length = fields.next()?.parse().ok()?;
            let flags = fields.next()?.parse().ok()?;
            Some((offset, length, flags))
        })
        .collect()
}

/// The 64 KiB clusters a dirty-bitmap context marks dirty.
pub fn dirty_clusters(uri: &str, context: &str) -> Vec<u64> {
    map(uri, Some(context))
        .into_iter()
        .filter(|&(_, _, flags)| flags & 1 == 1)
        .flat_map(|(offset, length, _)| offset / CLUSTER..(offset + length).div_ceil(CLUSTER))
        .collect()
}

/// Asserts that QSD holds nothing a backup made: no export but the
/// guest's, no node but the disk's, no job, no fleece file.
pub async fn assert_clean(qsd: &Qsd, qmp: &Qmp) {
    let exports: Vec<String> = qmp
        .query_block_exports()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    let expected: Vec<String> = if qsd.guest_export {
        vec!["guest".into()]
    } else {
        vec![]
    };
    assert_eq!(exports, expected);
    let mut nodes: Vec<String> = qmp
        .query_named_block_nodes()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.node_name)
        .collect();
    nodes.sort();
    assert_eq!(nodes, ["disk", "disk-file"]);
    assert!(qmp.query_jobs().await.unwrap().is_empty());
    let fleece: Vec<_> = std::fs::read_dir(qsd.dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with("fleece.qcow2"))
        .collect();
    assert!(fleece.is_empty(), "{fleece:?}");
}

/// The names of the dirty bitmaps on node `disk`.
pub async fn bitmaps(disk: &QemuDisk) -> Vec<String> {
    let mut names: Vec<String> = disk
        .checkpoints()
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.name)
        .collect();
    names.sort();
    names
}
