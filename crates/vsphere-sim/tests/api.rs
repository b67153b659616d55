//! The vSphere client against the simulator: sessions, faults, CBT on VM
//! disks and FCDs, paging.

use cbtvault_vsphere::{Client, ClientOptions, Error, Password, TlsTrust, changed_blocks};
use cbtvault_vsphere_sim::{FcdSpec, SimConfig, Simulator, VmSpec};

async fn start(dir: &std::path::Path) -> Simulator {
    let mut config = SimConfig::new(dir.join("sim"), "secret");
    config.vms = vec![VmSpec {
        name: "web".into(),
        disks: vec![4 << 20, 1 << 20],
        powered_on: true,
        cbt_supported: true,
        cbt_enabled: false,
    }];
    config.fcds = vec![FcdSpec {
        name: "data".into(),
        size: 2 << 20,
    }];
    config.task_delay = std::time::Duration::from_millis(5);
    Simulator::start(config).await.unwrap()
}

fn options(sim: &Simulator, password: &str) -> ClientOptions {
    let mut o = ClientOptions::new(
        &sim.url(),
        "administrator@vsphere.local",
        Password::new(password),
    )
    .unwrap();
    o.tls = Some(TlsTrust::pinned_pem(sim.certificate_pem()).unwrap());
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_disk_cbt_cycle_with_paging_and_a_session_lost() {
    let dir = tempfile::tempdir().unwrap();
    let sim = start(dir.path()).await;
    let c = Client::connect(options(&sim, "secret")).await.unwrap();
    let vm = sim.sim().vms()[0].0.clone();
    assert_eq!(
        c.vm_names().await.unwrap(),
        [(vm.clone(), "web".to_string())]
    );
    let config = c.vm_config(&vm).await.unwrap();
    assert_eq!(config.name, "web");
    assert!(!config.change_tracking_enabled);
    assert_eq!(config.disks.len(), 2);
    assert!(c.vm_supports_cbt(&vm).await.unwrap());
    c.enable_vm_cbt(&vm).await.unwrap();
    assert!(c.vm_config(&vm).await.unwrap().change_tracking_enabled);

    sim.sim().write(&vm, 2000, 12345, b"x").unwrap();
    let s1 = c
        .create_vm_snapshot(&vm, "cbtvault-1", "t", false)
        .await
        .unwrap();
    let d1 = c.snapshot_disks(&s1).await.unwrap();
    let c1 = d1[0].change_id.clone().expect("a changeId after the stun");
    assert!(cbtvault_vsphere_sim::parse_change_id(&c1).is_some(), "{c1}");
    // Allocated areas of the first snapshot.
    let all = changed_blocks(d1[0].capacity, "q", |off| {
        c.query_changed_disk_areas(&vm, &s1, 2000, off, "*")
    })
    .await
    .unwrap();
    assert_eq!(all.map.set_blocks().collect::<Vec<_>>(), [0]);

    // Many small writes, small pages.
    for i in 0..40u64 {
        sim.sim()
            .write(&vm, 2000, i * 100_000 + 7, &[1, 2])
            .unwrap();
    }
    sim.sim().set_page_extents(3);
    sim.sim().expire_sessions();
    let s2 = c
        .create_vm_snapshot(&vm, "cbtvault-2", "t", false)
        .await
        .unwrap();
    let d2 = c.snapshot_disks(&s2).await.unwrap();
    assert_ne!(d2[0].change_id.as_deref(), Some(c1.as_str()));
    // Each snapshot's config keeps the file of its own point in time.
    assert_eq!(d1[0].file_name, "[datastore1] web/web.vmdk");
    assert_eq!(d2[0].file_name, "[datastore1] web/web-000001.vmdk");
    let before = sim.sim().queries();
    let changed = changed_blocks(d2[0].capacity, "q", |off| {
        c.query_changed_disk_areas(&vm, &s2, 2000, off, &c1)
    })
    .await
    .unwrap();
    assert!(sim.sim().queries() - before >= 13);
    let want: std::collections::BTreeSet<u64> = (0..40u64)
        .flat_map(|i| [(i * 100_000 + 7) / 65536, (i * 100_000 + 8) / 65536])
        .collect();
    assert_eq!(
        changed
            .map
            .set_blocks()
            .collect::<std::collections::BTreeSet<_>>(),
        want
    );

    // A reset makes the old changeId unusable.
    sim.sim().reset_cbt(&vm).unwrap();
    let s3 = c
        .create_vm_snapshot(&vm, "cbtvault-3", "t", false)
        .await
        .unwrap();
    let e = c
        .query_changed_disk_areas(&vm, &s3, 2000, 0, &c1)
        .await
        .unwrap_err();
    assert!(e.fault().unwrap().invalidates_change_id(), "{e}");
    let e = c
        .query_changed_disk_areas(&vm, &s3, 2000, 0, "garbage")
        .await
        .unwrap_err();
    assert_eq!(
        e.fault().unwrap().invalid_property.as_deref(),
        Some("changeId")
    );
    let e = c
        .query_changed_disk_areas(&vm, &s3, 2000, 4 << 20, "*")
        .await
        .unwrap_err();
    assert_eq!(
        e.fault().unwrap().invalid_property.as_deref(),
        Some("startOffset")
    );

    for s in [&s1, &s2, &s3] {
        c.remove_vm_snapshot(s).await.unwrap();
    }
    assert!(c.vm_snapshots(&vm).await.unwrap().is_empty());
    let e = c.remove_vm_snapshot(&s1).await.unwrap_err();
    assert!(e.is_fault("ManagedObjectNotFound"), "{e}");

    // A failing task carries its fault.
    sim.sim()
        .fail_next_task("CreateSnapshot_Task", "SnapshotFault");
    let e = c.create_vm_snapshot(&vm, "x", "", false).await.unwrap_err();
    assert!(
        matches!(&e, Error::Task { fault, .. } if fault.type_name == "SnapshotFault"),
        "{e}"
    );
    c.logout().await.unwrap();
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fcd_cbt_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let sim = start(dir.path()).await;
    let c = Client::connect(options(&sim, "secret")).await.unwrap();
    let (id, _, ds) = sim.sim().fcds()[0].clone();
    let fcd = c.fcd(&id, &ds).await.unwrap();
    assert_eq!(fcd.capacity, 2 << 20);
    assert!(!fcd.change_tracking_enabled);
    c.enable_fcd_cbt(&id, &ds).await.unwrap();
    assert!(c.fcd(&id, &ds).await.unwrap().change_tracking_enabled);
    let s1 = c.create_fcd_snapshot(&id, &ds, "cbtvault").await.unwrap();
    let c1 = c
        .fcd_snapshot_change_id(&id, &ds, &s1)
        .await
        .unwrap()
        .unwrap();
    sim.sim().write_fcd(&id, 70_000, b"abc").unwrap();
    let s2 = c.create_fcd_snapshot(&id, &ds, "cbtvault").await.unwrap();
    assert_eq!(c.fcd_snapshots(&id, &ds).await.unwrap().len(), 2);
    let changed = changed_blocks(fcd.capacity, "q", |off| {
        c.query_fcd_changed_disk_areas(&id, &ds, &s2, off, &c1)
    })
    .await
    .unwrap();
    assert_eq!(changed.map.set_blocks().collect::<Vec<_>>(), [1]);
    let e = c.fcd(&id, "datastore-999").await.unwrap_err();
    assert!(e.is_fault("InvalidDatastore"), "{e}");
    c.delete_fcd_snapshot(&id, &ds, &s1).await.unwrap();
    c.delete_fcd_snapshot(&id, &ds, &s2).await.unwrap();
    assert!(c.fcd_snapshots(&id, &ds).await.unwrap().is_empty());
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_and_wrong_pin_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let sim = start(dir.path()).await;
    let e = Client::connect(options(&sim, "nope")).await.unwrap_err();
    assert!(e.is_fault("InvalidLogin"), "{e}");
    let other = tempfile::tempdir().unwrap();
    let sim2 = start(other.path()).await;
    let mut o = options(&sim, "secret");
    o.tls = Some(TlsTrust::pinned_pem(sim2.certificate_pem()).unwrap());
    let e = Client::connect(o).await.unwrap_err();
    assert!(matches!(e, Error::PinMismatch { .. }), "{e}");
    sim.shutdown().await;
    sim2.shutdown().await;
}
