//! Encryption at rest through the binary, as an operator would check it:
//! a known string in the guest's disk is nowhere in the repository, every
//! restore is byte-exact, damage and a wrong passphrase are reported
//! clearly, and verify without the key still checks the structure.

use std::path::{Path, PathBuf};
use std::process::Output;

use cbtvault_blockmap::BlockMap;
use serde_json::Value;

use crate::common::*;

const MARKER: &[u8] = b"GUEST-SECRET-7f3a9c-CBTVAULT-E2E-MARKER";
const PASSWORD: &str = "a long and correct passphrase";
const BLOCK: usize = 65536;

/// Noise from a small xorshift (incompressible, deterministic).
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

/// A disk of `blocks` blocks holding the marker many times: some blocks
/// are the marker over and over (compressible), some start with it and
/// go on with noise, some are zero.
fn disk(blocks: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(blocks * BLOCK);
    for b in 0..blocks {
        match b % 4 {
            0 => out.extend(MARKER.iter().cycle().take(BLOCK)),
            1 => {
                out.extend_from_slice(MARKER);
                out.extend(noise(BLOCK - MARKER.len(), seed + b as u64));
            }
            2 => out.extend(std::iter::repeat_n(0u8, BLOCK)),
            _ => {
                let mut block = noise(BLOCK, seed * 1000 + b as u64);
                block[BLOCK / 2..BLOCK / 2 + MARKER.len()].copy_from_slice(MARKER);
                out.extend(block);
            }
        }
    }
    out
}

/// Runs the binary with `password` in `CBTVAULT_PASSWORD` (none when
/// `None`) and no terminal to prompt on.
fn run(s: &Scratch, password: Option<&str>, args: &[&str]) -> Output {
    let mut c = s.command();
    c.env_remove("CBTVAULT_PASSWORD")
        .env_remove("CBTVAULT_PASSWORD_FILE")
        .env_remove("CBTVAULT_KEY_FILE");
    if let Some(p) = password {
        c.env("CBTVAULT_PASSWORD", p);
    }
    c.args(args).output().expect("run cbtvault")
}

fn ok(s: &Scratch, password: Option<&str>, args: &[&str]) -> String {
    let out = run(s, password, args);
    assert!(
        out.status.success(),
        "cbtvault {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Runs, expects failure, returns stderr (never a panic).
fn fails(s: &Scratch, password: Option<&str>, args: &[&str]) -> String {
    let out = run(s, password, args);
    assert!(
        !out.status.success(),
        "cbtvault {args:?} should have failed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    stderr
}

/// A scratch area with an encrypted repository.
fn encrypted_scratch() -> Scratch {
    let s = Scratch {
        dir: tempfile::tempdir().expect("tempdir"),
    };
    let repo = s.repo();
    let out = ok(
        &s,
        Some(PASSWORD),
        &["init", "--encrypt", "--repo", repo.to_str().unwrap()],
    );
    assert!(out.contains("created encrypted repository"), "{out}");
    s
}

fn backup(s: &Scratch, image: &Path, bitmap: Option<&Path>) -> String {
    let source = format!("file:{}", image.display());
    let mut args = vec![
        "backup",
        "--json",
        "--disk",
        "vm1-disk0",
        "--source",
        &source,
    ];
    let map;
    if let Some(b) = bitmap {
        map = b.display().to_string();
        args.extend(["--changed-blocks", &map]);
    }
    id(&the_restore_point(&ok(s, Some(PASSWORD), &args)))
}

fn restore(s: &Scratch, id: &str, name: &str) -> PathBuf {
    let to = s.path(name);
    ok(
        s,
        Some(PASSWORD),
        &["restore", "--quiet", id, "--to", to.to_str().unwrap()],
    );
    to
}

/// Every file under `root` whose bytes contain `needle`.
fn files_containing(root: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    let mut files = 0;
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files += 1;
                let bytes = std::fs::read(&path).expect("read");
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    found.push(path);
                }
            }
        }
    }
    assert!(files > 5, "the repository holds files to search");
    found
}

fn verify_json(s: &Scratch, password: Option<&str>, read_data: bool) -> (bool, Value) {
    let mut args = vec!["verify", "--json"];
    if read_data {
        args.push("--read-data");
    }
    let out = run(s, password, &args);
    let report = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.success(), report)
}

#[test]
fn an_encrypted_repository_keeps_no_guest_data_in_the_clear_and_restores_byte_exact() {
    let s = encrypted_scratch();
    let blocks = 64;
    let image = s.path("disk.img");
    let first = disk(blocks, 1);
    std::fs::write(&image, &first).unwrap();
    let full = backup(&s, &image, None);

    // An incremental: a few blocks change, each with the marker again.
    let mut second = first.clone();
    let mut changed = BlockMap::empty(blocks as u64);
    for b in [3usize, 9, 17, 40] {
        let block = &mut second[b * BLOCK..(b + 1) * BLOCK];
        block.copy_from_slice(&noise(BLOCK, 77 + b as u64));
        block[100..100 + MARKER.len()].copy_from_slice(MARKER);
        changed.set(b as u64);
    }
    std::fs::write(&image, &second).unwrap();
    let bitmap = s.path("changed.bitmap");
    std::fs::write(&bitmap, changed.to_xenapi_base64()).unwrap();
    let incremental = backup(&s, &image, Some(&bitmap));
    assert_ne!(full, incremental);

    assert_eq!(
        std::fs::read(restore(&s, &full, "full.img")).unwrap(),
        first
    );
    assert_eq!(
        std::fs::read(restore(&s, &incremental, "incr.img")).unwrap(),
        second
    );
    let (passed, report) = verify_json(&s, Some(PASSWORD), true);
    assert!(passed, "verify --read-data: {report}");

    // The marker is in no file of the repository: packs, manifests,
    // catalogue, VM metadata, journal, keys.
    assert_eq!(files_containing(&s.repo(), MARKER), Vec::<PathBuf>::new());
    // The config says it is encrypted, and how.
    let config: Value =
        serde_json::from_slice(&std::fs::read(s.repo().join("cbtvault.json")).unwrap()).unwrap();
    assert_eq!(config["encryption"]["cipher"], "xchacha20-poly1305");
    assert_eq!(config["format_version"], 3);

    // Without the key: the structure is checked, and passes.
    let (passed, report) = verify_json(&s, None, false);
    assert!(passed, "verify without the key: {report}");
    let text = report.to_string();
    assert!(text.contains("only its structure"), "{text}");
    // Reading data without the key is refused, clearly.
    let err = fails(&s, None, &["verify", "--read-data"]);
    assert!(
        err.contains("encrypted") && err.contains("CBTVAULT_PASSWORD"),
        "{err}"
    );
    let to = s.path("nokey.img");
    let err = fails(&s, None, &["restore", &full, "--to", to.to_str().unwrap()]);
    assert!(err.contains("encrypted"), "{err}");

    // A wrong passphrase: refused, nothing read.
    let out = run(&s, Some("not the passphrase"), &["list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("wrong passphrase"), "{err}");
    let to = s.path("wrong.img");
    let err = fails(
        &s,
        Some("not the passphrase"),
        &["restore", &full, "--to", to.to_str().unwrap()],
    );
    assert!(err.contains("wrong passphrase"), "{err}");
    assert!(!to.exists() || std::fs::read(&to).unwrap() != first);
}

#[test]
fn damage_in_an_encrypted_pack_is_reported_and_never_restored() {
    let s = encrypted_scratch();
    let image = s.path("disk.img");
    let content = disk(16, 5);
    std::fs::write(&image, &content).unwrap();
    let point = backup(&s, &image, None);
    let packs = pack_files(&s.repo());
    assert_eq!(packs.len(), 1);
    // A byte in the middle of the first blob's sealed bytes (past its
    // 48-byte frame header).
    let mut bytes = std::fs::read(&packs[0]).unwrap();
    bytes[48 + 1000] ^= 0x20;
    std::fs::write(&packs[0], bytes).unwrap();

    let (passed, report) = verify_json(&s, Some(PASSWORD), true);
    assert!(!passed, "verify --read-data must fail: {report}");
    let text = report.to_string();
    assert!(text.contains("cannot be opened"), "{text}");
    let to = s.path("out.img");
    let err = fails(
        &s,
        Some(PASSWORD),
        &["restore", &point, "--to", to.to_str().unwrap()],
    );
    assert!(
        err.contains("damaged") || err.contains("quarantined"),
        "{err}"
    );
}

#[test]
fn keys_are_added_changed_and_removed_through_the_binary() {
    let s = encrypted_scratch();
    let image = s.path("disk.img");
    std::fs::write(&image, disk(8, 9)).unwrap();
    let point = backup(&s, &image, None);
    let packs_before: Vec<Vec<u8>> = pack_files(&s.repo())
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();

    let mut add = s.command();
    add.env("CBTVAULT_PASSWORD", PASSWORD)
        .env("CBTVAULT_NEW_PASSWORD", "second passphrase")
        .args(["key", "add"]);
    let out = add.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Value = serde_json::from_str(&ok(
        &s,
        Some("second passphrase"),
        &["key", "list", "--json"],
    ))
    .unwrap();
    let slots = list["keys"].as_array().unwrap();
    assert_eq!(slots.len(), 2);
    let current = list["current"].as_str().unwrap().to_string();
    let first = slots
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_string())
        .find(|id| *id != current)
        .unwrap();

    // A key file opens it too.
    let key_file = s.path("repo.key");
    std::fs::write(&key_file, noise(64, 3)).unwrap();
    let out = s
        .command()
        .env("CBTVAULT_PASSWORD", PASSWORD)
        .args(["key", "add", "--new-key-file", key_file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = s
        .command()
        .env_remove("CBTVAULT_PASSWORD")
        .args([
            "--repo-key-file",
            key_file.to_str().unwrap(),
            "show",
            &point,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    ok(&s, Some("second passphrase"), &["key", "remove", &first]);
    let err = fails(&s, Some(PASSWORD), &["list"]);
    assert!(err.contains("wrong passphrase"), "{err}");
    // The key in use is not removed from under its user.
    let err = fails(&s, Some("second passphrase"), &["key", "remove", &current]);
    assert!(err.contains("key this command was given"), "{err}");

    let out = s
        .command()
        .env("CBTVAULT_PASSWORD", "second passphrase")
        .env("CBTVAULT_NEW_PASSWORD", "third passphrase")
        .args(["key", "passwd"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fails(&s, Some("second passphrase"), &["list"]);
    ok(&s, Some("third passphrase"), &["list"]);

    let restored = s.path("r.img");
    ok(
        &s,
        Some("third passphrase"),
        &[
            "restore",
            "--quiet",
            &point,
            "--to",
            restored.to_str().unwrap(),
        ],
    );
    assert_eq!(std::fs::read(&restored).unwrap(), disk(8, 9));
    let packs_after: Vec<Vec<u8>> = pack_files(&s.repo())
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    assert_eq!(packs_before, packs_after, "no pack was rewritten");
}

#[test]
fn a_plain_repository_cannot_take_key_commands() {
    let plain = Scratch::new();
    let err = fails(&plain, None, &["key", "list"]);
    assert!(err.contains("only for encrypted repositories"), "{err}");
}

/// `copy --json` from `from` to `to`, the target's passphrase in
/// `CBTVAULT_PASSWORD` and the source's in `CBTVAULT_FROM_PASSWORD`.
fn copy_across(s: &Scratch, from: (&Path, Option<&str>), to: (&Path, Option<&str>)) -> Output {
    let mut c = s.command();
    c.env_remove("CBTVAULT_PASSWORD")
        .env_remove("CBTVAULT_FROM_PASSWORD")
        .env_remove("CBTVAULT_PASSWORD_FILE")
        .env_remove("CBTVAULT_KEY_FILE");
    if let Some(p) = from.1 {
        c.env("CBTVAULT_FROM_PASSWORD", p);
    }
    if let Some(p) = to.1 {
        c.env("CBTVAULT_PASSWORD", p);
    }
    c.args([
        "copy",
        "--json",
        "--from",
        from.0.to_str().unwrap(),
        "--to",
        to.0.to_str().unwrap(),
    ])
    .output()
    .expect("run cbtvault")
}

fn copied(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "copy failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("copy --json")
}

/// Issue 12: an unencrypted repository copied night after night into an
/// encrypted one, and on into one with another key; every copy restores
/// byte-exact and verifies with --read-data, the second night sends only
/// what changed, a wrong passphrase on either side says which, and the
/// guest's marker is in no file of an encrypted target.
#[test]
fn copies_go_across_keys_sending_only_what_changed() {
    let plain = Scratch::new();
    let blocks = 64;
    let image = plain.path("disk.img");
    let first = disk(blocks, 2);
    std::fs::write(&image, &first).unwrap();
    let full = id(&plain.backup("d", &image, None));

    let sealed = encrypted_scratch();
    let night1 = copied(&copy_across(
        &sealed,
        (&plain.repo(), None),
        (&sealed.repo(), Some(PASSWORD)),
    ));
    // 33 distinct blocks hold data (16 are zero, 16 share one content),
    // and one block-map node.
    assert_eq!(night1["blobs_read"], 33, "{night1}");
    assert_eq!(night1["blobs_sent"], 34, "{night1}");
    let full_there = night1["target_ids"][&full].as_str().unwrap().to_string();
    assert_ne!(full_there, full);
    assert_eq!(
        std::fs::read(restore(&sealed, &full_there, "full.img")).unwrap(),
        first
    );

    // The next night: four blocks change, one of them a zero block; only
    // they are read from the source, and sent with their node.
    let mut second = first.clone();
    let mut changed = BlockMap::empty(blocks as u64);
    for b in [3usize, 9, 17, 42] {
        let block = &mut second[b * BLOCK..(b + 1) * BLOCK];
        block.copy_from_slice(&noise(BLOCK, 500 + b as u64));
        block[100..100 + MARKER.len()].copy_from_slice(MARKER);
        changed.set(b as u64);
    }
    std::fs::write(&image, &second).unwrap();
    let bitmap = plain.path("changed.bitmap");
    std::fs::write(&bitmap, changed.to_xenapi_base64()).unwrap();
    let incremental = id(&plain.backup("d", &image, Some(&bitmap)));
    let night2 = copied(&copy_across(
        &sealed,
        (&plain.repo(), None),
        (&sealed.repo(), Some(PASSWORD)),
    ));
    assert_eq!(
        night2["copied"],
        serde_json::json!([incremental]),
        "{night2}"
    );
    assert_eq!(night2["present"], serde_json::json!([full]), "{night2}");
    assert_eq!(night2["blobs_read"], 4, "{night2}");
    assert_eq!(night2["blobs_sent"], 5, "{night2}");
    let incremental_there = night2["target_ids"][&incremental].as_str().unwrap();
    assert_eq!(
        std::fs::read(restore(&sealed, incremental_there, "incr.img")).unwrap(),
        second
    );
    let (passed, report) = verify_json(&sealed, Some(PASSWORD), true);
    assert!(passed, "verify --read-data: {report}");
    assert_eq!(
        files_containing(&sealed.repo(), MARKER),
        Vec::<PathBuf>::new()
    );

    // On into a repository with another key.
    let other = Scratch {
        dir: tempfile::tempdir().expect("tempdir"),
    };
    ok(
        &other,
        Some("another passphrase"),
        &[
            "init",
            "--encrypt",
            "--repo",
            other.repo().to_str().unwrap(),
        ],
    );
    let wrong_source = copy_across(
        &other,
        (&sealed.repo(), Some("not it")),
        (&other.repo(), Some("another passphrase")),
    );
    let err = String::from_utf8_lossy(&wrong_source.stderr);
    assert!(!wrong_source.status.success());
    assert!(
        err.contains("the source") && err.contains("wrong passphrase"),
        "{err}"
    );
    let wrong_target = copy_across(
        &other,
        (&sealed.repo(), Some(PASSWORD)),
        (&other.repo(), Some("not it")),
    );
    let err = String::from_utf8_lossy(&wrong_target.stderr);
    assert!(!wrong_target.status.success());
    assert!(
        err.contains("the target") && err.contains("wrong passphrase"),
        "{err}"
    );
    let onward = copied(&copy_across(
        &other,
        (&sealed.repo(), Some(PASSWORD)),
        (&other.repo(), Some("another passphrase")),
    ));
    assert_eq!(onward["copied"].as_array().unwrap().len(), 2, "{onward}");
    let last = onward["target_ids"][incremental_there].as_str().unwrap();
    let to = other.path("onward.img");
    ok(
        &other,
        Some("another passphrase"),
        &["restore", "--quiet", last, "--to", to.to_str().unwrap()],
    );
    assert_eq!(std::fs::read(&to).unwrap(), second);
    let (passed, report) = verify_json(&other, Some("another passphrase"), true);
    assert!(passed, "verify --read-data: {report}");
    assert_eq!(
        files_containing(&other.repo(), MARKER),
        Vec::<PathBuf>::new()
    );
}
