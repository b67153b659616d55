//! Forgetting restore points: a plan ([`Repository::forget_plan`]) says
//! which go and why the others stay; applying it ([`Repository::forget`])
//! removes them. A dry run prints the plan that a real run applies.
//!
//! Retention rules are those backup administrators know from restic and
//! borg: `last N` keeps the N newest; `daily N` keeps the newest restore
//! point of each of the N newest days that have one (likewise weeks, ISO
//! numbered, and months). A restore point kept by any rule is kept. Days
//! are UTC days. Unless the plan allows it, a disk's last restore point is
//! always kept, whatever the rules or the ids given say.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::catalogue::RestorePointRow;
use crate::error::{Error, Result};
use crate::repository::Repository;

/// How many restore points to keep, per disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeepPolicy {
    pub last: Option<usize>,
    pub daily: Option<usize>,
    pub weekly: Option<usize>,
    pub monthly: Option<usize>,
}

impl KeepPolicy {
    /// True when no rule is set (which would forget everything: refused).
    pub fn is_empty(&self) -> bool {
        self.last.is_none()
            && self.daily.is_none()
            && self.weekly.is_none()
            && self.monthly.is_none()
    }

    /// The ids of `points` (one disk's, from anywhere: a copy asks this of
    /// the union of its source's and its target's) that the policy keeps,
    /// the newest always among them. An empty policy keeps everything.
    pub fn kept(&self, points: &[RestorePointRow]) -> BTreeSet<String> {
        if self.is_empty() {
            return points.iter().map(|p| p.id.clone()).collect();
        }
        let mut decisions = plan(points, self);
        protect_last(&mut decisions);
        decisions
            .into_iter()
            .filter(|d| d.keep)
            .map(|d| d.id)
            .collect()
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

/// Which restore points a forget is about.
#[derive(Clone, Debug)]
pub enum ForgetSelection {
    /// Those a retention policy does not keep, on one disk or on all.
    Policy {
        policy: KeepPolicy,
        disk: Option<String>,
    },
    /// These restore points (ids or unique prefixes).
    Ids(Vec<String>),
}

/// What a forget will do: a decision for each restore point concerned.
#[derive(Clone, Debug, Serialize)]
pub struct ForgetPlan {
    /// Grouped by disk: newest first under a policy, oldest first for ids.
    pub decisions: Vec<Decision>,
}

impl ForgetPlan {
    /// The restore points the plan forgets.
    pub fn forgotten(&self) -> impl Iterator<Item = &Decision> {
        self.decisions.iter().filter(|d| !d.keep)
    }

    /// Restore points kept only because each is its disk's last (the plan
    /// did not allow forgetting it).
    pub fn kept_as_last(&self) -> impl Iterator<Item = &Decision> {
        self.decisions
            .iter()
            .filter(|d| d.reasons.iter().any(|r| r == LAST_POINT))
    }
}

impl Repository {
    /// Decides which restore points `selection` forgets; changes nothing.
    /// Each disk's last restore point is kept unless `allow_forget_last`.
    pub fn forget_plan(
        &self,
        selection: &ForgetSelection,
        allow_forget_last: bool,
    ) -> Result<ForgetPlan> {
        let mut decisions = Vec::new();
        match selection {
            ForgetSelection::Policy { policy, disk } => {
                if policy.is_empty() {
                    return Err(Error::EmptyRetentionPolicy);
                }
                let disks = match disk {
                    Some(d) => vec![d.clone()],
                    None => self.catalogue().disks()?,
                };
                for disk in disks {
                    let points = self.catalogue().restore_points(Some(&disk))?;
                    let mut planned = plan(&points, policy);
                    if !allow_forget_last {
                        protect_last(&mut planned);
                    }
                    decisions.extend(planned);
                }
            }
            ForgetSelection::Ids(ids) => {
                let mut named = BTreeSet::new();
                for id in ids {
                    named.insert(self.resolve(id)?.id);
                }
                // Every point of the disks concerned, so that the last one
                // is noticed.
                let disks: BTreeSet<String> = self
                    .catalogue()
                    .restore_points(None)?
                    .into_iter()
                    .filter(|rp| named.contains(&rp.id))
                    .map(|rp| rp.manifest.disk)
                    .collect();
                for disk in disks {
                    let points = self.catalogue().restore_points(Some(&disk))?;
                    let mut all: Vec<Decision> = points
                        .into_iter()
                        .map(|rp| {
                            let asked = named.contains(&rp.id);
                            Decision {
                                id: rp.id,
                                disk: rp.manifest.disk,
                                time: rp.manifest.time,
                                keep: !asked,
                                reasons: if asked {
                                    Vec::new()
                                } else {
                                    vec!["not named".into()]
                                },
                            }
                        })
                        .collect();
                    if !allow_forget_last {
                        protect_last(&mut all);
                    }
                    decisions.extend(all.into_iter().filter(|d| named.contains(&d.id)));
                }
            }
        }
        Ok(ForgetPlan { decisions })
    }

    /// Forgets what `plan` forgets, taking the shared repository lock (see
    /// the locking table). Returns how many restore points went. Their
    /// data stays until gc.
    pub fn forget(&self, plan: &ForgetPlan) -> Result<usize> {
        self.require_writable("forget")?;
        if plan.forgotten().next().is_some() {
            self.require_removals("forget")?;
        }
        let _lock = self.lock_shared()?;
        let mut forgotten = 0;
        for d in plan.forgotten() {
            self.forget_one(&d.id)?;
            forgotten += 1;
        }
        Ok(forgotten)
    }
}

/// Applies `policy` to the restore points of one disk (any order), newest
/// first. Nothing protects the disk's last restore point here
/// ([`protect_last`] does).
pub(crate) fn plan(points: &[RestorePointRow], policy: &KeepPolicy) -> Vec<Decision> {
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
    decisions
}

/// The reason given when a disk's last restore point is kept.
pub const LAST_POINT: &str = "the disk's last restore point";

/// Keeps the newest restore point of each disk whose every restore point
/// `decisions` (one disk's points, or several disks') would forget.
/// `decisions` must hold all restore points of the disks concerned.
pub(crate) fn protect_last(decisions: &mut [Decision]) {
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
        // Keeping none keeps none, until the last point is protected.
        let none = KeepPolicy {
            last: Some(0),
            ..Default::default()
        };
        assert_eq!(keep(none), Vec::<String>::new());
        let mut decisions = plan(&points, &none);
        protect_last(&mut decisions);
        let kept: Vec<_> = decisions.iter().filter(|d| d.keep).map(|d| &d.id).collect();
        assert_eq!(kept, ["d"]);
    }
}
