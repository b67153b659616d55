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
