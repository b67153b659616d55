//! The state directory keeps the pool across restarts; sessions do not
//! survive, as on a real host.

use std::collections::BTreeMap;
use std::time::Duration;

use cbtvault_xapi_sim::{SimConfig, Simulator};
use cbtvault_xenapi::{Client, ClientOptions, Password};

use super::common::{DISK, PASSWORD, blocks, client, config, disk_of, start};

#[tokio::test]
async fn restart_keeps_pool_chain_and_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let first = start(dir.path()).await;
    let c = client(&first).await;
    let (disk, uuid) = disk_of(&c, "vm-0").await;
    c.vdi().enable_cbt(&disk).await.unwrap();
    let s1 = c.vdi().snapshot(&disk, &BTreeMap::new()).await.unwrap();
    first.sim().write_blocks(&uuid, &[12, 13], 4).unwrap();
    let cert = first.certificate_pem().to_owned();
    let vdis_before = c.vdi().get_all_records().await.unwrap();
    let old_session = c.session().unwrap();
    first.shutdown().await;

    // Same directory, same port: the old client finds the pool again.
    let mut cfg = config(dir.path());
    cfg.pool.vms = 5; // ignored: the pool exists
    let second = Simulator::start_on(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(second.certificate_pem(), cert);
    let mut o = ClientOptions::new(&second.http_url(), "root", Password::new(PASSWORD)).unwrap();
    o.task_poll = (Duration::from_millis(5), Duration::from_millis(50));
    let c2 = Client::connect(o).await.unwrap();
    assert_eq!(c2.vdi().get_all_records().await.unwrap(), vdis_before);
    assert_eq!(
        c2.vm().get_all_records().await.unwrap().len(),
        3,
        "dom0 and two VMs, not five"
    );
    let s2 = c2.vdi().snapshot(&disk, &BTreeMap::new()).await.unwrap();
    let changed = c2.vdi().list_changed_blocks(&s1, &s2).await.unwrap();
    assert_eq!(blocks(&changed, DISK), [12, 13]);
    // The old session died with the old process.
    let err = c2
        .call("session.get_uuid", vec![old_session.as_str().into()])
        .await
        .unwrap_err();
    assert_eq!(
        err.xapi().map(|e| e.code()).as_deref(),
        Some("HANDLE_INVALID")
    );
    second.shutdown().await;
}

#[test]
fn defaults_are_xapis() {
    let config = SimConfig::new("/nonexistent", "pw");
    assert_eq!(config.data_destroy_timeout, Duration::from_secs(4));
    assert_eq!(config.session_limits.per_originator, 500);
    assert_eq!(config.session_limits.anonymous, 400);
    assert_eq!(
        config.session_limits.inactive_timeout,
        Duration::from_secs(86_400)
    );
    assert_eq!(config.nbd_connection_limit, 16);
    assert_eq!(config.username, "root");
}
