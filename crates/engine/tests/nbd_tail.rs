//! The last, partial block of a disk over an NBD server that reads whole
//! 512-byte sectors only (cbtvault's own server in its xapi-nbd mode, which
//! answers EINVAL to anything else): issue 8, defect 20.

use std::sync::Arc;

use cbtvault_engine::DiskSource;
use cbtvault_engine::nbd::NbdSource;
use cbtvault_nbd::ConnectOptions;
use cbtvault_nbd::server::{MemoryExport, Mode, Server, ServerConfig};
use tokio_util::sync::CancellationToken;

/// A disk of 3 blocks and 700 bytes: its tail is no whole sector.
const SIZE: usize = 3 * 65536 + 700;

fn disk() -> Vec<u8> {
    (0..SIZE).map(|i| (i % 251) as u8 + 1).collect()
}

/// Serves `data` in xapi-nbd mode (no TLS) on a unix socket in `dir`.
async fn serve(dir: &std::path::Path, data: Vec<u8>) -> (ConnectOptions, CancellationToken) {
    let mut config = ServerConfig::default();
    config.mode = Mode::Minimal;
    let server = Server::new(config);
    server.add_export("disk", Arc::new(MemoryExport::new(data)));
    let path = dir.join("nbd.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move { server.serve_unix(listener, token).await });
    (ConnectOptions::unix(path, "disk"), stop)
}

#[tokio::test]
async fn an_export_of_whole_sectors_gives_the_disk_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    // As xapi-nbd exports a VDI: its block device, rounded up to sectors.
    let mut padded = disk();
    padded.resize(SIZE.div_ceil(512) * 512, 0);
    let (options, stop) = serve(dir.path(), padded).await;
    let source = NbdSource::connect(options, "test".into())
        .await
        .unwrap()
        .with_size(SIZE as u64)
        .unwrap();
    assert_eq!(source.size(), SIZE as u64);
    let tail = source.read_at(3 * 65536, 700).await.unwrap();
    assert_eq!(&tail[..], &disk()[3 * 65536..]);
    assert!(!source.info().details.contains_key("unreadable_tail_bytes"));
    stop.cancel();
}

#[tokio::test]
async fn an_export_ending_mid_sector_reads_what_it_can_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (options, stop) = serve(dir.path(), disk()).await;
    let source = NbdSource::connect(options, "test".into()).await.unwrap();
    assert_eq!(source.size(), SIZE as u64);
    // Whole blocks before the tail read as ever.
    let first = source.read_at(0, 65536).await.unwrap();
    assert_eq!(&first[..], &disk()[..65536]);
    // The tail: every whole sector, then zeros where no request can reach.
    let tail = source.read_at(3 * 65536, 700).await.unwrap();
    assert_eq!(tail.len(), 700);
    assert_eq!(&tail[..512], &disk()[3 * 65536..3 * 65536 + 512]);
    assert!(tail[512..].iter().all(|&b| b == 0));
    assert_eq!(
        source
            .info()
            .details
            .get("unreadable_tail_bytes")
            .map(String::as_str),
        Some("188")
    );
    stop.cancel();
}

#[tokio::test]
async fn a_disk_longer_than_its_export_by_a_sector_or_more_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (options, stop) = serve(dir.path(), disk()).await;
    let source = NbdSource::connect(options, "test".into()).await.unwrap();
    let Err(e) = source.with_size(SIZE as u64 + 512) else {
        panic!("a size past the export was accepted");
    };
    assert!(e.to_string().contains("NBD export only"), "{e}");
    stop.cancel();
}
