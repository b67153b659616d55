//! `cbtvault demo`: the whole cycle on a generated disk, checked end to end.

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use cbtvault_engine::{
    BackupJob, BackupOptions, Changes, FileSource, FileTarget, NoProgress, Parent, synth,
};
use cbtvault_repo::{InitOptions, Repository};
use tokio_util::sync::CancellationToken;

use crate::cli::Global;
use crate::output;

const NIGHTS: usize = 3;
const CHURN: f64 = 0.01;

/// BLAKE3 of a whole file, to compare a restore with the disk it came from.
fn file_hash(path: &Path) -> Result<blake3::Hash> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(hasher.finalize());
        }
        hasher.update(&buf[..n]);
    }
}

pub fn run(g: &Global, dir: Option<&Path>, size_mib: u64) -> Result<ExitCode> {
    let tmp;
    let dir = match dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.to_path_buf()
        }
        None => {
            tmp = tempfile::tempdir().context("creating a work directory")?;
            tmp.path().to_path_buf()
        }
    };
    let say = |line: String| {
        if !g.quiet && !g.json {
            println!("{line}");
        }
    };
    let image = dir.join("disk.img");
    let repo_dir = dir.join("repo");
    let size = size_mib << 20;
    say(format!(
        "generating a {size_mib} MiB disk image (zero, text-like, random and repeated blocks) at {}",
        image.display()
    ));
    synth::write_image(&image, size, 1, synth::Mix::default())
        .context("generating the disk image")?;
    let repo = Arc::new(
        Repository::init(&repo_dir, &InitOptions::default()).context("creating the repository")?,
    );
    say(format!("repository at {}", repo_dir.display()));

    let rt = crate::commands::runtime()?;
    let mut nights = Vec::new();
    for night in 0..NIGHTS {
        let changes = if night == 0 {
            Changes::Full { reason: None }
        } else {
            let map =
                synth::churn(&image, CHURN, 100 + night as u64).context("changing the disk")?;
            Changes::Blocks {
                map,
                origin: "demo-tracker".into(),
            }
        };
        let changed = match &changes {
            Changes::Blocks { map, .. } => map.count_set(),
            Changes::Full { .. } => 0,
        };
        let expected = file_hash(&image)?;
        let source = Arc::new(FileSource::open(&image).context("opening the disk image")?);
        let job = BackupJob {
            disk: "demo-disk".into(),
            changes,
            parent: Parent::Latest,
            time: None,
            options: BackupOptions::default(),
        };
        let outcome = rt
            .block_on(cbtvault_engine::backup(
                repo.clone(),
                source,
                job,
                Arc::new(NoProgress),
                CancellationToken::new(),
            ))
            .with_context(|| format!("night {}: backup", night + 1))?;
        nights.push((outcome, changed, expected));
    }

    say(String::new());
    say(format!(
        "{:<6} {:<12} {:<12} {:>9} {:>14} {:>12} {:>12} {:>8}",
        "night", "mode", "restore pt", "size", "blocks changed", "read", "new stored", "time"
    ));
    for (i, (o, changed, _)) in nights.iter().enumerate() {
        let s = &o.manifest.stats;
        say(format!(
            "{:<6} {:<12} {:<12} {:>9} {:>14} {:>12} {:>12} {:>7.2}s",
            i + 1,
            if i == 0 { "full" } else { "incremental" },
            output::short(&o.restore_point),
            output::bytes(o.manifest.virtual_size),
            if i == 0 {
                "-".to_string()
            } else {
                changed.to_string()
            },
            output::bytes(s.bytes_read),
            output::bytes(s.bytes_stored),
            s.duration_ms as f64 / 1000.0
        ));
    }
    say(String::new());

    let mut results = Vec::new();
    for (i, (o, _, expected)) in nights.iter().enumerate() {
        let rp = repo.resolve(&o.restore_point)?;
        let to = dir.join(format!("restored-night{}.img", i + 1));
        let target = FileTarget::create(&to, rp.manifest.virtual_size, true)?;
        let stats = cbtvault_engine::restore(
            &repo,
            &rp,
            &target,
            2,
            &NoProgress,
            &CancellationToken::new(),
        )
        .with_context(|| format!("restoring night {}", i + 1))?;
        let got = file_hash(&to)?;
        let ok = got == *expected;
        say(format!(
            "restored night {} ({}) in {:.2}s: {}",
            i + 1,
            output::short(&rp.id),
            stats.duration_ms as f64 / 1000.0,
            if ok {
                "byte-for-byte identical to the disk as it was backed up"
            } else {
                "MISMATCH"
            }
        ));
        results.push(serde_json::json!({
            "night": i + 1, "restore_point": rp.id, "changed_blocks": nights[i].1,
            "stats": rp.manifest.stats, "restore_ms": stats.duration_ms, "identical": ok,
        }));
        if !ok {
            bail!(
                "restore of night {} differs from the disk it came from",
                i + 1
            );
        }
        std::fs::remove_file(&to).ok();
    }
    if g.json {
        output::print_json(&serde_json::Value::Array(results));
    }
    Ok(ExitCode::SUCCESS)
}
