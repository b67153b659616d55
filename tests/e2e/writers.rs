//! Issue 12, many writers: three processes, each with its own catalogue
//! cache (as if on three hosts), back up overlapping disks into one S3
//! bucket at once while gc runs beside them, round after round; and a gc
//! and a writer killed mid-run lose nothing and make no later run wait.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cbtvault_repo::{Backend, BlobId, FileKind};
use cbtvault_s3::{Credentials, S3Backend, S3Location};
use serde_json::Value;

use crate::common::*;
use crate::s3::{S3Server, command};

/// The binary on `url` as host `h`: its own catalogue cache.
fn host(s: &Scratch, url: &str, h: usize) -> Command {
    let mut c = command(s, url);
    c.env("CBTVAULT_CACHE_DIR", s.path(&format!("cache-{h}")));
    c
}

fn ok_on(s: &Scratch, url: &str, h: usize, args: &[&str]) -> String {
    let out = host(s, url, h).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "host {h}: cbtvault {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn spawn_backup(s: &Scratch, url: &str, h: usize, disk: &str, image: &Path) -> Child {
    host(s, url, h)
        .args(["backup", "--json", "--disk", disk])
        .arg(format!("--source=file:{}", image.display()))
        .args(["--compression-level", "19"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn restore_point(child: Child) -> Value {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    the_restore_point(&String::from_utf8(out.stdout).unwrap())
}

fn gc(s: &Scratch, url: &str, h: usize) -> Value {
    serde_json::from_str(&ok_on(s, url, h, &["gc", "--json", "--max-unused", "0"])).unwrap()
}

/// A client of the bucket, as the tests' credentials.
fn backend(server: &S3Server, bucket: &str, prefix: &str) -> S3Backend {
    let location = S3Location::parse(&format!(
        "s3://{bucket}/{prefix}?endpoint={}",
        server.endpoint()
    ))
    .unwrap();
    let credentials = Credentials {
        access_key_id: "cbtvault-test".into(),
        secret_access_key: "cbtvault-test-secret".into(),
        session_token: None,
    };
    S3Backend::connect(&location, &credentials).unwrap()
}

/// How many copies of each blob the bucket's packs hold.
fn copies(server: &S3Server, bucket: &str, prefix: &str) -> HashMap<BlobId, usize> {
    let backend = backend(server, bucket, prefix);
    let mut out = HashMap::new();
    for pack in backend.list(FileKind::Pack).unwrap() {
        for e in cbtvault_repo::testing::pack::read_index(&backend, &pack).unwrap() {
            *out.entry(e.id).or_insert(0) += 1;
        }
    }
    out
}

/// Waits for `child` at most `limit`: a run that hangs fails the test.
fn finishes_within(mut child: Child, limit: Duration, what: &str) -> std::process::Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} hung for {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// The test server honours `If-None-Match: *` on PUT (moto 5.2.1 answers
/// 412): a lock object is created once; a retried create of the same
/// bytes is recognised as its own.
#[test]
fn the_s3_server_refuses_a_second_create_of_a_lock_object() {
    let server = S3Server::start();
    server.create_bucket("cond");
    let backend = backend(&server, "cond", "r");
    assert!(backend.create(FileKind::Lock, "gc", b"first").unwrap());
    assert!(!backend.create(FileKind::Lock, "gc", b"second").unwrap());
    assert!(backend.create(FileKind::Lock, "gc", b"first").unwrap());
    assert_eq!(backend.read(FileKind::Lock, "gc").unwrap(), b"first");
    backend.remove(FileKind::Lock, "gc").unwrap();
    assert!(backend.create(FileKind::Lock, "gc", b"second").unwrap());
}

#[test]
fn three_writers_and_gc_share_one_bucket_and_every_block_is_stored_once() {
    let s = Scratch::new();
    let server = S3Server::start();
    server.create_bucket("shared");
    let url = format!("s3://shared/pools?endpoint={}", server.endpoint());
    ok_on(&s, &url, 0, &["init"]);

    // Something for gc to collect while the writers run.
    let junk = s.image("junk.img", 8, 70);
    let j = restore_point(spawn_backup(&s, &url, 0, "junk", &junk));
    ok_on(
        &s,
        &url,
        0,
        &["forget", "--quiet", "--allow-forget-last", &id(&j)],
    );

    // Three disks that share three quarters of their blocks.
    let base = s.image("base.img", 24, 71);
    let images: Vec<_> = (0..3)
        .map(|h| {
            let image = s.path(&format!("disk{h}.img"));
            std::fs::copy(&base, &image).unwrap();
            s.churn(&image, 0.25, 80 + h as u64, &format!("c{h}.b64"));
            image
        })
        .collect();
    let mut writers: Vec<Child> = (0..3)
        .map(|h| spawn_backup(&s, &url, h, &format!("pool{h}/disk"), &images[h]))
        .collect();

    // gc from a fourth host, round after round, beside the writers.
    let mut rounds = 0;
    while writers.iter_mut().any(|w| w.try_wait().unwrap().is_none()) {
        let report = gc(&s, &url, 3);
        eprintln!("gc beside the writers: {report}");
        rounds += 1;
    }
    assert!(rounds >= 1, "gc ran beside the writers");
    let points: Vec<Value> = writers.into_iter().map(restore_point).collect();

    // Once they are done: condemn what races stored twice, then sweep.
    let first = gc(&s, &url, 3);
    let last = gc(&s, &url, 3);
    eprintln!("gc after the writers: {first}\n{last}");
    assert_eq!(last["packs_waiting"], 0, "{last}");
    let copies = copies(&server, "shared", "pools");
    let doubled: Vec<_> = copies.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "stored more than once: {doubled:?}");
    let new: u64 = points
        .iter()
        .map(|p| p["stats"]["blocks_new"].as_u64().unwrap())
        .sum();
    let dedup: u64 = points
        .iter()
        .map(|p| p["stats"]["blocks_dedup"].as_u64().unwrap())
        .sum();
    eprintln!(
        "{} blobs stored once each; writers stored {new} blocks and deduplicated {dedup}",
        copies.len()
    );

    // Every restore point restores byte-exact on another host, and verify
    // reads everything back.
    for (h, point) in points.iter().enumerate() {
        let other = (h + 1) % 3;
        let to = s.path(&format!("r{h}.img"));
        ok_on(
            &s,
            &url,
            other,
            &[
                "restore",
                "--quiet",
                &id(point),
                "--to",
                to.to_str().unwrap(),
            ],
        );
        assert_same_file(&images[h], &to);
    }
    ok_on(&s, &url, 1, &["verify", "--read-data"]);
}

#[test]
fn a_killed_gc_and_a_killed_writer_lose_nothing_and_make_nothing_wait() {
    let s = Scratch::new();
    let server = S3Server::start();
    server.create_bucket("killed");
    let url = format!("s3://killed/r?endpoint={}", server.endpoint());
    ok_on(&s, &url, 0, &["init"]);
    let a = s.image("a.img", 16, 90);
    let kept = restore_point(spawn_backup(&s, &url, 0, "a", &a));
    let junk = s.image("junk.img", 16, 91);
    let j = restore_point(spawn_backup(&s, &url, 0, "junk", &junk));
    ok_on(
        &s,
        &url,
        0,
        &["forget", "--quiet", "--allow-forget-last", &id(&j)],
    );

    // A writer killed mid-backup (it holds disk b's lock object).
    let b = s.image("b.img", 24, 92);
    let mut writer = spawn_backup(&s, &url, 1, "b", &b);
    std::thread::sleep(Duration::from_millis(1500));
    let _ = writer.kill();
    let _ = writer.wait();

    // gc killed at several points, the sweep among them.
    for delay in [300u64, 800, 1500, 2500] {
        let mut child = host(&s, &url, 2)
            .args(["gc", "--quiet", "--max-unused", "0"])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        let _ = child.kill();
        let _ = child.wait();
    }

    // Nothing waits for the dead: disk b backs up from another host, and
    // gc runs to the end.
    let out = finishes_within(
        spawn_backup(&s, &url, 0, "b", &b),
        Duration::from_secs(300),
        "the backup after a killed one",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rb = the_restore_point(&String::from_utf8(out.stdout).unwrap());
    let child = host(&s, &url, 2)
        .args(["gc", "--json", "--max-unused", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = finishes_within(child, Duration::from_secs(300), "gc after a killed gc");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["packs_waiting"], 0, "{report}");

    ok_on(&s, &url, 1, &["verify", "--read-data"]);
    for (point, image, name) in [(&kept, &a, "ra.img"), (&rb, &b, "rb.img")] {
        let to = s.path(name);
        ok_on(
            &s,
            &url,
            2,
            &[
                "restore",
                "--quiet",
                &id(point),
                "--to",
                to.to_str().unwrap(),
            ],
        );
        assert_same_file(image, &to);
    }
}
