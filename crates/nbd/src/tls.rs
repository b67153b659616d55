//! TLS for both ends, on rustls with the `ring` provider.
//!
//! A client trusts either a CA (the usual web PKI checks: chain, expiry,
//! name) or exactly one pinned server certificate. Pinning is what XenServer
//! offers: `VDI.get_nbd_info` hands out the host's (often self-signed)
//! certificate, so the only sound check is that the server presents that
//! very certificate and proves it holds its key; the handshake signature is
//! still verified against the pinned certificate's public key.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::error::{Error, Result};

/// PEM text, in a file or in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pem {
    File(PathBuf),
    Inline(String),
}

impl Pem {
    fn describe(&self) -> String {
        match self {
            Pem::File(p) => p.display().to_string(),
            Pem::Inline(_) => "inline PEM".to_owned(),
        }
    }

    /// Where a pin came from, for mismatch messages.
    fn pin_origin(&self) -> String {
        match self {
            Pem::File(p) => format!("the pin in {}", p.display()),
            Pem::Inline(_) => "the pinned certificate".to_owned(),
        }
    }

    fn certificates(&self) -> Result<Vec<CertificateDer<'static>>> {
        let iter: Vec<_> = match self {
            Pem::File(p) => CertificateDer::pem_file_iter(p)
                .map_err(|e| pem_error(self, e))?
                .collect(),
            Pem::Inline(s) => CertificateDer::pem_slice_iter(s.as_bytes()).collect(),
        };
        let certs = iter
            .into_iter()
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| pem_error(self, e))?;
        if certs.is_empty() {
            return Err(Error::TlsConfig {
                what: format!("{}: no certificate found", self.describe()),
                source: None,
            });
        }
        Ok(certs)
    }

    fn private_key(&self) -> Result<PrivateKeyDer<'static>> {
        match self {
            Pem::File(p) => PrivateKeyDer::from_pem_file(p),
            Pem::Inline(s) => PrivateKeyDer::from_pem_slice(s.as_bytes()),
        }
        .map_err(|e| pem_error(self, e))
    }
}

fn pem_error(pem: &Pem, e: rustls_pki_types::pem::Error) -> Error {
    Error::TlsConfig {
        what: format!("{}: cannot read PEM", pem.describe()),
        source: Some(Arc::new(e)),
    }
}

/// Whom a client trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsTrust {
    /// Certificates signed by these CA certificates, for the server's name.
    Ca(Pem),
    /// Exactly this server certificate (its end-entity DER), any name.
    Pinned(Pem),
}

/// Client TLS settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsOptions {
    pub trust: TlsTrust,
    /// Name for SNI and CA verification; defaults to the host connected to
    /// (or `localhost` over a unix socket).
    pub server_name: Option<String>,
}

impl TlsOptions {
    /// Trust the CA certificate(s) in a PEM file.
    pub fn ca_file(path: impl Into<PathBuf>) -> Self {
        TlsOptions {
            trust: TlsTrust::Ca(Pem::File(path.into())),
            server_name: None,
        }
    }

    /// Accept only the server certificate in this PEM file.
    pub fn pinned_file(path: impl Into<PathBuf>) -> Self {
        TlsOptions {
            trust: TlsTrust::Pinned(Pem::File(path.into())),
            server_name: None,
        }
    }

    /// Accept only this server certificate (PEM text, as XenServer's
    /// `VDI.get_nbd_info` returns it).
    pub fn pinned_pem(pem: impl Into<String>) -> Self {
        TlsOptions {
            trust: TlsTrust::Pinned(Pem::Inline(pem.into())),
            server_name: None,
        }
    }

    /// Sets the name used for SNI and verification.
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn config_error(what: &str, e: rustls::Error) -> Error {
    Error::TlsConfig {
        what: what.to_owned(),
        source: Some(Arc::new(e)),
    }
}

/// Builds the rustls client configuration.
pub(crate) fn client_config(opts: &TlsOptions) -> Result<Arc<rustls::ClientConfig>> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| config_error("protocol versions", e))?;
    let config = match &opts.trust {
        TlsTrust::Ca(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in pem.certificates()? {
                roots.add(cert).map_err(|e| {
                    config_error(&format!("{}: unusable CA certificate", pem.describe()), e)
                })?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        TlsTrust::Pinned(pem) => {
            let pinned = pem.certificates()?.swap_remove(0);
            builder
                .dangerous()
                .with_custom_certificate_verifier(cbtvault_tls_pin::PinnedVerifier::pinned_from(
                    vec![pinned],
                    pem.pin_origin(),
                    &provider,
                ))
                .with_no_client_auth()
        }
    };
    Ok(Arc::new(config))
}

/// The name to present and verify: the configured one, else the host.
pub(crate) fn server_name(opts: &TlsOptions, host: Option<&str>) -> Result<ServerName<'static>> {
    let name = opts
        .server_name
        .as_deref()
        .or(host)
        .unwrap_or("localhost")
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    ServerName::try_from(name.clone()).map_err(|e| Error::TlsConfig {
        what: format!("{name:?} is not a valid TLS server name"),
        source: Some(Arc::new(e)),
    })
}

/// A server configuration from a PEM certificate chain and private key.
pub fn server_config(cert_chain: &Pem, key: &Pem) -> Result<Arc<rustls::ServerConfig>> {
    let certs = cert_chain.certificates()?;
    let key = key.private_key()?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| config_error("protocol versions", e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| config_error("certificate and key do not form a usable pair", e))?;
    Ok(Arc::new(config))
}
