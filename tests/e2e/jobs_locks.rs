//! Issue 8, defect 7: nothing waits forever. A run killed while it took
//! a VM snapshot must not hang the next one (the catalogue's mutex was
//! taken twice), and a second run of a job is refused at once instead of
//! hanging or reaping the snapshots of the run in progress.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;
use crate::sources::{output_within, spawn_logged};
use crate::xen::Pool;

fn config(s: &Scratch, pool: &Pool, vm: &str) -> PathBuf {
    pool.write_config(
        s,
        "",
        &format!(
            "[[job]]\nname = \"vm-nightly\"\nkind = \"xenserver\"\npool = \"sim\"\n\
             vms = [\"{vm}\"]\nconsistent_vm_snapshot = true"
        ),
    )
}

fn job_command(s: &Scratch, config: &Path) -> Command {
    let mut c = s.command();
    c.args(["backup", "--json", "--config"])
        .arg(config)
        .args(["--job", "vm-nightly"]);
    c
}

/// Runs the job, which must succeed within two minutes; returns its rows.
fn run_job(s: &Scratch, config: &Path) -> Vec<Value> {
    let out = output_within(s, job_command(s, config), Duration::from_secs(120));
    assert!(
        out.status.success(),
        "the job failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Value = serde_json::from_slice(&out.stdout).expect("json");
    rows.as_array().cloned().unwrap_or_default()
}

fn the_vm(pool: &Pool) -> String {
    pool.sim()
        .vms()
        .into_iter()
        .find(|v| !v.is_a_snapshot && !v.is_control_domain)
        .map(|v| v.uuid)
        .expect("a VM")
}

fn snapshot_vms(pool: &Pool) -> usize {
    pool.sim().vms().iter().filter(|v| v.is_a_snapshot).count()
}

#[test]
fn a_run_killed_while_taking_the_vm_snapshot_does_not_hang_the_next() {
    let s = Scratch::new();
    let pool = Pool::start_with(&s, 1, 2);
    let vm = the_vm(&pool);
    let config = config(&s, &pool, &vm);
    let first = run_job(&s, &config);
    assert!(first.iter().all(|r| r["id"].is_string()), "{first:?}");

    // What a run killed inside VM.snapshot leaves behind: its notes in the
    // catalogue, still open (the VM's and each disk's, listing the
    // snapshots that existed before), and the snapshot VM, untagged.
    pool.rt.block_on(async {
        let client = pool.login().await;
        let pool_uuid = cbtvault_engine::xenserver::pool_uuid(&client)
            .await
            .unwrap();
        let repo = cbtvault_repo::Repository::open(&s.repo()).unwrap();
        let vm_ref = client.vm().get_by_uuid(&vm).await.unwrap();
        {
            let cat = repo.catalogue();
            let run = cat
                .start_run("xen-vm-snapshot", Some(&format!("vm-{vm}")))
                .unwrap();
            cat.set_run_detail(run, "[]").unwrap();
        }
        for vdi in pool.vdis() {
            let r = client.vdi().get_by_uuid(&vdi).await.unwrap();
            let known: Vec<String> = client
                .vdi()
                .get_record(&r)
                .await
                .unwrap()
                .snapshots
                .iter()
                .map(|s| s.as_str().to_string())
                .collect();
            let disk = cbtvault_engine::xenserver::disk_name(&pool_uuid, &vdi);
            let cat = repo.catalogue();
            let run = cat.start_run("xen-snapshot", Some(&disk)).unwrap();
            cat.set_run_detail(run, &serde_json::to_string(&known).unwrap())
                .unwrap();
        }
        client.vm().snapshot(&vm_ref, "killed run").await.unwrap();
        client.logout().await.unwrap();
    });
    for d in pool.vdis() {
        pool.sim().churn(&d, 3, 7).unwrap();
    }

    let second = run_job(&s, &config);
    assert_eq!(second.len(), 2, "{second:?}");
    assert!(
        second
            .iter()
            .all(|r| r["id"].is_string() && r["mode"]["kind"] == "incremental"),
        "{second:?}"
    );
    assert_eq!(snapshot_vms(&pool), 0, "the leftover VM snapshot is reaped");
    assert!(
        pool.data_snapshots().is_empty(),
        "no snapshot keeps data: {:?}",
        pool.data_snapshots()
    );
}

#[test]
fn a_second_run_of_a_job_is_refused_at_once_and_the_first_completes() {
    let s = Scratch::new();
    let pool = Pool::start_with(&s, 1, 2);
    let vm = the_vm(&pool);
    let config = config(&s, &pool, &vm);
    run_job(&s, &config);
    for d in pool.vdis() {
        pool.sim().churn(&d, 3, 8).unwrap();
    }

    // Every XenAPI call answers late: the first run is still going when
    // the others start.
    pool.sim().fault_slow(Duration::from_millis(40), None);
    let mut first = spawn_logged(&s, &mut job_command(&s, &config));
    let deadline = Instant::now() + Duration::from_secs(60);
    while snapshot_vms(&pool) == 0 {
        assert!(
            first.child.try_wait().unwrap().is_none(),
            "the first run ended before it took its snapshot"
        );
        assert!(Instant::now() < deadline, "the first run took no snapshot");
        std::thread::sleep(Duration::from_millis(20));
    }

    let again = output_within(&s, job_command(&s, &config), Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success(),
        "a second run of the job must be refused"
    );
    assert!(stderr.contains("already running"), "{stderr}");

    // The same VM through another job (here one-off): refused by the VM's lock.
    let mut adhoc = s.command();
    adhoc
        .args(pool.args(&s))
        .args(["--vm", &vm, "--vm-snapshot"]);
    let other = output_within(&s, adhoc, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(
        !other.status.success(),
        "a concurrent run of the VM must be refused"
    );
    assert!(
        stderr.contains("another cbtvault run is backing up this VM"),
        "{stderr}"
    );

    let limit = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = first.child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= limit {
            let _ = first.child.kill();
            panic!("the first run hangs");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    pool.sim().clear_faults();
    let out = std::fs::read_to_string(&first.stdout).unwrap_or_default();
    assert!(
        status.success(),
        "the first run must not be disturbed:\n{out}\n{}",
        std::fs::read_to_string(&first.stderr).unwrap_or_default()
    );
    let rows: Value = serde_json::from_str(&out).unwrap();
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .all(|r| r["id"].is_string() && r["mode"]["kind"] == "incremental"),
        "{rows}"
    );
    assert_eq!(snapshot_vms(&pool), 0);
    assert!(
        pool.data_snapshots().is_empty(),
        "{:?}",
        pool.data_snapshots()
    );
}
