//! Pack files: many blobs appended back to back, followed by an index of
//! them and a fixed trailer (see `docs/formats.md`).
//!
//! ```text
//! [header 0][blob 0]…[header n-1][blob n-1][entry 0]…[entry n-1][trailer]
//! ```
//! The index and trailer sit at the end so a pack can be written in one
//! sequential pass, and so the catalogue can be rebuilt from packs alone.
//! Since version 2 each blob is framed by a header naming it, so that a
//! pack whose index is damaged can still be read blob by blob
//! ([`scan_blobs`]); version 1 packs (no headers) remain readable.

use std::mem::size_of;

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::BlobId;
use crate::backend::{Backend, FileKind};
use crate::crypto::{Crypto, Sealed};
use crate::error::{Error, Result};

/// Magic bytes at the start of a pack trailer.
pub const PACK_MAGIC: [u8; 8] = *b"CBTVPACK";
/// The pack format version this build writes (it reads 1 and 2).
pub const PACK_VERSION: u32 = 2;
/// Magic bytes at the start of each blob header (version 2).
pub const BLOB_MAGIC: [u8; 4] = *b"CBTB";

/// The header before each blob's stored bytes (version 2, 48 bytes). The
/// blob's id checks the whole frame: a damaged header only loses its blob.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
pub struct RawBlobHeader {
    /// [`BLOB_MAGIC`].
    pub magic: [u8; 4],
    /// [`BlobKind`] as a byte.
    pub kind: u8,
    /// [`Compression`] as a byte.
    pub compression: u8,
    /// Zero.
    pub reserved: [u8; 2],
    /// Length of the stored bytes that follow.
    pub stored_len: U32,
    /// Length once decompressed.
    pub raw_len: U32,
    /// BLAKE3 of the uncompressed content.
    pub id: [u8; 32],
}

/// Size of a blob header on disk.
pub const HEADER_LEN: usize = 48;
const _: () = assert!(size_of::<RawBlobHeader>() == HEADER_LEN);

/// One index entry, as stored on disk (little endian, 56 bytes).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
pub struct RawPackEntry {
    /// BLAKE3 of the blob's uncompressed content.
    pub id: [u8; 32],
    /// Offset of the stored bytes from the start of the pack.
    pub offset: U64,
    /// Length of the stored (possibly compressed) bytes.
    pub stored_len: U32,
    /// Length of the content once decompressed.
    pub raw_len: U32,
    /// [`BlobKind`] as a byte.
    pub kind: u8,
    /// [`Compression`] as a byte.
    pub compression: u8,
    /// Zero; room for later flags.
    pub reserved: [u8; 6],
}

/// The fixed trailer at the very end of a pack (48 bytes).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
pub struct RawPackTrailer {
    /// [`PACK_MAGIC`].
    pub magic: [u8; 8],
    /// [`PACK_VERSION`].
    pub version: U32,
    /// Number of index entries.
    pub count: U32,
    /// BLAKE3 of the index bytes; its hex form is the pack's name.
    pub index_hash: [u8; 32],
}

/// Size of one index entry on disk.
pub const ENTRY_LEN: usize = 56;
/// Size of the trailer on disk.
pub const TRAILER_LEN: usize = 48;
const _: () = assert!(size_of::<RawPackEntry>() == ENTRY_LEN);
const _: () = assert!(size_of::<RawPackTrailer>() == TRAILER_LEN);

/// What a blob holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlobKind {
    /// A 64 KiB disk block (the last block of a disk may be shorter).
    Data = 0,
    /// A node of a restore point's block map.
    Node = 1,
}

impl BlobKind {
    /// Parses the on-disk byte.
    pub fn from_u8(v: u8) -> Option<BlobKind> {
        match v {
            0 => Some(BlobKind::Data),
            1 => Some(BlobKind::Node),
            _ => None,
        }
    }
}

/// How a blob's bytes are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compression {
    /// As is: compression did not make it smaller.
    None = 0,
    /// A zstd frame.
    Zstd = 1,
}

impl Compression {
    /// Parses the on-disk byte.
    pub fn from_u8(v: u8) -> Option<Compression> {
        match v {
            0 => Some(Compression::None),
            1 => Some(Compression::Zstd),
            _ => None,
        }
    }
}

/// Where one blob sits inside a pack, and how to read it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackEntry {
    pub id: BlobId,
    pub kind: BlobKind,
    pub compression: Compression,
    pub offset: u64,
    pub stored_len: u32,
    pub raw_len: u32,
}

impl PackEntry {
    fn to_raw(self) -> RawPackEntry {
        RawPackEntry {
            id: self.id.0,
            offset: self.offset.into(),
            stored_len: self.stored_len.into(),
            raw_len: self.raw_len.into(),
            kind: self.kind as u8,
            compression: self.compression as u8,
            reserved: [0; 6],
        }
    }
}

/// Accumulates blobs in memory and turns them into a complete pack.
#[derive(Debug, Default)]
pub struct PackBuilder {
    data: Vec<u8>,
    entries: Vec<PackEntry>,
}

/// A pack ready to be stored under `name`.
#[derive(Debug)]
pub struct FinishedPack {
    /// Hex BLAKE3 of the index.
    pub name: String,
    /// The whole file.
    pub bytes: Vec<u8>,
    /// Its blobs.
    pub entries: Vec<PackEntry>,
}

impl PackBuilder {
    /// An empty pack with room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        PackBuilder {
            data: Vec::with_capacity(capacity),
            entries: Vec::new(),
        }
    }

    /// An empty pack in a buffer of a pack already written (its memory is
    /// reused, not its content).
    pub fn reusing(mut data: Vec<u8>) -> Self {
        data.clear();
        PackBuilder {
            data,
            entries: Vec::new(),
        }
    }

    /// Appends a blob's stored bytes.
    pub fn push(
        &mut self,
        id: BlobId,
        kind: BlobKind,
        compression: Compression,
        raw_len: u32,
        stored: &[u8],
    ) {
        let header = RawBlobHeader {
            magic: BLOB_MAGIC,
            kind: kind as u8,
            compression: compression as u8,
            reserved: [0; 2],
            stored_len: (stored.len() as u32).into(),
            raw_len: raw_len.into(),
            id: id.0,
        };
        self.data.extend_from_slice(header.as_bytes());
        self.entries.push(PackEntry {
            id,
            kind,
            compression,
            offset: self.data.len() as u64,
            stored_len: stored.len() as u32,
            raw_len,
        });
        self.data.extend_from_slice(stored);
    }

    /// Bytes of blob data so far.
    pub fn data_len(&self) -> usize {
        self.data.len()
    }

    /// True when nothing was pushed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends the index and trailer.
    pub fn finish(self) -> FinishedPack {
        let PackBuilder { mut data, entries } = self;
        let index_start = data.len();
        for entry in &entries {
            data.extend_from_slice(entry.to_raw().as_bytes());
        }
        let index_hash = *blake3::hash(&data[index_start..]).as_bytes();
        let trailer = RawPackTrailer {
            magic: PACK_MAGIC,
            version: PACK_VERSION.into(),
            count: (entries.len() as u32).into(),
            index_hash,
        };
        data.extend_from_slice(trailer.as_bytes());
        FinishedPack {
            name: hex::encode(index_hash),
            bytes: data,
            entries,
        }
    }
}

/// Reads and checks a stored pack's index.
pub fn read_index(backend: &dyn Backend, name: &str) -> Result<Vec<PackEntry>> {
    let corrupt = |what: String| Error::CorruptPack {
        pack: name.to_string(),
        what,
    };
    let size = backend.size(FileKind::Pack, name)?;
    if size < TRAILER_LEN as u64 {
        return Err(corrupt(format!(
            "truncated: {size} bytes, shorter than its trailer"
        )));
    }
    let tail = backend.read_at(FileKind::Pack, name, size - TRAILER_LEN as u64, TRAILER_LEN)?;
    let trailer =
        RawPackTrailer::read_from_bytes(&tail).map_err(|_| corrupt("unreadable trailer".into()))?;
    if trailer.magic != PACK_MAGIC {
        return Err(corrupt(
            "no pack trailer at the end (truncated or not a pack)".into(),
        ));
    }
    if !(1..=PACK_VERSION).contains(&trailer.version.get()) {
        return Err(corrupt(format!(
            "unknown pack version {}",
            trailer.version.get()
        )));
    }
    let count = u64::from(trailer.count.get());
    let index_len = count * ENTRY_LEN as u64;
    let data_len = size
        .checked_sub(TRAILER_LEN as u64 + index_len)
        .ok_or_else(|| {
            corrupt(format!(
                "index of {count} entries does not fit in {size} bytes"
            ))
        })?;
    let index = backend.read_at(FileKind::Pack, name, data_len, index_len as usize)?;
    if *blake3::hash(&index).as_bytes() != trailer.index_hash {
        return Err(corrupt("index checksum mismatch".into()));
    }
    if hex::encode(trailer.index_hash) != name {
        return Err(corrupt(
            "index checksum does not match the pack's name".into(),
        ));
    }
    let raw =
        <[RawPackEntry]>::ref_from_bytes(&index).map_err(|_| corrupt("unreadable index".into()))?;
    raw.iter()
        .enumerate()
        .map(|(i, e)| {
            let entry = PackEntry {
                id: BlobId(e.id),
                kind: BlobKind::from_u8(e.kind)
                    .ok_or_else(|| corrupt(format!("entry {i}: unknown blob kind {}", e.kind)))?,
                compression: Compression::from_u8(e.compression).ok_or_else(|| {
                    corrupt(format!("entry {i}: unknown compression {}", e.compression))
                })?,
                offset: e.offset.get(),
                stored_len: e.stored_len.get(),
                raw_len: e.raw_len.get(),
            };
            if entry.offset + u64::from(entry.stored_len) > data_len {
                return Err(corrupt(format!(
                    "entry {i} ({}) points past the blob data",
                    entry.id.short()
                )));
            }
            Ok(entry)
        })
        .collect()
}

/// Finds the blobs of a version 2 pack by their headers, without its
/// index: each candidate is decoded and kept only when its content matches
/// its id, so a damaged header or blob loses only itself. `bytes` is the
/// whole pack file (its index and trailer are never taken for blobs: their
/// bytes would have to hash to an id they name).
pub fn scan_blobs(name: &str, bytes: &[u8], crypto: &Crypto) -> Vec<PackEntry> {
    let mut found = Vec::new();
    let mut decompressor = zstd::bulk::Decompressor::new().ok();
    let mut pos = 0usize;
    while pos + HEADER_LEN <= bytes.len() {
        let Some(at) = bytes[pos..]
            .windows(BLOB_MAGIC.len())
            .position(|w| w == BLOB_MAGIC)
        else {
            break;
        };
        let start = pos + at;
        let parsed = bytes
            .get(start..start + HEADER_LEN)
            .and_then(|h| RawBlobHeader::read_from_bytes(h).ok())
            .and_then(|h| {
                let entry = PackEntry {
                    id: BlobId(h.id),
                    kind: BlobKind::from_u8(h.kind)?,
                    compression: Compression::from_u8(h.compression)?,
                    offset: (start + HEADER_LEN) as u64,
                    stored_len: h.stored_len.get(),
                    raw_len: h.raw_len.get(),
                };
                if entry.raw_len as usize > MAX_BLOB_LEN {
                    return None;
                }
                let stored = bytes
                    .get(start + HEADER_LEN..)?
                    .get(..entry.stored_len as usize)?;
                let decoded = match decompressor.as_mut() {
                    Some(d) => decode_blob_with(d, crypto, name, &entry, stored),
                    None => decode_blob(crypto, name, &entry, stored),
                };
                decoded.ok().map(|_| entry)
            });
        match parsed {
            Some(entry) => {
                pos = entry.offset as usize + entry.stored_len as usize;
                found.push(entry);
            }
            None => pos = start + 1,
        }
    }
    found
}

/// The largest blob content: a block (64 KiB) or a node (8 + 32·128 bytes).
pub const MAX_BLOB_LEN: usize = 64 * 1024;

/// Checks stored bytes against their entry and returns the content.
pub fn decode_blob(
    crypto: &Crypto,
    pack: &str,
    entry: &PackEntry,
    stored: &[u8],
) -> Result<Vec<u8>> {
    let mut decompressor = zstd::bulk::Decompressor::new().map_err(|e| Error::CorruptBlob {
        id: entry.id,
        pack: pack.to_string(),
        offset: entry.offset,
        what: format!("cannot set up zstd: {e}"),
    })?;
    decode_blob_with(&mut decompressor, crypto, pack, entry, stored)
}

/// [`decode_blob`] with a reusable decompression context (one per thread
/// on hot paths: creating a context costs more than decompressing a block).
pub fn decode_blob_with(
    decompressor: &mut zstd::bulk::Decompressor<'_>,
    crypto: &Crypto,
    pack: &str,
    entry: &PackEntry,
    stored: &[u8],
) -> Result<Vec<u8>> {
    let mut content = vec![0u8; (entry.raw_len as usize).min(MAX_BLOB_LEN)];
    decode_blob_into(decompressor, crypto, pack, entry, stored, &mut content)?;
    Ok(content)
}

/// [`decode_blob_with`] into `out`, which must be the blob's length: the
/// content lands where the caller wants it (a served read's buffer), with
/// no copy of its own.
pub fn decode_blob_into(
    decompressor: &mut zstd::bulk::Decompressor<'_>,
    crypto: &Crypto,
    pack: &str,
    entry: &PackEntry,
    stored: &[u8],
    out: &mut [u8],
) -> Result<()> {
    if !crypto.is_encrypted() {
        return decode_opened(decompressor, crypto, pack, entry, stored, out);
    }
    // Opened into this thread's scratch buffer: no allocation per blob.
    thread_local! {
        static OPENED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    OPENED.with(|cell| {
        let mut opened = cell.borrow_mut();
        crypto
            .open_into(
                Sealed::Blob(entry.kind as u8),
                &entry.id.0,
                stored,
                &mut opened,
            )
            .map_err(|e| {
                e.or_damaged(|what| Error::CorruptBlob {
                    id: entry.id,
                    pack: pack.to_string(),
                    offset: entry.offset,
                    what: format!("cannot be opened ({what}; the pack is damaged)"),
                })
            })?;
        decode_opened(decompressor, crypto, pack, entry, &opened, out)
    })
}

/// [`decode_blob_into`] once the stored bytes are opened.
fn decode_opened(
    decompressor: &mut zstd::bulk::Decompressor<'_>,
    crypto: &Crypto,
    pack: &str,
    entry: &PackEntry,
    stored: &[u8],
    out: &mut [u8],
) -> Result<()> {
    let corrupt = |what: String| Error::CorruptBlob {
        id: entry.id,
        pack: pack.to_string(),
        offset: entry.offset,
        what,
    };
    if entry.raw_len as usize > MAX_BLOB_LEN {
        return Err(corrupt(format!(
            "claims {} bytes, more than any blob holds",
            entry.raw_len
        )));
    }
    if out.len() != entry.raw_len as usize {
        return Err(corrupt(format!(
            "holds {} bytes where {} are wanted",
            entry.raw_len,
            out.len()
        )));
    }
    let len = match entry.compression {
        Compression::None if stored.len() == out.len() => {
            out.copy_from_slice(stored);
            out.len()
        }
        Compression::None => stored.len(),
        Compression::Zstd => decompressor
            .decompress_to_buffer(stored, out)
            .map_err(|e| corrupt(format!("cannot decompress: {e}")))?,
    };
    if len != entry.raw_len as usize {
        return Err(corrupt(format!(
            "decompressed to {len} bytes instead of {}",
            entry.raw_len
        )));
    }
    if crypto.blob_id(out)? != entry.id {
        return Err(corrupt(
            "content does not match its id (the pack is damaged)".into(),
        ));
    }
    Ok(())
}

/// Compresses `content` with zstd at `level` unless that does not make it
/// smaller, then seals it (in place) in an encrypted repository; returns
/// the bytes to store and how they are stored.
pub fn encode_blob(
    compressor: &mut zstd::bulk::Compressor<'_>,
    crypto: &Crypto,
    kind: BlobKind,
    id: &BlobId,
    content: &[u8],
) -> Result<(Compression, Vec<u8>)> {
    // zstd's output buffer has room for the seal's trailer already (its
    // bound exceeds any output that is smaller than the input by more).
    let (compression, mut stored) = match compressor.compress(content) {
        Ok(packed) if packed.len() < content.len() => (Compression::Zstd, packed),
        _ => {
            let mut raw = Vec::with_capacity(content.len() + crate::crypto::SEAL_OVERHEAD);
            raw.extend_from_slice(content);
            (Compression::None, raw)
        }
    };
    crypto.seal(Sealed::Blob(kind as u8), &id.0, &mut stored)?;
    Ok((compression, stored))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemoryBackend;

    fn sample() -> FinishedPack {
        let mut b = PackBuilder::with_capacity(1024);
        let mut c = zstd::bulk::Compressor::new(3).unwrap();
        for content in [vec![7u8; 4096], (0..=255u8).collect::<Vec<_>>()] {
            let id = BlobId::of(&content);
            let (comp, stored) =
                encode_blob(&mut c, &Crypto::Plain, BlobKind::Data, &id, &content).unwrap();
            b.push(id, BlobKind::Data, comp, content.len() as u32, &stored);
        }
        b.finish()
    }

    #[test]
    fn round_trip_and_checks() {
        let backend = MemoryBackend::new();
        let pack = sample();
        backend
            .write(FileKind::Pack, &pack.name, &pack.bytes)
            .unwrap();
        let entries = read_index(&backend, &pack.name).unwrap();
        assert_eq!(entries, pack.entries);
        assert_eq!(entries[0].compression, Compression::Zstd);
        assert_eq!(entries[1].compression, Compression::None);
        for e in &entries {
            let stored = backend
                .read_at(FileKind::Pack, &pack.name, e.offset, e.stored_len as usize)
                .unwrap();
            let content = decode_blob(&Crypto::Plain, &pack.name, e, &stored).unwrap();
            assert_eq!(BlobId::of(&content), e.id);
        }
        // A flipped data byte is caught by the blob's id.
        backend.corrupt(FileKind::Pack, &pack.name, (entries[1].offset + 3) as usize);
        let e = entries[1];
        let stored = backend
            .read_at(FileKind::Pack, &pack.name, e.offset, e.stored_len as usize)
            .unwrap();
        let err = decode_blob(&Crypto::Plain, &pack.name, &e, &stored)
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not match its id"), "{err}");
    }

    #[test]
    fn blobs_are_found_by_their_frames_when_the_index_is_gone() {
        let pack = sample();
        let mut bytes = pack.bytes.clone();
        // Wreck the index and trailer entirely.
        let n = bytes.len();
        for b in &mut bytes[n - TRAILER_LEN - 2 * ENTRY_LEN..] {
            *b = 0xAA;
        }
        assert_eq!(scan_blobs(&pack.name, &bytes, &Crypto::Plain), pack.entries);
        // A damaged blob loses only itself.
        bytes[pack.entries[0].offset as usize + 1] ^= 1;
        assert_eq!(
            scan_blobs(&pack.name, &bytes, &Crypto::Plain),
            pack.entries[1..]
        );
        // A damaged header likewise.
        let mut bytes = pack.bytes.clone();
        bytes[pack.entries[1].offset as usize - HEADER_LEN + 9] ^= 0x40;
        assert_eq!(
            scan_blobs(&pack.name, &bytes, &Crypto::Plain),
            pack.entries[..1]
        );
    }

    #[test]
    fn truncated_and_damaged_index_are_reported() {
        let backend = MemoryBackend::new();
        let pack = sample();
        backend
            .write(FileKind::Pack, "t", &pack.bytes[..pack.bytes.len() - 10])
            .unwrap();
        let err = read_index(&backend, "t").unwrap_err().to_string();
        assert!(err.contains("pack t"), "{err}");
        let mut bad = pack.bytes.clone();
        let n = bad.len();
        bad[n - TRAILER_LEN - 3] ^= 1;
        backend.write(FileKind::Pack, &pack.name, &bad).unwrap();
        let err = read_index(&backend, &pack.name).unwrap_err().to_string();
        assert!(err.contains("checksum"), "{err}");
    }
}
