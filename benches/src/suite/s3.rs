//! The S3 server the suite's bucket lives in, on loopback: `s3s-fs` (a
//! Rust server over a directory, which `scripts/bench` installs with cargo
//! install) when it is on PATH, else moto (Python, which
//! `scripts/install-deps` installs for the tests). The report names which
//! one served, because the server bounds what an S3 repository can do.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The bucket every S3 repository of the suite goes into.
pub const BUCKET: &str = "bench";

/// A server process on a free loopback port, killed when dropped.
pub struct S3Server {
    child: Child,
    port: u16,
    /// `s3s-fs` or `moto`.
    pub kind: &'static str,
}

impl S3Server {
    /// Starts the best server found, with [`BUCKET`] made; its files (for
    /// s3s-fs) go under `dir`.
    pub fn start(dir: &Path) -> Result<S3Server> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let (access, secret) = CREDENTIALS;
        let s3s_fs = Command::new("s3s-fs")
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let (child, kind) = if s3s_fs {
            let root = dir.join("s3-root");
            // s3s-fs serves each directory under its root as a bucket.
            std::fs::create_dir_all(root.join(BUCKET))?;
            let child = Command::new("s3s-fs")
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", access, "--secret-key", secret])
                .arg(&root)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting s3s-fs")?;
            (child, "s3s-fs")
        } else {
            let child = Command::new("python3")
                .args([
                    "-m",
                    "moto.server",
                    "-H",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("python3 -m moto.server (scripts/install-deps installs moto)")?;
            (child, "moto")
        };
        let server = S3Server { child, port, kind };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("the S3 server ({kind}) did not start on port {port}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if kind == "moto" {
            server.create_bucket_unsigned()?;
        }
        Ok(server)
    }

    /// moto takes an unsigned bucket creation.
    fn create_bucket_unsigned(&self) -> Result<()> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        write!(
            s,
            "PUT /{BUCKET} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        if !answer.starts_with("HTTP/1.1 200") {
            bail!("moto did not create bucket {BUCKET}: {answer}");
        }
        Ok(())
    }

    /// The URL of a repository under `prefix` of the bucket.
    pub fn repo_url(&self, prefix: &str) -> String {
        format!(
            "s3://{BUCKET}/{prefix}?endpoint=http://127.0.0.1:{}",
            self.port
        )
    }

    /// The environment that gives cbtvault the server's credentials.
    pub fn credentials(&self) -> [(&'static str, &'static str); 2] {
        [
            ("AWS_ACCESS_KEY_ID", CREDENTIALS.0),
            ("AWS_SECRET_ACCESS_KEY", CREDENTIALS.1),
        ]
    }
}

const CREDENTIALS: (&str, &str) = ("cbtvault-bench", "cbtvault-bench-secret");

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
