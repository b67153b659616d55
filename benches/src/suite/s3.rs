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
use cbtvault_repo::{Backend, DEFAULT_PACK_SIZE, FileKind};
use cbtvault_s3::{Credentials, S3Backend, S3Location};

use crate::measure::{self, Cost};

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

impl S3Server {
    /// The upload ceiling: `bytes` put into the server as objects of a
    /// pack's size, two at a time (as a backup's packs go up while the
    /// next fills), through the same client cbtvault uses, in a process of
    /// its own (this one, started with `--s3-put-ceiling`), so that it is
    /// measured as the tools are and leaves nothing in the suite's memory.
    /// An S3 backup cannot store faster than this server takes bytes here.
    pub fn upload_ceiling(&self, bytes: u64) -> Result<Cost> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args([
            "--s3-put-ceiling",
            &self.repo_url("ceiling"),
            &bytes.to_string(),
        ])
        .envs(self.credentials());
        let (cost, _) = measure::run("the S3 upload ceiling", &mut cmd, false)?;
        Ok(cost)
    }
}

/// The upload ceiling's process: puts `bytes` into the repository URL
/// `url` as [`S3Server::upload_ceiling`] says.
pub fn put_ceiling(url: &str, bytes: u64) -> Result<()> {
    let location = S3Location::parse(url)?;
    let credentials = Credentials {
        access_key_id: CREDENTIALS.0.into(),
        secret_access_key: CREDENTIALS.1.into(),
        session_token: None,
    };
    let backend = S3Backend::connect(&location, &credentials)?;
    let mut object = vec![0u8; DEFAULT_PACK_SIZE as usize];
    blake3::Hasher::new().finalize_xof().fill(&mut object);
    let objects = bytes.div_ceil(DEFAULT_PACK_SIZE);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..2u64)
            .map(|worker| {
                let (backend, object) = (&backend, &object);
                scope.spawn(move || -> Result<()> {
                    for n in (worker..objects).step_by(2) {
                        backend.write(FileKind::Pack, &format!("{n:08x}"), object)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("an upload thread panicked"))??;
        }
        Ok(())
    })
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
