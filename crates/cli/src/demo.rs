//! `cbtvault demo`: the nightly XenServer cycle against the simulator,
//! checked end to end.
//!
//! A simulated pool (XenAPI over HTTPS, xapi-nbd over TLS) runs in this
//! process. Each night the guests write to their disks, then every VDI is
//! backed up exactly as on a real pool: snapshot, changed blocks, NBD read of
//! only those blocks, commit, check, data_destroy. At the end every restore
//! point is restored and compared, byte for byte, with the disk as it was
//! when its snapshot was taken.
//!
//! Beside the pool, a simulated vCenter runs the same nights for as many
//! VMs: a VM snapshot, the changed areas from `QueryChangedDiskAreas`
//! widened to 64 KiB blocks, an NBD read of those, the snapshot removed.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use cbtvault_engine::{FileTarget, NoProgress};
use cbtvault_repo::{BackupMode, InitOptions, Repository};
use cbtvault_runner::{JobSpec, Runner, Silent, Target};
use cbtvault_xapi_sim::{PoolSpec, SimConfig, Simulator};
use tokio_util::sync::CancellationToken;

use crate::cli::Global;
use crate::output::{self, outln};

/// What the demo builds.
pub struct DemoSpec {
    pub vms: usize,
    pub disk_mib: u64,
    pub nights: usize,
    /// Blocks each guest writes per night.
    pub churn: u64,
}

/// A digest of a sparse disk image that reads only its data regions: the
/// BLAKE3 of every non-zero 64 KiB block with its offset, and the size. Two
/// images of one size have equal digests exactly when their bytes are
/// equal, and the holes of multi-GiB disks cost nothing to skip.
fn sparse_digest(path: &Path) -> Result<blake3::Hash> {
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::AsRawFd;
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = file.metadata()?.len();
    let mut hasher = blake3::Hasher::new();
    hasher.update(&size.to_le_bytes());
    let mut block = vec![0u8; 65536];
    let mut pos: i64 = 0;
    while (pos as u64) < size {
        // SAFETY: lseek on a descriptor we own has no memory effects.
        let data = unsafe { libc::lseek(file.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // no data after pos
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(file.as_raw_fd(), data, libc::SEEK_HOLE) }.max(data);
        let mut offset = (data as u64) / 65536 * 65536;
        while offset < (hole as u64).min(size) {
            let len = 65536.min(size - offset) as usize;
            file.read_exact_at(&mut block[..len], offset)?;
            if block[..len].iter().any(|&b| b != 0) {
                hasher.update(&offset.to_le_bytes());
                hasher.update(&block[..len]);
            }
            offset += 65536;
        }
        pos = hole.max(offset as i64);
    }
    Ok(hasher.finalize())
}

pub fn run(g: &Global, dir: Option<&Path>, spec: DemoSpec) -> Result<ExitCode> {
    let tmp;
    let dir = match dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.to_path_buf()
        }
        None => {
            tmp = tempfile::tempdir().context("creating a work directory")?;
            tmp.path().to_path_buf()
        }
    };
    let say = |line: String| {
        if !g.quiet && !g.json {
            outln!("{line}");
        }
    };
    let rt = crate::commands::runtime()?;
    rt.block_on(demo(g, &dir, &spec, &say))
}

async fn demo(g: &Global, dir: &Path, spec: &DemoSpec, say: &dyn Fn(String)) -> Result<ExitCode> {
    let mut config = SimConfig::new(dir.join("pool"), "demo-password");
    config.pool = PoolSpec {
        vms: spec.vms,
        disks_per_vm: 1,
        disk_size: spec.disk_mib << 20,
        initial_blocks: (spec.disk_mib * 16) / 8,
    };
    let sim = Simulator::start(config)
        .await
        .context("starting the simulated pool")?;
    say(format!(
        "simulated XenServer pool at {} (XenAPI over HTTPS) with xapi-nbd over TLS at {}",
        sim.https_url(),
        sim.nbd_addr().map(|a| a.to_string()).unwrap_or_default()
    ));
    let vdis: Vec<(String, u64)> = sim
        .sim()
        .vdis()
        .into_iter()
        .filter(|v| !v.is_a_snapshot && v.vdi_type == "user")
        .map(|v| (v.uuid, v.virtual_size))
        .collect();
    say(format!(
        "{} VMs with one {} MiB sparse VDI each; {} nights, {} blocks written per disk per night\n",
        spec.vms, spec.disk_mib, spec.nights, spec.churn
    ));

    let repo_dir = dir.join("repo");
    let repo = Arc::new(
        Repository::init(&repo_dir, &InitOptions::default()).context("creating the repository")?,
    );
    let pw_file = dir.join("pool.password");
    std::fs::write(&pw_file, "demo-password\n")?;
    let pin_file = dir.join("pool.pem");
    std::fs::write(&pin_file, sim.certificate_pem())?;
    let pool = cbtvault_config::Pool {
        name: "demo".into(),
        url: sim.https_url(),
        username: "root".into(),
        password_file: Some(pw_file),
        password_env: None,
        ca: None,
        pin: Some(pin_file),
        insecure: false,
        allow_insecure_http: false,
        transport: Default::default(),
        nbd_connections: 1,
        max_nbd_connections: 16,
    };
    let mut job = JobSpec::one_off(
        "demo",
        repo_dir.clone(),
        Target::Xen {
            pool,
            vms: Vec::new(),
            vdis: vdis.iter().map(|(uuid, _)| uuid.clone()).collect(),
            consistent: false,
        },
    );
    job.parallel = vdis.len().max(1);
    let runner = Runner::new(&Default::default());

    say(format!(
        "{:<6} {:<38} {:<12} {:>9} {:>8} {:>12} {:>12} {:>7}",
        "night", "vdi", "mode", "size", "changed", "read (NBD)", "new stored", "time"
    ));
    let mut expected: BTreeMap<String, blake3::Hash> = BTreeMap::new();
    let mut results = Vec::new();
    for night in 0..spec.nights {
        if night > 0 {
            for (i, (uuid, _)) in vdis.iter().enumerate() {
                sim.sim()
                    .churn(uuid, spec.churn, (night * 100 + i) as u64)
                    .with_context(|| format!("writing to VDI {uuid}"))?;
            }
        }
        // No guest writes during the backup: the disk now is its snapshot.
        let mut hashes = BTreeMap::new();
        for (uuid, size) in &vdis {
            let file = sim
                .sim()
                .state_dir()
                .join("vdis")
                .join(format!("{uuid}.img"));
            if std::fs::metadata(&file).map(|m| m.len()).ok() != Some(*size) {
                bail!("VDI {uuid} is not at {}", file.display());
            }
            hashes.insert(uuid.clone(), sparse_digest(&file)?);
        }
        let report = runner
            .run(
                &job,
                repo.clone(),
                Arc::new(Silent),
                CancellationToken::new(),
            )
            .await
            .with_context(|| format!("night {}", night + 1))?;
        for disk in report.disks {
            let uuid = disk.label.trim_start_matches("VDI ").to_string();
            let o = disk
                .outcome
                .with_context(|| format!("night {}: backup of VDI {uuid}", night + 1))?;
            let s = &o.manifest.stats;
            let (mode, changed) = match &o.manifest.mode {
                BackupMode::Full { .. } => ("full", "-".to_string()),
                BackupMode::Incremental { changed_blocks, .. } => {
                    ("incremental", changed_blocks.to_string())
                }
            };
            say(format!(
                "{:<6} {:<38} {:<12} {:>9} {:>8} {:>12} {:>12} {:>6.2}s",
                night + 1,
                uuid,
                mode,
                output::bytes(o.manifest.virtual_size),
                changed,
                output::bytes(s.bytes_read),
                output::bytes(s.bytes_stored),
                s.duration_ms as f64 / 1000.0
            ));
            expected.insert(o.restore_point.clone(), hashes[&uuid]);
            results.push(serde_json::json!({
                "night": night + 1, "vdi": uuid, "restore_point": o.restore_point,
                "mode": o.manifest.mode, "stats": o.manifest.stats,
            }));
        }
    }
    let left: Vec<String> = sim
        .sim()
        .vdis()
        .into_iter()
        .filter(|v| v.is_a_snapshot && v.vdi_type != "cbt_metadata")
        .map(|v| v.uuid)
        .collect();
    if !left.is_empty() {
        bail!("snapshots still holding data after the runs: {left:?}");
    }
    say(format!(
        "\nafter {} nights the pool keeps only CBT metadata of the last snapshot of each disk",
        spec.nights
    ));

    vmware_nights(
        dir,
        spec,
        say,
        &runner,
        &repo,
        &repo_dir,
        &mut expected,
        &mut results,
    )
    .await?;

    // Restore every restore point and compare.
    let mut identical = 0;
    for (rp_id, want) in &expected {
        let rp = repo.resolve(rp_id)?;
        let to = dir.join("restored.img");
        let target = FileTarget::create(&to, rp.manifest.virtual_size, true)?;
        let repo2 = repo.clone();
        tokio::task::spawn_blocking(move || {
            cbtvault_engine::restore(
                &repo2,
                &rp,
                &target,
                2,
                &NoProgress,
                &CancellationToken::new(),
            )
        })
        .await??;
        if sparse_digest(&to)? != *want {
            bail!("restore point {rp_id} differs from the snapshot it came from");
        }
        identical += 1;
        std::fs::remove_file(&to).ok();
    }
    say(format!(
        "restored all {identical} restore points: each is byte-for-byte identical to its snapshot"
    ));
    if g.json {
        output::print_json(&serde_json::Value::Array(results));
    }
    sim.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// The nights on a simulated vCenter, one disk per VM; adds each restore
/// point's expected digest to `expected`.
#[allow(clippy::too_many_arguments)]
async fn vmware_nights(
    dir: &Path,
    spec: &DemoSpec,
    say: &dyn Fn(String),
    runner: &Runner,
    repo: &Arc<Repository>,
    repo_dir: &Path,
    expected: &mut BTreeMap<String, blake3::Hash>,
    results: &mut Vec<serde_json::Value>,
) -> Result<()> {
    use cbtvault_vsphere_sim::{SimConfig as VcConfig, Simulator as VcSimulator, VmSpec};
    let mut config = VcConfig::new(dir.join("vcenter"), "demo-password");
    config.vms = (0..spec.vms)
        .map(|i| VmSpec {
            name: format!("vmw{i}"),
            disks: vec![spec.disk_mib << 20],
            powered_on: true,
            cbt_supported: true,
            cbt_enabled: false,
        })
        .collect();
    let sim = VcSimulator::start(config)
        .await
        .context("starting the simulated vCenter")?;
    say(format!(
        "\nsimulated vCenter at {} (vSphere JSON API over HTTPS), snapshots over NBD at {}",
        sim.url(),
        sim.nbd_addr()
    ));
    let pw_file = dir.join("vcenter.password");
    std::fs::write(&pw_file, "demo-password\n")?;
    let pin_file = dir.join("vcenter.pem");
    std::fs::write(&pin_file, sim.certificate_pem())?;
    let vcenter = cbtvault_config::Vcenter {
        name: "demo-vc".into(),
        url: sim.url(),
        username: "administrator@vsphere.local".into(),
        password_file: Some(pw_file),
        password_env: None,
        ca: None,
        pin: Some(pin_file),
        insecure: false,
        nbd_uri: sim.nbd_uri_template(),
        quiesce: false,
        max_disks: 4,
    };
    let vms: Vec<String> = sim.sim().vms().into_iter().map(|(id, _)| id).collect();
    let mut job = JobSpec::one_off(
        "demo-vmware",
        repo_dir.to_path_buf(),
        Target::Vmware {
            vcenter,
            vms: vms.clone(),
            fcds: Vec::new(),
        },
    );
    job.parallel = vms.len().max(1);
    for night in 0..spec.nights {
        for (i, vm) in vms.iter().enumerate() {
            // The first night fills the disk a little; later ones churn.
            let writes = if night == 0 {
                2 * spec.churn
            } else {
                spec.churn
            };
            sim.sim()
                .churn(vm, 2000, writes as usize, (night * 100 + i + 7) as u64)
                .with_context(|| format!("writing to VM {vm}"))?;
        }
        let mut hashes = BTreeMap::new();
        for vm in &vms {
            hashes.insert(vm.clone(), sparse_digest(&sim.sim().disk_path(vm, 2000)?)?);
        }
        let report = runner
            .run(
                &job,
                repo.clone(),
                Arc::new(Silent),
                CancellationToken::new(),
            )
            .await
            .with_context(|| format!("VMware night {}", night + 1))?;
        for disk in report.disks {
            let label = disk.label.clone();
            let o = disk
                .outcome
                .with_context(|| format!("night {}: backup of {label}", night + 1))?;
            let vm = o
                .manifest
                .source
                .details
                .get("vm")
                .cloned()
                .unwrap_or_default();
            let s = &o.manifest.stats;
            let (mode, changed) = match &o.manifest.mode {
                BackupMode::Full { .. } => ("full", "-".to_string()),
                BackupMode::Incremental { changed_blocks, .. } => {
                    ("incremental", changed_blocks.to_string())
                }
            };
            say(format!(
                "{:<6} {:<38} {:<12} {:>9} {:>8} {:>12} {:>12} {:>6.2}s",
                night + 1,
                format!("{vm}/2000"),
                mode,
                output::bytes(o.manifest.virtual_size),
                changed,
                output::bytes(s.bytes_read),
                output::bytes(s.bytes_stored),
                s.duration_ms as f64 / 1000.0
            ));
            let want = hashes
                .get(&vm)
                .with_context(|| format!("no digest of VM {vm:?}"))?;
            expected.insert(o.restore_point.clone(), *want);
            results.push(serde_json::json!({
                "night": night + 1, "vm": vm, "restore_point": o.restore_point,
                "mode": o.manifest.mode, "stats": o.manifest.stats,
            }));
        }
    }
    for vm in &vms {
        let left = sim.sim().snapshots(vm);
        if !left.is_empty() {
            bail!("VM {vm} still has snapshots after the runs: {left:?}");
        }
    }
    say("the vCenter keeps no snapshot: each was removed after its disks were committed and checked\n".into());
    sim.shutdown().await;
    Ok(())
}
