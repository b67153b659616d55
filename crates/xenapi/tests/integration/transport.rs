//! Wire formats, fallback and TLS.

use cbtvault_xenapi::{
    Client, Error, Password, TlsTrust, Transport, TransportChoice, VdiType, XapiError,
};

use super::common::{BOTH, DISK, client, options, start, start_with};

#[tokio::test]
async fn records_over_both_transports() {
    let env = start().await;
    for t in BOTH {
        let c = client(&env, t).await;
        let expected = match t {
            TransportChoice::XmlRpc => Transport::XmlRpc,
            _ => Transport::JsonRpc,
        };
        assert_eq!(c.transport(), expected);
        let vdis = c.vdi().get_all_records().await.unwrap();
        assert_eq!(vdis.len(), 2, "{t:?}");
        for (r, rec) in &vdis {
            assert_eq!(rec.virtual_size, DISK, "64-bit int decoded over {t:?}");
            assert_eq!(rec.vdi_type, VdiType::User);
            assert!(!rec.is_a_snapshot && !rec.cbt_enabled);
            assert_eq!(c.vdi().get_by_uuid(&rec.uuid).await.unwrap(), *r);
            assert_eq!(c.vdi().get_record(r).await.unwrap(), *rec);
            let sr = c.sr().get_record(&rec.sr).await.unwrap();
            assert_eq!(sr.sr_type, "ext");
            assert!(sr.vdis.contains(r));
            assert_eq!(rec.vbds.len(), 1);
            let vbd = c.vbd().get_record(&rec.vbds[0]).await.unwrap();
            assert!(vbd.currently_attached);
            assert_eq!(&vbd.vdi, r);
        }
        let vms = c.vm().get_all_records().await.unwrap();
        assert_eq!(vms.values().filter(|v| v.is_control_domain).count(), 1);
        assert_eq!(
            vms.values()
                .filter(|v| !v.is_control_domain && v.power_state == "Running")
                .count(),
            2
        );
        c.logout().await.unwrap();
    }
}

#[tokio::test]
async fn falls_back_to_xmlrpc_without_jsonrpc() {
    let env = start_with(|c| c.jsonrpc = false).await;
    let c = client(&env, TransportChoice::Auto).await;
    assert_eq!(c.transport(), Transport::XmlRpc);
    assert_eq!(c.vdi().get_all_records().await.unwrap().len(), 2);
    // Forcing JSON-RPC on such a host is an HTTP error, not a silent switch.
    let err = Client::connect(options(&env, TransportChoice::JsonRpc))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::HttpStatus { status: 404, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn auto_prefers_jsonrpc() {
    let env = start().await;
    let c = client(&env, TransportChoice::Auto).await;
    assert_eq!(c.transport(), Transport::JsonRpc);
}

#[tokio::test]
async fn wrong_password_is_authentication_failed() {
    let env = start().await;
    for t in BOTH {
        let mut o = options(&env, t);
        o.password = Password::new("nope");
        let err = Client::connect(o).await.unwrap_err();
        assert_eq!(
            err.xapi(),
            Some(&XapiError::SessionAuthenticationFailed {
                user: "root".into(),
                message: "Authentication failure".into()
            }),
            "{t:?}"
        );
        assert!(!err.is_retryable());
        // The password is never in the error or the options' Debug form.
        assert!(!format!("{err} {err:?}").contains("nope"));
    }
    let o = options(&env, TransportChoice::Auto);
    assert!(!format!("{o:?}").contains(super::common::PASSWORD));
}

#[tokio::test]
async fn https_with_pinned_certificate() {
    let env = start().await;
    let mut o = options(&env, TransportChoice::Auto);
    o.url = env.sim.https_url().parse().unwrap();
    o.tls = Some(TlsTrust::pinned_pem(env.sim.certificate_pem()).unwrap());
    let c = Client::connect(o.clone()).await.unwrap();
    assert_eq!(c.vdi().get_all_records().await.unwrap().len(), 2);

    // Another certificate pinned: refused.
    let other = start().await;
    o.tls = Some(TlsTrust::pinned_pem(other.sim.certificate_pem()).unwrap());
    let err = Client::connect(o.clone()).await.unwrap_err();
    assert!(matches!(err, Error::PinMismatch { .. }), "{err}");
    // Trying again would meet the same certificate.
    assert!(!err.is_retryable());
    assert!(
        err.to_string().starts_with(&format!(
            "the server at {} presented a certificate with SHA-256 fingerprint",
            env.sim.addr()
        )),
        "{err}"
    );

    // The certificate as a CA: it names localhost and 127.0.0.1.
    o.tls = Some(TlsTrust::ca_pem(env.sim.certificate_pem()).unwrap());
    Client::connect(o.clone()).await.unwrap();

    // No trust setting for https: a configuration error.
    o.tls = None;
    let err = Client::connect(o.clone()).await.unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");

    // Explicitly insecure works (and logs a warning).
    o.tls = Some(TlsTrust::InsecureAcceptAny);
    Client::connect(o).await.unwrap();
}
