//! Micro-benchmarks of the per-block work: hashing, zero detection,
//! compression, and pack writing. `cargo bench -p cbtvault-benches`.

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

criterion_group!(benches, hashing, compression, pack_writing);
criterion_main!(benches);
