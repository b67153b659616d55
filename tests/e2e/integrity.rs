//! Every restore point restores, or verify says it won't; damage heals and
//! never spreads (issue 8). Each test is a defect an operator met, replayed
//! through the binary as they would.

use std::path::{Path, PathBuf};

use cbtvault_blockmap::BlockMap;
use serde_json::Value;

use crate::common::*;

/// Deterministic, incompressible-enough bytes (a small xorshift).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A bitmap file of `size` bytes' worth of blocks, none marked.
fn empty_bitmap(s: &Scratch, size: u64, name: &str) -> PathBuf {
    let path = s.path(name);
    let map = BlockMap::empty(size.div_ceil(65536));
    std::fs::write(&path, map.to_xenapi_base64()).unwrap();
    path
}

fn flip(path: &Path, offset: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset as usize] ^= 0x5a;
    std::fs::write(path, bytes).unwrap();
}

/// Restores `id` and checks it is byte-exact with `expected`.
fn restores_to(s: &Scratch, id: &str, expected: &[u8], name: &str) {
    let out = s.restore(id, name);
    let got = std::fs::read(&out).unwrap();
    assert_eq!(got.len(), expected.len(), "{name}: size");
    if let Some(pos) = got.iter().zip(expected).position(|(a, b)| a != b) {
        panic!("{name}: restore point {id} differs at byte {pos}");
    }
    std::fs::remove_file(out).unwrap();
}

fn stats(v: &Value) -> &Value {
    &v["stats"]
}

#[test]
fn a_size_change_with_a_partial_tail_block_restores_byte_exact() {
    let s = Scratch::new();
    let img = s.path("disk.img");
    let first = noise((1 << 20) + 4097, 1);
    std::fs::write(&img, &first).unwrap();
    let full = id(&s.backup("d", &img, None));

    // Grown with zeros, nothing marked changed: the old 4097-byte tail is
    // now a whole block and must not be taken from the parent as it was.
    let mut grown = first.clone();
    grown.resize(1_249_298, 0);
    std::fs::write(&img, &grown).unwrap();
    let map = empty_bitmap(&s, grown.len() as u64, "grown.b64");
    let after_grow = s.backup("d", &img, Some(&map));
    assert!(stats(&after_grow)["blocks_read"].as_u64().unwrap() >= 1);
    let after_grow = id(&after_grow);

    // Shrunk to a size whose last block is partial again.
    let shrunk = grown[..1_100_000].to_vec();
    std::fs::write(&img, &shrunk).unwrap();
    let map = empty_bitmap(&s, shrunk.len() as u64, "shrunk.b64");
    let after_shrink = id(&s.backup("d", &img, Some(&map)));

    // Same block count, another tail length.
    let trimmed = shrunk[..1_090_000].to_vec();
    std::fs::write(&img, &trimmed).unwrap();
    let map = empty_bitmap(&s, trimmed.len() as u64, "trimmed.b64");
    let after_trim = id(&s.backup("d", &img, Some(&map)));

    let (ok, report) = s.verify(true);
    assert!(ok, "{report}");
    restores_to(&s, &full, &first, "full");
    restores_to(&s, &after_grow, &grown, "grown");
    restores_to(&s, &after_shrink, &shrunk, "shrunk");
    restores_to(&s, &after_trim, &trimmed, "trimmed");
}

#[test]
fn a_damaged_blob_is_quarantined_and_the_next_backup_heals_every_restore_point() {
    let s = Scratch::new();
    let img = s.path("disk.img");
    let data = noise(2 << 20, 2);
    std::fs::write(&img, &data).unwrap();
    let first = id(&s.backup("d", &img, None));
    let packs = pack_files(&s.repo());
    assert_eq!(packs.len(), 1);
    // Past the first blob header (48 bytes) lies the first blob.
    flip(&packs[0], 48 + 10);

    let (ok, report) = s.verify(true);
    assert!(!ok, "verify must report the damage: {report}");
    assert_eq!(report["quarantined"], 1, "{report}");

    // The same content met again is stored again, not deduplicated
    // against the damaged copy.
    let second = s.backup("d", &img, None);
    assert_eq!(stats(&second)["blocks_new"], 1, "{second}");
    let second = id(&second);
    restores_to(&s, &second, &data, "second");
    // ... and the older restore point restores again: healed.
    restores_to(&s, &first, &data, "first");
    let (ok, report) = s.verify(true);
    assert!(ok, "healed: {report}");
}

#[test]
fn an_incremental_never_inherits_a_damaged_block_from_its_parent() {
    let s = Scratch::new();
    let img = s.path("disk.img");
    let data = noise(2 << 20, 3);
    std::fs::write(&img, &data).unwrap();
    let first = id(&s.backup("d", &img, None));
    flip(&pack_files(&s.repo())[0], 48 + 10);
    // A restore finds the damage (and quarantines the blob) ...
    let repo = s.repo();
    let to = s.path("r.img");
    let err = s.fails(&[
        "restore",
        "--repo",
        repo.to_str().unwrap(),
        &first,
        "--to",
        to.to_str().unwrap(),
    ]);
    assert!(
        err.contains("damaged") || err.contains("does not match"),
        "{err}"
    );

    // ... and an incremental marking nothing reads that block again
    // instead of taking it from the parent.
    let map = empty_bitmap(&s, data.len() as u64, "none.b64");
    let incr = s.backup("d", &img, Some(&map));
    assert_eq!(stats(&incr)["blocks_read"], 1, "{incr}");
    restores_to(&s, &id(&incr), &data, "incremental");
    restores_to(&s, &first, &data, "first");
    assert!(s.verify(true).0);
}

#[test]
fn a_deleted_pack_is_stored_again_by_the_next_backup() {
    let s = Scratch::new();
    let img = s.path("disk.img");
    let data = noise(1 << 20, 4);
    std::fs::write(&img, &data).unwrap();
    let first = id(&s.backup("d", &img, None));
    std::fs::remove_file(&pack_files(&s.repo())[0]).unwrap();

    let second = s.backup("d", &img, None);
    assert_eq!(stats(&second)["blocks_new"], 16, "{second}");
    restores_to(&s, &id(&second), &data, "second");
    restores_to(&s, &first, &data, "first");
    let (ok, report) = s.verify(true);
    assert!(ok, "{report}");
}

#[test]
fn repair_after_a_flipped_bit_in_a_pack_index_keeps_every_restore_point() {
    let s = Scratch::new();
    let img = s.path("disk.img");
    let data = noise(1 << 20, 5);
    std::fs::write(&img, &data).unwrap();
    let rp = id(&s.backup("d", &img, None));
    let pack = pack_files(&s.repo())[0].clone();
    let len = std::fs::metadata(&pack).unwrap().len();
    // A byte inside the index, just before the 48-byte trailer.
    flip(&pack, len - 48 - 3);
    restores_to(&s, &rp, &data, "before repair");

    let out = s.ok(&["repair", "--json"]);
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["packs_salvaged"], 1, "{report}");
    restores_to(&s, &rp, &data, "after repair");
    s.ok(&["gc"]);
    restores_to(&s, &rp, &data, "after gc");
    let (ok, report) = s.verify(true);
    assert!(ok, "{report}");
    assert_eq!(
        report["warnings"],
        Value::Array(vec![]),
        "gc rewrote the pack: {report}"
    );
}

/// Writes a manifest file whose name is the hash of its content, as a
/// crafted or damaged-then-renamed manifest would be.
fn plant_manifest(repo: &Path, json: &str) -> String {
    let id = blake3::hash(json.as_bytes()).to_hex().to_string();
    std::fs::write(repo.join("manifests").join(format!("{id}.json")), json).unwrap();
    id
}

#[test]
fn one_bad_manifest_costs_only_its_own_restore_point() {
    let s = Scratch::new();
    let repo = s.repo();
    let img = s.path("a.img");
    let data = noise(1 << 20, 6);
    std::fs::write(&img, &data).unwrap();
    let good = id(&s.backup("a", &img, None));
    let edited = id(&s.backup("b", &img, None));
    let text =
        std::fs::read_to_string(repo.join("manifests").join(format!("{good}.json"))).unwrap();

    std::fs::write(repo.join("manifests/x.json"), "{}").unwrap();
    let huge = plant_manifest(
        &repo,
        &text.replace(
            "\"virtual_size\": 1048576",
            &format!("\"virtual_size\": {}", u64::MAX),
        ),
    );
    let zero_block = plant_manifest(
        &repo,
        &text.replace("\"block_size\": 65536", "\"block_size\": 0"),
    );
    let format2 = plant_manifest(&repo, &text.replace("\"format\": 1", "\"format\": 2"));
    let edited_path = repo.join("manifests").join(format!("{edited}.json"));
    let mut bytes = std::fs::read(&edited_path).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 1;
    std::fs::write(&edited_path, bytes).unwrap();

    // Listing, backing up and restoring go on.
    let listed: Vec<String> = s.list().iter().map(id).collect();
    assert!(listed.contains(&good), "{listed:?}");
    for bad in [&huge, &zero_block, &format2] {
        assert!(!listed.contains(bad), "{listed:?}");
    }
    let third = id(&s.backup("a", &img, None));
    restores_to(&s, &good, &data, "good");
    restores_to(&s, &third, &data, "third");
    s.ok(&["gc"]);
    restores_to(&s, &good, &data, "good, after gc");

    // verify names each bad file and fails.
    let (ok, report) = s.verify(false);
    assert!(!ok);
    let problems = report["problems"].to_string();
    for name in ["x", &huge, &zero_block, &format2, &edited] {
        assert!(
            problems.contains(&format!("manifest {name}")),
            "{name}: {report}"
        );
    }

    // repair sets them aside (not deleted) and writes the edited one back
    // from the catalogue's copy.
    let out = s.ok(&["repair", "--json"]);
    let repaired: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        repaired["set_aside"].as_array().unwrap().len(),
        5,
        "{repaired}"
    );
    assert_eq!(repaired["manifests_restored"], 1, "{repaired}");
    assert_eq!(std::fs::read_dir(repo.join("damaged")).unwrap().count(), 5);
    restores_to(&s, &edited, &data, "edited, written back");
    let (ok, report) = s.verify(true);
    assert!(ok, "{report}");
}

#[test]
fn forget_keeps_a_disks_last_restore_point_unless_asked() {
    let s = Scratch::new();
    let img = s.image("a.img", 1, 7);
    s.backup("a", &img, None);
    let second = id(&s.backup("a", &img, None));
    let out = s.run(&["forget", "--keep-last", "0"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-forget-last"));
    let left: Vec<String> = s.list().iter().map(id).collect();
    assert_eq!(left, std::slice::from_ref(&second));
    s.ok(&["forget", &second]);
    assert_eq!(s.list().len(), 1, "naming it is not enough");
    s.ok(&["forget", "--allow-forget-last", &second]);
    assert!(s.list().is_empty());
}

#[test]
fn a_manifest_deleted_behind_cbtvaults_back_is_reported_and_repaired() {
    let s = Scratch::new();
    let img = s.image("a.img", 1, 8);
    let data = std::fs::read(&img).unwrap();
    let rp = id(&s.backup("a", &img, None));
    s.backup("b", &img, None);
    std::fs::remove_file(s.repo().join("manifests").join(format!("{rp}.json"))).unwrap();

    let (ok, report) = s.verify(false);
    assert!(!ok, "{report}");
    assert!(
        report["problems"]
            .to_string()
            .contains(&format!("restore point {rp}")),
        "{report}"
    );
    let out: Value = serde_json::from_str(&s.ok(&["repair", "--json"])).unwrap();
    assert_eq!(out["manifests_restored"], 1, "{out}");
    restores_to(&s, &rp, &data, "written back");
    assert!(s.verify(true).0);
}

#[test]
fn gc_reports_what_it_removed_and_nothing_the_second_time() {
    let s = Scratch::new();
    let img = s.path("a.img");
    std::fs::write(&img, noise(4 << 20, 9)).unwrap();
    let full = id(&s.backup("a", &img, None));
    // A fifth of the blocks rewritten: the full's pack is now partly dead,
    // not mostly dead.
    let (_, bitmap) = s.churn(&img, 0.2, 10, "c.b64");
    s.backup("a", &img, Some(&bitmap));
    s.ok(&["forget", &full]);
    let first: Value = serde_json::from_str(&s.ok(&["gc", "--json"])).unwrap();
    let removed = first["blobs_removed"].as_u64().unwrap();
    assert!(removed > 0, "{first}");
    assert_eq!(first["packs_rewritten"], 1, "{first}");
    let again: Value = serde_json::from_str(&s.ok(&["gc", "--json"])).unwrap();
    assert_eq!(again["blobs_removed"], 0, "nothing left to remove: {again}");
    assert_eq!(again["packs_deleted"], 0, "{again}");
    assert_eq!(again["packs_rewritten"], 0, "{again}");
    assert!(s.verify(true).0);
}

/// Issue 16: scattered churn leaves a little dead data in every pack; with
/// retention, gc must bring the repository back within its `--max-unused`
/// bound of the live data, and every kept restore point must restore.
#[test]
fn gc_after_long_scattered_churn_keeps_the_repository_near_its_live_size() {
    let s = Scratch::new();
    let img = s.path("a.img");
    std::fs::write(&img, noise(8 << 20, 20)).unwrap();
    s.ok(&[
        "init",
        "--repo",
        s.path("small-packs").to_str().unwrap(),
        "--pack-size-mib",
        "1",
    ]);
    let repo = s.path("small-packs");
    let r = repo.to_str().unwrap();
    let source = format!("file:{}", img.display());
    let mut kept = Vec::new();
    for night in 0..30u64 {
        let mut args = vec![
            "backup", "--json", "--repo", r, "--disk", "a", "--source", &source,
        ];
        let bitmap;
        if night > 0 {
            let (_, b) = s.churn(&img, 0.03, 100 + night, &format!("n{night}.b64"));
            bitmap = b.display().to_string();
            args.extend(["--changed-blocks", &bitmap]);
        }
        let rp = id(&the_restore_point(&s.ok(&args)));
        if night >= 25 {
            kept.push((rp, std::fs::read(&img).unwrap()));
        }
    }
    s.ok(&["forget", "--repo", r, "--keep-last", "5"]);
    let dry: Value =
        serde_json::from_str(&s.ok(&["gc", "--json", "--dry-run", "--repo", r])).unwrap();
    assert_eq!(dry["estimates"].as_array().unwrap().len(), 5, "{dry}");
    let report: Value = serde_json::from_str(&s.ok(&["gc", "--json", "--repo", r])).unwrap();
    let live = report["bytes_live"].as_u64().unwrap();
    let unused = report["bytes_unused_after"].as_u64().unwrap();
    assert!(
        unused * 10 <= live,
        "unused {unused} > 10% of live {live}: {report}"
    );
    assert!(
        report["bytes_unused_before"].as_u64().unwrap() > unused,
        "{report}"
    );
    let on_disk = pack_bytes(&repo);
    assert!(
        on_disk <= live + unused + live / 20,
        "packs hold {on_disk} bytes for {live} live: {report}"
    );
    for (i, (rp, bytes)) in kept.iter().enumerate() {
        let to = s.path(&format!("k{i}.img"));
        s.ok(&[
            "restore",
            "--quiet",
            "--repo",
            r,
            rp,
            "--to",
            to.to_str().unwrap(),
        ]);
        assert!(std::fs::read(&to).unwrap() == *bytes, "restore point {rp}");
    }
    s.ok(&["verify", "--read-data", "--repo", r]);
}

/// Runs `script` with sh, the binary as `$CBTVAULT`, and the scratch
/// repository in `CBTVAULT_REPO`.
fn sh(s: &Scratch, script: &str) -> std::process::Output {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .env("CBTVAULT", env!("CARGO_BIN_EXE_cbtvault"))
        .env("CBTVAULT_REPO", s.repo())
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn repository_files_and_restored_images_are_private_whatever_the_umask() {
    let s = Scratch::new();
    let img = s.image("a.img", 1, 11);
    let repo = s.path("private");
    let out = sh(
        &s,
        &format!(
            "umask 022 && \"$CBTVAULT\" init --repo {r} && \"$CBTVAULT\" backup --quiet --repo {r} --disk a --source file:{i} && \"$CBTVAULT\" restore --quiet --repo {r} a@latest --to {t}",
            r = repo.display(),
            i = img.display(),
            t = s.path("restored.img").display()
        ),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            out.push(e.path());
            if e.path().is_dir() {
                walk(&e.path(), out);
            }
        }
    }
    let mut all = vec![repo.clone()];
    walk(&repo, &mut all);
    assert!(all.len() > 6);
    for p in all {
        let expected = if p.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode(&p), expected, "{}", p.display());
    }
    assert_eq!(mode(&s.path("restored.img")), 0o600);
}

/// A tmpfs mounted for one test and unmounted after it; `None` where this
/// process may not mount (not root), so the test says it was skipped.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(dir: &Path, size: &str) -> Option<Mount> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipped: cannot mount a tmpfs here (needs root)");
            return None;
        }
        Some(Mount(dir.to_path_buf()))
    }

    fn remount_read_only(&self) {
        let ok = std::process::Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(&self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_repository_on_read_only_media_can_be_listed_verified_and_restored() {
    let s = Scratch::new();
    let Some(mount) = Mount::tmpfs(&s.path("media"), "64m") else {
        return;
    };
    let repo = s.path("media/repo");
    let r = repo.to_str().unwrap();
    let img = s.image("a.img", 2, 12);
    s.ok(&["init", "--repo", r]);
    let source = format!("file:{}", img.display());
    let out = s.ok(&[
        "backup", "--json", "--repo", r, "--disk", "a", "--source", &source,
    ]);
    let rp = id(&the_restore_point(&out));
    mount.remount_read_only();

    let listed = s.ok(&["list", "--repo", r]);
    assert!(listed.contains(&rp[..8]), "{listed}");
    s.ok(&["verify", "--read-data", "--repo", r]);
    s.ok(&["show", "--repo", r, &rp]);
    let to = s.path("restored.img");
    s.ok(&[
        "restore",
        "--quiet",
        "--repo",
        r,
        &rp,
        "--to",
        to.to_str().unwrap(),
    ]);
    assert_same_file(&img, &to);
    let err = s.fails(&["backup", "--repo", r, "--disk", "a", "--source", &source]);
    assert!(err.contains("read-only"), "{err}");
}

#[test]
fn a_backup_that_runs_out_of_space_leaves_nothing_behind_and_says_so() {
    let s = Scratch::new();
    let Some(_mount) = Mount::tmpfs(&s.path("small"), "3m") else {
        return;
    };
    let repo = s.path("small/repo");
    let r = repo.to_str().unwrap();
    s.ok(&["init", "--repo", r]);
    let img = s.path("big.img");
    std::fs::write(&img, noise(8 << 20, 13)).unwrap();
    let source = format!("file:{}", img.display());
    let err = s.fails(&["backup", "--repo", r, "--disk", "a", "--source", &source]);
    assert!(err.to_lowercase().contains("no space"), "{err}");
    let leftovers: Vec<_> = std::fs::read_dir(repo.join("tmp"))
        .unwrap()
        .flatten()
        .collect();
    assert!(leftovers.is_empty(), "partial files left: {leftovers:?}");
    assert!(s.ok(&["list", "--json", "--repo", r]).trim() == "[]");
    s.ok(&["verify", "--repo", r]);
}
