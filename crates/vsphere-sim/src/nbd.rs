//! The NBD export of each snapshot's disk, with cbtvault's NBD server:
//! read-only, full protocol, TLS offered with the server's certificate
//! when asked for. Export names are `{snapshot}/{deviceKey}` for a VM
//! disk and `fcd/{id}/{snapshotId}` for a First Class Disk; an unknown
//! name is refused. This stands in for what production reads through
//! (nbdkit's vddk plugin, see docs/vmware.md): the bytes are the same.

use std::fs::File;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use cbtvault_nbd::BoxError;
use cbtvault_nbd::server::{Export, Extent, Server, ServerConfig};
use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::{Error, Result};
use crate::sim::Sim;

struct SnapshotExport {
    file: Arc<File>,
    size: u64,
    sim: Sim,
}

impl Export for SnapshotExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, BoxError>> {
        Box::pin(async move {
            {
                let mut w = self.sim.lock();
                if let Some(left) = w.faults.nbd_fail_after {
                    if left < u64::from(len) {
                        w.faults.nbd_fail_after = None;
                        return Err(std::io::Error::other("simulated NBD failure").into());
                    }
                    w.faults.nbd_fail_after = Some(left - u64::from(len));
                }
            }
            let file = self.file.clone();
            let data = tokio::task::spawn_blocking(move || {
                crate::store::read_file(&file, offset, len as usize)
            })
            .await??;
            Ok(Bytes::from(data))
        })
    }

    /// The image's holes as `base:allocation` holes, as VDDK 6.7 and later
    /// report a disk's allocation: a full backup then reads only data.
    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Vec<Extent>, BoxError>> {
        Box::pin(async move {
            let end = offset.saturating_add(len).min(self.size);
            let (data, hole) = allocation(&self.file, offset);
            let extent = if data > offset {
                Extent {
                    length: data.min(end) - offset,
                    flags: Extent::HOLE | Extent::ZERO,
                }
            } else {
                Extent {
                    length: hole.min(end).max(offset + 1) - offset,
                    flags: 0,
                }
            };
            Ok(vec![extent])
        })
    }
}

/// From `offset`: where the next data starts, and where that data ends
/// (`u64::MAX` when the system cannot tell: all data).
fn allocation(file: &File, offset: u64) -> (u64, u64) {
    use std::os::unix::io::AsRawFd;
    let Ok(pos) = i64::try_from(offset) else {
        return (offset, u64::MAX);
    };
    // SAFETY: lseek on a descriptor this export owns has no memory effects.
    let data = unsafe { libc::lseek(file.as_raw_fd(), pos, libc::SEEK_DATA) };
    if data < 0 {
        // ENXIO: no data after offset; anything else: assume data.
        return match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::ENXIO) => (u64::MAX, u64::MAX),
            _ => (offset, u64::MAX),
        };
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(file.as_raw_fd(), data, libc::SEEK_HOLE) };
    let hole = if hole < 0 { u64::MAX } else { hole as u64 };
    (data as u64, hole)
}

/// Binds `listen` and serves until `shutdown`; returns the bound address.
pub(crate) async fn start(
    sim: &Sim,
    listen: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> Result<SocketAddr> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| Error::Listen {
            addr: listen.to_string(),
            source,
        })?;
    let addr = listener.local_addr()?;
    let mut config = ServerConfig::default();
    if let Some(tls) = tls {
        config = config.with_tls(tls, true);
    }
    let server = Server::new(config);
    let resolver = sim.clone();
    server.set_export_hook(Arc::new(move |name: &str| {
        let (path, size) = crate::api::export_image(&resolver, name)
            .ok_or_else(|| format!("no snapshot disk {name:?}"))?;
        let file = File::open(&path)?;
        Ok(Arc::new(SnapshotExport {
            file: Arc::new(file),
            size,
            sim: resolver.clone(),
        }) as Arc<dyn Export>)
    }));
    tracker.spawn(async move {
        if let Err(e) = server.serve_tcp(listener, shutdown).await {
            tracing::warn!("NBD server stopped: {e}");
        }
    });
    Ok(addr)
}
