//! Issue 12: a repository in S3-compatible object storage, against a real
//! S3 server on loopback (moto in server mode, installed by
//! `scripts/install-deps`): backup, incremental, byte-exact restores and
//! verify; the local catalogue is only a cache, rebuilt from the bucket
//! on another host (here: with the cache deleted); errors name what to set.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cbtvault_repo::{Backend, FileKind};
use cbtvault_s3::{Credentials, ResumePolicy, S3Backend, S3Location};
use rand::{RngCore, SeedableRng};
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
        let answer = self.request("PUT", &format!("/{bucket}"), &[], b"");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }

    /// An unsigned request (moto takes them): the whole answer, status
    /// line first.
    pub(crate) fn request(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let mut head = format!(
            "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.port,
            body.len()
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body).unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// How many multipart uploads of `bucket` are in progress (neither
    /// completed nor aborted), by ListMultipartUploads.
    pub(crate) fn multipart_uploads(&self, bucket: &str) -> usize {
        let answer = self.request("GET", &format!("/{bucket}?uploads"), &[], b"");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        answer.matches("<UploadId>").count()
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
/// upstream on a connection of its own. It may also fail given parts of
/// every multipart upload a given number of times ([`PartFaults`]), and
/// counts how often each part was sent.
pub(crate) struct FaultProxy {
    pub(crate) port: u16,
    requests: Arc<AtomicU64>,
    spoiled: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    sends: Arc<Mutex<PartSends>>,
    uploads: Arc<Mutex<Uploads>>,
}

/// The uploads (PUTs with a body: objects and parts) the proxy saw, and
/// how many carried both Content-MD5 and `x-amz-checksum-sha256`.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Uploads {
    pub(crate) puts: u64,
    pub(crate) with_checksums: u64,
}

/// How often each part of each multipart upload reached the proxy:
/// (upload id, part number) → sends.
pub(crate) type PartSends = BTreeMap<(String, u32), u32>;

/// Parts of every multipart upload (numbers from 1) that the proxy
/// answers with S3's `400 RequestTimeout` (what S3 says of a part whose
/// body came too slowly; object_store does not retry a 400), the first
/// `times` times each is sent.
/// And it passes the first `lost_completions` completions of an upload
/// on to the store, then drops the connection: the store completed the
/// upload, the client never heard.
#[derive(Clone, Debug, Default)]
pub(crate) struct PartFaults {
    pub(crate) parts: Vec<u32>,
    pub(crate) times: u32,
    pub(crate) lost_completions: u64,
}

/// What one connection of the proxy shares with the others.
struct Shared {
    upstream: u16,
    every: u64,
    faults: PartFaults,
    requests: Arc<AtomicU64>,
    spoiled: Arc<AtomicU64>,
    sends: Arc<Mutex<PartSends>>,
    uploads: Arc<Mutex<Uploads>>,
    completions: AtomicU64,
}

impl FaultProxy {
    pub(crate) fn start(upstream: u16, every: u64) -> FaultProxy {
        FaultProxy::start_with(upstream, every, PartFaults::default())
    }

    /// A proxy that spoils nothing but the parts `faults` names.
    pub(crate) fn failing_parts(upstream: u16, faults: PartFaults) -> FaultProxy {
        FaultProxy::start_with(upstream, u64::MAX, faults)
    }

    fn start_with(upstream: u16, every: u64, faults: PartFaults) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let (requests, spoiled) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let stop = Arc::new(AtomicBool::new(false));
        let sends = Arc::new(Mutex::new(PartSends::new()));
        let uploads = Arc::new(Mutex::new(Uploads::default()));
        let shared = Arc::new(Shared {
            upstream,
            every,
            faults,
            requests: requests.clone(),
            spoiled: spoiled.clone(),
            sends: sends.clone(),
            uploads: uploads.clone(),
            completions: AtomicU64::new(0),
        });
        let st = stop.clone();
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let shared = shared.clone();
                        std::thread::spawn(move || {
                            let _ = serve(client, &shared);
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
            sends,
            uploads,
        }
    }

    /// The requests it passed on so far.
    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The uploads it saw, and how many carried their checksums.
    pub(crate) fn uploads(&self) -> Uploads {
        *self.uploads.lock().unwrap()
    }

    /// How often each part of each multipart upload was sent.
    pub(crate) fn part_sends(&self) -> PartSends {
        self.sends.lock().unwrap().clone()
    }
}

/// The upload id and part number of a request line that sends a part.
fn part_of(request_line: &str) -> Option<(String, u32)> {
    let target = request_line.strip_prefix("PUT ")?.split(' ').next()?;
    let query = target.split_once('?')?.1;
    let (mut upload, mut part) = (None, None);
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("uploadId", v)) => upload = Some(v.to_string()),
            Some(("partNumber", v)) => part = v.parse().ok(),
            _ => {}
        }
    }
    Some((upload?, part?))
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Serves one client connection: request by request until it closes.
fn serve(client: TcpStream, shared: &Shared) -> std::io::Result<()> {
    client.set_nonblocking(false)?;
    let mut reader = BufReader::new(client.try_clone()?);
    let mut client = client;
    loop {
        let mut head = Vec::new();
        let mut length = 0usize;
        let mut request_line = None;
        let (mut md5, mut sha256, mut copy) = (false, false, false);
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            if request_line.is_none() {
                request_line = Some(line.clone());
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            md5 |= lower.starts_with("content-md5:");
            sha256 |= lower.starts_with("x-amz-checksum-sha256:");
            copy |= lower.starts_with("x-amz-copy-source:");
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
        let n = shared.requests.fetch_add(1, Ordering::Relaxed) + 1;
        if request_line
            .as_deref()
            .is_some_and(|l| l.starts_with("PUT "))
            && !copy
            && length > 0
        {
            let mut uploads = shared.uploads.lock().unwrap();
            uploads.puts += 1;
            uploads.with_checksums += u64::from(md5 && sha256);
        }
        if let Some(part) = request_line.as_deref().and_then(part_of) {
            let sends = {
                let mut all = shared.sends.lock().unwrap();
                let n = all.entry(part.clone()).or_default();
                *n += 1;
                *n
            };
            if shared.faults.parts.contains(&part.1) && sends <= shared.faults.times {
                shared.spoiled.fetch_add(1, Ordering::Relaxed);
                let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>RequestTimeout</Code><Message>Your socket connection to the server was not read from or written to within the timeout period.</Message></Error>";
                write!(
                    client,
                    "HTTP/1.1 400 Bad Request\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{xml}",
                    xml.len()
                )?;
                continue;
            }
        }
        let completion = request_line
            .as_deref()
            .is_some_and(|l| l.starts_with("POST ") && l.contains("uploadId="));
        let lose_answer = completion
            && shared.completions.fetch_add(1, Ordering::Relaxed) < shared.faults.lost_completions;
        let every = shared.every;
        if n.is_multiple_of(every) {
            shared.spoiled.fetch_add(1, Ordering::Relaxed);
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
        let mut up = TcpStream::connect(("127.0.0.1", shared.upstream))?;
        up.write_all(&head)?;
        up.write_all(&body)?;
        let mut answer = Vec::new();
        up.read_to_end(&mut answer)?;
        if lose_answer {
            shared.spoiled.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
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

pub(crate) fn ok(s: &Scratch, url: &str, args: &[&str]) -> String {
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
pub(crate) fn backup(
    s: &Scratch,
    url: &str,
    source: &str,
    bitmap: Option<&std::path::Path>,
) -> Value {
    let mut args = vec!["backup", "--json", "--disk", "d", "--source", source];
    let bitmap = bitmap.map(|b| b.to_str().unwrap().to_string());
    if let Some(b) = &bitmap {
        args.extend(["--changed-blocks", b]);
    }
    the_restore_point(&ok(s, url, &args))
}

pub(crate) fn restore(s: &Scratch, url: &str, id: &str, name: &str) -> std::path::PathBuf {
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

/// A client of `bucket/prefix` on the S3 server (or a proxy) at `port`,
/// as the tests' credentials.
fn client(port: u16, bucket: &str, prefix: &str) -> S3Backend {
    let location = S3Location::parse(&format!(
        "s3://{bucket}/{prefix}?endpoint=http://127.0.0.1:{port}"
    ))
    .unwrap();
    let credentials = Credentials {
        access_key_id: "cbtvault-test".into(),
        secret_access_key: "cbtvault-test-secret".into(),
        session_token: None,
    };
    S3Backend::connect(&location, &credentials).unwrap()
}

/// For each multipart upload the proxy saw, how often each of its parts
/// was sent: part number → sends.
fn sends_by_upload(sends: &PartSends) -> BTreeMap<String, BTreeMap<u32, u32>> {
    let mut out: BTreeMap<String, BTreeMap<u32, u32>> = BTreeMap::new();
    for ((upload, part), n) in sends {
        out.entry(upload.clone()).or_default().insert(*part, *n);
    }
    out
}

/// Issue 12, resume of an interrupted upload: parts that keep failing
/// past the client's own retries (S3's `400 RequestTimeout`, which
/// object_store does not retry) are sent again, alone, in the same
/// upload, until they go through; the parts already accepted are kept.
/// A part that never goes through makes the write fail after the rounds,
/// and the upload is aborted, leaving nothing behind.
#[test]
fn an_interrupted_pack_upload_resumes_sending_again_only_the_parts_that_failed() {
    let server = S3Server::start();
    server.create_bucket("resume");
    let quick = ResumePolicy {
        rounds: 5,
        first_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
    };
    // Three parts: 8 MiB, 8 MiB and the rest.
    let mut data = vec![0u8; (20 << 20) + 12345];
    rand_chacha::ChaCha8Rng::seed_from_u64(7).fill_bytes(&mut data);
    let direct = client(server.port, "resume", "r");

    // Parts 2 and 3 fail twice each, then go through.
    let proxy = FaultProxy::failing_parts(
        server.port,
        PartFaults {
            parts: vec![2, 3],
            times: 2,
            ..PartFaults::default()
        },
    );
    let mut backend = client(proxy.port, "resume", "r");
    backend.set_resume_policy(quick);
    backend.write(FileKind::Pack, "ab01", &data).unwrap();
    let uploads = sends_by_upload(&proxy.part_sends());
    assert_eq!(
        uploads.len(),
        1,
        "one upload, resumed, never restarted: {uploads:?}"
    );
    let parts = uploads.values().next().unwrap();
    assert_eq!(
        parts,
        &BTreeMap::from([(1, 1), (2, 3), (3, 3)]),
        "part 1 was sent once and kept; parts 2 and 3 again, alone, until accepted"
    );
    assert!(
        direct.read(FileKind::Pack, "ab01").unwrap() == data,
        "the object is byte-exact"
    );
    assert_eq!(server.multipart_uploads("resume"), 0);

    // Part 1 never goes through: two rounds, then the upload is aborted.
    let proxy = FaultProxy::failing_parts(
        server.port,
        PartFaults {
            parts: vec![1],
            times: u32::MAX,
            ..PartFaults::default()
        },
    );
    let mut backend = client(proxy.port, "resume", "r");
    backend.set_resume_policy(ResumePolicy { rounds: 2, ..quick });
    let err = backend.write(FileKind::Pack, "cd02", &data).unwrap_err();
    assert!(err.to_string().contains("cd02"), "{err}");
    let uploads = sends_by_upload(&proxy.part_sends());
    assert_eq!(uploads.len(), 1, "{uploads:?}");
    assert_eq!(
        uploads.values().next().unwrap(),
        &BTreeMap::from([(1, 3), (2, 1), (3, 1)]),
    );
    assert!(
        direct.size(FileKind::Pack, "cd02").is_err(),
        "nothing visible"
    );
    assert_eq!(
        server.multipart_uploads("resume"),
        0,
        "the upload given up was aborted: no parts left in the bucket"
    );

    // The store completes the upload but its answer is lost: the write
    // finds the object there, whole.
    let proxy = FaultProxy::failing_parts(
        server.port,
        PartFaults {
            lost_completions: 1,
            ..PartFaults::default()
        },
    );
    let mut backend = client(proxy.port, "resume", "r");
    backend.set_resume_policy(quick);
    backend.write(FileKind::Pack, "ef03", &data).unwrap();
    assert_eq!(proxy.spoiled.load(Ordering::Relaxed), 1);
    assert!(direct.read(FileKind::Pack, "ef03").unwrap() == data);
    assert_eq!(server.multipart_uploads("resume"), 0);
}

/// A backup whose pack uploads lose a part each (past the client's own
/// retries) resumes them, sends nothing twice but those parts, and
/// restores byte-exact.
#[test]
fn a_backup_through_failing_parts_resumes_its_uploads_and_restores_byte_exact() {
    let s = Scratch::new();
    let server = S3Server::start();
    server.create_bucket("parts");
    let proxy = FaultProxy::failing_parts(
        server.port,
        PartFaults {
            parts: vec![2],
            times: 1,
            ..PartFaults::default()
        },
    );
    let url = format!("s3://parts/r?endpoint=http://127.0.0.1:{}", proxy.port);
    ok(&s, &url, &["init"]);
    let image = s.image("disk.img", 48, 21);
    let source = format!("file:{}", image.display());
    let out = command(&s, &url)
        .args(["backup", "--json", "--disk", "d", "--source", &source])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("resuming a multipart upload"),
        "each resume is logged: {stderr}"
    );
    let point = the_restore_point(&String::from_utf8(out.stdout).unwrap());

    let uploads = sends_by_upload(&proxy.part_sends());
    assert!(!uploads.is_empty(), "packs went up as multipart uploads");
    for (upload, parts) in &uploads {
        for (part, n) in parts {
            let expected = if *part == 2 { 2 } else { 1 };
            assert_eq!(*n, expected, "upload {upload}, part {part}: {parts:?}");
        }
    }
    eprintln!(
        "{} multipart uploads, {} parts sent again",
        uploads.len(),
        proxy.spoiled.load(Ordering::Relaxed)
    );
    assert_eq!(server.multipart_uploads("parts"), 0);
    assert_same_file(&image, &restore(&s, &url, &id(&point), "r.img"));
    ok(&s, &url, &["verify", "--read-data"]);
}

/// Runs `script` under python3 with boto3 (which comes with moto), `s3`
/// a client of the server and `json` imported; its standard output.
fn boto3(server: &S3Server, script: &str) -> String {
    let prelude = format!(
        "import boto3, json\ns3 = boto3.client('s3', endpoint_url='{}', region_name='us-east-1', aws_access_key_id='cbtvault-test', aws_secret_access_key='cbtvault-test-secret')\n",
        server.endpoint()
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(prelude + script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "boto3 script failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// docs/cli.md, append-only repositories: an append-only repository in a
/// bucket under S3 Object Lock (default retention, compliance mode), on
/// moto.
/// cbtvault's uploads carry what the store requires of a write there
/// (Content-MD5 beside the SHA-256), backups and restores work, and the
/// store itself refuses to delete any version of a pack or manifest.
#[test]
fn an_append_only_repository_in_an_object_lock_bucket_works_and_its_packs_cannot_be_deleted() {
    let s = Scratch::new();
    let server = S3Server::start();
    boto3(
        &server,
        "s3.create_bucket(Bucket='locked', ObjectLockEnabledForBucket=True)\n\
         s3.put_object_lock_configuration(Bucket='locked', ObjectLockConfiguration={'ObjectLockEnabled': 'Enabled', 'Rule': {'DefaultRetention': {'Mode': 'COMPLIANCE', 'Days': 1}}})\n",
    );
    // Through a proxy that spoils nothing: it sees what each upload carries.
    let proxy = FaultProxy::failing_parts(server.port, PartFaults::default());
    let url = format!("s3://locked/r?endpoint=http://127.0.0.1:{}", proxy.port);
    // Packs of 4 MiB, each one PUT: moto 5.2.1 gives an object made by a
    // multipart upload no retention (its CompleteMultipartUpload ignores
    // the bucket's default), where AWS retains every new version.
    ok(&s, &url, &["init", "--append-only", "--pack-size-mib", "4"]);
    let image = s.image("disk.img", 40, 31);
    let source = format!("file:{}", image.display());
    let full = backup(&s, &url, &source, None);
    let first = s.path("first.img");
    std::fs::copy(&image, &first).unwrap();
    let (_, bitmap) = s.churn(&image, 0.05, 32, "c.b64");
    let next = backup(&s, &url, &source, Some(&bitmap));
    assert_eq!(next["parent"], full["id"], "{next}");
    assert_same_file(&first, &restore(&s, &url, &id(&full), "r1.img"));
    assert_same_file(&image, &restore(&s, &url, &id(&next), "r2.img"));
    // moto refuses a write there without Content-MD5 (or an algorithm
    // header), so these went through because of it; and each carried its
    // SHA-256 too.
    let uploads = proxy.uploads();
    assert!(
        uploads.puts > 10 && uploads.with_checksums == uploads.puts,
        "{uploads:?}"
    );

    // The store's side: every version of every pack and manifest is under
    // the default retention; deleting one (by its version id, which is
    // what erases data in a versioned bucket) is refused.
    let report = boto3(
        &server,
        r#"
out = []
for prefix in ['r/packs/', 'r/manifests/']:
    for v in s3.list_object_versions(Bucket='locked', Prefix=prefix).get('Versions', []):
        h = s3.head_object(Bucket='locked', Key=v['Key'], VersionId=v['VersionId'])
        try:
            s3.delete_object(Bucket='locked', Key=v['Key'], VersionId=v['VersionId'])
            refused = None
        except s3.exceptions.ClientError as e:
            refused = e.response['Error']['Code']
        out.append({'key': v['Key'], 'mode': h.get('ObjectLockMode'), 'refused': refused})
print(json.dumps(out))
"#,
    );
    let versions: Vec<Value> = serde_json::from_str(&report).unwrap();
    let packs = versions
        .iter()
        .filter(|v| v["key"].as_str().unwrap().starts_with("r/packs/"))
        .count();
    assert!(packs >= 2 && versions.len() >= packs + 2, "{versions:#?}");
    for v in &versions {
        assert_eq!(v["mode"], "COMPLIANCE", "{v}");
        assert_eq!(v["refused"], "AccessDenied", "{v}");
    }
    eprintln!(
        "{} uploads, all with checksums; {} object versions, every deletion refused",
        uploads.puts,
        versions.len()
    );

    // Nothing was lost: both restore points restore, verify passes.
    assert_same_file(&image, &restore(&s, &url, &id(&next), "r3.img"));
    ok(&s, &url, &["verify", "--read-data"]);
}
