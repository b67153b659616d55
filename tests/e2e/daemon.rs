//! Issue 10: `cbtvault daemon` as a real process against a simulated pool,
//! with schedules seconds apart: runs happen and are recorded, HTTP answers,
//! `cbtvault run` asks for a run, a broken configuration on SIGHUP keeps
//! the old one running, SIGTERM stops cleanly, and a failed run reaches the
//! webhook.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;
use crate::xen::Pool;

/// A simulated pool of `vms` VMs of one disk each, whose `VDI.data_destroy`
/// waits for a closed NBD connection's VBD to go as long as xapi does (4 s):
/// the shared helper's 500 ms makes a snapshot's cleanup after SIGTERM
/// fail on a loaded machine, which is a test artefact, not a leftover.
fn start_pool(s: &Scratch, vms: usize) -> Pool {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut config = cbtvault_xapi_sim::SimConfig::new(s.path("pool"), "pool-secret");
    config.pool = cbtvault_xapi_sim::PoolSpec {
        vms,
        disks_per_vm: 1,
        disk_size: 32 << 20,
        initial_blocks: 40,
    };
    let sim = rt
        .block_on(cbtvault_xapi_sim::Simulator::start(config))
        .expect("simulator");
    let password = s.path("pool.password");
    std::fs::write(&password, "pool-secret\n").unwrap();
    let pin = s.path("pool.pem");
    std::fs::write(&pin, sim.certificate_pem()).unwrap();
    Pool {
        sim: Some(sim),
        rt,
        password,
        pin,
    }
}

/// A free loopback port (bound, read, released).
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A configuration with the simulated pool, `[daemon]` on `port` plus
/// `daemon_extra`, and `jobs` (TOML `[[job]]` tables using pool "sim").
fn config(s: &Scratch, pool: &Pool, port: u16, daemon_extra: &str, jobs: &str) -> PathBuf {
    let url = pool.sim.as_ref().unwrap().https_url();
    let path = s.path("cbtvault.toml");
    let text = format!(
        r#"
[repository]
path = "{repo}"

[daemon]
listen = "127.0.0.1:{port}"
{daemon_extra}

[[pool]]
name = "sim"
url = "{url}"
password_file = "{password}"
pin = "{pin}"
{jobs}
"#,
        repo = s.repo().display(),
        password = pool.password.display(),
        pin = pool.pin.display(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// The daemon process; killed if a test fails before stopping it.
pub(crate) struct Daemon {
    child: Child,
    log: PathBuf,
    port: u16,
}

impl Daemon {
    pub(crate) fn start(s: &Scratch, config: &Path, port: u16) -> Daemon {
        Self::start_with(s, config, port, &[])
    }

    pub(crate) fn start_with(
        s: &Scratch,
        config: &Path,
        port: u16,
        env: &[(&str, &OsStr)],
    ) -> Daemon {
        let log = s.path("daemon.log");
        let child = s
            .command()
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .arg("daemon")
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let d = Daemon { child, log, port };
        d.wait_for("the daemon to answer /healthz", || {
            d.get("/healthz")
                .is_some_and(|(code, body)| code == 200 && body == "ok\n")
        });
        d
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until `done`; fails with the daemon's log.
    pub(crate) fn wait_for(&self, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !done() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `GET path`: status code and body, or `None` when nothing answers.
    pub(crate) fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .ok()?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        let code = head.split_whitespace().nth(1)?.parse().ok()?;
        // hyper sends small bodies with a length, not chunked.
        Some((code, body.to_string()))
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    /// SIGTERM, then the exit status (bounded).
    pub(crate) fn stop(&mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not stop; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub(crate) fn runs(s: &Scratch, job: &str) -> Vec<Value> {
    let out = s.ok(&["runs", "--json", "--job", job]);
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn the_daemon_runs_jobs_on_schedule_and_answers_over_http() {
    let s = Scratch::new();
    let pool = start_pool(&s, 2);
    let vdis = pool.vdis();
    let port = free_port();
    let jobs = format!(
        r#"
[[job]]
name = "nightly"
kind = "xenserver"
pool = "sim"
vdis = ["{a}"]
retries = 0
schedule = {{ cron = "*/3 * * * * *", timezone = "Europe/Paris" }}

[[job]]
name = "ondemand"
kind = "xenserver"
pool = "sim"
vdis = ["{b}"]
"#,
        a = vdis[0],
        b = vdis[1],
    );
    let config = config(&s, &pool, port, "", &jobs);
    let mut daemon = Daemon::start(&s, &config, port);
    assert!(
        daemon.log().contains(&format!("127.0.0.1:{port}")),
        "{}",
        daemon.log()
    );

    // Two scheduled runs, recorded and with their restore points.
    daemon.wait_for("two scheduled runs", || {
        runs(&s, "nightly")
            .iter()
            .filter(|r| r["outcome"] == "ok")
            .count()
            >= 2
    });
    let nightly = runs(&s, "nightly");
    assert_eq!(
        nightly[0]["report"]["disks"][0]["status"], "ok",
        "{nightly:?}"
    );
    let points: Vec<Value> = s
        .list()
        .into_iter()
        .filter(|p| {
            p["source"]["location"]
                .as_str()
                .is_some_and(|l| l.ends_with(&vdis[0]))
        })
        .collect();
    assert!(points.len() >= 2, "{points:?}");

    // `cbtvault run` asks the daemon for a run of an unscheduled job.
    let out = s.ok(&["run", "--config", config.to_str().unwrap(), "ondemand"]);
    assert!(out.contains("job ondemand started"), "{out}");
    daemon.wait_for("the asked-for run", || {
        runs(&s, "ondemand")
            .first()
            .is_some_and(|r| r["outcome"] == "ok")
    });
    let unknown = s.fails(&["run", "--config", config.to_str().unwrap(), "nope"]);
    assert!(unknown.contains("nightly, ondemand"), "{unknown}");

    // /metrics parses as Prometheus text and counts the runs.
    let (code, metrics) = daemon.get("/metrics").unwrap();
    assert_eq!(code, 200);
    let mut samples = std::collections::HashMap::new();
    for line in metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad sample {line:?}"));
        samples.insert(name.to_string(), value);
    }
    assert!(
        samples["cbtvault_job_runs_total{job=\"nightly\"}"] >= 2.0,
        "{metrics}"
    );
    assert!(
        samples["cbtvault_bytes_read_total{job=\"nightly\"}"] > 0.0,
        "{metrics}"
    );
    assert!(samples["cbtvault_repository_size_bytes"] > 0.0, "{metrics}");
    assert!(
        samples
            .keys()
            .any(|k| k.starts_with("cbtvault_disk_last_success_timestamp_seconds{")),
        "{metrics}"
    );

    // /status is `cbtvault status --json` with what only the daemon knows.
    let (code, status) = daemon.get("/status").unwrap();
    assert_eq!(code, 200);
    let status: Value = serde_json::from_str(&status).unwrap();
    let job = &status["jobs"][0];
    assert_eq!(job["job"], "nightly");
    assert_eq!(job["time_zone"], "Europe/Paris");
    assert!(job["next_run"].is_string(), "{status}");
    assert!(status["repository"]["size_bytes"].as_u64().unwrap() > 0);
    let offline: Value =
        serde_json::from_str(&s.ok(&["status", "--json", "--config", config.to_str().unwrap()]))
            .unwrap();
    assert_eq!(offline["jobs"][1]["last_run"]["outcome"], "ok", "{offline}");

    // A broken configuration on SIGHUP is logged; the old one runs on.
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        good.replace("retries = 0", "retries = 0\nretires = 1"),
    )
    .unwrap();
    daemon.signal(libc::SIGHUP);
    daemon.wait_for("the reload to be refused", || {
        daemon.log().contains("configuration not reloaded")
    });
    let log = daemon.log();
    let refused = log
        .lines()
        .find(|l| l.contains("configuration not reloaded"))
        .unwrap();
    assert!(
        refused.contains(config.to_str().unwrap())
            && refused.contains("line ")
            && refused.contains("unknown key \"retires\""),
        "{refused}"
    );
    assert_eq!(daemon.get("/healthz").map(|r| r.0), Some(200));
    let before = runs(&s, "nightly").len();
    daemon.wait_for("a run after the refused reload", || {
        runs(&s, "nightly").len() > before
    });

    // A good one is taken: a job scheduled by the reload runs.
    let added = good.replace(
        "name = \"ondemand\"",
        "name = \"ondemand\"\nschedule = { cron = \"*/2 * * * * *\" }",
    );
    std::fs::write(&config, added).unwrap();
    daemon.signal(libc::SIGHUP);
    daemon.wait_for("a run scheduled by the reload", || {
        daemon.log().contains("configuration reloaded") && runs(&s, "ondemand").len() >= 2
    });

    // SIGTERM: a clean exit, and no snapshot left holding data.
    let status = daemon.stop();
    assert!(status.success(), "{status:?}; log:\n{}", daemon.log());
    assert!(daemon.log().contains("daemon stopped"), "{}", daemon.log());
    assert!(
        pool.data_snapshots().is_empty(),
        "{:?}",
        pool.data_snapshots()
    );
    let gone = s.fails(&["run", "--config", config.to_str().unwrap(), "nightly"]);
    assert!(gone.contains("no daemon answers at 127.0.0.1:"), "{gone}");
}

/// An HTTP server on loopback that hands every POST body to the channel.
fn webhook_server() -> (u16, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let mut reader = BufReader::new(&stream);
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_ok() {
                let _ = (&stream).write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
                if tx
                    .send(String::from_utf8_lossy(&body).into_owned())
                    .is_err()
                {
                    return;
                }
            }
        }
    });
    (port, rx)
}

#[test]
fn a_failed_run_reaches_the_webhook() {
    let s = Scratch::new();
    let pool = start_pool(&s, 1);
    let (hook_port, bodies) = webhook_server();
    let port = free_port();
    let missing = "00000000-0000-4000-8000-000000000000";
    let jobs = format!(
        r#"
[[job]]
name = "broken"
kind = "xenserver"
pool = "sim"
vdis = ["{missing}"]
retries = 0
schedule = {{ cron = "*/2 * * * * *" }}
"#
    );
    let config = config(
        &s,
        &pool,
        port,
        &format!("webhook = \"http://127.0.0.1:{hook_port}/hook\""),
        &jobs,
    );
    let mut daemon = Daemon::start(&s, &config, port);
    let body = bodies
        .recv_timeout(Duration::from_secs(120))
        .unwrap_or_else(|_| panic!("no webhook; log:\n{}", daemon.log()));
    let report: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["job"], "broken", "{report}");
    assert_eq!(report["outcome"], "failed", "{report}");
    assert!(
        body.contains(missing),
        "the report names the disk: {report}"
    );
    assert!(daemon.stop().success(), "{}", daemon.log());
    let history = runs(&s, "broken");
    assert!(
        history.iter().all(|r| r["outcome"] == "failed"),
        "{history:?}"
    );
}

/// An HTTPS server for webhooks, with a certificate for 127.0.0.1 made
/// now; returns its port, the CA file to trust, and the bodies received.
fn https_webhook_server(s: &Scratch) -> (u16, PathBuf, mpsc::Receiver<String>) {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let ca = s.path("webhook-ca.pem");
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .unwrap();
    let config = std::sync::Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
                continue;
            };
            let mut tls = rustls::StreamOwned::new(conn, stream);
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            // Up to the blank line that ends the headers.
            while !head.ends_with(b"\r\n\r\n") {
                match tls.read(&mut byte) {
                    Ok(1) => head.push(byte[0]),
                    _ => break,
                }
            }
            let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0usize);
            let mut body = vec![0; length];
            if tls.read_exact(&mut body).is_ok() {
                let _ = tls.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
                let _ = tls.flush();
                if tx
                    .send(String::from_utf8_lossy(&body).into_owned())
                    .is_err()
                {
                    return;
                }
            }
        }
    });
    (port, ca, rx)
}

/// A webhook over HTTPS, its certificate checked against `webhook_ca`.
#[test]
fn a_failed_run_reaches_an_https_webhook() {
    let s = Scratch::new();
    let pool = start_pool(&s, 1);
    let (hook_port, ca, bodies) = https_webhook_server(&s);
    let port = free_port();
    let missing = "00000000-0000-4000-8000-000000000000";
    let jobs = format!(
        r#"
[[job]]
name = "broken"
kind = "xenserver"
pool = "sim"
vdis = ["{missing}"]
retries = 0
schedule = {{ cron = "*/2 * * * * *" }}
"#
    );
    let config = config(
        &s,
        &pool,
        port,
        &format!(
            "webhook = \"https://127.0.0.1:{hook_port}/hook\"\nwebhook_ca = \"{}\"",
            ca.display()
        ),
        &jobs,
    );
    let mut daemon = Daemon::start(&s, &config, port);
    let body = bodies
        .recv_timeout(Duration::from_secs(120))
        .unwrap_or_else(|_| panic!("no webhook over https; log:\n{}", daemon.log()));
    let report: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["job"], "broken", "{report}");
    assert_eq!(report["outcome"], "failed", "{report}");
    assert!(daemon.stop().success(), "{}", daemon.log());
}

/// A job never overlaps itself, SIGTERM in the middle of its transfer
/// leaves nothing behind, and the restarted daemon resumes the transfer.
#[test]
fn sigterm_mid_transfer_stops_cleanly_and_the_restarted_daemon_resumes() {
    let s = Scratch::new();
    let pool = start_pool(&s, 1);
    let vdis = pool.vdis();
    let port = free_port();
    // Slowed so that the transfer is still going when SIGTERM comes.
    let jobs = format!(
        r#"
[[job]]
name = "slow"
kind = "xenserver"
pool = "sim"
vdis = ["{}"]
bandwidth = "64K"
schedule = {{ cron = "* * * * * *" }}
"#,
        vdis[0]
    );
    let config = config(&s, &pool, port, "", &jobs);
    let mut daemon = Daemon::start(&s, &config, port);
    // Every second, and slowed: the next times come while the run goes on.
    daemon.wait_for("a scheduled time skipped for the running job", || {
        daemon
            .log()
            .contains("scheduled run skipped: the previous run is still going")
    });
    // Reading over NBD: the snapshot is taken and known to the daemon.
    daemon.wait_for("the running backup's transfer", || {
        pool.sim().nbd_connections() > 0
    });
    // /status shows the disk's progress.
    let mut disk = Value::Null;
    daemon.wait_for("the running disk in /status", || {
        let Some((200, text)) = daemon.get("/status") else {
            return false;
        };
        let status: Value = serde_json::from_str(&text).unwrap();
        assert!(status["jobs"][0]["running_since"].is_string(), "{status}");
        disk = status["jobs"][0]["running_disks"][0].clone();
        // Some blocks read, for the restart to resume from.
        disk["done_bytes"].as_u64().is_some_and(|d| d >= 4 << 16)
    });
    assert!(
        disk["done_bytes"].as_u64().unwrap() < disk["total_bytes"].as_u64().unwrap(),
        "{disk}"
    );
    let status = daemon.stop();
    assert!(status.success(), "{status:?}; log:\n{}", daemon.log());
    assert!(
        pool.data_snapshots().is_empty(),
        "{:?}; log:\n{}",
        pool.data_snapshots(),
        daemon.log()
    );
    let history = runs(&s, "slow");
    assert_eq!(history.len(), 1, "{history:?}");
    assert_ne!(history[0]["outcome"], "ok", "{history:?}");
    assert!(s.list().is_empty(), "nothing partial is committed");

    // Restarted without the bandwidth limit, the daemon resumes: the
    // blocks the stopped run read are kept, not read again.
    let config = self::config(
        &s,
        &pool,
        port,
        "",
        &jobs.replace("bandwidth = \"64K\"\n", ""),
    );
    let mut daemon = Daemon::start(&s, &config, port);
    daemon.wait_for("two runs of the restarted daemon", || s.list().len() >= 2);
    assert!(daemon.stop().success(), "{}", daemon.log());
    let points = s.list();
    let repo = s.repo();
    let show = |rp: &Value| -> Value {
        let id = rp["id"].as_str().unwrap();
        serde_json::from_str(&s.ok(&["show", "--json", "--repo", repo.to_str().unwrap(), id]))
            .unwrap()
    };
    let resumed = show(&points[0]);
    let kept: u64 = resumed["source"]["details"]["resumed_blocks"]
        .as_str()
        .unwrap_or_else(|| panic!("not resumed: {resumed}\n{}", daemon.log()))
        .parse()
        .unwrap();
    assert!(kept >= 1, "{resumed}");
    assert_eq!(resumed["mode"]["kind"], "full", "still the first backup");
    assert_same_file(
        &pool.copy_disk(&s, &vdis[0], "disk.img"),
        &s.restore(points[0]["id"].as_str().unwrap(), "resumed.img"),
    );
    assert_eq!(show(&points[1])["mode"]["kind"], "incremental");
    assert!(
        pool.data_snapshots().is_empty(),
        "{:?}",
        pool.data_snapshots()
    );
}

/// A scheduled time that passed while the daemon was down is run once at
/// start with `catch_up`, and not without it.
#[test]
fn a_missed_run_is_caught_up_at_start() {
    let s = Scratch::new();
    let pool = start_pool(&s, 1);
    let vdis = pool.vdis();
    let port = free_port();
    let job = |schedule: &str, catch_up: bool| {
        format!(
            r#"
[[job]]
name = "nightly"
kind = "xenserver"
pool = "sim"
vdis = ["{}"]
schedule = {{ cron = "{schedule}", timezone = "UTC" }}
catch_up = {catch_up}
"#,
            vdis[0]
        )
    };
    // One run to have a last run time.
    let config_path = config(&s, &pool, port, "", &job("* * * * * *", false));
    let mut daemon = Daemon::start(&s, &config_path, port);
    daemon.wait_for("a first run", || !runs(&s, "nightly").is_empty());
    assert!(daemon.stop().success());
    let last: jiff::Timestamp = runs(&s, "nightly")[0]["started"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let count = runs(&s, "nightly").len();
    // A once-a-year schedule whose time fell 2 s after that run.
    let missed = last
        .checked_add(jiff::SignedDuration::from_secs(2))
        .unwrap()
        .to_zoned(jiff::tz::TimeZone::UTC);
    let yearly = format!(
        "{} {} {} {} {} *",
        missed.second(),
        missed.minute(),
        missed.hour(),
        missed.day(),
        missed.month()
    );
    while jiff::Timestamp::now() <= missed.timestamp() {
        std::thread::sleep(Duration::from_millis(100));
    }

    // Without catch_up: nothing runs.
    config(&s, &pool, port, "", &job(&yearly, false));
    let mut daemon = Daemon::start(&s, &config_path, port);
    assert!(daemon.stop().success());
    assert_eq!(runs(&s, "nightly").len(), count);

    // With it: one run at start.
    config(&s, &pool, port, "", &job(&yearly, true));
    let mut daemon = Daemon::start(&s, &config_path, port);
    daemon.wait_for("the catch-up run", || runs(&s, "nightly").len() > count);
    assert!(daemon.log().contains("catching up"), "{}", daemon.log());
    assert!(daemon.stop().success());
    assert_eq!(runs(&s, "nightly").len(), count + 1);
    assert_eq!(runs(&s, "nightly")[0]["outcome"], "ok");
}

/// `[[maintenance]]`: verify on a schedule, gc when asked for; both in the
/// history and the status, and with `webhook_on = "always"` at the webhook.
#[test]
fn maintenance_tasks_run_on_their_schedules() {
    let s = Scratch::new();
    let image = s.image("d.img", 4, 1);
    s.backup("d0", &image, None);
    let (hook_port, bodies) = webhook_server();
    let port = free_port();
    let config = s.path("cbtvault.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[repository]
path = "{}"

[daemon]
listen = "127.0.0.1:{port}"
webhook = "http://127.0.0.1:{hook_port}/"
webhook_on = "always"

[[maintenance]]
name = "check"
task = "verify"
read_data = true
schedule = {{ cron = "*/2 * * * * *" }}

[[maintenance]]
name = "weekly-gc"
task = "gc"
schedule = {{ at = "05:00", days = ["sun"] }}
"#,
            s.repo().display()
        ),
    )
    .unwrap();
    let mut daemon = Daemon::start(&s, &config, port);
    daemon.wait_for("a scheduled verify", || !runs(&s, "check").is_empty());
    let verify = &runs(&s, "check")[0];
    assert_eq!(verify["outcome"], "ok", "{verify}");
    assert_eq!(
        verify["report"]["result"]["verify"]["restore_points"], 1,
        "{verify}"
    );
    assert!(
        verify["report"]["result"]["verify"]["bytes_read"]
            .as_u64()
            .unwrap()
            > 0
    );
    let told: Value = serde_json::from_str(
        &bodies
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("no webhook; log:\n{}", daemon.log())),
    )
    .unwrap();
    assert_eq!(told["job"], "check", "{told}");
    assert_eq!(told["outcome"], "ok", "{told}");

    s.ok(&["run", "--config", config.to_str().unwrap(), "weekly-gc"]);
    daemon.wait_for("the asked-for gc", || !runs(&s, "weekly-gc").is_empty());
    let gc = &runs(&s, "weekly-gc")[0];
    assert_eq!(gc["outcome"], "ok", "{gc}");
    assert!(gc["report"]["result"]["gc"].is_object(), "{gc}");

    let (_, status) = daemon.get("/status").unwrap();
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["jobs"][1]["task"], "gc", "{status}");
    assert!(status["jobs"][1]["next_run"].is_string(), "{status}");
    assert!(daemon.stop().success(), "{}", daemon.log());
    assert_eq!(s.list().len(), 1);
}

/// Under systemd (`Type=notify`): READY once serving, the watchdog fed,
/// STOPPING on SIGTERM.
#[test]
fn systemd_is_told_ready_and_stopping_and_the_watchdog_is_fed() {
    let s = Scratch::new();
    let socket_path = s.path("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let port = free_port();
    let config = s.path("cbtvault.toml");
    std::fs::write(
        &config,
        format!(
            "[repository]\npath = \"{}\"\n[daemon]\nlisten = \"127.0.0.1:{port}\"\n",
            s.repo().display()
        ),
    )
    .unwrap();
    let mut daemon = Daemon::start_with(
        &s,
        &config,
        port,
        &[
            ("NOTIFY_SOCKET", socket_path.as_os_str()),
            // 2 s: the daemon pings every second.
            ("WATCHDOG_USEC", OsStr::new("2000000")),
        ],
    );
    let mut seen = String::new();
    let mut buf = [0u8; 512];
    while !(seen.contains("READY=1") && seen.matches("WATCHDOG=1").count() >= 2) {
        let n = socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("{e}; got {seen:?}; log:\n{}", daemon.log()));
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(daemon.stop().success(), "{}", daemon.log());
    while !seen.contains("STOPPING=1") {
        let n = socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("{e}; got {seen:?}"));
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}
