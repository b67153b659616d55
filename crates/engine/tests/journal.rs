//! The crash journal of XenServer snapshots lives in the repository, beside
//! the catalogue (`journal/`): a run that dies between noting a snapshot
//! and tagging it leaves a note that the next run reads to find the
//! orphan. `repair` rebuilds the catalogue; the notes must survive it, even
//! when the catalogue is gone.

use std::sync::Arc;
use std::time::Duration;

use cbtvault_engine::xenserver::{Journal, NoteKind, RepoJournal};
use cbtvault_repo::{InitOptions, Repository};

const DISK: &str = "xen-pool/vdi";

fn noted(root: &std::path::Path) -> Vec<(i64, Vec<String>)> {
    let repo = Arc::new(Repository::open(root).unwrap());
    RepoJournal(repo)
        .unfinished(NoteKind::VdiSnapshot, DISK)
        .unwrap()
}

fn note(root: &std::path::Path) {
    let repo = Arc::new(Repository::init(root, &InitOptions::default()).unwrap());
    let journal = RepoJournal(repo);
    let known = vec!["OpaqueRef:a".to_string(), "OpaqueRef:b".to_string()];
    journal.note(NoteKind::VdiSnapshot, DISK, &known).unwrap();
    // A VM note is another kind: not listed for the disk.
    journal.note(NoteKind::VmSnapshot, DISK, &[]).unwrap();
}

#[test]
fn an_unclosed_note_lists_the_snapshots_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    note(&root);
    let notes = noted(&root);
    assert_eq!(notes.len(), 1);
    assert_eq!(notes[0].1, vec!["OpaqueRef:a", "OpaqueRef:b"]);
    // Closed, it is gone.
    let repo = Arc::new(Repository::open(&root).unwrap());
    RepoJournal(repo).close(notes[0].0, "reaped").unwrap();
    assert!(noted(&root).is_empty());
}

#[test]
fn repair_keeps_the_notes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    note(&root);
    cbtvault_repo::repair(&root, Duration::from_secs(5)).unwrap();
    let notes = noted(&root);
    assert_eq!(notes.len(), 1);
    assert_eq!(notes[0].1, vec!["OpaqueRef:a", "OpaqueRef:b"]);
}

#[test]
fn repair_of_a_lost_catalogue_keeps_the_notes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    note(&root);
    for entry in std::fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("catalogue") {
            std::fs::remove_file(&path).unwrap();
        }
    }
    cbtvault_repo::repair(&root, Duration::from_secs(5)).unwrap();
    assert_eq!(noted(&root).len(), 1);
}

#[test]
fn a_note_an_earlier_version_kept_in_the_catalogue_is_still_read_and_closed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let repo = Arc::new(Repository::init(&root, &InitOptions::default()).unwrap());
    {
        let cat = repo.catalogue();
        let run = cat.start_run("xen-snapshot", Some(DISK)).unwrap();
        cat.set_run_detail(run, r#"["OpaqueRef:old"]"#).unwrap();
    }
    let journal = RepoJournal(repo.clone());
    let notes = journal.unfinished(NoteKind::VdiSnapshot, DISK).unwrap();
    assert_eq!(notes.len(), 1);
    assert_eq!(notes[0].1, vec!["OpaqueRef:old"]);
    journal.close(notes[0].0, "reaped").unwrap();
    assert!(
        journal
            .unfinished(NoteKind::VdiSnapshot, DISK)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn an_unreadable_note_is_skipped_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    note(&root);
    std::fs::write(
        root.join("journal").join("00000000000000000001.json"),
        b"{not json",
    )
    .unwrap();
    assert_eq!(noted(&root).len(), 1);
    let repo = Repository::open(&root).unwrap();
    assert_eq!(repo.journal_unreadable().unwrap().len(), 1);
    // verify names it, as a warning: no restore point is concerned.
    let report = repo.verify(false, 1, &|_| {}).unwrap();
    assert!(report.is_ok());
    assert!(
        report.warnings.iter().any(|w| w.object.contains("journal")),
        "{:?}",
        report.warnings
    );
}
