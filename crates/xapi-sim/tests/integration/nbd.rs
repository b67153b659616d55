//! Reading VDIs over NBD as XenServer's xapi-nbd serves them, with
//! cbtvault's NBD client, and the side effects of an open connection.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cbtvault_nbd::{ConnectOptions, TlsOptions};
use cbtvault_xenapi::{Client, NbdInfo, VdiType, XapiError, nbd_export_name};

use super::common::{DISK, client, disk_of, start};

fn options(info: &NbdInfo, export: &str) -> ConnectOptions {
    ConnectOptions::tcp(info.address.clone(), info.port, export)
        .with_tls(TlsOptions::pinned_pem(info.cert.clone()).with_server_name(info.subject.clone()))
        .with_retries(0, Duration::from_millis(10))
        .with_request_timeout(Some(Duration::from_secs(10)))
}

async fn wait_for_no_connections(sim: &cbtvault_xapi_sim::Sim) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while sim.nbd_connections() > 0 {
        assert!(Instant::now() < deadline, "NBD connections did not close");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn snapshot_with_data(
    c: &Client,
    sim: &cbtvault_xapi_sim::Sim,
) -> (cbtvault_xenapi::VdiRef, String, cbtvault_xenapi::VdiRef) {
    let (disk, uuid) = disk_of(c, "vm-0").await;
    c.vdi().enable_cbt(&disk).await.unwrap();
    let base = c.vdi().snapshot(&disk, &BTreeMap::new()).await.unwrap();
    sim.write_blocks(&uuid, &[0, 33, 63], 9).unwrap();
    let snap = c.vdi().snapshot(&disk, &BTreeMap::new()).await.unwrap();
    let snap_uuid = c.vdi().get_uuid(&snap).await.unwrap();
    (snap, snap_uuid, base)
}

#[tokio::test]
async fn read_a_snapshot_over_tls_and_see_it_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let sim = server.sim();
    let c = client(&server).await;
    let (snap, snap_uuid, base) = snapshot_with_data(&c, sim).await;

    let infos = c.vdi().get_nbd_info(&snap).await.unwrap();
    assert_eq!(infos.len(), 1);
    let info = &infos[0];
    assert_eq!(info.address, "127.0.0.1");
    assert_eq!(Some(info.port), server.nbd_addr().map(|a| a.port()));
    assert_eq!(info.cert, server.certificate_pem());
    assert_eq!(info.subject, cbtvault_xapi_sim::CERT_SUBJECT);
    let session = c.session().unwrap();
    assert_eq!(info.exportname, nbd_export_name(&snap_uuid, &session));

    let nbd = cbtvault_nbd::Client::connect(&options(info, &info.exportname))
        .await
        .unwrap();
    assert_eq!(nbd.size(), DISK);
    assert!(nbd.is_read_only());
    assert!(
        nbd.uses_export_name_fallback(),
        "xapi-nbd speaks EXPORT_NAME only"
    );
    let data = nbd.read(0, DISK as usize).await.unwrap();
    assert!(data == sim.read(&snap_uuid, 0, DISK as usize).unwrap());
    assert_eq!(sim.nbd_connections(), 1);

    // While connected the VDI has a dom0 VBD: in use.
    let err = c.vdi().list_changed_blocks(&base, &snap).await.unwrap_err();
    assert_eq!(
        err.xapi(),
        Some(&XapiError::VdiInUse {
            vdi: snap.to_string(),
            operation: "list_changed_blocks".into()
        })
    );
    let started = Instant::now();
    let err = c.vdi().data_destroy(&snap).await.unwrap_err();
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "data_destroy waits first"
    );
    assert_eq!(
        err.xapi(),
        Some(&XapiError::VdiInUse {
            vdi: snap.to_string(),
            operation: "data_destroy".into()
        })
    );
    assert_eq!(
        c.vdi().get_record(&snap).await.unwrap().vdi_type,
        VdiType::User
    );
    let err = c.vdi().destroy(&snap).await.unwrap_err();
    assert!(
        matches!(err.xapi(), Some(XapiError::VdiInUse { .. })),
        "{err}"
    );

    // Closed: everything works again.
    nbd.disconnect().await;
    wait_for_no_connections(sim).await;
    let changed = c.vdi().list_changed_blocks(&base, &snap).await.unwrap();
    assert_eq!(super::common::blocks(&changed, DISK), [0, 33, 63]);
    c.vdi().data_destroy(&snap).await.unwrap();
    // A cbt_metadata VDI has no export.
    let err = cbtvault_nbd::Client::connect(&options(info, &info.exportname)).await;
    assert!(err.is_err());
    wait_for_no_connections(sim).await;
}

#[tokio::test]
async fn data_destroy_succeeds_when_the_connection_closes_during_the_wait() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = super::common::config(dir.path());
    config.data_destroy_timeout = Duration::from_secs(4);
    let server = cbtvault_xapi_sim::Simulator::start(config).await.unwrap();
    let sim = server.sim();
    let c = client(&server).await;
    let (snap, _, _) = snapshot_with_data(&c, sim).await;
    let info = c.vdi().get_nbd_info(&snap).await.unwrap().remove(0);
    let nbd = cbtvault_nbd::Client::connect(&options(&info, &info.exportname))
        .await
        .unwrap();
    let closer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        nbd.disconnect().await;
    });
    let started = Instant::now();
    c.vdi().data_destroy(&snap).await.unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    closer.await.unwrap();
}

#[tokio::test]
async fn export_names_are_checked_against_live_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let sim = server.sim();
    let c = client(&server).await;
    let (snap, snap_uuid, _) = snapshot_with_data(&c, sim).await;
    let info = c.vdi().get_nbd_info(&snap).await.unwrap().remove(0);

    let bad = format!("/{snap_uuid}?session_id=OpaqueRef:not-a-session");
    assert!(
        cbtvault_nbd::Client::connect(&options(&info, &bad))
            .await
            .is_err()
    );
    let no_session = format!("/{snap_uuid}");
    assert!(
        cbtvault_nbd::Client::connect(&options(&info, &no_session))
            .await
            .is_err()
    );
    let no_vdi = nbd_export_name("no-such-vdi", &c.session().unwrap());
    assert!(
        cbtvault_nbd::Client::connect(&options(&info, &no_vdi))
            .await
            .is_err()
    );

    // The session expires: the old export name dies with it; the client
    // logs in again and the export name built on the new session works.
    sim.expire_sessions();
    assert!(
        cbtvault_nbd::Client::connect(&options(&info, &info.exportname))
            .await
            .is_err()
    );
    c.vdi().get_uuid(&snap).await.unwrap();
    let fresh = nbd_export_name(&snap_uuid, &c.session().unwrap());
    let nbd = cbtvault_nbd::Client::connect(&options(&info, &fresh))
        .await
        .unwrap();
    assert_eq!(nbd.read(0, 4096).await.unwrap().len(), 4096);
    nbd.disconnect().await;
    wait_for_no_connections(sim).await;
}

#[tokio::test]
async fn injected_disconnect_and_connection_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let sim = server.sim();
    let c = client(&server).await;
    let (snap, _, _) = snapshot_with_data(&c, sim).await;
    let info = c.vdi().get_nbd_info(&snap).await.unwrap().remove(0);

    sim.fault_nbd_disconnect_after(1 << 20);
    let nbd = cbtvault_nbd::Client::connect(&options(&info, &info.exportname))
        .await
        .unwrap();
    nbd.read(0, 512 << 10).await.unwrap();
    nbd.read(512 << 10, 512 << 10).await.unwrap();
    assert!(
        nbd.read(1 << 20, 4096).await.is_err(),
        "the connection breaks after 1 MiB"
    );
    nbd.disconnect().await;
    wait_for_no_connections(sim).await;

    // 16 connections per host; the 17th is turned away.
    let mut open = Vec::new();
    for _ in 0..16 {
        open.push(
            cbtvault_nbd::Client::connect(&options(&info, &info.exportname))
                .await
                .unwrap(),
        );
    }
    assert_eq!(sim.nbd_connections(), 16);
    assert!(
        cbtvault_nbd::Client::connect(&options(&info, &info.exportname))
            .await
            .is_err()
    );
    for nbd in open {
        nbd.disconnect().await;
    }
    wait_for_no_connections(sim).await;
    cbtvault_nbd::Client::connect(&options(&info, &info.exportname))
        .await
        .unwrap()
        .disconnect()
        .await;
}

#[tokio::test]
async fn no_nbd_server_means_no_nbd_info() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = super::common::config(dir.path());
    config.nbd_listen = None;
    let server = cbtvault_xapi_sim::Simulator::start(config).await.unwrap();
    let c = client(&server).await;
    let (disk, _) = disk_of(&c, "vm-1").await;
    assert!(c.vdi().get_nbd_info(&disk).await.unwrap().is_empty());
}
