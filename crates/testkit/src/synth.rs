//! Synthetic disk images with a realistic mix of content, for
//! tests and benchmarks: zero blocks (left as holes), compressible
//! text-like blocks, incompressible random blocks, and repeated blocks
//! that deduplicate. Deterministic for a given seed.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use cbtvault_blockmap::{BLOCK_SIZE, BlockMap, block_count};
use rand::seq::SliceRandom;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The share of each kind of block, in percent (the rest are random).
#[derive(Clone, Copy, Debug)]
pub struct Mix {
    pub zero: u8,
    pub text: u8,
    pub duplicate: u8,
    /// Leave zero blocks as holes (a sparse file) rather than writing zeros.
    pub holes: bool,
}

impl Default for Mix {
    /// About 40% zero, 30% text, 25% random and 5% copies of earlier blocks.
    fn default() -> Self {
        Mix {
            zero: 40,
            text: 30,
            duplicate: 5,
            holes: true,
        }
    }
}

const WORDS: &[&str] = &[
    "the",
    "disk",
    "block",
    "backup",
    "kernel",
    "error",
    "request",
    "server",
    "user",
    "session",
    "GET",
    "/var/log",
    "200",
    "404",
    "INFO",
    "WARN",
    "connection",
    "restored",
    "snapshot",
    "pool",
    "tracking",
    "changed",
    "virtual",
    "machine",
    "2026-11-22T03:14:15Z",
    "xen",
    "qemu",
    "nbd",
    "export",
    "sector",
    "journal",
    "inode",
];

/// Fills `buf` with one block of the given kind.
fn fill(rng: &mut ChaCha8Rng, kind: u8, buf: &mut [u8]) {
    match kind {
        0 => buf.fill(0),
        1 => {
            let mut pos = 0;
            while pos < buf.len() {
                let word = WORDS[rng.gen_range(0..WORDS.len())].as_bytes();
                let sep: &[u8] = if rng.gen_ratio(1, 12) { b"\n" } else { b" " };
                for &b in word.iter().chain(sep) {
                    if pos < buf.len() {
                        buf[pos] = b;
                        pos += 1;
                    }
                }
            }
        }
        _ => rng.fill_bytes(buf),
    }
}

/// Writes a sparse image of `size` bytes at `path`, block by block.
pub fn write_image(path: &Path, size: u64, seed: u64, mix: Mix) -> std::io::Result<()> {
    let file = OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(true)
        .open(path)?;
    file.set_len(size)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let blocks = block_count(size);
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    // Runs of one kind, as real disks have, rather than a salt-and-pepper mix.
    let mut block = 0;
    let mut written: Vec<u64> = Vec::new();
    while block < blocks {
        let run = rng.gen_range(1..=64u64).min(blocks - block);
        let roll = rng.gen_range(0..100u8);
        let kind = if roll < mix.zero {
            0
        } else if roll < mix.zero + mix.text {
            1
        } else if roll < mix.zero + mix.text + mix.duplicate && !written.is_empty() {
            3
        } else {
            2
        };
        for b in block..block + run {
            let offset = b * BLOCK_SIZE;
            let len = BLOCK_SIZE.min(size - offset) as usize;
            match kind {
                0 if mix.holes => continue,
                0 => buf[..len].fill(0),
                3 => {
                    let from = written[rng.gen_range(0..written.len())];
                    let from_len = BLOCK_SIZE.min(size - from * BLOCK_SIZE) as usize;
                    file.read_exact_at(&mut buf[..from_len], from * BLOCK_SIZE)?;
                    if from_len < len {
                        buf[from_len..len].fill(0);
                    }
                }
                k => fill(&mut rng, k, &mut buf[..len]),
            }
            file.write_all_at(&buf[..len], offset)?;
            written.push(b);
        }
        block += run;
    }
    file.sync_all()
}

/// Overwrites `fraction` of the blocks of the image at `path` (scattered,
/// with new text or random content) and returns the map of changed blocks,
/// as a changed-block tracker would report it.
pub fn churn(path: &Path, fraction: f64, seed: u64) -> std::io::Result<BlockMap> {
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    let blocks = block_count(file.metadata()?.len());
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let count = ((blocks as f64) * fraction).round() as usize;
    let mut all: Vec<u64> = (0..blocks).collect();
    all.shuffle(&mut rng);
    all.truncate(count);
    rewrite(&file, &all, &mut rng)
}

/// Like [`churn`], but written the way guests write: half of the changed
/// blocks scattered one by one (metadata, logs), half in runs of 2 to 64
/// neighbours (files rewritten whole). The same seed gives the same blocks
/// and bytes, so two copies of an image churned alike stay identical.
pub fn churn_like_guest(path: &Path, fraction: f64, seed: u64) -> std::io::Result<BlockMap> {
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    let blocks = block_count(file.metadata()?.len());
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let count = (((blocks as f64) * fraction).round() as u64).min(blocks);
    let mut chosen = BlockMap::empty(blocks);
    let mut picked = 0;
    while picked < count {
        let run = if picked < count / 2 {
            1
        } else {
            rng.gen_range(2..=64u64).min(count - picked)
        };
        let start = rng.gen_range(0..blocks);
        for b in start..(start + run).min(blocks) {
            if !chosen.is_set(b) {
                chosen.set(b);
                picked += 1;
            }
        }
    }
    let order: Vec<u64> = chosen.set_blocks().collect();
    rewrite(&file, &order, &mut rng)
}

/// Writes new text or random content over `blocks`, in that order.
fn rewrite(
    file: &std::fs::File,
    blocks: &[u64],
    rng: &mut ChaCha8Rng,
) -> std::io::Result<BlockMap> {
    let size = file.metadata()?.len();
    let mut map = BlockMap::empty(block_count(size));
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    for &b in blocks {
        let offset = b * BLOCK_SIZE;
        let len = BLOCK_SIZE.min(size - offset) as usize;
        let kind = if rng.gen_bool(0.5) { 1 } else { 2 };
        fill(rng, kind, &mut buf[..len]);
        file.write_all_at(&buf[..len], offset)?;
        map.set(b);
    }
    file.sync_all()?;
    Ok(map)
}
