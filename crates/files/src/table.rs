//! Partition tables (through `mbrman` and `gptman`) and recognising what
//! a partition holds.
//!
//! A disk whose first sector is no MBR — or is the boot sector of a file
//! system (FAT and NTFS boot sectors end in the same 0x55AA signature) —
//! is one file system. An MBR with a protective entry (type 0xEE) means
//! GPT. Partitions are named as Linux names them: `p1`..`p4` for the MBR's
//! primary slots, `p5` on for logical partitions in the extended one, and
//! `pN` for GPT entry N. Extended containers are not listed.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::view::Slice;

/// MBR sectors are 512 bytes; mbrman is told so.
const SECTOR: u64 = 512;

/// One partition of the disk.
#[derive(Clone, Debug, Serialize)]
pub struct Partition {
    /// `p1`, `p2`, ...
    pub name: String,
    /// `MBR` or `GPT`.
    pub table: &'static str,
    /// Byte offset on the disk.
    pub start: u64,
    /// Bytes.
    pub size: u64,
    /// The partition type: an MBR type byte (`0x83`) or a GPT type (a
    /// known name, else the GUID).
    pub kind: String,
}

/// How the disk is laid out.
pub(crate) enum Layout {
    /// No partition table: the disk is one file system.
    Whole,
    Table(Vec<Partition>),
}

fn bad(table: &'static str, detail: impl ToString) -> Error {
    Error::BadPartitionTable {
        table,
        detail: detail.to_string(),
    }
}

pub(crate) fn read_layout(disk: &Slice) -> Result<Layout> {
    let mut sector = [0u8; 512];
    if disk.len() < SECTOR || disk.read_exact_at(0, &mut sector).is_err() {
        return Ok(Layout::Whole);
    }
    if sector[510..512] != [0x55, 0xAA] || boot_sector(&sector).is_some() {
        return Ok(Layout::Whole);
    }
    let entries: Vec<&[u8]> = (0..4)
        .map(|i| &sector[446 + 16 * i..446 + 16 * (i + 1)])
        .collect();
    // A boot flag other than 0 or 0x80 means these bytes are no MBR.
    if entries.iter().any(|e| e[0] != 0 && e[0] != 0x80) {
        return Ok(Layout::Whole);
    }
    if entries.iter().all(|e| e[4] == 0) {
        return Ok(Layout::Whole);
    }
    if entries.iter().any(|e| e[4] == 0xEE) {
        return gpt(disk).map(Layout::Table);
    }
    let mbr =
        mbrman::MBR::read_from(&mut disk.clone(), SECTOR as u32).map_err(|e| bad("MBR", e))?;
    let mut parts = Vec::new();
    for (i, p) in mbr.iter() {
        if p.is_unused() || p.is_extended() {
            continue;
        }
        parts.push(Partition {
            name: format!("p{i}"),
            table: "MBR",
            start: u64::from(p.starting_lba) * SECTOR,
            size: u64::from(p.sectors) * SECTOR,
            kind: format!("0x{:02x}", p.sys),
        });
    }
    Ok(Layout::Table(parts))
}

/// Refuses headers whose entry counts would make gptman allocate
/// without bound before it checks anything (their CRC can be right).
fn check_gpt_headers(disk: &Slice) -> Result<()> {
    let len = disk.len();
    let places = [512, 4096, len.saturating_sub(512), len.saturating_sub(4096)];
    for at in places {
        let mut h = [0u8; 92];
        if disk.read_exact_at(at, &mut h).is_err() || &h[..8] != b"EFI PART" {
            continue;
        }
        let count = u32::from_le_bytes([h[80], h[81], h[82], h[83]]);
        let size = u32::from_le_bytes([h[84], h[85], h[86], h[87]]);
        if count > 4096 || !(128..=4096).contains(&size) {
            return Err(bad(
                "GPT",
                format!("the header at byte {at} claims {count} entries of {size} bytes"),
            ));
        }
    }
    Ok(())
}

fn gpt(disk: &Slice) -> Result<Vec<Partition>> {
    check_gpt_headers(disk)?;
    let gpt = gptman::GPT::find_from(&mut disk.clone()).map_err(|e| bad("GPT", e))?;
    let sector = gpt.sector_size;
    let mut parts = Vec::new();
    for (i, p) in gpt.iter() {
        if !p.is_used() {
            continue;
        }
        let sectors = p
            .ending_lba
            .checked_sub(p.starting_lba)
            .and_then(|n| n.checked_add(1))
            .ok_or_else(|| bad("GPT", format!("partition {i} ends before it starts")))?;
        parts.push(Partition {
            name: format!("p{i}"),
            table: "GPT",
            start: p.starting_lba.saturating_mul(sector),
            size: sectors.saturating_mul(sector),
            kind: gpt_type(&p.partition_type_guid),
        });
    }
    Ok(parts)
}

/// A GPT type GUID in its usual text form (the first three fields are
/// little-endian on disk), or its common name.
fn gpt_type(g: &[u8; 16]) -> String {
    let text = format!(
        "{:02X}{:02X}{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
        g[3],
        g[2],
        g[1],
        g[0],
        g[5],
        g[4],
        g[7],
        g[6],
        g[8],
        g[9],
        g[10],
        g[11],
        g[12],
        g[13],
        g[14],
        g[15]
    );
    let known = match text.as_str() {
        "0FC63DAF-8483-4772-8E79-3D69D8477DE4" => "Linux filesystem",
        "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7" => "Microsoft basic data",
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" => "EFI system",
        "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F" => "Linux swap",
        "E6D6D379-F507-44C2-A23C-238F2A3DF928" => "Linux LVM",
        "21686148-6449-6E6F-744E-656564454649" => "BIOS boot",
        _ => return text,
    };
    known.to_string()
}

/// What a boot sector says it is: `NTFS`, `FAT` or `exFAT`.
fn boot_sector(s: &[u8; 512]) -> Option<&'static str> {
    if &s[3..11] == b"NTFS    " {
        return Some("NTFS");
    }
    if &s[3..11] == b"EXFAT   " {
        return Some("exFAT");
    }
    if &s[54..57] == b"FAT" || &s[82..87] == b"FAT32" {
        return Some("FAT");
    }
    None
}

/// The file systems this crate reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FsKind {
    Ext,
    Ntfs,
    Fat,
}

/// Recognises what `part` holds from its signatures: a reader for it, or
/// a description of what was found instead.
pub(crate) fn probe(part: &Slice) -> std::result::Result<FsKind, String> {
    let mut head = vec![0u8; 4096.min(part.len()) as usize];
    part.read_exact_at(0, &mut head)
        .map_err(|e| format!("its first bytes cannot be read ({e})"))?;
    let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
    if let Ok(first) = <&[u8; 512]>::try_from(head.get(..512).unwrap_or(&[]))
        && first[510..512] == [0x55, 0xAA]
    {
        match boot_sector(first) {
            Some("NTFS") => return Ok(FsKind::Ntfs),
            Some("FAT") => return Ok(FsKind::Fat),
            Some(other) => return Err(format!("an {other} file system")),
            None => {}
        }
    }
    if at(1080, &[0x53, 0xEF]) {
        return Ok(FsKind::Ext);
    }
    if at(0, b"XFSB") {
        return Err("an XFS file system (no maintained pure-Rust XFS reader exists yet)".into());
    }
    if at(512, b"LABELONE") {
        return Err("an LVM physical volume".into());
    }
    if at(0, b"LUKS\xba\xbe") {
        return Err("a LUKS encrypted volume".into());
    }
    if at(4086, b"SWAPSPACE2") || at(4086, b"SWAP-SPACE") {
        return Err("Linux swap".into());
    }
    if head.iter().all(|&b| b == 0) {
        return Err("no file system (its first 4 KiB read as zeros)".into());
    }
    Err("no file system signature this tool knows (it reads ext2/3/4, NTFS and FAT)".into())
}
