//! Helpers: child-process guard, free ports, waiting for sockets, test data.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills and reaps the child when dropped, so a failing test leaves no
/// server behind.
pub struct ChildGuard {
    child: Child,
    what: String,
}

impl ChildGuard {
    pub fn spawn(cmd: &mut Command) -> ChildGuard {
        let what = format!("{cmd:?}");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        ChildGuard { child, what }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Panics if the child already exited (it failed to start serving).
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited early: {status}", self.what);
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether `bin` is on PATH; prints a skip notice when it is not.
pub fn have(bin: &str, test: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false);
    if !found {
        println!("SKIPPED {test}: `{bin}` is not installed");
        eprintln!("SKIPPED {test}: `{bin}` is not installed");
    }
    found
}

pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local address").port()
}

/// Waits until a unix socket exists (and accepts) or a TCP port accepts.
pub fn wait_unix(path: &Path, child: &mut ChildGuard) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return;
        }
        child.assert_running();
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{} never became ready", path.display());
}

pub fn wait_tcp(port: u16, child: &mut ChildGuard) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        child.assert_running();
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("port {port} never became ready");
}

/// Deterministic, incompressible-looking bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Runs a command to completion and panics with its output on failure.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts `qemu-nbd` with the given extra arguments on a unix socket.
pub fn qemu_nbd_unix(socket: &Path, args: &[&str]) -> ChildGuard {
    let mut g = ChildGuard::spawn(
        Command::new("qemu-nbd")
            .arg("--persistent")
            .arg("--shared=8")
            .arg("--socket")
            .arg(socket)
            .args(args),
    );
    wait_unix(socket, &mut g);
    g
}
