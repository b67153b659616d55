//! What the user sees: logs, progress bars, tables and JSON.

use std::io::IsTerminal;
use std::time::Duration;

use cbtvault_engine::Progress;
use cbtvault_repo::RestorePointRow;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use crate::cli::Global;

/// Logs go to stderr: warnings by default, more with -v, or as RUST_LOG says.
pub fn init_logging(verbose: u8, quiet: bool) {
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, _) => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// A progress bar on a terminal, nothing elsewhere or with --quiet/--json.
pub struct Bar {
    bar: Option<ProgressBar>,
}

impl Bar {
    pub fn new(global: &Global) -> Bar {
        let show = !global.quiet && !global.json && std::io::stderr().is_terminal();
        Bar {
            bar: show.then(ProgressBar::hidden),
        }
    }
}

impl Progress for Bar {
    fn start(&self, phase: &str, total: u64) {
        if let Some(bar) = &self.bar {
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            bar.set_length(total);
            bar.set_position(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>8} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(phase.to_string());
            bar.enable_steady_tick(Duration::from_millis(200));
        }
    }
    fn advance(&self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }
    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// The stable JSON form of a restore point (documented in docs/cli.md).
pub fn restore_point_json(rp: &RestorePointRow) -> Value {
    let m = &rp.manifest;
    json!({
        "id": rp.id,
        "disk": m.disk,
        "time": m.time.to_string(),
        "virtual_size": m.virtual_size,
        "block_size": m.block_size,
        "parent": m.parent,
        "mode": m.mode,
        "source": m.source,
        "root": m.root,
        "stats": m.stats,
    })
}

/// Bytes for people: 1.5 GiB.
pub fn bytes(n: u64) -> String {
    indicatif::BinaryBytes(n).to_string()
}

/// A short id for tables.
pub fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

/// Human description of how a restore point was taken.
pub fn mode(m: &cbtvault_repo::BackupMode) -> String {
    match m {
        cbtvault_repo::BackupMode::Full { reason: None } => "full".into(),
        cbtvault_repo::BackupMode::Full { reason: Some(r) } => format!("full ({r})"),
        cbtvault_repo::BackupMode::Incremental { changed_blocks, .. } => {
            format!("incremental ({changed_blocks} changed)")
        }
    }
}
