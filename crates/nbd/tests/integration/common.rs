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
        // Written to the real stderr, not through the test harness's
        // capture, so the skip shows even when the test passes.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: `{bin}` is not installed"
        );
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

/// A throwaway CA and a server certificate for 127.0.0.1 and localhost,
/// written as `ca-cert.pem`, `server-cert.pem`, `server-key.pem` (the file
/// names QEMU's tls-creds-x509 expects) into `dir`.
pub struct Certs {
    pub dir: std::path::PathBuf,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

pub fn make_certs(dir: &Path) -> Certs {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "cbtvault test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();

    let mut leaf =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key).unwrap();

    std::fs::create_dir_all(dir).unwrap();
    let certs = Certs {
        dir: dir.to_owned(),
        ca_pem: ca_cert.pem(),
        cert_pem: leaf_cert.pem(),
        key_pem: leaf_key.serialize_pem(),
    };
    std::fs::write(dir.join("ca-cert.pem"), &certs.ca_pem).unwrap();
    std::fs::write(dir.join("server-cert.pem"), &certs.cert_pem).unwrap();
    std::fs::write(dir.join("server-key.pem"), &certs.key_pem).unwrap();
    certs
}

/// The rustls server configuration for these certificates.
pub fn server_tls(certs: &Certs) -> std::sync::Arc<rustls::ServerConfig> {
    cbtvault_nbd::tls::server_config(
        &cbtvault_nbd::Pem::Inline(certs.cert_pem.clone()),
        &cbtvault_nbd::Pem::Inline(certs.key_pem.clone()),
    )
    .unwrap()
}
