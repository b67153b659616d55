//! Helpers: run the binary, make disk images, compare files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cbtvault_blockmap::BlockMap;
use cbtvault_testkit::synth;
use serde_json::Value;
use tempfile::TempDir;

pub const MIB: u64 = 1 << 20;

/// A scratch area with a repository and images.
pub struct Scratch {
    pub dir: TempDir,
}

impl Scratch {
    /// A new scratch area with an initialised repository at `repo()`.
    pub fn new() -> Scratch {
        let s = Scratch {
            dir: tempfile::tempdir().expect("tempdir"),
        };
        s.ok(&["init", "--repo", s.repo().to_str().unwrap()]);
        s
    }

    pub fn repo(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Generates an image of `mib` MiB.
    pub fn image(&self, name: &str, mib: u64, seed: u64) -> PathBuf {
        let path = self.path(name);
        synth::write_image(&path, mib * MIB, seed, synth::Mix::default()).expect("write image");
        path
    }

    /// The binary, with the scratch repository in `CBTVAULT_REPO` (so
    /// `--repo` is needed only for another one) and no log settings.
    pub fn command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cbtvault"));
        c.env("CBTVAULT_REPO", self.repo()).env_remove("RUST_LOG");
        c
    }

    /// Runs cbtvault with `args` and waits for it.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("run cbtvault")
    }

    /// Runs and expects success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "cbtvault {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// Runs and expects failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "cbtvault {args:?} should have failed:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let stderr = String::from_utf8(out.stderr).expect("utf-8 stderr");
        assert!(!stderr.contains("panicked"), "panic: {stderr}");
        stderr
    }

    /// `backup --json` of `image` as `disk`, optionally with a bitmap file.
    pub fn backup(&self, disk: &str, image: &Path, bitmap: Option<&Path>) -> Value {
        let repo = self.repo();
        let source = format!("file:{}", image.display());
        let mut args = vec![
            "backup",
            "--json",
            "--repo",
            repo.to_str().unwrap(),
            "--disk",
            disk,
            "--source",
            &source,
        ];
        let bitmap_arg;
        if let Some(b) = bitmap {
            bitmap_arg = b.display().to_string();
            args.extend(["--changed-blocks", &bitmap_arg]);
        }
        the_restore_point(&self.ok(&args))
    }

    /// Restores `id` to a new file and returns its path.
    pub fn restore(&self, id: &str, name: &str) -> PathBuf {
        let to = self.path(name);
        let repo = self.repo();
        self.ok(&[
            "restore",
            "--quiet",
            "--repo",
            repo.to_str().unwrap(),
            id,
            "--to",
            to.to_str().unwrap(),
        ]);
        to
    }

    /// Changes `fraction` of the image and writes the XenAPI bitmap file.
    pub fn churn(
        &self,
        image: &Path,
        fraction: f64,
        seed: u64,
        bitmap_name: &str,
    ) -> (BlockMap, PathBuf) {
        let map = synth::churn(image, fraction, seed).expect("churn");
        let path = self.path(bitmap_name);
        std::fs::write(&path, map.to_xenapi_base64()).expect("write bitmap");
        (map, path)
    }

    /// `verify` with or without `--read-data`; returns the JSON report and success.
    pub fn verify(&self, read_data: bool) -> (bool, Value) {
        let repo = self.repo();
        let mut args = vec!["verify", "--json", "--repo", repo.to_str().unwrap()];
        if read_data {
            args.push("--read-data");
        }
        let out = self.run(&args);
        let report = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        (out.status.success(), report)
    }

    pub fn list(&self) -> Vec<Value> {
        let repo = self.repo();
        let out = self.ok(&["list", "--json", "--repo", repo.to_str().unwrap()]);
        serde_json::from_str::<Value>(&out)
            .expect("list json")
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

/// Asserts two files have identical bytes (and sizes).
pub fn assert_same_file(a: &Path, b: &Path) {
    let (x, y) = (
        std::fs::read(a).expect("read a"),
        std::fs::read(b).expect("read b"),
    );
    assert_eq!(
        x.len(),
        y.len(),
        "{} and {} differ in size",
        a.display(),
        b.display()
    );
    if let Some(pos) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!("{} and {} differ at byte {pos}", a.display(), b.display());
    }
}

/// The one restore point in the output of `backup --json` (an array of the
/// restore points a run committed).
pub fn the_restore_point(stdout: &str) -> Value {
    let v: Value = serde_json::from_str(stdout).expect("backup json");
    match v.as_array().map(Vec::as_slice) {
        Some([rp]) => rp.clone(),
        _ => panic!("expected one restore point in {v}"),
    }
}

/// The `id` field of a restore point's JSON.
pub fn id(v: &Value) -> String {
    v["id"].as_str().expect("id").to_string()
}

/// Total size of the pack files of a repository.
pub fn pack_bytes(repo: &Path) -> u64 {
    fn walk(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| {
                        let p = e.path();
                        if p.is_dir() {
                            walk(&p)
                        } else {
                            e.metadata().map(|m| m.len()).unwrap_or(0)
                        }
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(&repo.join("packs"))
}

/// All pack files of a repository.
pub fn pack_files(repo: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for sub in std::fs::read_dir(repo.join("packs"))
        .expect("packs dir")
        .flatten()
    {
        for f in std::fs::read_dir(sub.path())
            .expect("pack subdir")
            .flatten()
        {
            out.push(f.path());
        }
    }
    out.sort();
    out
}
