//! Damage is never silent: a flipped byte in a pack is found by restore and
//! by `verify --read-data`, which names exactly the restore points it hurts.

use std::collections::BTreeSet;

use crate::common::*;

fn flip(path: &std::path::Path, offset: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset as usize] ^= 0x5a;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn flipped_byte_is_reported_with_restore_points_and_offsets() {
    let s = Scratch::new();
    let a_img = s.image("a.img", 8, 40);
    let a_full = id(&s.backup("a", &a_img, None));
    let a_packs = pack_files(&s.repo());
    assert_eq!(a_packs.len(), 1);
    let (map, bitmap) = s.churn(&a_img, 0.02, 41, "c.b64");
    let a_incr = id(&s.backup("a", &a_img, Some(&bitmap)));
    let b_img = s.image("b.img", 8, 42);
    let b_full = id(&s.backup("b", &b_img, None));
    let (ok, _) = s.verify(true);
    assert!(ok);

    // Past the first blob header (48 bytes) lies the first blob: a block of disk a.
    flip(&a_packs[0], 48 + 10);

    let (ok, report) = s.verify(true);
    assert!(!ok, "verify must fail");
    let damaged = report["damaged"].as_array().unwrap();
    let full_entry = damaged
        .iter()
        .find(|d| d["restore_point"] == a_full.as_str())
        .expect("a's full is damaged");
    let offsets: Vec<u64> = full_entry["offsets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert_eq!(offsets.len(), 1, "one block is damaged: {report}");
    let block = offsets[0] / 65536;
    let mut expected = BTreeSet::from([a_full.clone()]);
    if !map.is_set(block) {
        // The incremental still uses the block unless it was rewritten.
        expected.insert(a_incr.clone());
    }
    let found: BTreeSet<String> = damaged
        .iter()
        .map(|d| d["restore_point"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(found, expected, "{report}");
    assert!(!found.contains(&b_full));
    let problems = report["problems"].to_string();
    assert!(
        problems.contains(a_packs[0].file_stem().unwrap().to_str().unwrap()),
        "names the pack: {report}"
    );

    // restore names the disk and the offset, and leaves no file behind.
    let to = s.path("a-restored.img");
    let err = s.fails(&["restore", &a_full, "--to", to.to_str().unwrap()]);
    assert!(err.contains("\"a\""), "{err}");
    assert!(err.contains(&format!("offset {}", offsets[0])), "{err}");
    assert!(!to.exists());
    // Undamaged restore points still restore.
    assert_same_file(&b_img, &s.restore(&b_full, "b-restored.img"));
}

#[test]
fn truncated_pack_is_reported() {
    let s = Scratch::new();
    let img = s.image("a.img", 4, 43);
    let rp = id(&s.backup("a", &img, None));
    let pack = &pack_files(&s.repo())[0];
    let len = std::fs::metadata(pack).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(pack).unwrap();
    // Cut into the blob data, as a crash of a file system without
    // data journaling could.
    f.set_len(len / 2).unwrap();
    let (ok, report) = s.verify(false);
    assert!(!ok);
    assert!(report["problems"].to_string().contains("pack"), "{report}");
    assert_eq!(report["damaged"][0]["restore_point"], rp.as_str());
    let err = s.fails(&["restore", &rp, "--to", s.path("r.img").to_str().unwrap()]);
    assert!(err.contains("offset"), "{err}");
}

/// A verify job re-reads part of the data each run: parts 1..m together
/// re-read every pack once, so the damage is found by exactly one part,
/// and a subset run says it proved less than `--read-data`.
#[test]
fn rotating_subsets_find_the_damage_once_over_all_parts() {
    let s = Scratch::new();
    for (i, seed) in [50u64, 51, 52].iter().enumerate() {
        let img = s.image(&format!("d{i}.img"), 8, *seed);
        s.backup(&format!("d{i}"), &img, None);
    }
    let packs = pack_files(&s.repo());
    assert!(packs.len() >= 3, "{packs:?}");
    flip(&packs[0], 48 + 10);
    let repo = s.repo();
    // Each part checks its own copy: a part that finds damage quarantines
    // it, which later parts would then report too.
    let subset = |part: &str| {
        let copy = s.path(&format!("repo-{}", part.replace('/', "-")));
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(&repo)
            .arg(&copy)
            .status()
            .unwrap();
        assert!(status.success());
        let out = s.run(&[
            "verify",
            "--json",
            "--repo",
            copy.to_str().unwrap(),
            "--read-data-subset",
            part,
        ]);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (out.status.success(), report)
    };
    let m = 3;
    let mut failed = 0;
    let mut packs_read = 0;
    for n in 1..=m {
        let (ok, report) = subset(&format!("{n}/{m}"));
        assert_eq!(report["data_checked"], format!("{n}/{m}"));
        packs_read += report["packs_read"].as_u64().unwrap();
        if !ok {
            failed += 1;
            assert!(
                !report["damaged"].as_array().unwrap().is_empty(),
                "{report}"
            );
        }
    }
    assert_eq!(failed, 1, "exactly one part holds the damaged pack");
    assert_eq!(
        packs_read,
        packs.len() as u64,
        "the parts cover every pack once"
    );
    // The full check finds it too; a bad subset is refused in the user's words.
    let (ok, report) = s.verify(true);
    assert!(!ok);
    assert_eq!(report["data_checked"], "all");
    let err = s.fails(&[
        "verify",
        "--repo",
        repo.to_str().unwrap(),
        "--read-data-subset",
        "4/3",
    ]);
    assert!(
        err.contains("--read-data-subset") && err.contains("n/m"),
        "{err}"
    );
}
