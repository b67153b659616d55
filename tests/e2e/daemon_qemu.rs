//! Issue 10: the daemon against a real qemu-storage-daemon. Runs seconds
//! apart stay incremental and restore byte-exact; SIGTERM mid-transfer
//! leaves nothing in QEMU (as `cleanup` finds) and loses no change; what a
//! killed backup left in QEMU is removed when the daemon starts.

use std::path::PathBuf;

use serde_json::Value;

use crate::common::*;
use crate::daemon::{Daemon, free_port, runs};
use crate::qemu::{Qsd, leave_a_view, setup};

/// The repository, the daemon on `port`, QSD as host `host`, and job
/// `kvm` over its node `disk` every two seconds, with `job_extra`.
fn config(s: &Scratch, qsd: &Qsd, port: u16, job_extra: &str) -> PathBuf {
    let path = s.path("cbtvault.toml");
    let text = format!(
        r#"
[repository]
path = "{repo}"

[daemon]
listen = "127.0.0.1:{port}"

[[qemu]]
name = "host"
qmp_socket = "{qmp}"
nbd_socket = "{nbd}"

[[job]]
name = "kvm"
kind = "qemu"
host = "host"
nodes = ["disk"]
schedule = {{ cron = "*/2 * * * * *" }}
{job_extra}
"#,
        repo = s.repo().display(),
        qmp = qsd.qmp().display(),
        nbd = qsd.nbd().display(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// What `cleanup` removes for job `kvm` now (nothing, when QEMU is clean).
fn leftovers(s: &Scratch, config: &std::path::Path) -> Vec<Value> {
    let out = s.ok(&[
        "cleanup",
        "--json",
        "--config",
        config.to_str().unwrap(),
        "--job",
        "kvm",
    ]);
    let cleaned: Value = serde_json::from_str(&out).unwrap();
    cleaned
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["removed"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// The newest restore point restores to exactly what the guest sees now.
fn assert_latest_is_the_live_disk(s: &Scratch, qsd: &Qsd, name: &str) -> Value {
    let latest = s.list().into_iter().last().unwrap();
    let live = s.path(&format!("{name}.raw"));
    qsd.snapshot_to(&live);
    assert_same_file(&live, &s.restore(&id(&latest), &format!("{name}.img")));
    latest
}

#[test]
fn the_daemon_backs_up_a_qemu_disk_on_schedule_and_stops_cleanly_mid_transfer() {
    let s = Scratch::new();
    let qsd = setup(&s);
    let port = free_port();
    let plain = config(&s, &qsd, port, "");

    // Runs two seconds apart: a full, then incrementals that catch a
    // guest write.
    let mut daemon = Daemon::start(&s, &plain, port);
    daemon.wait_for("a first restore point", || !s.list().is_empty());
    qsd.write(0x33, 5 << 20, 3 << 16);
    let before = s.list().len();
    // Two more: the second surely started after the write.
    daemon.wait_for("two more runs", || s.list().len() >= before + 2);
    assert!(daemon.stop().success(), "{}", daemon.log());
    let latest = assert_latest_is_the_live_disk(&s, &qsd, "scheduled");
    assert_eq!(latest["mode"]["kind"], "incremental", "{latest}");
    assert!(leftovers(&s, &plain).is_empty());

    // SIGTERM while a slowed transfer is going: nothing is left in QEMU.
    qsd.write(0x44, 40 << 20, 2 << 20);
    let slow = config(&s, &qsd, port, "bandwidth = \"64K\"");
    let points = s.list().len();
    let mut daemon = Daemon::start(&s, &slow, port);
    daemon.wait_for("the transfer", || {
        let Some((200, text)) = daemon.get("/status") else {
            return false;
        };
        let status: Value = serde_json::from_str(&text).unwrap();
        status["jobs"][0]["running_disks"][0]["done_bytes"]
            .as_u64()
            .is_some_and(|d| d > 0)
    });
    assert!(daemon.stop().success(), "{}", daemon.log());
    assert_eq!(s.list().len(), points, "nothing partial is committed");
    let history = runs(&s, "kvm");
    assert_eq!(history[0]["outcome"], "cancelled", "{history:?}");
    assert_eq!(
        leftovers(&s, &slow),
        Vec::<Value>::new(),
        "{}",
        daemon.log()
    );

    // Restarted: the change the stopped run was reading is not lost (the
    // checkpoint's bitmap was merged back), and the run is incremental.
    let mut daemon = Daemon::start(&s, &plain, port);
    daemon.wait_for("a run after the restart", || s.list().len() > points);
    assert!(daemon.stop().success(), "{}", daemon.log());
    let resumed = &s.list()[points];
    assert_eq!(resumed["mode"]["kind"], "incremental", "{resumed}");
    assert!(
        resumed["stats"]["blocks_read"].as_u64().unwrap() >= 32,
        "the 2 MiB written before the stop are read: {resumed}"
    );
    assert_latest_is_the_live_disk(&s, &qsd, "restarted");
    let (ok, report) = s.verify(true);
    assert!(ok, "{report}");
}

/// A backup killed with its point-in-time view in QEMU (the filter in the
/// guest's I/O path, an export, a fleece image): the daemon removes it at
/// start, before any run.
#[test]
fn the_daemon_cleans_up_what_a_killed_backup_left_in_qemu_at_start() {
    let s = Scratch::new();
    let qsd = setup(&s);
    let port = free_port();
    // A schedule that never comes while the test runs.
    let config_path = s.path("cbtvault.toml");
    let config_text = config(&s, &qsd, port, "")
        .to_str()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .unwrap()
        .replace("*/2 * * * * *", "0 0 3 1 1 *");
    std::fs::write(&config_path, config_text).unwrap();
    let run_job = || {
        s.ok(&[
            "backup",
            "--config",
            config_path.to_str().unwrap(),
            "--job",
            "kvm",
        ])
    };
    run_job();
    qsd.write(0x55, 12 << 20, 65536);
    // The checkpoint the last backup ended at, as a real run passes it.
    let base = s.list().into_iter().last().unwrap()["source"]["snapshot"]
        .as_str()
        .map(|c| cbtvault_qemu::CheckpointName::new(c).unwrap())
        .unwrap();
    leave_a_view(&s, &qsd, "kvm", "qemu-host/disk", Some(&base));

    let mut daemon = Daemon::start(&s, &config_path, port);
    daemon.wait_for("the clean-up at start", || {
        daemon.log().contains("cleaned up after a killed backup")
    });
    assert!(daemon.stop().success(), "{}", daemon.log());
    assert!(leftovers(&s, &config_path).is_empty());
    // The next backup reads the write made before the kill.
    run_job();
    let latest = assert_latest_is_the_live_disk(&s, &qsd, "after");
    assert_eq!(latest["mode"]["kind"], "incremental", "{latest}");
}
