//! Issue 12: a repository in S3-compatible object storage, against a real
//! S3 server on loopback (moto in server mode, installed by
//! `scripts/install-deps`): backup, incremental, byte-exact restores and
//! verify; the local catalogue is only a cache, rebuilt from the bucket
//! on another host (here: with the cache deleted); errors name what to set.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

/// An S3 server on a free loopback port, stopped on drop.
pub(crate) struct S3Server {
    child: Child,
    pub(crate) port: u16,
}

impl S3Server {
    pub(crate) fn start() -> S3Server {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "python3 with moto (scripts/install-deps installs it with pip) must be installed",
            );
        let server = S3Server { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the S3 server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    pub(crate) fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates `bucket` (moto takes unsigned requests).
    pub(crate) fn create_bucket(&self, bucket: &str) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            stream,
            "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP proxy in front of the S3 server that spoils one request in
/// `every`: in turn a 503 SlowDown, a connection dropped before the
/// answer, and an answer 300 ms late. Each request it passes on goes
/// upstream on a connection of its own.
pub(crate) struct FaultProxy {
    pub(crate) port: u16,
    requests: Arc<AtomicU64>,
    spoiled: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl FaultProxy {
    pub(crate) fn start(upstream: u16, every: u64) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let (requests, spoiled) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, sp, st) = (requests.clone(), spoiled.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let (r, sp) = (r.clone(), sp.clone());
                        std::thread::spawn(move || {
                            let _ = serve(client, upstream, every, &r, &sp);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FaultProxy {
            port,
            requests,
            spoiled,
            stop,
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Serves one client connection: request by request until it closes.
fn serve(
    client: TcpStream,
    upstream: u16,
    every: u64,
    requests: &AtomicU64,
    spoiled: &AtomicU64,
) -> std::io::Result<()> {
    client.set_nonblocking(false)?;
    let mut reader = BufReader::new(client.try_clone()?);
    let mut client = client;
    loop {
        let mut head = Vec::new();
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            if lower.starts_with("connection:") {
                continue;
            }
            if line == "\r\n" {
                head.extend_from_slice(b"Connection: close\r\n\r\n");
                break;
            }
            head.extend_from_slice(line.as_bytes());
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        let n = requests.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_multiple_of(every) {
            spoiled.fetch_add(1, Ordering::Relaxed);
            match (n / every) % 3 {
                0 => {
                    let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
                    write!(
                        client,
                        "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{xml}",
                        xml.len()
                    )?;
                    continue;
                }
                1 => return Ok(()),
                _ => std::thread::sleep(Duration::from_millis(300)),
            }
        }
        let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
        up.write_all(&head)?;
        up.write_all(&body)?;
        let mut answer = Vec::new();
        up.read_to_end(&mut answer)?;
        client.write_all(&answer)?;
        // The answer says `Connection: close`: the client opens another.
        return Ok(());
    }
}

/// The binary on the S3 repository `url`, with credentials in the
/// environment and the catalogue cache in the scratch area.
pub(crate) fn command(s: &Scratch, url: &str) -> Command {
    let mut c = s.command();
    c.env("CBTVAULT_REPO", url)
        .env("AWS_ACCESS_KEY_ID", "cbtvault-test")
        .env("AWS_SECRET_ACCESS_KEY", "cbtvault-test-secret")
        .env("CBTVAULT_CACHE_DIR", s.path("cache"));
    c
}

fn ok(s: &Scratch, url: &str, args: &[&str]) -> String {
    let out = command(s, url).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "cbtvault {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `backup --json` of `source` as disk `d`, an incremental when given a
/// changed-block bitmap.
fn backup(s: &Scratch, url: &str, source: &str, bitmap: Option<&std::path::Path>) -> Value {
    let mut args = vec!["backup", "--json", "--disk", "d", "--source", source];
    let bitmap = bitmap.map(|b| b.to_str().unwrap().to_string());
    if let Some(b) = &bitmap {
        args.extend(["--changed-blocks", b]);
    }
    the_restore_point(&ok(s, url, &args))
}

fn restore(s: &Scratch, url: &str, id: &str, name: &str) -> std::path::PathBuf {
    let to = s.path(name);
    ok(
        s,
        url,
        &["restore", "--quiet", id, "--to", to.to_str().unwrap()],
    );
    to
}

#[test]
fn an_s3_repository_backs_up_restores_and_rebuilds_its_catalogue_from_the_bucket() {
    let s = Scratch::new();
    let server = S3Server::start();
    server.create_bucket("backups");
    let url = format!("s3://backups/site-a?endpoint={}", server.endpoint());
    ok(&s, &url, &["init"]);

    // A full, then an incremental from a changed-block bitmap.
    let image = s.image("disk.img", 48, 1);
    let source = format!("file:{}", image.display());
    let full = backup(&s, &url, &source, None);
    let first = s.path("first.img");
    std::fs::copy(&image, &first).unwrap();
    let (_, bitmap) = s.churn(&image, 0.05, 2, "c1.b64");
    let incremental = backup(&s, &url, &source, Some(&bitmap));
    assert_eq!(incremental["mode"]["kind"], "incremental", "{incremental}");
    assert_same_file(&first, &restore(&s, &url, &id(&full), "r1.img"));
    assert_same_file(&image, &restore(&s, &url, &id(&incremental), "r2.img"));
    ok(&s, &url, &["verify", "--read-data"]);

    // Another host: no catalogue, only the bucket.
    std::fs::remove_dir_all(s.path("cache")).unwrap();
    let listed: Vec<Value> = serde_json::from_str(&ok(&s, &url, &["list", "--json"])).unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_same_file(&image, &restore(&s, &url, &id(&incremental), "r3.img"));
    // And it backs up incrementally on top of what it found.
    let (_, bitmap) = s.churn(&image, 0.02, 3, "c2.b64");
    let next = backup(&s, &url, &source, Some(&bitmap));
    assert!(next["stats"]["blocks_new"].as_u64().unwrap() > 0, "{next}");
    assert_eq!(next["parent"], incremental["id"], "{next}");
    assert_same_file(&image, &restore(&s, &url, &id(&next), "r4.img"));

    // Nothing of the repository is on the local disk but the cache.
    assert!(!s.path("site-a").exists());
}

#[test]
fn an_encrypted_s3_repository_restores_from_the_bucket_alone_and_needs_its_key() {
    let s = Scratch::new();
    let server = S3Server::start();
    server.create_bucket("sealed");
    let url = format!("s3://sealed/site-b?endpoint={}", server.endpoint());
    let keyed = |args: &[&str], password: &str| {
        command(&s, &url)
            .env("CBTVAULT_PASSWORD", password)
            .args(args)
            .output()
            .unwrap()
    };
    let out = keyed(&["init", "--encrypt"], "s3 passphrase");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = s.image("disk.img", 16, 4);
    let source = format!("file:{}", image.display());
    let out = keyed(
        &["backup", "--json", "--disk", "d", "--source", &source],
        "s3 passphrase",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let point = id(&the_restore_point(&String::from_utf8(out.stdout).unwrap()));

    // Another host: only the bucket, and the passphrase.
    std::fs::remove_dir_all(s.path("cache")).unwrap();
    let to = s.path("r.img");
    let out = keyed(
        &["restore", "--quiet", &point, "--to", to.to_str().unwrap()],
        "s3 passphrase",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_file(&image, &to);
    let out = keyed(&["verify", "--read-data"], "s3 passphrase");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = keyed(&["list"], "wrong");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong passphrase"));
}

#[test]
fn s3_mistakes_say_what_to_set() {
    let s = Scratch::new();
    let server = S3Server::start();
    server.create_bucket("empty");
    let url = format!("s3://empty/none?endpoint={}", server.endpoint());
    let run = |c: &mut Command, args: &[&str]| -> Output { c.args(args).output().unwrap() };
    let stderr = |o: &Output| String::from_utf8_lossy(&o.stderr).into_owned();

    let out = run(&mut command(&s, &url), &["list"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not a cbtvault repository")
            && stderr(&out).contains("s3://empty/none"),
        "{}",
        stderr(&out)
    );
    let mut c = command(&s, &url);
    c.env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("AWS_SHARED_CREDENTIALS_FILE", s.path("no-such-file"));
    let out = run(&mut c, &["list"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("AWS_ACCESS_KEY_ID"),
        "{}",
        stderr(&out)
    );
    let out = run(&mut command(&s, "s3://user:pw@b/p"), &["list"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("credentials do not belong in the location"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("panicked"));
}

/// A store that throttles (503 SlowDown), drops connections and answers
/// late on one request in four: backups, restores and verify go through
/// with nothing lost.
#[test]
fn an_s3_repository_survives_throttling_drops_and_a_slow_server() {
    let s = Scratch::new();
    let server = S3Server::start();
    server.create_bucket("flaky");
    let proxy = FaultProxy::start(server.port, 4);
    let url = format!("s3://flaky/r?endpoint=http://127.0.0.1:{}", proxy.port);
    ok(&s, &url, &["init"]);
    let image = s.image("disk.img", 40, 5);
    let source = format!("file:{}", image.display());
    let full = backup(&s, &url, &source, None);
    let (_, bitmap) = s.churn(&image, 0.05, 6, "c.b64");
    let next = backup(&s, &url, &source, Some(&bitmap));
    assert_eq!(next["parent"], full["id"], "{next}");
    assert_same_file(&image, &restore(&s, &url, &id(&next), "r.img"));
    ok(&s, &url, &["verify", "--read-data"]);
    let spoiled = proxy.spoiled.load(Ordering::Relaxed);
    eprintln!(
        "{spoiled} of {} requests spoiled",
        proxy.requests.load(Ordering::Relaxed)
    );
    assert!(
        spoiled >= 10,
        "{spoiled} of {} requests spoiled",
        proxy.requests.load(Ordering::Relaxed)
    );
}

/// Backups killed mid-upload leave only unreferenced objects: the next
/// backup, gc and verify --read-data find a consistent repository, and
/// the restore is byte-exact.
#[test]
fn killed_backups_into_s3_lose_nothing_and_gc_removes_what_they_left() {
    let s = Scratch::new();
    let server = S3Server::start();
    server.create_bucket("killed");
    let url = format!("s3://killed/r?endpoint={}", server.endpoint());
    ok(&s, &url, &["init"]);
    let image = s.image("disk.img", 48, 9);
    let source = format!("file:{}", image.display());
    for round in 0..3u64 {
        let mut child = command(&s, &url)
            .args(["backup", "--quiet", "--disk", "d", "--source", &source])
            .args(["--compression-level", "19"])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(400 + 300 * round));
        let _ = child.kill();
        let _ = child.wait();
    }
    let rp = backup(&s, &url, &source, None);
    ok(&s, &url, &["gc"]);
    ok(&s, &url, &["verify", "--read-data"]);
    assert_same_file(&image, &restore(&s, &url, &id(&rp), "r.img"));
    let listed: Vec<Value> = serde_json::from_str(&ok(&s, &url, &["list", "--json"])).unwrap();
    assert_eq!(
        listed.len(),
        1,
        "only the finished backup is a restore point"
    );
}

/// `copy` sends a local repository's restore points to S3 and on to
/// another local repository, only what each target lacks, and keeps ids.
#[test]
fn copies_go_from_local_to_s3_and_back_sending_only_what_the_target_lacks() {
    let s = Scratch::new();
    let server = S3Server::start();
    server.create_bucket("offsite");
    let url = format!("s3://offsite/copy?endpoint={}", server.endpoint());
    ok(&s, &url, &["init"]);
    let local = s.repo();
    let local = local.to_str().unwrap();
    let copy = |from: &str, to: &str| -> Value {
        serde_json::from_str(&ok(
            &s,
            &url,
            &["copy", "--json", "--from", from, "--to", to],
        ))
        .unwrap()
    };

    let image = s.image("disk.img", 32, 11);
    s.backup("d", &image, None);
    let (_, bitmap) = s.churn(&image, 0.05, 12, "c1.b64");
    s.backup("d", &image, Some(&bitmap));
    let first = copy(local, &url);
    assert_eq!(first["copied"].as_array().unwrap().len(), 2, "{first}");
    assert!(first["blobs_sent"].as_u64().unwrap() > 0, "{first}");
    let again = copy(local, &url);
    assert_eq!(again["copied"].as_array().unwrap().len(), 0, "{again}");
    assert_eq!(again["present"].as_array().unwrap().len(), 2, "{again}");
    assert_eq!(again["blobs_sent"], 0, "{again}");

    // One more night: only its new blocks (and block-map nodes) travel.
    let (changed, bitmap) = s.churn(&image, 0.01, 13, "c2.b64");
    let latest = s.backup("d", &image, Some(&bitmap));
    let third = copy(local, &url);
    assert_eq!(
        third["copied"],
        serde_json::json!([latest["id"]]),
        "{third}"
    );
    let sent = third["blobs_sent"].as_u64().unwrap();
    assert!(
        sent >= 1 && sent <= changed.count_set() + 8,
        "{sent} blobs sent for {} changed blocks",
        changed.count_set()
    );
    assert_same_file(&image, &restore(&s, &url, &id(&latest), "from-s3.img"));

    // And on to another local repository, restored and verified there.
    let other = s.path("other");
    ok(&s, &url, &["init", "--repo", other.to_str().unwrap()]);
    let back = copy(&url, other.to_str().unwrap());
    assert_eq!(back["copied"].as_array().unwrap().len(), 3, "{back}");
    let to = s.path("from-other.img");
    ok(
        &s,
        &url,
        &[
            "restore",
            "--quiet",
            "--repo",
            other.to_str().unwrap(),
            &id(&latest),
            "--to",
            to.to_str().unwrap(),
        ],
    );
    assert_same_file(&image, &to);
    ok(
        &s,
        &url,
        &["verify", "--read-data", "--repo", other.to_str().unwrap()],
    );
}

/// Issue 12's common case: a local unencrypted repository copied
/// off-site into an encrypted bucket, night after night. The second
/// night reads and sends only the changed blocks and the block-map nodes
/// above them; both nights restore byte-exact from the bucket, and
/// `verify --read-data` passes there.
#[test]
fn an_unencrypted_repository_copies_into_an_encrypted_bucket_sending_only_what_changed() {
    const PASSWORD: &str = "the bucket's passphrase";
    let s = Scratch::new();
    let server = S3Server::start();
    server.create_bucket("sealed");
    let url = format!("s3://sealed/offsite?endpoint={}", server.endpoint());
    let sealed = |args: &[&str]| -> String {
        let out = command(&s, &url)
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
    let local = s.repo();
    let local = local.to_str().unwrap();
    let copy = || -> Value {
        serde_json::from_str(&sealed(&["copy", "--json", "--from", local, "--to", &url])).unwrap()
    };

    // 8 MiB: 128 blocks, one block-map node.
    let image = s.image("disk.img", 8, 5);
    let full = s.backup("d", &image, None);
    let night1 = copy();
    assert_eq!(
        night1["copied"],
        serde_json::json!([full["id"]]),
        "{night1}"
    );
    let full_there = night1["target_ids"][id(&full)]
        .as_str()
        .unwrap()
        .to_string();
    let first = s.path("first.img");
    std::fs::copy(&image, &first).unwrap();

    // Four blocks get content found nowhere else.
    let mut bytes = std::fs::read(&image).unwrap();
    let mut changed = cbtvault_blockmap::BlockMap::empty(128);
    for b in [1usize, 5, 9, 100] {
        let text = format!("night two, block {b:04}, new content. ");
        let block = &mut bytes[b * 65536..(b + 1) * 65536];
        for (i, byte) in block.iter_mut().enumerate() {
            *byte = text.as_bytes()[i % text.len()];
        }
        changed.set(b as u64);
    }
    std::fs::write(&image, &bytes).unwrap();
    let bitmap = s.path("c.b64");
    std::fs::write(&bitmap, changed.to_xenapi_base64()).unwrap();
    let incremental = s.backup("d", &image, Some(&bitmap));
    let night2 = copy();
    assert_eq!(
        night2["copied"],
        serde_json::json!([incremental["id"]]),
        "{night2}"
    );
    assert_eq!(night2["blobs_read"], 4, "{night2}");
    assert_eq!(
        night2["blobs_sent"], 5,
        "four blocks and their node: {night2}"
    );

    let incremental_there = night2["target_ids"][id(&incremental)].as_str().unwrap();
    for (point, want, name) in [
        (full_there.as_str(), &first, "r1.img"),
        (incremental_there, &image, "r2.img"),
    ] {
        let to = s.path(name);
        sealed(&["restore", "--quiet", point, "--to", to.to_str().unwrap()]);
        assert_same_file(want, &to);
    }
    sealed(&["verify", "--read-data"]);
}
