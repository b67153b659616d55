//! Issue 9: the job runner. Limits hold across the disks of a job, a disk
//! whose source keeps failing is retried from a new snapshot, one failing
//! disk never stops the others, and a restore into a pool takes the pool
//! from the configuration.

use std::io::Read;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;
use crate::xen::Pool;

/// A configuration with the simulated pool and job `nightly` over `vdis`;
/// `extra_pool` and `extra_job` are appended to their tables.
pub(crate) fn config(
    s: &Scratch,
    pool: &Pool,
    vdis: &[String],
    extra_pool: &str,
    extra_job: &str,
) -> PathBuf {
    let list: Vec<String> = vdis.iter().map(|v| format!("{v:?}")).collect();
    pool.write_config(
        s,
        extra_pool,
        &format!(
            "[[job]]\nname = \"nightly\"\nkind = \"xenserver\"\npool = \"sim\"\nvdis = [{}]\n{extra_job}",
            list.join(", ")
        ),
    )
}

pub(crate) fn run_job(s: &Scratch, config: &PathBuf, json: bool) -> std::process::Output {
    let mut c = s.command();
    c.arg("backup");
    if json {
        c.arg("--json");
    }
    c.arg("--config").arg(config).args(["--job", "nightly"]);
    c.output().unwrap()
}

#[test]
fn a_pool_limit_of_one_connection_backs_up_one_disk_at_a_time() {
    let s = Scratch::new();
    let pool = Pool::start_with(&s, 2, 2);
    let vdis = pool.vdis();
    assert_eq!(vdis.len(), 4);
    let config = config(&s, &pool, &vdis, "max_nbd_connections = 1", "parallel = 4");
    let out = run_job(&s, &config, true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.as_array().map(Vec::len), Some(4), "{rows}");
    assert_eq!(
        pool.sim().nbd_connections_peak(),
        1,
        "the pool's limit of one NBD connection was exceeded"
    );
    for (i, row) in rows.as_array().unwrap().iter().enumerate() {
        let vdi = row["source"]["location"]
            .as_str()
            .unwrap()
            .rsplit('/')
            .next()
            .unwrap();
        assert_same_file(
            &pool.copy_disk(&s, vdi, &format!("disk{i}.img")),
            &s.restore(row["id"].as_str().unwrap(), &format!("restored{i}.img")),
        );
    }
    assert!(
        pool.data_snapshots().is_empty(),
        "{:?}",
        pool.data_snapshots()
    );
}

#[test]
fn a_disk_whose_snapshot_keeps_failing_is_retried_from_a_new_snapshot() {
    let s = Scratch::new();
    let pool = Pool::start(&s, 1);
    let vdis = pool.vdis();
    let vdi = &vdis[0];

    // Without retries the run fails, and leaves no snapshot holding data.
    let no_retries = config(&s, &pool, &vdis, "", "retries = 0");
    assert!(run_job(&s, &no_retries, true).status.success());
    pool.sim().churn(vdi, 5, 1).unwrap();
    pool.sim().fault_nbd_break_one_vdi(0);
    let out = run_job(&s, &no_retries, true);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    let err: Value = serde_json::from_str(last).expect("the JSON error is the last line");
    assert_eq!(err["error"]["kind"], "partial", "{err}");
    assert!(
        pool.data_snapshots().is_empty(),
        "{:?}",
        pool.data_snapshots()
    );
    pool.sim().clear_faults();

    // With one retry the same fault costs a second snapshot, not the night.
    let retries = config(&s, &pool, &vdis, "", "retries = 1\nretry_delay = \"1s\"");
    pool.sim().churn(vdi, 5, 2).unwrap();
    pool.sim().fault_nbd_break_one_vdi(0);
    let out = run_job(&s, &retries, false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("after 2 tries"), "{stdout}");
    assert!(
        stdout.contains("incremental"),
        "the retry keeps the chain: {stdout}"
    );
    assert!(
        pool.data_snapshots().is_empty(),
        "{:?}",
        pool.data_snapshots()
    );
    let latest = s.list().into_iter().last().unwrap();
    assert_same_file(
        &pool.copy_disk(&s, vdi, "disk.img"),
        &s.restore(latest["id"].as_str().unwrap(), "restored.img"),
    );
}

#[test]
fn a_restore_into_the_pool_takes_its_address_and_credentials_from_the_config() {
    let s = Scratch::new();
    let pool = Pool::start(&s, 1);
    let vdis = pool.vdis();
    let config = config(&s, &pool, &vdis, "", "");
    let out = run_job(&s, &config, true);
    assert!(out.status.success());
    let row = the_restore_point(&String::from_utf8_lossy(&out.stdout));
    let sr = pool.rt.block_on(async {
        let client = pool.login().await;
        let vdi_ref = client.vdi().get_by_uuid(&vdis[0]).await.unwrap();
        let sr_ref = client.vdi().get_record(&vdi_ref).await.unwrap().sr;
        let sr = client.sr().get_record(&sr_ref).await.unwrap().uuid;
        client.logout().await.unwrap();
        sr
    });
    let out = s.ok(&[
        "restore",
        "--json",
        row["id"].as_str().unwrap(),
        "--to",
        "xapi",
        "--sr",
        &sr,
        "--config",
        config.to_str().unwrap(),
    ]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let new_vdi = v["vdi"].as_str().unwrap();
    assert_same_file(
        &pool.copy_disk(&s, &vdis[0], "orig.img"),
        &pool.copy_disk(&s, new_vdi, "new.img"),
    );
    // A pool the file does not have is named as missing, with the ones it has.
    let err = s.fails(&[
        "restore",
        row["id"].as_str().unwrap(),
        "--to",
        "xapi",
        "--sr",
        &sr,
        "--config",
        config.to_str().unwrap(),
        "--pool",
        "elsewhere",
    ]);
    assert!(
        err.contains("no pool named \"elsewhere\"") && err.contains("sim"),
        "{err}"
    );
}

#[test]
fn a_job_stopped_by_sigterm_leaves_the_pool_clean_and_the_next_run_incremental() {
    let s = Scratch::new();
    let pool = Pool::start_with(&s, 1, 2);
    let vdis = pool.vdis();
    let config = config(&s, &pool, &vdis, "", "retries = 0");
    assert!(run_job(&s, &config, true).status.success());
    for (i, vdi) in vdis.iter().enumerate() {
        pool.sim().churn(vdi, 5, 10 + i as u64).unwrap();
    }
    // Slow calls keep the run busy long enough to be stopped mid-way.
    pool.sim().fault_slow(Duration::from_millis(300), None);
    let mut child = s
        .command()
        .args(["backup", "--json", "--config"])
        .arg(&config)
        .args(["--job", "nightly"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while pool.data_snapshots().is_empty() {
        assert!(Instant::now() < deadline, "the run never took a snapshot");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it was stopped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, stderr) = stop(child);
    assert!(!status.success());
    let last: Value = serde_json::from_str(stderr.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stderr}"));
    assert!(
        last["error"]["kind"] == "interrupted"
            || last["error"]["disks"]
                .as_array()
                .is_some_and(|d| d.iter().all(|d| d["kind"] == "interrupted")),
        "{last}"
    );
    pool.sim().clear_faults();
    assert!(
        pool.data_snapshots().is_empty(),
        "{:?}",
        pool.data_snapshots()
    );
    let out = run_job(&s, &config, true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    for row in rows.as_array().unwrap() {
        assert_eq!(row["mode"]["kind"], "incremental", "{row}");
    }
}

/// Stops a running `cbtvault` with SIGTERM; returns how it ended and what
/// it wrote on stderr (piped).
pub(crate) fn stop(mut child: std::process::Child) -> (std::process::ExitStatus, String) {
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the stopped run did not end within a minute"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status, stderr)
}

/// A job over a VM records the VM with each restore point — its uuid and
/// name, the pool, each disk's device position — and saves the VM's
/// metadata once per run, whether its disks come from one VM snapshot or
/// one by one; `list --vm NAME` finds them.
#[test]
fn restore_points_of_a_vm_job_know_their_vm_and_its_metadata() {
    for consistent in [false, true] {
        let s = Scratch::new();
        let pool = Pool::start_with(&s, 1, 2);
        let vm = pool
            .sim()
            .vms()
            .into_iter()
            .find(|v| !v.is_a_snapshot && !v.is_control_domain)
            .expect("a VM");
        let config = pool.write_config(
            &s,
            "",
            &format!(
                "[[job]]\nname = \"vm\"\nkind = \"xenserver\"\npool = \"sim\"\n\
                 vms = [\"{}\"]\nconsistent_vm_snapshot = {consistent}",
                vm.uuid
            ),
        );
        let out = s.ok(&[
            "backup",
            "--json",
            "--config",
            config.to_str().unwrap(),
            "--job",
            "vm",
        ]);
        let rows: Value = serde_json::from_str(&out).unwrap();
        let rows = rows.as_array().unwrap();
        assert_eq!(rows.len(), 2, "{rows:?}");
        let mut devices = Vec::new();
        let mut metadata = Vec::new();
        for row in rows {
            let v = &row["source"]["vm"];
            assert_eq!(v["uuid"], vm.uuid.as_str(), "{row}");
            assert_eq!(v["name"], vm.name_label.as_str(), "{row}");
            devices.push(v["device"].as_str().unwrap().to_string());
            metadata.push(v["metadata"].as_str().expect("metadata saved").to_string());
        }
        devices.sort();
        assert_eq!(devices, ["0", "1"], "consistent = {consistent}");
        assert_eq!(metadata[0], metadata[1], "one metadata per run");
        let saved = s.repo().join("vms").join(format!("{}.json", metadata[0]));
        let text = std::fs::read_to_string(&saved).expect("the VM metadata file");
        assert!(text.contains(&vm.uuid), "{text}");
        let listed = s.ok(&["list", "--json", "--vm", &vm.name_label]);
        let listed: Value = serde_json::from_str(&listed).unwrap();
        assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
    }
}
