//! Alerts: what a disk's backup found that someone should look at, beyond
//! whether it succeeded.
//!
//! - [`Alert::CbtAudit`]: the hypervisor's changed-block tracking missed
//!   writes (the engine's CBT audit, [`cbtvault_engine::audit`]); the disk
//!   failed, and its next backup is a full.
//! - [`Alert::ChurnJump`]: an incremental changed, or stored, far more of
//!   the disk than the disk's own history says is usual — what ransomware
//!   encrypting a disk looks like. Two measures, each a share of the disk:
//!   *changed* (blocks the change source marked) and *stored* (new bytes
//!   stored after compression: encrypted data neither deduplicates nor
//!   compresses, so this one jumps further when a disk's usual churn
//!   compresses well). Either is flagged when it is more than
//!   [`JUMP_FACTOR`] times its median over the disk's last
//!   [`HISTORY`] incrementals (at least [`MIN_HISTORY`] of them) and above
//!   a floor ([`FLOOR_SHARE`] of the disk and [`FLOOR_BYTES`]), so that a
//!   quiet or tiny disk does not alarm on a few blocks. Fulls are neither
//!   judged nor history: they read the whole disk by design.

use std::fmt;
use std::sync::Arc;

use cbtvault_engine::BackupOutcome;
use cbtvault_repo::{BackupMode, Manifest, Repository};
use serde::Serialize;

use crate::error::Error;

/// How far above its median a measure must jump to be flagged.
pub const JUMP_FACTOR: f64 = 10.0;
/// Incrementals of the disk the median is taken over (the newest).
pub const HISTORY: usize = 14;
/// Incrementals a disk needs before its churn is judged.
pub const MIN_HISTORY: usize = 3;
/// A jump must reach this share of the disk …
pub const FLOOR_SHARE: f64 = 0.01;
/// … and this many bytes.
pub const FLOOR_BYTES: u64 = 1 << 20;

/// Something a disk's backup found that someone should look at.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Alert {
    /// Blocks the hypervisor reported unchanged differ from the snapshot.
    CbtAudit {
        /// The restore point built on the report (forgotten).
        restore_point: String,
        /// Byte offsets of the blocks that differ (the first few).
        offsets: Vec<u64>,
    },
    /// A share of the disk far above the disk's history.
    ChurnJump {
        measure: Measure,
        /// This backup's share of the disk (0 to 1).
        now: f64,
        /// The median share over `history` earlier incrementals.
        median: f64,
        history: usize,
    },
}

/// What a [`Alert::ChurnJump`] measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    /// Blocks the change source marked.
    Changed,
    /// New bytes stored (after deduplication and compression).
    Stored,
}

impl fmt::Display for Alert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Alert::CbtAudit {
                restore_point,
                offsets,
            } => write!(
                f,
                "changed-block tracking missed writes ({} block(s) reported unchanged differ, restore point {restore_point} dropped); the next backup is a full",
                offsets.len()
            ),
            Alert::ChurnJump {
                measure,
                now,
                median,
                history,
            } => {
                let what = match measure {
                    Measure::Changed => "changed",
                    Measure::Stored => "stored new",
                };
                write!(
                    f,
                    "{what} {} of the disk, {} its median of {} over the last {history} backups (ransomware encrypting the disk looks like this)",
                    percent(*now),
                    times(*now, *median),
                    percent(*median),
                )
            }
        }
    }
}

fn percent(share: f64) -> String {
    if share < 0.01 {
        format!("{:.2}%", share * 100.0)
    } else {
        format!("{:.0}%", share * 100.0)
    }
}

fn times(now: f64, median: f64) -> String {
    if median > 0.0 {
        format!("{:.0}×", now / median)
    } else {
        "far above".into()
    }
}

/// The alerts of a failed disk.
pub(crate) fn of_error(e: &Error) -> Vec<Alert> {
    match e {
        Error::Engine(cbtvault_engine::Error::CbtAudit {
            restore_point,
            offsets,
            ..
        }) => vec![Alert::CbtAudit {
            restore_point: restore_point.clone(),
            offsets: offsets.clone(),
        }],
        _ => Vec::new(),
    }
}

/// The alerts of a committed disk: its churn against its history in
/// `repo`. A history that cannot be read gives none (with a warning).
pub(crate) async fn of_outcome(repo: &Arc<Repository>, outcome: &BackupOutcome) -> Vec<Alert> {
    let (repo, disk, id) = (
        repo.clone(),
        outcome.manifest.disk.clone(),
        outcome.restore_point.clone(),
    );
    let history = tokio::task::spawn_blocking(move || {
        let points = repo.catalogue().restore_points(Some(&disk))?;
        let mut earlier: Vec<Manifest> = points
            .into_iter()
            .filter(|rp| rp.id != id)
            .map(|rp| rp.manifest)
            .collect();
        earlier.sort_by_key(|m| m.time);
        Ok::<_, cbtvault_repo::Error>(earlier)
    })
    .await;
    match history {
        Ok(Ok(history)) => churn(&outcome.manifest, &history),
        Ok(Err(e)) => {
            tracing::warn!(disk = %outcome.manifest.disk, error = %e, "cannot read the disk's history; churn not judged");
            Vec::new()
        }
        Err(e) => {
            tracing::warn!(error = %e, "churn not judged");
            Vec::new()
        }
    }
}

/// A restore point's changed and stored shares of its disk, if it is an
/// incremental.
fn shares(m: &Manifest) -> Option<(f64, f64)> {
    let BackupMode::Incremental { changed_blocks, .. } = m.mode else {
        return None;
    };
    let blocks = m.stats.blocks_total.max(1) as f64;
    let size = m.virtual_size.max(1) as f64;
    Some((
        changed_blocks as f64 / blocks,
        m.stats.bytes_stored as f64 / size,
    ))
}

/// `now` against `history` (oldest first; `now` not in it).
pub fn churn(now: &Manifest, history: &[Manifest]) -> Vec<Alert> {
    let Some((changed, stored)) = shares(now) else {
        return Vec::new();
    };
    let past: Vec<(f64, f64)> = history
        .iter()
        .rev()
        .filter_map(shares)
        .take(HISTORY)
        .collect();
    if past.len() < MIN_HISTORY {
        return Vec::new();
    }
    let size = now.virtual_size.max(1) as f64;
    let floor = FLOOR_SHARE.max(FLOOR_BYTES as f64 / size);
    let mut alerts = Vec::new();
    for (measure, value, column) in [
        (
            Measure::Changed,
            changed,
            past.iter().map(|p| p.0).collect::<Vec<_>>(),
        ),
        (Measure::Stored, stored, past.iter().map(|p| p.1).collect()),
    ] {
        let median = median(column);
        if value > floor && value > JUMP_FACTOR * median {
            alerts.push(Alert::ChurnJump {
                measure,
                now: value,
                median,
                history: past.len(),
            });
        }
    }
    alerts
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An incremental of a 64 MiB disk (1024 blocks) that changed
    /// `changed` blocks and stored `stored` bytes.
    fn point(changed: u64, stored: u64) -> Manifest {
        Manifest {
            format: 1,
            disk: "d0".into(),
            source: Default::default(),
            time: jiff::Timestamp::UNIX_EPOCH,
            virtual_size: 64 << 20,
            block_size: 65536,
            root: cbtvault_repo::BlobId::ZERO,
            fanout: cbtvault_repo::FANOUT,
            parent: None,
            mode: BackupMode::Incremental {
                changes: "xenapi-cbt".into(),
                changed_blocks: changed,
            },
            stats: cbtvault_repo::BackupStats {
                blocks_total: 1024,
                bytes_stored: stored,
                ..Default::default()
            },
        }
    }

    fn nights(n: usize) -> Vec<Manifest> {
        (0..n).map(|i| point(4 + i as u64 % 3, 60_000)).collect()
    }

    #[test]
    fn fifty_times_the_usual_churn_is_flagged_on_both_measures() {
        let alerts = churn(&point(250, 250 << 16), &nights(7));
        assert_eq!(alerts.len(), 2, "{alerts:?}");
        assert!(matches!(
            alerts[0],
            Alert::ChurnJump {
                measure: Measure::Changed,
                history: 7,
                ..
            }
        ));
        let text = alerts[0].to_string();
        assert!(text.contains("changed 24% of the disk"), "{text}");
    }

    #[test]
    fn usual_churn_short_histories_tiny_jumps_and_fulls_are_not() {
        assert!(churn(&point(6, 70_000), &nights(7)).is_empty());
        assert!(churn(&point(250, 250 << 16), &nights(2)).is_empty());
        // Far above a quiet disk's median, but under the floor (1%).
        let quiet: Vec<Manifest> = (0..7).map(|_| point(0, 0)).collect();
        assert!(churn(&point(8, 8 << 16), &quiet).is_empty());
        let mut full = point(1024, 64 << 20);
        full.mode = BackupMode::Full { reason: None };
        assert!(churn(&full, &nights(7)).is_empty());
    }
}
