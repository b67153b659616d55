//! `files ls` and `files get` through the binary, on images made by the
//! real mkfs tools and backed up with `backup --source file:`: files come
//! back byte for byte, with their modes, times and symlinks; bad paths,
//! restore points and file systems give errors that say which.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use serde_json::Value;

use crate::common::*;

#[path = "../../crates/files/tests/images/mod.rs"]
mod images;

fn ls(s: &Scratch, rp: &str, path: &str) -> Value {
    serde_json::from_str(&s.ok(&["files", "ls", "--json", rp, path])).expect("ls json")
}

fn names(v: &Value) -> Vec<String> {
    v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect()
}

fn same_tree(want: &Path, got: &Path) {
    for e in std::fs::read_dir(want).unwrap() {
        let e = e.unwrap();
        let (w, g) = (e.path(), got.join(e.file_name()));
        let mw = std::fs::symlink_metadata(&w).unwrap();
        let mg =
            std::fs::symlink_metadata(&g).unwrap_or_else(|_| panic!("{} missing", g.display()));
        if mw.file_type().is_symlink() {
            assert_eq!(
                std::fs::read_link(&w).unwrap(),
                std::fs::read_link(&g).unwrap()
            );
        } else if mw.is_dir() {
            assert!(mg.is_dir());
            assert_eq!(
                mw.permissions().mode(),
                mg.permissions().mode(),
                "{}",
                g.display()
            );
            same_tree(&w, &g);
        } else {
            assert_same_file(&w, &g);
            assert_eq!(
                mw.permissions().mode(),
                mg.permissions().mode(),
                "{}",
                g.display()
            );
            assert_eq!(mw.mtime(), mg.mtime(), "{}", g.display());
        }
    }
}

#[test]
fn files_from_an_ext4_disk_come_back_with_their_metadata() {
    let s = Scratch::new();
    let tree = images::tree(s.dir.path(), true);
    // An owner other than the one running the test (only root can give one).
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        std::os::unix::fs::lchown(tree.join("hello.txt"), Some(1234), Some(5678)).unwrap();
    }
    let img = images::ext4(s.dir.path(), "ext4.img", &tree, 64);
    let rp = id(&s.backup("linux", &img, None));
    let top = ls(&s, &rp, "/");
    for n in ["docs", "hello.txt", "link", images::UNICODE_NAME] {
        assert!(names(&top).contains(&n.to_string()), "{n}: {top}");
    }
    // Only the blocks the reader touched were fetched, not the 1024 of the disk.
    assert!(top["blocks_fetched"].as_u64().unwrap() < 64, "{top}");
    let text = s.ok(&["files", "ls", &rp, "/"]);
    assert!(text.contains("link -> docs/deep/small.bin"), "{text}");
    assert!(text.contains("drwxr-x---"), "{text}");

    let out = s.path("out");
    let report: Value = serde_json::from_str(&s.ok(&[
        "files",
        "get",
        "--json",
        &rp,
        "/",
        "--to",
        out.to_str().unwrap(),
    ]))
    .unwrap();
    assert!(report["report"]["files"].as_u64().unwrap() >= 6, "{report}");
    same_tree(&tree, &out);
    if root {
        let hello = std::fs::metadata(out.join("hello.txt")).unwrap();
        assert_eq!((hello.uid(), hello.gid()), (1234, 5678));
        let listed = ls(&s, &rp, "/hello.txt");
        assert_eq!(listed["entries"][0]["uid"], 1234, "{listed}");
    }
    // By the selector too, a single file.
    let one = s.path("one");
    s.ok(&[
        "files",
        "get",
        "--quiet",
        "linux@latest",
        "docs/deep/small.bin",
        "--to",
        one.to_str().unwrap(),
    ]);
    assert_same_file(&tree.join("docs/deep/small.bin"), &one.join("small.bin"));
}

#[test]
fn files_from_gpt_and_mbr_disks_with_ntfs_fat_and_ext4() {
    let s = Scratch::new();
    let dir = s.dir.path();
    let tree = images::tree(dir, true);
    let e = images::ext4(dir, "p.ext4", &tree, 20);
    let f = images::fat(dir, "p.fat", &tree, 16);
    let big = images::content(9, 5 << 20);
    let n = images::ntfs(
        dir,
        "p.ntfs",
        &[
            ("win.txt", b"from windows".to_vec()),
            ("big.bin", big.clone()),
        ],
        12,
    );
    let gpt = images::partitioned(
        dir,
        "gpt.img",
        64,
        "label: gpt\n,21M,L\n,13M,EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n",
        &[(1, &e), (2, &n)],
    );
    let rp = id(&s.backup("gpt", &gpt, None));
    assert_eq!(names(&ls(&s, &rp, "/")), ["p1", "p2"]);
    let top = s.ok(&["files", "ls", &rp]);
    assert!(
        top.contains("GPT Linux filesystem") && top.contains("ext4") && top.contains("NTFS"),
        "{top}"
    );
    assert_eq!(names(&ls(&s, &rp, "p2")), ["big.bin", "win.txt"]);
    let out = s.path("gpt-out");
    s.ok(&[
        "files",
        "get",
        "--quiet",
        &rp,
        "p1/docs",
        "p2/big.bin",
        "--to",
        out.to_str().unwrap(),
    ]);
    same_tree(&tree.join("docs"), &out.join("docs"));
    assert_eq!(std::fs::read(out.join("big.bin")).unwrap(), big);

    let mbr = images::partitioned(
        dir,
        "mbr.img",
        64,
        "label: dos\n,17M,c\n,,5\n,21M,83\n",
        &[(1, &f), (5, &e)],
    );
    let rp = id(&s.backup("mbr", &mbr, None));
    assert_eq!(names(&ls(&s, &rp, "/")), ["p1", "p5"]);
    let out = s.path("mbr-out");
    s.ok(&[
        "files",
        "get",
        "--quiet",
        &rp,
        "p1",
        "--to",
        out.to_str().unwrap(),
    ]);
    for f in [
        "hello.txt",
        images::UNICODE_NAME,
        "docs/big.bin",
        "docs/deep/small.bin",
    ] {
        assert_same_file(&tree.join(f), &out.join("p1").join(f));
    }
}

#[test]
fn bad_paths_restore_points_and_file_systems_are_named() {
    let s = Scratch::new();
    let tree = images::tree(s.dir.path(), false);
    let img = images::ext4(s.dir.path(), "e.img", &tree, 16);
    let rp = id(&s.backup("e", &img, None));
    let err = s.fails(&[
        "files",
        "get",
        &rp,
        "docs/missing.txt",
        "--to",
        s.path("o").to_str().unwrap(),
    ]);
    assert!(
        err.contains("docs/missing.txt") && err.contains(&rp),
        "{err}"
    );
    let err = s.fails(&["files", "ls", "--json", &rp, "/nope"]);
    assert!(err.contains("not-found"), "{err}");
    let err = s.fails(&["files", "ls", "abcdef12", "/"]);
    assert!(err.contains("abcdef12"), "{err}");

    // A disk of random bytes: no file system, and the error says so.
    let raw = s.image("raw.img", 4, 7);
    let rp = id(&s.backup("raw", &raw, None));
    let err = s.fails(&["files", "ls", &rp]);
    assert!(err.contains("no file system"), "{err}");
}

#[test]
fn a_damaged_block_is_reported_as_such() {
    let s = Scratch::new();
    let tree = images::tree(s.dir.path(), false);
    let img = images::ext4(s.dir.path(), "e.img", &tree, 16);
    let rp = id(&s.backup("e", &img, None));
    // The first blob of the pack is the disk's first block: the superblock.
    let pack = &pack_files(&s.repo())[0];
    let mut bytes = std::fs::read(pack).unwrap();
    bytes[48 + 10] ^= 0x5a;
    std::fs::write(pack, bytes).unwrap();
    let err = s.fails(&["files", "ls", "--json", &rp, "/"]);
    assert!(err.contains("\"damaged\""), "{err}");
    assert!(err.contains("disk offset 0") && err.contains(&rp), "{err}");
}
