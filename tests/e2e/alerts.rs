//! Issue 10, alerts no peer gives: a guest write that bypasses the pool's
//! changed-block tracking is caught by the CBT audit and forces a full, and
//! a jump in churn far above the disk's own history is flagged.

use std::path::PathBuf;

use serde_json::Value;

use crate::common::*;
use crate::runner::run_job;
use crate::xen::Pool;

/// A configuration with the simulated pool and job `nightly` over `vdi`,
/// auditing every block of the pool's 32 MiB disks (512 blocks).
fn config(s: &Scratch, pool: &Pool, vdi: &str) -> PathBuf {
    crate::runner::config(
        s,
        pool,
        &[vdi.to_string()],
        "",
        "retries = 0\naudit_samples = 1024",
    )
}

/// The one restore point a successful `--json` run committed.
fn committed(out: &std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.as_array().map(Vec::len), Some(1), "{rows}");
    rows[0].clone()
}

#[test]
fn a_write_that_bypasses_cbt_is_caught_by_the_audit_and_the_next_run_is_full() {
    let s = Scratch::new();
    let pool = Pool::start(&s, 1);
    let vdi = &pool.vdis()[0];
    let config = config(&s, &pool, vdi);
    assert_eq!(
        committed(&run_job(&s, &config, true))["mode"]["kind"],
        "full"
    );

    // A tracked write, and one the CBT log misses.
    pool.sim().write_blocks(vdi, &[3], 7).unwrap();
    let offset = 100 * 65536;
    pool.sim()
        .fault_cbt_bypass(vdi, offset, &vec![0x5a; 65536])
        .unwrap();
    let out = run_job(&s, &config, false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("changed-block tracking missed writes"),
        "{stderr}"
    );
    assert!(stderr.contains(&offset.to_string()), "{stderr}");
    assert!(
        stderr.contains("next backup of this disk reads it whole"),
        "{stderr}"
    );
    // Nothing irreversible happened, and the untrustworthy point is gone.
    assert!(
        pool.data_snapshots().is_empty(),
        "{:?}",
        pool.data_snapshots()
    );
    assert_eq!(s.list().len(), 1, "only the first full is left");

    // The next run is a full that says why, and holds the disk as it is.
    let row = committed(&run_job(&s, &config, true));
    assert_eq!(row["mode"]["kind"], "full", "{row}");
    let reason = row["mode"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("CBT audit"), "{reason}");
    assert!(reason.contains(&offset.to_string()), "{reason}");
    assert_same_file(
        &pool.copy_disk(&s, vdi, "disk.img"),
        &s.restore(row["id"].as_str().unwrap(), "restored.img"),
    );

    // After it, incrementals again, and the audit (of every block) passes.
    pool.sim().write_blocks(vdi, &[4, 200], 8).unwrap();
    let row = committed(&run_job(&s, &config, true));
    assert_eq!(row["mode"]["kind"], "incremental", "{row}");
    assert!(row.get("alerts").is_none(), "{row}");
}

#[test]
fn a_fifty_fold_jump_in_churn_is_flagged_and_usual_nights_are_not() {
    let s = Scratch::new();
    let pool = Pool::start(&s, 1);
    let vdi = &pool.vdis()[0];
    let config = config(&s, &pool, vdi);
    committed(&run_job(&s, &config, true));
    // Usual nights: 2 blocks of 512 change.
    for night in 1..=4u64 {
        pool.sim().churn(vdi, 2, night).unwrap();
        let row = committed(&run_job(&s, &config, true));
        assert_eq!(row["mode"]["kind"], "incremental", "{row}");
        assert!(row.get("alerts").is_none(), "night {night} flagged: {row}");
    }

    // Then 50 times that, of random data (as encryption writes).
    pool.sim().churn(vdi, 100, 99).unwrap();
    let out = run_job(&s, &config, false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.contains("restore point"))
        .unwrap_or_default();
    assert!(line.contains("ALERT: changed 20% of the disk"), "{line}");
    assert!(line.contains("ALERT: stored new"), "{line}");

    // The same jump again, in JSON: the alert is in the restore point's row.
    pool.sim().churn(vdi, 100, 100).unwrap();
    let row = committed(&run_job(&s, &config, true));
    let alerts = row["alerts"].as_array().cloned().unwrap_or_default();
    assert!(
        alerts
            .iter()
            .any(|a| a["kind"] == "churn_jump" && a["measure"] == "changed"),
        "{row}"
    );
}
