//! A disk held in memory, for tests that must see exactly what a backup
//! read.

use std::sync::{Arc, Mutex, MutexGuard};

use cbtvault_blockmap::{BLOCK_SIZE, BlockMap, block_count};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A read that [`MemDisk::fail_reads_from`] told to fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadFailed {
    pub offset: u64,
    pub len: usize,
}

impl std::fmt::Display for ReadFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "injected I/O error reading {} bytes at offset {}",
            self.len, self.offset
        )
    }
}

impl std::error::Error for ReadFailed {}

#[derive(Debug)]
struct State {
    bytes: Vec<u8>,
    /// Reads that touched each block.
    reads: Vec<u64>,
    /// Blocks written since the last [`MemDisk::take_changes`].
    changed: BlockMap,
    /// Reads that reach this offset fail.
    fail_from: Option<u64>,
}

/// A disk in memory. Clones share the same bytes and counters, so a test
/// keeps one handle while the backup reads through another.
#[derive(Debug, Clone)]
pub struct MemDisk {
    state: Arc<Mutex<State>>,
}

impl MemDisk {
    /// A disk holding `bytes`.
    pub fn new(bytes: Vec<u8>) -> MemDisk {
        let blocks = block_count(bytes.len() as u64);
        MemDisk {
            state: Arc::new(Mutex::new(State {
                reads: vec![0; blocks as usize],
                changed: BlockMap::empty(blocks),
                bytes,
                fail_from: None,
            })),
        }
    }

    /// A disk of `size` bytes, deterministic for `seed`: runs of zero,
    /// repeated and random blocks, so backups see holes and duplicates.
    pub fn generated(size: u64, seed: u64) -> MemDisk {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut bytes = vec![0u8; size as usize];
        for block in bytes.chunks_mut(BLOCK_SIZE as usize) {
            match rng.gen_range(0..4u8) {
                0 => {}
                1 => block.fill(rng.r#gen()),
                _ => rng.fill_bytes(block),
            }
        }
        MemDisk::new(bytes)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A test that panicked mid-read must not hide its own failure.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.state().bytes.len() as u64
    }

    /// A copy of the whole disk.
    pub fn bytes(&self) -> Vec<u8> {
        self.state().bytes.clone()
    }

    /// Reads `len` bytes at `offset`, counting one read of every block it
    /// touches. Fails when the range reaches the offset given to
    /// [`fail_reads_from`](Self::fail_reads_from) or the end of the disk.
    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, ReadFailed> {
        let mut s = self.state();
        let end = offset.saturating_add(len as u64);
        let failed = ReadFailed { offset, len };
        if end > s.bytes.len() as u64 || s.fail_from.is_some_and(|at| end > at) {
            return Err(failed);
        }
        if len > 0 {
            for block in offset / BLOCK_SIZE..=(end - 1) / BLOCK_SIZE {
                s.reads[block as usize] += 1;
            }
        }
        Ok(s.bytes[offset as usize..end as usize].to_vec())
    }

    /// The guest writes `data` at `offset` (within the disk); the blocks
    /// it touches are marked changed.
    pub fn write(&self, offset: u64, data: &[u8]) {
        let mut s = self.state();
        let end = offset as usize + data.len();
        assert!(end <= s.bytes.len(), "write past the end of the disk");
        s.bytes[offset as usize..end].copy_from_slice(data);
        if !data.is_empty() {
            s.changed
                .set_range(offset / BLOCK_SIZE..(end as u64 - 1) / BLOCK_SIZE + 1);
        }
    }

    /// The blocks changed since the last call, as a changed-block tracker
    /// reports them; tracking starts again.
    pub fn take_changes(&self) -> BlockMap {
        let mut s = self.state();
        let blocks = s.changed.block_count();
        std::mem::replace(&mut s.changed, BlockMap::empty(blocks))
    }

    /// Makes every later read that reaches `offset` fail (`None`: none).
    pub fn fail_reads_from(&self, offset: Option<u64>) {
        self.state().fail_from = offset;
    }

    /// How many reads touched each block since the last
    /// [`reset_reads`](Self::reset_reads).
    pub fn reads_per_block(&self) -> Vec<u64> {
        self.state().reads.clone()
    }

    /// Starts counting reads from zero.
    pub fn reset_reads(&self) {
        self.state().reads.fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_counted_per_block_and_writes_tracked() {
        let disk = MemDisk::generated(3 * BLOCK_SIZE + 100, 1);
        assert_eq!(disk.read(BLOCK_SIZE - 1, 2).map(|b| b.len()), Ok(2));
        assert_eq!(disk.reads_per_block(), vec![1, 1, 0, 0]);
        disk.write(3 * BLOCK_SIZE, &[7; 100]);
        let changes = disk.take_changes();
        assert_eq!(changes.set_blocks().collect::<Vec<_>>(), vec![3]);
        assert!(!disk.take_changes().any_set());
        disk.fail_reads_from(Some(2 * BLOCK_SIZE));
        assert!(disk.read(BLOCK_SIZE, BLOCK_SIZE as usize).is_ok());
        assert!(disk.read(BLOCK_SIZE, BLOCK_SIZE as usize + 1).is_err());
        assert!(disk.read(3 * BLOCK_SIZE, 101).is_err());
    }
}
