//! Damaged and hostile file systems: real images with seeded random
//! corruption, read through every operation. Each must end in a result
//! or an error, never a panic out of the crate or a hang; the loop is
//! bounded in time so that it runs in CI quickly. `FILES_FUZZ_SECS` sets
//! the time per image (default 4 s); `FILES_FUZZ_SEED` replays one seed.

mod images;

use std::path::Path;
use std::time::{Duration, Instant};

use cbtvault_files::{Error, Explorer, Kind, Options};
use images::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Small, so that a reader sent round a loop gives up quickly.
const OPTIONS: Options = Options {
    cache_blocks: 64,
    read_budget: 32 << 20,
};

/// Lists, stats and extracts everything reachable (bounded), ignoring
/// errors: what matters is that each call returns. Counts the reader
/// panics the crate caught.
fn exercise(x: &mut Explorer, out: &Path) -> u64 {
    let mut caught = 0;
    let mut note = |r: Result<(), Error>| {
        if matches!(r, Err(Error::ReaderPanicked { .. })) {
            caught += 1;
        }
    };
    let mut queue = vec![("/".to_string(), 0)];
    let mut seen = 0;
    while let Some((dir, depth)) = queue.pop() {
        let entries = match x.list(&dir) {
            Ok(entries) => entries,
            Err(e) => {
                note(Err(e));
                continue;
            }
        };
        for e in entries.into_iter().take(64) {
            seen += 1;
            if seen > 400 {
                return caught;
            }
            let path = format!("{}/{}", dir.trim_end_matches('/'), e.name);
            note(x.stat(&path).map(drop));
            if (e.kind == Kind::Dir || e.kind == Kind::Partition) && depth < 6 {
                queue.push((path, depth + 1));
            } else if e.size < (16 << 20) {
                note(x.get(std::slice::from_ref(&path), out).map(drop));
            }
        }
    }
    caught
}

/// The 4 KiB pages of `img` that hold anything: where metadata is.
fn used_pages(img: &[u8]) -> Vec<usize> {
    img.chunks(4096)
        .enumerate()
        .filter(|(_, p)| p.iter().any(|&b| b != 0))
        .map(|(i, _)| i)
        .collect()
}

fn corrupt(img: &[u8], pages: &[usize], rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut bad = img.to_vec();
    let hits = rng.gen_range(1..=24);
    for _ in 0..hits {
        let page = pages[rng.gen_range(0..pages.len())];
        let at = page * 4096 + rng.gen_range(0..4096);
        if at >= bad.len() {
            continue;
        }
        match rng.gen_range(0..4) {
            0 => bad[at] ^= 1 << rng.gen_range(0..8),
            1 => bad[at] = rng.r#gen(),
            2 => bad[at] = 0xFF,
            _ => {
                // A run of garbage: a torn sector.
                let end = (at + rng.gen_range(1..64)).min(bad.len());
                rng.fill(&mut bad[at..end]);
            }
        }
    }
    bad
}

fn fuzz(label: &str, img: &Path) {
    let clean = std::fs::read(img).unwrap();
    let pages = used_pages(&clean);
    let secs: u64 = std::env::var("FILES_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let only: Option<u64> = std::env::var("FILES_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok());
    let deadline = Instant::now() + Duration::from_secs(secs);
    let scratch = tempfile::tempdir().unwrap();
    let (mut runs, mut caught, mut slowest) = (0u64, 0u64, Duration::ZERO);
    for seed in 0u64.. {
        if only.is_some_and(|s| s != seed) {
            if seed > only.unwrap_or(0) {
                break;
            }
            continue;
        }
        if only.is_none() && Instant::now() > deadline {
            break;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
        let bad = corrupt(&clean, &pages, &mut rng);
        let out = scratch.path().join(seed.to_string());
        let started = Instant::now();
        // A panic escaping the crate fails the test here, naming the seed.
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match Explorer::open_image(
                bad, label, OPTIONS,
            ) {
                Ok(mut x) => exercise(&mut x, &out),
                Err(e) => u64::from(matches!(e, Error::ReaderPanicked { .. })),
            }));
        let Ok(panicked) = outcome else {
            panic!("{label}: seed {seed} panicked out of the crate");
        };
        caught += panicked;
        let took = started.elapsed();
        slowest = slowest.max(took);
        assert!(
            took < Duration::from_secs(20),
            "{label}: seed {seed} took {took:?}"
        );
        let _ = std::fs::remove_dir_all(&out);
        runs += 1;
    }
    // Panics of a third-party reader caught by the crate are errors, not
    // failures, but worth knowing about (a bug to report upstream).
    eprintln!(
        "{label}: {runs} corrupted images, slowest {slowest:?}, {caught} reader panics caught"
    );
    assert!(runs > 0 || only.is_some());
}

#[test]
fn corrupted_ext4() {
    let dir = tempfile::tempdir().unwrap();
    let tree = tree(dir.path(), true);
    fuzz("ext4", &ext4(dir.path(), "e.img", &tree, 12));
}

#[test]
fn corrupted_fat() {
    let dir = tempfile::tempdir().unwrap();
    let tree = tree(dir.path(), false);
    fuzz("fat", &fat(dir.path(), "f.img", &tree, 8));
}

#[test]
fn corrupted_ntfs() {
    let dir = tempfile::tempdir().unwrap();
    let files = [
        ("a.txt", b"hello".to_vec()),
        ("b.bin", content(5, 300_000)),
        (UNICODE_NAME, b"x".to_vec()),
    ];
    fuzz("ntfs", &ntfs(dir.path(), "n.img", &files, 8));
}

#[test]
fn corrupted_partition_tables() {
    let dir = tempfile::tempdir().unwrap();
    let tree = tree(dir.path(), false);
    let f = fat(dir.path(), "p.fat", &tree, 8);
    let mbr = partitioned(
        dir.path(),
        "mbr.img",
        24,
        "label: dos\n,9M,c\n,,5\n,9M,c\n",
        &[(1, &f), (5, &f)],
    );
    fuzz("mbr", &mbr);
    let gpt = partitioned(dir.path(), "gpt.img", 24, "label: gpt\n,9M,L\n", &[(1, &f)]);
    fuzz("gpt", &gpt);
}

#[test]
fn a_hostile_gpt_header_is_refused_before_any_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let tree = tree(dir.path(), false);
    let f = fat(dir.path(), "p.fat", &tree, 8);
    let gpt = partitioned(dir.path(), "gpt.img", 24, "label: gpt\n,9M,L\n", &[(1, &f)]);
    let mut img = std::fs::read(&gpt).unwrap();
    // 2^31 entries, with the header's CRC made right again.
    img[512 + 80..512 + 84].copy_from_slice(&0x8000_0000u32.to_le_bytes());
    img[512 + 16..512 + 20].fill(0);
    let crc = crc32(&img[512..512 + 92]);
    img[512 + 16..512 + 20].copy_from_slice(&crc.to_le_bytes());
    let err = Explorer::open_image(img, "hostile", OPTIONS)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("2147483648 entries"), "{err}");
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
