//! Names: checkpoints (dirty bitmaps) and everything a backup job creates
//! in QEMU, all derived from the job name so leftovers can be found again.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Every object a job creates is named `cbtv-<job>-...`.
pub(crate) const PREFIX: &str = "cbtv-";
/// The longest job name: QEMU node names have at most 31 bytes, and
/// `cbtv-` + job + `-snap` must fit.
pub const MAX_JOB_NAME: usize = 20;
/// QEMU stores at most 1023 bytes of a persistent bitmap's name.
const MAX_CHECKPOINT_NAME: usize = 1023;

/// A checkpoint: the name of a persistent dirty bitmap in the disk image
/// that records every write since the backup that created it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CheckpointName(String);

impl CheckpointName {
    /// Checks a name from elsewhere (a manifest, the command line).
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        let why = if name.is_empty() {
            Some("it is empty")
        } else if name.len() > MAX_CHECKPOINT_NAME {
            Some("it is longer than 1023 bytes")
        } else if name.chars().any(char::is_control) {
            Some("it contains control characters")
        } else {
            None
        };
        match why {
            Some(why) => Err(Error::InvalidName {
                kind: "checkpoint",
                name,
                why: why.into(),
            }),
            None => Ok(Self(name)),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A fresh name for `job`: `cbtv-<job>-<unix milliseconds>`.
    pub(crate) fn generate(job: &JobName, taken: impl Fn(&str) -> bool) -> Self {
        let mut stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        loop {
            let name = format!("{PREFIX}{job}-{stamp}");
            if !taken(&name) {
                return Self(name);
            }
            stamp = stamp.wrapping_add(1);
        }
    }
}

impl fmt::Display for CheckpointName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for CheckpointName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

impl TryFrom<String> for CheckpointName {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Self::new(s)
    }
}

impl From<CheckpointName> for String {
    fn from(name: CheckpointName) -> Self {
        name.0
    }
}

/// A validated job name: 1 to 20 of `A-Z a-z 0-9 _ . -`. One job name
/// stands for the backups of one disk into one repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JobName(String);

impl JobName {
    pub(crate) fn new(name: &str) -> Result<Self> {
        let why = if name.is_empty() {
            Some("it is empty".to_owned())
        } else if name.len() > MAX_JOB_NAME {
            Some(format!(
                "it is longer than {MAX_JOB_NAME} bytes (QEMU node names are short)"
            ))
        } else if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        {
            Some("only letters, digits, '_', '.' and '-' are allowed".to_owned())
        } else {
            None
        };
        match why {
            Some(why) => Err(Error::InvalidName {
                kind: "job",
                name: name.to_owned(),
                why,
            }),
            None => Ok(Self(name.to_owned())),
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `bitmap` is a checkpoint this job generated:
    /// `cbtv-<job>-<digits>` (so job `a` never claims job `a-1`'s).
    pub(crate) fn owns_bitmap(&self, bitmap: &str) -> bool {
        bitmap
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.strip_prefix(self.0.as_str()))
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
    }
}

impl fmt::Display for JobName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The QEMU objects of one job, in the order they are created.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    /// `blockdev-create` job making the fleece file.
    pub create_file_job: String,
    /// `file` node of the fleece image.
    pub fleece_file: String,
    /// `blockdev-create` job formatting it as qcow2.
    pub create_qcow2_job: String,
    /// The qcow2 fleece node, the backup job's target.
    pub fleece: String,
    /// The `blockdev-backup sync=none` job.
    pub backup_job: String,
    /// The copy-before-write filter the backup job inserts.
    pub cbw: String,
    /// The snapshot-access node over the filter.
    pub snap: String,
    /// The NBD export id and name.
    pub export: String,
    /// The fleece image on disk.
    pub fleece_path: PathBuf,
}

impl Names {
    pub(crate) fn new(job: &JobName, work_dir: &Path) -> Self {
        let base = format!("{PREFIX}{job}");
        Self {
            create_file_job: format!("{base}-mkfile"),
            fleece_file: format!("{base}-file"),
            create_qcow2_job: format!("{base}-mkqcow2"),
            fleece: format!("{base}-fl"),
            backup_job: format!("{base}-backup"),
            cbw: format!("{base}-cbw"),
            snap: format!("{base}-snap"),
            export: base.clone(),
            fleece_path: work_dir.join(format!("{base}-fleece.qcow2")),
        }
    }

    /// Node names, topmost first (the order they must be deleted in).
    pub(crate) fn nodes(&self) -> [&str; 4] {
        [&self.snap, &self.cbw, &self.fleece, &self.fleece_file]
    }

    /// Job ids.
    pub(crate) fn jobs(&self) -> [&str; 3] {
        [
            &self.backup_job,
            &self.create_qcow2_job,
            &self.create_file_job,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names_are_checked_and_fit_qemu_node_names() {
        for bad in ["", "a b", "x/y", "é", "abcdefghijabcdefghijk"] {
            assert!(JobName::new(bad).is_err(), "{bad:?}");
        }
        let job = JobName::new("abcdefghij-bcdefghij").unwrap();
        let names = Names::new(&job, Path::new("/tmp"));
        for node in names.nodes() {
            assert!(node.len() <= 31, "{node}");
        }
    }

    #[test]
    fn a_job_owns_only_its_own_generated_bitmaps() {
        let job = JobName::new("a").unwrap();
        assert!(job.owns_bitmap("cbtv-a-1700000000000"));
        assert!(!job.owns_bitmap("cbtv-a-1-1700000000000"));
        assert!(!job.owns_bitmap("cbtv-a-"));
        assert!(!job.owns_bitmap("cbtv-ab-1"));
        assert!(!job.owns_bitmap("bm0"));
        let generated = CheckpointName::generate(&job, |n| n.ends_with('0'));
        assert!(job.owns_bitmap(generated.as_str()), "{generated}");
        assert!(!generated.as_str().ends_with('0'));
    }

    #[test]
    fn checkpoint_names_round_trip_through_serde() {
        let name = CheckpointName::new("bm0").unwrap();
        let json = serde_json::to_string(&name).unwrap();
        assert_eq!(json, "\"bm0\"");
        assert_eq!(serde_json::from_str::<CheckpointName>(&json).unwrap(), name);
        assert!(serde_json::from_str::<CheckpointName>("\"\"").is_err());
        assert!("a\nb".parse::<CheckpointName>().is_err());
    }
}
