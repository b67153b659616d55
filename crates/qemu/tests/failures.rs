//! Bad input, leftovers of a killed run, an old QEMU, and the NBD server
//! this crate starts itself.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cbtvault_qemu::{Address, BackupExport, BackupKind, DiskOptions, Error, QemuDisk};
use common::{CLUSTER, Qsd, SIZE, assert_clean, bitmaps, dirty_clusters};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

#[tokio::test]
async fn bad_input_gives_a_clear_error_and_leaves_nothing_behind() {
    let qsd = Qsd::new();
    let error = QemuDisk::connect(qsd.qmp_socket(), "no-such-node")
        .await
        .unwrap_err();
    assert!(matches!(error, Error::NoSuchNode { .. }), "{error:?}");
    let message = error.to_string();
    assert!(
        message.contains("no-such-node") && message.contains("disk-file"),
        "{message}"
    );

    let disk = qsd.disk().await;
    for job in ["", "has space", "much-too-long-for-a-node-name"] {
        let error = disk.prepare(job, None).await.unwrap_err();
        assert!(
            matches!(error, Error::InvalidName { kind: "job", .. }),
            "{error:?}"
        );
    }

    // QEMU's NBD server runs, but not where we were told.
    let options = DiskOptions {
        nbd_socket: Some(qsd.path("elsewhere.sock")),
        ..DiskOptions::default()
    };
    // The monitor serves one client at a time: share the connection.
    let elsewhere = QemuDisk::from_qmp(Arc::clone(disk.qmp()), "disk", options)
        .await
        .unwrap();
    let error = elsewhere.prepare("vm1", None).await.unwrap_err();
    assert!(
        matches!(error, Error::NbdServerElsewhere { .. }),
        "{error:?}"
    );
    assert_clean(&qsd, disk.qmp()).await;

    // A failure half-way (QEMU cannot create the fleece image) is undone.
    let options = DiskOptions {
        work_dir: Some(PathBuf::from("/nonexistent-cbtvault-dir")),
        nbd_socket: Some(qsd.nbd_socket()),
        ..DiskOptions::default()
    };
    let broken = QemuDisk::from_qmp(Arc::clone(disk.qmp()), "disk", options)
        .await
        .unwrap();
    let error = broken.prepare("vm1", None).await.unwrap_err();
    assert!(error.to_string().contains("fleece image"), "{error}");
    assert_clean(&qsd, disk.qmp()).await;
    assert!(bitmaps(&disk).await.is_empty());

    // A failure after the transaction (the export name is taken) also
    // undoes the bitmaps: the old checkpoint records again, no new one.
    let first = disk.prepare("vm1", None).await.unwrap();
    let c1 = first.checkpoint().clone();
    disk.commit(first).await.unwrap();
    disk.qmp()
        .block_export_add(
            json!({"type": "nbd", "id": "squatter", "node-name": "disk", "name": "cbtv-vm1"}),
        )
        .await
        .unwrap();
    let error = disk.prepare("vm1", Some(&c1)).await.unwrap_err();
    assert!(error.to_string().contains("exporting"), "{error}");
    disk.qmp()
        .block_export_del("squatter", true, std::time::Duration::from_secs(5))
        .await
        .unwrap();
    assert_clean(&qsd, disk.qmp()).await;
    assert_eq!(bitmaps(&disk).await, [c1.to_string()]);
    let bitmap = &disk.checkpoints().await.unwrap()[0];
    assert!(bitmap.recording && !bitmap.busy);
}

#[tokio::test]
async fn leftovers_of_a_killed_run_are_found_removed_and_the_checkpoints_repaired() {
    let qsd = Qsd::new();
    let c1 = {
        let disk = qsd.disk().await;
        let export = disk.prepare("vm1", None).await.unwrap();
        let c1 = export.checkpoint().clone();
        disk.commit(export).await.unwrap();
        c1
    };
    qsd.write(0x21, 2 * CLUSTER, CLUSTER);
    {
        // A run that dies between prepare and commit (the restore point was
        // not recorded): export, nodes and job stay, c1 stays frozen.
        let disk = qsd.disk().await;
        let killed = disk.prepare("vm1", Some(&c1)).await.unwrap();
        drop(killed);
    }
    qsd.write(0x22, 9 * CLUSTER, CLUSTER);

    let disk = qsd.disk().await;
    let error = disk.prepare("vm1", Some(&c1)).await.unwrap_err();
    let Error::Leftovers { items, .. } = &error else {
        panic!("expected Leftovers, got {error:?}");
    };
    assert!(items.contains(&"export cbtv-vm1".to_owned()), "{items:?}");
    assert!(
        items.contains(&"job cbtv-vm1-backup".to_owned()),
        "{items:?}"
    );
    assert!(error.to_string().contains("cleanup_leftovers"));
    // Another job's name is not confused with this one's.
    disk.cleanup_leftovers("vm").await.unwrap();
    assert!(disk.prepare("vm1", Some(&c1)).await.is_err());

    let removed = disk.cleanup_leftovers("vm1").await.unwrap();
    assert!(
        removed.iter().any(|r| r.starts_with("file ")),
        "{removed:?}"
    );
    assert_clean(&qsd, disk.qmp()).await;
    assert!(disk.cleanup_leftovers("vm1").await.unwrap().is_empty());

    // c1 is frozen; the killed run's checkpoint holds the writes since.
    // prepare merges it back, so nothing written since c1 is missed.
    let export = disk.prepare("vm1", Some(&c1)).await.unwrap();
    let context = format!("qemu:dirty-bitmap:{c1}");
    assert_eq!(dirty_clusters(&export.nbd_uri(), &context), [2, 9]);
    let c3 = export.checkpoint().clone();
    assert_eq!(bitmaps(&disk).await.len(), 2);
    disk.commit(export).await.unwrap();
    assert_eq!(bitmaps(&disk).await, [c3.to_string()]);

    // A run that dies after its restore point was recorded: the caller
    // passes the new checkpoint, and the frozen old one is dropped.
    let killed = disk.prepare("vm1", Some(&c3)).await.unwrap();
    let c4 = killed.checkpoint().clone();
    drop(killed);
    qsd.write(0x23, 5 * CLUSTER, CLUSTER);
    disk.cleanup_leftovers("vm1").await.unwrap();
    let export = disk.prepare("vm1", Some(&c4)).await.unwrap();
    assert!(matches!(export.kind(), BackupKind::Incremental { .. }));
    let context = format!("qemu:dirty-bitmap:{c4}");
    assert_eq!(dirty_clusters(&export.nbd_uri(), &context), [5]);
    let c5 = export.checkpoint().clone();
    disk.commit(export).await.unwrap();
    assert_eq!(bitmaps(&disk).await, [c5.to_string()]);
    assert_clean(&qsd, disk.qmp()).await;
}

#[tokio::test]
async fn an_nbd_server_is_started_when_none_runs_and_stopped_after() {
    let qsd = Qsd::with_guest_export(false);
    let disk = QemuDisk::connect(qsd.qmp_socket(), "disk").await.unwrap();
    let export = disk.prepare("vm1", None).await.unwrap();
    assert_eq!(export.nbd_socket(), qsd.path("cbtv-nbd.sock"));
    let size =
        common::run(std::process::Command::new("nbdinfo").args(["--size", &export.nbd_uri()]));
    assert_eq!(size.trim(), SIZE.to_string());
    disk.commit(export).await.unwrap();
    assert_clean(&qsd, disk.qmp()).await;
    assert!(!qsd.path("cbtv-nbd.sock").exists());
    // Stopped: it can be started again.
    disk.qmp()
        .nbd_server_start_unix(&qsd.path("again.sock"))
        .await
        .unwrap();
    disk.qmp().nbd_server_stop().await.unwrap();
}

/// A QMP peer that claims to be QEMU 6.2 (no snapshot-access) and records
/// the commands it gets.
async fn old_qemu(path: PathBuf, seen: Arc<Mutex<Vec<String>>>) {
    let listener = UnixListener::bind(path).unwrap();
    let Ok((stream, _)) = listener.accept().await else {
        return;
    };
    let (read, mut write) = stream.into_split();
    let greeting = json!({"QMP": {"version": {"qemu": {"major": 6, "minor": 2, "micro": 0}, "package": ""}, "capabilities": []}});
    write
        .write_all(format!("{greeting}\n").as_bytes())
        .await
        .unwrap();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let request: Value = serde_json::from_str(&line).unwrap();
        let command = request["execute"].as_str().unwrap_or_default().to_owned();
        let result = match command.as_str() {
            "query-version" => json!({"qemu": {"major": 6, "minor": 2, "micro": 0}, "package": ""}),
            "query-qmp-schema" => json!([{"name": "9", "meta-type": "enum",
                "values": ["file", "qcow2", "raw", "null-co", "copy-before-write"]}]),
            _ => json!({}),
        };
        seen.lock().unwrap().push(command);
        let reply = json!({"return": result, "id": request["id"]});
        write
            .write_all(format!("{reply}\n").as_bytes())
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_qemu_without_snapshot_access_is_refused_before_anything_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.sock");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let peer = tokio::spawn(old_qemu(path.clone(), Arc::clone(&seen)));
    while !path.exists() {
        tokio::task::yield_now().await;
    }
    let error = QemuDisk::connect_with(Address::Unix(path), "disk", DiskOptions::default())
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, Error::Unsupported { .. }), "{error:?}");
    assert!(
        message.contains("snapshot-access") && message.contains("7.0") && message.contains("6.2.0"),
        "{message}"
    );
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.iter()
            .all(|c| c == "qmp_capabilities" || c.starts_with("query-")),
        "{seen:?}"
    );
    peer.abort();
}

/// The engine spawns these futures on a multi-threaded runtime.
#[allow(dead_code)]
fn the_futures_are_send(disk: &QemuDisk, export: BackupExport, other: BackupExport) {
    fn send<T: Send>(_: T) {}
    send(disk.prepare("vm1", None));
    send(disk.commit(export));
    send(disk.abort(other));
    send(disk.cleanup_leftovers("vm1"));
}
