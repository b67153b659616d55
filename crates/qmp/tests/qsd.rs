//! The QMP client against a real qemu-storage-daemon, and against peers
//! that are not QMP.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cbtvault_qmp::{Action, Address, Error, ErrorClass, JobStatus, Options, Qmp};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;

const SIZE: u64 = 16 << 20;

/// A qemu-storage-daemon with one qcow2 disk (node `disk`), killed on drop.
struct Qsd {
    child: Child,
    qmp: Address,
    dir: tempfile::TempDir,
}

impl Qsd {
    fn start() -> Self {
        Self::start_with(None)
    }

    /// `tcp_port`: listen for QMP on 127.0.0.1:port instead of a unix socket.
    fn start_with(tcp_port: Option<u16>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.qcow2");
        let status = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&image)
            .arg(SIZE.to_string())
            .status()
            .expect("qemu-img (package qemu-utils) must be installed");
        assert!(status.success());
        let socket = dir.path().join("qmp.sock");
        let (chardev, qmp) = match tcp_port {
            None => (
                format!(
                    "socket,id=qmp0,path={},server=on,wait=off",
                    socket.display()
                ),
                Address::Unix(socket.clone()),
            ),
            Some(port) => (
                format!("socket,id=qmp0,host=127.0.0.1,port={port},server=on,wait=off"),
                Address::Tcp(format!("127.0.0.1:{port}")),
            ),
        };
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=disk-file,filename={}",
                image.display()
            ))
            .args(["--blockdev", "driver=qcow2,node-name=disk,file=disk-file"])
            .args(["--chardev", &chardev, "--monitor", "chardev=qmp0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("qsd.log")).expect("log file"))
            .spawn()
            .expect("qemu-storage-daemon (package qemu-utils) must be installed");
        let mut qsd = Self { child, qmp, dir };
        qsd.wait_listening(tcp_port);
        qsd
    }

    fn wait_listening(&mut self, tcp_port: Option<u16>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let up = match tcp_port {
                // The socket file appears at bind(), before listen():
                // only a connection shows the daemon is ready.
                None => std::os::unix::net::UnixStream::connect(self.dir.path().join("qmp.sock"))
                    .is_ok(),
                Some(port) => std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
            };
            if up {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("qemu-storage-daemon exited: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn connect(qsd: &Qsd) -> Qmp {
    // The monitor serves one client at a time: until the daemon has seen
    // the readiness probe's connection close, it refuses the next one.
    let mut tries = 0;
    loop {
        match Qmp::connect_with(qsd.qmp.clone(), Options::default()).await {
            Ok(qmp) => return qmp,
            Err(_) if tries < 100 => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => panic!("connect to QSD: {e:?}"),
        }
    }
}

#[tokio::test]
async fn negotiates_and_queries_the_version() {
    let qsd = Qsd::start();
    let qmp = connect(&qsd).await;
    let version = qmp.query_version().await.unwrap();
    assert_eq!(version.qemu, qmp.greeting().version.qemu);
    assert!(version.qemu.major >= 7, "{version}");
    // A raw command works too, and an id-less reply shape is not needed.
    let raw = qmp.execute("query-version", Value::Null).await.unwrap();
    assert_eq!(
        raw["qemu"]["major"].as_u64(),
        Some(u64::from(version.qemu.major))
    );
    let nodes = qmp.query_named_block_nodes().await.unwrap();
    let disk = nodes.iter().find(|n| n.node_name == "disk").unwrap();
    assert_eq!(
        (disk.drv.as_str(), disk.image.virtual_size),
        ("qcow2", SIZE)
    );
}

#[tokio::test]
async fn a_storage_daemon_runs_no_vm_so_has_no_vm_identity() {
    let qsd = Qsd::start();
    let qmp = connect(&qsd).await;
    assert_eq!(qmp.query_vm_identity().await.unwrap(), None);
    // Nor guest drives: its nodes reach a VM through exports.
    assert!(qmp.query_block().await.unwrap().is_empty());
    // Every QOM object has a type.
    assert_eq!(qmp.qom_type("/objects").await.unwrap(), "container");
}

#[tokio::test]
async fn qmp_over_tcp() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let qsd = Qsd::start_with(Some(port));
    let qmp = connect(&qsd).await;
    assert!(qmp.query_version().await.unwrap().qemu.major >= 7);
    assert!(qmp.address().starts_with("tcp:"));
}

#[tokio::test]
async fn a_failing_command_gives_the_qmp_error_and_the_connection_stays_usable() {
    let qsd = Qsd::start();
    let qmp = connect(&qsd).await;

    let error = qmp
        .block_dirty_bitmap_add("no-such-node", "bm0", 65536, true)
        .await
        .unwrap_err();
    match &error {
        Error::Command {
            command,
            class,
            desc,
        } => {
            assert_eq!(command, "block-dirty-bitmap-add");
            assert_eq!(*class, ErrorClass::GenericError);
            assert!(desc.contains("no-such-node"), "{desc}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(error.is_not_found(), "{error}");
    assert!(error.to_string().contains("no-such-node"));

    let error = qmp
        .execute("no-such-command", Value::Null)
        .await
        .unwrap_err();
    assert_eq!(error.class(), Some(&ErrorClass::CommandNotFound));

    // A failed transaction changes nothing.
    let failed = qmp
        .transaction(&[
            Action::bitmap_add("disk", "bm1", 65536, false),
            Action::bitmap_disable("disk", "no-such-bitmap"),
        ])
        .await;
    assert!(failed.is_err());
    let nodes = qmp.query_named_block_nodes().await.unwrap();
    let disk = nodes.iter().find(|n| n.node_name == "disk").unwrap();
    assert!(disk.dirty_bitmaps.is_empty(), "{:?}", disk.dirty_bitmaps);
}

#[tokio::test]
async fn events_are_buffered_while_a_reply_is_awaited() {
    let qsd = Qsd::start();
    let qmp = connect(&qsd).await;
    qmp.blockdev_add(json!({"driver": "null-co", "node-name": "target", "size": SIZE}))
        .await
        .unwrap();
    // A sync=none backup runs until cancelled.
    qmp.transaction(&[Action::blockdev_backup(
        "job0", "disk", "target", "none", None,
    )])
    .await
    .unwrap();
    let jobs = qmp.query_jobs().await.unwrap();
    assert!(
        jobs.iter().any(|j| j.id == "job0" && j.kind == "backup"),
        "{jobs:?}"
    );
    let block_jobs = qmp.query_block_jobs().await.unwrap();
    assert!(
        block_jobs.iter().any(|j| j.device == "job0"),
        "{block_jobs:?}"
    );

    qmp.block_job_cancel("job0", false).await.unwrap();
    // Another command's reply comes after the cancellation events; they are
    // kept in the buffer meanwhile.
    qmp.query_version().await.unwrap();
    let buffered: Vec<String> = qmp.buffered_events().into_iter().map(|e| e.name).collect();
    assert!(
        buffered.iter().any(|n| n == "BLOCK_JOB_CANCELLED"),
        "{buffered:?}"
    );

    let cancelled = qmp
        .wait_event(
            "BLOCK_JOB_CANCELLED",
            |e| e.data_str("device") == Some("job0"),
            Duration::ZERO,
        )
        .await
        .unwrap();
    assert_eq!(cancelled.data["type"], "backup");
    assert!(cancelled.timestamp.is_some());
    // The job's first state change is still there, in order.
    let created = qmp
        .wait_event(
            "JOB_STATUS_CHANGE",
            |e| e.data_str("id") == Some("job0"),
            Duration::ZERO,
        )
        .await
        .unwrap();
    assert_eq!(created.data["status"], "created");
    qmp.wait_job_gone("job0", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(qmp.query_jobs().await.unwrap().is_empty());

    // Claimed events are gone; waiting for one more times out cleanly.
    let error = qmp
        .wait_event("BLOCK_JOB_CANCELLED", |_| true, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Timeout { .. }), "{error:?}");

    // job-cancel works as well and the job goes away by itself.
    qmp.transaction(&[Action::blockdev_backup(
        "job1", "disk", "target", "none", None,
    )])
    .await
    .unwrap();
    qmp.job_cancel("job1").await.unwrap();
    qmp.wait_job_gone("job1", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(qmp.query_block_jobs().await.unwrap().is_empty());
}

#[tokio::test]
async fn blockdev_create_runs_a_job_to_its_end_and_dismisses_it() {
    let qsd = Qsd::start();
    let qmp = connect(&qsd).await;
    let file = qsd.path("new.raw");
    qmp.blockdev_create(
        "mk0",
        json!({"driver": "file", "filename": file, "size": 1 << 20}),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 1 << 20);
    assert!(qmp.query_jobs().await.unwrap().is_empty());

    // A job that fails reports its error.
    let error = qmp
        .blockdev_create(
            "mk1",
            json!({"driver": "file", "filename": "/nonexistent-dir/x.raw", "size": 0}),
            Duration::from_secs(10),
        )
        .await
        .unwrap_err();
    assert!(error.desc().is_some(), "{error:?}");
    assert!(qmp.query_jobs().await.unwrap().is_empty());
    // Waiting for a job that does not exist ends at once.
    let none = qmp
        .wait_job("nope", &[JobStatus::Concluded], Duration::from_secs(1))
        .await
        .unwrap();
    assert!(none.is_none());
}

#[tokio::test]
async fn concurrent_commands_get_their_own_replies() {
    let qsd = Qsd::start();
    let qmp = connect(&qsd).await;
    let (a, b, c) = tokio::join!(
        qmp.query_version(),
        qmp.query_named_block_nodes(),
        qmp.execute("no-such-command", Value::Null)
    );
    assert!(a.is_ok());
    assert_eq!(b.unwrap().len(), 2);
    assert!(matches!(c, Err(Error::Command { .. })));
}

#[tokio::test]
async fn a_dead_qemu_gives_closed_not_a_hang() {
    let mut qsd = Qsd::start();
    let qmp = connect(&qsd).await;
    let waiter = qmp.wait_event("NEVER", |_| true, Duration::from_secs(30));
    let killer = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        qsd.kill();
    };
    let (waited, ()) = tokio::join!(waiter, killer);
    assert!(matches!(waited, Err(Error::Closed { .. })), "{waited:?}");
    let error = qmp.query_version().await.unwrap_err();
    assert!(matches!(error, Error::Closed { .. }), "{error:?}");
    assert!(!qmp.is_open());
}

/// A unix listener that answers each connection with `reply` and keeps it
/// open for a while.
fn fake_peer(path: &Path, reply: &'static [u8], close: bool) -> tokio::task::JoinHandle<()> {
    let listener = UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream.write_all(reply).await;
            if !close {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    })
}

#[tokio::test]
async fn a_socket_that_is_not_qmp_gives_a_clear_error_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        greeting_timeout: Duration::from_millis(300),
        ..Options::default()
    };
    let cases: [(&str, &[u8], bool); 5] = [
        ("garbage-line", b"\x00\x01garbage that is not json\n", false),
        ("json-not-qmp", b"{\"hello\": 1}\n", false),
        ("no-newline", b"NBDMAGIC\x00\x00\x00\x00IHAVEOPT", false),
        ("closes", b"", true),
        ("silent", b"", false),
    ];
    for (name, reply, close) in cases {
        let path = dir.path().join(name);
        let peer = fake_peer(&path, reply, close);
        let started = Instant::now();
        let error = Qmp::connect_with(Address::Unix(path), options.clone())
            .await
            .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{name} took {:?}",
            started.elapsed()
        );
        match (name, &error) {
            ("silent", Error::Timeout { .. }) => {}
            (_, Error::NotQmp { detail, .. }) if name != "silent" => {
                assert!(!detail.is_empty());
            }
            _ => panic!("{name}: unexpected {error:?}"),
        }
        assert!(error.to_string().contains(name), "{name}: {error}");
        peer.abort();
    }
    let error = Qmp::connect(dir.path().join("absent")).await.unwrap_err();
    assert!(matches!(error, Error::Connect { .. }), "{error:?}");
}

#[tokio::test]
async fn a_second_client_waits_for_the_first_and_says_why() {
    let qsd = Qsd::start();
    let first = connect(&qsd).await;
    let options = Options {
        greeting_timeout: Duration::from_millis(300),
        ..Options::default()
    };
    let error = Qmp::connect_with(qsd.qmp.clone(), options)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Timeout { .. }), "{error:?}");
    assert!(
        error.to_string().contains("one client at a time"),
        "{error}"
    );
    drop(first);
    let second = connect(&qsd).await;
    assert!(second.query_version().await.is_ok());
}
