//! Micro-benchmarks of the per-block work: hashing, zero detection,
//! compression, pack writing, changed-block bitmap decoding, and what the
//! suite's profiles showed matters beside them: the catalogue's dedup
//! lookups and pack indexing, a restore's decoding of stored blocks, and
//! opening a repository (the fixed cost of every incremental).
//! `cargo bench -p cbtvault-benches` (`scripts/bench micro`).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rand::{RngCore, SeedableRng};

const BLOCK: usize = 64 * 1024;

fn blocks() -> Vec<(&'static str, Vec<u8>)> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mut random = vec![0u8; BLOCK];
    rng.fill_bytes(&mut random);
    let text: Vec<u8> = b"the quick backup of a virtual disk reads only changed blocks\n"
        .iter()
        .cycle()
        .take(BLOCK)
        .copied()
        .collect();
    vec![
        ("random", random),
        ("text", text),
        ("zero", vec![0u8; BLOCK]),
    ]
}

fn hashing(c: &mut Criterion) {
    let mut g = c.benchmark_group("hash");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    let (_, random) = &blocks()[0];
    g.bench_function("blake3-64KiB", |b| {
        b.iter(|| blake3::hash(std::hint::black_box(random)))
    });
    g.bench_function("zero-check-64KiB", |b| {
        let zero = vec![0u8; BLOCK];
        b.iter(|| cbtvault_repo::is_all_zero(std::hint::black_box(&zero)))
    });
    g.finish();
}

fn compression(c: &mut Criterion) {
    let mut g = c.benchmark_group("zstd");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    for level in [1, 3] {
        let mut comp = zstd::bulk::Compressor::new(level).expect("zstd");
        for (name, data) in blocks() {
            g.bench_with_input(
                BenchmarkId::new(format!("compress-l{level}"), name),
                &data,
                |b, d| {
                    let id = cbtvault_repo::BlobId::of(d);
                    b.iter(|| {
                        cbtvault_repo::testing::pack::encode_blob(
                            &mut comp,
                            &cbtvault_repo::Crypto::Plain,
                            cbtvault_repo::testing::pack::BlobKind::Data,
                            &id,
                            d,
                        )
                    })
                },
            );
        }
    }
    for (name, data) in blocks() {
        let packed = zstd::bulk::compress(&data, 3).expect("zstd");
        g.bench_with_input(BenchmarkId::new("decompress", name), &packed, |b, p| {
            b.iter(|| zstd::bulk::decompress(p, BLOCK).expect("decompress"))
        });
    }
    g.finish();
}

fn pack_writing(c: &mut Criterion) {
    let mut g = c.benchmark_group("pack");
    g.sample_size(10);
    let count = 256;
    g.throughput(Throughput::Bytes((count * BLOCK) as u64));
    g.bench_function("write-16MiB-durable", |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().expect("tempdir");
                let repo =
                    cbtvault_repo::Repository::init(&dir.path().join("r"), &Default::default())
                        .expect("init");
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
                let data: Vec<Vec<u8>> = (0..count)
                    .map(|_| {
                        let mut v = vec![0u8; BLOCK];
                        rng.fill_bytes(&mut v);
                        v
                    })
                    .collect();
                (dir, repo, data)
            },
            |(_dir, repo, data)| {
                let mut w = repo.pack_writer(None).expect("writer");
                for d in &data {
                    let id = cbtvault_repo::BlobId::of(d);
                    w.add_stored(
                        id,
                        cbtvault_repo::testing::pack::BlobKind::Data,
                        cbtvault_repo::testing::pack::Compression::None,
                        BLOCK as u32,
                        d,
                    )
                    .expect("add");
                }
                w.flush().expect("flush");
            },
            criterion::BatchSize::PerIteration,
        )
    });
    g.finish();
}

/// A repository holding `count` random blocks in one pack, and their ids.
fn filled_repository(
    count: usize,
) -> (
    tempfile::TempDir,
    cbtvault_repo::Repository,
    Vec<cbtvault_repo::BlobId>,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo =
        cbtvault_repo::Repository::init(&dir.path().join("r"), &Default::default()).expect("init");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let mut ids = Vec::with_capacity(count);
    let mut w = repo.pack_writer(None).expect("writer");
    for _ in 0..count {
        let mut v = vec![0u8; BLOCK];
        rng.fill_bytes(&mut v[..BLOCK / 2]);
        ids.push(
            w.add(cbtvault_repo::testing::pack::BlobKind::Data, &v)
                .expect("add"),
        );
    }
    w.flush().expect("flush");
    drop(w);
    (dir, repo, ids)
}

fn bitmaps(c: &mut Criterion) {
    let mut g = c.benchmark_group("bitmap");
    // A 2 TiB disk with 1% of its blocks changed, as list_changed_blocks
    // returns it.
    let size = 2u64 << 40;
    let blocks = size / BLOCK as u64;
    let mut map = cbtvault_blockmap::BlockMap::empty(blocks);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    for _ in 0..blocks / 100 {
        map.set(rng.next_u64() % blocks);
    }
    let text = map.to_xenapi_base64();
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("decode-xenapi-2TiB", |b| {
        b.iter(|| {
            cbtvault_blockmap::BlockMap::from_xenapi_base64(std::hint::black_box(&text), size)
                .expect("decode")
        })
    });
    g.bench_function("count-and-runs-2TiB", |b| {
        b.iter(|| std::hint::black_box(&map).runs(16).count())
    });
    g.finish();
}

fn catalogue(c: &mut Criterion) {
    let mut g = c.benchmark_group("catalogue");
    let count = 4096;
    let (_dir, repo, ids) = filled_repository(count);
    g.throughput(Throughput::Elements(count as u64));
    g.bench_function("dedup-lookups-4096", |b| {
        let cat = repo.catalogue();
        b.iter(|| {
            for id in &ids {
                std::hint::black_box(cat.contains(id).expect("lookup"));
            }
        })
    });
    g.bench_function("locate-4096", |b| {
        let cat = repo.catalogue();
        b.iter(|| {
            for id in &ids {
                std::hint::black_box(cat.locate(id).expect("locate"));
            }
        })
    });
    g.finish();
}

fn restore_decoding(c: &mut Criterion) {
    let mut g = c.benchmark_group("restore");
    let count = 256;
    let (_dir, repo, ids) = filled_repository(count);
    g.throughput(Throughput::Bytes((count * BLOCK) as u64));
    g.bench_function("read-many-into-16MiB", |b| {
        let reader = repo.reader().expect("reader");
        let mut buffer = vec![0u8; count * BLOCK];
        b.iter(|| {
            let mut slots: Vec<(cbtvault_repo::BlobId, &mut [u8])> =
                ids.iter().copied().zip(buffer.chunks_mut(BLOCK)).collect();
            reader.read_many_into(&mut slots).expect("read")
        })
    });
    g.finish();
}

fn opening(c: &mut Criterion) {
    let mut g = c.benchmark_group("repository");
    let (dir, repo, _) = filled_repository(64);
    drop(repo);
    g.bench_function("open", |b| {
        b.iter(|| cbtvault_repo::Repository::open(&dir.path().join("r")).expect("open"))
    });
    g.finish();
}

criterion_group!(
    benches,
    hashing,
    compression,
    pack_writing,
    bitmaps,
    catalogue,
    restore_decoding,
    opening
);
criterion_main!(benches);
