//! Whole-VM restore of a QEMU VM into a directory, plan then apply.
//!
//! [`plan_qemu_vm_restore`] reads the drive layout a QEMU VM-level run
//! saved (see `qemu_layout`), pairs each drive with its restore point and
//! checks the directory (new, or empty) and the tools, changing nothing.
//! [`apply_qemu_vm_restore`] writes one image per drive (`NODE.raw`, or
//! `NODE.qcow2` through `qemu-img convert`), then `layout.json` (every
//! drive: node name, image, format, size, guest device, exports, restore
//! point) and two argument files that put each image back at its place:
//! `qemu-storage-daemon.args` (`--blockdev` pairs and the node's NBD
//! exports)
//! and `qemu.args` (`--blockdev` pairs and `--device TYPE,drive=NODE,id=ID`
//! where the guest device's type and id were recorded). One argument per
//! line; commas in paths are doubled as QEMU's option syntax wants. A
//! failure half-way removes every file written (and the directory, if the
//! restore made it).

use std::path::{Path, PathBuf};
use std::process::Command;

use cbtvault_engine::{FileTarget, NoProgress};
use cbtvault_repo::{Repository, RestorePointRow};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::error::{Error, Result, VmRestoreRefusal};
use crate::qemu_layout::{PROVIDER, SavedDrive, SavedQemuVm};

/// The image format a QEMU VM's disks are written in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ImageFormat {
    /// Sparse raw files.
    #[default]
    Raw,
    /// qcow2, converted with `qemu-img`.
    Qcow2,
}

impl ImageFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

/// What the caller asks of a QEMU whole-VM restore.
#[derive(Clone, Debug, Default)]
pub struct QemuVmRestoreRequest {
    /// Where the images and the layout go: a new or empty directory.
    pub dir: PathBuf,
    pub format: ImageFormat,
}

/// One drive's image to write.
#[derive(Clone, Debug)]
pub struct PlannedImage {
    pub node: String,
    /// The image file.
    pub path: PathBuf,
    /// Its virtual size, bytes.
    pub size: u64,
    /// The guest device (`TYPE id ID`, `drive NAME`), or the exports that
    /// served the node, in words; empty when nothing was recorded.
    pub place: String,
    pub restore_point: RestorePointRow,
    saved: SavedDrive,
}

/// Everything a QEMU whole-VM restore will write, checked.
#[derive(Clone, Debug)]
pub struct QemuVmRestorePlan {
    pub source_name: String,
    pub source_uuid: Option<String>,
    /// The configured QEMU host it ran on.
    pub host: String,
    /// When the run took it.
    pub time: jiff::Timestamp,
    pub dir: PathBuf,
    pub format: ImageFormat,
    pub images: Vec<PlannedImage>,
    /// What the layout holds that will not be restored, in words.
    pub notes: Vec<String>,
    /// Whether the restore makes the directory (and removes it on failure).
    pub creates_dir: bool,
}

/// A written image.
#[derive(Clone, Debug)]
pub struct RestoredImage {
    pub node: String,
    pub path: PathBuf,
    pub bytes: u64,
    pub restore_point: String,
}

/// What a QEMU whole-VM restore wrote.
#[derive(Clone, Debug)]
pub struct QemuVmRestored {
    pub dir: PathBuf,
    pub images: Vec<RestoredImage>,
    /// `layout.json`.
    pub layout: PathBuf,
    /// `qemu-storage-daemon.args`.
    pub qsd_args: PathBuf,
    /// `qemu.args`.
    pub qemu_args: PathBuf,
    pub notes: Vec<String>,
}

fn refused(vm: &str, refusal: VmRestoreRefusal, what: String) -> Error {
    Error::VmRestore {
        vm: vm.to_string(),
        what,
        refusal,
    }
}

/// Reads a VM-level run's saved metadata and tells whether it is a QEMU
/// VM's drive layout.
pub fn is_qemu_vm(repo: &Repository, points: &[RestorePointRow]) -> Result<bool> {
    let Some(id) = points
        .first()
        .and_then(|rp| rp.manifest.source.vm.as_ref())
        .and_then(|vm| vm.metadata.as_ref())
    else {
        // Without metadata the planner words the refusal.
        return Ok(points
            .first()
            .is_some_and(|rp| rp.manifest.source.provider == PROVIDER));
    };
    let saved = repo.vm_metadata(id)?;
    Ok(saved.json.get("provider").and_then(|p| p.as_str()) == Some(PROVIDER))
}

/// A file name made of the node name: letters, digits, `.`, `_` and `-`
/// kept, anything else `_`, never hidden.
fn file_stem(node: &str) -> String {
    let stem: String = node
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    match stem.trim_start_matches('.') {
        "" => "disk".into(),
        s => s.to_string(),
    }
}

/// Checks the restore of `points` (one QEMU VM-level run) into
/// `request.dir` and returns what will be written. Nothing is changed.
pub fn plan_qemu_vm_restore(
    repo: &Repository,
    points: &[RestorePointRow],
    request: &QemuVmRestoreRequest,
) -> Result<QemuVmRestorePlan> {
    let first = points
        .first()
        .ok_or_else(|| Error::Internal("a VM restore of no restore point".into()))?;
    let info = first.manifest.source.vm.clone().ok_or_else(|| {
        refused(
            &first.manifest.disk,
            VmRestoreRefusal::NoMetadata,
            format!(
                "restore point {} was not taken as part of a VM, so there is no VM to rebuild",
                first.id
            ),
        )
    })?;
    let vm_label = info.name.clone();
    let Some(metadata_id) = info.metadata.clone() else {
        return Err(refused(
            &vm_label,
            VmRestoreRefusal::NoMetadata,
            format!(
                "the run of {} saved no drive layout (it predates layouts, or QEMU did not answer), so the VM cannot be rebuilt",
                first.manifest.time
            ),
        ));
    };
    let saved = repo.vm_metadata(&metadata_id)?;
    let bad = |what: String| refused(&vm_label, VmRestoreRefusal::BadMetadata, what);
    if saved.json.get("provider").and_then(|p| p.as_str()) != Some(PROVIDER) {
        return Err(refused(
            &vm_label,
            VmRestoreRefusal::WrongHypervisor,
            "it was backed up from a XenServer pool, not from QEMU: restore it into a pool".into(),
        ));
    }
    let layout: SavedQemuVm = serde_json::from_value(saved.json.clone()).map_err(|e| {
        bad(format!(
            "the drive layout {metadata_id} cannot be read: {e}"
        ))
    })?;

    let creates_dir = check_dir(&vm_label, &request.dir)?;
    if request.format == ImageFormat::Qcow2 {
        qemu_img_present()
            .map_err(|what| refused(&vm_label, VmRestoreRefusal::TargetUnusable, what))?;
    }

    let mut notes: Vec<String> = layout
        .missing
        .iter()
        .map(|(what, why)| {
            format!("QEMU did not answer for {what} when the layout was saved: {why}")
        })
        .collect();
    let node_of = |rp: &RestorePointRow| {
        rp.manifest
            .source
            .vm
            .as_ref()
            .and_then(|v| v.device.clone())
            .unwrap_or_default()
    };
    let mut images: Vec<PlannedImage> = Vec::new();
    let mut used_names: Vec<String> = Vec::new();
    let mut add = |rp: &RestorePointRow, saved: SavedDrive, images: &mut Vec<PlannedImage>| {
        let mut stem = file_stem(&saved.node);
        while used_names.contains(&stem) {
            stem.push('_');
        }
        used_names.push(stem.clone());
        let path = request
            .dir
            .join(format!("{stem}.{}", request.format.as_str()));
        images.push(PlannedImage {
            node: saved.node.clone(),
            path,
            size: rp.manifest.virtual_size,
            place: place(&saved),
            restore_point: rp.clone(),
            saved,
        });
    };
    for d in &layout.drives {
        match points.iter().find(|rp| node_of(rp) == d.node) {
            Some(rp) => add(rp, d.clone(), &mut images),
            None => notes.push(format!(
                "node {} has no restore point in this run and is not restored",
                d.node
            )),
        }
    }
    for rp in points {
        let node = node_of(rp);
        if !images.iter().any(|i| i.node == node) {
            notes.push(format!(
                "disk {} (node {node}) is not in the saved layout; its image is written without a place",
                rp.manifest.disk
            ));
            add(
                rp,
                SavedDrive {
                    node,
                    ..Default::default()
                },
                &mut images,
            );
        }
    }
    for img in &images {
        for e in img.saved.exports.iter().filter(|e| e.kind != "nbd") {
            notes.push(format!(
                "the {} export {} of node {} is in layout.json but not in the arguments: QMP does not report its address",
                e.kind, e.id, img.node
            ));
        }
    }
    for (i, img) in images.iter().enumerate() {
        if img.node.is_empty() || images[..i].iter().any(|o| o.node == img.node) {
            return Err(bad(format!(
                "two drives share node name {:?}, or one has none",
                img.node
            )));
        }
    }
    Ok(QemuVmRestorePlan {
        source_name: info.name.clone(),
        source_uuid: layout
            .uuid
            .clone()
            .or(Some(info.uuid.clone()).filter(|u| !u.is_empty())),
        host: layout.host.clone(),
        time: first.manifest.time,
        dir: request.dir.clone(),
        format: request.format,
        images,
        notes,
        creates_dir,
    })
}

/// A drive's place in words.
fn place(d: &SavedDrive) -> String {
    let mut parts = Vec::new();
    match (&d.device_type, &d.device_id) {
        (Some(t), Some(id)) => parts.push(format!("device {t} id {id}")),
        (None, Some(id)) => parts.push(format!("device id {id}")),
        _ => {}
    }
    if let Some(name) = &d.device {
        parts.push(format!("drive {name}"));
    }
    for e in &d.exports {
        parts.push(format!("{} export {}", e.kind, e.id));
    }
    parts.join(", ")
}

/// The directory is new (its parent exists) or empty: whether the restore
/// makes it.
fn check_dir(vm: &str, dir: &Path) -> Result<bool> {
    let unusable = |what: String| refused(vm, VmRestoreRefusal::TargetUnusable, what);
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {
            let entries = std::fs::read_dir(dir)
                .map_err(|e| unusable(format!("cannot read directory {}: {e}", dir.display())))?
                .count();
            if entries > 0 {
                return Err(refused(
                    vm,
                    VmRestoreRefusal::TargetNotEmpty,
                    format!(
                        "directory {} is not empty ({entries} entries); nothing in it is overwritten",
                        dir.display()
                    ),
                ));
            }
            Ok(false)
        }
        Ok(_) => Err(unusable(format!("{} is not a directory", dir.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let parent = match dir.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            if !parent.is_dir() {
                return Err(unusable(format!(
                    "{} does not exist, nor does its parent {}",
                    dir.display(),
                    parent.display()
                )));
            }
            Ok(true)
        }
        Err(e) => Err(unusable(format!("cannot inspect {}: {e}", dir.display()))),
    }
}

fn qemu_img_present() -> std::result::Result<(), String> {
    match Command::new("qemu-img").arg("--version").output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "qemu-img --version failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!(
            "qcow2 images are made with qemu-img, which cannot be run ({e}); install qemu-utils or write raw images"
        )),
    }
}

/// Writes what `plan` says. On failure every file written is removed
/// again (and the directory, if the restore made it).
pub fn apply_qemu_vm_restore(
    repo: &Repository,
    plan: &QemuVmRestorePlan,
    workers: usize,
    cancel: &CancellationToken,
) -> Result<QemuVmRestored> {
    let mut written = Vec::new();
    match write_all(repo, plan, workers, cancel, &mut written) {
        Ok(done) => Ok(done),
        Err(e) => {
            warn!(vm = %plan.source_name, error = %e, "whole-VM restore failed; removing what it wrote");
            let mut left = Vec::new();
            for p in written.iter().rev() {
                if let Err(e) = std::fs::remove_file(p)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    left.push(p.display().to_string());
                }
            }
            if plan.creates_dir && std::fs::remove_dir(&plan.dir).is_err() {
                left.push(plan.dir.display().to_string());
            }
            if left.is_empty() {
                Err(e)
            } else {
                Err(Error::VmRestoreLeftovers {
                    vm: plan.source_name.clone(),
                    left: left.join(", "),
                    source: Box::new(e),
                })
            }
        }
    }
}

fn write_all(
    repo: &Repository,
    plan: &QemuVmRestorePlan,
    workers: usize,
    cancel: &CancellationToken,
    written: &mut Vec<PathBuf>,
) -> Result<QemuVmRestored> {
    let vm = &plan.source_name;
    let io = |path: &Path, e: std::io::Error| Error::VmImage {
        vm: vm.clone(),
        path: path.to_path_buf(),
        what: e.to_string(),
    };
    if plan.creates_dir {
        std::fs::create_dir(&plan.dir).map_err(|e| io(&plan.dir, e))?;
    }
    let mut images = Vec::new();
    for img in &plan.images {
        let raw = match plan.format {
            ImageFormat::Raw => img.path.clone(),
            ImageFormat::Qcow2 => img.path.with_extension("raw.partial"),
        };
        written.push(raw.clone());
        let target = FileTarget::create(&raw, img.size, false)?;
        if let Err(e) = cbtvault_engine::restore(
            repo,
            &img.restore_point,
            &target,
            workers,
            &NoProgress,
            cancel,
        ) {
            target.abandon();
            return Err(e.into());
        }
        if plan.format == ImageFormat::Qcow2 {
            written.push(img.path.clone());
            convert_to_qcow2(&raw, &img.path).map_err(|what| Error::VmImage {
                vm: vm.clone(),
                path: img.path.clone(),
                what,
            })?;
            std::fs::remove_file(&raw).map_err(|e| io(&raw, e))?;
        }
        info!(vm = %vm, node = %img.node, image = %img.path.display(), "disk restored");
        images.push(RestoredImage {
            node: img.node.clone(),
            path: img.path.clone(),
            bytes: img.size,
            restore_point: img.restore_point.id.clone(),
        });
    }
    let layout = plan.dir.join("layout.json");
    let qsd_args = plan.dir.join("qemu-storage-daemon.args");
    let qemu_args = plan.dir.join("qemu.args");
    let (qsd, qemu) = arguments(plan);
    let document = layout_json(plan, &qsd, &qemu);
    for (path, text) in [
        (&layout, format!("{document:#}\n")),
        (&qsd_args, lines(&qsd)),
        (&qemu_args, lines(&qemu)),
    ] {
        written.push(path.clone());
        std::fs::write(path, text).map_err(|e| io(path, e))?;
    }
    std::fs::File::open(&plan.dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(&plan.dir, e))?;
    Ok(QemuVmRestored {
        dir: plan.dir.clone(),
        images,
        layout,
        qsd_args,
        qemu_args,
        notes: plan.notes.clone(),
    })
}

fn convert_to_qcow2(raw: &Path, qcow2: &Path) -> std::result::Result<(), String> {
    let out = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(raw)
        .arg(qcow2)
        .output()
        .map_err(|e| format!("running qemu-img convert: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img convert failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// A value inside a QEMU option string: commas doubled.
fn quoted(value: &str) -> String {
    value.replace(',', ",,")
}

/// The argument lists that put each image back: for a storage daemon
/// and for QEMU.
fn arguments(plan: &QemuVmRestorePlan) -> (Vec<String>, Vec<String>) {
    let mut qsd = Vec::new();
    let mut qemu = Vec::new();
    for img in &plan.images {
        drive_arguments(&img.path, &img.saved, plan.format, &mut qsd, &mut qemu);
    }
    (qsd, qemu)
}

/// One drive's arguments, appended to `qsd` and `qemu`.
fn drive_arguments(
    path: &Path,
    saved: &SavedDrive,
    format: ImageFormat,
    qsd: &mut Vec<String>,
    qemu: &mut Vec<String>,
) {
    let node = quoted(&saved.node);
    let ro = if saved.read_only { ",read-only=on" } else { "" };
    let blockdevs = [
        "--blockdev".to_string(),
        format!(
            "driver=file,node-name={node}-file,filename={}{ro}",
            quoted(&path.display().to_string())
        ),
        "--blockdev".to_string(),
        format!(
            "driver={},node-name={node},file={node}-file{ro}",
            format.as_str()
        ),
    ];
    qsd.extend(blockdevs.iter().cloned());
    qemu.extend(blockdevs);
    // Only NBD exports are complete from what QMP reports (the server is
    // given apart); others need an address QMP does not tell (noted).
    for e in saved.exports.iter().filter(|e| e.kind == "nbd") {
        // Nor does it report an NBD export's name: it is named by its id.
        let mut export = format!(
            "type=nbd,id={},node-name={node},name={}",
            quoted(&e.id),
            quoted(&e.id)
        );
        if !saved.read_only {
            export.push_str(",writable=on");
        }
        qsd.push("--export".into());
        qsd.push(export);
    }
    if let (Some(kind), Some(id)) = (&saved.device_type, &saved.device_id) {
        qemu.push("--device".into());
        qemu.push(format!("{kind},drive={node},id={}", quoted(id)));
    }
}

/// One argument per line.
fn lines(args: &[String]) -> String {
    args.iter().map(|a| format!("{a}\n")).collect()
}

fn layout_json(plan: &QemuVmRestorePlan, qsd: &[String], qemu: &[String]) -> serde_json::Value {
    json!({
        "vm": {"name": plan.source_name, "uuid": plan.source_uuid, "host": plan.host},
        "time": plan.time,
        "format": plan.format.as_str(),
        "drives": plan.images.iter().map(|img| json!({
            "node": img.node,
            "image": img.path,
            "format": plan.format.as_str(),
            "size": img.size,
            "read_only": img.saved.read_only,
            "original": {"driver": img.saved.driver, "filename": img.saved.filename},
            "device": img.saved.device,
            "qdev": img.saved.qdev,
            "device_id": img.saved.device_id,
            "device_type": img.saved.device_type,
            "removable": img.saved.removable,
            "exports": img.saved.exports,
            "restore_point": img.restore_point.id,
        })).collect::<Vec<_>>(),
        "qemu_storage_daemon_args": qsd,
        "qemu_args": qemu,
        "notes": plan.notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_stems_are_safe() {
        assert_eq!(file_stem("drive0"), "drive0");
        assert_eq!(file_stem("../etc/x"), "_etc_x");
        assert_eq!(file_stem("..."), "disk");
        assert_eq!(file_stem("a b,c"), "a_b_c");
    }

    #[test]
    fn a_guest_device_comes_back_on_the_qemu_line_and_exports_on_the_daemon_line() {
        let saved = SavedDrive {
            node: "drive-virtio0".into(),
            driver: "qcow2".into(),
            read_only: true,
            device_id: Some("virtio-disk0".into()),
            device_type: Some("virtio-blk-pci".into()),
            exports: vec![crate::qemu_layout::SavedExport {
                id: "vhost0".into(),
                kind: "vhost-user-blk".into(),
            }],
            ..Default::default()
        };
        let (mut qsd, mut qemu) = (Vec::new(), Vec::new());
        drive_arguments(
            Path::new("/r/a,b.qcow2"),
            &saved,
            ImageFormat::Qcow2,
            &mut qsd,
            &mut qemu,
        );
        assert_eq!(
            qemu,
            [
                "--blockdev",
                "driver=file,node-name=drive-virtio0-file,filename=/r/a,,b.qcow2,read-only=on",
                "--blockdev",
                "driver=qcow2,node-name=drive-virtio0,file=drive-virtio0-file,read-only=on",
                "--device",
                "virtio-blk-pci,drive=drive-virtio0,id=virtio-disk0",
            ]
        );
        // A vhost-user-blk export's socket is not reported: left to the
        // user (the plan notes it).
        assert_eq!(qsd.len(), 4, "{qsd:?}");
    }

    #[test]
    fn commas_in_option_values_are_doubled() {
        assert_eq!(quoted("/srv/a,b.raw"), "/srv/a,,b.raw");
    }
}
