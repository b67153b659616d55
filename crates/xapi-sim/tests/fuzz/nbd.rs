//! Hostile NBD export names: xapi-nbd's `/<uuid>?session_id=<ref>`, edited
//! (cut, padded, characters replaced, parameters repeated or encoded),
//! given to the export resolver directly and, fewer of them, by real
//! clients over TLS. Each name is served or refused; nothing panics; and
//! once every export is dropped no connection slot or dom0 VBD is left.

use std::time::{Duration, Instant};

use cbtvault_nbd::{ConnectOptions, TlsOptions};
use cbtvault_xapi_sim::Simulator;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestRunner};

use super::rpc::{config, known, runtime};
use super::watch::{count_panics, panics};

#[derive(Clone, Debug)]
enum Edit {
    Replace(Index, char),
    Insert(Index, String),
    Truncate(Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    let piece = prop_oneof![
        Just("?".to_owned()),
        Just("&session_id=".to_owned()),
        Just("%00".to_owned()),
        Just("%".to_owned()),
        Just("/".to_owned()),
        Just("=".to_owned()),
        Just("\u{0}".to_owned()),
        Just("é".to_owned()),
        Just("x".repeat(5000)),
        ".{0,4}",
    ];
    prop_oneof![
        (any::<Index>(), any::<char>()).prop_map(|(i, c)| Edit::Replace(i, c)),
        (any::<Index>(), piece).prop_map(|(i, p)| Edit::Insert(i, p)),
        any::<Index>().prop_map(Edit::Truncate),
    ]
}

fn apply(name: &str, edits: &[Edit]) -> String {
    let mut chars: Vec<char> = name.chars().collect();
    for e in edits {
        let len = chars.len();
        match e {
            Edit::Replace(i, c) if len > 0 => chars[i.index(len)] = *c,
            Edit::Insert(i, p) => {
                let at = i.index(len + 1);
                chars.splice(at..at, p.chars());
            }
            Edit::Truncate(i) if len > 0 => chars.truncate(i.index(len)),
            _ => {}
        }
    }
    chars.into_iter().collect()
}

fn dom0_vbds(server: &Simulator) -> usize {
    server.sim().vdis().iter().map(|v| v.vms.len()).sum()
}

async fn wait_for_no_connections(server: &Simulator) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.sim().nbd_connections() > 0 {
        assert!(
            Instant::now() < deadline,
            "NBD connection slots were not given back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn hostile_export_names() {
    count_panics();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let rt = runtime();
    let server = rt
        .block_on(Simulator::start(config(dir.path())))
        .expect("simulator");
    let known = rt.block_on(known(server.addr()));
    let disk = server
        .sim()
        .vdis()
        .into_iter()
        .find(|v| v.vdi_type == "user")
        .expect("a disk");
    let valid = format!("/{}?session_id={}", disk.uuid, known.session);
    let vbds = dom0_vbds(&server);
    let before = panics();

    // Straight to the resolver.
    let mut runner = TestRunner::new(Config {
        cases: 512,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&prop::collection::vec(edit(), 0..4), |edits| {
        let name = apply(&valid, &edits);
        let export = server.sim().open_nbd_export(&name);
        if edits.is_empty() {
            prop_assert!(export.is_ok(), "{:?}", export.err());
        }
        drop(export);
        prop_assert_eq!(panics(), before);
        prop_assert_eq!(server.sim().nbd_connections(), 0);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }

    // Over TLS with a real client.
    let addr = server.nbd_addr().expect("an NBD server");
    let tls = TlsOptions::pinned_pem(server.certificate_pem().to_owned())
        .with_server_name(cbtvault_xapi_sim::CERT_SUBJECT.to_owned());
    let mut runner = TestRunner::new(Config {
        cases: 48,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&prop::collection::vec(edit(), 0..3), |edits| {
        let name = apply(&valid, &edits);
        let options = ConnectOptions::tcp(addr.ip().to_string(), addr.port(), name)
            .with_tls(tls.clone())
            .with_retries(0, Duration::from_millis(1))
            .with_request_timeout(Some(Duration::from_secs(10)));
        let outcome = rt.block_on(async {
            let client = cbtvault_nbd::Client::connect(&options).await?;
            let data = client.read(0, 4096).await;
            client.disconnect().await;
            data
        });
        if let Ok(data) = &outcome {
            prop_assert_eq!(data.len(), 4096);
        }
        if edits.is_empty() {
            prop_assert!(outcome.is_ok(), "{:?}", outcome.err());
        }
        prop_assert_eq!(panics(), before);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    rt.block_on(wait_for_no_connections(&server));
    assert_eq!(dom0_vbds(&server), vbds, "a dom0 VBD was left attached");
    rt.block_on(server.shutdown());
}
