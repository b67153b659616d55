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
