//! `cbtvault serve` against qemu-nbd on the same bytes: a generated image
//! is backed up and restored to a raw file; qemu-nbd serves the raw file
//! and `cbtvault serve` the restore point, both read-only on unix sockets,
//! and `nbdcopy --connections=N URI null:` reads each whole, alternating,
//! in the same run. Beside them, what bounds a server that checks every
//! block: BLAKE3 and zstd decompression on one core, over the same blocks.
//!
//! `scripts/bench serve [--size-gib N] [--connections N] [--rounds R]`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Size of the generated image in GiB.
    #[arg(long, default_value_t = 4)]
    size_gib: u64,
    /// nbdcopy connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Reads of each server (alternating).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Then one more read of `serve` under `perf record -g`, into this file.
    #[arg(long, value_name = "FILE")]
    perf: Option<std::path::PathBuf>,
}

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_socket(path: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {}", path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().with_context(|| what.to_string())?;
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// One read of a server by nbdcopy: wall time, and CPU seconds of the
/// server and of nbdcopy.
#[derive(Clone, Copy)]
struct Reading {
    wall: Duration,
    server_cpu: f64,
    client_cpu: f64,
}

/// CPU seconds (user + system) a live process has used, from /proc.
fn process_cpu(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("/proc/PID/stat without a command name")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        Ok(fields
            .get(i)
            .context("/proc/PID/stat too short")?
            .parse::<f64>()?)
    };
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the name.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((ticks(11)? + ticks(12)?) / hz)
}

/// CPU seconds used by the children this process has waited for.
fn children_cpu() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn read_whole(server: &Server, socket: &Path, connections: usize) -> Result<Reading> {
    let (server_before, client_before) = (process_cpu(server.0.id())?, children_cpu());
    let wall = nbdcopy(socket, connections)?;
    Ok(Reading {
        wall,
        server_cpu: process_cpu(server.0.id())? - server_before,
        client_cpu: children_cpu() - client_before,
    })
}

fn nbdcopy(socket: &Path, connections: usize) -> Result<Duration> {
    let start = Instant::now();
    run(
        Command::new("nbdcopy")
            .arg(format!("--connections={connections}"))
            .arg(format!("nbd+unix:///?socket={}", socket.display()))
            .arg("null:"),
        "nbdcopy (scripts/install-deps installs it)",
    )?;
    Ok(start.elapsed())
}

/// Single-core BLAKE3 and zstd-decompression rates (bytes/s) over the
/// image's blocks, as the repository stores them.
fn ceilings(image: &Path) -> Result<(f64, f64, f64)> {
    use std::io::Read;
    let mut file = std::fs::File::open(image)?;
    let mut block = vec![0u8; 64 << 10];
    let (mut hashed, mut hash_time) = (0u64, Duration::ZERO);
    let (mut compressed_raw, mut decompress_time, mut blocks, mut compressed) =
        (0u64, Duration::ZERO, 0u64, 0u64);
    let mut decompressor = zstd::bulk::Decompressor::new()?;
    // A sample of 256 MiB is enough for a rate.
    for _ in 0..4096 {
        if file.read_exact(&mut block).is_err() {
            break;
        }
        if block.iter().all(|&b| b == 0) {
            continue;
        }
        blocks += 1;
        let t = Instant::now();
        std::hint::black_box(blake3::hash(&block));
        hash_time += t.elapsed();
        hashed += block.len() as u64;
        let packed = zstd::bulk::compress(&block, 3)?;
        if packed.len() < block.len() {
            compressed += 1;
            let t = Instant::now();
            std::hint::black_box(decompressor.decompress(&packed, block.len())?);
            decompress_time += t.elapsed();
            compressed_raw += block.len() as u64;
        }
    }
    let rate = |bytes: u64, t: Duration| bytes as f64 / t.as_secs_f64().max(1e-9);
    Ok((
        rate(hashed, hash_time),
        rate(compressed_raw, decompress_time),
        compressed as f64 / blocks.max(1) as f64,
    ))
}

/// CPU seconds that checking every non-zero block of `image` costs at
/// the measured single-core rates.
fn checked_cpu_seconds(
    image: &Path,
    size: u64,
    blake3: f64,
    unzstd: f64,
    share: f64,
) -> Result<f64> {
    use std::io::Read;
    let mut file = std::fs::File::open(image)?;
    let mut block = vec![0u8; 64 << 10];
    let mut nonzero = 0u64;
    let mut read = 0u64;
    while read < size {
        file.read_exact(&mut block)?;
        read += block.len() as u64;
        if block.iter().any(|&b| b != 0) {
            nonzero += block.len() as u64;
        }
    }
    let bytes = nonzero as f64;
    Ok(bytes / blake3 + bytes * share / unzstd)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let cbtvault = std::env::current_exe()?.with_file_name("cbtvault");
    if !cbtvault.exists() {
        bail!("{} is missing: build it with --release", cbtvault.display());
    }
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("disk.img");
    let size = args.size_gib << 30;
    println!("generating a {} GiB image", args.size_gib);
    cbtvault_testkit::synth::write_image(&image, size, 1, cbtvault_testkit::synth::Mix::default())?;
    let repo = dir.path().join("repo");
    run(
        Command::new(&cbtvault)
            .args(["init", "--quiet", "--repo"])
            .arg(&repo),
        "cbtvault init",
    )?;
    run(
        Command::new(&cbtvault)
            .args(["backup", "--quiet", "--repo"])
            .arg(&repo)
            .args(["--disk", "d", "--source"])
            .arg(format!("file:{}", image.display())),
        "cbtvault backup",
    )?;
    let raw = dir.path().join("restored.raw");
    run(
        Command::new(&cbtvault)
            .args(["restore", "--quiet", "--repo"])
            .arg(&repo)
            .args(["d@latest", "--to"])
            .arg(&raw),
        "cbtvault restore",
    )?;
    let (q_sock, c_sock) = (
        dir.path().join("qemu.sock"),
        dir.path().join("cbtvault.sock"),
    );
    let qemu = Server(
        Command::new("qemu-nbd")
            .args(["-r", "-f", "raw", "-t", "-e", "16", "-k"])
            .arg(&q_sock)
            .arg(&raw)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("qemu-nbd (scripts/install-deps installs qemu-utils)")?,
    );
    let serve = Server(
        Command::new(&cbtvault)
            .args(["serve", "--quiet", "--repo"])
            .arg(&repo)
            .arg("d@latest")
            .arg(format!("--listen=unix:{}", c_sock.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    wait_for_socket(&q_sock)?;
    wait_for_socket(&c_sock)?;
    let mut best: Option<(Reading, Reading)> = None;
    for round in 0..args.rounds {
        let q = read_whole(&qemu, &q_sock, args.connections)?;
        let c = read_whole(&serve, &c_sock, args.connections)?;
        println!(
            "round {}: qemu-nbd {:.2} s (server {:.2} s CPU, nbdcopy {:.2} s), \
             cbtvault serve {:.2} s (server {:.2} s CPU, nbdcopy {:.2} s)",
            round + 1,
            q.wall.as_secs_f64(),
            q.server_cpu,
            q.client_cpu,
            c.wall.as_secs_f64(),
            c.server_cpu,
            c.client_cpu,
        );
        best = Some(match best {
            None => (q, c),
            Some((bq, bc)) => (
                if q.wall < bq.wall { q } else { bq },
                if c.wall < bc.wall { c } else { bc },
            ),
        });
    }
    let (q_best, c_best) = best.context("--rounds must be at least 1")?;
    let mbs = |t: Duration| size as f64 / t.as_secs_f64() / 1e6;
    println!(
        "best of {}: qemu-nbd {:.0} MB/s, cbtvault serve {:.0} MB/s: serve / qemu-nbd = {:.2}x",
        args.rounds,
        mbs(q_best.wall),
        mbs(c_best.wall),
        q_best.wall.as_secs_f64() / c_best.wall.as_secs_f64()
    );
    if let Some(file) = &args.perf {
        let mut perf = Command::new("perf")
            .args(["record", "-g", "-o"])
            .arg(file)
            .arg("-p")
            .arg(serve.0.id().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("perf (Debian's linux-perf)")?;
        std::thread::sleep(Duration::from_millis(500));
        nbdcopy(&c_sock, args.connections)?;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(perf.id() as libc::pid_t, libc::SIGINT) };
        perf.wait()?;
        println!("profile of one read of serve: {}", file.display());
    }
    let (blake3, unzstd, share) = ceilings(&image)?;
    println!(
        "one core: BLAKE3 {:.0} MB/s, zstd decompression {:.0} MB/s ({:.0}% of the non-zero blocks are compressed)",
        blake3 / 1e6,
        unzstd / 1e6,
        share * 100.0
    );
    // What this machine allows at best: serve has to move the bytes as
    // qemu-nbd does (its CPU for the same read) and also decompress and
    // check every block; nbdcopy needs what it needed reading serve. All
    // of it shared over the machine's cores.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let must = checked_cpu_seconds(&image, size, blake3, unzstd, share)?;
    let floor = (q_best.server_cpu + must + c_best.client_cpu) / cores;
    println!(
        "serve's least CPU: qemu-nbd's {:.2} s + decompressing and checking every non-zero block {must:.2} s; \
         with nbdcopy's {:.2} s over {cores} cores a read takes at least {floor:.2} s, \
         so serve / qemu-nbd is at most {:.2}x on this machine (serve used {:.2} s of CPU)",
        q_best.server_cpu,
        c_best.client_cpu,
        q_best.wall.as_secs_f64() / floor,
        c_best.server_cpu,
    );
    Ok(())
}
