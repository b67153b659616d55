//! Several cbtvault processes on one repository.

use std::process::Stdio;
use std::time::Duration;

use crate::common::*;

fn slow_backup(s: &Scratch, disk: &str, image: &std::path::Path) -> std::process::Child {
    s.command()
        .args(["backup", "--json", "--disk", disk])
        .arg(format!("--source=file:{}", image.display()))
        .args(["--compression-level", "19"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn backup")
}

fn wait_ok(child: std::process::Child) -> serde_json::Value {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    the_restore_point(&String::from_utf8(out.stdout).unwrap())
}

#[test]
fn backups_of_different_disks_run_together() {
    let s = Scratch::new();
    let a = s.image("a.img", 16, 60);
    let b = s.image("b.img", 16, 61);
    let (pa, pb) = (slow_backup(&s, "a", &a), slow_backup(&s, "b", &b));
    let (ra, rb) = (wait_ok(pa), wait_ok(pb));
    let (ok, report) = s.verify(true);
    assert!(ok, "{report}");
    assert_same_file(&a, &s.restore(&id(&ra), "ra.img"));
    assert_same_file(&b, &s.restore(&id(&rb), "rb.img"));
}

#[test]
fn second_backup_of_the_same_disk_is_refused_while_one_runs() {
    let s = Scratch::new();
    let a = s.image("a.img", 24, 62);
    let first = slow_backup(&s, "a", &a);
    std::thread::sleep(Duration::from_millis(300));
    let err = s.fails(&[
        "backup",
        "--disk",
        "a",
        "--source",
        &format!("file:{}", a.display()),
    ]);
    assert!(err.contains("locked"), "{err}");
    wait_ok(first);
    assert_eq!(s.list().len(), 1);
}

#[test]
fn gc_runs_beside_a_backup_and_keeps_its_data() {
    let s = Scratch::new();
    let repo = s.repo();
    let repo = repo.to_str().unwrap();
    let a = s.image("a.img", 32, 63);
    // Something for gc to collect: a forgotten restore point sharing data.
    let old = id(&s.backup("a", &a, None));
    s.ok(&[
        "forget",
        "--quiet",
        "--allow-forget-last",
        "--repo",
        repo,
        &old,
    ]);
    // Written an hour ago: older than the backup below by more than gc's
    // clock margin, so gc may condemn it while the backup runs.
    let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    for pack in pack_files(&s.repo()) {
        let file = std::fs::File::options().write(true).open(&pack).unwrap();
        file.set_modified(hour_ago).unwrap();
    }
    // The running backup reuses some of those blocks and compresses new ones.
    s.churn(&a, 0.6, 64, "c.b64");
    let running = slow_backup(&s, "a", &a);
    // Until the backup has registered (its operation lock object).
    let registered = || {
        std::fs::read_dir(s.repo().join("locks"))
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("op-"))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !registered() {
        assert!(
            std::time::Instant::now() < deadline,
            "the backup never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // gc does not wait for the backup: it condemns what nothing uses and
    // leaves the deletion to a sweep once the backup has ended.
    let beside: serde_json::Value =
        serde_json::from_str(&s.ok(&["gc", "--json", "--repo", repo, "--max-unused", "0"]))
            .unwrap();
    let rp = wait_ok(running);
    let after: serde_json::Value =
        serde_json::from_str(&s.ok(&["gc", "--json", "--repo", repo, "--max-unused", "0"]))
            .unwrap();
    // Beside the backup: condemned, not deleted (the backup ran then);
    // after it: swept.
    assert!(beside["packs_condemned"].as_u64().unwrap() > 0, "{beside}");
    assert_eq!(beside["packs_swept"], 0, "{beside}");
    assert!(beside["packs_waiting"].as_u64().unwrap() > 0, "{beside}");
    assert!(after["packs_swept"].as_u64().unwrap() > 0, "{after}");
    assert_eq!(after["packs_waiting"], 0, "{beside}\n{after}");
    let (ok, report) = s.verify(true);
    assert!(ok, "{report}");
    assert_same_file(&a, &s.restore(&id(&rp), "r.img"));
}
