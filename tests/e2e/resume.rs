//! Issue 10: a transfer stopped half-way resumes. A run stopped by SIGTERM
//! keeps the blocks it read and the stopped snapshot's changed-block log
//! (its data goes); the next run reads only what it still lacks, re-reads
//! what the guest wrote since, and restores byte-exact.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;
use crate::runner::{config, run_job, stop};
use crate::xen::Pool;

/// The restore point rows of a `backup --json --job` run.
fn rows(out: &std::process::Output) -> Vec<Value> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    rows.as_array().unwrap().clone()
}

fn manifest_of(s: &Scratch, id: &str) -> Value {
    let repo = s.repo();
    serde_json::from_str(&s.ok(&["show", "--json", "--repo", repo.to_str().unwrap(), id])).unwrap()
}

#[test]
fn a_transfer_stopped_by_sigterm_resumes_where_it_stopped() {
    let s = Scratch::new();
    let pool = Pool::start(&s, 1);
    let vdis = pool.vdis();
    let vdi = &vdis[0];
    let fast = config(&s, &pool, &vdis, "", "retries = 0");
    // Slow reads (1 MiB/s) so that the run is stopped mid-transfer.
    let slow = s.path("slow.toml");
    let text = std::fs::read_to_string(&fast).unwrap();
    std::fs::write(&slow, format!("{text}bandwidth = \"1M\"\n")).unwrap();
    assert!(run_job(&s, &fast, true).status.success());
    let changed = pool.sim().churn(vdi, 200, 7).unwrap();

    let child = s
        .command()
        .args(["backup", "--json", "--config"])
        .arg(&slow)
        .args(["--job", "nightly"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while pool.data_snapshots().is_empty() {
        assert!(Instant::now() < deadline, "the run never took a snapshot");
        std::thread::sleep(Duration::from_millis(20));
    }
    // About 4 of the 12.5 MiB to read.
    std::thread::sleep(Duration::from_secs(4));
    let (status, stderr) = stop(child);
    assert!(!status.success(), "the run ended before it was stopped");
    assert!(
        pool.data_snapshots().is_empty(),
        "{:?}",
        pool.data_snapshots()
    );

    // The guest writes on: one block the stopped run had read, one it had
    // not, and one it was never asked for.
    let first = changed[0];
    let last = *changed.last().unwrap();
    let untouched = (0..512).find(|b| !changed.contains(b)).unwrap();
    pool.sim()
        .write_blocks(vdi, &[first, last, untouched], 99)
        .unwrap();

    let out = run_job(&s, &fast, true);
    let row = rows(&out).into_iter().next().unwrap();
    assert_eq!(row["mode"]["kind"], "incremental", "{row}");
    let manifest = manifest_of(&s, row["id"].as_str().unwrap());
    let details = &manifest["source"]["details"];
    let kept: u64 = details["resumed_blocks"]
        .as_str()
        .unwrap_or_else(|| panic!("not resumed: {manifest}\n{stderr}"))
        .parse()
        .unwrap();
    let read = manifest["stats"]["blocks_read"].as_u64().unwrap();
    let marked = manifest["mode"]["changed_blocks"].as_u64().unwrap();
    assert_eq!(marked, 201, "CBT since the base: the churn and one more");
    eprintln!("resumed: kept {kept}, read {read}, marked {marked}");
    assert!(kept > 0 && kept < 200, "kept {kept} of 200");
    // Read: what CBT marks, less what was kept (the block read before and
    // written since is not kept).
    assert_eq!(read + kept, marked, "{manifest}");
    assert_same_file(
        &pool.copy_disk(&s, vdi, "disk.img"),
        &s.restore(row["id"].as_str().unwrap(), "resumed.img"),
    );
    assert!(s.verify(true).0, "verify --read-data after the resume");

    // The next run is an ordinary incremental, with nothing to resume.
    pool.sim().churn(vdi, 3, 8).unwrap();
    let row = rows(&run_job(&s, &fast, true)).into_iter().next().unwrap();
    assert_eq!(row["mode"]["kind"], "incremental", "{row}");
    let manifest = manifest_of(&s, row["id"].as_str().unwrap());
    assert!(
        manifest["source"]["details"]["resumed_blocks"].is_null(),
        "{manifest}"
    );
    assert_eq!(manifest["stats"]["blocks_read"], 3);
    assert!(
        pool.sim().vdis().iter().filter(|v| v.is_a_snapshot).count() == 1,
        "only the new base is left: {:?}",
        pool.sim().vdis()
    );
}
