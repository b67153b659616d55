//! The S3 backend against the local one on the same bytes, in one run: a
//! generated disk backed up in full, changed and backed up incrementally
//! from the changed-block bitmap, then restored, into a local repository
//! and into a bucket of an S3 server on loopback; then `copy` from the
//! local repository into another bucket prefix (copy throughput).
//!
//! The server is `s3s-fs` (a Rust S3 server over a directory, installed by
//! `scripts/bench s3` with cargo install), so that the figures measure
//! cbtvault and not the server; `--server moto` uses the Python server the
//! tests use, which is far slower and bounds the figures by itself.
//!
//! `scripts/bench s3 [--size-gib N] [--churn F]`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Size of the generated disk in GiB.
    #[arg(long, default_value_t = 1)]
    size_gib: u64,
    /// Share of blocks changed between the two backups.
    #[arg(long, default_value_t = 0.01)]
    churn: f64,
    /// The S3 server: `s3s-fs` (found on PATH) or `moto`.
    #[arg(long, default_value = "s3s-fs")]
    server: String,
    /// Work here and keep it (a temporary directory by default).
    #[arg(long)]
    dir: Option<PathBuf>,
}

const ACCESS_KEY: &str = "cbtvault-bench";
const SECRET_KEY: &str = "cbtvault-bench-secret";

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts the server with bucket `bench`; returns it and its endpoint.
fn start_server(kind: &str, dir: &Path) -> Result<(Server, String)> {
    let port = free_port()?;
    let child = match kind {
        "s3s-fs" => {
            let root = dir.join("s3-root");
            // s3s-fs serves each directory under its root as a bucket.
            std::fs::create_dir_all(root.join("bench"))?;
            Command::new("s3s-fs")
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
                .arg(&root)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("s3s-fs (scripts/bench s3 installs it with cargo install)")?
        }
        "moto" => Command::new("python3")
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
            .context("python3 -m moto.server (scripts/install-deps installs moto)")?,
        other => bail!("--server {other}: give s3s-fs or moto"),
    };
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("the S3 server did not start on port {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if kind == "moto" {
        // moto takes an unsigned bucket creation.
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        write!(
            s,
            "PUT /bench HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
    }
    Ok((server, format!("http://127.0.0.1:{port}")))
}

/// Runs cbtvault on repository `repo`; returns the wall time until it
/// exited (restores fsync before exiting: until durable).
fn timed(cbtvault: &Path, dir: &Path, repo: &str, args: &[&str]) -> Result<Duration> {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let start = Instant::now();
    let out = Command::new(cbtvault)
        .args(args)
        .env("CBTVAULT_REPO", repo)
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env(
            "CBTVAULT_CACHE_DIR",
            dir.join("cache").join(cache_name(repo)),
        )
        .output()
        .with_context(|| format!("running cbtvault {args:?}"))?;
    let wall = start.elapsed();
    if !out.status.success() {
        bail!(
            "cbtvault {args:?} on {repo}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(wall)
}

fn cache_name(repo: &str) -> String {
    blake3::hash(repo.as_bytes()).to_hex()[..16].to_string()
}

/// Full, incremental and restore times on `repo`.
struct Figures {
    full: Duration,
    incremental: Duration,
    restore: Duration,
}

fn measure(
    cbtvault: &Path,
    dir: &Path,
    repo: &str,
    image: &Path,
    first: &Path,
    bitmap: &Path,
) -> Result<Figures> {
    timed(cbtvault, dir, repo, &["init", "--quiet"])?;
    let work = dir.join("work.img");
    std::fs::copy(first, &work)?;
    let source = format!("file:{}", work.display());
    let full = timed(
        cbtvault,
        dir,
        repo,
        &["backup", "--quiet", "--disk", "d", "--source", &source],
    )?;
    std::fs::copy(image, &work)?;
    let incremental = timed(
        cbtvault,
        dir,
        repo,
        &[
            "backup",
            "--quiet",
            "--disk",
            "d",
            "--source",
            &source,
            "--changed-blocks",
            &bitmap.display().to_string(),
        ],
    )?;
    let to = dir.join("restored.img");
    let _ = std::fs::remove_file(&to);
    let restore = timed(
        cbtvault,
        dir,
        repo,
        &[
            "restore",
            "--quiet",
            "d@latest",
            "--to",
            &to.display().to_string(),
        ],
    )?;
    if file_hash(&to)? != file_hash(image)? {
        bail!("the restore from {repo} differs from the disk");
    }
    std::fs::remove_file(&to)?;
    Ok(Figures {
        full,
        incremental,
        restore,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    let cbtvault = std::env::current_exe()?.with_file_name("cbtvault");
    if !cbtvault.exists() {
        bail!("{} is missing: build it with --release", cbtvault.display());
    }
    let temp = tempfile::tempdir()?;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => temp.path().to_path_buf(),
    };
    let dir = dir.as_path();
    let size = args.size_gib << 30;
    println!(
        "generating a {} GiB disk and a {:.1}% change",
        args.size_gib,
        args.churn * 100.0
    );
    let first = dir.join("first.img");
    cbtvault_testkit::synth::write_image(&first, size, 1, cbtvault_testkit::synth::Mix::default())?;
    let image = dir.join("second.img");
    std::fs::copy(&first, &image)?;
    let changed = cbtvault_testkit::synth::churn(&image, args.churn, 2)?;
    let bitmap = dir.join("changed.b64");
    std::fs::write(&bitmap, changed.to_xenapi_base64())?;

    let (_server, endpoint) = start_server(&args.server, dir)?;
    let local = dir.join("local").display().to_string();
    let s3 = format!("s3://bench/r?endpoint={endpoint}");
    let l = measure(&cbtvault, dir, &local, &image, &first, &bitmap)?;
    let s = measure(&cbtvault, dir, &s3, &image, &first, &bitmap)?;
    let copy_to = format!("s3://bench/copy?endpoint={endpoint}");
    timed(&cbtvault, dir, &copy_to, &["init", "--quiet"])?;
    let copy = timed(
        &cbtvault,
        dir,
        &local,
        &["copy", "--quiet", "--from", &local, "--to", &copy_to],
    )?;
    let stored: u64 = walk_size(&PathBuf::from(&local).join("packs"))?;

    let secs = |d: Duration| d.as_secs_f64();
    println!("{:<12} {:>9} {:>9} {:>7}", "", "local", "s3", "s3/local");
    for (name, a, b) in [
        ("full", l.full, s.full),
        ("incremental", l.incremental, s.incremental),
        ("restore", l.restore, s.restore),
    ] {
        println!(
            "{name:<12} {:>8.2}s {:>8.2}s {:>6.2}x",
            secs(a),
            secs(b),
            secs(b) / secs(a)
        );
    }
    let verdict = |met: bool| if met { "met" } else { "missed" };
    let full_speed = secs(l.full) / secs(s.full);
    let incr = secs(s.incremental) / secs(l.incremental);
    println!(
        "S3 full backup at {full_speed:.2}x the local speed (goal >= 0.8x: {}); S3 incremental {incr:.2}x the local time (goal <= 2x: {})",
        verdict(full_speed >= 0.8),
        verdict(incr <= 2.0)
    );
    println!(
        "copy local -> S3: {:.2} s for {:.0} MB stored, {:.0} MB/s",
        secs(copy),
        stored as f64 / 1e6,
        stored as f64 / 1e6 / secs(copy)
    );
    Ok(())
}

/// Bytes in the files under `dir`.
fn walk_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            walk_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

fn file_hash(path: &Path) -> Result<blake3::Hash> {
    let mut hasher = blake3::Hasher::new();
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    std::io::copy(
        &mut std::io::BufReader::with_capacity(1 << 20, file),
        &mut hasher,
    )?;
    Ok(hasher.finalize())
}
