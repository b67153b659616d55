//! Every parser of on-disk data fed random and mutated input: manifests,
//! pack trailers and indexes, blob frames, block-map nodes. None may panic,
//! allocate what a length field claims before checking it, or accept
//! damaged input as valid.

use cbtvault_repo::Crypto;
use cbtvault_repo::testing::pack::{self, BlobKind, PackBuilder, TRAILER_LEN};
use cbtvault_repo::testing::tree::{decode_node, encode_node};
use cbtvault_repo::{Backend, BlobId, FileKind, Manifest, MemoryBackend};
use proptest::prelude::*;

fn valid_manifest() -> Vec<u8> {
    let m = serde_json::json!({
        "format": 1,
        "disk": "vm1-disk0",
        "source": {"provider": "file", "location": "/images/vm1.raw"},
        "time": "2026-11-22T05:40:00.123Z",
        "virtual_size": 1_249_298u64,
        "block_size": 65536,
        "root": "00".repeat(32),
        "fanout": 128,
        "parent": null,
        "mode": {"kind": "full"},
        "stats": {"blocks_total": 20, "blocks_read": 20, "bytes_read": 1_249_298u64,
                  "blocks_zero": 0, "blocks_dedup": 0, "blocks_new": 20, "bytes_new": 0,
                  "bytes_stored": 0, "nodes_new": 1, "duration_ms": 5}
    });
    serde_json::to_vec_pretty(&m).unwrap()
}

fn sample_pack() -> pack::FinishedPack {
    let mut b = PackBuilder::with_capacity(1 << 16);
    let mut c = zstd::bulk::Compressor::new(3).unwrap();
    for i in 0..4u8 {
        let content: Vec<u8> = (0..4096u32)
            .map(|j| (j as u8).wrapping_mul(i + 1))
            .collect();
        let id = BlobId::of(&content);
        let (comp, stored) =
            pack::encode_blob(&mut c, &Crypto::Plain, BlobKind::Data, &id, &content).unwrap();
        b.push(id, BlobKind::Data, comp, content.len() as u32, &stored);
    }
    b.finish()
}

/// A mutation of `bytes`: flips, truncation, insertion, or a 32-bit field
/// set to a huge value.
fn mutate(bytes: &[u8], kind: u8, at: usize, value: u32) -> Vec<u8> {
    let mut out = bytes.to_vec();
    if out.is_empty() {
        return out;
    }
    let at = at % out.len();
    match kind % 4 {
        0 => out[at] ^= (value as u8) | 1,
        1 => out.truncate(at),
        2 => out.insert(at, value as u8),
        _ => {
            let end = (at + 4).min(out.len());
            let v = value.to_le_bytes();
            out[at..end].copy_from_slice(&v[..end - at]);
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn manifests_never_panic_and_damage_is_refused(kind in any::<u8>(), at in any::<usize>(), value in any::<u32>(), noise in prop::collection::vec(any::<u8>(), 0..512)) {
        let good = valid_manifest();
        prop_assert!(Manifest::from_json(&good).is_ok());
        let _ = Manifest::from_json(&noise);
        let bad = mutate(&good, kind, at, value);
        if let Ok(m) = Manifest::from_json(&bad) {
            // Whatever still parses is valid: no zero block size, no
            // absurd size, a disk name.
            prop_assert_eq!(m.block_size, 65536);
            prop_assert!(m.virtual_size <= cbtvault_repo::testing::manifest::MAX_VIRTUAL_SIZE);
            prop_assert!(!m.disk.is_empty());
            let _ = m.tree().shape.depth();
        }
    }

    #[test]
    fn pack_indexes_and_frames_never_panic(kind in any::<u8>(), at in any::<usize>(), value in any::<u32>()) {
        let pack = sample_pack();
        let bad = mutate(&pack.bytes, kind, at, value);
        let backend = MemoryBackend::new();
        backend.write(FileKind::Pack, &pack.name, &bad).unwrap();
        // An index that still checks out is the original one.
        if let Ok(entries) = pack::read_index(&backend, &pack.name) {
            prop_assert_eq!(entries, pack.entries.clone());
        }
        // Scanning finds only blobs whose content matches their id.
        for e in pack::scan_blobs(&pack.name, &bad, &Crypto::Plain) {
            let stored = &bad[e.offset as usize..e.offset as usize + e.stored_len as usize];
            prop_assert!(pack::decode_blob(&Crypto::Plain, &pack.name, &e, stored).is_ok());
        }
    }

    #[test]
    fn random_packs_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..4096), huge in any::<u32>()) {
        let backend = MemoryBackend::new();
        let mut bytes = bytes;
        // Sometimes a well-formed trailer claiming `huge` entries.
        if bytes.len() > TRAILER_LEN && huge % 2 == 0 {
            let n = bytes.len();
            bytes[n - TRAILER_LEN..n - TRAILER_LEN + 8].copy_from_slice(&pack::PACK_MAGIC);
            bytes[n - TRAILER_LEN + 8..n - TRAILER_LEN + 12].copy_from_slice(&2u32.to_le_bytes());
            bytes[n - TRAILER_LEN + 12..n - TRAILER_LEN + 16].copy_from_slice(&huge.to_le_bytes());
        }
        backend.write(FileKind::Pack, "p", &bytes).unwrap();
        prop_assert!(pack::read_index(&backend, "p").is_err());
        let _ = pack::scan_blobs("p", &bytes, &Crypto::Plain);
    }

    #[test]
    fn block_map_nodes_never_panic(kind in any::<u8>(), at in any::<usize>(), value in any::<u32>(), level in 0u32..6, children in 0u64..200, noise in prop::collection::vec(any::<u8>(), 0..600)) {
        let ids: Vec<BlobId> = (0..5u8).map(|i| BlobId::of(&[i])).collect();
        let good = encode_node(1, &ids);
        let id = BlobId::of(&good);
        prop_assert_eq!(decode_node(&id, &good, 1, 5).unwrap(), ids);
        let _ = decode_node(&id, &noise, level, children);
        let bad = mutate(&good, kind, at, value);
        if let Ok(decoded) = decode_node(&id, &bad, 1, 5) {
            prop_assert_eq!(decoded.len(), 5);
        }
    }
}
