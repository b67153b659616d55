//! The three tools the suite runs side by side on the same image: cbtvault
//! (through its binary, as an operator runs it), restic and borg. Each
//! step returns what it cost and how much its repository grew.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::measure::{self, Cost};

/// One step of one tool.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Outcome {
    pub cost: Cost,
    /// Bytes read from the disk being backed up: cbtvault's own report for
    /// cbtvault, `rchar` for the peers (which read the whole image).
    pub source_bytes: u64,
    /// How much the repository grew, in allocated bytes.
    pub growth: u64,
}

/// cbtvault's release binary on one repository: a local directory (plain
/// or encrypted) or an S3 bucket.
pub struct Cbtvault {
    pub bin: PathBuf,
    pub repo: String,
    /// Set for every run: an encrypted repository's passphrase, an S3
    /// repository's credentials and cache directory.
    env: Vec<(String, String)>,
}

/// The passphrase of the suite's encrypted repositories.
const PASSPHRASE: &str = "bench passphrase";

impl Cbtvault {
    /// A new plain repository in the directory `repo`.
    pub fn new(bin: &Path, repo: &Path) -> Result<Cbtvault> {
        Self::init(bin, utf8(repo)?, Vec::new(), &[])
    }

    /// A new encrypted repository (XChaCha20-Poly1305, keyed ids) in `repo`.
    pub fn encrypted(bin: &Path, repo: &Path) -> Result<Cbtvault> {
        let env = vec![("CBTVAULT_PASSWORD".into(), PASSPHRASE.into())];
        Self::init(bin, utf8(repo)?, env, &["--encrypt"])
    }

    /// A new plain repository at the S3 URL `repo`, its catalogue cached
    /// in `cache`.
    pub fn s3(
        bin: &Path,
        repo: &str,
        credentials: &[(&str, &str)],
        cache: &Path,
    ) -> Result<Cbtvault> {
        let mut env: Vec<(String, String)> = credentials
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        env.push(("CBTVAULT_CACHE_DIR".into(), utf8(cache)?.into()));
        Self::init(bin, repo, env, &[])
    }

    fn init(bin: &Path, repo: &str, env: Vec<(String, String)>, args: &[&str]) -> Result<Cbtvault> {
        let c = Cbtvault {
            bin: bin.to_path_buf(),
            repo: repo.to_string(),
            env,
        };
        let mut init = vec!["init"];
        init.extend_from_slice(args);
        measure::run("cbtvault init", &mut c.command(&init), false)?;
        Ok(c)
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args).args(["--quiet", "--repo", &self.repo]);
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// The repository's local directory, if it has one.
    fn local(&self) -> Option<&Path> {
        (!self.repo.contains("://")).then(|| Path::new(&self.repo))
    }

    /// A backup with `args` (source and the rest); returns its cost and the
    /// id of the restore point it made.
    pub fn backup(&self, what: &str, args: &[&str]) -> Result<(Outcome, String)> {
        let before = self.local().map(measure::disk_usage);
        let mut cmd = self.command(&["backup", "--json"]);
        cmd.args(args);
        let (cost, out) = measure::run(what, &mut cmd, false)?;
        let report: serde_json::Value = serde_json::from_slice(&out)
            .with_context(|| format!("{what}: cbtvault's --json report"))?;
        let point = report
            .as_array()
            .and_then(|points| points.first())
            .context("the report names no restore point")?;
        let id = point["id"].as_str().context("a restore point id")?;
        // A bucket's growth is what the backup stored; a directory's is
        // measured, catalogue included.
        let growth = match (self.local(), before) {
            (Some(dir), Some(before)) => measure::disk_usage(dir).saturating_sub(before),
            _ => point["stats"]["bytes_stored"].as_u64().unwrap_or(0),
        };
        Ok((
            Outcome {
                cost,
                source_bytes: point["stats"]["bytes_read"].as_u64().unwrap_or(0),
                growth,
            },
            id.to_string(),
        ))
    }

    /// Restores `id` to a new file `to`, timed until it is durable.
    pub fn restore(&self, id: &str, to: &Path) -> Result<Outcome> {
        let (cost, _) = measure::run(
            "cbtvault restore",
            &mut self.command(&["restore", id, "--to", utf8(to)?]),
            true,
        )?;
        Ok(Outcome {
            cost,
            ..Outcome::default()
        })
    }

    /// Copies every restore point of this repository into `target`;
    /// returns the cost and the stored bytes sent.
    pub fn copy_to(&self, target: &Cbtvault) -> Result<(Cost, u64)> {
        let mut cmd = Command::new(&self.bin);
        cmd.args([
            "copy",
            "--json",
            "--quiet",
            "--from",
            &self.repo,
            "--to",
            &target.repo,
        ]);
        cmd.envs(self.env.iter().chain(&target.env).map(|(k, v)| (k, v)));
        let (cost, out) = measure::run("cbtvault copy", &mut cmd, false)?;
        let report: serde_json::Value =
            serde_json::from_slice(&out).context("cbtvault copy's --json report")?;
        Ok((cost, report["bytes_sent"].as_u64().unwrap_or(0)))
    }
}

fn utf8(path: &Path) -> Result<&str> {
    path.to_str().context("a UTF-8 work directory")
}

/// restic (Debian's), unencrypted is not an option for it: a fixed
/// password, its cache inside the work directory.
pub struct Restic {
    repo: PathBuf,
    cache: PathBuf,
}

impl Restic {
    pub fn new(dir: &Path) -> Result<Restic> {
        let r = Restic {
            repo: dir.join("restic-repo"),
            cache: dir.join("restic-cache"),
        };
        measure::run("restic init", &mut r.command(&["init"]), false)?;
        Ok(r)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("restic");
        c.arg("-r").arg(&self.repo).args(args).arg("--quiet");
        c.env("RESTIC_PASSWORD", "bench")
            .env("RESTIC_CACHE_DIR", &self.cache);
        c
    }

    pub fn backup(&self, what: &str, image: &Path) -> Result<Outcome> {
        let before = measure::disk_usage(&self.repo);
        let image_arg = image.to_str().context("a UTF-8 work directory")?;
        let mut cmd = self.command(&["backup", image_arg]);
        let (cost, _) = measure::run(what, &mut cmd, false)?;
        Ok(Outcome {
            cost,
            source_bytes: cost.rchar,
            growth: measure::disk_usage(&self.repo).saturating_sub(before),
        })
    }

    /// Restores the latest snapshot under `target` and returns where the
    /// image came back.
    pub fn restore(&self, image: &Path, target: &Path) -> Result<(Outcome, PathBuf)> {
        let target_arg = target.to_str().context("a UTF-8 work directory")?;
        let mut cmd = self.command(&["restore", "latest", "--target", target_arg]);
        let (cost, _) = measure::run("restic restore", &mut cmd, true)?;
        let restored = target.join(image.strip_prefix("/").unwrap_or(image));
        Ok((
            Outcome {
                cost,
                ..Outcome::default()
            },
            restored,
        ))
    }
}

/// borg 1.2 (Debian's), unencrypted, zstd level 3 like cbtvault's default.
pub struct Borg {
    repo: PathBuf,
}

impl Borg {
    pub fn new(dir: &Path) -> Result<Borg> {
        let b = Borg {
            repo: dir.join("borg-repo"),
        };
        let mut cmd = b.command(&["init", "--encryption=none"]);
        cmd.arg(&b.repo);
        measure::run("borg init", &mut cmd, false)?;
        Ok(b)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("borg");
        c.args(args);
        c.env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes")
            .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes")
            .env("BORG_BASE_DIR", self.repo.with_file_name("borg-home"));
        c
    }

    pub fn backup(&self, what: &str, name: &str, image: &Path) -> Result<Outcome> {
        let before = measure::disk_usage(&self.repo);
        let mut cmd = self.command(&["create", "--compression", "zstd,3"]);
        cmd.arg(format!("{}::{name}", self.repo.display()))
            .arg(image);
        let (cost, _) = measure::run(what, &mut cmd, false)?;
        Ok(Outcome {
            cost,
            source_bytes: cost.rchar,
            growth: measure::disk_usage(&self.repo).saturating_sub(before),
        })
    }

    /// Extracts archive `name` under `target` (sparse, as cbtvault
    /// restores) and returns where the image came back.
    pub fn restore(&self, name: &str, image: &Path, target: &Path) -> Result<(Outcome, PathBuf)> {
        std::fs::create_dir_all(target)?;
        let mut cmd = self.command(&["extract", "--sparse"]);
        cmd.arg(format!("{}::{name}", self.repo.display()))
            .current_dir(target);
        let (cost, _) = measure::run("borg extract", &mut cmd, true)?;
        let restored = target.join(image.strip_prefix("/").unwrap_or(image));
        Ok((
            Outcome {
                cost,
                ..Outcome::default()
            },
            restored,
        ))
    }
}

/// Whether `program VERSION_ARG` runs.
pub fn available(program: &str, version_arg: &str) -> bool {
    Command::new(program)
        .arg(version_arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// BLAKE3 of a whole file, streamed (a mapped file would inflate the next
/// child's peak RSS figure through fork).
pub fn file_hash(path: &Path) -> Result<blake3::Hash> {
    let mut hasher = blake3::Hasher::new();
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    std::io::copy(
        &mut std::io::BufReader::with_capacity(1 << 20, file),
        &mut hasher,
    )
    .with_context(|| format!("hashing {}", path.display()))?;
    Ok(hasher.finalize())
}

/// Fails unless `restored` holds the same bytes as `expected`.
pub fn check_same(tool: &str, restored: &Path, expected: blake3::Hash) -> Result<()> {
    if file_hash(restored)? != expected {
        bail!(
            "{tool}'s restore {} differs from the image it backed up",
            restored.display()
        );
    }
    Ok(())
}
