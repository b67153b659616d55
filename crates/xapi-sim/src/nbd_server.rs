//! Serves the simulator's VDIs with cbtvault's NBD server in its
//! xapi-nbd imitation mode: EXPORT_NAME only, TLS required with the host
//! certificate, 16 connections, read-only, and export names resolved by
//! [`Sim::open_nbd_export`] (session check, `cbt_metadata` refusal, the
//! dom0 VBD held for the life of the connection).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use cbtvault_nbd::BoxError;
use cbtvault_nbd::server::{Export, Server, ServerConfig};
use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::{Error, Result};
use crate::nbd::NbdExport;
use crate::sim::Sim;

/// An open export as the NBD server sees it. Dropped when the connection
/// ends, which detaches the VDI from dom0.
struct SimExport(NbdExport);

/// xapi-nbd serves the VDI's dom0 block device: whole 512-byte sectors.
const SECTOR: u64 = 512;

impl Export for SimExport {
    /// As xapi-nbd: `size_sectors * sector_size` of the block device, so a
    /// VDI whose virtual size is not a whole number of sectors is exported
    /// rounded up, its last sector padded with zeros. Reads must still be
    /// whole sectors (minimal mode answers EINVAL otherwise).
    fn size(&self) -> u64 {
        self.0.reader.size().div_ceil(SECTOR) * SECTOR
    }

    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, BoxError>> {
        Box::pin(async move {
            let disk = self.0.reader.size();
            let end = offset.saturating_add(u64::from(len));
            if end <= disk || offset >= self.size() || end > self.size() {
                // Wholly on the disk, or an error the reader reports.
                let data = self.0.reader.read_at_async(len as usize, offset).await?;
                return Ok(Bytes::from(data));
            }
            // Into the padding of the last sector.
            let mut data = vec![0u8; len as usize];
            if offset < disk {
                let head = self
                    .0
                    .reader
                    .read_at_async((disk - offset) as usize, offset)
                    .await?;
                data[..head.len()].copy_from_slice(&head);
            }
            Ok(Bytes::from(data))
        })
    }
}

/// Binds `listen`, announces its port in `VDI.get_nbd_info`, and serves
/// until `shutdown` on `tracker`. Returns the bound address.
pub(crate) async fn start(
    sim: &Sim,
    listen: SocketAddr,
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
    let mut config = ServerConfig::minimal(sim.inner.cert.server_config()?);
    config.max_connections = sim.config().nbd_connection_limit;
    let server = Server::new(config);
    let resolver = sim.clone();
    server.set_export_hook(Arc::new(move |name: &str| {
        let export = resolver.open_nbd_export(name)?;
        Ok(Arc::new(SimExport(export)) as Arc<dyn Export>)
    }));
    sim.set_nbd_port(Some(addr.port()));
    tracker.spawn(async move {
        if let Err(e) = server.serve_tcp(listener, shutdown).await {
            tracing::warn!("NBD server stopped: {e}");
        }
    });
    tracing::info!("xapi-sim NBD (TLS, xapi-nbd mode) on {addr}");
    Ok(addr)
}
