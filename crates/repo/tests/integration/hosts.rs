//! Locks every host sees: key-slot changes and repair hold lock objects
//! in the repository, so a second host sharing it (a shared directory, a
//! bucket) is refused while they run, and told who holds them.

use std::path::Path;
use std::time::Duration;

use cbtvault_repo::{
    Backend, Error, FileKind, InitOptions, KdfParams, LOCK_FORMAT, LockRecord, Owner, Repository,
    Result, Secret, repair,
};

/// Lock object `name` held by a process of host `host-b`, its heartbeat
/// in force (or, when `expired`, stopped long ago: the host died).
fn held_by_host_b(backend: &dyn Backend, name: &str, kind: &str, what: &str, expired: bool) {
    let now = jiff::Timestamp::now();
    let (heartbeat, expires) = if expired {
        (
            now - jiff::SignedDuration::from_secs(3600),
            now - jiff::SignedDuration::from_secs(3300),
        )
    } else {
        (now, now + jiff::SignedDuration::from_secs(300))
    };
    let record = LockRecord {
        format: LOCK_FORMAT,
        kind: kind.into(),
        what: what.into(),
        owner: Owner {
            host: "host-b".into(),
            boot_id: "boot-b".into(),
            pid: 4242,
            pid_start: 1,
        },
        token: format!("host-b-{name}"),
        started: heartbeat,
        heartbeat,
        expires,
    };
    backend
        .replace(
            FileKind::Lock,
            name,
            &serde_json::to_vec(&record).expect("a lock record"),
        )
        .expect("lock object written");
}

fn refused_by_host_b<T: std::fmt::Debug>(result: Result<T>, what: &str) {
    match result {
        Err(Error::Locked {
            what: locked,
            holder,
        }) => {
            assert!(locked.contains(what), "{locked}");
            assert!(holder.contains("host-b"), "the holder is named: {holder}");
        }
        other => panic!("expected refusal over {what}: {other:?}"),
    }
}

fn cheap() -> KdfParams {
    KdfParams {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    }
}

fn open(path: &Path, passphrase: &str) -> Result<Repository> {
    let secret = Secret::passphrase(passphrase);
    Repository::open_keyed(path, Some(&|| Ok(secret.clone())))
}

#[test]
fn key_changes_are_refused_while_another_host_changes_the_key_slots() -> Result<()> {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("repo");
    let options = InitOptions {
        pack_size: 1 << 20,
        encryption: Some(Secret::passphrase("first")),
        kdf: cheap(),
        ..InitOptions::default()
    };
    drop(Repository::init(&path, &options)?);
    let repo = open(&path, "first")?;
    let second = repo.key_add(&Secret::passphrase("second"), cheap())?;
    assert!(
        repo.backend().list(FileKind::Lock)?.is_empty(),
        "the keys lock object goes with its holder"
    );

    // Host B changes the key slots: add, remove and passwd all wait.
    held_by_host_b(
        repo.backend().as_ref(),
        "keys",
        "keys",
        "a change of the key slots",
        false,
    );
    refused_by_host_b(
        repo.key_add(&Secret::passphrase("third"), cheap()),
        "the key slots",
    );
    refused_by_host_b(repo.key_remove(&second), "the key slots");
    refused_by_host_b(
        repo.key_passwd(&Secret::passphrase("renamed"), cheap()),
        "the key slots",
    );
    assert_eq!(repo.key_list()?.len(), 2, "nothing changed meanwhile");

    // Host B died: its lock object expires and is taken over.
    held_by_host_b(
        repo.backend().as_ref(),
        "keys",
        "keys",
        "a change of the key slots",
        true,
    );
    repo.key_remove(&second)?;
    assert_eq!(repo.key_list()?.len(), 1);
    assert!(repo.backend().list(FileKind::Lock)?.is_empty());
    Ok(())
}

#[test]
fn repair_is_refused_while_another_host_works_and_keeps_other_hosts_out() -> Result<()> {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("repo");
    let options = InitOptions {
        pack_size: 1 << 20,
        ..InitOptions::default()
    };
    let repo = Repository::init(&path, &options)?;
    let backend = repo.backend().clone();

    // Host B backs up: repair needs the repository alone.
    held_by_host_b(
        backend.as_ref(),
        "op-b1",
        "operation",
        "cbtvault backup",
        false,
    );
    refused_by_host_b(repair(&path, Duration::ZERO), "the repository");
    assert!(
        !backend
            .list(FileKind::Lock)?
            .contains(&"repair".to_string()),
        "a refused repair leaves no lock object"
    );
    backend.remove(FileKind::Lock, "op-b1")?;

    // Host B repairs: this host's operations, gc and repair are refused.
    held_by_host_b(
        backend.as_ref(),
        "repair",
        "repair",
        "a repair of the repository",
        false,
    );
    refused_by_host_b(repo.lock_shared(), "the repository");
    refused_by_host_b(
        repo.collect_garbage(cbtvault_repo::GcOptions::default(), Duration::ZERO),
        "the repository",
    );
    refused_by_host_b(repair(&path, Duration::ZERO), "the repository");
    assert_eq!(
        backend.list(FileKind::Lock)?,
        vec!["repair".to_string()],
        "the refused operations left nothing behind"
    );

    // Host B died mid-repair: once its lock object expired, repair here
    // takes it over, and operations run again.
    held_by_host_b(
        backend.as_ref(),
        "repair",
        "repair",
        "a repair of the repository",
        true,
    );
    repair(&path, Duration::ZERO)?;
    assert!(backend.list(FileKind::Lock)?.is_empty());
    drop(repo.lock_shared()?);
    Ok(())
}
