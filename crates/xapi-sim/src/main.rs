//! `xapi-sim`: a simulated XenServer pool master for testing cbtvault.
//!
//! Without a subcommand it serves a pool kept in `--state`; with one it
//! drives a running simulator through its `sim.*` control calls.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cbtvault_xapi_sim::{PoolSpec, SimConfig, Simulator};
use cbtvault_xenapi::{Client, ClientOptions, Password, TransportChoice, Value};
use clap::{Args, Parser, Subcommand};

const AFTER_HELP: &str = "\
The simulator serves XML-RPC (POST /), JSON-RPC (POST /jsonrpc) and
PUT /import_raw_vdi on --listen, as plain HTTP and as HTTPS on the same
port (a connection starting with a TLS handshake gets TLS). Its certificate
is generated on first start and kept in STATE/host-cert.pem: pin it. The
NBD server (xapi-nbd behaviour: TLS required with the same certificate,
NBD_OPT_EXPORT_NAME only, read-only, 16 connections, export names
/<vdi-uuid>?session_id=<session ref>) listens on --nbd-listen; its
address is what VDI.get_nbd_info returns.

On start it prints one JSON line with the endpoints. It stops on SIGTERM
or Ctrl-C, letting open connections finish. STATE/state.json keeps the
pool across restarts; sessions do not survive a restart, as on a real host.

Control commands (they log in to a running simulator with --url, --user
and --password) act as the guest and the storage manager would:
  xapi-sim list                                VMs, VDIs, CBT state
  xapi-sim churn --vdi UUID --blocks N --seed S   write N random 64 KiB blocks
  xapi-sim write --vdi UUID --block B [--block B...] --seed S
  xapi-sim plug --vdi UUID --vm UUID / unplug --vdi UUID
  xapi-sim resize --vdi UUID --size BYTES
  xapi-sim fault cbt-disable --vdi UUID        CBT silently disabled by SM
  xapi-sim fault cbt-bypass --vdi UUID --offset BYTES [--length N] [--byte B]
                                               a guest write the CBT log misses
  xapi-sim fault expire-sessions               every session becomes invalid
  xapi-sim fault nbd-disconnect --after BYTES  next NBD connection breaks
  xapi-sim fault data-destroy-in-use           next data_destroy: VDI_IN_USE
  xapi-sim fault slow --ms MS --calls N        delay the next N calls (0: all)
  xapi-sim fault clear";

/// A simulated XenServer (XAPI) pool master for cbtvault's tests.
#[derive(Parser)]
#[command(name = "xapi-sim", version, after_help = AFTER_HELP, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Args)]
struct ServeArgs {
    /// Address to serve HTTP and HTTPS on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Directory of the pool's state (created if missing).
    #[arg(long)]
    state: Option<PathBuf>,
    /// Password of the user (the simulator's own; not a real secret).
    #[arg(long, env = "XAPI_SIM_PASSWORD")]
    password: Option<String>,
    /// User that may log in.
    #[arg(long, default_value = "root")]
    user: String,
    /// Address of the NBD server.
    #[arg(long, default_value = "127.0.0.1:10809")]
    nbd_listen: SocketAddr,
    /// Run no NBD server (VDI.get_nbd_info then returns an empty list).
    #[arg(long)]
    no_nbd: bool,
    /// Serve no JSON-RPC, like hosts before XenServer 7.3.
    #[arg(long)]
    no_jsonrpc: bool,
    /// Seconds VDI.data_destroy waits for VBDs to go (XAPI: 4).
    #[arg(long, default_value_t = 4.0)]
    data_destroy_timeout: f64,
    /// Seconds a refused login waits before its answer (XAPI: 5).
    #[arg(long, default_value_t = 5.0)]
    auth_failure_delay: f64,
    /// Seconds after which an idle session expires (XAPI: 86400).
    #[arg(long, default_value_t = 86_400)]
    session_timeout: u64,
    /// Guest VMs of a new pool.
    #[arg(long, default_value_t = 2)]
    vms: usize,
    /// Disks per VM of a new pool.
    #[arg(long, default_value_t = 1)]
    disks_per_vm: usize,
    /// Size of each disk of a new pool, in MiB.
    #[arg(long, default_value_t = 64)]
    disk_size_mib: u64,
}

#[derive(Args)]
struct Conn {
    /// URL of the running simulator.
    #[arg(long, global = true, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// User.
    #[arg(long, global = true, default_value = "root")]
    user: String,
    /// Password.
    #[arg(long, global = true, env = "XAPI_SIM_PASSWORD")]
    password: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// List VMs and VDIs.
    List(Conn),
    /// Write seeded random data into N distinct random blocks of a VDI.
    Churn {
        #[command(flatten)]
        conn: Conn,
        /// VDI UUID (or reference).
        #[arg(long)]
        vdi: String,
        /// Number of 64 KiB blocks.
        #[arg(long)]
        blocks: u64,
        /// Seed of the choice and the data.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Write seeded random data into the given blocks of a VDI.
    Write {
        #[command(flatten)]
        conn: Conn,
        /// VDI UUID (or reference).
        #[arg(long)]
        vdi: String,
        /// Block index (repeat).
        #[arg(long = "block", required = true)]
        blocks: Vec<u64>,
        /// Seed of the data.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Plug a VDI into a running VM.
    Plug {
        #[command(flatten)]
        conn: Conn,
        /// VDI UUID (or reference).
        #[arg(long)]
        vdi: String,
        /// VM UUID (or reference).
        #[arg(long)]
        vm: String,
    },
    /// Unplug a VDI from every guest VM.
    Unplug {
        #[command(flatten)]
        conn: Conn,
        /// VDI UUID (or reference).
        #[arg(long)]
        vdi: String,
    },
    /// Grow a VDI.
    Resize {
        #[command(flatten)]
        conn: Conn,
        /// VDI UUID (or reference).
        #[arg(long)]
        vdi: String,
        /// New size in bytes.
        #[arg(long)]
        size: u64,
    },
    /// Inject a fault.
    Fault {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        fault: Fault,
    },
}

#[derive(Subcommand)]
enum Fault {
    /// The storage manager silently disables CBT on a VDI.
    CbtDisable {
        /// VDI UUID (or reference).
        #[arg(long)]
        vdi: String,
    },
    /// A guest write the VDI's CBT log misses (`list_changed_blocks`
    /// leaves its blocks out): LENGTH bytes of BYTE at OFFSET.
    CbtBypass {
        /// VDI UUID (or reference).
        #[arg(long)]
        vdi: String,
        /// Byte offset.
        #[arg(long)]
        offset: u64,
        /// Bytes written.
        #[arg(long, default_value_t = 65536)]
        length: usize,
        /// The byte written.
        #[arg(long, default_value_t = 0x5a)]
        byte: u8,
    },
    /// Every session becomes invalid.
    ExpireSessions,
    /// The next NBD connection breaks after this many bytes of reads.
    NbdDisconnect {
        /// Bytes.
        #[arg(long)]
        after: u64,
    },
    /// The next VDI.data_destroy waits its timeout and fails with VDI_IN_USE.
    DataDestroyInUse,
    /// The next calls answer late.
    Slow {
        /// Delay in milliseconds.
        #[arg(long)]
        ms: u64,
        /// Number of calls (0: all until cleared).
        #[arg(long, default_value_t = 0)]
        calls: u64,
    },
    /// Clear all pending faults.
    Clear,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        None => runtime.block_on(serve(cli.serve)),
        Some(command) => runtime.block_on(control(command)),
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    let Some(state) = args.state else {
        bail!("--state DIR is required to serve (see --help)");
    };
    let Some(password) = args.password else {
        bail!("--password (or XAPI_SIM_PASSWORD) is required to serve");
    };
    let mut config = SimConfig::new(&state, password);
    config.username = args.user;
    config.jsonrpc = !args.no_jsonrpc;
    config.data_destroy_timeout = Duration::from_secs_f64(args.data_destroy_timeout.max(0.0));
    config.auth_failure_delay = Duration::try_from_secs_f64(args.auth_failure_delay)
        .map_err(|e| anyhow::anyhow!("--auth-failure-delay {}: {e}", args.auth_failure_delay))?;
    config.session_limits.inactive_timeout = Duration::from_secs(args.session_timeout);
    config.nbd_listen = (!args.no_nbd).then_some(args.nbd_listen);
    config.pool = PoolSpec {
        vms: args.vms,
        disks_per_vm: args.disks_per_vm,
        disk_size: args.disk_size_mib << 20,
        ..PoolSpec::default()
    };
    let sim = Simulator::start_on(config, args.listen)
        .await
        .with_context(|| format!("starting the simulator in {}", state.display()))?;
    let endpoints = serde_json::json!({
        "http": sim.http_url(),
        "https": sim.https_url(),
        "nbd": sim.nbd_addr().map(|a| a.to_string()),
        "certificate": sim.sim().certificate_path(),
        "state": state,
    });
    println!("{endpoints}");
    wait_for_stop().await?;
    tracing::info!("stopping");
    sim.shutdown().await;
    Ok(())
}

async fn wait_for_stop() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}

async fn connect(conn: &Conn) -> Result<Client> {
    let Some(password) = &conn.password else {
        bail!("--password (or XAPI_SIM_PASSWORD) is required");
    };
    let mut options = ClientOptions::new(&conn.url, &conn.user, Password::new(password))?;
    options.originator = "xapi-sim-control".into();
    options.transport = TransportChoice::Auto;
    if conn.url.starts_with("https") {
        options.tls = Some(cbtvault_xenapi::TlsTrust::InsecureAcceptAny);
    }
    Client::connect(options)
        .await
        .with_context(|| format!("logging in to {}", conn.url))
}

async fn vdi_ref(client: &Client, id: &str) -> Result<Value> {
    if id.starts_with("OpaqueRef:") {
        return Ok(Value::from(id));
    }
    Ok(Value::from(client.vdi().get_by_uuid(id).await?.as_str()))
}

async fn vm_ref(client: &Client, id: &str) -> Result<Value> {
    if id.starts_with("OpaqueRef:") {
        return Ok(Value::from(id));
    }
    Ok(Value::from(client.vm().get_by_uuid(id).await?.as_str()))
}

fn int(n: u64) -> Value {
    Value::Int(i64::try_from(n).unwrap_or(i64::MAX))
}

async fn control(command: Command) -> Result<()> {
    let conn = match &command {
        Command::List(c)
        | Command::Churn { conn: c, .. }
        | Command::Write { conn: c, .. }
        | Command::Plug { conn: c, .. }
        | Command::Unplug { conn: c, .. }
        | Command::Resize { conn: c, .. }
        | Command::Fault { conn: c, .. } => c,
    };
    let client = connect(conn).await?;
    let result = run_control(&client, &command).await;
    let _ = client.logout().await;
    result
}

async fn run_control(client: &Client, command: &Command) -> Result<()> {
    match command {
        Command::List(_) => list(client).await?,
        Command::Churn {
            vdi, blocks, seed, ..
        } => {
            let r = vdi_ref(client, vdi).await?;
            let written = client
                .call("sim.churn", vec![r, int(*blocks), int(*seed)])
                .await?;
            let blocks: Vec<i64> = written
                .as_array()
                .unwrap_or_default()
                .iter()
                .filter_map(Value::as_i64)
                .collect();
            println!("{}", serde_json::json!({ "blocks": blocks }));
        }
        Command::Write {
            vdi, blocks, seed, ..
        } => {
            let r = vdi_ref(client, vdi).await?;
            let list = Value::Array(blocks.iter().map(|b| int(*b)).collect());
            client
                .call("sim.write_blocks", vec![r, list, int(*seed)])
                .await?;
        }
        Command::Plug { vdi, vm, .. } => {
            let args = vec![vdi_ref(client, vdi).await?, vm_ref(client, vm).await?];
            client.call("sim.plug", args).await?;
        }
        Command::Unplug { vdi, .. } => {
            client
                .call("sim.unplug", vec![vdi_ref(client, vdi).await?])
                .await?;
        }
        Command::Resize { vdi, size, .. } => {
            let args = vec![vdi_ref(client, vdi).await?, int(*size)];
            client.call("sim.resize", args).await?;
        }
        Command::Fault { fault, .. } => {
            let (method, args) = match fault {
                Fault::CbtDisable { vdi } => {
                    ("sim.fault_cbt_disable", vec![vdi_ref(client, vdi).await?])
                }
                Fault::CbtBypass {
                    vdi,
                    offset,
                    length,
                    byte,
                } => {
                    use base64::Engine as _;
                    let data = base64::engine::general_purpose::STANDARD.encode(vec![
                        *byte;
                        (*length).min(
                            64 << 20
                        )
                    ]);
                    let args = vec![
                        vdi_ref(client, vdi).await?,
                        int(*offset),
                        Value::String(data),
                    ];
                    ("sim.fault_cbt_bypass", args)
                }
                Fault::ExpireSessions => ("sim.expire_sessions", vec![]),
                Fault::NbdDisconnect { after } => ("sim.fault_nbd_disconnect", vec![int(*after)]),
                Fault::DataDestroyInUse => ("sim.fault_data_destroy_in_use", vec![]),
                Fault::Slow { ms, calls } => ("sim.fault_slow", vec![int(*ms), int(*calls)]),
                Fault::Clear => ("sim.clear_faults", vec![]),
            };
            match client.call(method, args).await {
                // Expiring sessions also expires ours: that is the point.
                Err(e) if method == "sim.expire_sessions" && e.xapi().is_some() => {}
                other => {
                    other?;
                }
            }
        }
    }
    Ok(())
}

async fn list(client: &Client) -> Result<()> {
    let vms = client.vm().get_all_records().await?;
    let vdis = client.vdi().get_all_records().await?;
    let vbds = client.vbd().get_all_records().await?;
    let mut out = Vec::new();
    for (vm_ref, vm) in &vms {
        let disks: Vec<_> = vbds
            .values()
            .filter(|b| &b.vm == vm_ref)
            .filter_map(|b| vdis.get(&b.vdi).map(|v| (b, v)))
            .map(|(b, v)| serde_json::json!({"userdevice": b.userdevice, "vdi": v.uuid}))
            .collect();
        out.push(serde_json::json!({
            "vm": vm.uuid, "name": vm.name_label, "power_state": vm.power_state,
            "is_a_snapshot": vm.is_a_snapshot, "is_control_domain": vm.is_control_domain,
            "disks": disks,
        }));
    }
    let vdi_list: Vec<_> = vdis
        .values()
        .map(|v| {
            serde_json::json!({
                "vdi": v.uuid, "name": v.name_label, "type": v.vdi_type.as_str(),
                "virtual_size": v.virtual_size, "is_a_snapshot": v.is_a_snapshot,
                "cbt_enabled": v.cbt_enabled,
            })
        })
        .collect();
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({"vms": out, "vdis": vdi_list}))?
    );
    Ok(())
}
