//! Sparse dynamic VHDs: the upload format that writes only some blocks of
//! an existing VDI.
//!
//! xapi-nbd serves VDIs read-only, and `PUT /import_raw_vdi?format=raw`
//! rewrites every byte. `format=vhd` hands the body to vhd-tool, which
//! writes onto the attached VDI only the sectors that the VHD's block
//! allocation table (BAT) and per-block sector bitmaps say are present.
//! [`SparseVhd`] builds such a VHD (Microsoft's "Virtual Hard Disk Image
//! Format Specification" v1.0: footer, dynamic disk header, BAT, then for
//! each allocated 2 MiB block a sector bitmap and the block's data) from a
//! set of 64 KiB blocks, streaming: memory is the BAT plus one block.
//! [`VhdReader`] parses one strictly, in stream order, as the simulator
//! (and vhd-tool reading from a socket) must.

use std::collections::BTreeSet;
use std::io::{self, Read, Write};

/// A VHD sector.
pub const SECTOR: u64 = 512;
/// The VHD block size written (the spec's default, and XenServer's).
pub const VHD_BLOCK: u64 = 2 << 20;
/// The unit of change: cbtvault's block (and XenServer's CBT block).
pub const GRAIN: u64 = 64 << 10;

const SECTORS_PER_BLOCK: u64 = VHD_BLOCK / SECTOR;
/// Sector bitmap of one block, padded to a sector (4096 bits = 512 bytes).
const BITMAP: u64 = SECTORS_PER_BLOCK / 8;
const FOOTER: usize = 512;
const DYN_HEADER: usize = 1024;
const UNUSED: u32 = u32::MAX;
/// Seconds from the Unix epoch to the VHD epoch (2000-01-01 00:00 UTC).
const VHD_EPOCH: u64 = 946_684_800;

/// Why a VHD was refused.
#[derive(Debug, thiserror::Error)]
pub enum VhdError {
    /// Reading the stream failed or it ended early.
    #[error("reading the VHD")]
    Io(#[from] io::Error),
    /// The bytes are not a valid dynamic VHD.
    #[error("invalid VHD: {0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> VhdError {
    VhdError::Invalid(msg.into())
}

/// One's complement of the byte sum, the checksum of footer and header
/// (the checksum field itself counted as zero).
fn checksum(bytes: &[u8], field: usize) -> u32 {
    let sum = bytes.iter().enumerate().fold(0u32, |acc, (i, b)| {
        if (field..field + 4).contains(&i) {
            acc
        } else {
            acc.wrapping_add(u32::from(*b))
        }
    });
    !sum
}

/// CHS geometry of the spec's appendix for `size` bytes.
fn geometry(size: u64) -> u32 {
    let total = (size / SECTOR).min(65535 * 16 * 255);
    let (mut spt, mut heads, mut cth);
    if total >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cth = total / spt;
    } else {
        spt = 17;
        cth = total / spt;
        heads = cth.div_ceil(1024).max(4);
        if cth >= heads * 1024 || heads > 16 {
            spt = 31;
            heads = 16;
            cth = total / spt;
        }
        if cth >= heads * 1024 {
            spt = 63;
            heads = 16;
            cth = total / spt;
        }
    }
    let cylinders = (cth / heads).min(65535);
    ((cylinders as u32) << 16) | ((heads as u32) << 8) | (spt as u32)
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(x)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// A dynamic VHD of a disk of `size` bytes holding only `grains` (64 KiB
/// block indices); the rest of the disk is absent, so importing it onto a
/// VDI leaves those bytes as they are.
#[derive(Clone, Debug)]
pub struct SparseVhd {
    size: u64,
    grains: BTreeSet<u64>,
    uuid: [u8; 16],
    timestamp: u32,
}

impl SparseVhd {
    /// A VHD of a `size`-byte disk carrying `grains`. `size` must be a
    /// whole number of sectors and every grain inside the disk.
    pub fn new(size: u64, grains: BTreeSet<u64>) -> Result<Self, VhdError> {
        if size == 0 || !size.is_multiple_of(SECTOR) {
            return Err(invalid(format!(
                "a VHD disk is whole sectors; {size} bytes is not"
            )));
        }
        if let Some(last) = grains.last()
            && last.saturating_mul(GRAIN) >= size
        {
            return Err(invalid(format!(
                "block {last} is beyond the end of a {size}-byte disk"
            )));
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(VHD_EPOCH);
        let mut uuid = [0u8; 16];
        uuid[..8].copy_from_slice(&now.to_be_bytes());
        uuid[8..].copy_from_slice(&(grains.len() as u64 ^ size).to_be_bytes());
        Ok(Self {
            size,
            grains,
            uuid,
            timestamp: now.saturating_sub(VHD_EPOCH) as u32,
        })
    }

    /// The disk's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The 64 KiB blocks carried.
    pub fn grains(&self) -> &BTreeSet<u64> {
        &self.grains
    }

    fn table_entries(&self) -> u64 {
        self.size.div_ceil(VHD_BLOCK)
    }

    fn table_bytes(&self) -> u64 {
        (self.table_entries() * 4).next_multiple_of(SECTOR)
    }

    /// The VHD blocks allocated, in order.
    fn vhd_blocks(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.grains.iter().map(|g| g * GRAIN / VHD_BLOCK).collect();
        v.dedup();
        v
    }

    fn data_start(&self) -> u64 {
        (FOOTER + DYN_HEADER) as u64 + self.table_bytes()
    }

    /// Length of the whole VHD in bytes (for `Content-Length`).
    pub fn len(&self) -> u64 {
        self.data_start() + self.vhd_blocks().len() as u64 * (BITMAP + VHD_BLOCK) + FOOTER as u64
    }

    /// Whether no block is carried (the VHD is headers only).
    pub fn is_empty(&self) -> bool {
        self.grains.is_empty()
    }

    /// The 512-byte footer (also written as its copy at offset 0).
    pub fn footer(&self) -> [u8; FOOTER] {
        let mut f = [0u8; FOOTER];
        f[0..8].copy_from_slice(b"conectix");
        f[8..12].copy_from_slice(&2u32.to_be_bytes());
        f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        f[16..24].copy_from_slice(&(FOOTER as u64).to_be_bytes());
        f[24..28].copy_from_slice(&self.timestamp.to_be_bytes());
        f[28..32].copy_from_slice(b"cbtv");
        f[32..36].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        f[36..40].copy_from_slice(b"Wi2k");
        f[40..48].copy_from_slice(&self.size.to_be_bytes());
        f[48..56].copy_from_slice(&self.size.to_be_bytes());
        f[56..60].copy_from_slice(&geometry(self.size).to_be_bytes());
        f[60..64].copy_from_slice(&3u32.to_be_bytes());
        f[68..84].copy_from_slice(&self.uuid);
        let sum = checksum(&f, 64);
        f[64..68].copy_from_slice(&sum.to_be_bytes());
        f
    }

    fn dyn_header(&self) -> [u8; DYN_HEADER] {
        let mut h = [0u8; DYN_HEADER];
        h[0..8].copy_from_slice(b"cxsparse");
        h[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        h[16..24].copy_from_slice(&((FOOTER + DYN_HEADER) as u64).to_be_bytes());
        h[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        h[28..32].copy_from_slice(&(self.table_entries() as u32).to_be_bytes());
        h[32..36].copy_from_slice(&(VHD_BLOCK as u32).to_be_bytes());
        let sum = checksum(&h, 36);
        h[36..40].copy_from_slice(&sum.to_be_bytes());
        h
    }

    /// Writes the VHD to `out`, asking `read_grain(index, buf)` for each
    /// carried block's bytes (`buf` is 64 KiB, or shorter for a last block
    /// that ends with the disk). Returns the bytes written.
    pub fn write_to<W, F>(&self, out: &mut W, mut read_grain: F) -> io::Result<u64>
    where
        W: Write,
        F: FnMut(u64, &mut [u8]) -> io::Result<()>,
    {
        if self.table_entries() > u64::from(u32::MAX) {
            return Err(io::Error::other("the disk is too large for a VHD"));
        }
        let footer = self.footer();
        out.write_all(&footer)?;
        out.write_all(&self.dyn_header())?;
        let blocks = self.vhd_blocks();
        let mut bat = vec![0xFFu8; self.table_bytes() as usize];
        for (i, b) in blocks.iter().enumerate() {
            let sector = (self.data_start() + i as u64 * (BITMAP + VHD_BLOCK)) / SECTOR;
            let sector = u32::try_from(sector)
                .map_err(|_| io::Error::other("the VHD is too large for its BAT"))?;
            let at = *b as usize * 4;
            bat[at..at + 4].copy_from_slice(&sector.to_be_bytes());
        }
        out.write_all(&bat)?;
        let mut written = (FOOTER + DYN_HEADER) as u64 + bat.len() as u64;
        let per_block = VHD_BLOCK / GRAIN;
        let zeros = vec![0u8; GRAIN as usize];
        let mut buf = vec![0u8; GRAIN as usize];
        for b in blocks {
            let first = b * per_block;
            let here: Vec<u64> = self
                .grains
                .range(first..first + per_block)
                .copied()
                .collect();
            let mut bitmap = [0u8; BITMAP as usize];
            for g in &here {
                let start = g * GRAIN;
                let end = (start + GRAIN).min(self.size);
                for s in (start / SECTOR)..(end / SECTOR) {
                    let i = (s - b * SECTORS_PER_BLOCK) as usize;
                    bitmap[i / 8] |= 0x80 >> (i % 8);
                }
            }
            out.write_all(&bitmap)?;
            for slot in first..first + per_block {
                if here.contains(&slot) {
                    let len = (self.size - slot * GRAIN).min(GRAIN) as usize;
                    buf.fill(0);
                    read_grain(slot, &mut buf[..len])?;
                    out.write_all(&buf)?;
                } else {
                    out.write_all(&zeros)?;
                }
            }
            written += BITMAP + VHD_BLOCK;
        }
        out.write_all(&footer)?;
        Ok(written + FOOTER as u64)
    }
}

/// A dynamic VHD read from a stream, validated as it goes: footer copy and
/// dynamic header checksums, the disk size against `expected_size`, the
/// block size, every BAT entry inside the file and in stream order.
pub struct VhdReader<R> {
    inner: R,
    size: u64,
    footer: [u8; FOOTER],
    /// (file sector of the block's bitmap, VHD block index), by sector.
    blocks: Vec<(u64, u64)>,
    next: usize,
    pos: u64,
}

impl<R: Read> VhdReader<R> {
    /// Reads and checks the footer copy, dynamic header and BAT.
    pub fn open(mut inner: R, expected_size: u64) -> Result<Self, VhdError> {
        let mut footer = [0u8; FOOTER];
        inner.read_exact(&mut footer)?;
        if &footer[0..8] != b"conectix" {
            return Err(invalid("no VHD footer (cookie \"conectix\") at offset 0"));
        }
        if be32(&footer, 64) != checksum(&footer, 64) {
            return Err(invalid("footer checksum mismatch"));
        }
        if be32(&footer, 60) != 3 {
            return Err(invalid(format!(
                "disk type {} is not dynamic (3)",
                be32(&footer, 60)
            )));
        }
        let size = be64(&footer, 48);
        if size != expected_size {
            return Err(invalid(format!(
                "the VHD's disk is {size} bytes, the VDI {expected_size}"
            )));
        }
        if be64(&footer, 16) != FOOTER as u64 {
            return Err(invalid("the dynamic header does not follow the footer"));
        }
        let mut h = [0u8; DYN_HEADER];
        inner.read_exact(&mut h)?;
        if &h[0..8] != b"cxsparse" {
            return Err(invalid("no dynamic header (cookie \"cxsparse\")"));
        }
        if be32(&h, 36) != checksum(&h, 36) {
            return Err(invalid("dynamic header checksum mismatch"));
        }
        if u64::from(be32(&h, 32)) != VHD_BLOCK {
            return Err(invalid(format!("block size {} is not 2 MiB", be32(&h, 32))));
        }
        if be64(&h, 16) != (FOOTER + DYN_HEADER) as u64 {
            return Err(invalid("the BAT does not follow the dynamic header"));
        }
        let entries = u64::from(be32(&h, 28));
        if entries != size.div_ceil(VHD_BLOCK) {
            return Err(invalid(format!(
                "{entries} BAT entries for a {size}-byte disk"
            )));
        }
        let table = (entries * 4).next_multiple_of(SECTOR);
        let mut bat = vec![0u8; table as usize];
        inner.read_exact(&mut bat)?;
        let pos = (FOOTER + DYN_HEADER) as u64 + table;
        let mut blocks = Vec::new();
        for i in 0..entries {
            let e = be32(&bat, i as usize * 4);
            if e != UNUSED {
                blocks.push((u64::from(e), i));
            }
        }
        blocks.sort_unstable();
        let mut end = pos / SECTOR;
        for (sector, block) in &blocks {
            if *sector < end {
                return Err(invalid(format!(
                    "BAT entry {block} points at sector {sector}, inside the headers or another block"
                )));
            }
            end = sector + (BITMAP + VHD_BLOCK) / SECTOR;
        }
        Ok(Self {
            inner,
            size,
            footer,
            blocks,
            next: 0,
            pos,
        })
    }

    /// The disk's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Calls `write(offset, bytes)` for every run of present sectors, in
    /// disk-block order, then checks the trailing footer. Returns the
    /// sectors present.
    pub fn for_each_run<F>(mut self, mut write: F) -> Result<u64, VhdError>
    where
        F: FnMut(u64, &[u8]) -> Result<(), VhdError>,
    {
        let mut sectors = 0;
        let mut data = vec![0u8; VHD_BLOCK as usize];
        while let Some(&(sector, block)) = self.blocks.get(self.next) {
            self.next += 1;
            self.skip_to(sector * SECTOR)?;
            let mut bitmap = [0u8; BITMAP as usize];
            self.inner.read_exact(&mut bitmap)?;
            self.inner.read_exact(&mut data)?;
            self.pos += BITMAP + VHD_BLOCK;
            let base = block * VHD_BLOCK;
            let mut run: Option<u64> = None;
            for i in 0..=SECTORS_PER_BLOCK {
                let present =
                    i < SECTORS_PER_BLOCK && bitmap[(i / 8) as usize] & (0x80 >> (i % 8)) != 0;
                if present && base + (i + 1) * SECTOR > self.size {
                    return Err(invalid(format!(
                        "block {block} marks sector {i}, beyond the end of the disk"
                    )));
                }
                match (present, run) {
                    (true, None) => run = Some(i),
                    (false, Some(start)) => {
                        let (a, b) = ((start * SECTOR) as usize, (i * SECTOR) as usize);
                        write(base + start * SECTOR, &data[a..b])?;
                        sectors += i - start;
                        run = None;
                    }
                    _ => {}
                }
            }
        }
        let mut footer = [0u8; FOOTER];
        self.inner.read_exact(&mut footer)?;
        if footer != self.footer {
            return Err(invalid("the trailing footer differs from its copy"));
        }
        Ok(sectors)
    }

    fn skip_to(&mut self, at: u64) -> Result<(), VhdError> {
        let gap = at - self.pos;
        let copied = io::copy(&mut (&mut self.inner).take(gap), &mut io::sink())?;
        if copied != gap {
            return Err(VhdError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        self.pos = at;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
