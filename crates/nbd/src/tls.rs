//! TLS for both ends, on rustls with the `ring` provider.
//!
//! A client trusts either a CA (the usual web PKI checks: chain, expiry,
//! name) or exactly the pinned server certificate(s) ([`TlsTrust`], shared
//! with the XenAPI client through `cbtvault-tls-pin`). Pinning is what XenServer
//! offers: `VDI.get_nbd_info` hands out the host's (often self-signed)
//! certificate, so the only sound check is that the server presents that
//! very certificate and proves it holds its key; the handshake signature is
//! still verified against the pinned certificate's public key.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls_pki_types::ServerName;

pub use cbtvault_tls_pin::{Pem, TlsTrust, TrustError};

use crate::error::{Error, Result};

impl From<TrustError> for Error {
    fn from(e: TrustError) -> Error {
        Error::TlsConfig {
            what: e.what,
            source: e.source.map(Arc::from),
        }
    }
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
    if opts.trust == TlsTrust::InsecureAcceptAny {
        tracing::warn!(
            "TLS certificate verification is disabled: any server can impersonate the NBD server (pin its certificate or use a CA instead)"
        );
    }
    Ok(Arc::new(opts.trust.client_config(provider())?))
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
