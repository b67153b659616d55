//! The binary against a real qemu-storage-daemon: full and incremental
//! backups from persistent dirty bitmaps, a crashed QSD, and a killed
//! cbtvault.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

const SIZE: u64 = 64 << 20;

/// A qemu-storage-daemon with `disk.qcow2` as node `disk`, a QMP socket,
/// and a writable NBD export `guest` that stands in for the VM.
pub(crate) struct Qsd {
    child: Option<Child>,
    dir: PathBuf,
}

impl Qsd {
    fn start(dir: PathBuf) -> Qsd {
        let mut q = Qsd { child: None, dir };
        q.launch();
        q
    }

    fn launch(&mut self) {
        let _ = std::fs::remove_file(self.qmp());
        let _ = std::fs::remove_file(self.nbd());
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=disk-file,filename={}",
                self.dir.join("disk.qcow2").display()
            ))
            .args(["--blockdev", "driver=qcow2,node-name=disk,file=disk-file"])
            .arg("--chardev")
            .arg(format!(
                "socket,id=qmp0,path={},server=on,wait=off",
                self.qmp().display()
            ))
            .args(["--monitor", "chardev=qmp0"])
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", self.nbd().display()))
            .args([
                "--export",
                "type=nbd,id=guest,node-name=disk,name=guest,writable=on",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon (qemu-utils) must be installed");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        // A socket file appears at bind(), before listen(): only a
        // connection shows the daemon is ready.
        let listening = |p: &std::path::Path| std::os::unix::net::UnixStream::connect(p).is_ok();
        while !(listening(&self.qmp()) && listening(&self.nbd())) {
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub(crate) fn qmp(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    pub(crate) fn nbd(&self) -> PathBuf {
        self.dir.join("nbd.sock")
    }

    fn guest(&self) -> String {
        format!("nbd+unix:///guest?socket={}", self.nbd().display())
    }

    /// A guest write of `len` bytes of `pattern` at `offset`.
    pub(crate) fn write(&self, pattern: u8, offset: u64, len: u64) {
        let out = Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                &format!("write -P {pattern:#x} {offset} {len}"),
                &self.guest(),
            ])
            .output()
            .expect("qemu-io");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The live disk as the guest sees it.
    pub(crate) fn snapshot_to(&self, path: &std::path::Path) {
        let out = Command::new("nbdcopy")
            .args([&self.guest(), path.to_str().unwrap()])
            .output()
            .expect("nbdcopy");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// What a backup killed after its QMP transaction leaves in QEMU (the
/// copy-before-write filter in the guest's I/O path, an export, a fleece
/// image): the view of job `prefix` for `disk`, taken from checkpoint
/// `base` (`None`: as a first backup would), neither committed nor
/// aborted.
pub(crate) fn leave_a_view(
    s: &Scratch,
    qsd: &Qsd,
    prefix: &str,
    disk: &str,
    base: Option<&cbtvault_qemu::CheckpointName>,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let repo = cbtvault_repo::Repository::open(&s.repo()).unwrap();
    let job = cbtvault_engine::qemu::job_name(prefix, &repo, disk);
    drop(repo);
    rt.block_on(async {
        let options = cbtvault_qemu::DiskOptions {
            nbd_socket: Some(qsd.nbd()),
            ..Default::default()
        };
        let node = cbtvault_qemu::QemuDisk::connect_with(qsd.qmp().into(), "disk", options)
            .await
            .unwrap();
        // Killed here: neither commit nor abort.
        let _view = node.prepare(&job, base).await.unwrap();
    });
    // The runtime's tasks hold the QMP connection: it goes with them (a
    // QEMU monitor serves one client at a time).
    drop(rt);
}

pub(crate) fn setup(s: &Scratch) -> Qsd {
    setup_in(s, "qsd")
}

fn setup_in(s: &Scratch, name: &str) -> Qsd {
    let dir = s.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("disk.qcow2");
    let out = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            image.to_str().unwrap(),
            &SIZE.to_string(),
        ])
        .output()
        .expect("qemu-img");
    assert!(out.status.success());
    let qsd = Qsd::start(dir);
    qsd.write(0x11, 0, 1 << 20);
    qsd.write(0x22, 30 << 20, 3 << 16);
    qsd
}

fn backup(s: &Scratch, qsd: &Qsd) -> serde_json::Value {
    let out = s.ok(&[
        "backup",
        "--json",
        "--disk",
        "vm1",
        "--node",
        "disk",
        "--source",
        &format!("qmp:{}", qsd.qmp().display()),
        "--nbd-socket",
        qsd.nbd().to_str().unwrap(),
    ]);
    the_restore_point(&out)
}

#[test]
fn full_then_incrementals_from_dirty_bitmaps_restore_exactly() {
    let s = Scratch::new();
    let qsd = setup(&s);
    let full = backup(&s, &qsd);
    assert_eq!(full["mode"]["kind"], "full");
    // base:allocation: only the written clusters were read.
    assert_eq!(full["stats"]["bytes_read"], (1 << 20) + 3 * 65536);
    let snap0 = s.path("snap0.raw");
    qsd.snapshot_to(&snap0);
    let mut points = vec![(id(&full), snap0)];
    for night in 1..=3u64 {
        // Two clusters, one straddling write (two more), one small write.
        qsd.write(0x30 + night as u8, night << 20, 128 << 10);
        qsd.write(0x40 + night as u8, (40 << 20) + 65536 - 512, 1024);
        qsd.write(0x50 + night as u8, (50 << 20) + night * 4096, 4096);
        let rp = backup(&s, &qsd);
        assert_eq!(rp["mode"]["kind"], "incremental", "{rp}");
        assert_eq!(rp["stats"]["blocks_read"], 5, "{rp}");
        assert_eq!(rp["stats"]["bytes_read"], 5 * 65536);
        let snap = s.path(&format!("snap{night}.raw"));
        qsd.snapshot_to(&snap);
        points.push((id(&rp), snap));
    }
    for (i, (rp, snap)) in points.iter().enumerate() {
        assert_same_file(snap, &s.restore(rp, &format!("r{i}.img")));
    }
}

#[test]
fn crashed_qsd_leads_to_a_full_backup_with_the_reason() {
    let s = Scratch::new();
    let mut qsd = setup(&s);
    backup(&s, &qsd);
    qsd.write(0x77, 5 << 20, 65536);
    // The bitmap was never flushed: after kill -9 it is missing or inconsistent.
    qsd.kill9();
    qsd.launch();
    let rp = backup(&s, &qsd);
    assert_eq!(rp["mode"]["kind"], "full", "{rp}");
    let reason = rp["mode"]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!reason.is_empty(), "a reason is recorded: {rp}");
    let snap = s.path("after-crash.raw");
    qsd.snapshot_to(&snap);
    assert_same_file(&snap, &s.restore(&id(&rp), "r.img"));
    // And the chain goes on: the next run is incremental again.
    qsd.write(0x78, 6 << 20, 65536);
    let next = backup(&s, &qsd);
    assert_eq!(next["mode"]["kind"], "incremental", "{next}");
    assert_eq!(next["stats"]["blocks_read"], 1);
}

#[test]
fn killed_backup_leaves_qsd_clean_and_loses_no_change() {
    let s = Scratch::new();
    let qsd = setup(&s);
    backup(&s, &qsd);
    for round in 0..4u64 {
        qsd.write(0x60 + round as u8, (10 + round) << 20, 65536);
        let mut child = s
            .command()
            .args(["backup", "--quiet", "--disk", "vm1", "--node", "disk"])
            .arg(format!("--source=qmp:{}", qsd.qmp().display()))
            .arg(format!("--nbd-socket={}", qsd.nbd().display()))
            .args(["--compression-level", "19"])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(40 + 60 * round));
        let _ = child.kill();
        let _ = child.wait();
    }
    // The next run cleans up what the killed ones left and misses nothing.
    let rp = backup(&s, &qsd);
    let snap = s.path("final.raw");
    qsd.snapshot_to(&snap);
    assert_same_file(&snap, &s.restore(&id(&rp), "final.img"));
    let (ok, report) = s.verify(true);
    assert!(ok, "{report}");
    // And QSD holds nothing of ours: only the guest export remains.
    let again = backup(&s, &qsd);
    assert_eq!(again["mode"]["kind"], "incremental", "{again}");
    assert_eq!(again["stats"]["blocks_read"], 0);
}

/// A backup killed while its point-in-time view exists leaves the
/// copy-before-write filter in the guest's I/O path, an export and a
/// fleece image; `cleanup` removes them without running a backup, and the
/// next backup misses no change.
#[test]
fn cleanup_removes_what_a_killed_backup_left_in_qemu() {
    let s = Scratch::new();
    let qsd = setup(&s);
    backup(&s, &qsd);
    qsd.write(0x44, 20 << 20, 65536);
    // A backup that dies after its transaction: the view stays in QEMU.
    leave_a_view(&s, &qsd, "cbtv", "vm1", None);
    let args = |json: bool| {
        let mut a = vec!["cleanup".to_string()];
        if json {
            a.push("--json".into());
        }
        a.extend([
            "--disk".into(),
            "vm1".into(),
            "--node".into(),
            "disk".into(),
            format!("--source=qmp:{}", qsd.qmp().display()),
            format!("--nbd-socket={}", qsd.nbd().display()),
        ]);
        a
    };
    let out = s.ok(&args(true).iter().map(String::as_str).collect::<Vec<_>>());
    let cleaned: serde_json::Value = serde_json::from_str(&out).unwrap();
    let removed = cleaned[0]["removed"].as_array().unwrap();
    assert!(
        removed
            .iter()
            .any(|r| r.as_str().unwrap_or("").contains("cbtv-")),
        "the killed backup's objects are removed: {cleaned}"
    );
    let again = s.ok(&args(false).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(again.contains("nothing left behind"), "{again}");
    // The next backup finds no leftover and reads the change.
    let rp = backup(&s, &qsd);
    let snap = s.path("after.raw");
    qsd.snapshot_to(&snap);
    assert_same_file(&snap, &s.restore(&id(&rp), "after.img"));
}

/// A configuration with two QEMU hosts, `host-a` and `host-b`, and one job
/// per host backing up node `disk`; job `b` keeps only the last point.
fn two_hosts_config(s: &Scratch, a: &Qsd, b: &Qsd) -> PathBuf {
    let path = s.path("cbtvault.toml");
    let host = |name: &str, q: &Qsd| {
        format!(
            "[[qemu]]\nname = \"{name}\"\nqmp_socket = \"{}\"\nnbd_socket = \"{}\"\n\n",
            q.qmp().display(),
            q.nbd().display()
        )
    };
    let text = format!(
        "[repository]\npath = \"{}\"\n\n{}{}\
         [[job]]\nname = \"a\"\nkind = \"qemu\"\nhost = \"host-a\"\nnodes = [\"disk\"]\n\n\
         [[job]]\nname = \"b\"\nkind = \"qemu\"\nhost = \"host-b\"\nnodes = [\"disk\"]\n\
         retention = {{ keep_last = 1 }}\n",
        s.repo().display(),
        host("host-a", a),
        host("host-b", b),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs a job of the two-host configuration; returns its one disk's row.
fn run_job(s: &Scratch, config: &std::path::Path, job: &str) -> serde_json::Value {
    let out = s.ok(&[
        "backup",
        "--json",
        "--config",
        config.to_str().unwrap(),
        "--job",
        job,
    ]);
    let rows: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(rows.as_array().map(Vec::len), Some(1), "{rows}");
    assert!(rows[0]["id"].is_string(), "{rows}");
    rows[0].clone()
}

fn points_of(s: &Scratch, disk: &str) -> Vec<serde_json::Value> {
    s.list()
        .into_iter()
        .filter(|rp| rp["disk"] == disk)
        .collect()
}

/// Issue 8, defect 11: node `disk` on two hosts. Each host's disk is its
/// own repository disk, so both stay incremental and one job's retention
/// never prunes the other host's points; and a repository from before the
/// change, where both hosts shared `qemu-disk`, keeps each host's chain.
#[test]
fn the_same_node_name_on_two_hosts_makes_two_disks_and_former_names_keep_their_chains() {
    let s = Scratch::new();
    let a = setup_in(&s, "qsd-a");
    let b = setup_in(&s, "qsd-b");
    b.write(0x99, 7 << 20, 65536);
    let config = two_hosts_config(&s, &a, &b);
    assert_eq!(run_job(&s, &config, "a")["mode"]["kind"], "full");
    assert_eq!(run_job(&s, &config, "b")["mode"]["kind"], "full");
    for night in 1..=2u64 {
        a.write(0x10 + night as u8, night << 20, 65536);
        b.write(0x20 + night as u8, (night + 2) << 20, 65536);
        for (job, q) in [("a", &a), ("b", &b)] {
            let r = run_job(&s, &config, job);
            assert_eq!(r["mode"]["kind"], "incremental", "job {job}: {r}");
            assert_eq!(r["stats"]["blocks_read"], 1, "job {job}: {r}");
            let snap = s.path(&format!("{job}{night}.raw"));
            q.snapshot_to(&snap);
            let rp = r["id"].as_str().unwrap();
            assert_same_file(&snap, &s.restore(rp, &format!("r-{job}{night}.img")));
        }
    }
    assert_eq!(
        points_of(&s, "qemu-host-a/disk").len(),
        3,
        "b's retention left a's points"
    );
    assert_eq!(
        points_of(&s, "qemu-host-b/disk").len(),
        1,
        "b keeps its last point"
    );

    // Make it a repository from before: every point under `qemu-disk`.
    {
        let repo = cbtvault_repo::Repository::open(&s.repo()).unwrap();
        for rp in s.list() {
            let old = repo.resolve(rp["id"].as_str().unwrap()).unwrap();
            let mut manifest = old.manifest.clone();
            manifest.disk = "qemu-disk".into();
            repo.commit(&manifest).unwrap();
            let forget = cbtvault_repo::ForgetSelection::Ids(vec![old.id.clone()]);
            let plan = repo.forget_plan(&forget, true).unwrap();
            repo.forget(&plan).unwrap();
        }
    }
    assert_eq!(points_of(&s, "qemu-disk").len(), 4);
    a.write(0x31, 20 << 20, 65536);
    b.write(0x32, 21 << 20, 65536);
    for (job, q) in [("a", &a), ("b", &b)] {
        let r = run_job(&s, &config, job);
        assert_eq!(
            r["mode"]["kind"], "incremental",
            "job {job} after the upgrade: {r}"
        );
        assert_eq!(r["stats"]["blocks_read"], 1, "job {job}: {r}");
        let snap = s.path(&format!("{job}-upgraded.raw"));
        q.snapshot_to(&snap);
        let rp = r["id"].as_str().unwrap();
        assert_same_file(&snap, &s.restore(rp, &format!("r-{job}-upgraded.img")));
    }
    assert_eq!(
        points_of(&s, "qemu-disk").len(),
        4,
        "former points are kept"
    );
    let (ok, report) = s.verify(true);
    assert!(ok, "{report}");
}

/// Issue 16: two repositories backing up one node keep their own
/// checkpoints (they used to share the job name `cbtv`, remove each
/// other's checkpoint, and take a full every night).
#[test]
fn two_repositories_backing_up_one_node_both_stay_incremental() {
    let s = Scratch::new();
    let qsd = setup(&s);
    let other = s.path("other-repo");
    s.ok(&["init", "--repo", other.to_str().unwrap()]);
    let backup_into = |repo: &std::path::Path| {
        let out = s.ok(&[
            "backup",
            "--json",
            "--repo",
            repo.to_str().unwrap(),
            "--disk",
            "vm1",
            "--node",
            "disk",
            "--source",
            &format!("qmp:{}", qsd.qmp().display()),
            "--nbd-socket",
            qsd.nbd().to_str().unwrap(),
        ]);
        the_restore_point(&out)
    };
    let mine = s.repo();
    assert_eq!(backup_into(&mine)["mode"]["kind"], "full");
    assert_eq!(backup_into(&other)["mode"]["kind"], "full");
    for night in 1..=2u64 {
        qsd.write(0x70 + night as u8, night << 20, 65536);
        for repo in [&mine, &other] {
            let rp = backup_into(repo);
            assert_eq!(
                rp["mode"]["kind"],
                "incremental",
                "night {night}, {}: {rp}",
                repo.display()
            );
            assert_eq!(rp["stats"]["blocks_read"], 1, "{rp}");
        }
    }
}
