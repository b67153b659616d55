//! `cbtvault serve` under hostile clients beside nbdcopy: clients that
//! pipeline large reads and never read the replies, idle clients after
//! the handshake, silent sockets before it, and a connect flood. The
//! server's peak RSS (from /proc) stays bounded, its descriptors do not
//! grow with the clients it served, and nbdcopy copies the disk exactly.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cbtvault_nbd::proto;

use crate::common::*;

/// Everything waited for; only a hang reaches it.
const PATIENCE: Duration = Duration::from_secs(120);

/// The server, killed when the test ends.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Serve {
    /// A /proc/PID/status field in KiB.
    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.0.id()))
            .expect("the server is running");
        status
            .lines()
            .find_map(|l| {
                l.strip_prefix(field)?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("{field} in {status}"))
    }

    fn descriptors(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.0.id()))
            .expect("the server's descriptors")
            .count()
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.set_write_timeout(Some(PATIENCE)).unwrap();
    s
}

/// Negotiates by hand up to the transmission phase (simple replies).
fn handshake(s: &mut TcpStream) -> std::io::Result<()> {
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting)?;
    // Client flags, then NBD_OPT_GO for the default export ("", no infos).
    let mut b = Vec::new();
    b.extend((proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES).to_be_bytes());
    b.extend(proto::IHAVEOPT.to_be_bytes());
    b.extend(proto::OPT_GO.to_be_bytes());
    b.extend(6u32.to_be_bytes());
    b.extend([0u8; 6]);
    s.write_all(&b)?;
    loop {
        let mut head = [0u8; 20];
        s.read_exact(&mut head)?;
        let kind = u32::from_be_bytes([head[12], head[13], head[14], head[15]]);
        let len = u32::from_be_bytes([head[16], head[17], head[18], head[19]]);
        std::io::copy(&mut (&mut *s).take(u64::from(len)), &mut std::io::sink())?;
        if kind == proto::REP_ACK {
            return Ok(());
        }
        if kind & proto::REP_ERR_BIT != 0 {
            return Err(std::io::Error::other("GO refused"));
        }
    }
}

/// Runs `cmd` to its end within the patience.
fn run_in_time(cmd: &mut Command) -> std::process::ExitStatus {
    let mut child = cmd.stderr(Stdio::piped()).spawn().expect("spawn");
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            if !status.success() {
                let mut err = String::new();
                let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
                panic!("{cmd:?} failed: {err}");
            }
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{cmd:?} did not finish in {PATIENCE:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn nbdcopy(addr: SocketAddr, to: &Path) {
    run_in_time(
        Command::new("nbdcopy")
            .arg("--connections=4")
            .arg(format!("nbd://{addr}"))
            .arg(to),
    );
}

#[test]
fn serve_stays_bounded_under_hostile_clients_and_nbdcopy_reads_right() {
    let found = Command::new("which")
        .arg("nbdcopy")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(found, "nbdcopy is not installed: run scripts/install-deps");
    let s = Scratch::new();
    let image = s.image("src.img", 64, 90);
    let rp = id(&s.backup("d", &image, None));
    let mut child = s
        .command()
        .args(["serve", "--json", &rp, "--listen=127.0.0.1:0"])
        .args(["--idle-timeout=600"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("serve");
    // The announcement is one JSON object, over several lines.
    let mut text = String::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let server = Serve(child);
    let announced: serde_json::Value = loop {
        let n = out
            .read_line(&mut text)
            .expect("serve announces where it listens");
        assert!(n > 0, "serve ended before listening: {text}");
        if let Ok(v) = serde_json::from_str(&text) {
            break v;
        }
    };
    let addr: SocketAddr = announced["listen"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .expect("listen address");

    // Eight clients pipeline 100 reads of 32 MiB each (3.2 GB asked) and
    // never read a reply.
    let size = 64 * MIB;
    let mut pipelined = Vec::new();
    for i in 0..100u64 {
        pipelined.extend(proto::REQUEST_MAGIC.to_be_bytes());
        pipelined.extend(0u16.to_be_bytes());
        pipelined.extend(proto::CMD_READ.to_be_bytes());
        pipelined.extend(i.to_be_bytes());
        pipelined.extend(((i % 2) * (size / 2)).to_be_bytes());
        pipelined.extend((size as u32 / 2).to_be_bytes());
    }
    let mut hostile = Vec::new();
    for _ in 0..8 {
        let mut c = connect(addr);
        handshake(&mut c).expect("handshake");
        c.write_all(&pipelined).expect("requests sent");
        hostile.push(c);
    }
    // Idle clients after the handshake, silent sockets before it.
    for _ in 0..20 {
        let mut c = connect(addr);
        if handshake(&mut c).is_ok() {
            hostile.push(c);
        }
    }
    for _ in 0..20 {
        hostile.push(connect(addr));
    }
    // A connect flood beside nbdcopy, from another address (127.0.0.2):
    // it is held to that peer's share.
    let flood = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            for _ in 0..200 {
                let Ok(sock) = tokio::net::TcpSocket::new_v4() else {
                    continue;
                };
                if sock.bind(SocketAddr::from(([127, 0, 0, 2], 0))).is_ok() {
                    let c = tokio::time::timeout(Duration::from_secs(5), sock.connect(addr));
                    drop(c.await);
                }
            }
        });
    });
    let copied = s.path("copied.img");
    nbdcopy(addr, &copied);
    assert_same_file(&image, &copied);
    flood.join().unwrap();

    // Before any fix one such client alone drove the server past 1.8 GiB.
    let peak_mib = server.status_kib("VmHWM:") / 1024;
    eprintln!("server peak RSS: {peak_mib} MiB");
    assert!(peak_mib < 512, "server peak RSS {peak_mib} MiB");

    // Bursts of clients leave no readers behind: the pool is fixed.
    drop(hostile);
    for i in 0..3 {
        let again = s.path(&format!("again{i}.img"));
        nbdcopy(addr, &again);
        std::fs::remove_file(&again).unwrap();
    }
    let deadline = Instant::now() + PATIENCE;
    let mut fds = server.descriptors();
    // Closed connections leave the server shortly after their clients.
    while fds > 48 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        fds = server.descriptors();
    }
    eprintln!("server descriptors after the bursts: {fds}");
    assert!(
        fds <= 48,
        "the server holds {fds} descriptors after its clients left"
    );
}
