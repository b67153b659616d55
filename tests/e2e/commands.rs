//! Every command on real files, as a user would chain them.

use crate::common::*;

#[test]
fn full_backup_then_restore_is_byte_exact_and_listed() {
    let s = Scratch::new();
    let image = s.image("disk.img", 24, 1);
    let rp = s.backup("vm1-disk0", &image, None);
    let stats = &rp["stats"];
    assert_eq!(stats["blocks_total"], 24 * 16);
    // Holes are skipped, zero blocks not stored, everything else stored once.
    assert!(stats["blocks_read"].as_u64().unwrap() < 24 * 16);
    assert!(stats["blocks_new"].as_u64().unwrap() > 0);
    assert!(stats["bytes_stored"].as_u64().unwrap() < stats["bytes_read"].as_u64().unwrap());
    assert_eq!(rp["parent"], serde_json::Value::Null);

    let listed = s.list();
    assert_eq!(listed.len(), 1);
    for key in ["id", "disk", "time", "virtual_size", "parent", "stats"] {
        assert!(listed[0].get(key).is_some(), "list --json lacks {key}");
    }
    for key in [
        "blocks_total",
        "blocks_read",
        "bytes_read",
        "blocks_new",
        "bytes_stored",
        "duration_ms",
    ] {
        assert!(listed[0]["stats"].get(key).is_some(), "stats lack {key}");
    }
    assert_eq!(listed[0]["virtual_size"], 24 * MIB);
    assert!(
        listed[0]["time"]
            .as_str()
            .unwrap()
            .parse::<jiff::Timestamp>()
            .is_ok()
    );

    let restored = s.restore(&id(&rp)[..10], "restored.img");
    assert_same_file(&image, &restored);

    // show by prefix and by DISK@latest agree.
    let repo = s.repo();
    let repo = repo.to_str().unwrap();
    let a: serde_json::Value =
        serde_json::from_str(&s.ok(&["show", "--json", "--repo", repo, &id(&rp)[..8]])).unwrap();
    let b: serde_json::Value =
        serde_json::from_str(&s.ok(&["show", "--json", "--repo", repo, "vm1-disk0@latest"]))
            .unwrap();
    assert_eq!(a, b);
    assert_eq!(a["id"], rp["id"]);
}

#[test]
fn second_full_backup_of_same_data_stores_nothing_new() {
    let s = Scratch::new();
    let image = s.image("disk.img", 16, 2);
    let first = s.backup("d", &image, None);
    let copy = s.path("copy.img");
    std::fs::copy(&image, &copy).unwrap();
    // Another disk with identical content deduplicates completely.
    let second = s.backup("other", &copy, None);
    assert_eq!(second["stats"]["blocks_new"], 0);
    assert_eq!(second["stats"]["bytes_stored"], 0);
    assert_eq!(first["root"], second["root"]);
}

#[test]
fn restore_refuses_to_overwrite_without_force() {
    let s = Scratch::new();
    let image = s.image("disk.img", 4, 3);
    let rp = id(&s.backup("d", &image, None));
    let to = s.path("exists.img");
    std::fs::write(&to, b"precious").unwrap();
    let err = s.fails(&["restore", &rp, "--to", to.to_str().unwrap()]);
    assert!(err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(&to).unwrap(), b"precious");
    s.ok(&[
        "restore",
        "--quiet",
        &rp,
        "--to",
        to.to_str().unwrap(),
        "--force",
    ]);
    assert_same_file(&image, &to);
}

#[test]
fn diff_reports_exactly_the_changed_blocks() {
    let s = Scratch::new();
    let image = s.image("disk.img", 16, 4);
    let a = id(&s.backup("d", &image, None));
    let (map, bitmap) = s.churn(&image, 0.05, 9, "changes.b64");
    let b = id(&s.backup("d", &image, Some(&bitmap)));
    let out: serde_json::Value = serde_json::from_str(&s.ok(&["diff", "--json", &a, &b])).unwrap();
    let mut differing = Vec::new();
    for e in out["extents"].as_array().unwrap() {
        let (off, len) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        differing.extend((off / 65536)..((off + len) / 65536));
    }
    // Rewritten blocks whose new content equals the old would not differ;
    // with random new content every marked block differs.
    assert_eq!(differing, map.set_blocks().collect::<Vec<_>>());
    assert_eq!(out["blocks_differ"], map.count_set());
}

#[test]
fn forget_and_gc_free_space_and_keep_the_rest_restorable() {
    let s = Scratch::new();
    let repo = s.repo();
    let repo = repo.to_str().unwrap();
    let image = s.image("disk.img", 16, 5);
    let mut ids = vec![id(&s.backup("d", &image, None))];
    for night in 0..3 {
        // Large churn so that forgetting old restore points frees data.
        let (_, bitmap) = s.churn(&image, 0.3, 20 + night, "c.b64");
        ids.push(id(&s.backup("d", &image, Some(&bitmap))));
    }
    let before = pack_bytes(&s.repo());

    let err = s.fails(&["forget", "--repo", repo]);
    assert!(err.contains("--keep"), "{err}");
    let dry: serde_json::Value = serde_json::from_str(&s.ok(&[
        "forget",
        "--json",
        "--repo",
        repo,
        "--keep-last",
        "1",
        "--dry-run",
    ]))
    .unwrap();
    assert_eq!(
        dry["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["keep"] == false)
            .count(),
        3
    );
    assert_eq!(s.list().len(), 4, "dry run changed nothing");

    s.ok(&["forget", "--repo", repo, "--keep-last", "1"]);
    let left = s.list();
    assert_eq!(left.len(), 1);
    assert_eq!(id(&left[0]), ids[3]);

    let gc: serde_json::Value =
        serde_json::from_str(&s.ok(&["gc", "--json", "--repo", repo])).unwrap();
    assert!(gc["bytes_freed"].as_u64().unwrap() > 0, "{gc}");
    let after = pack_bytes(&s.repo());
    assert!(after < before, "packs {before} -> {after}");
    let (ok, report) = s.verify(true);
    assert!(ok, "{report}");
    let restored = s.restore(&ids[3], "latest.img");
    assert_same_file(&image, &restored);
}

#[test]
fn repair_rebuilds_a_lost_catalogue() {
    let s = Scratch::new();
    let image = s.image("disk.img", 8, 6);
    let a = id(&s.backup("d", &image, None));
    let (_, bitmap) = s.churn(&image, 0.1, 7, "c.b64");
    let b = id(&s.backup("d", &image, Some(&bitmap)));
    for f in [
        "catalogue.sqlite",
        "catalogue.sqlite-wal",
        "catalogue.sqlite-shm",
    ] {
        let _ = std::fs::remove_file(s.repo().join(f));
    }
    let repo = s.repo();
    let err = s.fails(&["list", "--repo", repo.to_str().unwrap()]);
    assert!(err.contains("repair"), "{err}");
    let out: serde_json::Value =
        serde_json::from_str(&s.ok(&["repair", "--json", "--repo", repo.to_str().unwrap()]))
            .unwrap();
    assert_eq!(out["restore_points"], 2);
    assert_eq!(s.list().len(), 2);
    let (ok, report) = s.verify(true);
    assert!(ok, "{report}");
    assert_same_file(&image, &s.restore(&b, "b.img"));
    s.restore(&a, "a.img");
}

#[test]
fn init_refuses_an_existing_repository_and_a_non_empty_directory() {
    let s = Scratch::new();
    let repo = s.repo();
    let err = s.fails(&["init", "--repo", repo.to_str().unwrap()]);
    assert!(err.contains("already exists"), "{err}");
    let other = s.path("busy");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("file"), b"x").unwrap();
    let err = s.fails(&["init", "--repo", other.to_str().unwrap()]);
    assert!(err.contains("not empty"), "{err}");
}

/// Issue 16: `restore --json` counts every zero block, those of all-zero
/// subtrees too (it counted only zeros inside non-zero parts of the map).
#[test]
fn restore_counts_every_zero_block() {
    let s = Scratch::new();
    let img = s.path("sparse.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(64 * MIB).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"x", 1000).unwrap();
    let rp = id(&s.backup("z", &img, None));
    let to = s.path("out.img");
    let out = s.ok(&["restore", "--json", &rp, "--to", to.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["stats"]["blocks_written"], 1, "{v}");
    assert_eq!(v["stats"]["blocks_zero"], 1023, "{v}");
    assert_same_file(&img, &to);
}
