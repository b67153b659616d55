//! Issue 13, whole-VM restore for QEMU: a VM-level QEMU job saves each
//! drive's place (node, driver, size, guest device, exports); `restore-vm
//! VM --to DIR` writes every image and the layout, and a
//! qemu-storage-daemon started from the written arguments serves each
//! drive byte-exact at its recorded export. `--dry-run` changes nothing;
//! bad input leaves nothing behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// The VM's drives: node name, export id, size.
const DRIVES: [(&str, &str, u64); 3] = [
    ("sys", "vda", 24 << 20),
    ("data", "vdb", 16 << 20),
    ("scratch", "vdc", 8 << 20),
];

/// A qemu-storage-daemon with `args`, a QMP socket and an NBD server in
/// `dir`; killed on drop.
struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, args: &[String]) -> Daemon {
        let qmp = dir.join("qmp.sock");
        let nbd = dir.join("nbd.sock");
        // Exports need the NBD server: the fragment comes after it.
        let child = Command::new("qemu-storage-daemon")
            .arg("--chardev")
            .arg(format!(
                "socket,id=qmp0,path={},server=on,wait=off",
                qmp.display()
            ))
            .args(["--monitor", "chardev=qmp0"])
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", nbd.display()))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon (qemu-utils) must be installed");
        let deadline = Instant::now() + Duration::from_secs(10);
        let listening = |p: &Path| std::os::unix::net::UnixStream::connect(p).is_ok();
        while !(listening(&qmp) && listening(&nbd)) {
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not start with {args:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Daemon {
            child,
            dir: dir.to_path_buf(),
        }
    }

    fn uri(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.dir.join("nbd.sock").display()
        )
    }

    fn write(&self, export: &str, pattern: u8, offset: u64, len: u64) {
        let out = Command::new("qemu-io")
            .args(["-f", "raw", "-c"])
            .arg(format!("write -P {pattern:#x} {offset} {len}"))
            .arg(self.uri(export))
            .output()
            .expect("qemu-io");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn copy_to(&self, export: &str, path: &Path) {
        let out = Command::new("nbdcopy")
            .arg(self.uri(export))
            .arg(path)
            .output()
            .expect("nbdcopy");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The source VM: three qcow2 drives, each served as an NBD export (the
/// way a storage daemon hands drives to a VM).
fn source(s: &Scratch) -> Daemon {
    let dir = s.path("vm");
    std::fs::create_dir_all(&dir).unwrap();
    let mut args = Vec::new();
    for (node, export, size) in DRIVES {
        let image = dir.join(format!("{node}.qcow2"));
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&image)
            .arg(size.to_string())
            .output()
            .expect("qemu-img");
        assert!(out.status.success());
        args.push("--blockdev".to_string());
        args.push(format!(
            "driver=file,node-name={node}-file,filename={}",
            image.display()
        ));
        args.push("--blockdev".to_string());
        args.push(format!("driver=qcow2,node-name={node},file={node}-file"));
        args.push("--export".to_string());
        args.push(format!(
            "type=nbd,id={export},node-name={node},name={export},writable=on"
        ));
    }
    let d = Daemon::start(&dir, &args);
    for (i, (_, export, size)) in DRIVES.iter().enumerate() {
        d.write(export, 0x10 + i as u8, 0, 1 << 20);
        d.write(export, 0x20 + i as u8, size - (3 << 16), 3 << 16);
    }
    d
}

fn config(s: &Scratch, d: &Daemon) -> PathBuf {
    let path = s.path("cbtvault.toml");
    let nodes: Vec<String> = DRIVES.iter().map(|(n, _, _)| format!("\"{n}\"")).collect();
    std::fs::write(
        &path,
        format!(
            "[repository]\npath = \"{}\"\n\n[[qemu]]\nname = \"kvm1\"\nqmp_socket = \"{}\"\nnbd_socket = \"{}\"\nvm = \"web1\"\n\n\
             [[job]]\nname = \"web1\"\nkind = \"qemu\"\nhost = \"kvm1\"\nnodes = [{}]\n",
            s.repo().display(),
            d.dir.join("qmp.sock").display(),
            d.dir.join("nbd.sock").display(),
            nodes.join(", ")
        ),
    )
    .unwrap();
    path
}

fn backup(s: &Scratch, config: &Path) -> serde_json::Value {
    let out = s.ok(&[
        "backup",
        "--json",
        "--config",
        config.to_str().unwrap(),
        "--job",
        "web1",
    ]);
    let rows: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(rows.as_array().map(Vec::len), Some(DRIVES.len()), "{rows}");
    rows
}

/// The argument file, one argument per line.
fn args_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn a_qemu_vm_comes_back_from_its_images_and_layout_byte_exact() {
    let s = Scratch::new();
    let src = source(&s);
    let config = config(&s, &src);
    let cfg = config.to_str().unwrap();
    backup(&s, &config);
    // A second run after guest writes: the restore takes the newest run.
    src.write("vdb", 0x77, 5 << 20, 65536);
    src.write("vda", 0x78, 9 << 20, 4096);
    backup(&s, &config);
    let snaps: Vec<PathBuf> = DRIVES
        .iter()
        .map(|(node, export, _)| {
            let p = s.path(&format!("src-{node}.raw"));
            src.copy_to(export, &p);
            p
        })
        .collect();

    // The dry run plans every drive at its export, and writes nothing.
    let dir = s.path("restored");
    let d = dir.to_str().unwrap();
    let plan = s.ok(&[
        "restore-vm",
        "web1",
        "--config",
        cfg,
        "--to",
        d,
        "--format",
        "qcow2",
        "--dry-run",
    ]);
    assert!(plan.contains("dry run: nothing was written"), "{plan}");
    for (node, export, _) in DRIVES {
        assert!(plan.contains(&format!("node {node} ")), "{plan}");
        assert!(plan.contains(&format!("nbd export {export}")), "{plan}");
    }
    assert!(!dir.exists(), "a dry run made {d}");

    let started = Instant::now();
    let out = s.ok(&[
        "restore-vm",
        "web1",
        "--config",
        cfg,
        "--to",
        d,
        "--format",
        "qcow2",
        "--json",
    ]);
    eprintln!(
        "restore-vm --to (3 drives, 48 MiB, qcow2): {:?}",
        started.elapsed()
    );
    let done: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(done["name"], "web1", "{done}");
    assert_eq!(done["images"].as_array().map(Vec::len), Some(3), "{done}");
    let layout: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("layout.json")).unwrap()).unwrap();
    for (node, export, size) in DRIVES {
        let drive = layout["drives"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["node"] == node)
            .unwrap_or_else(|| panic!("{node} in {layout}"));
        assert_eq!(drive["size"], size);
        assert_eq!(drive["format"], "qcow2");
        assert_eq!(drive["original"]["driver"], "qcow2");
        assert_eq!(drive["exports"][0]["id"], export);
        let info = Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(dir.join(format!("{node}.qcow2")))
            .output()
            .unwrap();
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["virtual-size"], size);
    }

    // A storage daemon started from the written arguments serves each
    // drive at its recorded export, byte-exact.
    let qsd_args = args_of(&dir.join("qemu-storage-daemon.args"));
    let run_dir = s.path("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    let back = Daemon::start(&run_dir, &qsd_args);
    for ((node, export, _), snap) in DRIVES.iter().zip(&snaps) {
        let p = s.path(&format!("back-{node}.raw"));
        back.copy_to(export, &p);
        assert_same_file(snap, &p);
    }
    drop(back);
    let qemu_args = args_of(&dir.join("qemu.args"));
    assert_eq!(
        qemu_args.iter().filter(|a| *a == "--blockdev").count(),
        6,
        "{qemu_args:?}"
    );

    // Raw images too.
    let raw = s.path("raw");
    s.ok(&[
        "restore-vm",
        "web1",
        "--config",
        cfg,
        "--to",
        raw.to_str().unwrap(),
    ]);
    for ((node, _, _), snap) in DRIVES.iter().zip(&snaps) {
        assert_same_file(snap, &raw.join(format!("{node}.raw")));
    }
}

#[test]
fn bad_targets_and_unknown_vms_are_refused_and_leave_nothing() {
    let s = Scratch::new();
    let src = source(&s);
    let config = config(&s, &src);
    let cfg = config.to_str().unwrap();
    backup(&s, &config);

    // Not empty: refused, and what is there is untouched.
    let full = s.path("full");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::write(full.join("keep.txt"), b"mine").unwrap();
    let err = s.fails(&[
        "restore-vm",
        "web1",
        "--config",
        cfg,
        "--to",
        full.to_str().unwrap(),
    ]);
    assert!(err.contains("not empty") && err.contains("--to"), "{err}");
    assert_eq!(std::fs::read_dir(&full).unwrap().count(), 1);

    // No parent.
    let deep = s.path("no/such/dir");
    let err = s.fails(&[
        "restore-vm",
        "web1",
        "--config",
        cfg,
        "--to",
        deep.to_str().unwrap(),
    ]);
    assert!(err.contains("does not exist"), "{err}");
    assert!(!s.path("no").exists());

    // A file, not a directory.
    let file = s.path("a-file");
    std::fs::write(&file, b"x").unwrap();
    let err = s.fails(&[
        "restore-vm",
        "web1",
        "--config",
        cfg,
        "--to",
        file.to_str().unwrap(),
    ]);
    assert!(err.contains("not a directory"), "{err}");

    // An unknown VM.
    let target = s.path("t");
    let err = s.fails(&[
        "restore-vm",
        "web9",
        "--config",
        cfg,
        "--to",
        target.to_str().unwrap(),
    ]);
    assert!(err.contains("web9"), "{err}");
    assert!(!target.exists());

    // A QEMU VM into a pool: said so.
    let err = s.fails(&["restore-vm", "web1", "--config", cfg, "--sr", "x"]);
    assert!(
        err.contains("backed up from QEMU") && err.contains("--to DIR"),
        "{err}"
    );
    assert!(!target.exists());

    // A failure half-way (the packs hidden, so no image can be read):
    // the directory the restore made is removed.
    let packs = pack_files(&s.repo());
    assert!(!packs.is_empty());
    for p in &packs {
        std::fs::rename(p, p.with_extension("hidden")).unwrap();
    }
    let err = s.fails(&[
        "restore-vm",
        "web1",
        "--config",
        cfg,
        "--to",
        target.to_str().unwrap(),
    ]);
    assert!(err.contains("removed"), "{err}");
    assert!(
        !target.exists(),
        "a failed restore left {}",
        target.display()
    );
}
