//! `vsphere-sim`: a simulated vCenter (the vSphere JSON API calls of a
//! changed-block backup, with NBD exports of snapshots) for testing
//! cbtvault. Control it over HTTP under `/sim/` (see --help).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use cbtvault_vsphere_sim::{SimConfig, Simulator, VmSpec};
use clap::Parser;

const AFTER_HELP: &str = "\
On start it prints one JSON line: the HTTPS URL, the NBD address, the NBD
URI template cbtvault takes (nbd_uri in [[vcenter]]) and the certificate
file to pin. STATE keeps the inventory and sparse disk images across
restarts; sessions and tasks do not survive one, as on a real vCenter.

Control calls (plain JSON over the same HTTPS port, no session):
  GET  /sim/inventory                          VMs and FCDs
  GET  /sim/nbd/{snapshot}/{key}               the NBD URI of a snapshot disk
  POST /sim/churn      {vm, key, count, seed}  random writes at any alignment
  POST /sim/resize     {vm, key, size}         grow a disk
  POST /sim/reset-cbt  {vm}                    a new CBT epoch on every disk
  POST /sim/expire-sessions
  POST /sim/fault {kind: task, method, fault}  next task of METHOD fails
                  {kind: query}                next query: FileFault
                  {kind: slow, ms}             every answer waits
                  {kind: nbd, bytes}           NBD reads fail after BYTES
                  {kind: expire-after, calls}  sessions end after CALLS calls
                  {kind: clear}";

/// A simulated vCenter for cbtvault's tests.
#[derive(Parser)]
#[command(name = "vsphere-sim", version, after_help = AFTER_HELP)]
struct Cli {
    /// Address of the HTTPS API.
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
    /// Address of the NBD server.
    #[arg(long, default_value = "127.0.0.1:10810")]
    nbd_listen: SocketAddr,
    /// Require TLS on NBD.
    #[arg(long)]
    nbd_tls: bool,
    /// The state directory.
    #[arg(long)]
    state: PathBuf,
    #[arg(long, default_value = "administrator@vsphere.local")]
    user: String,
    /// The simulator's password (its own, not a real secret).
    #[arg(long, env = "VSPHERE_SIM_PASSWORD")]
    password: String,
    /// VMs made on first start.
    #[arg(long, default_value_t = 1)]
    vms: usize,
    /// Disks per VM.
    #[arg(long, default_value_t = 1)]
    disks: usize,
    /// Size of each disk in MiB.
    #[arg(long, default_value_t = 64)]
    disk_mib: u64,
    /// Most extents per changed-areas answer.
    #[arg(long, default_value_t = 2000)]
    page_extents: usize,
    /// How long tasks stay running, in milliseconds.
    #[arg(long, default_value_t = 30)]
    task_delay_ms: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut config = SimConfig::new(&cli.state, cli.password);
    config.user = cli.user;
    config.listen = cli.listen;
    config.nbd_listen = cli.nbd_listen;
    config.nbd_tls = cli.nbd_tls;
    config.page_extents = cli.page_extents;
    config.task_delay = Duration::from_millis(cli.task_delay_ms);
    config.vms = (0..cli.vms)
        .map(|i| VmSpec {
            name: format!("vm{i}"),
            disks: vec![cli.disk_mib << 20; cli.disks],
            powered_on: true,
            cbt_supported: true,
            cbt_enabled: false,
        })
        .collect();
    let sim = Simulator::start(config).await.context("starting")?;
    println!(
        "{}",
        serde_json::json!({
            "url": sim.url(),
            "nbd": sim.nbd_addr().to_string(),
            "nbd_uri": sim.nbd_uri_template(),
            "certificate": cli.state.join("host-cert.pem"),
            "vms": sim.sim().vms(),
        })
    );
    tokio::signal::ctrl_c()
        .await
        .context("waiting for a signal")?;
    sim.shutdown().await;
    Ok(())
}
