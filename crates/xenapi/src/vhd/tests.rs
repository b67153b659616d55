use super::*;

/// Builds the VHD of `grains` of a disk whose block `g` is filled with
/// byte `g + 1`, and parses it back into a copy of the disk.
fn round_trip(size: u64, grains: &[u64]) -> (Vec<u8>, Vec<u8>, u64) {
    let vhd = SparseVhd::new(size, grains.iter().copied().collect()).expect("valid");
    let mut bytes = Vec::new();
    let n = vhd
        .write_to(&mut bytes, |g, buf| {
            buf.fill(g as u8 + 1);
            Ok(())
        })
        .expect("write");
    assert_eq!(n, bytes.len() as u64);
    assert_eq!(vhd.len(), n);
    let mut disk = vec![0u8; size as usize];
    let reader = VhdReader::open(&bytes[..], size).expect("open");
    let sectors = reader
        .for_each_run(|at, data| {
            disk[at as usize..at as usize + data.len()].copy_from_slice(data);
            Ok(())
        })
        .expect("parse");
    (bytes, disk, sectors)
}

#[test]
fn round_trip_writes_only_the_blocks_carried() {
    let size = 8 << 20;
    let (bytes, disk, sectors) = round_trip(size, &[0, 3, 40, 127]);
    assert_eq!(sectors, 4 * GRAIN / SECTOR);
    for (g, chunk) in disk.chunks(GRAIN as usize).enumerate() {
        let want = if [0, 3, 40, 127].contains(&g) {
            g as u8 + 1
        } else {
            0
        };
        assert!(chunk.iter().all(|b| *b == want), "block {g}");
    }
    // Blocks 0 and 3 share VHD block 0; 40 is in 1; 127 in 3: three
    // allocated 2 MiB blocks.
    assert_eq!(
        bytes.len() as u64,
        512 + 1024 + 512 + 3 * (512 + VHD_BLOCK) + 512
    );
}

#[test]
fn a_block_at_the_disks_end_is_cut_to_the_disk() {
    // 2 MiB + 64 KiB + 4 KiB: the last VHD block is mostly outside the
    // disk and the last 64 KiB block is 4 KiB long.
    let size = VHD_BLOCK + GRAIN + 4096;
    let last = size / GRAIN;
    let (_, disk, sectors) = round_trip(size, &[last]);
    assert_eq!(sectors, 4096 / SECTOR);
    assert!(disk[..(last * GRAIN) as usize].iter().all(|b| *b == 0));
    assert!(
        disk[(last * GRAIN) as usize..]
            .iter()
            .all(|b| *b == last as u8 + 1)
    );
}

#[test]
fn an_empty_vhd_is_headers_only() {
    let (bytes, _, sectors) = round_trip(1 << 20, &[]);
    assert_eq!(sectors, 0);
    assert_eq!(bytes.len(), 512 + 1024 + 512 + 512);
}

#[test]
fn checksums_follow_the_spec() {
    let vhd = SparseVhd::new(4 << 20, BTreeSet::from([1])).expect("valid");
    let f = vhd.footer();
    let sum: u32 = f
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .map(|(_, b)| u32::from(*b))
        .sum();
    assert_eq!(be32(&f, 64), !sum);
    let h = vhd.dyn_header();
    let sum: u32 = h
        .iter()
        .enumerate()
        .filter(|(i, _)| !(36..40).contains(i))
        .map(|(_, b)| u32::from(*b))
        .sum();
    assert_eq!(be32(&h, 36), !sum);
}

fn sample(size: u64) -> Vec<u8> {
    let vhd = SparseVhd::new(size, BTreeSet::from([0, 33])).expect("valid");
    let mut bytes = Vec::new();
    vhd.write_to(&mut bytes, |_, buf| {
        buf.fill(9);
        Ok(())
    })
    .expect("write");
    bytes
}

fn refused(bytes: &[u8], size: u64) -> String {
    let r = VhdReader::open(bytes, size).and_then(|r| r.for_each_run(|_, _| Ok(())));
    match r {
        Err(e) => e.to_string(),
        Ok(_) => panic!("accepted"),
    }
}

#[test]
fn malformed_vhds_are_refused() {
    let size = 4 << 20;
    let good = sample(size);
    let mut bad = good.clone();
    bad[100] ^= 1;
    assert!(refused(&bad, size).contains("footer checksum"));
    let mut bad = good.clone();
    bad[512 + 200] ^= 1;
    assert!(refused(&bad, size).contains("dynamic header checksum"));
    assert!(refused(&good, size * 2).contains("the VDI"));
    // A BAT entry pointing back into the headers.
    let mut bad = good.clone();
    bad[1536..1540].copy_from_slice(&1u32.to_be_bytes());
    assert!(refused(&bad, size).contains("BAT entry"));
    // Truncated: the trailing footer is missing.
    assert!(refused(&good[..good.len() - 100], size).contains("reading"));
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 1] ^= 1;
    assert!(refused(&bad, size).contains("trailing footer"));
}

#[test]
fn sizes_that_are_not_sectors_and_blocks_past_the_end_are_refused() {
    assert!(SparseVhd::new(1000, BTreeSet::new()).is_err());
    assert!(SparseVhd::new(1 << 20, BTreeSet::from([16])).is_err());
}
