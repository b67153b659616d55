//! One session for the run; transparent re-login on SESSION_INVALID.

use std::time::Duration;

use cbtvault_xenapi::{Client, Value, XapiError, nbd_export_name};

use super::common::{BOTH, client, disk_of, options, start, start_with};

#[tokio::test]
async fn expired_session_is_renewed_transparently() {
    let env = start().await;
    for t in BOTH {
        let c = client(&env, t).await;
        let before = c.session().unwrap();
        let (disk, uuid) = disk_of(&c, "vm-0").await;
        assert!(env.sim.sim().expire_sessions() >= 1);
        // The call fails with SESSION_INVALID on the wire, the client logs
        // in again and retries: the caller sees a success.
        let rec = c.vdi().get_record(&disk).await.unwrap();
        assert_eq!(rec.uuid, uuid);
        let after = c.session().unwrap();
        assert_ne!(before, after, "{t:?}");
        // Export names must be built with the current session.
        assert_eq!(
            nbd_export_name(&uuid, &after),
            format!("/{uuid}?session_id={after}")
        );
        // Asynchronous calls too.
        env.sim.sim().expire_sessions();
        c.vdi().enable_cbt(&disk).await.unwrap();
        assert!(c.vdi().get_cbt_enabled(&disk).await.unwrap());
    }
}

#[tokio::test]
async fn concurrent_callers_log_in_once() {
    let env = start().await;
    let c = client(&env, Default::default()).await;
    env.sim.sim().expire_sessions();
    let calls = (0..8).map(|_| {
        let c = c.clone();
        tokio::spawn(async move { c.call("VDI.get_all", vec![]).await })
    });
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(env.sim.sim().session_count(), 1);
}

#[tokio::test]
async fn logout_ends_the_session_and_later_calls_log_in_again() {
    let env = start().await;
    let c = client(&env, Default::default()).await;
    let old = c.session().unwrap();
    c.logout().await.unwrap();
    assert_eq!(c.session(), None);
    assert_eq!(env.sim.sim().session_count(), 0);
    // The old session is dead on the server.
    let raw = c.clone();
    c.call("VDI.get_all", vec![]).await.unwrap();
    assert_ne!(raw.session().unwrap(), old);
    c.logout().await.unwrap();
    c.logout().await.unwrap();
}

#[tokio::test]
async fn idle_sessions_expire_by_timeout() {
    let env = start_with(|c| c.session_limits.inactive_timeout = Duration::from_millis(100)).await;
    let c = client(&env, Default::default()).await;
    let first = c.session().unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    c.call("VDI.get_all", vec![]).await.unwrap();
    assert_ne!(c.session().unwrap(), first);
}

#[tokio::test]
async fn session_limit_per_originator_evicts_the_oldest() {
    let env = start_with(|c| c.session_limits.per_originator = 2).await;
    let a = client(&env, Default::default()).await;
    let a_session = a.session().unwrap();
    let _b = client(&env, Default::default()).await;
    let _c = client(&env, Default::default()).await;
    // A raw call with a's (evicted) session is refused...
    let mut o = options(&env, Default::default());
    o.originator = "someone-else".into();
    let other = Client::connect(o).await.unwrap();
    let err = other
        .call("session.get_uuid", vec![Value::from(a_session.as_str())])
        .await
        .unwrap_err();
    assert_eq!(
        err.xapi().map(XapiError::code).as_deref(),
        Some("HANDLE_INVALID")
    );
    // ...while a itself recovers by logging in again.
    a.call("VDI.get_all", vec![]).await.unwrap();
    assert_ne!(a.session().unwrap(), a_session);
}
