//! The binary against the vSphere simulator: VM disks and First Class
//! Disks, full then incrementals (bytes read = the changed areas widened
//! to 64 KiB blocks, every restore point byte-exact), paging, a CBT reset,
//! an expired session, killed runs, and bad input.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cbtvault_blockmap::BlockMap;
use cbtvault_vsphere_sim::{FcdSpec, Sim, SimConfig, Simulator, VmSpec};
use serde_json::Value;

use crate::common::*;

const KIB64: u64 = 64 * 1024;

/// A simulated vCenter running in this test process.
struct Vc {
    sim: Option<Simulator>,
    rt: tokio::runtime::Runtime,
    password: PathBuf,
    pin: PathBuf,
    /// NBD over TLS, the server's certificate pinned.
    nbd_tls: bool,
}

impl Vc {
    fn start(s: &Scratch, vms: Vec<VmSpec>, fcds: Vec<FcdSpec>) -> Vc {
        Self::start_with(s, vms, fcds, false)
    }

    fn start_with(s: &Scratch, vms: Vec<VmSpec>, fcds: Vec<FcdSpec>, nbd_tls: bool) -> Vc {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut config = SimConfig::new(s.path("vcenter"), "vc-secret");
        config.vms = vms;
        config.fcds = fcds;
        config.task_delay = Duration::from_millis(5);
        config.nbd_tls = nbd_tls;
        let sim = rt.block_on(Simulator::start(config)).expect("simulator");
        let password = s.path("vc.password");
        std::fs::write(&password, "vc-secret\n").unwrap();
        let pin = s.path("vc.pem");
        std::fs::write(&pin, sim.certificate_pem()).unwrap();
        Vc {
            sim: Some(sim),
            rt,
            password,
            pin,
            nbd_tls,
        }
    }

    fn sim(&self) -> &Sim {
        self.sim.as_ref().unwrap().sim()
    }

    fn vm(&self) -> String {
        self.sim().vms()[0].0.clone()
    }

    /// `cbtvault.toml` with this vCenter as `vc` and job `nightly` (`job`:
    /// its kind-specific lines); `vc_extra` goes into the vcenter table.
    fn config(&self, s: &Scratch, vc_extra: &str, job: &str) -> PathBuf {
        let sim = self.sim.as_ref().unwrap();
        let path = s.path("cbtvault.toml");
        // Failures are asserted on the first try unless the job asks for more.
        let retries = if job.contains("retries") {
            ""
        } else {
            "retries = 0\n"
        };
        let text = format!(
            "[repository]\npath = \"{repo}\"\n\n[[vcenter]]\nname = \"vc\"\nurl = \"{url}\"\n\
             username = \"administrator@vsphere.local\"\npassword_file = \"{password}\"\n\
             nbd_uri = \"{nbd}\"\n{vc_extra}\n\n\
             [[job]]\nname = \"nightly\"\nkind = \"vmware\"\nvcenter = \"vc\"\n{retries}{job}\n",
            repo = s.repo().display(),
            url = sim.url(),
            password = self.password.display(),
            nbd = if self.nbd_tls {
                format!(
                    "{}?tls-pin={}",
                    sim.nbd_uri_template().replace("nbd://", "nbds://"),
                    self.pin.display()
                )
            } else {
                sim.nbd_uri_template()
            },
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    fn pinned(&self) -> String {
        format!("pin = \"{}\"", self.pin.display())
    }
}

impl Drop for Vc {
    fn drop(&mut self) {
        if let Some(sim) = self.sim.take() {
            self.rt.block_on(sim.shutdown());
        }
    }
}

fn vm_spec(name: &str, disks: Vec<u64>) -> VmSpec {
    VmSpec {
        name: name.into(),
        disks,
        powered_on: true,
        cbt_supported: true,
        cbt_enabled: false,
    }
}

fn run(s: &Scratch, config: &PathBuf) -> std::process::Output {
    s.command()
        .args(["backup", "--json", "--config"])
        .arg(config)
        .args(["--job", "nightly"])
        .output()
        .unwrap()
}

/// Runs the job, expects success, returns its rows (by disk name).
fn backup(s: &Scratch, config: &PathBuf) -> Vec<Value> {
    let out = run(s, config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut rows: Vec<Value> = serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone();
    rows.sort_by_key(|r| r["disk"].as_str().unwrap_or_default().to_string());
    rows
}

fn fails(s: &Scratch, config: &PathBuf) -> String {
    let out = run(s, config);
    assert!(!out.status.success(), "the run should have failed");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

fn kind(row: &Value) -> &str {
    row["mode"]["kind"].as_str().unwrap_or_default()
}

/// Restores `row` and compares it with `bytes`.
fn same(s: &Scratch, row: &Value, bytes: &[u8], name: &str) {
    let want = s.path(&format!("{name}.want"));
    std::fs::write(&want, bytes).unwrap();
    assert_same_file(&want, &s.restore(row["id"].as_str().unwrap(), name));
}

/// Guest writes: `(offset, data)`; returns the bytes of the 64 KiB blocks
/// they touch (what an incremental must read, no more, no less).
fn write(sim: &Sim, vm: &str, key: i32, capacity: u64, writes: &[(u64, &[u8])]) -> u64 {
    let mut map = BlockMap::empty(capacity.div_ceil(KIB64));
    for (off, data) in writes {
        sim.write(vm, key, *off, data).unwrap();
        let end = off + data.len() as u64;
        map.set_range(off / KIB64..end.div_ceil(KIB64));
    }
    map.count_set() * KIB64
}

#[test]
fn vm_disks_full_then_incrementals_read_only_changed_blocks_and_restore_exactly() {
    let s = Scratch::new();
    let vc = Vc::start(&s, vec![vm_spec("web", vec![4 * MIB, 2 * MIB])], vec![]);
    let (sim, vm) = (vc.sim(), vc.vm());
    write(
        sim,
        &vm,
        2000,
        4 * MIB,
        &[(0, &[7u8; 100_000]), (3 * MIB + 5, b"tail")],
    );
    write(sim, &vm, 2001, 2 * MIB, &[(MIB, &[9u8; 70_000])]);
    let config = vc.config(&s, &vc.pinned(), &format!("vms = [\"{vm}\"]"));
    assert!(
        s.ok(&["config", "check", config.to_str().unwrap()])
            .contains("1 vCenters")
    );

    let rows = backup(&s, &config);
    assert_eq!(rows.len(), 2);
    for row in &rows {
        assert_eq!(kind(row), "full", "{row}");
        let reason = row["mode"]["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("switched it on"), "{reason}");
        assert!(
            row["source"]["details"]["change_id"]
                .as_str()
                .unwrap()
                .contains('/')
        );
    }
    same(&s, &rows[0], &sim.disk_bytes(&vm, 2000).unwrap(), "d0-full");
    same(&s, &rows[1], &sim.disk_bytes(&vm, 2001).unwrap(), "d1-full");

    for round in 0..2u8 {
        let expect = write(
            sim,
            &vm,
            2000,
            4 * MIB,
            &[
                (12_345, &[round + 1]),               // 1 byte at an odd offset
                (KIB64 - 1, &[round + 2, round + 3]), // across a block boundary
                (2 * MIB + 999, &[round + 4; 200_000]),
            ],
        );
        let rows = backup(&s, &config);
        assert_eq!(kind(&rows[0]), "incremental", "{}", rows[0]);
        assert_eq!(rows[0]["stats"]["bytes_read"].as_u64(), Some(expect));
        assert_eq!(kind(&rows[1]), "incremental");
        assert_eq!(rows[1]["stats"]["bytes_read"].as_u64(), Some(0));
        same(
            &s,
            &rows[0],
            &sim.disk_bytes(&vm, 2000).unwrap(),
            &format!("d0-{round}"),
        );
        same(
            &s,
            &rows[1],
            &sim.disk_bytes(&vm, 2001).unwrap(),
            &format!("d1-{round}"),
        );
    }
    assert!(sim.snapshots(&vm).is_empty(), "{:?}", sim.snapshots(&vm));
    let (ok, report) = s.verify(true);
    assert!(ok, "{report}");
}

#[test]
fn paging_over_many_small_pages_misses_nothing() {
    let s = Scratch::new();
    let vc = Vc::start(&s, vec![vm_spec("db", vec![4 * MIB])], vec![]);
    let (sim, vm) = (vc.sim(), vc.vm());
    let config = vc.config(&s, &vc.pinned(), &format!("vms = [\"{vm}\"]"));
    backup(&s, &config);
    sim.set_page_extents(2);
    let writes: Vec<(u64, Vec<u8>)> = (0..30u64)
        .map(|i| (i * 131_071 + 3, vec![i as u8 + 1]))
        .collect();
    let borrowed: Vec<(u64, &[u8])> = writes.iter().map(|(o, d)| (*o, d.as_slice())).collect();
    let expect = write(sim, &vm, 2000, 4 * MIB, &borrowed);
    let before = sim.queries();
    let rows = backup(&s, &config);
    assert!(
        sim.queries() - before >= 15,
        "{} queries",
        sim.queries() - before
    );
    assert_eq!(kind(&rows[0]), "incremental");
    assert_eq!(rows[0]["stats"]["bytes_read"].as_u64(), Some(expect));
    same(&s, &rows[0], &sim.disk_bytes(&vm, 2000).unwrap(), "paged");
}

#[test]
fn a_cbt_reset_gives_a_full_with_the_reason_then_incrementals_again() {
    let s = Scratch::new();
    let vc = Vc::start(&s, vec![vm_spec("app", vec![2 * MIB])], vec![]);
    let (sim, vm) = (vc.sim(), vc.vm());
    // By name: looked up in the inventory.
    let config = vc.config(&s, &vc.pinned(), "vms = [\"app\"]");
    let rows = backup(&s, &config);
    assert_eq!(
        rows[0]["source"]["details"]["vm"].as_str(),
        Some(vm.as_str())
    );
    sim.reset_cbt(&vm).unwrap();
    write(sim, &vm, 2000, 2 * MIB, &[(77, b"after the reset")]);
    let rows = backup(&s, &config);
    assert_eq!(kind(&rows[0]), "full");
    let reason = rows[0]["mode"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("changeId") && reason.contains("FileFault"),
        "{reason}"
    );
    same(
        &s,
        &rows[0],
        &sim.disk_bytes(&vm, 2000).unwrap(),
        "after-reset",
    );
    let expect = write(sim, &vm, 2000, 2 * MIB, &[(MIB + 1, b"again")]);
    let rows = backup(&s, &config);
    assert_eq!(kind(&rows[0]), "incremental");
    assert_eq!(rows[0]["stats"]["bytes_read"].as_u64(), Some(expect));
    same(
        &s,
        &rows[0],
        &sim.disk_bytes(&vm, 2000).unwrap(),
        "incremental-again",
    );
}

#[test]
fn a_session_that_expires_mid_run_is_renewed() {
    let s = Scratch::new();
    let vc = Vc::start(&s, vec![vm_spec("app", vec![2 * MIB])], vec![]);
    let (sim, vm) = (vc.sim(), vc.vm());
    let config = vc.config(&s, &vc.pinned(), &format!("vms = [\"{vm}\"]"));
    backup(&s, &config);
    let expect = write(sim, &vm, 2000, 2 * MIB, &[(500_000, b"x")]);
    // Login, config, snapshot list: the session ends before the snapshot.
    sim.expire_sessions_after(3);
    let rows = backup(&s, &config);
    assert_eq!(kind(&rows[0]), "incremental");
    assert_eq!(rows[0]["stats"]["bytes_read"].as_u64(), Some(expect));
    assert!(sim.snapshots(&vm).is_empty());
}

#[test]
fn killed_runs_leave_snapshots_the_next_run_removes_and_it_stays_incremental() {
    let s = Scratch::new();
    let vc = Vc::start(&s, vec![vm_spec("app", vec![4 * MIB])], vec![]);
    let (sim, vm) = (vc.sim(), vc.vm());
    let config = vc.config(&s, &vc.pinned(), &format!("vms = [\"{vm}\"]"));
    backup(&s, &config);
    let mut expect_map = BlockMap::empty(4 * MIB / KIB64);
    let mut killed_with_snapshot = 0;
    for i in 0..4u64 {
        let off = i * 900_001 + 17;
        sim.write(&vm, 2000, off, b"killed").unwrap();
        expect_map.set_range(off / KIB64..(off + 6).div_ceil(KIB64));
        // Slow answers keep the run inside vSphere calls after its snapshot.
        sim.set_slow(Duration::from_millis(150));
        let mut child = Command::new(env!("CARGO_BIN_EXE_cbtvault"))
            .env("CBTVAULT_REPO", s.repo())
            .env_remove("RUST_LOG")
            .args(["backup", "--quiet", "--config"])
            .arg(&config)
            .args(["--job", "nightly"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        // Killed once its own snapshot exists (it first reaps the last one's).
        let before = sim.snapshots(&vm);
        let new = || sim.snapshots(&vm).into_iter().any(|s| !before.contains(&s));
        while !new() && started.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(20 * i));
        child.kill().unwrap();
        child.wait().unwrap();
        sim.set_slow(Duration::ZERO);
        if new() {
            killed_with_snapshot += 1;
        }
    }
    assert_eq!(
        killed_with_snapshot, 4,
        "a run was not killed holding its snapshot"
    );
    assert!(!sim.snapshots(&vm).is_empty());
    let rows = backup(&s, &config);
    assert_eq!(kind(&rows[0]), "incremental", "{}", rows[0]);
    assert_eq!(
        rows[0]["stats"]["bytes_read"].as_u64(),
        Some(expect_map.count_set() * KIB64)
    );
    assert!(sim.snapshots(&vm).is_empty(), "{:?}", sim.snapshots(&vm));
    same(
        &s,
        &rows[0],
        &sim.disk_bytes(&vm, 2000).unwrap(),
        "after-kills",
    );
    let (ok, report) = s.verify(true);
    assert!(ok, "{report}");
}

#[test]
fn first_class_disks_full_then_incremental_over_nbd_with_tls() {
    let s = Scratch::new();
    let vc = Vc::start_with(
        &s,
        vec![],
        vec![FcdSpec {
            name: "data".into(),
            size: 3 * MIB,
        }],
        true,
    );
    let sim = vc.sim();
    let (id, _, ds) = sim.fcds()[0].clone();
    sim.write_fcd(&id, 1000, &[5u8; 90_000]).unwrap();
    let config = vc.config(
        &s,
        &vc.pinned(),
        &format!("fcds = [{{ id = \"{id}\", datastore = \"{ds}\" }}]"),
    );
    let rows = backup(&s, &config);
    assert_eq!(kind(&rows[0]), "full");
    same(&s, &rows[0], &sim.fcd_bytes(&id).unwrap(), "fcd-full");
    sim.write_fcd(&id, 2 * MIB + 3, b"abc").unwrap();
    let rows = backup(&s, &config);
    assert_eq!(kind(&rows[0]), "incremental", "{}", rows[0]);
    assert_eq!(rows[0]["stats"]["bytes_read"].as_u64(), Some(KIB64));
    same(&s, &rows[0], &sim.fcd_bytes(&id).unwrap(), "fcd-incr");
    assert!(sim.fcd_snapshots(&id).is_empty());

    // A snapshot a killed run left (tagged with the job) goes at the next run.
    let leftover = vc.rt.block_on(async {
        let password = cbtvault_vsphere::Password::from_file(&vc.password).unwrap();
        let sim = vc.sim.as_ref().unwrap();
        let mut o = cbtvault_vsphere::ClientOptions::new(
            &sim.url(),
            "administrator@vsphere.local",
            password,
        )
        .unwrap();
        o.tls = Some(cbtvault_vsphere::TlsTrust::pinned_file(&vc.pin).unwrap());
        let c = cbtvault_vsphere::Client::connect(o).await.unwrap();
        c.create_fcd_snapshot(&id, &ds, "cbtvault:nightly")
            .await
            .unwrap()
    });
    assert_eq!(sim.fcd_snapshots(&id), [leftover]);
    sim.write_fcd(&id, 5, b"z").unwrap();
    let rows = backup(&s, &config);
    assert_eq!(kind(&rows[0]), "incremental", "{}", rows[0]);
    assert_eq!(rows[0]["stats"]["bytes_read"].as_u64(), Some(KIB64));
    same(
        &s,
        &rows[0],
        &sim.fcd_bytes(&id).unwrap(),
        "fcd-after-leftover",
    );
    assert!(sim.fcd_snapshots(&id).is_empty());
}

#[test]
fn bad_input_gives_clear_errors_and_leaves_nothing_behind() {
    let s = Scratch::new();
    let mut old = vm_spec("old-hw", vec![MIB]);
    old.cbt_supported = false;
    let vc = Vc::start(&s, vec![vm_spec("web", vec![MIB]), old], vec![]);
    let sim = vc.sim();
    let vms = sim.vms();
    let old_vm = vms.iter().find(|(_, n)| n == "old-hw").unwrap().0.clone();

    let config = vc.config(&s, &vc.pinned(), "vms = [\"vm-999\"]");
    let e = fails(&s, &config);
    assert!(
        e.contains("vm-999") && e.contains("ManagedObjectNotFound"),
        "{e}"
    );

    let config = vc.config(&s, &vc.pinned(), &format!("vms = [\"{old_vm}\"]"));
    let e = fails(&s, &config);
    assert!(e.contains("does not support changed-block tracking"), "{e}");
    assert!(sim.snapshots(&old_vm).is_empty());

    std::fs::write(&vc.password, "wrong\n").unwrap();
    let config = vc.config(&s, &vc.pinned(), &format!("vms = [\"{}\"]", vms[0].0));
    let e = fails(&s, &config);
    assert!(e.contains("InvalidLogin"), "{e}");
    std::fs::write(&vc.password, "vc-secret\n").unwrap();

    let other = Scratch::new();
    let stranger = Vc::start(&other, vec![], vec![]);
    let config = vc.config(&s, &stranger.pinned(), &format!("vms = [\"{}\"]", vms[0].0));
    let e = fails(&s, &config);
    assert!(e.contains("does not match"), "{e}");

    for (vm, _) in &vms {
        assert!(sim.snapshots(vm).is_empty());
    }
    assert!(s.list().is_empty());
}

#[test]
fn a_failed_snapshot_task_and_a_dropped_nbd_read_fail_cleanly_or_are_retried() {
    let s = Scratch::new();
    let vc = Vc::start(&s, vec![vm_spec("app", vec![2 * MIB])], vec![]);
    let (sim, vm) = (vc.sim(), vc.vm());
    let config = vc.config(&s, &vc.pinned(), &format!("vms = [\"{vm}\"]"));
    backup(&s, &config);

    // The task's fault is the error; nothing is committed or left.
    sim.fail_next_task("CreateSnapshot_Task", "SnapshotFault");
    let e = fails(&s, &config);
    assert!(
        e.contains("SnapshotFault") && e.contains("creating the snapshot"),
        "{e}"
    );
    assert!(sim.snapshots(&vm).is_empty());
    assert_eq!(s.list().len(), 1);

    // A read the server fails is tried again from a new snapshot.
    let expect = write(sim, &vm, 2000, 2 * MIB, &[(300_001, b"retried")]);
    sim.fail_nbd_after(0);
    let retrying = vc.config(
        &s,
        &vc.pinned(),
        &format!("vms = [\"{vm}\"]\nretries = 1\nretry_delay = \"1s\""),
    );
    let rows = backup(&s, &retrying);
    assert_eq!(kind(&rows[0]), "incremental");
    assert_eq!(rows[0]["stats"]["bytes_read"].as_u64(), Some(expect));
    same(&s, &rows[0], &sim.disk_bytes(&vm, 2000).unwrap(), "retried");
    assert!(sim.snapshots(&vm).is_empty());
}

#[test]
fn a_one_off_backup_from_the_command_line() {
    let s = Scratch::new();
    let vc = Vc::start(&s, vec![vm_spec("web", vec![2 * MIB])], vec![]);
    let (sim, vm) = (vc.sim(), vc.vm());
    sim.write(&vm, 2000, 4321, b"one-off").unwrap();
    let sim_handle = vc.sim.as_ref().unwrap();
    let (url, nbd) = (sim_handle.url(), sim_handle.nbd_uri_template());
    let repo = s.repo();
    let mut args = vec![
        "backup",
        "--json",
        "--repo",
        repo.to_str().unwrap(),
        "--vcenter",
        &url,
        "--username",
        "administrator@vsphere.local",
        "--password-file",
        vc.password.to_str().unwrap(),
        "--pin",
        vc.pin.to_str().unwrap(),
        "--nbd-uri",
        &nbd,
    ];
    // Without a VM or an FCD: a usage error.
    let e = s.fails(&args);
    assert!(e.contains("--vm MOREF or --fcd ID"), "{e}");
    args.extend(["--vm", &vm]);
    let rows: Value = serde_json::from_str(&s.ok(&args)).unwrap();
    let row = &rows[0];
    assert_eq!(kind(row), "full");
    assert_eq!(
        row["disk"].as_str(),
        Some(format!("vmware-127.0.0.1/{vm}/2000").as_str())
    );
    same(&s, row, &sim.disk_bytes(&vm, 2000).unwrap(), "one-off");
    assert!(sim.snapshots(&vm).is_empty());
}

#[test]
fn a_grown_disk_and_a_file_fault_give_fulls_with_their_reasons() {
    let s = Scratch::new();
    let vc = Vc::start(&s, vec![vm_spec("app", vec![2 * MIB])], vec![]);
    let (sim, vm) = (vc.sim(), vc.vm());
    let config = vc.config(&s, &vc.pinned(), &format!("vms = [\"{vm}\"]"));
    backup(&s, &config);

    sim.resize(&vm, 2000, 3 * MIB).unwrap();
    sim.write(&vm, 2000, 3 * MIB - 10, b"new end").unwrap();
    let rows = backup(&s, &config);
    assert_eq!(kind(&rows[0]), "full");
    let reason = rows[0]["mode"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("size changed"), "{reason}");
    assert_eq!(rows[0]["virtual_size"].as_u64(), Some(3 * MIB));
    same(&s, &rows[0], &sim.disk_bytes(&vm, 2000).unwrap(), "grown");

    sim.fail_next_query();
    sim.write(&vm, 2000, 1, b"y").unwrap();
    let rows = backup(&s, &config);
    assert_eq!(kind(&rows[0]), "full");
    let reason = rows[0]["mode"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("FileFault"), "{reason}");
    same(
        &s,
        &rows[0],
        &sim.disk_bytes(&vm, 2000).unwrap(),
        "after-file-fault",
    );

    let expect = write(sim, &vm, 2000, 3 * MIB, &[(2 * MIB + 1, b"z")]);
    let rows = backup(&s, &config);
    assert_eq!(kind(&rows[0]), "incremental");
    assert_eq!(rows[0]["stats"]["bytes_read"].as_u64(), Some(expect));
}
