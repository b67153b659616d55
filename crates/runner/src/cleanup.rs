//! Cleaning up after killed QEMU backups without running one.

use std::sync::Arc;

use cbtvault_repo::Repository;

use crate::error::{Error, Result};
use crate::spec::{JobSpec, Target};

/// What `cleanup` removed from one QEMU node.
#[derive(Clone, Debug)]
pub struct Cleaned {
    pub node: String,
    /// The node's disk in the repository.
    pub disk: String,
    /// The QEMU objects and files removed (none when nothing was left).
    pub removed: Vec<String>,
}

/// Removes what killed backups of `spec`'s QEMU nodes left in QEMU: the
/// copy-before-write filter in the guest's I/O path, the NBD export, the
/// fleece image. Checkpoints (the dirty bitmaps) stay: the next backup
/// sorts them out. Each disk's lock is taken first, so a backup that is
/// running is never touched (that disk is reported as busy).
pub async fn cleanup(spec: &JobSpec, repo: Arc<Repository>) -> Result<Vec<Cleaned>> {
    let Target::Qemu { host, nodes } = &spec.target else {
        return Err(Error::NotQemu {
            job: spec.name.clone(),
        });
    };
    let qmp = cbtvault_qemu::Qmp::connect(host.qmp_socket.as_path())
        .await
        .map_err(|source| Error::Qmp {
            socket: host.qmp_socket.clone(),
            source: source.into(),
        })?;
    let qmp = Arc::new(qmp);
    let mut out = Vec::new();
    for node in nodes {
        let disk = node.disk_name(&host.name);
        let _locks = cbtvault_engine::lock_disk(&repo, &disk.name)
            .await
            .map_err(Error::from)?;
        let options = cbtvault_qemu::DiskOptions {
            work_dir: host.qmp_socket.parent().map(|p| p.to_path_buf()),
            nbd_socket: host.nbd_socket.clone(),
            ..Default::default()
        };
        let qemu = cbtvault_qemu::QemuDisk::from_qmp(qmp.clone(), &node.node, options)
            .await
            .map_err(|source| Error::Qemu {
                node: node.node.clone(),
                source: source.into(),
            })?;
        let job = cbtvault_engine::qemu::job_name(&spec.name, &repo, &disk.name);
        let removed = qemu
            .cleanup_leftovers(&job)
            .await
            .map_err(|source| Error::Qemu {
                node: node.node.clone(),
                source: source.into(),
            })?;
        out.push(Cleaned {
            node: node.node.clone(),
            disk: disk.name,
            removed,
        });
    }
    Ok(out)
}
