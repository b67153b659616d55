//! What the user sees: logs, progress bars, tables and JSON.
//!
//! Everything meant for stdout goes through [`outln!`]: a reader that goes
//! away (`cbtvault list | head -1`) must not turn into a panic, and a full
//! disk under `> file` must not pass for success.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::Duration;

use cbtvault_engine::Progress;
use cbtvault_repo::RestorePointRow;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use crate::cli::Global;

/// The first failed write to stdout, if any.
static STDOUT_ERROR: Mutex<Option<std::io::ErrorKind>> = Mutex::new(None);

/// Writes one line to stdout. Once a write fails, later output is dropped:
/// the command still finishes (a backup still commits) and `main` decides
/// what the failure means ([`stdout_failure`]).
pub fn stdout_line(args: std::fmt::Arguments) {
    let mut failed = STDOUT_ERROR.lock().unwrap_or_else(|e| e.into_inner());
    if failed.is_some() {
        return;
    }
    let mut out = std::io::stdout().lock();
    let written = out
        .write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush());
    if let Err(e) = written {
        *failed = Some(e.kind());
    }
}

/// Writes one line to stderr; a closed stderr is not worth failing for.
pub fn stderr_line(args: std::fmt::Arguments) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(args).and_then(|()| err.write_all(b"\n"));
}

/// Why stdout output was lost, unless the reader just went away (a broken
/// pipe, as with `| head`), which is not an error of ours.
pub fn stdout_failure() -> Option<std::io::ErrorKind> {
    let failed = *STDOUT_ERROR.lock().unwrap_or_else(|e| e.into_inner());
    failed.filter(|k| *k != std::io::ErrorKind::BrokenPipe)
}

/// `println!` for command output: see [`stdout_line`].
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::output::stdout_line(format_args!($($arg)*))
    };
}
pub(crate) use outln;

/// `eprintln!` that never panics: see [`stderr_line`].
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::output::stderr_line(format_args!($($arg)*))
    };
}
pub(crate) use errln;

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
        // journald and log files get no colour codes.
        .with_ansi(std::io::stderr().is_terminal())
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

/// The stable JSON form of a restore point (documented in docs/cli.md);
/// times in UTC, `vm` only when known.
pub fn restore_point_json(rp: &RestorePointRow) -> Value {
    let m = &rp.manifest;
    let mut value = json!({
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
    });
    if let (Some(vm), Some(object)) = (&m.source.vm, value.as_object_mut()) {
        object.insert("vm".into(), json!(vm));
    }
    value
}

/// A restore point for people (`show` without `--json`): one field a line.
pub fn restore_point_text(rp: &RestorePointRow) -> String {
    let m = &rp.manifest;
    let s = &m.stats;
    let mut source = format!("{} {}", m.source.provider, m.source.location);
    if let Some(snapshot) = &m.source.snapshot {
        source.push_str(&format!(" (snapshot {snapshot})"));
    }
    let mut lines = vec![
        ("restore point", rp.id.clone()),
        ("disk", m.disk.clone()),
        ("time", crate::commands::local_time(m.time)),
        (
            "size",
            format!("{} ({} bytes)", bytes(m.virtual_size), m.virtual_size),
        ),
        ("mode", mode(&m.mode)),
        (
            "parent",
            m.parent.clone().unwrap_or_else(|| "none".to_string()),
        ),
        ("source", source),
    ];
    for (key, value) in &m.source.details {
        lines.push(("", format!("{key}: {value}")));
    }
    if let Some(vm) = &m.source.vm {
        lines.push(("vm", format!("{} ({}) on {}", vm.name, vm.uuid, vm.host)));
        if let Some(device) = &vm.device {
            lines.push(("", format!("device: {device}")));
        }
        if let Some(label) = &vm.disk_label {
            lines.push(("", format!("disk label: {label}")));
        }
        if let Some(id) = &vm.metadata {
            lines.push(("", format!("VM metadata: {id}")));
        }
    }
    lines.extend([
        (
            "read",
            format!("{} in {} blocks", bytes(s.bytes_read), s.blocks_read),
        ),
        (
            "stored",
            format!(
                "{} new blocks in {} ({} uncompressed); {} deduplicated, {} zero",
                s.blocks_new,
                bytes(s.bytes_stored),
                bytes(s.bytes_new),
                s.blocks_dedup,
                s.blocks_zero
            ),
        ),
        ("took", format!("{:.1} s", s.duration_ms as f64 / 1000.0)),
        ("block map", m.root.to_string()),
    ]);
    lines
        .iter()
        .map(|(k, v)| format!("{k:<14} {v}"))
        .collect::<Vec<_>>()
        .join("\n")
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
    outln!(
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
