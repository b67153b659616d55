//! When a job runs next: its schedule as a cron pattern in a time zone
//! (`cbtvault_config::Schedule::compile`), stepped with croner over jiff's
//! zoned times, so daylight-saving changes are handled by the time zone
//! database rather than by arithmetic on offsets.

use cbtvault_config::Schedule;
use jiff::{Timestamp, Zoned, tz::TimeZone};

use crate::error::{Error, Result};

/// A job's schedule, ready to step.
#[derive(Clone, Debug)]
pub struct Plan {
    cron: croner::Cron,
    tz: TimeZone,
    /// The pattern as the status shows it (`at`/`days` rewritten as cron).
    pattern: String,
}

impl Plan {
    /// The plan for `schedule` of job `job` (validated on load; an error
    /// here names the job all the same).
    pub fn new(job: &str, schedule: &Schedule) -> Result<Plan> {
        let (cron, tz) = schedule.compile().map_err(|what| Error::Schedule {
            job: job.into(),
            what,
        })?;
        let pattern = cron.pattern.to_string();
        Ok(Plan { cron, tz, pattern })
    }

    /// The first scheduled time strictly after `after`; `None` when the
    /// pattern never matches again (such as February 30).
    pub fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        let start = after.to_zoned(self.tz.clone());
        self.cron
            .find_next_occurrence(&start, false)
            .ok()
            .map(|z: Zoned| z.timestamp())
    }

    /// Whether a scheduled time fell in `(since, now]`: a run was missed.
    pub fn missed(&self, since: Timestamp, now: Timestamp) -> bool {
        self.next_after(since).is_some_and(|t| t <= now)
    }

    /// The cron pattern.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// The time zone's name (`system` for an unnamed local zone).
    pub fn time_zone(&self) -> &str {
        self.tz.iana_name().unwrap_or("system")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(at: Option<&str>, days: &[&str], cron: Option<&str>, tz: &str) -> Plan {
        let schedule = Schedule {
            at: at.map(Into::into),
            days: days.iter().map(|d| d.to_string()).collect(),
            cron: cron.map(Into::into),
            timezone: Some(tz.into()),
        };
        Plan::new("j", &schedule).unwrap()
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn at_and_days_step_to_the_next_listed_day() {
        // 2026-11-27 is a Friday.
        let p = plan(Some("01:30"), &["mon", "wed", "fri"], None, "UTC");
        assert_eq!(
            p.next_after(ts("2026-11-27T01:29:00Z")),
            Some(ts("2026-11-27T01:30:00Z"))
        );
        assert_eq!(
            p.next_after(ts("2026-11-27T01:30:00Z")),
            Some(ts("2026-11-30T01:30:00Z")),
            "Friday's run done, the next is Monday"
        );
        let daily = plan(Some("02:00"), &[], None, "UTC");
        assert_eq!(
            daily.next_after(ts("2026-11-27T03:00:00Z")),
            Some(ts("2026-11-28T02:00:00Z"))
        );
    }

    #[test]
    fn cron_follows_its_time_zone_across_daylight_saving() {
        let p = plan(None, &[], Some("30 1 * * *"), "Europe/Paris");
        // Winter: Paris is UTC+1.
        assert_eq!(
            p.next_after(ts("2026-01-10T00:00:00Z")),
            Some(ts("2026-01-10T00:30:00Z"))
        );
        // Summer time starts on 2026-03-29; 01:30 the next day is UTC+2.
        assert_eq!(
            p.next_after(ts("2026-03-29T12:00:00Z")),
            Some(ts("2026-03-29T23:30:00Z"))
        );
        // 02:30 does not exist on 2026-03-29 in Paris: that day's run is
        // once, after the jump, never twice and never skipped for good.
        let gap = plan(None, &[], Some("30 2 * * *"), "Europe/Paris");
        let first = gap.next_after(ts("2026-03-28T12:00:00Z")).unwrap();
        assert!(first > ts("2026-03-29T00:59:59Z"), "{first}");
        let second = gap.next_after(first).unwrap();
        assert_eq!(second, ts("2026-03-30T00:30:00Z"));
        // 02:30 happens twice on 2026-10-25 (clocks go back): one run.
        let fold_first = gap.next_after(ts("2026-10-24T12:00:00Z")).unwrap();
        let fold_next = gap.next_after(fold_first).unwrap();
        assert!(fold_next > ts("2026-10-26T00:00:00Z"), "{fold_next}");
    }

    #[test]
    fn six_fields_give_seconds() {
        let p = plan(None, &[], Some("*/2 * * * * *"), "UTC");
        assert_eq!(
            p.next_after(ts("2026-11-29T10:00:01Z")),
            Some(ts("2026-11-29T10:00:02Z"))
        );
        assert_eq!(
            p.next_after(ts("2026-11-29T10:00:02Z")),
            Some(ts("2026-11-29T10:00:04Z"))
        );
    }

    #[test]
    fn a_missed_run_is_seen() {
        let p = plan(Some("02:00"), &[], None, "UTC");
        let last = ts("2026-11-27T02:00:05Z");
        assert!(!p.missed(last, ts("2026-11-28T01:59:00Z")));
        assert!(p.missed(last, ts("2026-11-28T02:00:00Z")));
    }
}
