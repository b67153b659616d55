//! An NBD export rewritten in place by a rollback: read back, compared,
//! and written only where it differs. (The plain restore target,
//! `crate::nbd::NbdTarget`, never reads.)

use std::sync::Arc;

use cbtvault_blockmap::BLOCK_SIZE;
use cbtvault_nbd::Client;

use super::target::{DiskTarget, ReadableTarget};
use crate::error::{Error, Result};

/// A writable NBD export whose contents a rollback reads back. Its
/// methods are called from the rollback's worker threads and block on
/// the async client.
pub struct NbdInPlace {
    client: Arc<Client>,
    runtime: tokio::runtime::Handle,
}

impl NbdInPlace {
    /// A target on a connected client; a read-only export is refused.
    pub fn new(client: Client, runtime: tokio::runtime::Handle) -> Result<NbdInPlace> {
        if client.is_read_only() {
            return Err(Error::Target("the NBD export is read-only".into()));
        }
        Ok(NbdInPlace {
            client: Arc::new(client),
            runtime,
        })
    }
}

fn io(e: cbtvault_nbd::Error) -> std::io::Error {
    std::io::Error::other(e)
}

impl DiskTarget for NbdInPlace {
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.runtime
            .block_on(self.client.write(offset, data))
            .map_err(io)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let mut done = 0;
        // Bounded pieces keep each request within the server's limits.
        while done < len {
            let n = (len - done).min(1024 * BLOCK_SIZE);
            self.runtime
                .block_on(self.client.write_zeroes(offset + done, n))
                .map_err(io)?;
            done += n;
        }
        Ok(())
    }

    fn is_zeroed(&self) -> bool {
        false
    }

    fn finish(&self) -> std::io::Result<()> {
        self.runtime.block_on(self.client.flush()).map_err(io)
    }
}

impl ReadableTarget for NbdInPlace {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.client.size())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let (data, zeroed) = self
            .runtime
            .block_on(crate::nbd::read_aligned(&self.client, offset, buf.len()))
            .map_err(io)?;
        if zeroed > 0 {
            // Zeros stood in for bytes the server cannot read: comparing
            // them would take a non-zero tail for a match.
            return Err(std::io::Error::other(format!(
                "the last {zeroed} bytes of the export lie in a partial block the server cannot                  read, so they cannot be compared; roll back with --target-state instead"
            )));
        }
        if data.len() != buf.len() {
            return Err(std::io::Error::other(format!(
                "the server answered {} bytes for a read of {}",
                data.len(),
                buf.len()
            )));
        }
        buf.copy_from_slice(&data);
        Ok(())
    }

    fn set_size(&self, size: u64) -> Result<()> {
        let have = self.client.size();
        if have == size {
            return Ok(());
        }
        Err(Error::Target(format!(
            "the NBD export holds {have} bytes and the restore point {size}; an export cannot be \
             resized, so a rollback needs one of the same size"
        )))
    }
}
