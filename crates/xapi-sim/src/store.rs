//! VDI data: one sparse file per VDI, `<state>/vdis/<uuid>.img`.
//!
//! Snapshots copy only the allocated regions (SEEK_DATA/SEEK_HOLE), so a
//! mostly empty multi-GiB disk snapshots in a moment and stays sparse.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use cbtvault_blockmap::BLOCK_SIZE;

/// The directory of VDI files.
#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Uses (and creates) `<state>/vdis`.
    pub fn open(state_dir: &Path) -> io::Result<Self> {
        let dir = state_dir.join("vdis");
        std::fs::create_dir_all(&dir)?;
        Ok(Store { dir })
    }

    /// Path of the data file of `uuid`.
    pub fn path(&self, uuid: &str) -> PathBuf {
        self.dir.join(format!("{uuid}.img"))
    }

    /// Creates an all-zero (sparse) file of `size` bytes.
    pub fn create(&self, uuid: &str, size: u64) -> io::Result<()> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(self.path(uuid))?;
        f.set_len(size)
    }

    /// Grows the file to `size` bytes.
    pub fn resize(&self, uuid: &str, size: u64) -> io::Result<()> {
        let f = OpenOptions::new().write(true).open(self.path(uuid))?;
        if f.metadata()?.len() < size {
            f.set_len(size)?;
        }
        Ok(())
    }

    /// Opens the file for reading.
    pub fn open_read(&self, uuid: &str) -> io::Result<File> {
        File::open(self.path(uuid))
    }

    /// Writes `data` at `offset`.
    pub fn write_at(&self, uuid: &str, offset: u64, data: &[u8]) -> io::Result<()> {
        let f = OpenOptions::new().write(true).open(self.path(uuid))?;
        f.write_all_at(data, offset)
    }

    /// Reads `buf.len()` bytes at `offset`; bytes past the end of the file
    /// read as zeros.
    pub fn read_at(&self, uuid: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        read_full_at(&self.open_read(uuid)?, offset, buf)
    }

    /// Deletes the file (no error if it is already gone).
    pub fn remove(&self, uuid: &str) -> io::Result<()> {
        match std::fs::remove_file(self.path(uuid)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Bytes allocated on disk (the `physical_utilisation`).
    pub fn allocated(&self, uuid: &str) -> u64 {
        std::fs::metadata(self.path(uuid))
            .map(|m| m.blocks() * 512)
            .unwrap_or(0)
    }

    /// Copies `src` into a new file `dst`, keeping holes.
    pub fn copy_sparse(&self, src: &str, dst: &str) -> io::Result<()> {
        let from = File::open(self.path(src))?;
        let size = from.metadata()?.len();
        let to = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(self.path(dst))?;
        to.set_len(size)?;
        let mut buf = vec![0u8; 1 << 20];
        for (start, end) in data_regions(&from, size)? {
            let mut pos = start;
            while pos < end {
                let n = ((end - pos) as usize).min(buf.len());
                read_full_at(&from, pos, &mut buf[..n])?;
                to.write_all_at(&buf[..n], pos)?;
                pos += n as u64;
            }
        }
        Ok(())
    }
}

/// Reads `buf.len()` bytes at `offset`, zero-filling past the end of file.
pub fn read_full_at(f: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The allocated regions of a file, as `[start, end)` byte ranges; the
/// whole file if the file system cannot tell.
fn data_regions(f: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = f.as_raw_fd();
    let end = i64::try_from(size).unwrap_or(i64::MAX);
    let mut regions = Vec::new();
    let mut pos: i64 = 0;
    while pos < end {
        // SAFETY: lseek on a descriptor we hold open has no memory effects.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ENXIO) => Ok(regions),
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(vec![(0, size)]),
                _ => Err(err),
            };
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Ok(vec![(0, size)]);
        }
        let hole = hole.min(end);
        if hole > data {
            regions.push((data as u64, hole as u64));
        }
        pos = hole;
    }
    Ok(regions)
}

/// Deterministic pseudo-random content for block `block` of a write seeded
/// with `seed`: every (seed, block) pair gives different bytes, and a
/// block is never all zeros.
pub fn block_content(seed: u64, block: u64, len: usize) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ block.wrapping_add(1),
    );
    let mut data = vec![0u8; len];
    rng.fill_bytes(&mut data);
    if let Some(first) = data.first_mut() {
        *first |= 1;
    }
    data
}

/// Length of block `block` of a disk of `size` bytes (the last may be short).
pub fn block_len(size: u64, block: u64) -> usize {
    let start = block * BLOCK_SIZE;
    size.saturating_sub(start).min(BLOCK_SIZE) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.create("a", 64 << 20).unwrap();
        store.write_at("a", 10 << 20, b"hello").unwrap();
        store.write_at("a", (64 << 20) - 3, b"end").unwrap();
        store.copy_sparse("a", "b").unwrap();
        let mut buf = [0u8; 5];
        store.read_at("b", 10 << 20, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        let mut buf = [0u8; 3];
        store.read_at("b", (64 << 20) - 3, &mut buf).unwrap();
        assert_eq!(&buf, b"end");
        assert!(store.allocated("b") < 8 << 20, "copy is not sparse");
        let mut past = [9u8; 4];
        store.read_at("b", 64 << 20, &mut past).unwrap();
        assert_eq!(past, [0; 4]);
        store.remove("b").unwrap();
        store.remove("b").unwrap();
    }

    #[test]
    fn block_content_is_deterministic_and_distinct() {
        assert_eq!(block_content(1, 2, 64), block_content(1, 2, 64));
        assert_ne!(block_content(1, 2, 64), block_content(1, 3, 64));
        assert_ne!(block_content(1, 2, 64), block_content(2, 2, 64));
        assert_eq!(block_len(BLOCK_SIZE + 10, 1), 10);
        assert_eq!(block_len(BLOCK_SIZE + 10, 0), BLOCK_SIZE as usize);
    }
}
