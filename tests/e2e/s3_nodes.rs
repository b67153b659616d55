//! The block-map node cache of an S3 repository's host: an incremental
//! reads its parent's nodes from the cache, not one request each from the
//! bucket; a cache that is gone or damaged costs requests, never
//! correctness.

use std::path::PathBuf;

use crate::common::*;
use crate::s3::{FaultProxy, S3Server, backup, ok, restore};

/// The node cache files under the cache directory.
fn node_caches(s: &Scratch) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![s.path("cache")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.file_name().is_some_and(|n| n == "nodes.sqlite") {
                found.push(path);
            }
        }
    }
    found
}

/// Runs `sql` on each node cache (python's sqlite3, as an operator's
/// tool would).
fn tamper(s: &Scratch, sql: &str) {
    for cache in node_caches(s) {
        let status = std::process::Command::new("python3")
            .args([
                "-c",
                "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute(sys.argv[2]); c.commit()",
            ])
            .arg(&cache)
            .arg(sql)
            .status()
            .unwrap();
        assert!(status.success());
    }
}

#[test]
fn an_s3_incremental_reads_its_parents_nodes_from_the_hosts_cache_and_trusts_none_it_cannot_check()
{
    let s = Scratch::new();
    let server = S3Server::start();
    server.create_bucket("nodes");
    // Counts every request; spoils none.
    let proxy = FaultProxy::start(server.port, u64::MAX);
    let url = format!("s3://nodes/r?endpoint=http://127.0.0.1:{}", proxy.port);
    ok(&s, &url, &["init"]);
    // 64 MiB: 1024 blocks under 16 leaf nodes.
    let image = s.image("disk.img", 64, 7);
    let source = format!("file:{}", image.display());
    backup(&s, &url, &source, None);
    assert_eq!(node_caches(&s).len(), 1, "the full backup made the cache");

    // Each night changes about 20 blocks scattered over most leaves.
    let night = |n: u64| {
        let (changed, bitmap) = s.churn(&image, 0.02, 10 + n, &format!("n{n}.b64"));
        let before = proxy.requests();
        let point = backup(&s, &url, &source, Some(&bitmap));
        assert_eq!(point["mode"]["kind"], "incremental", "{point}");
        let leaves: std::collections::BTreeSet<u64> =
            changed.set_blocks().map(|b| b / 64).collect();
        (point, proxy.requests() - before, leaves.len() as u64)
    };

    let (cached, with_cache, _) = night(1);
    assert_same_file(&image, &restore(&s, &url, &id(&cached), "n1.img"));

    // Without the cache, the parent's nodes come from the bucket again:
    // requests for the leaves the change touched (neighbours in a pack may
    // share one).
    for cache in node_caches(&s) {
        std::fs::remove_file(cache).unwrap();
    }
    let (uncached, without_cache, leaves) = night(2);
    assert!(
        without_cache >= with_cache + leaves / 2,
        "{without_cache} requests without the cache, {with_cache} with it, {leaves} leaves touched"
    );
    assert_same_file(&image, &restore(&s, &url, &id(&uncached), "n2.img"));

    // A cache whose rows were damaged is not believed: the nodes are read
    // from the bucket, checked, and the restore point is exact.
    tamper(&s, "UPDATE nodes SET bytes = zeroblob(length(bytes))");
    let (after_damage, _, _) = night(3);
    assert_same_file(&image, &restore(&s, &url, &id(&after_damage), "n3.img"));
    // A cache file that is not a database at all is set aside.
    for cache in node_caches(&s) {
        std::fs::write(cache, vec![0x5a; 16384]).unwrap();
    }
    let (after_garbage, _, _) = night(4);
    assert_same_file(&image, &restore(&s, &url, &id(&after_garbage), "n4.img"));
    ok(&s, &url, &["verify", "--read-data"]);
}
