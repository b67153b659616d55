//! TLS against qemu-nbd: trust by CA, by pinned certificate, and failures.

use std::process::Command;

use cbtvault_nbd::{Client, ConnectOptions, Error, TlsOptions};

use super::common::{self, ChildGuard};

fn tls_qemu_nbd(certs: &common::Certs, img: &std::path::Path, port: u16) -> ChildGuard {
    let mut g = ChildGuard::spawn(
        Command::new("qemu-nbd")
            .arg("--object")
            .arg(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=off",
                certs.dir.display()
            ))
            .args([
                "--tls-creds",
                "tls0",
                "--persistent",
                "--shared=4",
                "-r",
                "-f",
                "raw",
            ])
            .args(["-b", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .arg(img),
    );
    common::wait_tcp(port, &mut g);
    g
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_with_tls_by_ca_and_by_pin() {
    if !common::have("qemu-nbd", "qemu_nbd_with_tls_by_ca_and_by_pin") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let certs = common::make_certs(&dir.path().join("pki"));
    let data = common::pattern(3 << 20, 11);
    let img = dir.path().join("disk.raw");
    std::fs::write(&img, &data).unwrap();
    let port = common::free_port();
    let _srv = tls_qemu_nbd(&certs, &img, port);

    // By CA, from a URI with the libnbd/QEMU directory layout.
    let uri = format!(
        "nbds://127.0.0.1:{port}/?tls-certificates={}",
        certs.dir.display()
    );
    let client = Client::connect(&ConnectOptions::from_uri(&uri).unwrap())
        .await
        .unwrap();
    assert!(client.read(0, data.len()).await.unwrap()[..] == data[..]);
    client.disconnect().await;

    // By pinned certificate (what XenServer hands out), with an odd name.
    let opts = ConnectOptions::tcp("127.0.0.1", port, "").with_tls(
        TlsOptions::pinned_pem(certs.cert_pem.clone()).with_server_name("not-the-name.example"),
    );
    let client = Client::connect(&opts).await.unwrap();
    assert!(client.read(1000, 70_000).await.unwrap()[..] == data[1000..71_000]);
    client.disconnect().await;

    // A wrong pin fails clearly, and is not retried as a transport error.
    let other = common::make_certs(&dir.path().join("other"));
    let opts = ConnectOptions::tcp("127.0.0.1", port, "")
        .with_tls(TlsOptions::pinned_file(other.dir.join("server-cert.pem")));
    let err = Client::connect(&opts).await.unwrap_err();
    assert!(matches!(err, Error::PinMismatch { .. }), "{err}");
    assert!(!err.is_transport());
    // Once, naming the server, its fingerprint and the pin file.
    let chain = error_chain(&err);
    let pin_file = other.dir.join("server-cert.pem");
    assert!(
        chain.starts_with(&format!(
            "the server at 127.0.0.1:{port} presented a certificate with SHA-256 fingerprint "
        )) && chain.contains(&format!("does not match the pin in {}", pin_file.display())),
        "{chain}"
    );
    assert_eq!(chain.matches("presented").count(), 1, "{chain}");

    // A CA that did not sign the server's certificate fails too.
    let opts = ConnectOptions::tcp("127.0.0.1", port, "")
        .with_tls(TlsOptions::ca_file(other.dir.join("ca-cert.pem")));
    let err = Client::connect(&opts).await.unwrap_err();
    assert!(matches!(err, Error::Tls { .. }), "{err}");

    // The right CA but the wrong name fails.
    let opts = ConnectOptions::tcp("127.0.0.1", port, "").with_tls(
        TlsOptions::ca_file(certs.dir.join("ca-cert.pem")).with_server_name("elsewhere.example"),
    );
    assert!(matches!(
        Client::connect(&opts).await.unwrap_err(),
        Error::Tls { .. }
    ));

    // Plaintext to a TLS-only server says TLS is required.
    let err = Client::connect(&ConnectOptions::tcp("127.0.0.1", port, ""))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::TlsRequired { .. }), "{err}");
}

pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
