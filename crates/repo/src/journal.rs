//! The crash journal: small notes a hypervisor provider writes just before
//! a step a crash could leave half-done (taking a snapshot that is tagged
//! a moment later), so that the next run finds what the killed one left.
//!
//! Each note is one durable file, `journal/ID.json` (`{format, kind,
//! subject, detail, time}`), written before the step and removed once the
//! step is safe. They live beside the catalogue, not in it: `repair`, which
//! rebuilds a lost catalogue, never touches them. A note that cannot be read
//! is skipped with a warning (it would only make a reaper look for one
//! orphan less) and listed by [`Repository::journal_unreadable`]. A
//! subject's notes are read only by the holder of that subject's lock.
//!
//! Notes written by earlier versions as `runs` rows of the catalogue are
//! still read and closed; their ids are negative.

use serde::{Deserialize, Serialize};

use crate::backend::FileKind;
use crate::crypto::Sealed;
use crate::error::Result;
use crate::repository::Repository;

/// The note file's format.
const JOURNAL_FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Note {
    format: u32,
    kind: String,
    subject: String,
    detail: String,
    time: jiff::Timestamp,
}

fn name(id: i64) -> String {
    format!("{id:020}")
}

impl Repository {
    /// Notes that a run is about to take a step of `kind` on `subject`,
    /// with what it needs to know afterwards (`detail`); durable when this
    /// returns. Returns the note's id (positive).
    pub fn journal_note(&self, kind: &str, subject: &str, detail: &str) -> Result<i64> {
        let note = Note {
            format: JOURNAL_FORMAT,
            kind: kind.to_string(),
            subject: subject.to_string(),
            detail: detail.to_string(),
            time: jiff::Timestamp::now(),
        };
        let mut bytes = serde_json::to_vec(&note)
            .map_err(|e| crate::error::Error::InvalidArgument(format!("a journal note: {e}")))?;
        // Ids are the time in nanoseconds, made unique among the notes
        // present; the subject's lock keeps two writers of one subject apart.
        let taken = self.backend().list(FileKind::Journal)?;
        let mut id = i64::try_from(note.time.as_nanosecond())
            .unwrap_or(i64::MAX)
            .max(1);
        while taken.contains(&name(id)) {
            id = id.saturating_add(1);
        }
        // Sealed under its name: notes hold provider details (disk names,
        // snapshot ids) and resume records.
        self.crypto
            .seal(Sealed::Journal, name(id).as_bytes(), &mut bytes)?;
        self.backend().write(FileKind::Journal, &name(id), &bytes)?;
        Ok(id)
    }

    /// The notes of `kind` on `subject` never closed (their run died),
    /// oldest first, with their details.
    pub fn journal_unfinished(&self, kind: &str, subject: &str) -> Result<Vec<(i64, String)>> {
        let mut out = Vec::new();
        // Notes of earlier versions, kept in the catalogue's runs table.
        let legacy = self.catalogue().unfinished_runs(kind, subject)?;
        out.extend(legacy.into_iter().map(|(run, detail)| (-run, detail)));
        for file in self.backend().list(FileKind::Journal)? {
            let Some(note) = self.read_note(&file) else {
                continue;
            };
            if note.kind == kind
                && note.subject == subject
                && let Ok(id) = file.parse::<i64>()
            {
                out.push((id, note.detail));
            }
        }
        Ok(out)
    }

    /// Every note of `kind`, whatever its subject: `(id, subject, detail)`,
    /// oldest first. For gc, which holds the exclusive lock.
    pub(crate) fn journal_of_kind(&self, kind: &str) -> Result<Vec<(i64, String, String)>> {
        let mut out = Vec::new();
        for file in self.backend().list(FileKind::Journal)? {
            if let Some(note) = self.read_note(&file)
                && note.kind == kind
                && let Ok(id) = file.parse::<i64>()
            {
                out.push((id, note.subject, note.detail));
            }
        }
        Ok(out)
    }

    /// Closes note `id`: the step it covered is safe now.
    pub fn journal_close(&self, id: i64) -> Result<()> {
        if id < 0 {
            return self.catalogue().finish_run(-id, "done", None, "");
        }
        self.backend().remove(FileKind::Journal, &name(id))
    }

    /// Note files that cannot be read (for verify to name); none can be
    /// judged without the key.
    pub fn journal_unreadable(&self) -> Result<Vec<String>> {
        if self.crypto.is_locked() {
            return Ok(Vec::new());
        }
        Ok(self
            .backend()
            .list(FileKind::Journal)?
            .into_iter()
            .filter(|f| self.read_note(f).is_none())
            .map(|f| self.backend().locate(FileKind::Journal, &f))
            .collect())
    }

    fn read_note(&self, file: &str) -> Option<Note> {
        let parsed = self
            .backend()
            .read(FileKind::Journal, file)
            .ok()
            .and_then(|bytes| {
                self.crypto
                    .open(Sealed::Journal, file.as_bytes(), &bytes)
                    .ok()
            })
            .and_then(|bytes| serde_json::from_slice::<Note>(&bytes).ok())
            .filter(|n| n.format == JOURNAL_FORMAT);
        if parsed.is_none() {
            tracing::warn!(
                note = %self.backend().locate(FileKind::Journal, file),
                "a crash-journal note cannot be read; skipped"
            );
        }
        parsed
    }
}
