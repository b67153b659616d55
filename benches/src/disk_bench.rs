//! The end-to-end benchmark: a generated disk image backed up in full,
//! changed by 1% and backed up again from the changed-block bitmap, then
//! restored — by cbtvault and by restic in the same run, so that the
//! figures are ratios on the same machine at the same moment.
//!
//! `scripts/bench` builds the release binaries and runs this.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Size of the generated disk in GiB.
    #[arg(long, default_value_t = 4)]
    size_gib: u64,
    /// Share of blocks changed between the two backups.
    #[arg(long, default_value_t = 0.01)]
    churn: f64,
    /// Work directory (a temporary one by default).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Skip the restic comparison.
    #[arg(long)]
    no_restic: bool,
    /// Write the results as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Wall time and peak RSS of one command.
struct Measured {
    wall: Duration,
    max_rss_kib: u64,
}

fn run(what: &str, cmd: &mut Command) -> Result<Measured> {
    // Dirty pages of the previous step must not slow this one down.
    sync();
    let start = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("{what}: starting {cmd:?}"))?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills in; pid is our child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // wait4 gives this child's own peak RSS, which Child::wait cannot.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = start.elapsed();
    std::mem::forget(child);
    if rc < 0 {
        bail!("{what}: wait4 failed: {}", std::io::Error::last_os_error());
    }
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        bail!("{what}: {cmd:?} failed with status {status}");
    }
    Ok(Measured {
        wall,
        max_rss_kib: usage.ru_maxrss as u64,
    })
}

fn sync() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

fn file_hash(path: &Path) -> Result<blake3::Hash> {
    // Streamed, not mapped: a large RSS here would be inherited by the next
    // child at fork and spoil its peak-RSS figure.
    let mut hasher = blake3::Hasher::new();
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    std::io::copy(
        &mut std::io::BufReader::with_capacity(1 << 20, file),
        &mut hasher,
    )
    .with_context(|| format!("hashing {}", path.display()))?;
    Ok(hasher.finalize())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let cbtvault = std::env::current_exe()?.with_file_name("cbtvault");
    if !cbtvault.exists() {
        bail!(
            "{} not found: run `cargo build --release` first (scripts/bench does)",
            cbtvault.display()
        );
    }
    let tmp;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&dir)?;
    let size = args.size_gib << 30;
    let image = dir.join("disk.img");
    eprintln!(
        "generating a {} GiB image (40% zero, 30% text, 25% random, 5% repeated; zeros written, not holes)",
        args.size_gib
    );
    let mix = cbtvault_testkit::synth::Mix {
        holes: false,
        ..Default::default()
    };
    cbtvault_testkit::synth::write_image(&image, size, 4, mix)?;
    let repo = dir.join("cbtvault-repo");
    let restic_repo = dir.join("restic-repo");
    let src = format!("file:{}", image.display());
    let cbt = |a: &[&str]| {
        let mut c = Command::new(&cbtvault);
        c.args(a).arg("--quiet");
        c
    };
    let restic = |a: &[&str]| {
        let mut c = Command::new("restic");
        c.arg("-r").arg(&restic_repo).args(a).arg("--quiet");
        c.env("RESTIC_PASSWORD", "bench")
            .env("RESTIC_CACHE_DIR", dir.join("restic-cache"));
        c
    };
    let with_restic = !args.no_restic && Command::new("restic").arg("version").output().is_ok();

    run(
        "init",
        &mut cbt(&["init", "--repo", repo.to_str().unwrap_or_default()]),
    )?;
    if with_restic {
        run("restic init", &mut restic(&["init"]))?;
    }
    let mut rows = Vec::new();
    let repo_arg = repo.to_str().unwrap_or_default().to_string();
    let image_arg = image.to_str().unwrap_or_default().to_string();
    let backup = |what: &str, extra: &[&str]| {
        let mut args = vec![
            "backup", "--repo", &repo_arg, "--disk", "bench", "--source", &src,
        ];
        args.extend_from_slice(extra);
        run(what, &mut cbt(&args))
    };
    let restic_backup = |what: &str| -> Result<Option<Measured>> {
        if with_restic {
            Ok(Some(run(what, &mut restic(&["backup", &image_arg]))?))
        } else {
            Ok(None)
        }
    };
    let full = backup("full", &[])?;
    let full_r = restic_backup("restic full")?;
    rows.push(("full backup", size, full, full_r));

    let map = cbtvault_testkit::synth::churn(&image, args.churn, 5)?;
    let bitmap = dir.join("changed.b64");
    std::fs::write(&bitmap, map.to_xenapi_base64())?;
    let changed = map.count_set() * cbtvault_blockmap::BLOCK_SIZE;
    let incr = backup(
        "incremental",
        &["--changed-blocks", bitmap.to_str().unwrap_or_default()],
    )?;
    let incr_r = restic_backup("restic incremental")?;
    rows.push(("1% incremental", changed, incr, incr_r));

    let expected = file_hash(&image)?;
    let restored = dir.join("restored.img");
    let rest = run(
        "restore",
        &mut cbt(&[
            "restore",
            "--repo",
            repo.to_str().unwrap_or_default(),
            "bench@latest",
            "--to",
            restored.to_str().unwrap_or_default(),
        ]),
    )?;
    if file_hash(&restored)? != expected {
        bail!("cbtvault's restore differs from the image");
    }
    std::fs::remove_file(&restored)?;
    let rest_r = if with_restic {
        let target = dir.join("restic-restore");
        let mut m = run(
            "restic restore",
            &mut restic(&[
                "restore",
                "latest",
                "--target",
                target.to_str().unwrap_or_default(),
            ]),
        )?;
        // cbtvault's restore ends with its data on disk (fsync); restic's
        // does not, so its flush is counted here to compare like with like.
        let flush = Instant::now();
        sync();
        m.wall += flush.elapsed();
        std::fs::remove_dir_all(&target)?;
        Some(m)
    } else {
        None
    };
    rows.push(("restore", size, rest, rest_r));

    let mbps = |bytes: u64, d: Duration| bytes as f64 / 1e6 / d.as_secs_f64();
    println!(
        "disk {} GiB, {} blocks changed ({} MiB)",
        args.size_gib,
        map.count_set(),
        changed >> 20
    );
    println!(
        "{:<16} {:>10} {:>10} {:>9} {:>10} {:>9} {:>14}",
        "", "cbtvault s", "MB/s", "RSS MiB", "restic s", "RSS MiB", "restic/cbtvault"
    );
    let mut out = Vec::new();
    for (name, bytes, ours, theirs) in &rows {
        let (rs, rrss, ratio) = match theirs {
            Some(t) => (
                format!("{:.2}", t.wall.as_secs_f64()),
                format!("{}", t.max_rss_kib / 1024),
                format!("{:.1}x", t.wall.as_secs_f64() / ours.wall.as_secs_f64()),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<16} {:>10.2} {:>10.0} {:>9} {:>10} {:>9} {:>14}",
            name,
            ours.wall.as_secs_f64(),
            mbps(*bytes, ours.wall),
            ours.max_rss_kib / 1024,
            rs,
            rrss,
            ratio
        );
        out.push(json!({
            "operation": name, "bytes": bytes, "cbtvault_s": ours.wall.as_secs_f64(),
            "cbtvault_mb_per_s": mbps(*bytes, ours.wall), "cbtvault_max_rss_kib": ours.max_rss_kib,
            "restic_s": theirs.as_ref().map(|t| t.wall.as_secs_f64()),
            "restic_max_rss_kib": theirs.as_ref().map(|t| t.max_rss_kib),
        }));
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&out)?)?;
    }
    Ok(())
}
