//! The readers against images made by the real mkfs tools: every file
//! comes back byte for byte, with its metadata where the file system
//! keeps it, whole disks and partitioned ones (MBR with a logical
//! partition, GPT).

mod images;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use cbtvault_files::{Error, Explorer, Kind, Options};
use images::*;

fn open(img: &Path) -> Explorer {
    Explorer::open_image(std::fs::read(img).unwrap(), "test", Options::default()).unwrap()
}

fn names(x: &mut Explorer, path: &str) -> Vec<String> {
    x.list(path).unwrap().into_iter().map(|e| e.name).collect()
}

/// Every regular file below `want` is in `got` with the same bytes.
fn same_files(want: &Path, got: &Path) {
    for e in std::fs::read_dir(want).unwrap() {
        let e = e.unwrap();
        let (w, g) = (e.path(), got.join(e.file_name()));
        let meta = std::fs::symlink_metadata(&w).unwrap();
        if meta.is_dir() {
            same_files(&w, &g);
        } else if meta.is_file() {
            assert_eq!(
                std::fs::read(&w).unwrap(),
                std::fs::read(&g).unwrap(),
                "{}",
                g.display()
            );
        }
    }
}

#[test]
fn ext4_whole_disk_lists_and_gets_everything_with_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let tree = tree(dir.path(), true);
    let img = ext4(dir.path(), "ext4.img", &tree, 32);
    let mut x = open(&img);
    assert!(x.partitions().is_empty());
    let top = names(&mut x, "/");
    for n in [
        "docs",
        "hello.txt",
        "link",
        "sparse.img",
        UNICODE_NAME,
        "empty",
    ] {
        assert!(top.contains(&n.to_string()), "{n} missing from {top:?}");
    }
    let hello = x.stat("/hello.txt").unwrap();
    assert_eq!(hello.kind, Kind::File);
    assert_eq!(hello.size, 13);
    assert_eq!(hello.mtime.unwrap().secs, 1_614_834_367);
    let link = x.stat("link").unwrap();
    assert_eq!(link.kind, Kind::Symlink);
    assert_eq!(link.detail.as_deref(), Some("docs/deep/small.bin"));

    let out = dir.path().join("out");
    let report = x.get(&["/".into()], &out).unwrap();
    assert!(report.files >= 6, "{report:?}");
    same_files(&tree, &out);
    assert_eq!(
        std::fs::read_link(out.join("link")).unwrap(),
        Path::new("docs/deep/small.bin")
    );
    let small = std::fs::metadata(out.join("docs/deep/small.bin")).unwrap();
    assert_eq!(small.permissions().mode() & 0o7777, 0o640);
    assert_eq!(small.mtime(), 1_577_934_246);
    assert_eq!(
        std::fs::metadata(out.join("docs"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o750
    );
    let hello = std::fs::metadata(out.join("hello.txt")).unwrap();
    // mkfs.ext4 -d keeps whole seconds; what the image holds comes back.
    assert_eq!((hello.mtime(), hello.mtime_nsec()), (1_614_834_367, 0));
    // The sparse file stays sparse.
    let sparse = std::fs::metadata(out.join("sparse.img")).unwrap();
    assert_eq!(sparse.len(), 8 * MIB);
    assert!(
        sparse.blocks() * 512 < MIB,
        "{} bytes allocated",
        sparse.blocks() * 512
    );

    // One file, into another directory.
    let one = dir.path().join("one");
    x.get(&["docs/deep/small.bin".into()], &one).unwrap();
    assert_eq!(
        std::fs::read(one.join("small.bin")).unwrap(),
        content(2, 777)
    );
}

#[test]
fn fat_whole_disk_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let tree = tree(dir.path(), false);
    let img = fat(dir.path(), "fat.img", &tree, 16);
    let mut x = open(&img);
    let top = names(&mut x, "/");
    assert!(top.contains(&UNICODE_NAME.to_string()), "{top:?}");
    assert_eq!(
        x.stat("/HELLO.TXT").unwrap().size,
        13,
        "FAT lookups ignore case"
    );
    let out = dir.path().join("out");
    x.get(&["/".into()], &out).unwrap();
    same_files(&tree, &out);
    // mcopy -m kept the time (FAT has 2 s resolution, local time taken as UTC).
    let t = std::fs::metadata(out.join("docs/deep/small.bin"))
        .unwrap()
        .mtime();
    assert!((t - 1_577_934_246).abs() <= 86_400, "{t}");
}

#[test]
fn ntfs_whole_disk_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let files = [
        ("hello.txt", b"hello, world\n".to_vec()),
        (UNICODE_NAME, "ünïcödé\n".as_bytes().to_vec()),
        ("big.bin", content(3, 2 * MIB as usize + 99)),
        ("tiny", b"x".to_vec()),
    ];
    let img = ntfs(dir.path(), "ntfs.img", &files, 16);
    let mut x = open(&img);
    let top = names(&mut x, "/");
    assert_eq!(top.len(), 4, "metadata files are not listed: {top:?}");
    let out = dir.path().join("out");
    let paths: Vec<String> = files.iter().map(|(n, _)| format!("/{n}")).collect();
    x.get(&paths, &out).unwrap();
    for (n, data) in &files {
        assert_eq!(&std::fs::read(out.join(n)).unwrap(), data, "{n}");
    }
    assert_eq!(x.stat("/BIG.BIN").unwrap().size, 2 * MIB + 99);
}

#[test]
fn mbr_with_a_logical_partition_and_gpt() {
    let dir = tempfile::tempdir().unwrap();
    let tree = tree(dir.path(), true);
    let e = ext4(dir.path(), "p.ext4", &tree, 20);
    let f = fat(dir.path(), "p.fat", &tree, 16);
    let n = ntfs(dir.path(), "p.ntfs", &[("a.txt", b"ntfs here".to_vec())], 8);
    // p1 FAT, p2 extended holding p5 ext4 and p6 NTFS.
    let mbr = partitioned(
        dir.path(),
        "mbr.img",
        64,
        "label: dos\n,17M,c\n,,5\n,21M,83\n,9M,7\n",
        &[(1, &f), (5, &e), (6, &n)],
    );
    let mut x = open(&mbr);
    let parts: Vec<String> = x.partitions().iter().map(|p| p.name.clone()).collect();
    assert_eq!(parts, ["p1", "p5", "p6"]);
    let top = x.list("/").unwrap();
    assert!(
        top[0].detail.as_deref().unwrap().ends_with("FAT16"),
        "{top:?}"
    );
    assert!(
        top[1].detail.as_deref().unwrap().ends_with("ext4"),
        "{top:?}"
    );
    assert!(
        top[2].detail.as_deref().unwrap().ends_with("NTFS"),
        "{top:?}"
    );
    let out = dir.path().join("out");
    x.get(
        &["p5/docs".into(), "p1/hello.txt".into(), "p6/a.txt".into()],
        &out,
    )
    .unwrap();
    same_files(&tree.join("docs"), &out.join("docs"));
    assert_eq!(std::fs::read(out.join("a.txt")).unwrap(), b"ntfs here");
    let err = x.list("p9/x").unwrap_err();
    assert!(matches!(err, Error::NoPartition { .. }), "{err}");
    assert!(err.to_string().contains("p1, p5, p6"), "{err}");

    let gpt = partitioned(
        dir.path(),
        "gpt.img",
        48,
        "label: gpt\n,21M,L\n,9M,EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n",
        &[(1, &e), (2, &n)],
    );
    let mut x = open(&gpt);
    let parts = x.partitions().to_vec();
    assert_eq!(parts.len(), 2);
    assert_eq!(parts[0].table, "GPT");
    assert_eq!(parts[0].kind, "Linux filesystem");
    assert_eq!(x.stat("p1/docs/deep/small.bin").unwrap().size, 777);
    assert_eq!(x.stat("p2/a.txt").unwrap().size, 9);
}

#[test]
fn bad_paths_and_unsupported_file_systems_say_what_they_found() {
    let dir = tempfile::tempdir().unwrap();
    let tree = tree(dir.path(), false);
    let img = ext4(dir.path(), "e.img", &tree, 16);
    let mut x = open(&img);
    let err = x.stat("/docs/nope.txt").unwrap_err();
    assert_eq!(
        err.to_string(),
        "/docs/nope.txt: no such file or directory in restore point test"
    );
    let err = x.list("/hello.txt/x").unwrap_err();
    assert!(err.to_string().contains("/hello.txt/x"), "{err}");

    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("hello.txt"), b"mine").unwrap();
    let err = x.get(&["hello.txt".into()], &out).unwrap_err();
    assert!(matches!(err, Error::Exists { .. }), "{err}");
    assert_eq!(std::fs::read(out.join("hello.txt")).unwrap(), b"mine");

    let zeros = Explorer::open_image(vec![0; 4 * MIB as usize], "z", Options::default())
        .unwrap()
        .list("/")
        .unwrap_err();
    assert!(
        zeros.to_string().contains("reads as zeros") || zeros.to_string().contains("read as zeros"),
        "{zeros}"
    );
    let xfs = dir.path().join("x.img");
    let f = std::fs::File::create(&xfs).unwrap();
    f.set_len(300 * MIB).unwrap();
    drop(f);
    if Path::new("/usr/sbin/mkfs.xfs").exists() || Path::new("/sbin/mkfs.xfs").exists() {
        run("mkfs.xfs", &["-q", "-f", xfs.to_str().unwrap()]);
        let err = open(&xfs).list("/").unwrap_err();
        assert!(err.to_string().contains("XFS"), "{err}");
    }
}
