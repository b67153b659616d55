//! Retention: which restore points a `--keep-*` policy keeps.
//!
//! The rules are those backup administrators know from restic and borg:
//! `last N` keeps the N newest; `daily N` keeps the newest restore point of
//! each of the N newest days that have one (likewise weeks, ISO numbered,
//! and months). A restore point kept by any rule is kept. Days are UTC days.

use serde::Serialize;

use crate::catalogue::RestorePointRow;

/// How many restore points to keep, per disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeepPolicy {
    pub last: Option<usize>,
    pub daily: Option<usize>,
    pub weekly: Option<usize>,
    pub monthly: Option<usize>,
    /// Allow a disk's last restore point to go. Without it the newest one
    /// of each disk is always kept, whatever the rules say
    /// (`--keep-last 0` would otherwise forget everything).
    pub forget_last: bool,
}

impl KeepPolicy {
    /// True when no rule is set (which would forget everything: refused).
    pub fn is_empty(&self) -> bool {
        self.last.is_none()
            && self.daily.is_none()
            && self.weekly.is_none()
            && self.monthly.is_none()
    }
}

/// The decision for one restore point.
#[derive(Clone, Debug, Serialize)]
pub struct Decision {
    pub id: String,
    pub disk: String,
    pub time: jiff::Timestamp,
    pub keep: bool,
    /// The rules that keep it.
    pub reasons: Vec<String>,
}

/// Applies `policy` to the restore points of one disk (any order).
pub fn plan(points: &[RestorePointRow], policy: &KeepPolicy) -> Vec<Decision> {
    let mut sorted: Vec<&RestorePointRow> = points.iter().collect();
    sorted.sort_by(|a, b| b.manifest.time.cmp(&a.manifest.time).then(b.id.cmp(&a.id)));
    let mut decisions: Vec<Decision> = sorted
        .iter()
        .map(|rp| Decision {
            id: rp.id.clone(),
            disk: rp.manifest.disk.clone(),
            time: rp.manifest.time,
            keep: false,
            reasons: Vec::new(),
        })
        .collect();
    if let Some(n) = policy.last {
        for d in decisions.iter_mut().take(n) {
            d.reasons.push("last".into());
        }
    }
    type Bucket = fn(&jiff::civil::DateTime) -> (i16, i16);
    let rules: [(&str, Option<usize>, Bucket); 3] = [
        ("daily", policy.daily, |t| (t.year(), t.day_of_year())),
        ("weekly", policy.weekly, |t| {
            let w = t.date().iso_week_date();
            (w.year(), i16::from(w.week()))
        }),
        ("monthly", policy.monthly, |t| {
            (t.year(), i16::from(t.month()))
        }),
    ];
    for (name, count, bucket) in rules {
        let Some(count) = count else { continue };
        let mut last_bucket = None;
        let mut used = 0;
        for d in decisions.iter_mut() {
            if used >= count {
                break;
            }
            let b = bucket(&d.time.to_zoned(jiff::tz::TimeZone::UTC).datetime());
            if last_bucket != Some(b) {
                last_bucket = Some(b);
                used += 1;
                d.reasons.push(name.into());
            }
        }
    }
    for d in &mut decisions {
        d.keep = !d.reasons.is_empty();
    }
    if !policy.forget_last {
        protect_last(&mut decisions);
    }
    decisions
}

/// The reason given when a disk's last restore point is kept.
pub const LAST_POINT: &str = "the disk's last restore point";

/// Keeps the newest restore point of each disk whose every restore point
/// `decisions` (one disk's points, or several disks') would forget.
/// `decisions` must hold all restore points of the disks concerned.
pub fn protect_last(decisions: &mut [Decision]) {
    let mut newest: std::collections::BTreeMap<String, usize> = Default::default();
    let mut kept: std::collections::BTreeSet<String> = Default::default();
    for (i, d) in decisions.iter().enumerate() {
        if d.keep {
            kept.insert(d.disk.clone());
        }
        let slot = newest.entry(d.disk.clone()).or_insert(i);
        let current = &decisions[*slot];
        if (d.time, &d.id) > (current.time, &current.id) {
            *slot = i;
        }
    }
    for (disk, i) in newest {
        if !kept.contains(&disk) {
            decisions[i].keep = true;
            decisions[i].reasons.push(LAST_POINT.into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{BackupMode, BackupStats, Manifest, SourceInfo};

    fn point(id: &str, time: &str) -> RestorePointRow {
        RestorePointRow {
            id: id.into(),
            manifest: Manifest {
                format: 1,
                disk: "d".into(),
                source: SourceInfo::default(),
                time: time.parse().unwrap(),
                virtual_size: 0,
                block_size: 65536,
                root: crate::BlobId::ZERO,
                fanout: 128,
                parent: None,
                mode: BackupMode::Full { reason: None },
                stats: BackupStats::default(),
            },
        }
    }

    #[test]
    fn daily_keeps_newest_of_each_day() {
        let points = vec![
            point("a", "2026-11-01T01:00:00Z"),
            point("b", "2026-11-01T23:00:00Z"),
            point("c", "2026-11-02T01:00:00Z"),
            point("d", "2026-11-03T01:00:00Z"),
        ];
        let kept: Vec<_> = plan(
            &points,
            &KeepPolicy {
                daily: Some(2),
                ..Default::default()
            },
        )
        .into_iter()
        .filter(|d| d.keep)
        .map(|d| d.id)
        .collect();
        assert_eq!(kept, ["d", "c"]);
        let kept: Vec<_> = plan(
            &points,
            &KeepPolicy {
                daily: Some(5),
                last: Some(1),
                ..Default::default()
            },
        )
        .into_iter()
        .filter(|d| d.keep)
        .map(|d| d.id)
        .collect();
        assert_eq!(kept, ["d", "c", "b"]);
    }

    #[test]
    fn weekly_and_monthly() {
        let points = vec![
            point("a", "2026-10-05T00:00:00Z"),
            point("b", "2026-10-30T00:00:00Z"),
            point("c", "2026-11-02T00:00:00Z"),
            point("d", "2026-11-03T00:00:00Z"),
        ];
        let keep = |p: KeepPolicy| -> Vec<String> {
            plan(&points, &p)
                .into_iter()
                .filter(|d| d.keep)
                .map(|d| d.id)
                .collect()
        };
        assert_eq!(
            keep(KeepPolicy {
                weekly: Some(2),
                ..Default::default()
            }),
            ["d", "b"]
        );
        assert_eq!(
            keep(KeepPolicy {
                monthly: Some(3),
                ..Default::default()
            }),
            ["d", "b"]
        );
        // `--keep-last 0` keeps the disk's last restore point unless
        // forgetting it is asked for explicitly.
        assert_eq!(
            keep(KeepPolicy {
                last: Some(0),
                ..Default::default()
            }),
            ["d"]
        );
        assert_eq!(
            keep(KeepPolicy {
                last: Some(0),
                forget_last: true,
                ..Default::default()
            }),
            Vec::<String>::new()
        );
    }
}
