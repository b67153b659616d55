//! The `xapi-sim` binary: serving, control commands, a graceful stop on
//! SIGTERM, and a restart that keeps the pool.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use cbtvault_xenapi::{TransportChoice, Value};

use super::common::{PASSWORD, blocks, client_for};

const BIN: &str = env!("CARGO_BIN_EXE_xapi-sim");

struct Running {
    child: Child,
    endpoints: serde_json::Value,
}

impl Drop for Running {
    fn drop(&mut self) {
        // Only our own child, by its pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(state: &Path, extra: &[&str]) -> Running {
    let mut child = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--nbd-listen",
            "127.0.0.1:0",
            "--state",
        ])
        .arg(state)
        .args(["--password", PASSWORD, "--disk-size-mib", "4"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("xapi-sim starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("endpoint line");
    let endpoints: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad endpoint line {line:?}: {e}"));
    Running { child, endpoints }
}

fn control(url: &str, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .args(["--url", url, "--password", PASSWORD])
        .output()
        .expect("xapi-sim control runs");
    assert!(
        out.status.success(),
        "xapi-sim {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn terminate(mut running: Running) {
    let pid = i32::try_from(running.child.id()).expect("pid");
    // SAFETY: sending a signal to our own child process.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = running.child.wait().expect("wait");
    assert!(status.success(), "graceful stop, got {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_control_stop_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let running = serve(&state, &["--vms", "3"]);
    let url = running.endpoints["http"].as_str().unwrap().to_owned();
    assert!(
        running.endpoints["https"]
            .as_str()
            .unwrap()
            .starts_with("https://127.0.0.1:")
    );
    assert!(running.endpoints["nbd"].as_str().is_some());
    assert!(Path::new(running.endpoints["certificate"].as_str().unwrap()).exists());

    let listing: serde_json::Value = serde_json::from_str(&control(&url, &["list"])).unwrap();
    let vms = listing["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 4, "dom0 and three VMs");
    let vdi = listing["vdis"][0]["vdi"].as_str().unwrap().to_owned();
    assert_eq!(listing["vdis"][0]["virtual_size"], 4 << 20);

    let c = client_for(&url, TransportChoice::XmlRpc).await;
    let vdi_ref = c.vdi().get_by_uuid(&vdi).await.unwrap();
    c.vdi().enable_cbt(&vdi_ref).await.unwrap();
    let s1 = c
        .vdi()
        .snapshot(&vdi_ref, &Default::default())
        .await
        .unwrap();
    let churned: serde_json::Value = serde_json::from_str(&control(
        &url,
        &["churn", "--vdi", &vdi, "--blocks", "5", "--seed", "11"],
    ))
    .unwrap();
    let mut expected: Vec<u64> = churned["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap())
        .collect();
    assert_eq!(expected.len(), 5);
    control(
        &url,
        &["write", "--vdi", &vdi, "--block", "0", "--block", "1"],
    );
    expected.extend([0, 1]);
    expected.sort_unstable();
    expected.dedup();
    let s2 = c
        .vdi()
        .snapshot(&vdi_ref, &Default::default())
        .await
        .unwrap();
    let changed = c.vdi().list_changed_blocks(&s1, &s2).await.unwrap();
    assert_eq!(blocks(&changed, 4 << 20), expected);

    // Faults through the binary.
    control(&url, &["fault", "expire-sessions"]);
    c.vdi().get_record(&s2).await.unwrap(); // re-login is transparent
    let s3 = c
        .vdi()
        .snapshot(&vdi_ref, &Default::default())
        .await
        .unwrap();
    control(
        &url,
        &["fault", "cbt-bypass", "--vdi", &vdi, "--offset", "65536"],
    );
    let s4 = c
        .vdi()
        .snapshot(&vdi_ref, &Default::default())
        .await
        .unwrap();
    let changed = c.vdi().list_changed_blocks(&s3, &s4).await.unwrap();
    assert!(
        blocks(&changed, 4 << 20).is_empty(),
        "the bypass is untracked"
    );
    let read = c
        .call(
            "sim.read",
            vec![
                Value::String(s4.as_str().to_string()),
                Value::Int(65536),
                Value::Int(4),
            ],
        )
        .await
        .unwrap();
    assert_eq!(read.as_str(), Some("WlpaWg=="), "but written (0x5a × 4)");
    control(&url, &["fault", "cbt-disable", "--vdi", &vdi]);
    assert!(!c.vdi().get_cbt_enabled(&vdi_ref).await.unwrap());
    control(
        &url,
        &["resize", "--vdi", &vdi, "--size", &(8u64 << 20).to_string()],
    );
    assert_eq!(
        c.vdi().get_record(&vdi_ref).await.unwrap().virtual_size,
        8 << 20
    );
    control(&url, &["unplug", "--vdi", &vdi]);
    c.vdi().destroy(&s1).await.unwrap();
    control(&url, &["fault", "clear"]);

    terminate(running);

    // Restart: same pool, VDIs and CBT chain.
    let running = serve(&state, &[]);
    let url = running.endpoints["http"].as_str().unwrap().to_owned();
    let c = client_for(&url, TransportChoice::JsonRpc).await;
    let rec = c.vdi().get_record(&vdi_ref).await.unwrap();
    assert_eq!(rec.uuid, vdi);
    assert_eq!(rec.virtual_size, 8 << 20);
    assert!(c.vdi().get_record(&s2).await.unwrap().cbt_enabled);
    assert_eq!(
        c.vm().get_all_records().await.unwrap().len(),
        4,
        "dom0 and three VMs"
    );
    terminate(running);
}

#[test]
fn help_documents_the_control_surface() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--nbd-listen",
        "--state",
        "host-cert.pem",
        "churn",
        "fault",
        "expire-sessions",
    ] {
        assert!(text.contains(needle), "--help lacks {needle}:\n{text}");
    }
}
