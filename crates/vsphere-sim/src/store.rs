//! Disk images: sparse files in the state directory. A guest write is a
//! `pwrite`; a snapshot freezes the disk by copying only its non-zero
//! 64 KiB pieces into a new sparse file, so MiB-size test disks stay cheap
//! and GiB-size demo disks stay small on disk.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, Result};

const PIECE: usize = 64 * 1024;

fn state_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::State {
        path: path.to_owned(),
        source,
    }
}

/// Makes a sparse image of `size` bytes (or grows an existing one).
pub fn create(path: &Path, size: u64) -> Result<()> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(state_err(path))?;
    f.set_len(size).map_err(state_err(path))
}

pub fn write(path: &Path, offset: u64, data: &[u8]) -> Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(state_err(path))?;
    f.write_all_at(data, offset).map_err(state_err(path))
}

pub fn read(path: &Path, offset: u64, len: usize) -> Result<Vec<u8>> {
    let f = File::open(path).map_err(state_err(path))?;
    read_file(&f, offset, len).map_err(state_err(path))
}

/// Reads `len` bytes at `offset`; past the end reads zeros.
pub fn read_file(f: &File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = f.read_at(&mut buf[done..], offset + done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(buf)
}

/// Copies `from` to `to`, leaving holes where `from` has zeros.
pub fn freeze(from: &Path, to: &Path) -> Result<()> {
    let src = File::open(from).map_err(state_err(from))?;
    let size = src.metadata().map_err(state_err(from))?.len();
    let dst = File::create(to).map_err(state_err(to))?;
    dst.set_len(size).map_err(state_err(to))?;
    let mut off = 0u64;
    while off < size {
        let n = PIECE.min((size - off) as usize);
        let piece = read_file(&src, off, n).map_err(state_err(from))?;
        if piece.iter().any(|&b| b != 0) {
            dst.write_all_at(&piece, off).map_err(state_err(to))?;
        }
        off += n as u64;
    }
    Ok(())
}
