//! Restore points that know their VM: `list --vm`, `--since/--until`,
//! `DISK@DATE` and `VM@DATE` selectors, and times in the local time zone
//! (set explicitly through `TZ`) on the terminal, UTC in JSON.
//!
//! Until the providers record the VM, the restore points are labelled
//! through the repository API: each real backup's manifest is committed
//! again with a `VmInfo` and a chosen time.

use std::process::Output;

use cbtvault_repo::{Repository, VmInfo};
use serde_json::Value;

use crate::common::*;

const VM_UUID: &str = "6f1b7c52-0000-4000-8000-00000000abcd";
/// New York's rules as a POSIX TZ string, so no tz database is needed.
const NEW_YORK: &str = "EST5EDT,M3.2.0,M11.1.0";
const UTC: &str = "UTC0";

/// Three nights of VM `web-1` (disk xvda at device 0, disk xvdb at
/// device 1) at 02:00 UTC on 2025-06-01, -02 and -03, and one restore
/// point of a disk outside any VM. Returns the scratch area, the image of
/// xvda and the ids per disk, oldest first.
fn three_nights() -> (Scratch, std::path::PathBuf, Vec<String>, Vec<String>) {
    let s = Scratch::new();
    let a = s.image("xvda.img", 2, 71);
    let b = s.image("xvdb.img", 1, 72);
    let first_a = id(&s.backup("web-1-xvda", &a, None));
    let first_b = id(&s.backup("web-1-xvdb", &b, None));
    s.backup("other", &b, None);
    let repo = Repository::open(&s.repo()).unwrap();
    let mut ids = [Vec::new(), Vec::new()];
    for (n, (first, device)) in [(first_a, "0"), (first_b, "1")].into_iter().enumerate() {
        let base = repo.resolve(&first).unwrap().manifest;
        for day in 1..=3 {
            let mut m = base.clone();
            m.time = format!("2025-06-0{day}T02:00:00Z").parse().unwrap();
            m.source.vm = Some(VmInfo {
                uuid: VM_UUID.into(),
                name: "web-1".into(),
                host: "pool-a".into(),
                disk_label: Some(format!("web-1 disk {device}")),
                device: Some(device.into()),
                metadata: None,
            });
            ids[n].push(repo.commit(&m).unwrap());
        }
        let plan = repo
            .forget_plan(&cbtvault_repo::ForgetSelection::Ids(vec![first]), true)
            .unwrap();
        repo.forget(&plan).unwrap();
    }
    let [ids_a, ids_b] = ids;
    (s, a, ids_a, ids_b)
}

fn run_tz(s: &Scratch, tz: &str, args: &[&str]) -> Output {
    s.command().env("TZ", tz).args(args).output().expect("run")
}

fn ok_tz(s: &Scratch, tz: &str, args: &[&str]) -> String {
    let out = run_tz(s, tz, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails_tz(s: &Scratch, tz: &str, args: &[&str]) -> String {
    let out = run_tz(s, tz, args);
    assert!(!out.status.success(), "{args:?} should fail");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn json_ids(text: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(text).unwrap();
    let items = match v {
        Value::Array(items) => items,
        one => vec![one],
    };
    items.iter().map(id).collect()
}

/// Restore points taken at the same instant list in id order: compare as sets.
fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

#[test]
fn list_filters_by_vm_and_by_time() {
    let (s, _, a, b) = three_nights();
    // By name or uuid: the six restore points of the VM's two disks.
    let by_name = ok_tz(&s, UTC, &["list", "--json", "--vm", "web-1"]);
    let listed: Value = serde_json::from_str(&by_name).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 6);
    for rp in listed {
        assert_eq!(rp["vm"]["uuid"], VM_UUID);
        assert_eq!(rp["vm"]["name"], "web-1");
        assert!(rp["time"].as_str().unwrap().ends_with('Z'), "{rp}");
    }
    assert_eq!(
        json_ids(&ok_tz(&s, UTC, &["list", "--json", "--vm", VM_UUID])),
        json_ids(&by_name)
    );
    // A bare date is a whole local day; in New York the night of the 3rd
    // at 02:00 UTC is still the 2nd.
    let day2_utc = json_ids(&ok_tz(
        &s,
        UTC,
        &[
            "list",
            "--json",
            "--vm",
            "web-1",
            "--since",
            "2025-06-02",
            "--until",
            "2025-06-02",
        ],
    ));
    assert_eq!(sorted(day2_utc), sorted(vec![a[1].clone(), b[1].clone()]));
    let day2_new_york = json_ids(&ok_tz(
        &s,
        NEW_YORK,
        &[
            "list",
            "--json",
            "--since",
            "2025-06-02",
            "--until",
            "2025-06-02",
        ],
    ));
    assert_eq!(
        sorted(day2_new_york),
        sorted(vec![a[2].clone(), b[2].clone()])
    );
    // RFC 3339 bounds are instants, whatever the zone.
    let since = json_ids(&ok_tz(
        &s,
        NEW_YORK,
        &[
            "list",
            "--json",
            "--disk",
            "web-1-xvda",
            "--since",
            "2025-06-02T02:00:00Z",
            "--until",
            "2025-06-02T02:00:00Z",
        ],
    ));
    assert_eq!(since, [a[1].clone()]);

    // The table shows the VM, the device, and local times with their zone.
    let table = ok_tz(&s, NEW_YORK, &["list", "--vm", "web-1"]);
    assert!(
        table.contains("web-1:0") && table.contains("web-1:1"),
        "{table}"
    );
    assert!(table.contains("2025-06-01 22:00:00 EDT"), "{table}");
    let other: Value =
        serde_json::from_str(&ok_tz(&s, UTC, &["list", "--json", "--disk", "other"])).unwrap();
    assert!(other[0].get("vm").is_none(), "vm only when known: {other}");
    let table = ok_tz(&s, UTC, &["list", "--disk", "other"]);
    assert!(table.contains(" - "), "a disk outside any VM: {table}");

    let err = fails_tz(&s, UTC, &["list", "--vm", "nope"]);
    assert!(
        err.contains("nope") && err.contains(&format!("web-1 ({VM_UUID})")),
        "{err}"
    );
    let err = fails_tz(&s, UTC, &["list", "--since", "yesterday"]);
    assert!(
        err.contains("--since") && err.contains("2026-11-28"),
        "{err}"
    );
}

#[test]
fn disk_at_date_picks_the_newest_at_or_before_the_end_of_that_local_day() {
    let (s, image, a, _) = three_nights();
    let show = |tz, spec: &str| json_ids(&ok_tz(&s, tz, &["show", "--json", spec]));
    assert_eq!(show(UTC, "web-1-xvda@2025-06-02"), [a[1].clone()]);
    assert_eq!(show(NEW_YORK, "web-1-xvda@2025-06-02"), [a[2].clone()]);
    assert_eq!(show(UTC, "web-1-xvda@2025-06-02T01:59:59Z"), [a[0].clone()]);
    assert_eq!(show(UTC, "web-1-xvda@2025-06-02T02:00:00Z"), [a[1].clone()]);
    assert_eq!(show(UTC, "web-1-xvda@2030-01-01"), [a[2].clone()]);
    assert_eq!(show(UTC, "web-1-xvda@latest"), [a[2].clone()]);

    // Every command that names a restore point takes the selector.
    let to = s.path("restored.img");
    ok_tz(
        &s,
        UTC,
        &[
            "restore",
            "--quiet",
            "web-1-xvda@2025-06-01",
            "--to",
            to.to_str().unwrap(),
        ],
    );
    assert_same_file(&image, &to);
    ok_tz(
        &s,
        UTC,
        &["diff", "web-1-xvda@2025-06-01", "web-1-xvda@2025-06-03"],
    );

    let err = fails_tz(&s, UTC, &["show", "web-1-xvda@2025-05-31"]);
    assert!(
        err.contains("\"web-1-xvda\" has no restore point at or before 2025-05-31 23:59:59"),
        "{err}"
    );
    let err = fails_tz(&s, UTC, &["show", "web-1-xvda@2025-13-01"]);
    assert!(err.contains("\"2025-13-01\" is not a time"), "{err}");
}

#[test]
fn vm_at_date_names_one_restore_point_per_disk() {
    let (s, image, a, b) = three_nights();
    // Two disks: a command that takes one restore point says which to give.
    let err = fails_tz(&s, UTC, &["show", "web-1@2025-06-02"]);
    assert!(
        err.contains("names 2 disks")
            && err.contains("web-1-xvda@2025-06-02 (device 0)")
            && err.contains("web-1-xvdb@2025-06-02 (device 1)"),
        "{err}"
    );
    let err = fails_tz(
        &s,
        UTC,
        &[
            "restore",
            &format!("{VM_UUID}@latest"),
            "--to",
            "/nonexistent/x",
        ],
    );
    assert!(err.contains("web-1-xvda@latest (device 0)"), "{err}");
    let err = fails_tz(&s, UTC, &["show", "nope@2025-06-02"]);
    assert!(
        err.contains("no disk named \"nope\"") && err.contains("web-1"),
        "{err}"
    );

    // With one disk left in the VM, VM@DATE is that disk's restore point.
    let repo = s.repo();
    let repo = repo.to_str().unwrap();
    let mut forget = vec!["forget", "--repo", repo, "--allow-forget-last"];
    forget.extend(b.iter().map(String::as_str));
    ok_tz(&s, UTC, &forget);
    let shown = json_ids(&ok_tz(&s, UTC, &["show", "--json", "web-1@2025-06-02"]));
    assert_eq!(shown, [a[1].clone()]);
    let to = s.path("vm.img");
    ok_tz(
        &s,
        UTC,
        &[
            "restore",
            "--quiet",
            "web-1@2025-06-03",
            "--to",
            to.to_str().unwrap(),
        ],
    );
    assert_same_file(&image, &to);
    let text = ok_tz(&s, NEW_YORK, &["show", "web-1@latest"]);
    assert!(
        text.contains("web-1 (6f1b7c52") && text.contains("device: 0"),
        "{text}"
    );
    assert!(text.contains("2025-06-02 22:00:00 EDT"), "{text}");
}

/// A manual backup of a file or NBD source can say which VM it is of.
#[test]
fn a_manual_backup_records_the_vm_it_is_given() {
    let s = Scratch::new();
    let image = s.image("root.img", 1, 81);
    let source = format!("file:{}", image.display());
    let out = ok_tz(
        &s,
        UTC,
        &[
            "backup",
            "--json",
            "--disk",
            "db-1-root",
            "--source",
            &source,
            "--vm-uuid",
            VM_UUID,
            "--vm-name",
            "db-1",
            "--vm-host",
            "host-7",
            "--vm-device",
            "xvda",
        ],
    );
    let rp = the_restore_point(&out);
    assert_eq!(rp["vm"]["name"], "db-1");
    assert_eq!(rp["vm"]["host"], "host-7");
    assert_eq!(rp["vm"]["device"], "xvda");
    let listed = json_ids(&ok_tz(&s, UTC, &["list", "--json", "--vm", "db-1"]));
    assert_eq!(listed, [id(&rp)]);
    let to = s.path("back.img");
    ok_tz(
        &s,
        UTC,
        &[
            "restore",
            "--quiet",
            "db-1@latest",
            "--to",
            to.to_str().unwrap(),
        ],
    );
    assert_same_file(&image, &to);
    // The uuid alone is not enough to find the VM by name later.
    let err = fails_tz(
        &s,
        UTC,
        &[
            "backup",
            "--disk",
            "d",
            "--source",
            &source,
            "--vm-uuid",
            VM_UUID,
        ],
    );
    assert!(
        err.contains("--vm-name") && err.contains("--vm-host"),
        "{err}"
    );
}
