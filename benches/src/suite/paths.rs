//! The ways a disk reaches cbtvault, each as an operator sets it up: a
//! file with a changed-block bitmap, an NBD export (qemu-nbd), a XenServer
//! pool (the simulator: XenAPI, CBT and NBD over TLS), a QEMU guest (a
//! real qemu-storage-daemon with dirty bitmaps) and a vCenter (the
//! simulator: the vSphere API's snapshots and `QueryChangedDiskAreas`,
//! NBD over TLS). The same generated image and the same nights of churn
//! go through each.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};
use cbtvault_blockmap::{BLOCK_SIZE, BlockMap};
use cbtvault_vsphere_sim as vsphere;
use cbtvault_xapi_sim::{PoolSpec, SimConfig, Simulator};

use crate::measure;

/// A disk as cbtvault sees it through one path.
pub trait Guest {
    /// The path's name in the report.
    fn name(&self) -> &'static str;
    /// The raw image that holds the guest's bytes (written by the suite).
    fn image(&self) -> &Path;
    /// `cbtvault backup` arguments naming the source (and, for a file,
    /// the changed-block bitmap of an incremental).
    fn backup_args(&self, bitmap: Option<&Path>) -> Vec<String>;
    /// Makes the hypervisor see the blocks `changed` that the suite wrote
    /// into the image behind its back, by writing them again through the
    /// guest's own I/O path, so that its changed-block tracking marks them.
    fn replay(&self, changed: &BlockMap) -> Result<()>;
}

/// A raw image read as a file, with the suite's bitmap.
pub struct FileGuest(pub PathBuf);

impl Guest for FileGuest {
    fn name(&self) -> &'static str {
        "file"
    }
    fn image(&self) -> &Path {
        &self.0
    }
    fn backup_args(&self, bitmap: Option<&Path>) -> Vec<String> {
        let mut args = vec![
            "--disk".into(),
            "disk".into(),
            "--source".into(),
            format!("file:{}", self.0.display()),
        ];
        if let Some(b) = bitmap {
            args.extend(["--changed-blocks".into(), b.display().to_string()]);
        }
        args
    }
    fn replay(&self, _: &BlockMap) -> Result<()> {
        Ok(())
    }
}

/// A child process killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn listening(socket: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(socket).is_ok()
}

/// qemu-nbd exporting an image read-only on a unix socket.
pub struct QemuNbd {
    _server: Server,
    pub uri: String,
}

impl QemuNbd {
    pub fn start(image: &Path, socket: &Path) -> Result<QemuNbd> {
        let _ = std::fs::remove_file(socket);
        let child = Command::new("qemu-nbd")
            .args(["--read-only", "--persistent", "--shared=8", "--format=raw"])
            .args(["--export-name", "disk", "--socket"])
            .arg(socket)
            .arg(image)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting qemu-nbd (scripts/install-deps installs qemu-utils)")?;
        let server = Server(child);
        measure::wait_until("qemu-nbd", || listening(socket))?;
        Ok(QemuNbd {
            _server: server,
            uri: format!("nbd+unix:///disk?socket={}", socket.display()),
        })
    }

    /// The CPU seconds the server has used so far (it shares the
    /// machine's cores with its client).
    pub fn cpu_s(&self) -> f64 {
        measure::process_cpu_s(self._server.0.id()).unwrap_or(0.0)
    }
}

/// A VDI of a simulated XenServer pool whose data file is the image.
pub struct XenGuest {
    sim: Simulator,
    image: PathBuf,
    vdi: String,
    pin: PathBuf,
    password: PathBuf,
}

impl XenGuest {
    /// A pool with one VM whose one disk is `size` bytes; the suite writes
    /// the image into the VDI's data file before the first backup.
    pub fn start(rt: &tokio::runtime::Runtime, dir: &Path, size: u64) -> Result<XenGuest> {
        let mut config = SimConfig::new(dir.join("pool"), "secret");
        config.pool = PoolSpec {
            vms: 1,
            disks_per_vm: 1,
            disk_size: size,
            initial_blocks: 0,
        };
        let sim = rt.block_on(Simulator::start(config))?;
        let vdi = sim
            .sim()
            .vdis()
            .into_iter()
            .find(|v| !v.is_a_snapshot && v.vdi_type == "user")
            .context("the simulated pool has no user VDI")?
            .uuid;
        let password = dir.join("password");
        std::fs::write(&password, "secret\n")?;
        let pin = dir.join("pin.pem");
        std::fs::write(&pin, sim.certificate_pem())?;
        let image = dir.join("pool").join("vdis").join(format!("{vdi}.img"));
        Ok(XenGuest {
            sim,
            image,
            vdi,
            pin,
            password,
        })
    }
}

impl Guest for XenGuest {
    fn name(&self) -> &'static str {
        "xenserver"
    }
    fn image(&self) -> &Path {
        &self.image
    }
    fn backup_args(&self, _: Option<&Path>) -> Vec<String> {
        vec![
            "--xapi".into(),
            self.sim.https_url(),
            "--pin".into(),
            self.pin.display().to_string(),
            "--password-file".into(),
            self.password.display().to_string(),
            "--vdi".into(),
            self.vdi.clone(),
        ]
    }
    fn replay(&self, changed: &BlockMap) -> Result<()> {
        for_each_block(&self.image, changed, |offset, data| {
            Ok(self.sim.sim().write(&self.vdi, offset, data)?)
        })
    }
}

/// A qemu-storage-daemon serving a qcow2 copy of the image as node `disk`
/// (persistent dirty bitmaps need qcow2), with QMP and a writable NBD
/// export through which the suite writes as the guest would. The raw image
/// stays the suite's copy of what the guest holds.
pub struct QemuGuest {
    _server: Server,
    image: PathBuf,
    qmp: PathBuf,
    nbd: PathBuf,
    rt: tokio::runtime::Handle,
}

impl QemuGuest {
    /// Converts the raw `image` the suite wrote and serves the copy.
    pub fn start(rt: &tokio::runtime::Runtime, dir: &Path, image: &Path) -> Result<QemuGuest> {
        let qcow2 = dir.join("disk.qcow2");
        let mut convert = Command::new("qemu-img");
        convert
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(image)
            .arg(&qcow2);
        measure::run("qemu-img convert", &mut convert, false)?;
        let qmp = dir.join("qmp.sock");
        let nbd = dir.join("nbd.sock");
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=disk-file,filename={}",
                qcow2.display()
            ))
            .args(["--blockdev", "driver=qcow2,node-name=disk,file=disk-file"])
            .arg("--chardev")
            .arg(format!(
                "socket,id=qmp0,path={},server=on,wait=off",
                qmp.display()
            ))
            .args(["--monitor", "chardev=qmp0"])
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", nbd.display()))
            .args([
                "--export",
                "type=nbd,id=guest,node-name=disk,name=guest,writable=on",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting qemu-storage-daemon (scripts/install-deps installs qemu-utils)")?;
        let server = Server(child);
        measure::wait_until("qemu-storage-daemon", || listening(&qmp) && listening(&nbd))?;
        Ok(QemuGuest {
            _server: server,
            image: image.to_path_buf(),
            qmp,
            nbd,
            rt: rt.handle().clone(),
        })
    }
}

impl Guest for QemuGuest {
    fn name(&self) -> &'static str {
        "qemu"
    }
    fn image(&self) -> &Path {
        &self.image
    }
    fn backup_args(&self, _: Option<&Path>) -> Vec<String> {
        vec![
            "--disk".into(),
            "vm".into(),
            "--node".into(),
            "disk".into(),
            "--source".into(),
            format!("qmp:{}", self.qmp.display()),
            "--nbd-socket".into(),
            self.nbd.display().to_string(),
        ]
    }
    fn replay(&self, changed: &BlockMap) -> Result<()> {
        let uri = format!("nbd+unix:///guest?socket={}", self.nbd.display());
        let options = cbtvault_nbd::ConnectOptions::from_uri(&uri)?;
        let client = self.rt.block_on(cbtvault_nbd::Client::connect(&options))?;
        for_each_block(&self.image, changed, |offset, data| {
            Ok(self.rt.block_on(client.write(offset, data))?)
        })?;
        self.rt.block_on(async {
            client.flush().await?;
            client.disconnect().await;
            anyhow::Ok(())
        })
    }
}

/// The one disk of a VM of a simulated vCenter; the suite writes the image
/// into the disk's file before the first backup (a full reads what NBD's
/// `base:allocation` reports, so the holes stay holes).
pub struct VmwareGuest {
    sim: Option<vsphere::Simulator>,
    rt: tokio::runtime::Handle,
    vm: String,
    image: PathBuf,
    pin: PathBuf,
    password: PathBuf,
}

/// The key vSphere gives a VM's first disk.
const VMWARE_DISK_KEY: i32 = 2000;

impl VmwareGuest {
    pub fn start(rt: &tokio::runtime::Runtime, dir: &Path, size: u64) -> Result<VmwareGuest> {
        let mut config = vsphere::SimConfig::new(dir.join("vcenter"), "secret");
        config.vms = vec![vsphere::VmSpec {
            name: "bench".into(),
            disks: vec![size],
            powered_on: true,
            cbt_supported: true,
            cbt_enabled: false,
        }];
        config.nbd_tls = true;
        let sim = rt.block_on(vsphere::Simulator::start(config))?;
        let vm = sim
            .sim()
            .vms()
            .into_iter()
            .next()
            .context("the simulated vCenter has no VM")?
            .0;
        let image = sim.sim().disk_path(&vm, VMWARE_DISK_KEY)?;
        let password = dir.join("password");
        std::fs::write(&password, "secret\n")?;
        let pin = dir.join("pin.pem");
        std::fs::write(&pin, sim.certificate_pem())?;
        Ok(VmwareGuest {
            sim: Some(sim),
            rt: rt.handle().clone(),
            vm,
            image,
            pin,
            password,
        })
    }

    fn sim(&self) -> Result<&vsphere::Simulator> {
        self.sim
            .as_ref()
            .context("the simulated vCenter has stopped")
    }
}

impl Drop for VmwareGuest {
    fn drop(&mut self) {
        if let Some(sim) = self.sim.take() {
            self.rt.block_on(sim.shutdown());
        }
    }
}

impl Guest for VmwareGuest {
    fn name(&self) -> &'static str {
        "vmware"
    }
    fn image(&self) -> &Path {
        &self.image
    }
    fn backup_args(&self, _: Option<&Path>) -> Vec<String> {
        let Ok(sim) = self.sim() else {
            return Vec::new();
        };
        let nbd = format!(
            "{}?tls-pin={}",
            sim.nbd_uri_template().replace("nbd://", "nbds://"),
            self.pin.display()
        );
        vec![
            "--vcenter".into(),
            sim.url(),
            "--vm".into(),
            self.vm.clone(),
            "--username".into(),
            "administrator@vsphere.local".into(),
            "--password-file".into(),
            self.password.display().to_string(),
            "--pin".into(),
            self.pin.display().to_string(),
            "--nbd-uri".into(),
            nbd,
        ]
    }
    fn replay(&self, changed: &BlockMap) -> Result<()> {
        // One write per run of blocks: the simulator records every write
        // in its CBT log and saves its state after each.
        let sim = self.sim()?;
        let file = std::fs::File::open(&self.image)?;
        let size = file.metadata()?.len();
        let mut buf = Vec::new();
        for extent in changed.extents(size) {
            buf.resize(extent.length as usize, 0);
            file.read_exact_at(&mut buf, extent.offset)?;
            sim.sim()
                .write(&self.vm, VMWARE_DISK_KEY, extent.offset, &buf)?;
        }
        Ok(())
    }
}

/// Calls `f` with the offset and current bytes of each block of `changed`.
fn for_each_block(
    image: &Path,
    changed: &BlockMap,
    mut f: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    let file = std::fs::File::open(image)?;
    let size = file.metadata()?.len();
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    for b in changed.set_blocks() {
        let offset = b * BLOCK_SIZE;
        let len = BLOCK_SIZE.min(size - offset) as usize;
        file.read_exact_at(&mut buf[..len], offset)?;
        f(offset, &buf[..len])?;
    }
    Ok(())
}
