//! Issue 12: copy jobs (`kind = "copy"`), off-site on their own schedule
//! with their own retention at the target: run once from the command line
//! into a local repository, and by the daemon into a real S3 server.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::common::*;
use crate::daemon::{Daemon, free_port, runs};
use crate::s3::{FaultProxy, S3Server, command};

/// A configuration on the scratch repository with one copy job `offsite`
/// to `to`, and `extra` lines in the job.
fn config(s: &Scratch, port: u16, to: &str, extra: &str) -> PathBuf {
    let path = s.path("cbtvault.toml");
    let text = format!(
        r#"
[repository]
path = "{repo}"

[daemon]
listen = "127.0.0.1:{port}"

[[job]]
name = "offsite"
kind = "copy"
to = "{to}"
{extra}
"#,
        repo = s.repo().display(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn ids(points: &[Value]) -> Vec<String> {
    let mut ids: Vec<String> = points.iter().map(id).collect();
    ids.sort();
    ids
}

fn list(s: &Scratch, repo: &Path) -> Vec<Value> {
    let out = s.ok(&["list", "--json", "--repo", repo.to_str().unwrap()]);
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn a_copy_job_sends_what_its_retention_keeps_and_forgets_the_rest_at_the_target() {
    let s = Scratch::new();
    let target = s.path("offsite");
    s.ok(&["init", "--repo", target.to_str().unwrap()]);
    let cfg = config(
        &s,
        free_port(),
        target.to_str().unwrap(),
        "retention = { keep_last = 2 }",
    );
    let cfg = cfg.to_str().unwrap();
    let copy = || -> Value {
        serde_json::from_str(&s.ok(&["backup", "--json", "--config", cfg, "--job", "offsite"]))
            .unwrap()
    };

    // Four nights of one disk, and one of another.
    let image = s.image("a.img", 24, 21);
    let mut nights = vec![s.backup("a", &image, None)];
    let mut states = vec![s.path("a0.img")];
    std::fs::copy(&image, &states[0]).unwrap();
    for night in 1..4u64 {
        let (_, bitmap) = s.churn(&image, 0.03, 21 + night, &format!("c{night}.b64"));
        nights.push(s.backup("a", &image, Some(&bitmap)));
        let state = s.path(&format!("a{night}.img"));
        std::fs::copy(&image, &state).unwrap();
        states.push(state);
    }
    let other = s.image("b.img", 8, 30);
    let b = s.backup("b", &other, None);

    // Only the two newest of disk a travel (the other two would be
    // forgotten at once), and b's one.
    let first = copy();
    assert_eq!(first["skipped"], 2, "{first}");
    assert_eq!(
        first["copy"]["copied"].as_array().unwrap().len(),
        3,
        "{first}"
    );
    assert_eq!(first["forgotten"], serde_json::json!({}), "{first}");
    let there = list(&s, &target);
    assert_eq!(
        ids(&there),
        ids(&[nights[2].clone(), nights[3].clone(), b.clone()])
    );
    for (night, state) in [(2, &states[2]), (3, &states[3])] {
        let to = s.path(&format!("back{night}.img"));
        s.ok(&[
            "restore",
            "--quiet",
            "--repo",
            target.to_str().unwrap(),
            &id(&nights[night]),
            "--to",
            to.to_str().unwrap(),
        ]);
        assert_same_file(state, &to);
    }

    // Nothing new: nothing sent, and what was forgotten is not sent again.
    let again = copy();
    assert_eq!(again["copy"]["copied"], serde_json::json!([]), "{again}");
    assert_eq!(again["copy"]["blobs_sent"], 0, "{again}");

    // A fifth night: it travels, and the target forgets its oldest of a.
    let (_, bitmap) = s.churn(&image, 0.03, 40, "c5.b64");
    let fifth = s.backup("a", &image, Some(&bitmap));
    let third = copy();
    assert_eq!(
        third["copy"]["copied"],
        serde_json::json!([fifth["id"]]),
        "{third}"
    );
    assert_eq!(third["forgotten"], serde_json::json!({"a": 1}), "{third}");
    assert_eq!(
        ids(&list(&s, &target)),
        ids(&[nights[3].clone(), fifth.clone(), b])
    );
    // The source keeps everything: retention applies to the target only.
    assert_eq!(s.list().len(), 6);
    s.ok(&["verify", "--read-data", "--repo", target.to_str().unwrap()]);
}

#[test]
fn copy_job_mistakes_say_what_to_fix() {
    let s = Scratch::new();
    let image = s.image("a.img", 4, 3);
    s.backup("a", &image, None);
    let missing = s.path("no-such-repo");
    let cfg = config(&s, free_port(), missing.to_str().unwrap(), "");
    let err = s.fails(&[
        "backup",
        "--config",
        cfg.to_str().unwrap(),
        "--job",
        "offsite",
    ]);
    assert!(
        err.contains("offsite") && err.contains("no-such-repo"),
        "{err}"
    );
    let target = s.path("t");
    s.ok(&["init", "--repo", target.to_str().unwrap()]);
    let cfg = config(
        &s,
        free_port(),
        target.to_str().unwrap(),
        "disks = [\"nope\"]",
    );
    let err = s.fails(&[
        "backup",
        "--config",
        cfg.to_str().unwrap(),
        "--job",
        "offsite",
    ]);
    assert!(err.contains("no disk \"nope\""), "{err}");
    assert!(list(&s, &target).is_empty());
}

#[test]
fn the_daemon_runs_a_copy_job_into_s3() {
    let s = Scratch::new();
    let server = S3Server::start();
    server.create_bucket("offsite");
    let url = format!("s3://offsite/site-a?endpoint={}", server.endpoint());
    let out = command(&s, &url).arg("init").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let image = s.image("a.img", 16, 50);
    let full = s.backup("a", &image, None);
    let (_, bitmap) = s.churn(&image, 0.05, 51, "c.b64");
    let latest = s.backup("a", &image, Some(&bitmap));

    let port = free_port();
    let cfg = config(&s, port, &url, "retention = { keep_last = 5 }");
    let cache = s.path("cache");
    let env: [(&str, &OsStr); 3] = [
        ("AWS_ACCESS_KEY_ID", OsStr::new("cbtvault-test")),
        ("AWS_SECRET_ACCESS_KEY", OsStr::new("cbtvault-test-secret")),
        ("CBTVAULT_CACHE_DIR", cache.as_os_str()),
    ];
    let mut daemon = Daemon::start_with(&s, &cfg, port, &env);
    s.ok(&["run", "offsite", "--config", cfg.to_str().unwrap()]);
    daemon.wait_for("the copy job's run", || {
        runs(&s, "offsite")
            .first()
            .is_some_and(|r| r["outcome"] == "ok")
    });
    let run = runs(&s, "offsite").remove(0);
    assert_eq!(run["report"]["kind"], "copy", "{run}");
    assert_eq!(
        run["report"]["result"]["copy"]["copied"]
            .as_array()
            .map(Vec::len),
        Some(2),
        "{run}"
    );
    assert!(daemon.stop().success(), "{}", daemon.log());

    // The bucket holds both restore points, byte-exact.
    let to = s.path("from-s3.img");
    let out = command(&s, &url)
        .args(["restore", "--quiet", &id(&latest), "--to"])
        .arg(&to)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_same_file(&image, &to);
    let out = command(&s, &url).args(["list", "--json"]).output().unwrap();
    let listed: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ids(&listed), ids(&[full, latest]));
}

/// kill -9 of copies into S3 at several points (through a proxy that
/// slows one request in three): what the bucket lists is always whole,
/// the next run sends only the rest, and gc then verify pass.
#[test]
fn copies_into_s3_killed_midway_lose_nothing_and_the_next_run_finishes() {
    let s = Scratch::new();
    let server = S3Server::start();
    server.create_bucket("killed");
    let proxy = FaultProxy::start(server.port, 3);
    let url = format!("s3://killed/copy?endpoint=http://127.0.0.1:{}", proxy.port);
    let out = command(&s, &url).arg("init").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let image = s.image("a.img", 48, 60);
    let mut points = vec![s.backup("a", &image, None)];
    for night in 1..3u64 {
        let (_, bitmap) = s.churn(&image, 0.2, 60 + night, &format!("c{night}.b64"));
        points.push(s.backup("a", &image, Some(&bitmap)));
    }
    let cfg = config(&s, free_port(), &url, "");
    let run = || {
        let mut c = command(&s, &url);
        c.env("CBTVAULT_REPO", s.repo())
            .args(["backup", "--quiet", "--config"])
            .arg(&cfg)
            .args(["--job", "offsite"]);
        c
    };
    let listed = || -> Vec<Value> {
        let out = command(&s, &url).args(["list", "--json"]).output().unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    };
    for wait in [500u64, 1500] {
        let mut child = run().spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(wait));
        let _ = child.kill();
        let _ = child.wait();
        // Whatever is listed restores (the restore checks every block).
        let whole = listed();
        eprintln!(
            "killed after {wait} ms: {} of 3 restore points there",
            whole.len()
        );
        for point in whole {
            let to = s.path(&format!("partial-{wait}-{}.img", id(&point)));
            let out = command(&s, &url)
                .args(["restore", "--quiet", &id(&point), "--to"])
                .arg(&to)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
        }
    }
    let out = run().arg("--json").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let last: Value = serde_json::from_slice(&out.stdout).unwrap();
    // The killed runs had sent some of it, and not all of it.
    assert!(
        last["copy"]["blobs_present"].as_u64().unwrap() > 0,
        "{last}"
    );
    assert!(last["copy"]["blobs_sent"].as_u64().unwrap() > 0, "{last}");
    assert_eq!(ids(&listed()), ids(&points));
    let to = s.path("latest.img");
    let out = command(&s, &url)
        .args(["restore", "--quiet", &id(&points[2]), "--to"])
        .arg(&to)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_same_file(&image, &to);
    for args in [&["gc"][..], &["verify", "--read-data"][..]] {
        let out = command(&s, &url).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    }
}

/// A copy job from an encrypted repository into an unencrypted one: the
/// copies get the target's ids, yet retention counts each restore point
/// once — nothing is sent again the next night, and the target forgets
/// its oldest copy when a new night arrives.
#[test]
fn a_copy_job_across_keys_keeps_its_retention_and_sends_nothing_twice() {
    const PASSWORD: &str = "the source's passphrase";
    let s = Scratch {
        dir: tempfile::tempdir().expect("tempdir"),
    };
    let sealed = |args: &[&str]| -> String {
        let out = s
            .command()
            .env("CBTVAULT_PASSWORD", PASSWORD)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cbtvault {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    sealed(&["init", "--encrypt"]);
    let target = s.path("offsite");
    s.ok(&["init", "--repo", target.to_str().unwrap()]);
    let cfg = config(
        &s,
        free_port(),
        target.to_str().unwrap(),
        "retention = { keep_last = 2 }",
    );
    let cfg = cfg.to_str().unwrap();
    let image = s.image("a.img", 8, 60);
    let source = format!("file:{}", image.display());
    let backup = |bitmap: Option<&Path>| -> String {
        let mut args = vec!["backup", "--json", "--disk", "a", "--source", &source];
        let map = bitmap.map(|b| b.display().to_string());
        if let Some(m) = &map {
            args.extend(["--changed-blocks", m]);
        }
        id(&the_restore_point(&sealed(&args)))
    };
    let copy = || -> Value {
        serde_json::from_str(&sealed(&[
            "backup", "--json", "--config", cfg, "--job", "offsite",
        ]))
        .unwrap()
    };

    let mut nights = vec![backup(None)];
    for night in 1..3u64 {
        let (_, bitmap) = s.churn(&image, 0.05, 60 + night, &format!("c{night}.b64"));
        nights.push(backup(Some(&bitmap)));
    }
    let first = copy();
    assert_eq!(first["skipped"], 1, "{first}");
    assert_eq!(
        first["copy"]["copied"],
        serde_json::json!([nights[1], nights[2]]),
        "{first}"
    );
    let there: Vec<String> = [&nights[1], &nights[2]]
        .iter()
        .map(|n| {
            first["copy"]["target_ids"][n.as_str()]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let mut want = there.clone();
    want.sort();
    assert_eq!(ids(&list(&s, &target)), want);

    // Nothing new: the copies are known by their source ids.
    let again = copy();
    assert_eq!(again["copy"]["copied"], serde_json::json!([]), "{again}");
    assert_eq!(again["copy"]["blobs_sent"], 0, "{again}");
    assert_eq!(again["forgotten"], serde_json::json!({}), "{again}");

    // A fourth night travels and the target forgets its oldest copy.
    let (_, bitmap) = s.churn(&image, 0.05, 70, "c4.b64");
    let fourth = backup(Some(&bitmap));
    let third = copy();
    assert_eq!(
        third["copy"]["copied"],
        serde_json::json!([fourth]),
        "{third}"
    );
    assert_eq!(third["forgotten"], serde_json::json!({"a": 1}), "{third}");
    let fourth_there = third["copy"]["target_ids"][fourth.as_str()]
        .as_str()
        .unwrap()
        .to_string();
    let mut want = vec![there[1].clone(), fourth_there.clone()];
    want.sort();
    assert_eq!(ids(&list(&s, &target)), want);
    let restored = s.path("back.img");
    s.ok(&[
        "restore",
        "--quiet",
        "--repo",
        target.to_str().unwrap(),
        &fourth_there,
        "--to",
        restored.to_str().unwrap(),
    ]);
    assert_same_file(&image, &restored);
    s.ok(&["verify", "--read-data", "--repo", target.to_str().unwrap()]);
}
