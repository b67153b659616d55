//! Moving disks: backup and restore.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use cbtvault_blockmap::BlockMap;
use cbtvault_engine::{BackupJob, BackupOptions, Changes, FileSource, FileTarget, Parent};
use tokio_util::sync::CancellationToken;

use crate::cli::{BackupArgs, Global};
use crate::output::{self, Bar};

/// A parsed `--source`.
enum SourceSpec {
    File(std::path::PathBuf),
}

fn parse_source(spec: &str) -> Result<SourceSpec> {
    match spec.split_once(':') {
        Some(("file", path)) if !path.is_empty() => Ok(SourceSpec::File(path.into())),
        Some((scheme, _)) => {
            bail!("source {spec:?}: unsupported scheme {scheme:?} (supported: file:PATH)")
        }
        None => bail!("source {spec:?}: give a scheme, e.g. file:{spec}"),
    }
}

pub fn backup(g: &Global, args: BackupArgs) -> Result<ExitCode> {
    let SourceSpec::File(path) = parse_source(&args.source)?;
    if args.read_size_kib == 0 || !args.read_size_kib.is_multiple_of(64) {
        bail!(
            "--read-size-kib {} is not a positive multiple of 64",
            args.read_size_kib
        );
    }
    let source = FileSource::open(&path)
        .with_context(|| format!("opening source image {}", path.display()))?;
    let changes = match &args.changed_blocks {
        None => Changes::Full { reason: None },
        Some(file) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading changed-block bitmap {}", file.display()))?;
            let map =
                BlockMap::from_xenapi_base64(&text, cbtvault_engine::DiskSource::size(&source))
                    .with_context(|| {
                        format!(
                            "--changed-blocks {} for image {}",
                            file.display(),
                            path.display()
                        )
                    })?;
            Changes::Blocks {
                map,
                origin: "bitmap-file".into(),
            }
        }
    };
    let repo = super::open(&args.repo.repo)?;
    let defaults = BackupOptions::default();
    let job = BackupJob {
        disk: args.disk.clone(),
        changes,
        parent: args.parent.clone().map(Parent::Id).unwrap_or_default(),
        time: None,
        options: BackupOptions {
            compression_level: args.compression_level,
            read_size: args.read_size_kib * 1024,
            inflight: args.inflight,
            workers: args.workers.unwrap_or(defaults.workers),
        },
    };
    let rt = super::runtime()?;
    let cancel = CancellationToken::new();
    let bar: Arc<dyn cbtvault_engine::Progress> = Arc::new(Bar::new(g));
    let outcome = rt.block_on(async {
        let watch = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                tracing::warn!("interrupted; stopping the backup (nothing is committed)");
                watch.cancel();
            }
        });
        cbtvault_engine::backup(repo.clone(), Arc::new(source), job, bar, cancel).await
    });
    let outcome = outcome.with_context(|| format!("backup of disk {:?} failed", args.disk))?;
    let row = cbtvault_repo::RestorePointRow {
        id: outcome.restore_point.clone(),
        manifest: outcome.manifest,
    };
    if g.json {
        output::print_json(&output::restore_point_json(&row));
    } else if !g.quiet {
        let s = &row.manifest.stats;
        println!(
            "restore point {} of disk {:?} ({}): read {} in {} blocks, {} new blocks stored in {}, {} deduplicated, {} zero, {:.1} s",
            row.id,
            row.manifest.disk,
            output::mode(&row.manifest.mode),
            output::bytes(s.bytes_read),
            s.blocks_read,
            s.blocks_new,
            output::bytes(s.bytes_stored),
            s.blocks_dedup,
            s.blocks_zero,
            s.duration_ms as f64 / 1000.0
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn restore(
    g: &Global,
    repo: &Path,
    id: &str,
    to: &Path,
    force: bool,
    workers: Option<usize>,
) -> Result<ExitCode> {
    let repo = super::open(repo)?;
    let rp = repo.resolve(id)?;
    let target = FileTarget::create(to, rp.manifest.virtual_size, force)?;
    let workers = workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    });
    let bar = Bar::new(g);
    let cancel = CancellationToken::new();
    match cbtvault_engine::restore(&repo, &rp, &target, workers, &bar, &cancel) {
        Ok(stats) => {
            if g.json {
                output::print_json(&serde_json::json!({
                    "restore_point": rp.id, "disk": rp.manifest.disk, "to": to, "stats": stats,
                }));
            } else if !g.quiet {
                println!(
                    "restored {} of disk {:?} to {}: {} written in {} blocks, {} zero blocks left as holes, {:.1} s",
                    output::short(&rp.id),
                    rp.manifest.disk,
                    to.display(),
                    output::bytes(stats.bytes_written),
                    stats.blocks_written,
                    stats.blocks_zero,
                    stats.duration_ms as f64 / 1000.0
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            target.abandon();
            Err(e).with_context(|| {
                format!(
                    "restore of {} to {} failed; nothing was written there",
                    output::short(&rp.id),
                    to.display()
                )
            })
        }
    }
}
