//! Incrementals from changed-block bitmaps, and the bad inputs around them.

use crate::common::*;

#[test]
fn incremental_reads_only_marked_blocks_and_restores_every_point() {
    let s = Scratch::new();
    let image = s.image("disk.img", 32, 10);
    let mut points = vec![(id(&s.backup("d", &image, None)), s.path("snap0.img"))];
    std::fs::copy(&image, &points[0].1).unwrap();
    for night in 1..=3u64 {
        let (map, bitmap) = s.churn(&image, 0.01 * night as f64, 30 + night, "c.b64");
        let rp = s.backup("d", &image, Some(&bitmap));
        let stats = &rp["stats"];
        // Invariant 1: exactly the marked blocks, and nothing else, are read.
        assert_eq!(stats["blocks_read"], map.count_set());
        assert_eq!(stats["bytes_read"], map.count_set() * 65536);
        assert_eq!(rp["mode"]["kind"], "incremental");
        assert_eq!(rp["parent"], points.last().unwrap().0.as_str());
        // Metadata grows with the change: a few nodes per changed block at most.
        assert!(
            stats["nodes_new"].as_u64().unwrap() <= map.count_set() * 2 + 2,
            "{stats}"
        );
        let snap = s.path(&format!("snap{night}.img"));
        std::fs::copy(&image, &snap).unwrap();
        points.push((id(&rp), snap));
    }
    for (i, (rp, snap)) in points.iter().enumerate() {
        let restored = s.restore(rp, &format!("restored{i}.img"));
        assert_same_file(snap, &restored);
    }
}

#[test]
fn incremental_against_an_explicit_parent() {
    let s = Scratch::new();
    let image = s.image("disk.img", 8, 11);
    let base = id(&s.backup("d", &image, None));
    let (_, b1) = s.churn(&image, 0.05, 1, "c1.b64");
    s.backup("d", &image, Some(&b1));
    // Changes since `base` are the union of both nights.
    let (m2, _) = s.churn(&image, 0.05, 2, "c2.b64");
    let mut union = cbtvault_blockmap::BlockMap::from_xenapi_base64(
        &std::fs::read_to_string(&b1).unwrap(),
        8 * MIB,
    )
    .unwrap();
    union.union_with(&m2);
    let both = s.path("both.b64");
    std::fs::write(&both, union.to_xenapi_base64()).unwrap();
    let source = format!("file:{}", image.display());
    let out = s.ok(&[
        "backup",
        "--json",
        "--disk",
        "d",
        "--source",
        &source,
        "--changed-blocks",
        both.to_str().unwrap(),
        "--parent",
        &base[..12],
    ]);
    let rp = the_restore_point(&out);
    assert_eq!(rp["parent"], base.as_str());
    assert_same_file(&image, &s.restore(&id(&rp), "r.img"));
}

#[test]
fn bad_inputs_give_one_clear_error_and_change_nothing() {
    let s = Scratch::new();
    let repo = s.repo();
    let repo = repo.to_str().unwrap();
    let image = s.image("disk.img", 4, 12);
    let source = format!("file:{}", image.display());

    // Incremental with no parent.
    let (_, bitmap) = s.churn(&image, 0.05, 1, "c.b64");
    let err = s.fails(&[
        "backup",
        "--repo",
        repo,
        "--disk",
        "d",
        "--source",
        &source,
        "--changed-blocks",
        bitmap.to_str().unwrap(),
    ]);
    assert!(err.contains("full backup first"), "{err}");
    s.backup("d", &image, None);
    let packs = pack_files(&s.repo());

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("short.b64", b"AAAA".to_vec(), "3 bytes, expected 8"),
        ("garbage.b64", b"not base64 at all!".to_vec(), "base64"),
        // 64 blocks need 8 bytes; 9 bytes is one too many.
        ("long.b64", b"AAAAAAAAAAAA".to_vec(), "9 bytes, expected 8"),
    ];
    for (name, content, expect) in cases {
        let f = s.path(name);
        std::fs::write(&f, content).unwrap();
        let err = s.fails(&[
            "backup",
            "--repo",
            repo,
            "--disk",
            "d",
            "--source",
            &source,
            "--changed-blocks",
            f.to_str().unwrap(),
        ]);
        assert!(err.to_lowercase().contains(expect), "{name}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    let missing = format!("file:{}", s.path("nope.img").display());
    let err = s.fails(&[
        "backup", "--repo", repo, "--disk", "d", "--source", &missing,
    ]);
    assert!(err.contains("nope.img"), "{err}");
    let err = s.fails(&[
        "restore",
        "--repo",
        repo,
        "ffffffffffff",
        "--to",
        s.path("x").to_str().unwrap(),
    ]);
    assert!(err.contains("ffffffffffff"), "{err}");
    let err = s.fails(&[
        "backup", "--repo", repo, "--disk", "d", "--source", "ftp://x",
    ]);
    assert!(err.contains("scheme"), "{err}");
    let err = s.fails(&["list", "--repo", s.path("nothing-here").to_str().unwrap()]);
    assert!(err.contains("not a cbtvault repository"), "{err}");

    assert_eq!(s.list().len(), 1, "no restore point was added");
    assert_eq!(pack_files(&s.repo()), packs, "no pack was added");
    assert!(!s.path("x").exists());
}

#[test]
fn unknown_repository_format_is_refused_untouched() {
    let s = Scratch::new();
    let config = s.repo().join("cbtvault.json");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("\"format_version\": 2", "\"format_version\": 7");
    std::fs::write(&config, &text).unwrap();
    let image = s.image("disk.img", 2, 13);
    let err = s.fails(&[
        "backup",
        "--disk",
        "d",
        "--source",
        &format!("file:{}", image.display()),
    ]);
    assert!(err.contains("format version 7"), "{err}");
    assert_eq!(std::fs::read_to_string(&config).unwrap(), text);
    assert!(pack_files(&s.repo()).is_empty());
}

#[test]
fn disk_size_not_a_multiple_of_the_block_size() {
    let s = Scratch::new();
    let image = s.path("odd.img");
    cbtvault_testkit::synth::write_image(&image, 3 * MIB + 12345, 14, Default::default()).unwrap();
    let rp = s.backup("odd", &image, None);
    assert_eq!(rp["virtual_size"], 3 * MIB + 12345);
    assert_same_file(&image, &s.restore(&id(&rp), "odd-restored.img"));
    let (_, bitmap) = s.churn(&image, 0.2, 3, "c.b64");
    let rp = s.backup("odd", &image, Some(&bitmap));
    assert_same_file(&image, &s.restore(&id(&rp), "odd-restored2.img"));
}
