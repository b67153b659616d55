//! Issue 12: append-only repositories take backups and copies, and refuse
//! everything that would erase history: forget, gc, retention (of a backup
//! job or at a copy job's target), and repair moving damaged files away.

use serde_json::Value;

use crate::common::*;

fn append_only_repo(s: &Scratch, name: &str) -> String {
    let path = s.path(name);
    let out = s.ok(&["init", "--append-only", "--repo", path.to_str().unwrap()]);
    assert!(out.contains("append-only"), "{out}");
    path.to_str().unwrap().to_string()
}

#[test]
fn an_append_only_repository_takes_backups_and_copies_and_refuses_to_forget() {
    let s = Scratch::new();
    let repo = append_only_repo(&s, "vault");
    let image = s.image("a.img", 16, 70);
    let source = format!("file:{}", image.display());
    let backup = |extra: &[&str]| -> Value {
        let mut args = vec![
            "backup", "--json", "--repo", &repo, "--disk", "a", "--source", &source,
        ];
        args.extend(extra);
        the_restore_point(&s.ok(&args))
    };
    let first = backup(&[]);
    let first_state = s.path("first.img");
    std::fs::copy(&image, &first_state).unwrap();
    let (_, bitmap) = s.churn(&image, 0.05, 71, "c.b64");
    let second = backup(&["--changed-blocks", bitmap.to_str().unwrap()]);
    assert_eq!(second["mode"]["kind"], "incremental", "{second}");

    for args in [
        &["forget", "--keep-last", "1"][..],
        &["forget", &id(&first)[..12]][..],
        &["gc"][..],
    ] {
        let mut all = args.to_vec();
        all.extend(["--repo", &repo]);
        let err = s.fails(&all);
        assert!(
            err.contains("append-only") && err.contains("erase its history"),
            "{args:?}: {err}"
        );
    }
    // A dry run changes nothing, so it is allowed.
    s.ok(&["gc", "--dry-run", "--repo", &repo]);

    // Copies into it work; everything is still there and restores.
    let other = s.image("b.img", 4, 72);
    let b = s.backup("b", &other, None);
    let copied: Value = serde_json::from_str(&s.ok(&[
        "copy",
        "--json",
        "--from",
        s.repo().to_str().unwrap(),
        "--to",
        &repo,
    ]))
    .unwrap();
    assert_eq!(copied["copied"], serde_json::json!([b["id"]]), "{copied}");
    let listed: Vec<Value> =
        serde_json::from_str(&s.ok(&["list", "--json", "--repo", &repo])).unwrap();
    assert_eq!(listed.len(), 3, "{listed:?}");
    let to = s.path("r1.img");
    s.ok(&[
        "restore",
        "--quiet",
        "--repo",
        &repo,
        &id(&first),
        "--to",
        to.to_str().unwrap(),
    ]);
    assert_same_file(&first_state, &to);
    s.ok(&["verify", "--read-data", "--repo", &repo]);

    // Repair reports a damaged manifest but leaves it where it is.
    let manifest = s
        .path("vault")
        .join("manifests")
        .join(format!("{}.json", id(&first)));
    let mut bytes = std::fs::read(&manifest).unwrap();
    bytes[10] ^= 0x20;
    std::fs::write(&manifest, &bytes).unwrap();
    let out = s.ok(&["repair", "--json", "--repo", &repo]);
    assert!(out.contains("left in place"), "{out}");
    assert!(manifest.exists());
}

#[test]
fn retention_is_not_applied_at_an_append_only_copy_target_and_says_why() {
    let s = Scratch::new();
    let target = append_only_repo(&s, "vault");
    let image = s.image("a.img", 8, 80);
    s.backup("a", &image, None);
    let (_, bitmap) = s.churn(&image, 0.05, 81, "c1.b64");
    s.backup("a", &image, Some(&bitmap));
    let (_, bitmap) = s.churn(&image, 0.05, 82, "c2.b64");
    s.backup("a", &image, Some(&bitmap));
    let cfg = s.path("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[repository]\npath = \"{}\"\n[[job]]\nname = \"offsite\"\nkind = \"copy\"\nto = \"{target}\"\nretention = {{ keep_last = 2 }}\n",
            s.repo().display()
        ),
    )
    .unwrap();
    let run = || -> Value {
        serde_json::from_str(&s.ok(&[
            "backup",
            "--json",
            "--config",
            cfg.to_str().unwrap(),
            "--job",
            "offsite",
        ]))
        .unwrap()
    };
    let first = run();
    assert_eq!(
        first["copy"]["copied"].as_array().unwrap().len(),
        2,
        "{first}"
    );
    let (_, bitmap) = s.churn(&image, 0.05, 83, "c3.b64");
    s.backup("a", &image, Some(&bitmap));
    let second = run();
    assert_eq!(
        second["copy"]["copied"].as_array().unwrap().len(),
        1,
        "{second}"
    );
    assert!(
        second["retention_skipped"]
            .as_str()
            .is_some_and(|w| w.contains("append-only")),
        "{second}"
    );
    let listed: Vec<Value> =
        serde_json::from_str(&s.ok(&["list", "--json", "--repo", &target])).unwrap();
    assert_eq!(
        listed.len(),
        3,
        "nothing forgotten at the target: {listed:?}"
    );
}

#[test]
fn an_append_only_encrypted_repository_takes_a_new_key_but_keeps_every_slot() {
    let s = Scratch::new();
    let repo = s.path("vault");
    let run = |password: &str, args: &[&str]| {
        s.command()
            .env("CBTVAULT_PASSWORD", password)
            .env("CBTVAULT_NEW_PASSWORD", "second passphrase")
            .env("CBTVAULT_REPO", &repo)
            .args(args)
            .output()
            .unwrap()
    };
    let out = run("first passphrase", &["init", "--append-only", "--encrypt"]);
    assert!(out.status.success(), "{out:?}");
    let out = run("first passphrase", &["key", "add"]);
    assert!(out.status.success(), "{out:?}");
    let out = run("second passphrase", &["key", "list", "--json"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let current = list["current"].as_str().unwrap();
    let other = list["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .find(|id| *id != current)
        .unwrap();
    for args in [&["key", "remove", other][..], &["key", "passwd"][..]] {
        let out = run("second passphrase", args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("append-only"),
            "{args:?}: {err}"
        );
    }
    // Both passphrases still open it.
    for password in ["first passphrase", "second passphrase"] {
        let out = run(password, &["list"]);
        assert!(out.status.success(), "{password}: {out:?}");
    }
}
