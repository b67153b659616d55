//! `files ls` and `files get`: single files out of a restore point.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use cbtvault_files::{Entry, Explorer, Kind, Options, Time};

use crate::cli::Global;
use crate::output::{self, outln};

fn open(repo: &Path, id: &str) -> Result<(Explorer, String)> {
    let repo = super::open(repo)?;
    let rp = super::resolve(&repo, id)?;
    let explorer = Explorer::open(&repo, &rp, Options::default())
        .with_context(|| format!("reading restore point {}", output::short(&rp.id)))?;
    Ok((explorer, rp.id))
}

/// `-rw-r-----`, or `?` for each bit a file system does not keep.
fn mode_text(e: &Entry) -> String {
    let mut s = String::new();
    s.push(e.kind.letter());
    match e.mode {
        None => s.push_str("?????????"),
        Some(m) => {
            for (shift, set) in [(6, 0o4000), (3, 0o2000), (0, 0o1000)] {
                let bits = (m >> shift) & 7;
                s.push(if bits & 4 != 0 { 'r' } else { '-' });
                s.push(if bits & 2 != 0 { 'w' } else { '-' });
                let x = bits & 1 != 0;
                s.push(match (m & set != 0, x, shift) {
                    (true, true, 0) => 't',
                    (true, false, 0) => 'T',
                    (true, true, _) => 's',
                    (true, false, _) => 'S',
                    (false, true, _) => 'x',
                    (false, false, _) => '-',
                });
            }
        }
    }
    s
}

fn time_text(t: Option<Time>) -> String {
    t.and_then(|t| jiff::Timestamp::from_second(t.secs).ok())
        .map(|ts| ts.strftime("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "-".into())
}

pub fn ls(g: &Global, repo: &Path, id: &str, path: &str) -> Result<ExitCode> {
    let (mut x, rp) = open(repo, id)?;
    let what = x.stat(path)?;
    let entries = if matches!(what.kind, Kind::Dir) {
        x.list(path)?
    } else {
        vec![what]
    };
    if g.json {
        output::print_json(&serde_json::json!({
            "restore_point": rp,
            "path": path,
            "entries": entries,
            "blocks_fetched": x.blocks_fetched(),
        }));
        return Ok(ExitCode::SUCCESS);
    }
    for e in &entries {
        let owner = match (e.uid, e.gid) {
            (Some(u), Some(g)) => format!("{u}:{g}"),
            _ => "-".into(),
        };
        let mut name = e.name.clone();
        if e.kind == Kind::Dir || e.kind == Kind::Partition {
            name.push('/');
        }
        if let Some(detail) = &e.detail {
            let arrow = if e.kind == Kind::Symlink { "->" } else { "" };
            name = format!(
                "{name} {arrow}{}{detail}",
                if arrow.is_empty() { "" } else { " " }
            );
        }
        outln!(
            "{} {:>9} {:>12} {}  {}",
            mode_text(e),
            owner,
            e.size,
            time_text(e.mtime),
            name
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn get(g: &Global, repo: &Path, id: &str, paths: &[String], to: &Path) -> Result<ExitCode> {
    let (mut x, rp) = open(repo, id)?;
    let report = x.get(paths, to)?;
    if g.json {
        output::print_json(&serde_json::json!({
            "restore_point": rp,
            "to": to.display().to_string(),
            "report": report,
        }));
    } else if !g.quiet {
        outln!(
            "wrote {} files ({}), {} directories, {} symlinks from {} to {}; {} blocks read from the repository",
            report.files,
            output::bytes(report.bytes),
            report.dirs,
            report.symlinks,
            output::short(&rp),
            to.display(),
            report.blocks_fetched
        );
        for s in &report.skipped {
            outln!("skipped {s}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
