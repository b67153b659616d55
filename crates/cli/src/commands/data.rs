//! Moving disks: backup and restore.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use cbtvault_blockmap::BlockMap;
use cbtvault_engine::error::BoxError;
use cbtvault_engine::nbd::{NbdSource, NbdTarget, dirty_bitmap_context};
use cbtvault_engine::{
    BackupJob, BackupOptions, BackupOutcome, Changes, DiskSource, DiskTarget, FileSource,
    FileTarget, Parent, Progress,
};
use cbtvault_nbd::ConnectOptions;
use cbtvault_repo::VmInfo;
use tokio_util::sync::CancellationToken;

use crate::cli::{BackupArgs, Global};
use crate::failure::usage;
use crate::output::{self, Bar, outln};

/// Where a disk is, as given on the command line.
pub enum Location {
    File(std::path::PathBuf),
    Nbd(String),
    Qmp(std::path::PathBuf),
}

/// Parses `file:PATH` or an NBD URI.
pub fn parse_location(spec: &str) -> Result<Location> {
    match spec.split_once(':') {
        Some(("file", path)) if !path.is_empty() => Ok(Location::File(path.into())),
        Some(("nbd" | "nbds" | "nbd+unix" | "nbds+unix", _)) => Ok(Location::Nbd(spec.to_string())),
        Some(("qmp", path)) if !path.is_empty() => Ok(Location::Qmp(path.into())),
        Some((scheme, _)) => {
            bail!(usage!(
                "{spec:?}: unsupported scheme {scheme:?} (supported: file:PATH, qmp:SOCKET, nbd://, nbds://, nbd+unix://)"
            ))
        }
        None => bail!(usage!("{spec:?}: give a scheme, e.g. file:{spec}")),
    }
}

/// The URI without its query, for records and messages.
fn display_uri(uri: &str) -> String {
    uri.split('?').next().unwrap_or(uri).to_string()
}

fn read_bitmap(file: &Path, size: u64, source: &str) -> Result<BlockMap> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading changed-block bitmap {}", file.display()))?;
    BlockMap::from_xenapi_base64(&text, size)
        .with_context(|| format!("--changed-blocks {} for {source}", file.display()))
}

/// The changes a backup reads from a bitmap file.
fn bitmap_changes(file: &Path, size: u64, source: &str) -> Result<Changes> {
    Ok(Changes::Blocks {
        map: read_bitmap(file, size, source)?,
        origin: "bitmap-file".into(),
    })
}

pub fn backup(g: &Global, args: BackupArgs) -> Result<ExitCode> {
    if args.config.is_some() || args.xen.login.xapi.is_some() || args.vmware.vcenter.is_some() {
        return super::jobs::backup(g, &args);
    }
    let (Some(repo_dir), Some(disk), Some(source)) = (&args.repo, &args.disk, &args.source) else {
        bail!(usage!(
            "give --repo, --disk and --source (or --xapi, or --config with --job)"
        ));
    };
    if args.read_size_kib == 0 || !args.read_size_kib.is_multiple_of(64) {
        bail!(usage!(
            "--read-size-kib {} is not a positive multiple of 64",
            args.read_size_kib
        ));
    }
    let location = parse_location(source).context("--source")?;
    let vm = vm_label(&args);
    if let Location::Qmp(socket) = &location {
        if vm.is_some() {
            bail!(usage!(
                "--vm-uuid labels file and NBD sources; a qmp: source records its VM itself"
            ));
        }
        return super::jobs::backup_qemu_once(g, &args, repo_dir, disk, socket);
    }
    if args.dirty_bitmap.is_some() && !matches!(location, Location::Nbd(_)) {
        bail!(usage!(
            "--dirty-bitmap needs an NBD source that exports the bitmap"
        ));
    }
    let repo = super::open(repo_dir)?;
    let options = backup_options(&args);
    let rt = super::runtime()?;
    let cancel = CancellationToken::new();
    let bar: Arc<dyn Progress> = Arc::new(Bar::new(g));
    let outcome = rt.block_on(async {
        let watch = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                tracing::warn!("interrupted; stopping the backup (nothing is committed)");
                watch.cancel();
            }
        });
        let job = |changes| BackupJob {
            disk: disk.clone(),
            changes,
            parent: args.parent.clone().map(Parent::Id).unwrap_or_default(),
            time: None,
            options: options.clone(),
            held: None,
            resume: None,
            suspend_as: None,
        };
        match &location {
            Location::File(path) => {
                let source = FileSource::open(path)
                    .with_context(|| format!("opening source image {}", path.display()))?;
                let changes = match &args.changed_blocks {
                    Some(f) => bitmap_changes(f, source.size(), &path.display().to_string())?,
                    None => Changes::Full { reason: None },
                };
                run_backup(
                    repo.clone(),
                    Labelled::new(source, vm),
                    job(changes),
                    bar,
                    cancel,
                )
                .await
            }
            Location::Qmp(_) => Err(anyhow::anyhow!("QMP sources take the QEMU path")),
            Location::Nbd(uri) => {
                let mut opts = ConnectOptions::from_uri(uri)
                    .with_context(|| format!("NBD URI {}", display_uri(uri)))?;
                opts.connections = args.connections.max(1);
                opts.inflight = args.inflight.max(1);
                if let Some(bitmap) = &args.dirty_bitmap {
                    opts.meta_contexts.push(dirty_bitmap_context(bitmap));
                }
                let source = NbdSource::connect(opts, display_uri(uri)).await?;
                let changes = match (&args.changed_blocks, &args.dirty_bitmap) {
                    (Some(f), _) => bitmap_changes(f, source.size(), &display_uri(uri))?,
                    (None, Some(bitmap)) => Changes::Blocks {
                        map: source.dirty_blocks(bitmap).await?,
                        origin: format!("qemu-dirty-bitmap:{bitmap}"),
                    },
                    (None, None) => Changes::Full { reason: None },
                };
                run_backup(
                    repo.clone(),
                    Labelled::new(source, vm),
                    job(changes),
                    bar,
                    cancel,
                )
                .await
            }
        }
    });
    let outcome = outcome.with_context(|| format!("backup of disk {disk:?} failed"))?;
    print_outcome(g, outcome);
    Ok(ExitCode::SUCCESS)
}

/// The pipeline settings the command line asks for.
pub fn backup_options(args: &BackupArgs) -> BackupOptions {
    BackupOptions {
        compression_level: args.compression_level,
        read_size: args.read_size_kib * 1024,
        inflight: args.inflight,
        workers: args
            .workers
            .unwrap_or_else(|| BackupOptions::default().workers),
        throttle: None,
    }
}

/// Prints a committed backup as the user asked.
pub fn print_outcome(g: &Global, outcome: BackupOutcome) {
    let row = cbtvault_repo::RestorePointRow {
        id: outcome.restore_point.clone(),
        manifest: outcome.manifest,
    };
    if g.json {
        // An array, as for runs of several disks: one schema for `backup`.
        output::print_json(&serde_json::json!([output::restore_point_json(&row)]));
    } else if !g.quiet {
        let s = &row.manifest.stats;
        outln!(
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
}

/// The VM that `--vm-uuid`, `--vm-name`, `--vm-host` and `--vm-device`
/// name (clap makes the first three come together).
fn vm_label(args: &BackupArgs) -> Option<VmInfo> {
    Some(VmInfo {
        uuid: args.vm_uuid.clone()?,
        name: args.vm_name.clone().unwrap_or_default(),
        host: args.vm_host.clone().unwrap_or_default(),
        disk_label: None,
        device: args.vm_device.clone(),
        metadata: None,
    })
}

/// A source whose manifest records the VM the user named.
struct Labelled<S> {
    inner: S,
    vm: Option<VmInfo>,
}

impl<S> Labelled<S> {
    fn new(inner: S, vm: Option<VmInfo>) -> Labelled<S> {
        Labelled { inner, vm }
    }
}

impl<S: DiskSource> DiskSource for Labelled<S> {
    fn info(&self) -> cbtvault_repo::SourceInfo {
        let mut info = self.inner.info();
        if self.vm.is_some() {
            info.vm = self.vm.clone();
        }
        info
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(
        &self,
        offset: u64,
        len: usize,
    ) -> impl std::future::Future<Output = Result<bytes::Bytes, BoxError>> + Send {
        self.inner.read_at(offset, len)
    }

    fn allocated(
        &self,
    ) -> impl std::future::Future<Output = Result<Option<BlockMap>, BoxError>> + Send {
        self.inner.allocated()
    }
}

async fn run_backup<S: DiskSource>(
    repo: Arc<cbtvault_repo::Repository>,
    source: S,
    job: BackupJob,
    progress: Arc<dyn Progress>,
    cancel: CancellationToken,
) -> Result<BackupOutcome> {
    Ok(cbtvault_engine::backup(repo, Arc::new(source), job, progress, cancel).await?)
}

pub fn restore(
    g: &Global,
    repo: &Path,
    id: &str,
    to: &str,
    force: bool,
    target_is_zero: bool,
    workers: Option<usize>,
) -> Result<ExitCode> {
    let repo = super::open(repo)?;
    let rp = super::resolve(&repo, id)?;
    let workers = workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    });
    let bar = Bar::new(g);
    let cancel = CancellationToken::new();
    let size = rp.manifest.virtual_size;
    // A bare path is a file; only an explicit NBD scheme means the network.
    let location = match parse_location(to) {
        Ok(Location::Nbd(uri)) => Location::Nbd(uri),
        _ => Location::File(to.strip_prefix("file:").unwrap_or(to).into()),
    };
    let stats = match location {
        Location::Qmp(_) => {
            bail!(usage!(
                "cannot restore into a QMP socket; restore to a file or an NBD export"
            ))
        }
        Location::File(path) => {
            let target = FileTarget::create(&path, size, force)?;
            match cbtvault_engine::restore(&repo, &rp, &target, workers, &bar, &cancel) {
                Ok(stats) => stats,
                Err(e) => {
                    let outcome = if target.in_place() {
                        "it holds a partial restore now"
                    } else {
                        "nothing was written there"
                    };
                    target.abandon();
                    return Err(e).with_context(|| {
                        format!(
                            "restore of {} to {} failed; {outcome}",
                            output::short(&rp.id),
                            path.display()
                        )
                    });
                }
            }
        }
        Location::Nbd(uri) => {
            let rt = super::runtime()?;
            let opts = ConnectOptions::from_uri(&uri)
                .with_context(|| format!("NBD URI {}", display_uri(&uri)))?;
            let client = rt
                .block_on(cbtvault_nbd::Client::connect(&opts))
                .with_context(|| format!("connecting to {}", display_uri(&uri)))?;
            if client.size() < size {
                bail!(usage!(
                    "the NBD export {} holds {} bytes; restore point {} needs {size}",
                    display_uri(&uri),
                    client.size(),
                    output::short(&rp.id)
                ));
            }
            let target = NbdTarget::new(client, rt.handle().clone(), target_is_zero)?;
            let stats = cbtvault_engine::restore(&repo, &rp, &target, workers, &bar, &cancel)
                .with_context(|| {
                    format!(
                        "restore of {} to {}",
                        output::short(&rp.id),
                        display_uri(&uri)
                    )
                })?;
            target.finish().context("flushing the NBD export")?;
            stats
        }
    };
    if g.json {
        output::print_json(&serde_json::json!({
            "restore_point": rp.id, "disk": rp.manifest.disk, "to": to, "stats": stats,
        }));
    } else if !g.quiet {
        outln!(
            "restored {} of disk {:?} to {}: {} written in {} blocks, {} zero blocks, {:.1} s",
            output::short(&rp.id),
            rp.manifest.disk,
            display_uri(to),
            output::bytes(stats.bytes_written),
            stats.blocks_written,
            stats.blocks_zero,
            stats.duration_ms as f64 / 1000.0
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// What `--target-state` and `--target-changed-blocks` say the target holds.
pub struct KnownState<'a> {
    pub restore_point: Option<&'a str>,
    pub changed_blocks: Option<&'a Path>,
}

/// `restore --only-changed`: rolls an existing disk to the restore point,
/// writing only the blocks that differ.
pub fn rollback(
    g: &Global,
    repo: &Path,
    id: &str,
    to: &str,
    given: KnownState<'_>,
    workers: Option<usize>,
) -> Result<ExitCode> {
    use cbtvault_engine::{NbdInPlace, ReadableTarget, TargetState};
    let repo = super::open(repo)?;
    let rp = super::resolve(&repo, id)?;
    let known = match given.restore_point {
        Some(spec) => Some(super::resolve(&repo, spec).context("--target-state")?),
        None => None,
    };
    // Reading the target is the work when hashing: several readers at once.
    let workers = workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get().max(4))
            .unwrap_or(4)
    });
    let bar = Bar::new(g);
    let cancel = CancellationToken::new();
    let location = match parse_location(to) {
        Ok(Location::Nbd(uri)) => Location::Nbd(uri),
        _ => Location::File(to.strip_prefix("file:").unwrap_or(to).into()),
    };
    let run = |target: &dyn ReadableTarget, shown: String| {
        // The bitmap is sized by the target as it is now.
        let changed = match given.changed_blocks {
            None => None,
            Some(file) => {
                let size = target
                    .size()
                    .with_context(|| format!("reading the size of {shown}"))?;
                Some(read_bitmap(file, size, &shown)?)
            }
        };
        let state = match &known {
            Some(holds) => TargetState::Known {
                holds,
                changed_since: changed.as_ref(),
            },
            None => TargetState::Unknown,
        };
        cbtvault_engine::rollback(&repo, &rp, target, state, workers, &bar, &cancel).with_context(
            || {
                format!(
                    "rollback of {} to {shown} failed; it may hold a mix of both states now: run it again",
                    output::short(&rp.id)
                )
            },
        )
    };
    let stats = match location {
        Location::Qmp(_) => bail!(usage!(
            "cannot roll back a QMP socket; give a file or an NBD export"
        )),
        Location::File(path) => {
            let target = cbtvault_engine::FileTarget::open_in_place(&path)?;
            run(&target, path.display().to_string())?
        }
        Location::Nbd(uri) => {
            let rt = super::runtime()?;
            let mut opts = ConnectOptions::from_uri(&uri)
                .with_context(|| format!("NBD URI {}", display_uri(&uri)))?;
            // Several connections where the server allows: readers in parallel.
            opts.connections = workers.min(8);
            let client = rt
                .block_on(cbtvault_nbd::Client::connect(&opts))
                .with_context(|| format!("connecting to {}", display_uri(&uri)))?;
            let target = NbdInPlace::new(client, rt.handle().clone())?;
            run(&target, display_uri(&uri))?
        }
    };
    if g.json {
        output::print_json(&serde_json::json!({
            "restore_point": rp.id, "disk": rp.manifest.disk, "to": display_uri(to),
            "only_changed": true, "target_state": known.as_ref().map(|k| &k.id), "stats": stats,
        }));
    } else if !g.quiet {
        outln!(
            "rolled {} back to {} of disk {:?}: {} of {} blocks differed ({} written, {} of them zeros; compared by {}), {} read from the target, {:.1} s",
            display_uri(to),
            output::short(&rp.id),
            rp.manifest.disk,
            stats.blocks_written,
            stats.blocks_compared,
            output::bytes(stats.bytes_written),
            stats.blocks_zeroed,
            stats.method,
            output::bytes(stats.target_bytes_read),
            stats.duration_ms as f64 / 1000.0
        );
    }
    Ok(ExitCode::SUCCESS)
}
