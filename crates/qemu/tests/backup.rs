//! Full, incremental, commit and abort against a real qemu-storage-daemon.

mod common;

use cbtvault_qemu::{BackupKind, CheckpointState};
use common::{CLUSTER, Qsd, SIZE, assert_clean, bitmaps, dirty_clusters, map, read_uri, run};

const MIB: u64 = 1 << 20;

#[tokio::test]
async fn first_backup_is_a_point_in_time_view_and_commit_leaves_nothing() {
    let qsd = Qsd::new();
    qsd.write(0xaa, 0, CLUSTER);
    qsd.write(0xbb, MIB + 4096, 4096);
    let before = qsd.read_guest();
    let disk = qsd.disk().await;

    let export = disk.prepare("vm1", None).await.unwrap();
    assert_eq!(export.kind(), &BackupKind::Full);
    assert_eq!(export.dirty_bitmap_context(), None);
    assert_eq!(export.size(), SIZE);
    assert_eq!(export.export_name(), "cbtv-vm1");
    assert!(export.fleece_path().exists());

    // The guest goes on writing; the export keeps the old data.
    qsd.write(0xdd, 0, CLUSTER);
    qsd.write(0xee, 20 * MIB, 2 * CLUSTER);
    let snapshot = read_uri(&export.nbd_uri(), &qsd.path("export.raw"));
    assert!(
        snapshot == before,
        "the export changed with the guest's writes"
    );
    let live = qsd.read_guest();
    assert_eq!(live[0], 0xdd);
    assert_eq!(live[(20 * MIB) as usize], 0xee);
    assert_eq!(snapshot[0], 0xaa);
    assert_eq!(snapshot[(20 * MIB) as usize], 0);
    // base:allocation shows the data written before, not the new write.
    let allocation = map(&export.nbd_uri(), None);
    let data_at = |offset: u64| {
        allocation
            .iter()
            .any(|&(o, l, flags)| o <= offset && offset < o + l && flags & 1 == 0)
    };
    assert!(data_at(0) && data_at(MIB + 4096));
    assert!(!data_at(20 * MIB), "{allocation:?}");

    // The new checkpoint records from the transaction on: 3 clusters.
    let state = disk.checkpoint_state(export.checkpoint()).await.unwrap();
    assert_eq!(
        state,
        CheckpointState::Present {
            recording: true,
            dirty_bytes: 3 * CLUSTER
        }
    );

    let checkpoint = export.checkpoint().clone();
    disk.commit(export).await.unwrap();
    assert_clean(&qsd, disk.qmp()).await;
    assert_eq!(bitmaps(&disk).await, [checkpoint.to_string()]);
}

#[tokio::test]
async fn incremental_lists_exactly_the_clusters_written_since_the_checkpoint() {
    let qsd = Qsd::new();
    let disk = qsd.disk().await;
    let first = disk.prepare("vm1", None).await.unwrap();
    let c1 = first.checkpoint().clone();
    disk.commit(first).await.unwrap();

    qsd.write(0x51, MIB + 4096, 4096); // cluster 16
    qsd.write(0x52, 5 * MIB, CLUSTER); // cluster 80
    qsd.write(0x53, 10 * MIB - 32 * 1024, 2 * CLUSTER); // clusters 159..=161

    let export = disk.prepare("vm1", Some(&c1)).await.unwrap();
    let context = format!("qemu:dirty-bitmap:{c1}");
    assert_eq!(export.dirty_bitmap_context(), Some(context.as_str()));
    assert_eq!(export.since(), Some(&c1));
    // Written after the transaction: belongs to the next checkpoint.
    qsd.write(0x54, 20 * MIB, CLUSTER); // cluster 320
    qsd.write(0x55, 5 * MIB, CLUSTER); // cluster 80 again

    assert_eq!(
        dirty_clusters(&export.nbd_uri(), &context),
        [16, 80, 159, 160, 161]
    );
    run(std::process::Command::new("qemu-io").args([
        "-r",
        "-f",
        "raw",
        "-c",
        &format!("read -P 0x52 {} {CLUSTER}", 5 * MIB),
        "-c",
        &format!("read -P 0 {} {CLUSTER}", 20 * MIB),
        &export.nbd_uri(),
    ]));

    let c2 = export.checkpoint().clone();
    disk.commit(export).await.unwrap();
    assert_clean(&qsd, disk.qmp()).await;
    assert_eq!(bitmaps(&disk).await, [c2.to_string()]);

    // The next incremental sees exactly what was written during the last.
    let export = disk.prepare("vm1", Some(&c2)).await.unwrap();
    let context = format!("qemu:dirty-bitmap:{c2}");
    assert_eq!(dirty_clusters(&export.nbd_uri(), &context), [80, 320]);
    disk.commit(export).await.unwrap();
    assert_clean(&qsd, disk.qmp()).await;
}

#[tokio::test]
async fn abort_merges_the_changes_back_so_the_next_incremental_sees_them() {
    let qsd = Qsd::new();
    let disk = qsd.disk().await;
    let first = disk.prepare("vm1", None).await.unwrap();
    let c1 = first.checkpoint().clone();
    disk.commit(first).await.unwrap();

    qsd.write(0x31, 3 * CLUSTER, CLUSTER);
    let export = disk.prepare("vm1", Some(&c1)).await.unwrap();
    qsd.write(0x32, 7 * CLUSTER, CLUSTER);
    let failed = export.checkpoint().clone();
    disk.abort(export).await.unwrap();
    assert_clean(&qsd, disk.qmp()).await;
    // Only the old checkpoint is left, and it records again.
    assert_eq!(bitmaps(&disk).await, [c1.to_string()]);
    assert!(matches!(
        disk.checkpoint_state(&c1).await.unwrap(),
        CheckpointState::Present {
            recording: true,
            ..
        }
    ));
    assert_eq!(
        disk.checkpoint_state(&failed).await.unwrap(),
        CheckpointState::Missing
    );
    qsd.write(0x33, 9 * CLUSTER, CLUSTER);

    let export = disk.prepare("vm1", Some(&c1)).await.unwrap();
    let context = format!("qemu:dirty-bitmap:{c1}");
    assert_eq!(dirty_clusters(&export.nbd_uri(), &context), [3, 7, 9]);
    disk.commit(export).await.unwrap();
    assert_clean(&qsd, disk.qmp()).await;

    // Aborting a first backup just drops its checkpoint.
    let qsd = Qsd::new();
    let disk = qsd.disk().await;
    let export = disk.prepare("vm2", None).await.unwrap();
    disk.abort(export).await.unwrap();
    assert_clean(&qsd, disk.qmp()).await;
    assert!(bitmaps(&disk).await.is_empty());
}

#[tokio::test]
async fn a_killed_qemu_makes_the_next_backup_full() {
    let mut qsd = Qsd::new();
    let c1 = {
        let disk = qsd.disk().await;
        let export = disk.prepare("vm1", None).await.unwrap();
        let c1 = export.checkpoint().clone();
        disk.commit(export).await.unwrap();
        c1
    };
    // A bitmap created at run time is saved only on a clean close.
    qsd.kill9();
    qsd.start();
    let c2 = {
        let disk = qsd.disk().await;
        assert_eq!(
            disk.checkpoint_state(&c1).await.unwrap(),
            CheckpointState::Missing
        );
        let export = disk.prepare("vm1", Some(&c1)).await.unwrap();
        match export.kind() {
            BackupKind::NeedsFull { reason } => assert!(reason.contains("not on node"), "{reason}"),
            other => panic!("expected NeedsFull, got {other:?}"),
        }
        assert_eq!(export.dirty_bitmap_context(), None);
        let c2 = export.checkpoint().clone();
        disk.commit(export).await.unwrap();
        c2
    };

    // Saved by a clean stop, loaded (and marked in use) by the next start,
    // then SIGKILL: inconsistent.
    qsd.quit().await;
    qsd.start();
    {
        let disk = qsd.disk().await;
        assert!(matches!(
            disk.checkpoint_state(&c2).await.unwrap(),
            CheckpointState::Present { .. }
        ));
    }
    qsd.kill9();
    qsd.start();
    let disk = qsd.disk().await;
    assert_eq!(
        disk.checkpoint_state(&c2).await.unwrap(),
        CheckpointState::Inconsistent
    );
    let export = disk.prepare("vm1", Some(&c2)).await.unwrap();
    match export.kind() {
        BackupKind::NeedsFull { reason } => assert!(reason.contains("inconsistent"), "{reason}"),
        other => panic!("expected NeedsFull, got {other:?}"),
    }
    // The broken bitmap is gone and a fresh one records.
    assert_eq!(bitmaps(&disk).await, [export.checkpoint().to_string()]);
    let c3 = export.checkpoint().clone();
    disk.commit(export).await.unwrap();
    assert_clean(&qsd, disk.qmp()).await;

    qsd.write(0x77, 2 * CLUSTER, CLUSTER);
    let export = disk.prepare("vm1", Some(&c3)).await.unwrap();
    let context = format!("qemu:dirty-bitmap:{c3}");
    assert_eq!(dirty_clusters(&export.nbd_uri(), &context), [2]);
    disk.commit(export).await.unwrap();
}
