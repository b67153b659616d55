//! NBD read throughput: cbtvault's client against `nbdcopy URI null:` on
//! the same qemu-nbd export in the same run, over a unix socket and over
//! 127.0.0.1 TCP, with 1 and 4 connections; then 1% of the blocks read at
//! random scattered offsets, to show the cost follows the blocks read.
//!
//! `scripts/bench nbd [--size-gib N]`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cbtvault_nbd::{Client, ConnectOptions};
use clap::Parser;
use futures::StreamExt;

#[derive(Parser)]
struct Args {
    /// Size of the exported image in GiB.
    #[arg(long, default_value_t = 4)]
    size_gib: u64,
    /// Bytes per read request of our client.
    #[arg(long, default_value_t = 256 << 10)]
    request: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 32)]
    inflight: usize,
}

struct Peer(Child);
impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_until(what: &str, ready: impl Fn() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready() {
        if Instant::now() > deadline {
            bail!("{what} did not come up");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn nbdcopy(uri: &str, connections: usize) -> Result<Duration> {
    let start = Instant::now();
    let status = Command::new("nbdcopy")
        .arg(format!("--connections={connections}"))
        .args([uri, "null:"])
        .status()
        .context("running nbdcopy (scripts/install-deps installs it)")?;
    if !status.success() {
        bail!("nbdcopy {uri} failed");
    }
    Ok(start.elapsed())
}

async fn ours(options: &ConnectOptions, request: usize, inflight: usize) -> Result<Duration> {
    let client = Client::connect(options).await?;
    let size = client.size();
    let start = Instant::now();
    let offsets: Vec<u64> = (0..size.div_ceil(request as u64))
        .map(|i| i * request as u64)
        .collect();
    let mut reads = futures::stream::iter(offsets)
        .map(|off| {
            let client = &client;
            async move {
                client
                    .read(off, (size - off).min(request as u64) as usize)
                    .await
            }
        })
        .buffer_unordered(inflight * client.connections());
    let mut total = 0u64;
    while let Some(r) = reads.next().await {
        total += r?.len() as u64;
    }
    let elapsed = start.elapsed();
    if total != size {
        bail!("read {total} of {size} bytes");
    }
    client.disconnect().await;
    Ok(elapsed)
}

async fn scattered(
    options: &ConnectOptions,
    fraction: f64,
    inflight: usize,
) -> Result<(usize, Duration)> {
    let client = Client::connect(options).await?;
    let blocks = client.size() / 65536;
    let count = ((blocks as f64) * fraction) as usize;
    // A fixed stride permutation spreads the blocks over the whole disk.
    let stride = 7919u64;
    let picks: Vec<u64> = (0..count as u64)
        .map(|i| (i * stride * 101) % blocks)
        .collect();
    let start = Instant::now();
    let mut reads = futures::stream::iter(picks)
        .map(|b| {
            let client = &client;
            async move { client.read(b * 65536, 65536).await }
        })
        .buffer_unordered(inflight);
    while let Some(r) = reads.next().await {
        r?;
    }
    let elapsed = start.elapsed();
    client.disconnect().await;
    Ok((count, elapsed))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("export.img");
    eprintln!("generating a {} GiB image", args.size_gib);
    let mix = cbtvault_testkit::synth::Mix {
        holes: false,
        ..Default::default()
    };
    cbtvault_testkit::synth::write_image(&image, args.size_gib << 30, 9, mix)?;
    let sock = dir.path().join("nbd.sock");
    let port = free_port()?;
    let start = |extra: &[&str]| -> Result<Peer> {
        Ok(Peer(
            Command::new("qemu-nbd")
                .args(["-r", "-t", "--shared=16", "-f", "raw", "--cache=writeback"])
                .args(extra)
                .arg(&image)
                .stderr(Stdio::null())
                .spawn()
                .context("starting qemu-nbd")?,
        ))
    };
    let _unix = start(&["-k", sock.to_str().unwrap_or_default()])?;
    let _tcp = start(&["-b", "127.0.0.1", "-p", &port.to_string()])?;
    wait_until("qemu-nbd (unix)", || Path::new(&sock).exists())?;
    wait_until("qemu-nbd (tcp)", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })?;
    // Warm the page cache so both readers see the same memory-speed source.
    nbdcopy(&format!("nbd+unix:///?socket={}", sock.display()), 4)?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let size = args.size_gib << 30;
    println!(
        "{:<8} {:>5} {:>14} {:>14} {:>10}",
        "over", "conns", "nbdcopy MB/s", "cbtvault MB/s", "ratio"
    );
    let mut full_unix_1 = None;
    for (name, uri) in [
        ("unix", format!("nbd+unix:///?socket={}", sock.display())),
        ("tcp", format!("nbd://127.0.0.1:{port}/")),
    ] {
        for conns in [1usize, 4] {
            let theirs = nbdcopy(&uri, conns)?;
            let mut options = ConnectOptions::from_uri(&uri)?;
            options.connections = conns;
            options.inflight = args.inflight;
            let mine = rt.block_on(ours(&options, args.request, args.inflight))?;
            if name == "unix" && conns == 1 {
                full_unix_1 = Some((options.clone(), mine));
            }
            let mbps = |d: Duration| size as f64 / 1e6 / d.as_secs_f64();
            println!(
                "{:<8} {:>5} {:>14.0} {:>14.0} {:>9.2}x",
                name,
                conns,
                mbps(theirs),
                mbps(mine),
                theirs.as_secs_f64() / mine.as_secs_f64()
            );
        }
    }
    if let Some((options, full)) = full_unix_1 {
        let (count, took) = rt.block_on(scattered(&options, 0.01, args.inflight))?;
        println!(
            "scattered: {count} random 64 KiB blocks (1%) in {:.1} ms = {:.2}% of the full read's {:.0} ms",
            took.as_secs_f64() * 1e3,
            100.0 * took.as_secs_f64() / full.as_secs_f64(),
            full.as_secs_f64() * 1e3
        );
    }
    Ok(())
}
