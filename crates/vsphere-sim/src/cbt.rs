//! Changed-block tracking of one simulated disk, and the answers to
//! `QueryChangedDiskAreas`.
//!
//! The state is an *epoch* (16 random bytes, new at every reset), a
//! generation counter, a log of guest writes `(generation, start, len)`, and the
//! allocation log (kept across resets, as the `.ctk` is pre-filled with
//! allocated blocks). A snapshot takes the changeId `fmt(epoch)/generation` and
//! then bumps `generation`, so the writes between two snapshots are exactly those
//! with `g < generation ≤ gS`. The changeId's form is VMware's
//! (`52 2d 7b 8f ac 61 51 cc-77 4c 7b ec 91 50 bb 7b/1`): 16 hex bytes
//! separated by spaces, `-` after the eighth, `/`, a decimal sequence.

use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::fault::SimFault;

/// One disk's tracking state.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Cbt {
    /// Tracking is on and effective (after the stun that follows enabling).
    pub active: bool,
    pub epoch: [u8; 16],
    /// The generation guest writes now belong to (≥ 1 once active).
    pub generation: u64,
    /// Guest writes since the last reset: `(generation, start, len)`.
    pub log: Vec<(u64, u64, u64)>,
    /// Every write ever: what `*` reports as allocated, as `(generation, start, len)`.
    pub allocated: Vec<(u64, u64, u64)>,
}

/// How the simulator answers a changed-areas query.
#[derive(Clone, Copy, Debug)]
pub struct QueryShape {
    /// Most extents in one answer; `length` then stops at the last one.
    pub page_extents: usize,
    /// Round extents out to this many bytes (0: exact), making false
    /// positives on purpose.
    pub granularity: u64,
}

impl Cbt {
    /// Starts (or restarts) tracking with a new epoch: older changeIds
    /// stop working, the allocation log stays.
    pub fn reset(&mut self) {
        rand::thread_rng().fill_bytes(&mut self.epoch);
        self.generation = 1;
        self.log.clear();
        self.active = true;
    }

    /// Records a guest write.
    pub fn write(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        let g = if self.active { self.generation } else { 0 };
        if self.active {
            self.log.push((g, start, len));
        }
        self.allocated.push((g, start, len));
    }

    /// A snapshot's changeId (`None` when tracking is off); bumps the
    /// generation. Also returns the snapshot's generation.
    pub fn snapshot(&mut self) -> (Option<String>, u64) {
        if !self.active {
            return (None, 0);
        }
        let id = format!("{}/{}", fmt_epoch(&self.epoch), self.generation);
        let g = self.generation;
        self.generation += 1;
        // The log before this epoch's first kept snapshot is never asked
        // for again once every snapshot is gone; it is small in tests.
        (Some(id), g)
    }

    /// The answer for a snapshot at generation `snap_gen` whose changeId
    /// was `snap_change_id`, asked from `start` with `change_id`.
    pub fn query(
        &self,
        snap_change_id: Option<&str>,
        snap_gen: u64,
        capacity: u64,
        start: u64,
        change_id: &str,
        shape: QueryShape,
    ) -> Result<(u64, Vec<(u64, u64)>), SimFault> {
        if start >= capacity {
            return Err(SimFault::invalid_argument("startOffset"));
        }
        let Some(snap_id) = snap_change_id.filter(|_| self.active) else {
            return Err(SimFault::file_fault_key(
                "vim.hostd.vmsvc.cbt.noTrack",
                "Change tracking is not active on the disk",
            ));
        };
        let raw: Vec<(u64, u64)> = if change_id == "*" {
            self.allocated
                .iter()
                .filter(|(g, _, _)| *g <= snap_gen)
                .map(|&(_, s, l)| (s, l))
                .collect()
        } else {
            let (epoch, g) =
                parse_change_id(change_id).ok_or_else(|| SimFault::invalid_argument("changeId"))?;
            let snap_epoch = parse_change_id(snap_id).map(|(e, _)| e);
            if Some(epoch) != snap_epoch || epoch != self.epoch || g > snap_gen {
                return Err(SimFault::file_fault_key(
                    "vim.hostd.vmsvc.cbt.cannotGetChanges",
                    "Cannot compute changes: the change ID does not belong to this tracking epoch",
                ));
            }
            self.log
                .iter()
                .filter(|(w, _, _)| g < *w && *w <= snap_gen)
                .map(|&(_, s, l)| (s, l))
                .collect()
        };
        Ok(page(raw, capacity, start, shape))
    }
}

/// Clips to `[start, capacity)`, rounds, sorts, merges, and cuts the page
/// at `page_extents`. Returns `(length, extents)`.
pub fn page(
    raw: Vec<(u64, u64)>,
    capacity: u64,
    start: u64,
    shape: QueryShape,
) -> (u64, Vec<(u64, u64)>) {
    let g = shape.granularity;
    let mut spans: Vec<(u64, u64)> = raw
        .into_iter()
        .filter_map(|(s, l)| {
            let (mut s, mut e) = (s, s.saturating_add(l));
            if g > 1 {
                s -= s % g;
                e = e.div_ceil(g).saturating_mul(g);
            }
            let (s, e) = (s.max(start), e.min(capacity));
            (s < e).then_some((s, e))
        })
        .collect();
    spans.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in spans {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    let cap = shape.page_extents.max(1);
    let length = if merged.len() > cap {
        merged.truncate(cap);
        merged.last().map_or(capacity - start, |l| l.1 - start)
    } else {
        capacity - start
    };
    (
        length,
        merged.into_iter().map(|(s, e)| (s, e - s)).collect(),
    )
}

/// `52 2d 7b 8f ac 61 51 cc-77 4c 7b ec 91 50 bb 7b`
pub fn fmt_epoch(e: &[u8; 16]) -> String {
    let half = |b: &[u8]| {
        b.iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!("{}-{}", half(&e[..8]), half(&e[8..]))
}

/// Splits a changeId into its epoch and sequence.
pub fn parse_change_id(id: &str) -> Option<([u8; 16], u64)> {
    let (uuid, seq) = id.rsplit_once('/')?;
    let seq = seq.parse().ok()?;
    let hex: String = uuid.chars().filter(|c| !matches!(c, ' ' | '-')).collect();
    let bytes = hex::decode(hex).ok()?;
    Some((bytes.try_into().ok()?, seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: QueryShape = QueryShape {
        page_extents: 2000,
        granularity: 0,
    };

    #[test]
    fn change_ids_round_trip_in_vmware_form() {
        let e = [
            0x52u8, 0x2d, 0x7b, 0x8f, 0xac, 0x61, 0x51, 0xcc, 0x77, 0x4c, 0x7b, 0xec, 0x91, 0x50,
            0xbb, 0x7b,
        ];
        assert_eq!(
            fmt_epoch(&e),
            "52 2d 7b 8f ac 61 51 cc-77 4c 7b ec 91 50 bb 7b"
        );
        assert_eq!(
            parse_change_id("52 2d 7b 8f ac 61 51 cc-77 4c 7b ec 91 50 bb 7b/12"),
            Some((e, 12))
        );
        assert_eq!(parse_change_id("nonsense"), None);
    }

    #[test]
    fn changes_between_two_snapshots() {
        let mut c = Cbt::default();
        c.reset();
        c.write(0, 10);
        let (s1, _) = c.snapshot();
        c.write(100, 1);
        c.write(105, 10);
        let (s2, g2) = c.snapshot();
        c.write(5000, 1);
        let (len, areas) = c
            .query(s2.as_deref(), g2, 1 << 20, 0, s1.as_deref().unwrap(), SHAPE)
            .unwrap();
        assert_eq!(len, 1 << 20);
        assert_eq!(areas, [(100, 1), (105, 10)]);
        let (_, all) = c.query(s2.as_deref(), g2, 1 << 20, 0, "*", SHAPE).unwrap();
        assert_eq!(all, [(0, 10), (100, 1), (105, 10)]);
        c.reset();
        let e = c
            .query(s2.as_deref(), g2, 1 << 20, 0, s1.as_deref().unwrap(), SHAPE)
            .unwrap_err();
        assert_eq!(e.type_name, "FileFault");
    }

    #[test]
    fn pages_stop_at_the_cap() {
        let raw = (0..10).map(|i| (i * 1000, 1)).collect();
        let shape = QueryShape {
            page_extents: 3,
            granularity: 0,
        };
        let (len, areas) = page(raw, 1 << 20, 1500, shape);
        assert_eq!(areas, [(2000, 1), (3000, 1), (4000, 1)]);
        assert_eq!(len, 4001 - 1500);
    }
}
