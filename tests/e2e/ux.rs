//! What a user sees: output into a closed pipe, `serve` on sockets and
//! beyond loopback, plain HTTP to XenServer refused, one JSON schema per
//! command with errors as JSON, and error messages that say what to do.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use cbtvault_xapi_sim::{PoolSpec, SimConfig, Simulator};
use serde_json::Value;

use crate::common::*;

/// A repository with one backup of disk `d0` (from `d0.img`); its id.
fn with_one_backup() -> (Scratch, String) {
    let s = Scratch::new();
    let image = s.image("d0.img", 1, 7);
    let rp = s.backup("d0", &image, None);
    (s, id(&rp))
}

/// Runs cbtvault with stdout a pipe whose reader has gone, as `| head -1`
/// leaves it once head has its line.
fn into_closed_pipe(s: &Scratch, args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    s.command()
        .args(args)
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn output_into_a_closed_pipe_is_no_panic() {
    let (s, rp) = with_one_backup();
    let source = format!("file:{}", s.path("d0.img").display());
    let commands: [&[&str]; 7] = [
        &["list"],
        &["list", "--json"],
        &["show", &rp],
        &["show", "--json", &rp],
        &["verify"],
        &["diff", &rp, &rp],
        &["backup", "--json", "--disk", "d0", "--source", &source],
    ];
    for args in commands {
        let out = into_closed_pipe(&s, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        // The reader left; nothing went wrong here: quiet, and success.
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
    // The backup committed although nobody read what it printed.
    assert_eq!(s.list().len(), 2);
}

#[test]
fn output_lost_to_a_full_disk_is_an_error() {
    let (s, _) = with_one_backup();
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = s.command().arg("list").stdout(full).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("writing to standard output failed") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

/// A running `cbtvault serve` and the lines it writes on stderr; killed
/// when dropped.
struct Serving {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Serving {
    fn start(s: &Scratch, args: &[&str]) -> Serving {
        let mut child = s
            .command()
            .arg("serve")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Serving { child, lines }
    }

    /// The lines up to and including the first that `stop` accepts.
    fn lines_until(&self, stop: impl Fn(&str) -> bool) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            match self.lines.recv_timeout(Duration::from_secs(20)) {
                Ok(line) => {
                    let done = stop(&line);
                    seen.push(line);
                    if done {
                        return seen;
                    }
                }
                Err(_) => panic!("serve said {seen:?} and then nothing more"),
            }
        }
    }

    /// Waits for the "serving" line; returns the lines before it and the
    /// address it names.
    fn ready(&self) -> (Vec<String>, String) {
        let mut lines = self.lines_until(|l| l.starts_with("serving restore point"));
        let line = lines.pop().unwrap();
        let address = line
            .split(" on ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .unwrap()
            .to_string();
        (lines, address)
    }

    /// Sends `signal` and expects a clean exit.
    fn stop(mut self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "serve exited with {status} on signal {signal}"
        );
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Something serves NBD on `sock` (it greets with NBDMAGIC).
fn assert_nbd_on(sock: &Path) {
    let mut stream = std::os::unix::net::UnixStream::connect(sock).unwrap();
    let mut magic = [0u8; 8];
    stream.read_exact(&mut magic).unwrap();
    assert_eq!(&magic, b"NBDMAGIC");
}

#[test]
fn serve_on_a_unix_socket_cleans_up_and_a_stale_socket_does_not_block() {
    let (s, rp) = with_one_backup();
    let sock = s.path("rp.sock");
    let listen = format!("unix:{}", sock.display());
    let args = [rp.as_str(), "--listen", &listen];
    // Stopped by SIGTERM or ctrl-c, the server removes its socket.
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let srv = Serving::start(&s, &args);
        srv.ready();
        assert_nbd_on(&sock);
        srv.stop(signal);
        assert!(!sock.exists(), "the socket outlived the server ({signal})");
    }
    // A killed server leaves its socket behind; the next one replaces it.
    let srv = Serving::start(&s, &args);
    srv.ready();
    drop(srv);
    assert!(sock.exists());
    let srv = Serving::start(&s, &args);
    srv.ready();
    assert_nbd_on(&sock);
    // A live server's socket is not taken over.
    let err = s.fails(&["serve", &rp, "--listen", &listen]);
    assert!(
        err.contains(&format!(
            "another server is listening on {}",
            sock.display()
        )),
        "{err}"
    );
    assert_nbd_on(&sock);
    srv.stop(libc::SIGTERM);
    // Nor is a file that is not a socket.
    std::fs::write(&sock, "keep me").unwrap();
    let err = s.fails(&["serve", &rp, "--listen", &listen]);
    assert!(err.contains("exists and is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&sock).unwrap(), "keep me");
}

#[test]
fn serve_announces_itself_only_once_it_listens() {
    let (s, rp) = with_one_backup();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let err = s.fails(&["serve", &rp, "--listen", &addr]);
    assert!(!err.contains("serving"), "{err}");
    assert!(err.contains(&format!("listening on {addr}")), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// A self-signed certificate for localhost and its key, made by openssl.
fn certificate(s: &Scratch, name: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        s.path(&format!("{name}.pem")),
        s.path(&format!("{name}.key")),
    );
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:P-256", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl must be installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// The certificate's SHA-256 fingerprint as openssl prints it (AB:CD:…).
fn fingerprint(cert: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(cert)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    text.trim().rsplit('=').next().unwrap().to_string()
}

#[test]
fn serving_in_clear_beyond_loopback_warns() {
    let (s, rp) = with_one_backup();
    let (cert, key) = certificate(&s, "server");
    let tls = [
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    let warned = |lines: &[String]| {
        lines
            .iter()
            .any(|l| l.contains("WARNING: serving without TLS"))
    };
    for (listen, with_tls, expect_warning) in [
        ("0.0.0.0:0", false, true),
        ("127.0.0.1:0", false, false),
        ("0.0.0.0:0", true, false),
    ] {
        let mut args = vec![rp.as_str(), "--listen", listen];
        if with_tls {
            args.extend(tls);
        }
        let srv = Serving::start(&s, &args);
        let (before, _) = srv.ready();
        assert_eq!(
            warned(&before),
            expect_warning,
            "{listen} tls={with_tls}: {before:?}"
        );
    }
    // --quiet silences the chatter, not the warning.
    let srv = Serving::start(&s, &[rp.as_str(), "--quiet", "--listen", "0.0.0.0:0"]);
    let lines = srv.lines_until(|l| l.contains("WARNING"));
    assert!(
        lines
            .last()
            .unwrap()
            .contains("anyone who can connect reads this disk")
    );
}

/// A simulated XenServer pool in this process.
struct Xen {
    sim: Option<Simulator>,
    rt: tokio::runtime::Runtime,
    password: PathBuf,
    pin: PathBuf,
}

impl Xen {
    fn start(s: &Scratch, vms: usize) -> Xen {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut config = SimConfig::new(s.path("pool"), "pool-secret");
        config.pool = PoolSpec {
            vms,
            disks_per_vm: 1,
            disk_size: 4 << 20,
            initial_blocks: 10,
        };
        config.data_destroy_timeout = Duration::from_millis(500);
        let sim = rt.block_on(Simulator::start(config)).expect("simulator");
        let (password, pin) = (s.path("pool.password"), s.path("pool.pem"));
        std::fs::write(&password, "pool-secret\n").unwrap();
        std::fs::write(&pin, sim.certificate_pem()).unwrap();
        Xen {
            sim: Some(sim),
            rt,
            password,
            pin,
        }
    }

    fn sim(&self) -> &Simulator {
        self.sim.as_ref().unwrap()
    }

    fn vdis(&self) -> Vec<String> {
        let mut v: Vec<String> = (self.sim().sim().vdis().into_iter())
            .filter(|v| !v.is_a_snapshot && v.vdi_type == "user")
            .map(|v| v.uuid)
            .collect();
        v.sort();
        v
    }

    /// `backup --xapi` over HTTPS with the right pin and password.
    fn backup_args(&self) -> Vec<String> {
        let url = self.sim().https_url();
        let pin = self.pin.to_str().unwrap();
        let password = self.password.to_str().unwrap();
        [
            "backup",
            "--xapi",
            &url,
            "--password-file",
            password,
            "--pin",
            pin,
        ]
        .map(String::from)
        .to_vec()
    }

    /// A configuration file for this pool with jobs `nightly` (every VDI)
    /// and `weekly`.
    fn config(&self, s: &Scratch) -> PathBuf {
        let vdis: Vec<String> = self.vdis().iter().map(|v| format!("{v:?}")).collect();
        let text = format!(
            "[repository]\npath = {repo:?}\n\n\
             [[pool]]\nname = \"sim\"\nurl = {url:?}\npassword_file = {pw:?}\npin = {pin:?}\n\n\
             [[job]]\nname = \"nightly\"\nkind = \"xenserver\"\npool = \"sim\"\nvdis = [{vdis}]\n\n\
             [[job]]\nname = \"weekly\"\nkind = \"xenserver\"\npool = \"sim\"\nvdis = [{vdis}]\n",
            repo = s.repo(),
            url = self.sim().https_url(),
            pw = self.password,
            pin = self.pin,
            vdis = vdis.join(", "),
        );
        let path = s.path("cbtvault.toml");
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Xen {
    fn drop(&mut self) {
        if let Some(sim) = self.sim.take() {
            self.rt.block_on(sim.shutdown());
        }
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn plain_http_to_xenserver_is_refused_before_anything_is_sent() {
    let s = Scratch::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let password = s.path("pw");
    std::fs::write(&password, "secret\n").unwrap();
    let pw = password.to_str().unwrap();
    let vdi = "6b9e2f1a-0c3d-4e5f-8a7b-9c0d1e2f3a4b";
    for args in [
        vec![
            "backup",
            "--xapi",
            &url,
            "--password-file",
            pw,
            "--vdi",
            vdi,
        ],
        vec![
            "restore",
            "abcd",
            "--to",
            "xapi",
            "--sr",
            vdi,
            "--xapi",
            &url,
            "--password-file",
            pw,
        ],
    ] {
        let err = s.fails(&args);
        assert!(
            err.contains(&format!(
                "refusing {url}/: plain HTTP would send the XenServer password"
            )) && err.contains("--allow-insecure-http"),
            "{err}"
        );
    }
    // The same pool in a configuration file: refused on loading, naming the key.
    let config = s.path("c.toml");
    std::fs::write(
        &config,
        format!(
            "[repository]\npath = \"repo\"\n[[pool]]\nname = \"lab\"\nurl = {url:?}\n\
             password_file = {pw:?}\n[[job]]\nname = \"j\"\nkind = \"xenserver\"\n\
             pool = \"lab\"\nvdis = [{vdi:?}]\n"
        ),
    )
    .unwrap();
    let err = s.fails(&["backup", "--config", config.to_str().unwrap(), "--job", "j"]);
    assert!(
        err.contains("is plain HTTP") && err.contains("allow_insecure_http = true"),
        "{err}"
    );
    // Nobody connected: the password never left.
    assert!(
        matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a connection reached the server"
    );
}

#[test]
fn plain_http_works_when_asked_for_and_warns() {
    let s = Scratch::new();
    let xen = Xen::start(&s, 1);
    let url = xen.sim().http_url();
    let vdi = &xen.vdis()[0];
    let out = s.run(&[
        "backup",
        "--json",
        "--xapi",
        &url,
        "--allow-insecure-http",
        "--password-file",
        xen.password.to_str().unwrap(),
        "--vdi",
        vdi,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("XenAPI over plain HTTP"), "{stderr}");
    the_restore_point(&String::from_utf8(out.stdout).unwrap());
}

/// `show --json` of `id`.
fn show(s: &Scratch, id: &str) -> Value {
    serde_json::from_str(&s.ok(&["show", "--json", id])).unwrap()
}

/// The JSON error object on the last line of stderr.
fn json_error(stderr: &[u8]) -> Value {
    let text = String::from_utf8_lossy(stderr);
    let last = text.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|_| panic!("not a JSON error: {text}"))
}

#[test]
fn backup_json_is_the_restore_point_schema_in_every_mode() {
    let s = Scratch::new();
    let xen = Xen::start(&s, 2);
    let vdis = xen.vdis();
    // From a file.
    let image = s.image("d0.img", 1, 3);
    let rp = s.backup("d0", &image, None);
    assert_eq!(rp, show(&s, &id(&rp)));
    // From a pool, two VDIs.
    let mut args = xen.backup_args();
    args.extend(["--json", "--vdi", &vdis[0], "--vdi", &vdis[1]].map(String::from));
    let out: Value = serde_json::from_str(&s.ok(&strs(&args))).unwrap();
    let points = out.as_array().unwrap();
    assert_eq!(points.len(), 2, "{out}");
    for rp in points {
        assert_eq!(rp, &show(&s, &id(rp)));
    }
    // From a job of a configuration file.
    let config = xen.config(&s);
    let config = config.to_str().unwrap();
    let out = s.ok(&["backup", "--json", "--config", config, "--job", "nightly"]);
    let out: Value = serde_json::from_str(&out).unwrap();
    let points = out.as_array().unwrap();
    assert_eq!(points.len(), 2, "{out}");
    for rp in points {
        assert_eq!(rp, &show(&s, &id(rp)));
    }
    // One disk fails: the other's restore point on stdout, one error on stderr.
    let missing = "00000000-0000-4000-8000-000000000000";
    let mut args = xen.backup_args();
    args.extend(["--json", "--vdi", &vdis[0], "--vdi", missing].map(String::from));
    let out = s.run(&strs(&args));
    assert_eq!(out.status.code(), Some(1));
    let committed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(committed.as_array().unwrap().len(), 1, "{committed}");
    let error = json_error(&out.stderr);
    assert_eq!(error["error"]["kind"], "partial", "{error}");
    assert_eq!(error["error"]["message"], "1 of 2 disks failed");
    let disks = error["error"]["disks"].as_array().unwrap();
    assert!(
        disks.len() == 1 && disks[0]["disk"].as_str().unwrap().contains(missing),
        "{error}"
    );
}

#[test]
fn show_prints_text_and_json_only_when_asked() {
    let (s, rp) = with_one_backup();
    let text = s.ok(&["show", &rp[..8]]);
    assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");
    for expected in [
        format!("restore point  {rp}"),
        "disk           d0".to_string(),
        "size           1.00 MiB (1048576 bytes)".to_string(),
        "mode           full".to_string(),
    ] {
        assert!(
            text.lines().any(|l| l == expected),
            "{expected:?} in\n{text}"
        );
    }
    assert_eq!(s.ok(&["show", "--quiet", &rp]), "");
    assert_eq!(show(&s, &rp)["id"], rp.as_str());
}

#[test]
fn errors_under_json_are_one_json_object_on_stderr() {
    let (s, _) = with_one_backup();
    let missing = s.path("missing.img");
    let missing = format!("file:{}", missing.display());
    let cases: [(&[&str], &str, i32); 7] = [
        (&["show", "beef"], "not-found", 1),
        (&["show", "b"], "usage", 1),
        (&["list", "--disk", "nope"], "not-found", 1),
        (&["list", "--repo", "/nonexistent/repo"], "not-found", 1),
        (
            &["backup", "--disk", "x", "--source", &missing],
            "not-found",
            1,
        ),
        (&["list", "--bogus"], "usage", 2),
        (&["restore", "d0@latest"], "usage", 2),
    ];
    for (args, kind, code) in cases {
        let plain = s.run(args);
        let json = s.run(&[args, &["--json"]].concat());
        assert_eq!(json.status.code(), Some(code), "{args:?}");
        assert_eq!(plain.status.code(), Some(code), "{args:?}");
        assert!(json.stdout.is_empty(), "{args:?}");
        let stderr = String::from_utf8_lossy(&json.stderr);
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        let v = json_error(&json.stderr);
        assert_eq!(v["error"]["kind"], kind, "{args:?}: {v}");
        let message = v["error"]["message"].as_str().unwrap();
        if code == 1 {
            // The same words as without --json.
            let plain = String::from_utf8_lossy(&plain.stderr);
            assert_eq!(plain.trim_end(), format!("cbtvault: error: {message}"));
        }
    }
    // verify: the report on stdout, the verdict as a JSON error.
    for pack in pack_files(&s.repo()) {
        std::fs::remove_file(pack).unwrap();
    }
    let out = s.run(&["verify", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!report["problems"].as_array().unwrap().is_empty());
    assert_eq!(json_error(&out.stderr)["error"]["kind"], "damaged");
}

#[test]
fn a_wrong_pin_is_told_once_with_the_fingerprint_and_the_pin_file() {
    let s = Scratch::new();
    let xen = Xen::start(&s, 1);
    let (other, _) = certificate(&s, "other");
    let served = s.path("served.pem");
    std::fs::write(&served, xen.sim().certificate_pem()).unwrap();
    let mut args = xen.backup_args();
    let pin = args.iter().position(|a| a == "--pin").unwrap() + 1;
    args[pin] = other.display().to_string();
    args.extend(["--vdi".into(), xen.vdis()[0].clone()]);
    let err = s.fails(&strs(&args));
    let expected = format!(
        "the server at {} presented a certificate with SHA-256 fingerprint {}, which does not match the pin in {} (SHA-256 {})",
        xen.sim().addr(),
        fingerprint(&served),
        other.display(),
        fingerprint(&other)
    );
    assert!(err.contains(&expected), "{expected}\nin\n{err}");
    assert_eq!(err.matches("presented").count(), 1, "{err}");
    assert!(!err.contains("OtherError"), "{err}");
    args.push("--json".into());
    assert_eq!(
        json_error(s.run(&strs(&args)).stderr.as_slice())["error"]["kind"],
        "tls"
    );
}

#[test]
fn a_wrong_pin_over_nbd_names_the_server_and_the_pin_file() {
    let (s, rp) = with_one_backup();
    let (cert, key) = certificate(&s, "server");
    let (other, _) = certificate(&s, "other");
    let (cert_arg, key_arg) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let srv = Serving::start(
        &s,
        &[
            &rp,
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert_arg,
            "--tls-key",
            key_arg,
        ],
    );
    let (_, address) = srv.ready();
    let source = format!("nbds://{address}/?tls-pin={}", other.display());
    let err = s.fails(&["backup", "--disk", "copy", "--source", &source]);
    let expected = format!(
        "the server at {address} presented a certificate with SHA-256 fingerprint {}, which does not match the pin in {}",
        fingerprint(&cert),
        other.display()
    );
    assert!(err.contains(&expected), "{expected}\nin\n{err}");
    assert_eq!(err.matches("presented").count(), 1, "{err}");
}

#[test]
fn a_refused_login_reads_as_words_once() {
    let s = Scratch::new();
    let xen = Xen::start(&s, 1);
    std::fs::write(&xen.password, "wrong\n").unwrap();
    let mut args = xen.backup_args();
    args.extend(["--vdi".into(), xen.vdis()[0].clone()]);
    let err = s.fails(&strs(&args));
    assert!(
        err.contains(
            "XenServer refused the login: wrong user name or password (SESSION_AUTHENTICATION_FAILED)"
        ),
        "{err}"
    );
    assert_eq!(
        err.matches("SESSION_AUTHENTICATION_FAILED").count(),
        1,
        "{err}"
    );
    args.push("--json".into());
    let v = json_error(&s.run(&strs(&args)).stderr);
    assert_eq!(v["error"]["kind"], "authentication", "{v}");
}

#[test]
fn a_wrong_job_name_lists_the_jobs() {
    let s = Scratch::new();
    let xen = Xen::start(&s, 1);
    let config = xen.config(&s);
    let err = s.fails(&[
        "backup",
        "--config",
        config.to_str().unwrap(),
        "--job",
        "nigthly",
    ]);
    assert!(
        err.contains("no job named \"nigthly\" in the configuration (jobs: nightly, weekly)"),
        "{err}"
    );
}

#[test]
fn restore_point_specs_that_name_nothing_say_why() {
    let (s, rp) = with_one_backup();
    for (spec, expected) in [
        (
            "b",
            "restore point prefix \"b\" is too short: give at least 4 characters",
        ),
        (
            "d0",
            "\"d0\" is a disk; give d0@latest for its newest restore point",
        ),
        (
            "vm1",
            "\"vm1\" is not a restore point id (ids are hexadecimal)",
        ),
        (
            "nope@latest",
            "no disk named \"nope\" in this repository (disks: d0)",
        ),
    ] {
        let err = s.fails(&["show", spec]);
        assert!(err.contains(expected), "{spec}: {err}");
    }
    assert_eq!(show(&s, &rp[..4])["id"], rp.as_str());
}

/// A child process killed when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_nbd_server_elsewhere_is_told_in_the_flags_words() {
    let s = Scratch::new();
    let dir = s.path("qsd");
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("disk.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let (qmp, nbd) = (dir.join("qmp.sock"), dir.join("nbd.sock"));
    // QEMU runs its one NBD server already, on nbd.sock.
    let _qsd = KillOnDrop(
        Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=disk,filename={}",
                image.display()
            ))
            .arg("--chardev")
            .arg(format!(
                "socket,id=qmp0,path={},server=on,wait=off",
                qmp.display()
            ))
            .args(["--monitor", "chardev=qmp0"])
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", nbd.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon (qemu-utils) must be installed"),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !(qmp.exists() && nbd.exists()) {
        assert!(
            std::time::Instant::now() < deadline,
            "qemu-storage-daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let elsewhere = dir.join("elsewhere.sock");
    let err = s.fails(&[
        "backup",
        "--disk",
        "vm1",
        "--node",
        "disk",
        "--source",
        &format!("qmp:{}", qmp.display()),
        "--nbd-socket",
        elsewhere.to_str().unwrap(),
    ]);
    assert!(
        err.contains(&format!(
            "QEMU already runs an NBD server, but not on {}",
            elsewhere.display()
        )) && err.contains("(give it with --nbd-socket PATH)"),
        "{err}"
    );
    assert!(!err.contains("DiskOptions"), "{err}");
}

/// `config check` loads a file as the daemon does: the example passes with
/// what it holds; a mistake is named with its file and line.
#[test]
fn config_check_names_what_a_file_holds_or_where_it_is_wrong() {
    let s = Scratch::new();
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../config/cbtvault.example.toml"
    );
    let out = s.ok(&["config", "check", example]);
    assert!(out.contains("ok:") && out.contains("jobs"), "{out}");
    let bad = s.path("bad.toml");
    std::fs::write(
        &bad,
        "[repository]\npath = \"r\"\n\n[[job]]\nname = \"j\"\nkind = \"qemu\"\nhost = \"nowhere\"\nnodes = [\"d\"]\n",
    )
    .unwrap();
    let err = s.fails(&["config", "check", bad.to_str().unwrap()]);
    assert!(err.contains("bad.toml") && err.contains("nowhere"), "{err}");
}
