//! Which HTTPS servers the client trusts.
//!
//! A XenServer host presents a self-signed certificate unless an
//! administrator installed one from a CA, so the usual choice is to
//! **pin** the pool's certificate (`Host.get_server_certificate`, or the
//! file `/etc/xensource/xapi-ssl.pem` on the host): the connection is
//! accepted only if the server presents exactly that certificate, whatever
//! name it carries. A CA bundle checks the chain and the host name the
//! usual way. Accepting any certificate must be asked for explicitly and
//! logs a warning every time a client is built with it.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::error::{Error, Result};

/// How the server's certificate is checked.
#[derive(Clone)]
pub enum TlsTrust {
    /// Accept exactly these certificates (DER), whatever their names.
    Pinned {
        certificates: Vec<CertificateDer<'static>>,
        /// Where they came from (`the pin in FILE`), for mismatch messages.
        origin: String,
    },
    /// Check the chain against these CA certificates and the host name.
    Ca(Vec<CertificateDer<'static>>),
    /// Accept any certificate. Only for tests and labs; logged as a warning.
    InsecureAcceptAny,
}

impl std::fmt::Debug for TlsTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsTrust::Pinned { certificates, .. } => {
                write!(f, "Pinned({} certificate(s))", certificates.len())
            }
            TlsTrust::Ca(c) => write!(f, "Ca({} certificate(s))", c.len()),
            TlsTrust::InsecureAcceptAny => write!(f, "InsecureAcceptAny"),
        }
    }
}

fn certs_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Config(format!("{what}: bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Config(format!(
            "{what}: no certificate in the PEM text"
        )));
    }
    Ok(certs)
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))
}

impl TlsTrust {
    /// Pins the certificate(s) in `pem`.
    pub fn pinned_pem(pem: &str) -> Result<Self> {
        Ok(TlsTrust::Pinned {
            certificates: certs_from_pem(pem.as_bytes(), "pinned certificate")?,
            origin: "the pinned certificate".into(),
        })
    }

    /// Pins the certificate(s) in the PEM file at `path`.
    pub fn pinned_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Ok(TlsTrust::Pinned {
            certificates: certs_from_pem(&read_file(path)?, &path.display().to_string())?,
            origin: format!("the pin in {}", path.display()),
        })
    }

    /// Trusts the CA certificate(s) in `pem`.
    pub fn ca_pem(pem: &str) -> Result<Self> {
        Ok(TlsTrust::Ca(certs_from_pem(pem.as_bytes(), "CA bundle")?))
    }

    /// Trusts the CA certificate(s) in the PEM file at `path`.
    pub fn ca_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Ok(TlsTrust::Ca(certs_from_pem(
            &read_file(path)?,
            &path.display().to_string(),
        )?))
    }

    /// Builds the rustls client configuration.
    pub(crate) fn client_config(&self) -> Result<Arc<rustls::ClientConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("TLS: {e}")))?;
        let config = match self {
            TlsTrust::Ca(cas) => {
                let mut roots = rustls::RootCertStore::empty();
                for ca in cas {
                    roots
                        .add(ca.clone())
                        .map_err(|e| Error::Config(format!("unusable CA certificate: {e}")))?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            TlsTrust::Pinned {
                certificates,
                origin,
            } => builder
                .dangerous()
                .with_custom_certificate_verifier(cbtvault_tls_pin::PinnedVerifier::pinned_from(
                    certificates.clone(),
                    origin.clone(),
                    &provider,
                ))
                .with_no_client_auth(),
            TlsTrust::InsecureAcceptAny => {
                tracing::warn!(
                    "TLS certificate verification is disabled: any server can impersonate the \
                     XenServer pool (use a pinned certificate or a CA instead)"
                );
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(cbtvault_tls_pin::PinnedVerifier::accept_any(
                        &provider,
                    ))
                    .with_no_client_auth()
            }
        };
        Ok(Arc::new(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_pem_is_a_config_error() {
        assert!(matches!(
            TlsTrust::pinned_pem("nope"),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            TlsTrust::ca_file("/nonexistent/ca.pem"),
            Err(Error::Config(_))
        ));
        assert_eq!(
            format!("{:?}", TlsTrust::InsecureAcceptAny),
            "InsecureAcceptAny"
        );
    }
}
