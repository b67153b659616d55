//! The binary against the XAPI simulator: CBT incrementals over xapi-nbd,
//! chain breaks, faults, a grown disk, and a killed run.

use std::path::PathBuf;
use std::time::Duration;

use cbtvault_xapi_sim::{PoolSpec, SimConfig, Simulator};
use serde_json::Value;

use crate::common::*;

/// A simulated pool running in this test process.
pub(crate) struct Pool {
    pub(crate) sim: Option<Simulator>,
    pub(crate) rt: tokio::runtime::Runtime,
    pub(crate) password: PathBuf,
    pub(crate) pin: PathBuf,
}

impl Pool {
    pub(crate) fn start(s: &Scratch, vms: usize) -> Pool {
        Self::start_with(s, vms, 1)
    }

    pub(crate) fn start_with(s: &Scratch, vms: usize, disks_per_vm: usize) -> Pool {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut config = SimConfig::new(s.path("pool"), "pool-secret");
        config.pool = PoolSpec {
            vms,
            disks_per_vm,
            disk_size: 32 << 20,
            initial_blocks: 40,
        };
        config.data_destroy_timeout = Duration::from_millis(500);
        let sim = rt.block_on(Simulator::start(config)).expect("simulator");
        let password = s.path("pool.password");
        std::fs::write(&password, "pool-secret\n").unwrap();
        let pin = s.path("pool.pem");
        std::fs::write(&pin, sim.certificate_pem()).unwrap();
        Pool {
            sim: Some(sim),
            rt,
            password,
            pin,
        }
    }

    /// A XenAPI client logged in to the pool, as the CLI would be.
    pub(crate) async fn login(&self) -> cbtvault_xenapi::Client {
        let url = self.sim.as_ref().unwrap().https_url();
        let password = cbtvault_xenapi::Password::from_file(&self.password).unwrap();
        let mut options = cbtvault_xenapi::ClientOptions::new(&url, "root", password).unwrap();
        options.tls = Some(cbtvault_xenapi::TlsTrust::pinned_file(&self.pin).unwrap());
        cbtvault_xenapi::Client::connect(options).await.unwrap()
    }

    /// Writes `cbtvault.toml`: the scratch repository, this pool as
    /// `sim` (with `pool_extra` lines in its table), then `rest` (jobs).
    pub(crate) fn write_config(&self, s: &Scratch, pool_extra: &str, rest: &str) -> PathBuf {
        let path = s.path("cbtvault.toml");
        let text = format!(
            "[repository]\npath = \"{repo}\"\n\n[[pool]]\nname = \"sim\"\nurl = \"{url}\"\n\
             password_file = \"{password}\"\npin = \"{pin}\"\n{pool_extra}\n\n{rest}\n",
            repo = s.repo().display(),
            url = self.sim.as_ref().unwrap().https_url(),
            password = self.password.display(),
            pin = self.pin.display(),
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    pub(crate) fn sim(&self) -> &cbtvault_xapi_sim::Sim {
        self.sim.as_ref().unwrap().sim()
    }

    pub(crate) fn vdis(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .sim()
            .vdis()
            .into_iter()
            .filter(|v| !v.is_a_snapshot && v.vdi_type == "user")
            .map(|v| v.uuid)
            .collect();
        v.sort();
        v
    }

    pub(crate) fn args(&self, s: &Scratch) -> Vec<String> {
        let url = self.sim.as_ref().unwrap().https_url();
        [
            "backup",
            "--json",
            "--repo",
            s.repo().to_str().unwrap(),
            "--xapi",
            &url,
            "--password-file",
            self.password.to_str().unwrap(),
            "--pin",
            self.pin.to_str().unwrap(),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    }

    /// Backs up `vdi` and returns its result object.
    pub(crate) fn backup(&self, s: &Scratch, vdi: &str) -> Value {
        let mut args = self.args(s);
        args.extend(["--vdi".to_string(), vdi.to_string()]);
        let out = s.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        the_restore_point(&out)
    }

    /// The disk's bytes now, in a file (for comparing with a restore).
    pub(crate) fn copy_disk(&self, s: &Scratch, vdi: &str, name: &str) -> PathBuf {
        let from = self
            .sim()
            .state_dir()
            .join("vdis")
            .join(format!("{vdi}.img"));
        let to = s.path(name);
        std::fs::copy(&from, &to).unwrap();
        to
    }

    /// Snapshots that still hold data.
    pub(crate) fn data_snapshots(&self) -> Vec<String> {
        self.sim()
            .vdis()
            .into_iter()
            .filter(|v| v.is_a_snapshot && v.vdi_type != "cbt_metadata")
            .map(|v| v.uuid)
            .collect()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if let Some(sim) = self.sim.take() {
            self.rt.block_on(sim.shutdown());
        }
    }
}

#[test]
fn full_then_incrementals_read_exactly_the_changed_blocks() {
    let s = Scratch::new();
    let pool = Pool::start(&s, 2);
    let vdi = &pool.vdis()[0];
    let full = pool.backup(&s, vdi);
    assert_eq!(full["mode"]["kind"], "full");
    // xapi-nbd has no block status: a full reads every block.
    assert_eq!(full["stats"]["bytes_read"], 32 << 20);
    let mut points = vec![(
        full["id"].as_str().unwrap().to_string(),
        pool.copy_disk(&s, vdi, "n0.img"),
    )];
    for night in 1..=3u64 {
        let written = pool.sim().churn(vdi, 7 * night, night).unwrap();
        let r = pool.backup(&s, vdi);
        assert_eq!(r["mode"]["kind"], "incremental", "{r}");
        let distinct: std::collections::BTreeSet<_> = written.iter().collect();
        assert_eq!(r["mode"]["changed_blocks"], distinct.len() as u64);
        assert_eq!(r["stats"]["bytes_read"], distinct.len() as u64 * 65536);
        points.push((
            r["id"].as_str().unwrap().to_string(),
            pool.copy_disk(&s, vdi, &format!("n{night}.img")),
        ));
    }
    assert!(
        pool.data_snapshots().is_empty(),
        "only CBT metadata stays: {:?}",
        pool.data_snapshots()
    );
    // One cbt_metadata VDI remains: the base of the next run.
    let meta = pool
        .sim()
        .vdis()
        .into_iter()
        .filter(|v| v.vdi_type == "cbt_metadata")
        .count();
    assert_eq!(meta, 1);
    for (i, (rp, disk)) in points.iter().enumerate() {
        assert_same_file(disk, &s.restore(rp, &format!("r{i}.img")));
    }
}

#[test]
fn chain_breaks_fall_back_to_a_full_with_the_reason() {
    let s = Scratch::new();
    let pool = Pool::start(&s, 1);
    let vdi = &pool.vdis()[0];
    pool.backup(&s, vdi);
    pool.sim().churn(vdi, 5, 1).unwrap();
    pool.sim().fault_cbt_disable(vdi).unwrap();
    let r = pool.backup(&s, vdi);
    assert_eq!(r["mode"]["kind"], "full", "{r}");
    assert!(
        r["mode"]["reason"]
            .as_str()
            .unwrap()
            .contains("changed-block tracking"),
        "{r}"
    );
    // Only new blocks are stored by that full.
    assert!(r["stats"]["blocks_new"].as_u64().unwrap() <= 5, "{r}");
    assert_same_file(
        &pool.copy_disk(&s, vdi, "d.img"),
        &s.restore(r["id"].as_str().unwrap(), "r.img"),
    );
    pool.sim().churn(vdi, 3, 2).unwrap();
    let next = pool.backup(&s, vdi);
    assert_eq!(next["mode"]["kind"], "incremental", "{next}");
}

#[test]
fn faults_are_survived_retried_or_reported() {
    let s = Scratch::new();
    let pool = Pool::start(&s, 1);
    let vdi = &pool.vdis()[0];
    pool.backup(&s, vdi);

    // An NBD connection that drops mid-read: the client reconnects.
    pool.sim().churn(vdi, 30, 3).unwrap();
    pool.sim().fault_nbd_disconnect_after(600 * 1024);
    let r = pool.backup(&s, vdi);
    assert_eq!(r["mode"]["kind"], "incremental", "{r}");
    assert_same_file(
        &pool.copy_disk(&s, vdi, "a.img"),
        &s.restore(r["id"].as_str().unwrap(), "ra.img"),
    );

    // data_destroy answers VDI_IN_USE once: retried.
    pool.sim().churn(vdi, 4, 4).unwrap();
    pool.sim().fault_data_destroy_in_use();
    pool.backup(&s, vdi);
    assert!(
        pool.data_snapshots().is_empty(),
        "{:?}",
        pool.data_snapshots()
    );

    // Sessions expire between runs and during one: the client logs in again.
    pool.sim().churn(vdi, 4, 5).unwrap();
    pool.sim().expire_sessions();
    pool.sim().fault_slow(Duration::from_millis(5), Some(3));
    let r = pool.backup(&s, vdi);
    assert_eq!(r["mode"]["kind"], "incremental", "{r}");
}

#[test]
fn a_grown_disk_stays_incremental() {
    let s = Scratch::new();
    let pool = Pool::start(&s, 1);
    let vdi = &pool.vdis()[0];
    pool.backup(&s, vdi);
    pool.sim().resize(vdi, 48 << 20).unwrap();
    pool.sim()
        .write(vdi, (40 << 20) + 100, b"written past the old end")
        .unwrap();
    let r = pool.backup(&s, vdi);
    assert_eq!(r["mode"]["kind"], "incremental", "{r}");
    assert_eq!(r["stats"]["blocks_read"], 1);
    let restored = s.restore(r["id"].as_str().unwrap(), "grown.img");
    assert_eq!(std::fs::metadata(&restored).unwrap().len(), 48 << 20);
    assert_same_file(&pool.copy_disk(&s, vdi, "g.img"), &restored);
}

#[test]
fn a_killed_run_is_reaped_and_the_next_run_stays_incremental() {
    let s = Scratch::new();
    let pool = Pool::start(&s, 1);
    let vdi = pool.vdis()[0].clone();
    pool.backup(&s, &vdi);
    let mut args = pool.args(&s);
    args.extend(["--vdi".to_string(), vdi.clone()]);
    for round in 0..4u64 {
        pool.sim().churn(&vdi, 200, 10 + round).unwrap();
        // Slow calls stretch the run so that the kill lands inside it.
        pool.sim().fault_slow(Duration::from_millis(60), Some(20));
        let mut child = s.command().args(&args).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(100 + 150 * round));
        let _ = child.kill();
        let _ = child.wait();
        pool.sim().clear_faults();
    }
    let r = pool.backup(&s, &vdi);
    assert_eq!(r["mode"]["kind"], "incremental", "{r}");
    assert!(
        pool.data_snapshots().is_empty(),
        "leftovers reaped: {:?}",
        pool.data_snapshots()
    );
    assert_same_file(
        &pool.copy_disk(&s, &vdi, "k.img"),
        &s.restore(r["id"].as_str().unwrap(), "rk.img"),
    );
    let (ok, report) = s.verify(true);
    assert!(ok, "{report}");
}

#[test]
fn restore_into_the_pool_as_a_new_vdi() {
    let s = Scratch::new();
    let pool = Pool::start(&s, 1);
    let vdi = &pool.vdis()[0];
    let r = pool.backup(&s, vdi);
    let url = pool.sim.as_ref().unwrap().https_url();
    let sr = pool.rt.block_on(async {
        let client = pool.login().await;
        let vdi_ref = client.vdi().get_by_uuid(vdi).await.unwrap();
        let sr_ref = client.vdi().get_record(&vdi_ref).await.unwrap().sr;
        let sr = client.sr().get_record(&sr_ref).await.unwrap().uuid;
        client.logout().await.unwrap();
        sr
    });
    let out = s.ok(&[
        "restore",
        "--json",
        r["id"].as_str().unwrap(),
        "--to",
        "xapi",
        "--sr",
        &sr,
        "--xapi",
        &url,
        "--password-file",
        pool.password.to_str().unwrap(),
        "--pin",
        pool.pin.to_str().unwrap(),
    ]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let new_vdi = v["vdi"].as_str().unwrap();
    assert_ne!(new_vdi, vdi);
    assert_same_file(
        &pool.copy_disk(&s, vdi, "orig.img"),
        &pool.copy_disk(&s, new_vdi, "new.img"),
    );
}

#[test]
fn all_disks_of_a_vm_from_one_vm_snapshot() {
    let s = Scratch::new();
    let pool = Pool::start_with(&s, 1, 2);
    let vm = pool
        .sim()
        .vms()
        .into_iter()
        .find(|v| !v.is_a_snapshot && !v.is_control_domain)
        .map(|v| v.uuid)
        .unwrap();
    let disks = pool.vdis();
    assert_eq!(disks.len(), 2);
    let run = |pool: &Pool| -> Vec<Value> {
        let mut args = pool.args(&s);
        args.extend(["--vm".into(), vm.clone(), "--vm-snapshot".into()]);
        let out = s.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let v: Value = serde_json::from_str(&out).unwrap();
        v.as_array().unwrap().clone()
    };
    let first = run(&pool);
    assert_eq!(first.len(), 2, "{first:?}");
    assert!(
        first.iter().all(|r| r["mode"]["kind"] == "full"),
        "{first:?}"
    );
    for d in &disks {
        pool.sim().churn(d, 3, 9).unwrap();
    }
    let second = run(&pool);
    assert!(
        second.iter().all(|r| r["mode"]["kind"] == "incremental"),
        "{second:?}"
    );
    assert!(
        pool.data_snapshots().is_empty(),
        "{:?}",
        pool.data_snapshots()
    );
    let snapshot_vms = pool
        .sim()
        .vms()
        .into_iter()
        .filter(|v| v.is_a_snapshot)
        .count();
    assert_eq!(snapshot_vms, 0, "the VM snapshot is destroyed");
    for r in &second {
        // The VDI is the last part of the source location, POOL/vdi/UUID.
        let disk = r["source"]["location"]
            .as_str()
            .unwrap()
            .rsplit('/')
            .next()
            .unwrap()
            .to_string();
        let copy = pool.copy_disk(&s, &disk, &format!("{disk}.img"));
        assert_same_file(
            &copy,
            &s.restore(r["id"].as_str().unwrap(), &format!("r-{disk}.img")),
        );
    }
}

#[test]
fn an_expired_session_mid_run_logs_in_again() {
    let s = Scratch::new();
    let pool = Pool::start(&s, 1);
    let vdi = pool.vdis()[0].clone();
    pool.backup(&s, &vdi);
    let written: std::collections::BTreeSet<u64> =
        pool.sim().churn(&vdi, 6, 21).unwrap().into_iter().collect();
    let url = pool.sim.as_ref().unwrap().https_url();
    let outcome = pool.rt.block_on(async {
        let client = pool.login().await;
        let before = client.session();
        // The host forgets every session: the run's first call meets SESSION_INVALID.
        pool.sim().expire_sessions();
        let repo = std::sync::Arc::new(cbtvault_repo::Repository::open(&s.repo()).unwrap());
        let o = cbtvault_engine::xenserver::backup_vdi(
            &client,
            repo,
            &vdi,
            &cbtvault_engine::xenserver::XenOptions::new("adhoc", url.clone()),
            std::sync::Arc::new(cbtvault_engine::NoProgress),
            tokio_util::sync::CancellationToken::new(),
        )
        .await;
        assert_ne!(client.session(), before, "logged in again");
        o
    });
    let o = outcome.expect("the run survives the expired session");
    let changed = match o.manifest.mode {
        cbtvault_repo::BackupMode::Incremental { changed_blocks, .. } => changed_blocks,
        ref other => panic!("not incremental: {other:?}"),
    };
    assert_eq!(changed, written.len() as u64);
    assert_same_file(
        &pool.copy_disk(&s, &vdi, "e.img"),
        &s.restore(&o.restore_point, "re.img"),
    );
}

/// Issue 8, defect 20: a VDI whose size is not a multiple of 512 bytes.
/// xapi-nbd reads whole sectors only (EINVAL otherwise); the tail must still
/// be read, night after night, and the chain must stay incremental.
#[test]
fn a_vdi_of_an_odd_size_backs_up_incrementally_and_restores_exactly() {
    let s = Scratch::new();
    let pool = Pool::start(&s, 1);
    let vdi = pool.vdis()[0].clone();
    // An SR that keeps sizes exact (VHD SRs round them up to 2 MiB).
    pool.sim().set_sr_type_of(&vdi, "dummy").unwrap();
    pool.backup(&s, &vdi);
    // Grown to a size that is no whole number of sectors, data in the tail.
    let size = (32 << 20) + 1000;
    pool.sim().resize(&vdi, size).unwrap();
    pool.sim().write(&vdi, size - 300, &[0xa5; 300]).unwrap();
    for night in 1..=3u64 {
        pool.sim().churn(&vdi, 5, night).unwrap();
        pool.sim()
            .write(&vdi, size - 17, &[night as u8; 17])
            .unwrap();
        let r = pool.backup(&s, &vdi);
        assert_eq!(r["mode"]["kind"], "incremental", "night {night}: {r}");
        let restored = s.restore(r["id"].as_str().unwrap(), &format!("r{night}.img"));
        assert_eq!(std::fs::metadata(&restored).unwrap().len(), size);
        assert_same_file(
            &pool.copy_disk(&s, &vdi, &format!("n{night}.img")),
            &restored,
        );
    }
    let (ok, report) = s.verify(true);
    assert!(ok, "{report}");
}

/// Issue 8, defect 11: a VDI's disk is named with its pool
/// (`xen-POOL/VDI`); restore points stored under the former name
/// (`xen-VDI`) stay, and the newest serves as the parent of the next
/// incremental, so the upgrade costs no full read.
#[test]
fn a_vdi_stored_under_its_former_name_stays_incremental() {
    let s = Scratch::new();
    let pool = Pool::start(&s, 1);
    let vdi = pool.vdis()[0].clone();
    // An SR that keeps sizes exact (VHD SRs round them up to 2 MiB).
    pool.sim().set_sr_type_of(&vdi, "dummy").unwrap();
    let first = pool.backup(&s, &vdi);
    let pool_uuid = pool.rt.block_on(async {
        let client = pool.login().await;
        let uuid = cbtvault_engine::xenserver::pool_uuid(&client)
            .await
            .unwrap();
        client.logout().await.unwrap();
        uuid
    });
    let name = format!("xen-{pool_uuid}/{vdi}");
    let rows = s.list();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["disk"], name.as_str());

    // A repository from before: the point under `xen-VDI`.
    let former = format!("xen-{vdi}");
    {
        let repo = cbtvault_repo::Repository::open(&s.repo()).unwrap();
        let old = repo.resolve(first["id"].as_str().unwrap()).unwrap();
        let mut manifest = old.manifest.clone();
        manifest.disk = former.clone();
        repo.commit(&manifest).unwrap();
        let forget = cbtvault_repo::ForgetSelection::Ids(vec![old.id.clone()]);
        let plan = repo.forget_plan(&forget, true).unwrap();
        repo.forget(&plan).unwrap();
    }
    let written: std::collections::BTreeSet<u64> =
        pool.sim().churn(&vdi, 6, 3).unwrap().into_iter().collect();
    let r = pool.backup(&s, &vdi);
    assert_eq!(r["mode"]["kind"], "incremental", "{r}");
    assert_eq!(r["mode"]["changed_blocks"], written.len() as u64);
    assert_same_file(
        &pool.copy_disk(&s, &vdi, "after.img"),
        &s.restore(r["id"].as_str().unwrap(), "after-r.img"),
    );
    let disks: std::collections::BTreeSet<String> = s
        .list()
        .iter()
        .map(|rp| rp["disk"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(disks, [former, name].into_iter().collect());
    assert!(
        pool.data_snapshots().is_empty(),
        "{:?}",
        pool.data_snapshots()
    );
}

/// Issue 8, defect 1 through XenServer: a VDI resized to a size that is not
/// a multiple of 64 KiB, written, backed up, resized again and backed up
/// with nothing written: every restore point restores byte-exact (the old
/// partial last block is read again, not taken from the parent as it was).
#[test]
fn a_vdi_resized_twice_to_partial_blocks_restores_every_night() {
    let s = Scratch::new();
    let pool = Pool::start(&s, 1);
    let vdi = pool.vdis()[0].clone();
    // An SR that keeps sizes exact (VHD SRs round them up to 2 MiB).
    pool.sim().set_sr_type_of(&vdi, "dummy").unwrap();
    let first = pool.backup(&s, &vdi);
    let mut nights = vec![(first, pool.copy_disk(&s, &vdi, "n0.img"))];
    for (night, size) in [(1u64, (32 << 20) + 4096 + 512), (2, (32 << 20) + 200_704)] {
        pool.sim().resize(&vdi, size).unwrap();
        if night == 1 {
            pool.sim().write(&vdi, size - 4000, &[0x5a; 4000]).unwrap();
        }
        let r = pool.backup(&s, &vdi);
        nights.push((r, pool.copy_disk(&s, &vdi, &format!("n{night}.img"))));
    }
    assert!(pool.data_snapshots().is_empty());
    for (i, (r, disk)) in nights.iter().enumerate() {
        let restored = s.restore(r["id"].as_str().unwrap(), &format!("r{i}.img"));
        assert_same_file(disk, &restored);
    }
    let (ok, report) = s.verify(true);
    assert!(ok, "{report}");
}

/// `restore --only-changed --to xapi --vdi`: the VDI is rolled back by a
/// sparse VHD carrying only the blocks the block maps and the VDI's CBT
/// name; with CBT disabled it falls back to a whole upload, still exact.
#[test]
fn rollback_of_a_vdi_uploads_only_the_changed_blocks() {
    let s = Scratch::new();
    let pool = Pool::start(&s, 1);
    let vdi = pool.vdis()[0].clone();
    let first = pool.backup(&s, &vdi);
    let first = first["id"].as_str().unwrap().to_string();
    let orig = pool.copy_disk(&s, &vdi, "orig.img");
    // 1% churn, backed up; then 1% more, not backed up.
    let a = pool.sim().churn(&vdi, 5, 21).unwrap();
    pool.backup(&s, &vdi);
    let b = pool.sim().churn(&vdi, 5, 22).unwrap();
    // Rolled back with its VM shut down: in use, it is refused.
    let mut changed: Vec<u64> = a.iter().chain(b.iter()).copied().collect();
    changed.sort();
    changed.dedup();
    let url = pool.sim.as_ref().unwrap().https_url();
    let args_for = |extra: &[&str]| -> Vec<String> {
        let mut args = vec![
            "restore",
            "--json",
            first.as_str(),
            "--to",
            "xapi",
            "--only-changed",
            "--vdi",
            vdi.as_str(),
            "--xapi",
            &url,
            "--password-file",
            pool.password.to_str().unwrap(),
            "--pin",
            pool.pin.to_str().unwrap(),
        ];
        args.extend(extra);
        args.into_iter().map(String::from).collect()
    };
    let roll = |extra: &[&str]| -> Value {
        let args = args_for(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        serde_json::from_str(&s.ok(&args)).unwrap()
    };
    let args = args_for(&[]);
    let err = s.fails(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("in use"), "{err}");
    pool.sim().unplug(&vdi).unwrap();
    let v = roll(&[]);
    let stats = &v["stats"];
    assert_eq!(stats["method"], "block-maps+changed-blocks", "{v}");
    assert_eq!(stats["blocks_compared"], 512, "{v}");
    assert_eq!(stats["blocks_written"], changed.len() as u64, "{v}");
    // The sim received only those blocks: 128 sectors each.
    let (received, sectors) = pool.sim().last_import();
    assert_eq!(sectors, changed.len() as u64 * 128);
    assert_eq!(received, stats["bytes_uploaded"].as_u64().unwrap());
    // The body carries each touched 2 MiB VHD block whole (the bitmaps
    // say which sectors count): headers, then bitmap + 2 MiB per block.
    let vhd_blocks = {
        let mut v: Vec<u64> = changed.iter().map(|b| b / 32).collect();
        v.dedup();
        v.len() as u64
    };
    assert_eq!(
        received,
        512 + 1024 + 512 + vhd_blocks * (512 + (2 << 20)) + 512
    );
    assert_same_file(&orig, &pool.copy_disk(&s, &vdi, "rolled.img"));

    // CBT disabled: the whole disk goes up, with the reason.
    pool.sim().churn(&vdi, 5, 23).unwrap();
    pool.rt.block_on(async {
        let c = pool.login().await;
        let r = c.vdi().get_by_uuid(&vdi).await.unwrap();
        c.vdi().disable_cbt(&r).await.unwrap();
        c.logout().await.unwrap();
    });
    let v = roll(&[]);
    assert_eq!(v["stats"]["method"], "full", "{v}");
    assert!(
        v["stats"]["fallback"]
            .as_str()
            .unwrap()
            .contains("CBT is disabled"),
        "{v}"
    );
    assert_same_file(&orig, &pool.copy_disk(&s, &vdi, "rolled2.img"));
}
