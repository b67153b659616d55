//! The binary against answers a real pool gives and a lenient simulator
//! would not (issue 15): refused logins, and disks whose SR, licence or
//! format rule changed-block tracking out.

use crate::common::*;
use crate::xen::Pool;

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn a_wrong_password_is_tried_once_for_all_disks() {
    let s = Scratch::new();
    let pool = Pool::start(&s, 2);
    std::fs::write(&pool.password, "wrong\n").unwrap();
    let mut args = pool.args(&s);
    for vdi in pool.vdis() {
        args.extend(["--vdi".to_string(), vdi]);
    }
    let err = s.fails(&strs(&args));
    assert!(
        err.contains("wrong user name or password (SESSION_AUTHENTICATION_FAILED)"),
        "{err}"
    );
    assert_eq!(pool.sim().login_attempts(), (1, 1), "{err}");
}

/// Backs up `vdi` on two nights with changes between them and checks that
/// both are full reads for `reason`, restore exactly and leave no snapshot.
fn full_every_night(s: &Scratch, pool: &Pool, vdi: &str, reason: &str) {
    for night in 1..=2u64 {
        pool.sim().churn(vdi, 5, night).unwrap();
        let r = pool.backup(s, vdi);
        assert_eq!(r["mode"]["kind"], "full", "night {night}: {r}");
        let why = r["mode"]["reason"].as_str().unwrap_or_default();
        assert!(
            why.contains(reason) && why.contains("reads it whole"),
            "night {night}: {why}"
        );
        assert_same_file(
            &pool.copy_disk(s, vdi, &format!("{reason}-{night}.img")),
            &s.restore(r["id"].as_str().unwrap(), &format!("{reason}-r{night}.img")),
        );
    }
    let left: Vec<_> = pool
        .sim()
        .vdis()
        .into_iter()
        .filter(|v| v.is_a_snapshot)
        .collect();
    assert!(left.is_empty(), "snapshots left behind: {left:?}");
}

#[test]
fn disks_without_cbt_are_read_whole_every_night_with_the_reason() {
    let s = Scratch::new();
    let pool = Pool::start(&s, 3);
    let vdis = pool.vdis();
    pool.sim().set_sr_type_of(&vdis[0], "nocbt").unwrap();
    full_every_night(&s, &pool, &vdis[0], "SR_OPERATION_NOT_SUPPORTED");
    pool.sim().set_sr_type_of(&vdis[0], "ext").unwrap();

    pool.sim().set_raw(&vdis[1]).unwrap();
    full_every_night(&s, &pool, &vdis[1], "SR_BACKEND_FAILURE_66");

    pool.sim().set_cbt_licensed(false).unwrap();
    full_every_night(&s, &pool, &vdis[2], "LICENCE_RESTRICTION");
    // Licensed again: tracking starts and the next night is incremental.
    pool.sim().set_cbt_licensed(true).unwrap();
    pool.backup(&s, &vdis[2]);
    pool.sim().churn(&vdis[2], 3, 9).unwrap();
    let r = pool.backup(&s, &vdis[2]);
    assert_eq!(r["mode"]["kind"], "incremental", "{r}");
}

#[test]
fn an_unmanaged_vdi_is_refused_with_what_to_do() {
    let s = Scratch::new();
    let pool = Pool::start(&s, 1);
    let vdi = pool.vdis()[0].clone();
    pool.sim().set_managed(&vdi, false).unwrap();
    let mut args = pool.args(&s);
    args.extend(["--vdi".to_string(), vdi]);
    let err = s.fails(&strs(&args));
    assert!(err.contains("(VDI_NOT_MANAGED)"), "{err}");
    assert!(err.contains("xe sr-scan"), "{err}");
    assert!(pool.sim().vdis().iter().all(|v| !v.is_a_snapshot));
}
