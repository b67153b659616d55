//! The benchmark suite: one command that generates the disks, runs
//! cbtvault through every path it takes disks from, runs restic and borg
//! and the machine's ceilings on the same bytes in the same run, checks
//! every figure against its target, and writes `docs/benchmarks.md`'s
//! results section, a JSON record and SVG plots.
//!
//! `scripts/bench` (the whole suite: 1, 4 and 16 GiB) or
//! `scripts/bench --quick` (1 GiB, one night: a few minutes).
//!
//! Every figure is a ratio against a peer or a ceiling measured in the
//! same run, because these machines are shared and noisy; the absolute
//! times are printed for context only.

mod ceilings;
mod measure;
mod paths;
mod plot;
mod report;
mod s3;
mod tools;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cbtvault_blockmap::{BLOCK_SIZE, BlockMap, block_count};
use cbtvault_testkit::synth;
use clap::Parser;

use crate::measure::Cost;
use crate::paths::Guest;
use crate::tools::{Borg, Cbtvault, Outcome, Restic};

#[derive(Parser)]
struct Args {
    /// One 1 GiB disk and one night of 1% churn: a few minutes on 2 cores.
    #[arg(long)]
    quick: bool,
    /// Disk sizes in GiB [default: 1,4,16; with --quick: 1].
    #[arg(long, value_delimiter = ',')]
    sizes: Vec<u64>,
    /// Churn of each night, in percent of the disk's blocks
    /// [default: 0.1,1,10; with --quick: 1].
    #[arg(long, value_delimiter = ',')]
    churn: Vec<f64>,
    /// Paths and peers to leave out: restic, borg, nbd, xenserver, vmware,
    /// qemu, s3, encrypted.
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
    /// Work directory, kept afterwards (a temporary one by default). It
    /// needs about three times the largest disk's size free.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Where the results go: benchmarks.md's results section, and
    /// bench/suite.json and bench/*.svg beside it.
    #[arg(long, default_value = "docs")]
    docs: PathBuf,
    /// Print the results only; write nothing under --docs.
    #[arg(long)]
    no_docs: bool,
    /// Internal: the S3 upload ceiling's own process (URL, bytes).
    #[arg(long, hide = true, num_args = 2, value_names = ["URL", "BYTES"])]
    s3_put_ceiling: Vec<String>,
}

/// One measured step.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    pub size_gib: u64,
    /// How the disk reached the tool: file, nbd, xenserver, qemu; or
    /// "machine" for the ceilings.
    pub path: &'static str,
    pub tool: &'static str,
    /// full, night N (P%), same change, restore; or the ceiling's name.
    pub step: String,
    /// Bytes the step is about: the disk for a full backup or a restore,
    /// the changed blocks for an incremental.
    pub data_bytes: u64,
    pub outcome: Outcome,
    /// For an incremental: the compressed size of its changed blocks.
    pub changed_compressed: Option<u64>,
}

/// A night of churn.
struct Night {
    label: String,
    fraction: f64,
    seed: u64,
    /// The peers run this night too (not on the "same change" night, which
    /// only measures how cbtvault scales with the disk).
    peers: bool,
}

struct Suite {
    args: Args,
    cbtvault: PathBuf,
    rt: tokio::runtime::Runtime,
    rows: Vec<Row>,
    /// Single-core BLAKE3 and zstd rates per disk size, MB/s.
    rates: Vec<(u64, f64, f64)>,
    /// The S3 server the s3 path ran against.
    s3_server: Option<&'static str>,
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if let [url, bytes] = args.s3_put_ceiling.as_slice() {
        return s3::put_ceiling(url, bytes.parse().context("--s3-put-ceiling BYTES")?);
    }
    if args.sizes.is_empty() {
        args.sizes = if args.quick { vec![1] } else { vec![1, 4, 16] };
    }
    if args.churn.is_empty() {
        args.churn = if args.quick {
            vec![1.0]
        } else {
            vec![0.1, 1.0, 10.0]
        };
    }
    if args.churn.iter().any(|c| !(*c > 0.0 && *c <= 100.0)) {
        bail!("--churn takes percentages above 0 and at most 100");
    }
    let cbtvault = std::env::current_exe()?.with_file_name("cbtvault");
    if !cbtvault.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p cbtvault` (scripts/bench does)",
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
    let mut suite = Suite {
        args,
        cbtvault,
        rt: tokio::runtime::Runtime::new()?,
        rows: Vec::new(),
        rates: Vec::new(),
        s3_server: None,
    };
    let started = chrono_now();
    let sizes = suite.args.sizes.clone();
    for &size in &sizes {
        let work = dir.join(format!("{size}-gib"));
        // What a run stopped half-way left must not be taken for this one's.
        if work.exists() {
            std::fs::remove_dir_all(&work)
                .with_context(|| format!("removing {}", work.display()))?;
        }
        std::fs::create_dir_all(&work)?;
        suite.one_size(&work, size)?;
        std::fs::remove_dir_all(&work)?;
    }
    let command = std::iter::once("bench-suite".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let outcome = report::Report {
        command: &command,
        started,
        sizes: &sizes,
        churn: &suite.args.churn,
        rows: &suite.rows,
        rates: &suite.rates,
        s3_server: suite.s3_server,
    };
    let text = outcome.markdown();
    println!("{text}");
    if !suite.args.no_docs {
        outcome.write(&suite.args.docs)?;
        eprintln!(
            "wrote {} and {}",
            suite.args.docs.join("benchmarks.md").display(),
            suite.args.docs.join("bench").display()
        );
    }
    Ok(())
}

fn chrono_now() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

impl Suite {
    fn skips(&self, what: &str) -> bool {
        self.args.skip.iter().any(|s| s == what)
    }

    fn nights(&self, size: u64) -> Vec<Night> {
        let mut nights: Vec<Night> = self
            .args
            .churn
            .iter()
            .enumerate()
            .map(|(i, pct)| Night {
                label: format!("night {}: {pct}%", i + 1),
                fraction: pct / 100.0,
                seed: 100 + i as u64,
                peers: true,
            })
            .collect();
        // A night without change: the fixed cost of a run (process start,
        // repository open, locks, the durable commit of a restore point),
        // which bounds how close an incremental can come to its ceiling.
        nights.push(Night {
            label: "no change".into(),
            fraction: 0.0,
            seed: 300,
            peers: false,
        });
        // The same number of changed blocks on every disk: 1% of the
        // smallest one.
        let smallest = self.args.sizes.iter().copied().min().unwrap_or(size);
        if self.args.sizes.len() > 1 {
            let blocks = block_count(smallest << 30) as f64 / 100.0;
            nights.push(Night {
                label: "same change".into(),
                fraction: blocks / block_count(size << 30) as f64,
                seed: 200,
                peers: false,
            });
        }
        nights
    }

    fn push(
        &mut self,
        size: u64,
        path: &'static str,
        tool: &'static str,
        step: &str,
        data_bytes: u64,
        outcome: Outcome,
    ) {
        eprintln!(
            "  {size} GiB {path:<9} {tool:<9} {step:<16} {:>8.2} s wall {:>8.2} s CPU {:>6} MiB",
            outcome.cost.wall_s,
            outcome.cost.cpu_s,
            outcome.cost.rss_kib >> 10
        );
        self.rows.push(Row {
            size_gib: size,
            path,
            tool,
            step: step.to_string(),
            data_bytes,
            outcome,
            changed_compressed: None,
        });
    }

    fn push_ceiling(
        &mut self,
        size: u64,
        tool: &'static str,
        step: &str,
        data_bytes: u64,
        cost: Cost,
    ) {
        self.push(
            size,
            "machine",
            tool,
            step,
            data_bytes,
            Outcome {
                cost,
                ..Outcome::default()
            },
        );
    }

    fn one_size(&mut self, work: &Path, size: u64) -> Result<()> {
        let bytes = size << 30;
        eprintln!(
            "{size} GiB: generating the disk (about 40% zero as holes, 30% text, 25% random, 5% repeated)"
        );
        let image = work.join("disk.img");
        synth::write_image(&image, bytes, 4, synth::Mix::default())?;
        let sample = ceilings::sample(&image, 32 << 20)?;
        let (hash, zstd) = ceilings::hash_and_compress_rates(&sample, 8)?;
        drop(sample);
        self.rates.push((size, hash, zstd));
        // The NBD repository stays until the file path's full is done, so
        // that both fulls write their packs into fresh page cache: on this
        // VM a write into memory an earlier step freed costs less.
        let nbd_repo = if self.skips("nbd") {
            None
        } else {
            Some(self.nbd_path(work, &image, size)?)
        };
        self.file_path(work, &image, size, nbd_repo.as_deref())?;
        std::fs::remove_file(&image)?;
        if !self.skips("xenserver") {
            let dir = work.join("xen");
            let guest = paths::XenGuest::start(&self.rt, &dir, bytes)?;
            synth::write_image(guest.image(), bytes, 4, synth::Mix::default())?;
            self.hypervisor_path(work, &guest, size)?;
            drop(guest);
            std::fs::remove_dir_all(&dir)?;
        }
        if !self.skips("vmware") {
            let dir = work.join("vmware");
            std::fs::create_dir_all(&dir)?;
            let guest = paths::VmwareGuest::start(&self.rt, &dir, bytes)?;
            synth::write_image(guest.image(), bytes, 4, synth::Mix::default())?;
            self.hypervisor_path(work, &guest, size)?;
            drop(guest);
            std::fs::remove_dir_all(&dir)?;
        }
        if !self.skips("qemu") {
            let dir = work.join("qemu");
            std::fs::create_dir_all(&dir)?;
            let image = dir.join("disk.img");
            synth::write_image(&image, bytes, 4, synth::Mix::default())?;
            let guest = paths::QemuGuest::start(&self.rt, &dir, &image)?;
            self.hypervisor_path(work, &guest, size)?;
            drop(guest);
            std::fs::remove_dir_all(&dir)?;
        }
        Ok(())
    }

    /// The read ceiling (nbdcopy) and a full backup over NBD from the same
    /// qemu-nbd export.
    fn nbd_path(&mut self, work: &Path, image: &Path, size: u64) -> Result<PathBuf> {
        let server = paths::QemuNbd::start(image, &work.join("nbd.sock"))?;
        let mut nbdcopy = std::process::Command::new("nbdcopy");
        nbdcopy.args([server.uri.as_str(), "null:"]);
        let (cost, _) = measure::run("nbdcopy", &mut nbdcopy, false)?;
        self.push_ceiling(size, "nbdcopy", "read the export", size << 30, cost);
        let repo = work.join("nbd-repo");
        let cbt = Cbtvault::new(&self.cbtvault, &repo)?;
        let server_before = server.cpu_s();
        let (outcome, _) = cbt.backup(
            "full over NBD",
            &["--disk", "disk", "--source", &server.uri],
        )?;
        let wall_s = outcome.cost.wall_s;
        self.push(size, "nbd", "cbtvault", "full", size << 30, outcome);
        // The server's share of the same two cores.
        let cpu_s = server.cpu_s() - server_before;
        self.push(
            size,
            "nbd",
            "qemu-nbd",
            "full",
            size << 30,
            Outcome {
                cost: Cost {
                    wall_s,
                    cpu_s,
                    ..Cost::default()
                },
                ..Outcome::default()
            },
        );
        Ok(repo)
    }

    /// cbtvault, restic and borg on the same file, night after night, then
    /// each restores the last night's state; the ceilings beside them.
    fn file_path(
        &mut self,
        work: &Path,
        image: &Path,
        size: u64,
        nbd_repo: Option<&Path>,
    ) -> Result<()> {
        let bytes = size << 30;
        let guest = paths::FileGuest(image.to_path_buf());
        let cbt = Cbtvault::new(&self.cbtvault, &work.join("repo"))?;
        let restic = if self.skips("restic") || !tools::available("restic", "version") {
            None
        } else {
            Some(Restic::new(work)?)
        };
        let borg = if self.skips("borg") || !tools::available("borg", "--version") {
            None
        } else {
            Some(Borg::new(work)?)
        };
        // moto keeps a bucket in memory: the S3 path stops at 4 GiB.
        let server = if self.skips("s3") || size > 4 {
            None
        } else {
            Some(s3::S3Server::start(work)?)
        };
        let extras = self.repositories(work, server.as_ref())?;
        let (outcome, mut latest) = cbt.backup("full", &strs(&guest.backup_args(None)))?;
        self.push(size, "file", "cbtvault", "full", bytes, outcome);
        if let Some(repo) = nbd_repo {
            std::fs::remove_dir_all(repo)?;
        }
        let mut extra_latest = Vec::new();
        for (path, repo) in &extras {
            let (outcome, id) =
                repo.backup(&format!("{path} full"), &strs(&guest.backup_args(None)))?;
            let stored = outcome.growth;
            self.push(size, path, "cbtvault", "full", bytes, outcome);
            extra_latest.push(id);
            if let (Some(server), "s3") = (&server, *path) {
                let cost = server.upload_ceiling(stored)?;
                self.push_ceiling(size, "s3 put", "full", stored, cost);
            }
        }
        if let Some(r) = &restic {
            let o = r.backup("restic full", image)?;
            self.push(size, "file", "restic", "full", bytes, o);
        }
        if let Some(b) = &borg {
            let o = b.backup("borg full", "n0", image)?;
            self.push(size, "file", "borg", "full", bytes, o);
        }
        let mut last_borg = "n0".to_string();
        let (with_peers, alone): (Vec<Night>, Vec<Night>) =
            self.nights(size).into_iter().partition(|n| n.peers);
        for (i, night) in with_peers.iter().enumerate() {
            (latest, extra_latest) = self.file_night(work, &guest, &cbt, &extras, size, night)?;
            if let Some(r) = &restic {
                let o = r.backup(&format!("restic {}", night.label), image)?;
                let changed = self.rows.last().map_or(0, |r| r.data_bytes);
                self.push(size, "file", "restic", &night.label, changed, o);
            }
            if let Some(b) = &borg {
                last_borg = format!("n{}", i + 1);
                let o = b.backup(&format!("borg {}", night.label), &last_borg, image)?;
                let changed = self.rows.last().map_or(0, |r| r.data_bytes);
                self.push(size, "file", "borg", &night.label, changed, o);
            }
        }
        // Restores of the last state, each timed until its data is on disk.
        // The write ceiling runs before and after them and counts its
        // faster run: a write into memory the previous step just freed is
        // cheaper on this VM, and the ceiling must not lose by its place.
        let expected = tools::file_hash(image)?;
        let ceiling = work.join("ceiling.img");
        let (before, written) = ceilings::durable_write(image, &ceiling)?;
        let restored = work.join("restored.img");
        let outcome = cbt.restore(&latest, &restored)?;
        tools::check_same("cbtvault", &restored, expected)?;
        std::fs::remove_file(&restored)?;
        self.push(size, "file", "cbtvault", "restore", bytes, outcome);
        for ((path, repo), id) in extras.iter().zip(&extra_latest) {
            let outcome = repo.restore(id, &restored)?;
            tools::check_same(&format!("cbtvault ({path})"), &restored, expected)?;
            std::fs::remove_file(&restored)?;
            self.push(size, path, "cbtvault", "restore", bytes, outcome);
        }
        let (after, _) = ceilings::durable_write(image, &ceiling)?;
        let best = if after.wall_s < before.wall_s {
            after
        } else {
            before
        };
        self.push_ceiling(size, "write+fsync", "restore", written, best);
        if let Some(r) = &restic {
            let target = work.join("restic-restore");
            let (o, file) = r.restore(image, &target)?;
            tools::check_same("restic", &file, expected)?;
            std::fs::remove_dir_all(&target)?;
            self.push(size, "file", "restic", "restore", bytes, o);
        }
        if let Some(b) = &borg {
            let target = work.join("borg-restore");
            let (o, file) = b.restore(&last_borg, image, &target)?;
            tools::check_same("borg", &file, expected)?;
            std::fs::remove_dir_all(&target)?;
            self.push(size, "file", "borg", "restore", bytes, o);
        }
        // Nights only cbtvault runs come after the restores, which every
        // tool makes of the same last state.
        for night in &alone {
            self.file_night(work, &guest, &cbt, &extras, size, night)?;
        }
        // An off-site copy of every restore point, into a new prefix.
        if let Some(server) = &server {
            let target = Cbtvault::s3(
                &self.cbtvault,
                &server.repo_url("copy"),
                &server.credentials(),
                &work.join("s3-cache"),
            )?;
            let (cost, sent) = cbt.copy_to(&target)?;
            self.push(
                size,
                "s3",
                "cbtvault",
                "copy from file",
                sent,
                Outcome {
                    cost,
                    ..Outcome::default()
                },
            );
            self.s3_server = Some(server.kind);
        }
        for repo in [
            "repo",
            "encrypted-repo",
            "s3-cache",
            "s3-root",
            "restic-repo",
            "restic-cache",
            "borg-repo",
            "borg-home",
        ] {
            let _ = std::fs::remove_dir_all(work.join(repo));
        }
        Ok(())
    }

    /// One night on the file path: the churn, cbtvault's incremental from
    /// its bitmap, and the ceiling of that change; returns the new restore
    /// point. Rows for peers that follow copy its changed bytes.
    fn file_night(
        &mut self,
        work: &Path,
        guest: &paths::FileGuest,
        cbt: &Cbtvault,
        extras: &[(&'static str, Cbtvault)],
        size: u64,
        night: &Night,
    ) -> Result<(String, Vec<String>)> {
        let map = synth::churn_like_guest(guest.image(), night.fraction, night.seed)?;
        let changed = map.count_set() * BLOCK_SIZE;
        let bitmap = work.join("changed.b64");
        std::fs::write(&bitmap, map.to_xenapi_base64())?;
        let (outcome, id) = cbt.backup(&night.label, &strs(&guest.backup_args(Some(&bitmap))))?;
        self.push(size, "file", "cbtvault", &night.label, changed, outcome);
        let (cost, compressed) = ceilings::changed_blocks_alone(guest.image(), &map)?;
        self.push_ceiling(size, "read+hash+zstd", &night.label, changed, cost);
        if let Some(row) = self.rows.last_mut() {
            row.changed_compressed = Some(compressed);
        }
        let mut extra_ids = Vec::new();
        for (path, repo) in extras {
            let (outcome, id) = repo.backup(
                &format!("{path} {}", night.label),
                &strs(&guest.backup_args(Some(&bitmap))),
            )?;
            self.push(size, path, "cbtvault", &night.label, changed, outcome);
            extra_ids.push(id);
        }
        Ok((id, extra_ids))
    }

    /// The repositories beside the plain local one that the file path
    /// backs up into, step by step: an encrypted local one and one in an
    /// S3 bucket (unless skipped).
    fn repositories(
        &self,
        work: &Path,
        server: Option<&s3::S3Server>,
    ) -> Result<Vec<(&'static str, Cbtvault)>> {
        let mut extras = Vec::new();
        if !self.skips("encrypted") {
            let repo = Cbtvault::encrypted(&self.cbtvault, &work.join("encrypted-repo"))?;
            extras.push(("encrypted", repo));
        }
        if let Some(server) = server {
            let repo = Cbtvault::s3(
                &self.cbtvault,
                &server.repo_url("repo"),
                &server.credentials(),
                &work.join("s3-cache"),
            )?;
            extras.push(("s3", repo));
        }
        Ok(extras)
    }

    /// cbtvault alone through a hypervisor's changed-block tracking: a full
    /// backup, then the same nights as the file path, each written through
    /// the guest's own I/O path so that the hypervisor tracks it.
    fn hypervisor_path(&mut self, work: &Path, guest: &dyn Guest, size: u64) -> Result<()> {
        let repo = work.join(format!("{}-repo", guest.name()));
        let cbt = Cbtvault::new(&self.cbtvault, &repo)?;
        let (outcome, _) = cbt.backup(
            &format!("{} full", guest.name()),
            &strs(&guest.backup_args(None)),
        )?;
        self.push(size, guest.name(), "cbtvault", "full", size << 30, outcome);
        for night in self.nights(size) {
            let map: BlockMap = synth::churn_like_guest(guest.image(), night.fraction, night.seed)?;
            guest.replay(&map)?;
            let (outcome, _) = cbt.backup(
                &format!("{} {}", guest.name(), night.label),
                &strs(&guest.backup_args(None)),
            )?;
            self.push(
                size,
                guest.name(),
                "cbtvault",
                &night.label,
                map.count_set() * BLOCK_SIZE,
                outcome,
            );
        }
        std::fs::remove_dir_all(&repo).with_context(|| format!("removing {}", repo.display()))?;
        Ok(())
    }
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}
