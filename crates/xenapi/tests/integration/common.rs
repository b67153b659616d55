//! Starting a simulator and a client for a test.

use std::time::Duration;

use cbtvault_blockmap::BLOCK_SIZE;
use cbtvault_xapi_sim::{PoolSpec, SimConfig, Simulator};
use cbtvault_xenapi::{Client, ClientOptions, Password, TransportChoice, VdiRef};

pub const PASSWORD: &str = "s3cret-pw";
/// 64 blocks of 64 KiB.
pub const DISK: u64 = 64 * BLOCK_SIZE;

pub struct Env {
    pub sim: Simulator,
    _dir: tempfile::TempDir,
}

pub async fn start() -> Env {
    start_with(|_| {}).await
}

pub async fn start_with(adjust: impl FnOnce(&mut SimConfig)) -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = SimConfig::new(dir.path(), PASSWORD);
    config.pool = PoolSpec {
        vms: 2,
        disks_per_vm: 1,
        disk_size: DISK,
        initial_blocks: 4,
    };
    config.data_destroy_timeout = Duration::from_millis(300);
    adjust(&mut config);
    let sim = Simulator::start(config).await.expect("simulator starts");
    Env { sim, _dir: dir }
}

pub fn options(env: &Env, transport: TransportChoice) -> ClientOptions {
    let mut o = ClientOptions::new(&env.sim.http_url(), "root", Password::new(PASSWORD)).unwrap();
    o.transport = transport;
    o.originator = "cbtvault-tests".into();
    o.task_poll = (Duration::from_millis(5), Duration::from_millis(50));
    o
}

pub async fn client(env: &Env, transport: TransportChoice) -> Client {
    Client::connect(options(env, transport))
        .await
        .expect("login")
}

/// Both wire formats.
pub const BOTH: [TransportChoice; 2] = [TransportChoice::JsonRpc, TransportChoice::XmlRpc];

/// The first disk of guest VM `vm-N`: (ref, uuid).
pub async fn disk_of(client: &Client, vm_name: &str) -> (VdiRef, String) {
    let vms = client.vm().get_by_name_label(vm_name).await.unwrap();
    let vm = client.vm().get_record(&vms[0]).await.unwrap();
    let vbd = client.vbd().get_record(&vm.vbds[0]).await.unwrap();
    let uuid = client.vdi().get_uuid(&vbd.vdi).await.unwrap();
    (vbd.vdi, uuid)
}

/// Decodes a changed-block bitmap into block indexes.
pub fn blocks(b64: &str, size: u64) -> Vec<u64> {
    cbtvault_blockmap::BlockMap::from_xenapi_base64(b64, size)
        .expect("well-formed bitmap")
        .set_blocks()
        .collect()
}
