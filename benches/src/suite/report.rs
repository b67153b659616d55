//! The suite's results: the targets with met or missed, one table per
//! disk size, written into `docs/benchmarks.md` between its markers, with
//! a JSON record and plots beside it.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use crate::Row;

const BEGIN: &str = "<!-- suite:begin -->";
const END: &str = "<!-- suite:end -->";
const MIB: f64 = (1 << 20) as f64;

pub struct Report<'a> {
    /// The suite's command line, as run.
    pub command: &'a str,
    pub started: String,
    pub sizes: &'a [u64],
    pub churn: &'a [f64],
    pub rows: &'a [Row],
    pub rates: &'a [(u64, f64, f64)],
    /// The S3 server the s3 path ran against, if it ran.
    pub s3_server: Option<&'static str>,
}

/// One target of issue 14, checked.
pub struct Target {
    pub figure: String,
    pub goal: &'static str,
    pub measured: String,
    /// None when the run did not measure it (a peer or size left out).
    pub met: Option<bool>,
}

impl Report<'_> {
    fn find(&self, size: u64, path: &str, tool: &str, step: &str) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.size_gib == size && r.path == path && r.tool == tool && r.step == step)
    }

    /// The size the single-size targets are judged on: 4 GiB when it ran
    /// (the figures are for 4 GiB), else the largest.
    fn reference_size(&self) -> u64 {
        if self.sizes.contains(&4) {
            4
        } else {
            self.sizes.iter().copied().max().unwrap_or(1)
        }
    }

    /// The night the incremental targets use: 1% churn when it ran.
    fn reference_night(&self) -> Option<String> {
        let i = self
            .churn
            .iter()
            .position(|c| (*c - 1.0).abs() < 1e-9)
            .unwrap_or(0);
        self.churn.get(i).map(|c| format!("night {}: {c}%", i + 1))
    }

    pub fn targets(&self) -> Vec<Target> {
        let size = self.reference_size();
        let night = self.reference_night().unwrap_or_default();
        let wall = |path: &str, tool: &str, step: &str| {
            self.find(size, path, tool, step)
                .map(|r| r.outcome.cost.wall_s)
        };
        let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
        let mut out = Vec::new();
        // Ratios of wall times: (figure, goal, the slower or reference
        // step, the step it is compared with, the bound, whether the ratio
        // must be at least or at most the bound).
        type Step<'a> = (&'a str, &'a str, &'a str);
        let ratios: [(String, &'static str, Step, Step, f64, bool); 9] = [
            (
                format!("{night} incremental vs restic, {size} GiB"),
                "≥ 100× faster",
                ("file", "restic", &night),
                ("file", "cbtvault", &night),
                100.0,
                true,
            ),
            (
                format!("{night} incremental vs reading, hashing and compressing its blocks alone"),
                "≤ 2× the time",
                ("file", "cbtvault", &night),
                ("machine", "read+hash+zstd", &night),
                2.0,
                false,
            ),
            (
                format!("full backup vs restic, {size} GiB"),
                "≥ 3× faster",
                ("file", "restic", "full"),
                ("file", "cbtvault", "full"),
                3.0,
                true,
            ),
            (
                format!("full backup over NBD vs from the file, {size} GiB"),
                "≥ 0.9×",
                ("file", "cbtvault", "full"),
                ("nbd", "cbtvault", "full"),
                0.9,
                true,
            ),
            (
                format!("restore until durable vs the write ceiling, {size} GiB"),
                "≥ 0.9×",
                ("machine", "write+fsync", "restore"),
                ("file", "cbtvault", "restore"),
                0.9,
                true,
            ),
            (
                format!("restore vs restic, both until durable, {size} GiB"),
                "≥ 2× faster",
                ("file", "restic", "restore"),
                ("file", "cbtvault", "restore"),
                2.0,
                true,
            ),
            // Issue 12's goals for the S3 backend and encryption.
            (
                format!(
                    "full backup into S3 vs into a local directory, {size} GiB ({})",
                    self.s3_server.unwrap_or("no server")
                ),
                "≥ 0.8× the speed",
                ("file", "cbtvault", "full"),
                ("s3", "cbtvault", "full"),
                0.8,
                true,
            ),
            (
                format!("{night} incremental into S3 vs into a local directory, {size} GiB"),
                "≤ 2× the time",
                ("s3", "cbtvault", &night),
                ("file", "cbtvault", &night),
                2.0,
                false,
            ),
            (
                format!("encryption's cost on a full backup, {size} GiB"),
                "≤ 1.1× the time",
                ("encrypted", "cbtvault", "full"),
                ("file", "cbtvault", "full"),
                1.1,
                false,
            ),
        ];
        for (figure, goal, a, b, bound, at_least) in ratios {
            let value = ratio(wall(a.0, a.1, a.2), wall(b.0, b.1, b.2));
            let mut target = Target {
                figure,
                goal,
                measured: value.map_or("not measured".into(), |v| format!("{v:.2}×")),
                met: value.map(|v| if at_least { v >= bound } else { v <= bound }),
            };
            if b.1 == "read+hash+zstd"
                && let Some(fixed) = wall("file", "cbtvault", "no change")
            {
                target.measured += &format!(" (a run with no change takes {fixed:.2} s)");
            }
            // The NBD server runs on the same two cores.
            if b.0 == "nbd"
                && let (Some(server), Some(client)) = (
                    self.find(size, "nbd", "qemu-nbd", "full"),
                    self.find(size, "nbd", "cbtvault", "full"),
                )
            {
                target.measured += &format!(
                    " (qemu-nbd used {:.1} s of CPU beside cbtvault's {:.1} s, on the same cores)",
                    server.outcome.cost.cpu_s, client.outcome.cost.cpu_s
                );
            }
            // What the server itself allows: the same bytes put with
            // nothing else to do.
            if b.0 == "s3"
                && b.2 == "full"
                && let Some(bound) = ratio(
                    wall("file", "cbtvault", "full"),
                    wall("machine", "s3 put", "full"),
                )
            {
                target.measured +=
                    &format!(" (putting the stored bytes alone reaches {bound:.2}×)");
            }
            out.push(target);
        }
        let rss: Vec<(u64, u64)> = self
            .sizes
            .iter()
            .map(|&s| {
                let peak = self
                    .rows
                    .iter()
                    .filter(|r| r.size_gib == s && r.tool == "cbtvault")
                    .map(|r| r.outcome.cost.rss_kib)
                    .max()
                    .unwrap_or(0);
                (s, peak)
            })
            .collect();
        let worst = rss.iter().map(|&(_, k)| k).max();
        let per_size = rss
            .iter()
            .map(|(s, k)| format!("{} MiB at {s} GiB", k >> 10))
            .collect::<Vec<_>>()
            .join(", ");
        out.push(Target {
            figure: "peak RSS of any cbtvault backup or restore".into(),
            goal: "≤ 128 MiB, flat with the disk",
            measured: per_size,
            met: worst.map(|k| k <= 128 << 10),
        });
        let (small, large) = (
            self.sizes.iter().copied().min().unwrap_or(1),
            self.sizes.iter().copied().max().unwrap_or(1),
        );
        let scaling = if large > small {
            let at = |s| {
                self.find(s, "file", "cbtvault", "same change")
                    .map(|r| r.outcome.cost.wall_s)
            };
            ratio(at(large), at(small))
        } else {
            None
        };
        out.push(Target {
            figure: format!(
                "the same change on a {}× larger disk ({large} vs {small} GiB)",
                large / small.max(1)
            ),
            goal: "≤ 1.5× the time",
            measured: scaling.map_or("not measured".into(), |v| format!("{v:.2}×")),
            met: scaling.map(|v| v <= 1.5),
        });
        let incrementals: Vec<&Row> = self
            .rows
            .iter()
            .filter(|r| {
                r.tool == "cbtvault" && (r.step.starts_with("night") || r.step == "same change")
            })
            .collect();
        let exact = incrementals
            .iter()
            .filter(|r| r.outcome.source_bytes == r.data_bytes)
            .count();
        out.push(Target {
            figure: "bytes read from the source by every incremental (every path, size and night)"
                .into(),
            goal: "exactly the changed blocks",
            measured: format!("{exact} of {} exact", incrementals.len()),
            met: (!incrementals.is_empty()).then_some(exact == incrementals.len()),
        });
        let ours = self.find(size, "file", "cbtvault", &night);
        let growth = ours.map(|r| r.outcome.growth as f64);
        let vs_restic = ratio(
            self.find(size, "file", "restic", &night)
                .map(|r| r.outcome.growth as f64),
            growth,
        );
        let compressed = self
            .find(size, "machine", "read+hash+zstd", &night)
            .and_then(|r| r.changed_compressed)
            .map(|c| c as f64);
        let vs_compressed = ratio(growth, compressed);
        out.push(Target {
            figure: format!("repository growth for the {night} change vs restic's"),
            goal: "≥ 20× smaller, or within 5% of the changed blocks compressed",
            measured: format!(
                "{} smaller than restic; {} the changed blocks compressed",
                vs_restic.map_or("–".into(), |v| format!("{v:.1}×")),
                vs_compressed.map_or("–".into(), |v| format!("{v:.2}×"))
            ),
            met: (vs_restic.is_some() || vs_compressed.is_some()).then(|| {
                vs_restic.is_some_and(|v| v >= 20.0) || vs_compressed.is_some_and(|v| v <= 1.05)
            }),
        });
        out
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "Run of {} (`{}`): disks of {} GiB, nights of {} % churn.\n",
            self.started,
            self.command,
            join(self.sizes),
            join(self.churn)
        );
        let _ = writeln!(
            s,
            "### Targets\n\n| figure | target | measured | |\n|---|---|---|---|"
        );
        for t in self.targets() {
            let verdict = match t.met {
                Some(true) => "met",
                Some(false) => "**missed**",
                None => "not measured",
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {verdict} |",
                t.figure, t.goal, t.measured
            );
        }
        for &size in self.sizes {
            let _ = writeln!(s, "\n### {size} GiB\n");
            if let Some((_, hash, zstd)) = self.rates.iter().find(|r| r.0 == size) {
                let _ = writeln!(
                    s,
                    "One core hashes {hash:.0} MB/s (BLAKE3) and compresses {zstd:.0} MB/s (zstd 3) of this disk's non-zero blocks.\n"
                );
            }
            let _ = writeln!(
                s,
                "| step | path | tool | wall s | CPU s | peak RSS MiB | MB/s | read from source MiB | repository growth MiB |\n|---|---|---|---:|---:|---:|---:|---:|---:|"
            );
            for r in self.rows.iter().filter(|r| r.size_gib == size) {
                let c = &r.outcome.cost;
                let opt = |v: u64| {
                    if v == 0 {
                        "–".to_string()
                    } else {
                        format!("{:.1}", v as f64 / MIB)
                    }
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {:.2} | {:.2} | {} | {:.0} | {} | {} |",
                    r.step,
                    r.path,
                    r.tool,
                    c.wall_s,
                    c.cpu_s,
                    if c.rss_kib == 0 {
                        "–".into()
                    } else {
                        (c.rss_kib >> 10).to_string()
                    },
                    r.data_bytes as f64 / 1e6 / c.wall_s.max(1e-9),
                    opt(r.outcome.source_bytes),
                    opt(r.outcome.growth),
                );
            }
            let _ = writeln!(
                s,
                "\n![{size} GiB: time per step](bench/time-{size}gib.svg)"
            );
        }
        if self.sizes.len() > 1 {
            let _ = writeln!(
                s,
                "\n![time and memory against the disk's size](bench/scaling.svg)"
            );
        }
        s
    }

    /// Writes the results section of `docs/benchmarks.md`, and
    /// `bench/suite.json` and the plots beside it.
    pub fn write(&self, docs: &Path) -> Result<()> {
        let bench = docs.join("bench");
        std::fs::create_dir_all(&bench)?;
        std::fs::write(
            bench.join("suite.json"),
            serde_json::to_string_pretty(self.rows)?,
        )?;
        for &size in self.sizes {
            crate::plot::times(&bench.join(format!("time-{size}gib.svg")), size, self.rows)?;
        }
        if self.sizes.len() > 1 {
            crate::plot::scaling(&bench.join("scaling.svg"), self.sizes, self.rows)?;
        }
        let path = docs.join("benchmarks.md");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let section = format!("{BEGIN}\n{}{END}", self.markdown());
        let updated = match (text.find(BEGIN), text.find(END)) {
            (Some(a), Some(b)) if a < b => {
                format!("{}{section}{}", &text[..a], &text[b + END.len()..])
            }
            _ => format!("{text}\n## The suite's last run\n\n{section}\n"),
        };
        std::fs::write(&path, updated)?;
        Ok(())
    }
}

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
