//! Measuring one child process: wall time, CPU seconds, peak RSS and the
//! bytes it read, all from the kernel's own accounting of that process.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// What one command cost.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Cost {
    /// From start to exit, plus the `sync` that makes its writes durable
    /// when the step asked for one.
    pub wall_s: f64,
    /// User and system CPU seconds of the process itself.
    pub cpu_s: f64,
    /// Peak resident set size of the process, in KiB.
    pub rss_kib: u64,
    /// Bytes the process read through read-like system calls (`rchar`),
    /// page cache hits included: what it asked for, from any file.
    pub rchar: u64,
}

/// Runs `cmd` to completion and returns its cost and its standard output.
/// `durable` adds a `sync` after the exit, so that a tool that leaves its
/// writes in the page cache is timed until they are on disk like one that
/// fsyncs.
pub fn run(what: &str, cmd: &mut Command, durable: bool) -> Result<(Cost, Vec<u8>)> {
    // Dirty pages of the previous step must not slow this one down.
    sync();
    let stdout = tempfile::tempfile()?;
    cmd.stdout(stdout.try_clone()?);
    // A child started the vfork way (posix_spawn) inherits this process's
    // peak RSS as its own at exec; a real fork starts it at this process's
    // current RSS, which the suite keeps small.
    // SAFETY: the hook does nothing, so it is async-signal-safe.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| Ok(()));
    }
    let start = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("{what}: starting {cmd:?}"))?;
    let pid = child.id() as libc::pid_t;
    let peak = PeakWatch::start(pid);
    // Wait without reaping, so that /proc/PID/io still describes the child.
    // SAFETY: siginfo_t is plain data that waitid fills in; pid is our child.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOWAIT,
        )
    };
    if rc < 0 {
        bail!("{what}: waitid failed: {}", std::io::Error::last_os_error());
    }
    let rchar = proc_io(pid, "rchar").unwrap_or(0);
    let watched_kib = peak.stop();
    let mut status = 0;
    // SAFETY: as above; wait4 reaps the child and gives its own rusage.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    std::mem::forget(child);
    if rc < 0 {
        bail!("{what}: wait4 failed: {}", std::io::Error::last_os_error());
    }
    if durable {
        sync();
    }
    let wall = start.elapsed();
    let output = read_all(stdout)?;
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        bail!(
            "{what}: {cmd:?} failed with status {status}: {}",
            String::from_utf8_lossy(&output)
        );
    }
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok((
        Cost {
            wall_s: wall.as_secs_f64(),
            cpu_s: seconds(usage.ru_utime) + seconds(usage.ru_stime),
            // wait4's figure counts this process's RSS at the fork too
            // (the forked copy's pages), which the in-process simulators
            // inflate; the child's own high-water mark is exact when it
            // was seen.
            rss_kib: if watched_kib > 0 {
                watched_kib
            } else {
                usage.ru_maxrss as u64
            },
            rchar,
        },
        output,
    ))
}

/// The user and system CPU seconds process `pid` has used so far.
pub fn process_cpu_s(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command, which is in parentheses and may hold
    // spaces: utime and stime are the 12th and 13th of them.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks / hz as f64)
}

/// Watches a child's own peak RSS (`VmHWM` of the program it exec'd)
/// until it exits.
struct PeakWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl PeakWatch {
    fn start(pid: libc::pid_t) -> PeakWatch {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let ours = std::fs::read_to_string("/proc/self/comm").unwrap_or_default();
        let watching = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !watching.load(Ordering::Relaxed) {
                // Before its exec the child is a copy of this process.
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"));
                if comm.is_ok_and(|c| c != ours)
                    && let Some(kib) = proc_status_kib(pid, "VmHWM")
                {
                    peak = peak.max(kib);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            peak
        });
        PeakWatch { stop, thread }
    }

    /// The highest `VmHWM` seen, in KiB (0 when none was).
    fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

fn proc_status_kib(pid: libc::pid_t, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix(field)?
            .strip_prefix(':')?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    })
}

fn read_all(mut file: std::fs::File) -> Result<Vec<u8>> {
    use std::io::{Read, Seek};
    file.rewind()?;
    let mut out = Vec::new();
    file.read_to_end(&mut out)?;
    Ok(out)
}

fn proc_io(pid: libc::pid_t, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix(field)?
            .strip_prefix(": ")?
            .trim()
            .parse()
            .ok()
    })
}

/// Times `f` in this process (wall and this process's CPU).
pub fn in_process<T>(f: impl FnOnce() -> Result<T>) -> Result<(Cost, T)> {
    let cpu = own_cpu();
    let start = Instant::now();
    let out = f()?;
    Ok((
        Cost {
            wall_s: start.elapsed().as_secs_f64(),
            cpu_s: own_cpu() - cpu,
            ..Cost::default()
        },
        out,
    ))
}

fn own_cpu() -> f64 {
    // SAFETY: rusage is plain data that getrusage fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Flushes every dirty page to disk.
pub fn sync() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// The bytes the files under `dir` take on disk (allocated blocks, so a
/// sparse file counts what it holds).
pub fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                total += meta.blocks() * 512;
            }
        }
    }
    total
}

/// Waits up to 20 s for `ready`.
pub fn wait_until(what: &str, ready: impl Fn() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready() {
        if Instant::now() > deadline {
            bail!("{what} did not come up within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
