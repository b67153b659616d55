//! The daemon's cost over one-shot runs: the same job over the XAPI
//! simulator's VDIs, with the same churn before each run, run as
//! `cbtvault backup --config F --job J` processes and then by one
//! `cbtvault daemon` asked over HTTP (`POST /run/J`). Reports per run the
//! wall time (from the request to the run's row in the history) and the
//! CPU time of cbtvault (the children's rusage for one-shot runs, the
//! daemon's `/proc/PID/stat` for the daemon), then the daemon's RSS. The
//! simulator runs in this process, so its CPU counts in neither.
//!
//! `scripts/bench daemon [--vdis N] [--disk-mib M] [--rounds R]`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cbtvault_xapi_sim::{PoolSpec, SimConfig, Simulator};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// VDIs in the job (one VM each).
    #[arg(long, default_value_t = 4)]
    vdis: usize,
    /// Size of each VDI in MiB.
    #[arg(long, default_value_t = 256)]
    disk_mib: u64,
    /// Runs measured each way (after one full that is not).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Blocks each VDI changes before each run.
    #[arg(long, default_value_t = 40)]
    churn_blocks: u64,
}

struct Daemon(Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// User plus system CPU seconds of the finished children of this process.
fn children_cpu() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// CPU seconds and RSS (KiB) of a running process, from `/proc`.
fn process_usage(pid: u32) -> Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').context("/proc/PID/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok((ticks / hz, rss))
}

fn runs_recorded(repo: &Path) -> Result<usize> {
    let repo = cbtvault_repo::Repository::open(repo)?;
    Ok(repo.catalogue().job_runs(Some("nightly"), 10_000)?.len())
}

fn post(port: u16, path: &str) -> Result<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let cbtvault = std::env::current_exe()?.with_file_name("cbtvault");
    if !cbtvault.exists() {
        bail!("{} is missing: build it with --release", cbtvault.display());
    }
    let dir = tempfile::tempdir()?;
    let rt = tokio::runtime::Runtime::new()?;
    let mut config = SimConfig::new(dir.path().join("pool"), "secret");
    config.pool = PoolSpec {
        vms: args.vdis,
        disks_per_vm: 1,
        disk_size: args.disk_mib << 20,
        initial_blocks: args.disk_mib * 16 / 2,
    };
    let sim = rt.block_on(Simulator::start(config))?;
    let password = dir.path().join("password");
    std::fs::write(&password, "secret\n")?;
    let pin = dir.path().join("pin.pem");
    std::fs::write(&pin, sim.certificate_pem())?;
    let vdis: Vec<String> = sim
        .sim()
        .vdis()
        .into_iter()
        .filter(|v| !v.is_a_snapshot && v.vdi_type == "user")
        .map(|v| v.uuid)
        .collect();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let repo = dir.path().join("repo");
    let list: Vec<String> = vdis.iter().map(|v| format!("{v:?}")).collect();
    let config_path: PathBuf = dir.path().join("cbtvault.toml");
    std::fs::write(
        &config_path,
        format!(
            "[repository]\npath = \"{}\"\n\n[daemon]\nlisten = \"127.0.0.1:{port}\"\n\n\
             [[pool]]\nname = \"sim\"\nurl = \"{}\"\npassword_file = \"{}\"\npin = \"{}\"\n\n\
             [[job]]\nname = \"nightly\"\nkind = \"xenserver\"\npool = \"sim\"\nvdis = [{}]\n\
             parallel = 4\nschedule = {{ cron = \"0 0 3 1 1 *\" }}\n",
            repo.display(),
            sim.https_url(),
            password.display(),
            pin.display(),
            list.join(", ")
        ),
    )?;
    let churn = |round: u64| -> Result<()> {
        for v in &vdis {
            sim.sim().churn(v, args.churn_blocks, round)?;
        }
        Ok(())
    };
    let one_shot = || -> Result<()> {
        let status = Command::new(&cbtvault)
            .args(["backup", "--quiet", "--config"])
            .arg(&config_path)
            .args(["--job", "nightly"])
            .status()?;
        if !status.success() {
            bail!("cbtvault backup failed");
        }
        Ok(())
    };
    println!(
        "{} VDIs of {} MiB, {} blocks changed per VDI before each of {} runs",
        args.vdis, args.disk_mib, args.churn_blocks, args.rounds
    );
    let init = Command::new(&cbtvault)
        .args(["init", "--quiet", "--repo"])
        .arg(&repo)
        .status()?;
    if !init.success() {
        bail!("cbtvault init failed");
    }
    // The first, full, backup is not measured.
    one_shot()?;

    let (mut wall, cpu_before) = (Duration::ZERO, children_cpu());
    for round in 0..args.rounds {
        churn(100 + round as u64)?;
        let start = Instant::now();
        one_shot()?;
        wall += start.elapsed();
    }
    let one_shot_cpu = children_cpu() - cpu_before;
    let one_shot_wall = wall;

    let daemon = Daemon(
        Command::new(&cbtvault)
            .args(["daemon", "--config"])
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("the daemon did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(1));
    let (cpu_at_rest, _) = process_usage(daemon.0.id())?;
    let mut wall = Duration::ZERO;
    for round in 0..args.rounds {
        churn(200 + round as u64)?;
        let before = runs_recorded(&repo)?;
        let start = Instant::now();
        if post(port, "/run/nightly")? != 202 {
            bail!("POST /run/nightly was refused");
        }
        while runs_recorded(&repo)? == before {
            std::thread::sleep(Duration::from_millis(10));
        }
        wall += start.elapsed();
    }
    let (cpu_after, rss) = process_usage(daemon.0.id())?;
    let daemon_cpu = cpu_after - cpu_at_rest;
    drop(daemon);

    let per = |d: f64| d / args.rounds as f64;
    println!(
        "one-shot runs: {:.3} s wall, {:.3} s CPU per run",
        per(one_shot_wall.as_secs_f64()),
        per(one_shot_cpu)
    );
    println!(
        "daemon runs:   {:.3} s wall, {:.3} s CPU per run; RSS after {} runs: {} KiB",
        per(wall.as_secs_f64()),
        per(daemon_cpu),
        args.rounds,
        rss
    );
    println!(
        "daemon / one-shot: wall {:.2}x, CPU {:.2}x",
        wall.as_secs_f64() / one_shot_wall.as_secs_f64(),
        daemon_cpu / one_shot_cpu
    );
    Ok(())
}
