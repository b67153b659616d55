//! Starting a simulator and a client for a test.

use std::time::Duration;

use cbtvault_blockmap::BLOCK_SIZE;
use cbtvault_xapi_sim::{PoolSpec, SimConfig, Simulator};
use cbtvault_xenapi::{Client, ClientOptions, Password, TransportChoice, VdiRef};

pub const PASSWORD: &str = "sim-pw";
/// 64 blocks of 64 KiB.
pub const DISK: u64 = 64 * BLOCK_SIZE;

pub fn config(dir: &std::path::Path) -> SimConfig {
    let mut config = SimConfig::new(dir, PASSWORD);
    config.pool = PoolSpec {
        vms: 2,
        disks_per_vm: 1,
        disk_size: DISK,
        initial_blocks: 8,
    };
    config.data_destroy_timeout = Duration::from_millis(300);
    config
}

pub async fn start(dir: &std::path::Path) -> Simulator {
    Simulator::start(config(dir))
        .await
        .expect("simulator starts")
}

pub async fn client_for(url: &str, transport: TransportChoice) -> Client {
    let mut o = ClientOptions::new(url, "root", Password::new(PASSWORD)).unwrap();
    o.transport = transport;
    o.task_poll = (Duration::from_millis(5), Duration::from_millis(50));
    Client::connect(o).await.expect("login")
}

pub async fn client(sim: &Simulator) -> Client {
    client_for(&sim.http_url(), TransportChoice::Auto).await
}

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
