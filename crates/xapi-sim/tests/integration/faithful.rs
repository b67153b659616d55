//! Places where the simulator answers as xapi does and a naive simulator
//! would not (issue 15): what a client checking these sees on a real pool.

use std::collections::BTreeMap;

use cbtvault_xenapi::{Value, XapiError};

use cbtvault_blockmap::BLOCK_SIZE;

use super::common::{DISK, blocks, client, disk_of, start};

const CBT_OPS: [&str; 4] = [
    "enable_cbt",
    "disable_cbt",
    "data_destroy",
    "list_changed_blocks",
];

fn has(ops: &[String], op: &str) -> bool {
    ops.iter().any(|o| o == op)
}

#[tokio::test]
async fn allowed_operations_leave_out_cbt_and_what_an_attached_vbd_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let c = client(&server).await;
    let (leaf, _) = disk_of(&c, "vm-0").await;
    c.vdi().enable_cbt(&leaf).await.unwrap();

    // Plugged into a running VM: only the live operations.
    let ops = c.vdi().get_record(&leaf).await.unwrap().allowed_operations;
    assert!(has(&ops, "snapshot") && has(&ops, "clone"), "{ops:?}");
    for blocked in ["copy", "resize", "destroy", "forget"] {
        assert!(
            !has(&ops, blocked),
            "{blocked} listed while attached: {ops:?}"
        );
    }
    for op in CBT_OPS {
        assert!(!has(&ops, op), "{op} listed: {ops:?}");
    }

    // A snapshot is attached nowhere: copy, resize and destroy appear.
    let snap = c.vdi().snapshot(&leaf, &BTreeMap::new()).await.unwrap();
    let ops = c.vdi().get_record(&snap).await.unwrap().allowed_operations;
    for op in ["copy", "resize", "destroy"] {
        assert!(
            has(&ops, op),
            "{op} missing on a detached snapshot: {ops:?}"
        );
    }
    for op in CBT_OPS {
        assert!(!has(&ops, op), "{op} listed: {ops:?}");
    }

    // After data_destroy: destroy and forget only, although data_destroy
    // and list_changed_blocks still work on it.
    c.vdi().data_destroy(&snap).await.unwrap();
    let ops = c.vdi().get_record(&snap).await.unwrap().allowed_operations;
    assert_eq!(ops, ["destroy", "forget"]);
    let snap2 = c.vdi().snapshot(&leaf, &BTreeMap::new()).await.unwrap();
    c.vdi().list_changed_blocks(&snap, &snap2).await.unwrap();
    drop(server);
}

#[tokio::test]
async fn optional_parameters_take_the_datamodel_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let c = client(&server).await;
    let (leaf, _) = disk_of(&c, "vm-0").await;
    // VDI.snapshot(vdi) without driver_params.
    let snap = c
        .call("VDI.snapshot", vec![Value::from(&leaf)])
        .await
        .unwrap();
    assert!(snap.as_str().unwrap().starts_with("OpaqueRef:"), "{snap:?}");

    // VM.snapshot(vm, name) and VM.snapshot(vm, name, ignore_vdis).
    let vm = c.vm().get_by_name_label("vm-0").await.unwrap()[0].clone();
    let all = c
        .call("VM.snapshot", vec![Value::from(&vm), Value::from("s1")])
        .await
        .unwrap();
    let all = c
        .vm()
        .get_record(&cbtvault_xenapi::VmRef::new(all.as_str().unwrap()))
        .await
        .unwrap();
    assert_eq!(all.vbds.len(), 1);
    let none = c
        .call(
            "VM.snapshot",
            vec![
                Value::from(&vm),
                Value::from("s2"),
                Value::Array(vec![Value::from(&leaf)]),
            ],
        )
        .await
        .unwrap();
    let none = c
        .vm()
        .get_record(&cbtvault_xenapi::VmRef::new(none.as_str().unwrap()))
        .await
        .unwrap();
    assert!(none.vbds.is_empty(), "the ignored disk was snapshotted");

    // Counts leave the session out; Async forms answer at once.
    for method in ["VDI.snapshot", "Async.VDI.snapshot"] {
        let err = c.call(method, vec![]).await.unwrap_err();
        assert_eq!(
            err.xapi(),
            Some(&XapiError::MessageParameterCountMismatch {
                method: method.into(),
                expected: "2".into(),
                received: "0".into()
            })
        );
    }
}

#[tokio::test]
async fn a_snapshot_of_a_cbt_snapshot_joins_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let c = client(&server).await;
    let (leaf, uuid) = disk_of(&c, "vm-0").await;
    let v = c.vdi();
    let none = BTreeMap::new();
    v.enable_cbt(&leaf).await.unwrap();
    let s1 = v.snapshot(&leaf, &none).await.unwrap();
    server.sim().write_blocks(&uuid, &[3, 17], 1).unwrap();
    let s2 = v.snapshot(&leaf, &none).await.unwrap();
    let copy = v.snapshot(&s2, &none).await.unwrap();
    assert!(v.get_cbt_enabled(&copy).await.unwrap());
    let changed = |from, to| {
        let v = c.vdi();
        async move { blocks(&v.list_changed_blocks(from, to).await.unwrap(), DISK) }
    };
    assert_eq!(changed(&s1, &copy).await, [3, 17]);
    assert_eq!(changed(&copy, &s2).await, Vec::<u64>::new());
    server.sim().write_blocks(&uuid, &[5], 2).unwrap();
    let s3 = v.snapshot(&leaf, &none).await.unwrap();
    assert_eq!(changed(&copy, &s3).await, [5]);
    assert_eq!(changed(&s1, &s3).await, [3, 5, 17]);
    // It is a CBT snapshot like any other: its data can go.
    v.data_destroy(&copy).await.unwrap();
    assert_eq!(changed(&copy, &s3).await, [5]);
}

#[tokio::test]
async fn a_write_that_bypasses_cbt_changes_the_data_but_not_the_changed_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let c = client(&server).await;
    let (leaf, uuid) = disk_of(&c, "vm-0").await;
    let v = c.vdi();
    let none = BTreeMap::new();
    v.enable_cbt(&leaf).await.unwrap();
    let s1 = v.snapshot(&leaf, &none).await.unwrap();
    server.sim().write_blocks(&uuid, &[3], 1).unwrap();
    let data = vec![0xa5u8; 4096];
    server
        .sim()
        .fault_cbt_bypass(&uuid, 9 * BLOCK_SIZE + 512, &data)
        .unwrap();
    // Through the RPC too, as a test in another process would.
    let b64 = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(&data)
    };
    c.call(
        "sim.fault_cbt_bypass",
        vec![
            Value::String(leaf.as_str().to_string()),
            Value::Int((11 * BLOCK_SIZE) as i64),
            Value::String(b64),
        ],
    )
    .await
    .unwrap();
    let s2 = v.snapshot(&leaf, &none).await.unwrap();
    let changed = blocks(&v.list_changed_blocks(&s1, &s2).await.unwrap(), DISK);
    assert_eq!(
        changed,
        [3],
        "the bypassing writes are in no changed-block list"
    );
    let snap = v.get_uuid(&s2).await.unwrap();
    assert_eq!(
        server
            .sim()
            .read(&snap, 9 * BLOCK_SIZE + 512, 4096)
            .unwrap(),
        data
    );
    assert_eq!(
        server.sim().read(&snap, 11 * BLOCK_SIZE, 4096).unwrap(),
        data
    );
}

#[tokio::test]
async fn a_wrong_password_is_answered_late_with_the_user_and_never_retried() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = super::common::config(dir.path());
    config.auth_failure_delay = std::time::Duration::from_millis(200);
    let server = cbtvault_xapi_sim::Simulator::start(config).await.unwrap();
    let mut o = cbtvault_xenapi::ClientOptions::new(
        &server.http_url(),
        "root",
        cbtvault_xenapi::Password::new("wrong"),
    )
    .unwrap();
    o.transport = cbtvault_xenapi::TransportChoice::XmlRpc;
    let started = std::time::Instant::now();
    let err = cbtvault_xenapi::Client::connect(o).await.unwrap_err();
    assert!(started.elapsed() >= std::time::Duration::from_millis(200));
    assert_eq!(
        err.xapi(),
        Some(&XapiError::SessionAuthenticationFailed {
            user: "root".into(),
            message: "Authentication failure".into()
        })
    );
    assert_eq!(server.sim().login_attempts(), (1, 1));

    // The password changes under a running client and its session ends:
    // the client asks once, then keeps the refusal.
    let c = client(&server).await;
    server.sim().set_password("changed");
    server.sim().expire_sessions();
    for _ in 0..5 {
        let err = c.vdi().get_all_records().await.unwrap_err();
        assert!(
            matches!(
                err.xapi(),
                Some(XapiError::SessionAuthenticationFailed { .. })
            ),
            "{err}"
        );
    }
    assert_eq!(server.sim().login_attempts(), (3, 2));
}

#[tokio::test]
async fn disks_without_cbt_get_the_errors_of_a_real_pool() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let c = client(&server).await;
    let sim = server.sim();
    let none = BTreeMap::new();
    let (a, a_uuid) = disk_of(&c, "vm-0").await;
    let (b, b_uuid) = disk_of(&c, "vm-1").await;
    let sr = c.vdi().get_record(&a).await.unwrap().sr;

    // An SR whose driver lacks VDI_CONFIG_CBT: snapshots yes, CBT no.
    sim.set_sr_type_of(&a_uuid, "nocbt").unwrap();
    let err = c.vdi().enable_cbt(&a).await.unwrap_err();
    assert_eq!(
        err.xapi(),
        Some(&XapiError::SrOperationNotSupported {
            sr: sr.as_str().into()
        })
    );
    let s1 = c.vdi().snapshot(&a, &none).await.unwrap();
    let s2 = c.vdi().snapshot(&a, &none).await.unwrap();
    let err = c.vdi().list_changed_blocks(&s1, &s2).await.unwrap_err();
    assert_eq!(err.xapi().unwrap().code(), "SR_OPERATION_NOT_SUPPORTED");
    sim.set_sr_type_of(&a_uuid, "ext").unwrap();

    // A pool whose licence lacks CBT.
    sim.set_cbt_licensed(false).unwrap();
    let err = c.vdi().enable_cbt(&b).await.unwrap_err();
    assert_eq!(
        err.xapi(),
        Some(&XapiError::LicenceRestriction {
            feature: "CBT".into()
        })
    );
    sim.set_cbt_licensed(true).unwrap();

    // A RAW VDI: the storage manager refuses.
    sim.set_raw(&b_uuid).unwrap();
    let err = c.vdi().enable_cbt(&b).await.unwrap_err();
    assert!(
        matches!(
            err.xapi(),
            Some(XapiError::SrBackendFailure { code: 66, .. })
        ),
        "{err}"
    );

    // An unmanaged VDI: refused before anything else.
    sim.set_managed(&a_uuid, false).unwrap();
    for err in [
        c.vdi().snapshot(&a, &none).await.unwrap_err(),
        c.vdi().enable_cbt(&a).await.unwrap_err(),
    ] {
        assert_eq!(err.xapi().unwrap().code(), "VDI_NOT_MANAGED");
        assert_eq!(err.xapi().unwrap().params(), [a.as_str()]);
        assert!(err.to_string().contains("xe sr-scan"), "{err}");
    }
}

#[tokio::test]
async fn vhd_srs_round_sizes_up_to_2_mib_and_dummy_keeps_them() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let c = client(&server).await;
    let (a, a_uuid) = disk_of(&c, "vm-0").await;
    let sr = c.vdi().get_record(&a).await.unwrap().sr;
    const MIB: u64 = 1 << 20;
    let made = c
        .vdi()
        .create(&cbtvault_xenapi::VdiCreate::new("r", sr.clone(), MIB + 1))
        .await
        .unwrap();
    assert_eq!(
        c.vdi().get_record(&made).await.unwrap().virtual_size,
        2 * MIB
    );
    c.vdi().resize(&made, 5 * MIB).await.unwrap();
    assert_eq!(
        c.vdi().get_record(&made).await.unwrap().virtual_size,
        6 * MIB
    );
    // The control surface's resize is the SR's too.
    server.sim().resize(&a_uuid, 4 * MIB + 512).unwrap();
    assert_eq!(c.vdi().get_record(&a).await.unwrap().virtual_size, 6 * MIB);

    server.sim().set_sr_type_of(&a_uuid, "dummy").unwrap();
    let odd = c
        .vdi()
        .create(&cbtvault_xenapi::VdiCreate::new("odd", sr, MIB + 1))
        .await
        .unwrap();
    assert_eq!(
        c.vdi().get_record(&odd).await.unwrap().virtual_size,
        MIB + 1
    );
    server.sim().resize(&a_uuid, 6 * MIB + 1000).unwrap();
    assert_eq!(
        c.vdi().get_record(&a).await.unwrap().virtual_size,
        6 * MIB + 1000
    );
}

#[tokio::test]
async fn clone_copy_checkpoint_and_the_reads_of_a_restore() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let c = client(&server).await;
    let (leaf, uuid) = disk_of(&c, "vm-0").await;
    let rec = c.vdi().get_record(&leaf).await.unwrap();
    let call = |m: &'static str, args: Vec<Value>| {
        let c = c.clone();
        async move { c.call(m, args).await }
    };
    let as_vdi = |v: Value| cbtvault_xenapi::VdiRef::new(v.as_str().unwrap());

    // VDI.clone works live and copies the data; the clone tracks nothing.
    c.vdi().enable_cbt(&leaf).await.unwrap();
    let clone = as_vdi(call("VDI.clone", vec![Value::from(&leaf)]).await.unwrap());
    let crec = c.vdi().get_record(&clone).await.unwrap();
    assert!(!crec.is_a_snapshot && !crec.cbt_enabled);
    assert_eq!(crec.virtual_size, rec.virtual_size);
    let cuuid = crec.uuid.clone();
    assert_eq!(
        server.sim().read(&cuuid, 0, DISK as usize).unwrap(),
        server.sim().read(&uuid, 0, DISK as usize).unwrap()
    );

    // VDI.copy: not while a read-write VBD is attached; a snapshot copies.
    let sr = Value::from(rec.sr.as_str());
    let err = call("VDI.copy", vec![Value::from(&leaf), sr.clone()])
        .await
        .unwrap_err();
    assert_eq!(
        err.xapi(),
        Some(&XapiError::VdiInUse {
            vdi: leaf.as_str().into(),
            operation: "copy".into()
        })
    );
    let snap = c.vdi().snapshot(&leaf, &BTreeMap::new()).await.unwrap();
    let copy = as_vdi(
        call("VDI.copy", vec![Value::from(&snap), sr.clone()])
            .await
            .unwrap(),
    );
    assert!(!c.vdi().get_record(&copy).await.unwrap().is_a_snapshot);

    // Neither on cbt_metadata.
    c.vdi().data_destroy(&snap).await.unwrap();
    for (m, args) in [
        ("VDI.clone", vec![Value::from(&snap)]),
        ("VDI.copy", vec![Value::from(&snap), sr.clone()]),
    ] {
        let err = call(m, args).await.unwrap_err();
        assert_eq!(
            err.xapi(),
            Some(&XapiError::VdiIncompatibleType {
                vdi: snap.as_str().into(),
                vdi_type: "cbt_metadata".into()
            }),
            "{m}"
        );
    }

    // VM.checkpoint: a suspended snapshot VM with the disks.
    let vm = c.vm().get_by_name_label("vm-0").await.unwrap()[0].clone();
    let cp = call("VM.checkpoint", vec![Value::from(&vm), Value::from("cp")])
        .await
        .unwrap();
    let cp = cbtvault_xenapi::VmRef::new(cp.as_str().unwrap());
    let cprec = c.vm().get_record(&cp).await.unwrap();
    assert!(cprec.is_a_snapshot);
    assert_eq!(cprec.vbds.len(), 1);
    c.vm().destroy(&cp).await.unwrap();

    // The SR, its PBD and the NBD network, as a restore reads them.
    let pbds = call("SR.get_PBDs", vec![sr.clone()]).await.unwrap();
    let pbd = pbds.as_array().unwrap()[0].clone();
    let prec = call("PBD.get_record", vec![pbd]).await.unwrap();
    assert_eq!(prec.as_struct().unwrap()["SR"], sr);
    assert_eq!(
        prec.as_struct().unwrap()["currently_attached"],
        Value::Bool(true)
    );
    let nets = call("network.get_all_records", vec![]).await.unwrap();
    let purposes: Vec<Value> = nets
        .as_struct()
        .unwrap()
        .values()
        .map(|n| n.as_struct().unwrap()["purpose"].clone())
        .collect();
    assert_eq!(purposes, [Value::Array(vec![Value::from("nbd")])]);
}

#[tokio::test]
async fn event_from_reports_tasks_as_they_finish() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let c = client(&server).await;
    let (leaf, _) = disk_of(&c, "vm-0").await;
    let from = |token: String, timeout: f64| {
        let c = c.clone();
        async move {
            c.call(
                "event.from",
                vec![
                    Value::Array(vec![Value::from("task")]),
                    Value::from(token),
                    Value::Double(timeout),
                ],
            )
            .await
        }
    };
    let first = from(String::new(), 0.0).await.unwrap();
    let mut token = first.as_struct().unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let task = c
        .call("Async.VDI.snapshot", vec![Value::from(&leaf)])
        .await
        .unwrap();
    let mut status = String::new();
    // Each call waits for the next change; a task makes at most two.
    for _ in 0..10 {
        let got = from(token.clone(), 10.0).await.unwrap();
        let got = got.as_struct().unwrap();
        token = got["token"].as_str().unwrap().to_owned();
        for e in got["events"].as_array().unwrap() {
            let e = e.as_struct().unwrap();
            assert_eq!(e["class"], Value::from("task"));
            if e["ref"] == task && e["operation"] == Value::from("mod") {
                status = e["snapshot"].as_struct().unwrap()["status"]
                    .as_str()
                    .unwrap()
                    .to_owned();
            }
        }
        if !status.is_empty() {
            break;
        }
    }
    assert_eq!(status, "success");
    let err = from("not-a-token".into(), 0.0).await.unwrap_err();
    assert_eq!(
        err.xapi().unwrap().description(),
        ["EVENT_FROM_TOKEN_PARSE_FAILURE", "not-a-token"]
    );
}

/// The client waits for tasks in `event.from`, not by polling: with
/// polling pauses of an hour, an Async call still returns at once.
#[tokio::test]
async fn the_client_waits_for_tasks_with_event_from() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut o = cbtvault_xenapi::ClientOptions::new(
        &server.http_url(),
        "root",
        cbtvault_xenapi::Password::new(super::common::PASSWORD),
    )
    .unwrap();
    let hour = std::time::Duration::from_secs(3600);
    o.task_poll = (hour, hour);
    let c = cbtvault_xenapi::Client::connect(o).await.unwrap();
    let (leaf, _) = disk_of(&c, "vm-0").await;
    let done = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        for _ in 0..3 {
            c.vdi().snapshot(&leaf, &BTreeMap::new()).await.unwrap();
        }
    })
    .await;
    assert!(done.is_ok(), "the Async calls waited for a poll");
}
