//! A cancelled XenServer run leaves the pool as it found it: the snapshot
//! it took (or the VM snapshot and its VDIs) is destroyed, nothing is
//! committed, and the disks can be backed up again at once.

use std::sync::Arc;
use std::time::Duration;

use cbtvault_engine::provider::{DriveContext, SharedProgress, drive};
use cbtvault_engine::xenserver::{XenOptions, XenVdi, XenVm};
use cbtvault_engine::{BackupOptions, Error, NoProgress};
use cbtvault_repo::{InitOptions, Repository};
use cbtvault_xapi_sim::{PoolSpec, SimConfig, Simulator};
use cbtvault_xenapi::{Client, ClientOptions, Password, VmRef};
use tokio_util::sync::CancellationToken;

const PASSWORD: &str = "pw";

struct Env {
    _dir: tempfile::TempDir,
    _sim: Simulator,
    client: Client,
    repo: Arc<Repository>,
    vm: VmRef,
    vm_uuid: String,
}

async fn start() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let mut config = SimConfig::new(dir.path(), PASSWORD);
    config.pool = PoolSpec {
        vms: 1,
        disks_per_vm: 2,
        disk_size: 2 << 20,
        initial_blocks: 2,
    };
    config.data_destroy_timeout = Duration::from_millis(300);
    let sim = Simulator::start(config).await.unwrap();
    let options = ClientOptions::new(&sim.http_url(), "root", Password::new(PASSWORD)).unwrap();
    let client = Client::connect(options).await.unwrap();
    let vm = client.vm().get_by_name_label("vm-0").await.unwrap()[0].clone();
    let vm_uuid = client.vm().get_record(&vm).await.unwrap().uuid;
    let repo = Repository::init(&dir.path().join("repo"), &InitOptions::default()).unwrap();
    Env {
        _dir: dir,
        _sim: sim,
        client,
        repo: Arc::new(repo),
        vm,
        vm_uuid,
    }
}

fn cancelled() -> DriveContext {
    let ctx = DriveContext::new(
        BackupOptions::default(),
        Arc::new(SharedProgress(Arc::new(NoProgress))),
        CancellationToken::new(),
    );
    ctx.cancel.cancel();
    ctx
}

/// Snapshots of the VM and of each of its disks that still exist.
async fn snapshots(env: &Env) -> (usize, usize) {
    let vm = env.client.vm().get_record(&env.vm).await.unwrap();
    let mut vdi_snapshots = 0;
    for vbd in &vm.vbds {
        let v = env.client.vbd().get_record(vbd).await.unwrap();
        let vdi = env.client.vdi().get_record(&v.vdi).await.unwrap();
        vdi_snapshots += vdi.snapshots.len();
    }
    (vm.snapshots.len(), vdi_snapshots)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_vdi_backup_destroys_its_snapshot() {
    let env = start().await;
    let disks = cbtvault_xen::vm_disks(&env.client, &env.vm_uuid)
        .await
        .unwrap();
    let options = XenOptions::new("nightly", "https://pool");
    let mut provider = XenVdi::new(&env.client, &disks[0].vdi_uuid, &options);
    let runs = tokio::time::timeout(
        Duration::from_secs(60),
        drive(&mut provider, env.repo.clone(), &cancelled()),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(runs.len(), 1);
    assert!(matches!(runs[0].outcome, Err(Error::Cancelled)));
    // The VM it belongs to is known, with the disk's position.
    let vm = runs[0].vm.as_ref().unwrap();
    assert_eq!(vm.uuid, env.vm_uuid);
    assert_eq!(vm.device.as_deref(), Some(disks[0].position.as_str()));
    assert_eq!(snapshots(&env).await, (0, 0));
    assert!(env.repo.latest(&runs[0].disk).unwrap().is_none());
    // Nothing is left locked: the next run starts at once.
    cbtvault_engine::lock_disk(&env.repo, &runs[0].disk)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_vm_backup_destroys_the_vm_snapshot_and_its_disks() {
    let env = start().await;
    let options = XenOptions::new("nightly", "https://pool");
    let mut provider = XenVm::new(&env.client, &env.vm_uuid, &options);
    let runs = tokio::time::timeout(
        Duration::from_secs(60),
        drive(&mut provider, env.repo.clone(), &cancelled()),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(runs.len(), 2);
    let mut positions: Vec<&str> = runs
        .iter()
        .map(|r| r.vm.as_ref().unwrap().device.as_deref().unwrap())
        .collect();
    // XAPI lists a VM's VBDs in no promised order.
    positions.sort_unstable();
    assert_eq!(positions, ["0", "1"]);
    for r in &runs {
        assert!(matches!(r.outcome, Err(Error::Cancelled)));
        assert!(env.repo.latest(&r.disk).unwrap().is_none());
        cbtvault_engine::lock_disk(&env.repo, &r.disk)
            .await
            .unwrap();
    }
    assert_eq!(snapshots(&env).await, (0, 0));
}
