//! Disk images made with the real tools (e2fsprogs, dosfstools + mtools,
//! ntfs-3g, fdisk, gdisk), without root, from a known tree of files.
//! Shared by the crate's tests and the end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub const MIB: u64 = 1 << 20;

/// Runs a tool and insists it worked.
pub fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .env("LC_ALL", "C.UTF-8")
        .output()
        .unwrap_or_else(|e| panic!("{program} (run scripts/install-deps): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A name that is not ASCII, to check names arrive unchanged.
pub const UNICODE_NAME: &str = "grüße-日本.txt";

/// Deterministic bytes.
pub fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The known tree: small and large files, a nested directory, a
/// non-ASCII name, a symlink (where `symlinks`), a sparse file, modes and
/// times set. Returns its root.
pub fn tree(dir: &Path, symlinks: bool) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let root = dir.join("tree");
    std::fs::create_dir_all(root.join("docs/deep")).unwrap();
    std::fs::write(root.join("hello.txt"), b"hello, world\n").unwrap();
    std::fs::write(
        root.join("docs/big.bin"),
        content(1, 3 * MIB as usize + 12345),
    )
    .unwrap();
    std::fs::write(root.join("docs/deep/small.bin"), content(2, 777)).unwrap();
    std::fs::write(root.join(UNICODE_NAME), "ünïcödé\n").unwrap();
    std::fs::write(root.join("empty"), b"").unwrap();
    if symlinks {
        std::os::unix::fs::symlink("docs/deep/small.bin", root.join("link")).unwrap();
        // Sparse: 8 MiB with data only at both ends.
        let f = std::fs::File::create(root.join("sparse.img")).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"start", 0).unwrap();
        f.write_all_at(b"end", 8 * MIB - 3).unwrap();
        std::fs::set_permissions(
            root.join("docs/deep/small.bin"),
            std::fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        std::fs::set_permissions(root.join("docs"), std::fs::Permissions::from_mode(0o750))
            .unwrap();
    }
    run(
        "touch",
        &[
            "-h",
            "-d",
            "2021-03-04 05:06:07.5 UTC",
            root.join("hello.txt").to_str().unwrap(),
        ],
    );
    run(
        "touch",
        &[
            "-d",
            "2020-01-02 03:04:06 UTC",
            root.join("docs/deep/small.bin").to_str().unwrap(),
        ],
    );
    root
}

/// An ext4 image of `mib` MiB holding `tree` (mkfs.ext4 -d).
pub fn ext4(dir: &Path, name: &str, tree: &Path, mib: u64) -> PathBuf {
    let img = dir.join(name);
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-b",
            "4096",
            "-E",
            "root_owner=0:0",
            "-d",
            tree.to_str().unwrap(),
            img.to_str().unwrap(),
            &format!("{mib}M"),
        ],
    );
    img
}

/// A FAT image of `mib` MiB holding `tree` (mkfs.fat, mcopy -s -m).
pub fn fat(dir: &Path, name: &str, tree: &Path, mib: u64) -> PathBuf {
    let img = dir.join(name);
    let _ = std::fs::remove_file(&img);
    run(
        "mkfs.fat",
        &["-C", img.to_str().unwrap(), &(mib * 1024).to_string()],
    );
    for e in std::fs::read_dir(tree).unwrap() {
        let p = e.unwrap().path();
        run(
            "mcopy",
            &[
                "-s",
                "-m",
                "-i",
                img.to_str().unwrap(),
                p.to_str().unwrap(),
                "::/",
            ],
        );
    }
    img
}

/// An NTFS image of `mib` MiB with `files` (name, content) in its root
/// (mkntfs, ntfscp: no directories without mounting).
pub fn ntfs(dir: &Path, name: &str, files: &[(&str, Vec<u8>)], mib: u64) -> PathBuf {
    let img = dir.join(name);
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(mib * MIB).unwrap();
    drop(f);
    run("mkntfs", &["-q", "-F", "-Q", img.to_str().unwrap()]);
    for (i, (n, data)) in files.iter().enumerate() {
        let src = dir.join(format!("ntfs-src-{i}"));
        std::fs::write(&src, data).unwrap();
        run(
            "ntfscp",
            &["-q", img.to_str().unwrap(), src.to_str().unwrap(), n],
        );
    }
    img
}

/// A disk of `mib` MiB with a partition table made by `sfdisk` from
/// `script`, and each of `parts` (1-based partition number, image)
/// written at its partition's offset.
pub fn partitioned(
    dir: &Path,
    name: &str,
    mib: u64,
    script: &str,
    parts: &[(u32, &Path)],
) -> PathBuf {
    let img = dir.join(name);
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(mib * MIB).unwrap();
    drop(f);
    let mut child = Command::new("sfdisk")
        .args(["-q", img.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("sfdisk (run scripts/install-deps)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "sfdisk failed");
    let dump = Command::new("sfdisk")
        .args(["-J", img.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&dump.stdout).into_owned();
    for (n, part) in parts {
        let start = start_of(&text, *n);
        let data = std::fs::read(part).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&data, start * 512).unwrap();
    }
    img
}

/// The start sector of partition `n` in `sfdisk -J` output.
fn start_of(json: &str, n: u32) -> u64 {
    // Entries look like {"node":"/x/disk.img5", "start":..., ...}
    let mut entries = json.split("\"node\":").skip(1);
    let entry = entries
        .find(|e| {
            let node = e.split('"').nth(1).unwrap_or("");
            node.ends_with(&n.to_string()) && !node.ends_with(&format!("1{n}"))
        })
        .unwrap_or_else(|| panic!("partition {n} not in {json}"));
    let start = entry.split("\"start\":").nth(1).unwrap();
    start
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}
