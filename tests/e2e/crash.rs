//! `kill -9` at any moment leaves a consistent repository: verify passes,
//! nothing half-done is visible, and the next backup succeeds.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rand::{Rng, SeedableRng};

use crate::common::*;

fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_cbtvault"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn cbtvault")
}

fn kill_after(mut child: Child, delay: Duration) -> bool {
    std::thread::sleep(delay);
    let finished = matches!(child.try_wait(), Ok(Some(_)));
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
    finished
}

#[test]
fn killed_backups_leave_a_consistent_repository() {
    let s = Scratch::new();
    let repo = s.repo();
    let repo = repo.to_str().unwrap();
    let image = s.image("disk.img", 24, 50);
    s.backup("d", &image, None);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xc0ffee);
    let source = format!("file:{}", image.display());
    let mut committed = s.list().len();
    for round in 0..8 {
        let (_, bitmap) = s.churn(&image, 0.2, 100 + round, "c.b64");
        // A slow compression level stretches the backup so kills land mid-way.
        let mut args = vec![
            "backup",
            "--quiet",
            "--repo",
            repo,
            "--disk",
            "d",
            "--source",
            &source,
            "--compression-level",
            "19",
        ];
        let bitmap = bitmap.to_str().unwrap().to_string();
        if round % 2 == 1 {
            args.extend(["--changed-blocks", &bitmap]);
        }
        let finished = kill_after(spawn(&args), Duration::from_millis(rng.gen_range(20..900)));
        let listed = s.list().len();
        assert!(
            listed == committed || (finished && listed == committed + 1),
            "round {round}: {listed} vs {committed}"
        );
        committed = listed;
        let (ok, report) = s.verify(true);
        assert!(ok, "round {round}: verify after kill: {report}");
        // Every visible restore point restores.
        for rp in s.list() {
            s.restore(&id(&rp), &format!("r{round}-{}.img", &id(&rp)[..8]));
        }
        for f in std::fs::read_dir(s.dir.path()).unwrap().flatten() {
            if f.file_name()
                .to_string_lossy()
                .starts_with(&format!("r{round}-"))
            {
                std::fs::remove_file(f.path()).unwrap();
            }
        }
    }
    // The next backup succeeds and is exact; gc clears what kills left.
    let rp = s.backup("d", &image, None);
    assert_same_file(&image, &s.restore(&id(&rp), "final.img"));
    // gc clears exactly the partial files the kills left.
    let (_, before) = s.verify(false);
    let gc: serde_json::Value =
        serde_json::from_str(&s.ok(&["gc", "--json", "--repo", repo])).unwrap();
    assert_eq!(gc["partial_files_removed"], before["partial_files"], "{gc}");
    let (ok, report) = s.verify(true);
    assert!(ok, "{report}");
    assert_eq!(report["partial_files"], 0);
}

#[test]
fn killed_forget_and_gc_leave_a_consistent_repository() {
    let s = Scratch::new();
    let repo = s.repo();
    let repo = repo.to_str().unwrap();
    let image = s.image("disk.img", 24, 51);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for round in 0..5 {
        for night in 0..3 {
            let (_, bitmap) = s.churn(&image, 0.4, round * 10 + night, "c.b64");
            if night == 0 {
                s.backup("d", &image, None);
            } else {
                s.backup("d", &image, Some(&bitmap));
            }
        }
        kill_after(
            spawn(&["forget", "--repo", repo, "--keep-last", "2"]),
            Duration::from_millis(rng.gen_range(1..40)),
        );
        kill_after(
            spawn(&["gc", "--repo", repo]),
            Duration::from_millis(rng.gen_range(5..300)),
        );
        let (ok, report) = s.verify(true);
        assert!(ok, "round {round}: verify after killed gc: {report}");
        let latest = s.list().last().cloned().unwrap();
        assert_same_file(&image, &s.restore(&id(&latest), &format!("r{round}.img")));
    }
    s.ok(&["gc", "--repo", repo]);
    let (ok, report) = s.verify(true);
    assert!(ok, "{report}");
}
