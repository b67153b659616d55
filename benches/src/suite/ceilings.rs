//! The machine's ceilings, measured in the same run as the tools: what
//! reading, hashing, compressing and writing the same bytes costs with
//! nothing else around them. A tool's figure divided by its ceiling says
//! how much of the machine it leaves unused.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{Context, Result};
use cbtvault_blockmap::{BLOCK_SIZE, BlockMap, block_count};

use crate::measure::{self, Cost};

/// zstd level of a new cbtvault repository (and of borg here).
pub const ZSTD_LEVEL: i32 = 3;

/// Reads, hashes and compresses `blocks` of `image` on one core, as a
/// backup of exactly those blocks must at least; returns the cost and the
/// bytes they take once compressed (raw when compression does not shrink
/// a block, as the repository stores them).
pub fn changed_blocks_alone(image: &Path, blocks: &BlockMap) -> Result<(Cost, u64)> {
    let file = File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let size = file.metadata()?.len();
    measure::in_process(|| {
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        let mut compressor = zstd::bulk::Compressor::new(ZSTD_LEVEL)?;
        let mut stored = 0u64;
        for b in blocks.set_blocks() {
            let len = BLOCK_SIZE.min(size - b * BLOCK_SIZE) as usize;
            file.read_exact_at(&mut buf[..len], b * BLOCK_SIZE)?;
            std::hint::black_box(blake3::hash(&buf[..len]));
            let packed = compressor.compress(&buf[..len])?;
            stored += packed.len().min(len) as u64;
        }
        Ok(stored)
    })
}

/// Up to `limit` bytes of the image's non-zero blocks, in memory.
pub fn sample(image: &Path, limit: usize) -> Result<Vec<u8>> {
    let file = File::open(image)?;
    let size = file.metadata()?.len();
    let mut out = Vec::with_capacity(limit);
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    for b in 0..block_count(size) {
        if out.len() >= limit {
            break;
        }
        let len = BLOCK_SIZE.min(size - b * BLOCK_SIZE) as usize;
        file.read_exact_at(&mut buf[..len], b * BLOCK_SIZE)?;
        if buf[..len].iter().any(|&x| x != 0) {
            out.extend_from_slice(&buf[..len]);
        }
    }
    Ok(out)
}

/// Single-core throughput, in MB/s, of BLAKE3 and of zstd compression at
/// the repository's level, block by block over `sample` (`rounds` times:
/// the sample stays small so that the children the suite measures do not
/// inherit a large RSS from it).
pub fn hash_and_compress_rates(sample: &[u8], rounds: usize) -> Result<(f64, f64)> {
    let mb = (sample.len() * rounds) as f64 / 1e6;
    let (hash, ()) = measure::in_process(|| {
        for _ in 0..rounds {
            for block in sample.chunks(BLOCK_SIZE as usize) {
                std::hint::black_box(blake3::hash(block));
            }
        }
        Ok(())
    })?;
    let (compress, ()) = measure::in_process(|| {
        let mut compressor = zstd::bulk::Compressor::new(ZSTD_LEVEL)?;
        for _ in 0..rounds {
            for block in sample.chunks(BLOCK_SIZE as usize) {
                std::hint::black_box(compressor.compress(block)?);
            }
        }
        Ok(())
    })?;
    Ok((mb / hash.wall_s, mb / compress.wall_s))
}

/// Writes the image's non-zero blocks to a new file at their offsets, in
/// order, and fsyncs it: what any restore of this image must at least do.
/// Returns the cost and the bytes written.
pub fn durable_write(image: &Path, out: &Path) -> Result<(Cost, u64)> {
    let file = File::open(image)?;
    let size = file.metadata()?.len();
    measure::sync();
    let result = measure::in_process(|| {
        let mut target = File::create(out)?;
        target.set_len(size)?;
        // Large writes, as a restore coalesces neighbours.
        let mut run: Vec<u8> = Vec::with_capacity(4 << 20);
        let mut run_start = 0u64;
        let mut written = 0u64;
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        let flush = |run: &mut Vec<u8>, at: u64, target: &mut File| -> Result<u64> {
            if run.is_empty() {
                return Ok(0);
            }
            target.write_all_at(run, at)?;
            let n = run.len() as u64;
            run.clear();
            Ok(n)
        };
        for b in 0..block_count(size) {
            let offset = b * BLOCK_SIZE;
            let len = BLOCK_SIZE.min(size - offset) as usize;
            file.read_exact_at(&mut buf[..len], offset)?;
            let zero = buf[..len].iter().all(|&x| x == 0);
            if zero || run.len() >= 4 << 20 {
                written += flush(&mut run, run_start, &mut target)?;
            }
            if !zero {
                if run.is_empty() {
                    run_start = offset;
                }
                run.extend_from_slice(&buf[..len]);
            }
        }
        written += flush(&mut run, run_start, &mut target)?;
        target.flush()?;
        target.sync_all()?;
        Ok(written)
    });
    let _ = std::fs::remove_file(out);
    result
}
