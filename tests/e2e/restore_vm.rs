//! Issue 13, whole-VM restore: `restore-vm VM@DATE` rebuilds a VM backed
//! up by a VM-level job — its CPUs, memory, platform and boot settings,
//! its disks byte-exact at their device positions, its VIFs with their
//! MACs — halted unless `--start`; bad input and a failure half-way leave
//! nothing behind in the pool.

use std::path::PathBuf;

use cbtvault_xenapi::{Client, Value};
use serde_json::Value as Json;

use crate::common::*;
use crate::xen::Pool;

/// The pool's objects of each class a restore makes.
async fn counts(client: &Client) -> [usize; 5] {
    let mut out = [0; 5];
    for (i, class) in ["VM", "VDI", "VBD", "VIF", "network"].iter().enumerate() {
        let all = client
            .call(&format!("{class}.get_all"), vec![])
            .await
            .unwrap();
        out[i] = all.as_array().unwrap().len();
    }
    out
}

async fn record(client: &Client, class: &str, r: &str) -> Value {
    client
        .call(&format!("{class}.get_record"), vec![Value::from(r)])
        .await
        .unwrap()
}

fn field(v: &Value, k: &str) -> Value {
    v.as_struct().unwrap()[k].clone()
}

fn text(v: &Value, k: &str) -> String {
    field(v, k).as_str().unwrap_or_default().to_string()
}

struct Setup {
    s: Scratch,
    pool: Pool,
    config: PathBuf,
    vm_uuid: String,
    vm_ref: String,
    disks: Vec<String>,
    sr: String,
    /// The disks as the first run saw them.
    first: Vec<PathBuf>,
    first_time: String,
    macs: Vec<(String, String)>,
    lan: String,
}

fn backup(s: &Scratch, config: &std::path::Path) -> Json {
    let out = s.ok(&[
        "backup",
        "--json",
        "--config",
        config.to_str().unwrap(),
        "--job",
        "vm",
    ]);
    serde_json::from_str(&out).unwrap()
}

/// A VM with two disks and two VIFs (one on the pool's network, one on
/// `old-lan`), backed up twice by a VM-level job with writes between.
fn setup() -> Setup {
    let s = Scratch::new();
    let pool = Pool::start_with(&s, 1, 2);
    let vm = pool
        .sim()
        .vms()
        .into_iter()
        .find(|v| !v.is_a_snapshot && !v.is_control_domain)
        .unwrap();
    let disks = vm.vdis.clone();
    let (sr, lan) = pool.rt.block_on(async {
        let c = pool.login().await;
        let vdi = c.vdi().get_by_uuid(&disks[0]).await.unwrap();
        let sr_ref = c.vdi().get_record(&vdi).await.unwrap().sr;
        let sr = c.sr().get_record(&sr_ref).await.unwrap().uuid;
        let lan = c
            .call(
                "network.create",
                vec![Value::Struct(
                    [("name_label".to_string(), Value::from("old-lan"))].into(),
                )],
            )
            .await
            .unwrap();
        c.call(
            "VIF.create",
            vec![Value::Struct(
                [
                    ("VM".to_string(), Value::from(vm.r#ref.as_str())),
                    ("network".to_string(), lan.clone()),
                    ("device".to_string(), Value::from("1")),
                    ("MAC".to_string(), Value::from("02:aa:bb:cc:dd:01")),
                    ("MTU".to_string(), Value::Int(9000)),
                ]
                .into(),
            )],
        )
        .await
        .unwrap();
        c.logout().await.unwrap();
        (sr, lan.as_str().unwrap().to_string())
    });
    let config = pool.write_config(
        &s,
        "",
        &format!(
            "[[job]]\nname = \"vm\"\nkind = \"xenserver\"\npool = \"sim\"\n\
             vms = [\"{}\"]\nconsistent_vm_snapshot = true",
            vm.uuid
        ),
    );
    let rows = backup(&s, &config);
    let first_time = rows[0]["time"].as_str().unwrap().to_string();
    let first: Vec<PathBuf> = disks
        .iter()
        .enumerate()
        .map(|(i, d)| pool.copy_disk(&s, d, &format!("first-{i}.img")))
        .collect();
    // The guest writes into both disks; the second run sees it.
    for (i, d) in disks.iter().enumerate() {
        pool.sim()
            .write(d, 3 << 20, &vec![0xA5 + i as u8; 256 << 10])
            .unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(1100));
    backup(&s, &config);
    let macs = pool.rt.block_on(async {
        let c = pool.login().await;
        let vm_rec = record(&c, "VM", &vm.r#ref).await;
        let mut macs = Vec::new();
        for vif in field(&vm_rec, "VIFs").as_array().unwrap() {
            let v = record(&c, "VIF", vif.as_str().unwrap()).await;
            macs.push((text(&v, "device"), text(&v, "MAC")));
        }
        macs.sort();
        macs
    });
    Setup {
        s,
        pool,
        config,
        vm_uuid: vm.uuid,
        vm_ref: vm.r#ref,
        disks,
        sr,
        first,
        first_time,
        macs,
        lan,
    }
}

impl Setup {
    fn args(&self, selector: &str, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = [
            "restore-vm",
            "--json",
            selector,
            "--config",
            self.config.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if !extra.contains(&"--sr") {
            a.extend(["--sr".to_string(), self.sr.clone()]);
        }
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    fn restore(&self, selector: &str, extra: &[&str]) -> Json {
        let args = self.args(selector, extra);
        let out = self
            .s
            .ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        serde_json::from_str(&out).unwrap()
    }

    /// Runs a restore that must fail; returns its message, and checks that
    /// the pool holds exactly what it held before.
    fn refused(&self, selector: &str, extra: &[&str]) -> String {
        let before = self.pool.rt.block_on(async {
            let c = self.pool.login().await;
            counts(&c).await
        });
        let args = self.args(selector, extra);
        let err = self
            .s
            .fails(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let after = self.pool.rt.block_on(async {
            let c = self.pool.login().await;
            counts(&c).await
        });
        assert_eq!(
            before, after,
            "left behind [VM, VDI, VBD, VIF, network]: {err}"
        );
        err
    }
}

#[test]
fn restore_vm_rebuilds_the_vm_of_the_first_run_halted_byte_exact_with_its_macs() {
    let t = setup();
    let selector = format!("vm-0@{}", t.first_time);
    let done = t.restore(&selector, &[]);
    assert_eq!(done["power_state"], "Halted", "{done}");
    assert_eq!(done["name"], "vm-0");
    // The original still has those MACs: the operator is told.
    assert!(
        done["notes"].to_string().contains("in use by another VIF"),
        "{done}"
    );
    eprintln!(
        "restore-vm of 2 disks ({} bytes): {} ms",
        done["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["bytes"].as_u64().unwrap())
            .sum::<u64>(),
        done["duration_ms"]
    );
    let new_uuid = done["vm"].as_str().unwrap().to_string();
    assert_ne!(new_uuid, t.vm_uuid);
    t.pool.rt.block_on(async {
        let c = t.pool.login().await;
        let old = record(&c, "VM", &t.vm_ref).await;
        let new_ref = c.vm().get_by_uuid(&new_uuid).await.unwrap();
        let new = record(&c, "VM", new_ref.as_str()).await;
        assert_eq!(text(&new, "power_state"), "Halted");
        for k in [
            "VCPUs_max",
            "VCPUs_at_startup",
            "memory_static_max",
            "memory_dynamic_max",
            "memory_dynamic_min",
            "memory_static_min",
            "platform",
            "HVM_boot_policy",
            "HVM_boot_params",
            "actions_after_crash",
            "domain_type",
        ] {
            assert_eq!(field(&new, k), field(&old, k), "{k}");
        }
        // The disks at their positions, byte-exact with the first run.
        let mut seen = Vec::new();
        for vbd in field(&new, "VBDs").as_array().unwrap() {
            let b = record(&c, "VBD", vbd.as_str().unwrap()).await;
            let device = text(&b, "userdevice");
            let vdi = record(&c, "VDI", &text(&b, "VDI")).await;
            let i: usize = device.parse().unwrap();
            assert_eq!(field(&b, "bootable").as_bool(), Some(i == 0), "device {i}");
            assert!(
                text(&vdi, "name_label").starts_with(&format!("vm-0 disk {i} (restored 20")),
                "{}",
                text(&vdi, "name_label")
            );
            let copy = t
                .pool
                .copy_disk(&t.s, &text(&vdi, "uuid"), &format!("restored-{i}.img"));
            assert_same_file(&t.first[i], &copy);
            seen.push(device);
        }
        seen.sort();
        assert_eq!(seen, ["0", "1"]);
        // The VIFs with their MACs, on their networks.
        let mut macs = Vec::new();
        for vif in field(&new, "VIFs").as_array().unwrap() {
            let v = record(&c, "VIF", vif.as_str().unwrap()).await;
            if text(&v, "device") == "1" {
                assert_eq!(text(&v, "network"), t.lan);
                assert_eq!(field(&v, "MTU").as_i64(), Some(9000));
            }
            macs.push((text(&v, "device"), text(&v, "MAC")));
        }
        macs.sort();
        assert_eq!(macs, t.macs);
    });
    // The disks really differ between the runs: the newest run restores
    // the writes.
    let newest = t.restore("vm-0", &["--name", "vm-0 newest"]);
    assert_eq!(newest["name"], "vm-0 newest");
    let d0 = newest["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == "0")
        .unwrap()["vdi"]
        .as_str()
        .unwrap();
    let now = t.pool.copy_disk(&t.s, &t.disks[0], "now-0.img");
    assert_same_file(&now, &t.pool.copy_disk(&t.s, d0, "newest-0.img"));
}

#[test]
fn restore_vm_starts_maps_networks_and_gives_new_macs_when_asked() {
    let t = setup();
    let selector = format!("vm-0@{}", t.first_time);
    // The dry run prints the plan (disks, sizes, SR, names, networks) and
    // makes nothing.
    let counted = || {
        t.pool.rt.block_on(async {
            let c = t.pool.login().await;
            counts(&c).await
        })
    };
    let before = counted();
    let plan = t.restore(
        &selector,
        &[
            "--dry-run",
            "--start",
            "--name",
            "vm-0 copy",
            "--network-map",
            "old-lan=xenbr0",
        ],
    );
    assert_eq!(counted(), before, "a dry run made something: {plan}");
    assert_eq!(plan["dry_run"], true, "{plan}");
    assert_eq!(plan["name"], "vm-0 copy", "{plan}");
    assert_eq!(plan["sr"], t.sr.as_str(), "{plan}");
    assert_eq!(plan["disks"].as_array().map(Vec::len), Some(2), "{plan}");
    assert!(plan["disks"][0]["bytes"].as_u64().unwrap() > 0, "{plan}");
    assert!(
        plan["vifs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["from_network"].as_str().unwrap().contains("old-lan")),
        "{plan}"
    );
    let text_plan = t.s.ok(&t
        .args(&selector, &["--dry-run", "--network-map", "old-lan=xenbr0"])
        .iter()
        .filter(|a| *a != "--json")
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert!(
        text_plan.contains("dry run: nothing was created"),
        "{text_plan}"
    );
    assert!(text_plan.contains("old-lan"), "{text_plan}");
    assert_eq!(counted(), before);
    let done = t.restore(
        &selector,
        &[
            "--start",
            "--new-macs",
            "--name",
            "vm-0 copy",
            "--network-map",
            "old-lan=xenbr0",
        ],
    );
    assert_eq!(done["power_state"], "Running", "{done}");
    t.pool.rt.block_on(async {
        let c = t.pool.login().await;
        let new_ref = c
            .vm()
            .get_by_uuid(done["vm"].as_str().unwrap())
            .await
            .unwrap();
        let new = record(&c, "VM", new_ref.as_str()).await;
        assert_eq!(text(&new, "power_state"), "Running");
        assert_eq!(text(&new, "name_label"), "vm-0 copy");
        for vif in field(&new, "VIFs").as_array().unwrap() {
            let v = record(&c, "VIF", vif.as_str().unwrap()).await;
            assert!(
                !t.macs.iter().any(|(_, m)| *m == text(&v, "MAC")),
                "MAC kept despite --new-macs"
            );
            let net = record(&c, "network", &text(&v, "network")).await;
            assert_eq!(text(&net, "bridge"), "xenbr0", "mapped off old-lan");
        }
    });
}

#[test]
fn restore_vm_refuses_bad_input_and_undoes_a_failure_half_way() {
    let t = setup();
    let selector = format!("vm-0@{}", t.first_time);
    let err = t.refused("no-such-vm@latest", &[]);
    assert!(err.contains("no-such-vm"), "{err}");
    let err = t.refused(&selector, &["--network-map", "old-lan=no-such-net"]);
    assert!(
        err.contains("no-such-net")
            && err.contains("not in pool")
            && err.contains("nothing was created"),
        "{err}"
    );
    let err = t.refused(&selector, &["--network-map", "typo-lan=xenbr0"]);
    assert!(
        err.contains("typo-lan") && err.contains("--network-map"),
        "{err}"
    );
    let err = t.refused(&selector, &["--network-map", "old-lan"]);
    assert!(err.contains("OLD=NEW"), "{err}");
    let err = t.refused(&selector, &["--sr", "00000000-0000-4000-8000-000000000000"]);
    assert!(err.contains("no SR"), "{err}");
    // A full SR: refused before anything is made.
    t.pool.sim().set_sr_size(&t.sr, 40 << 20).unwrap();
    let err = t.refused(&selector, &[]);
    assert!(err.contains("free") && err.contains("--sr"), "{err}");
    t.pool.sim().set_sr_size(&t.sr, 64 << 40).unwrap();
    // The second disk's upload breaks half-way: the VM, the first disk
    // and its VBD, everything goes again.
    t.pool.sim().fault_import_break(1, 8 << 20);
    let err = t.refused(&selector, &[]);
    assert!(err.contains("uploading"), "{err}");
    // The VM's old-lan goes: a restore must be told where its VIF goes.
    t.pool.rt.block_on(async {
        let c = t.pool.login().await;
        let vm_rec = record(&c, "VM", &t.vm_ref).await;
        for vif in field(&vm_rec, "VIFs").as_array().unwrap() {
            let v = record(&c, "VIF", vif.as_str().unwrap()).await;
            if text(&v, "device") == "1" {
                c.call("VIF.destroy", vec![vif.clone()]).await.unwrap();
            }
        }
        c.call("network.destroy", vec![Value::from(t.lan.as_str())])
            .await
            .unwrap();
    });
    let err = t.refused(&selector, &[]);
    assert!(
        err.contains("old-lan") && err.contains("=NETWORK") && err.contains("--network-map"),
        "{err}"
    );
    let done = t.restore(&selector, &["--network-map", "old-lan=xenbr0"]);
    assert_eq!(done["vifs"].as_array().map(Vec::len), Some(2), "{done}");
    // A disk backed up on its own knows its VM but saved no metadata.
    let lone = t.pool.backup(&t.s, &t.disks[0]);
    let err = t.refused(lone["id"].as_str().unwrap(), &[]);
    assert!(
        err.contains("saved no VM metadata") && err.contains("one by one"),
        "{err}"
    );
    // A VM restore point without saved metadata.
    let repo = cbtvault_repo::Repository::open(&t.s.repo()).unwrap();
    let rows = repo.catalogue().restore_points(None).unwrap();
    let mut m = rows
        .iter()
        .find(|rp| rp.manifest.source.vm.is_some())
        .unwrap()
        .manifest
        .clone();
    m.time = "2020-01-01T00:00:00Z".parse().unwrap();
    if let Some(vm) = m.source.vm.as_mut() {
        vm.metadata = None;
    }
    repo.commit(&m).unwrap();
    drop(repo);
    let err = t.refused("vm-0@2020-01-02", &[]);
    assert!(err.contains("saved no VM metadata"), "{err}");
}
