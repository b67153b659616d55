//! Progress of a multi-disk run on a terminal: one line per disk and a
//! total line, all in bytes
//! read. Nothing is drawn with --quiet, --json, or when stderr is not a
//! terminal.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use cbtvault_engine::Progress;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::cli::Global;

/// The bars of one run.
pub struct Bars {
    multi: Option<MultiProgress>,
    total: Option<ProgressBar>,
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

impl Bars {
    pub fn new(global: &Global) -> Bars {
        let show = !global.quiet && !global.json && std::io::stderr().is_terminal();
        if !show {
            return Bars {
                multi: None,
                total: None,
            };
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let total = multi.add(ProgressBar::new(0));
        total.set_style(style(
            "{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        ));
        total.set_prefix("total");
        total.enable_steady_tick(Duration::from_millis(200));
        Bars {
            multi: Some(multi),
            total: Some(total),
        }
    }

    /// Removes the bars (before the report is printed).
    pub fn clear(&self) {
        if let Some(total) = &self.total {
            total.finish_and_clear();
        }
        if let Some(multi) = &self.multi {
            let _ = multi.clear();
        }
    }
}

impl cbtvault_runner::Observer for Bars {}

impl cbtvault_engine::ProgressFactory for Bars {
    fn disk(&self, disk: &str) -> Arc<dyn Progress> {
        // `xen-POOL/VDI` and `qemu-HOST/NODE`: the VDI or node says which.
        let label = disk.rsplit('/').next().unwrap_or(disk);
        let (Some(multi), Some(total)) = (&self.multi, &self.total) else {
            return Arc::new(cbtvault_engine::NoProgress);
        };
        let bar = multi.insert_before(total, ProgressBar::new(0));
        bar.set_style(style(
            "{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {wide_msg}",
        ));
        // Long labels (`VDI uuid (VM uuid)`) would push the bar off the line.
        let short: String = label.chars().take(40).collect();
        bar.set_prefix("");
        bar.set_message(short);
        Arc::new(CaptureBar {
            bar,
            total: total.clone(),
        })
    }
}

/// One disk's line. Each phase adds its bytes to the line (and to the
/// total), so the line ends full.
struct CaptureBar {
    bar: ProgressBar,
    total: ProgressBar,
}

impl Progress for CaptureBar {
    fn start(&self, phase: &str, total: u64) {
        self.bar.set_prefix(phase.to_string());
        self.bar.inc_length(total);
        self.total.inc_length(total);
    }
    fn advance(&self, bytes: u64) {
        self.bar.inc(bytes);
        self.total.inc(bytes);
    }
    fn finish(&self) {}
}

impl Drop for CaptureBar {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}
