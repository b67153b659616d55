//! Whom a client trusts: one type for the NBD and XenAPI clients.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::PinnedVerifier;

/// PEM text, in a file or in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pem {
    File(PathBuf),
    Inline(String),
}

/// PEM that cannot be used, or a TLS configuration rustls refuses.
#[derive(Debug)]
pub struct TrustError {
    /// What could not be used, and where it came from.
    pub what: String,
    pub source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl fmt::Display for TrustError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.what)
    }
}

impl std::error::Error for TrustError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl Pem {
    /// Where the text is, for messages.
    pub fn describe(&self) -> String {
        match self {
            Pem::File(p) => p.display().to_string(),
            Pem::Inline(_) => "inline PEM".to_owned(),
        }
    }

    /// Where a pin came from, for mismatch messages.
    pub fn pin_origin(&self) -> String {
        match self {
            Pem::File(p) => format!("the pin in {}", p.display()),
            Pem::Inline(_) => "the pinned certificate".to_owned(),
        }
    }

    fn error(&self, e: rustls_pki_types::pem::Error) -> TrustError {
        TrustError {
            what: format!("{}: cannot read PEM", self.describe()),
            source: Some(Box::new(e)),
        }
    }

    /// The certificates in the text (at least one).
    pub fn certificates(&self) -> Result<Vec<CertificateDer<'static>>, TrustError> {
        let iter: Vec<_> = match self {
            Pem::File(p) => CertificateDer::pem_file_iter(p)
                .map_err(|e| self.error(e))?
                .collect(),
            Pem::Inline(s) => CertificateDer::pem_slice_iter(s.as_bytes()).collect(),
        };
        let certs = iter
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.error(e))?;
        if certs.is_empty() {
            return Err(TrustError {
                what: format!("{}: no certificate found", self.describe()),
                source: None,
            });
        }
        Ok(certs)
    }

    /// The private key in the text.
    pub fn private_key(&self) -> Result<PrivateKeyDer<'static>, TrustError> {
        match self {
            Pem::File(p) => PrivateKeyDer::from_pem_file(p),
            Pem::Inline(s) => PrivateKeyDer::from_pem_slice(s.as_bytes()),
        }
        .map_err(|e| self.error(e))
    }
}

/// How a server's certificate is checked.
///
/// A hypervisor usually presents a self-signed certificate, so the usual
/// choice is to **pin** it (XenServer's pool certificate, or the one
/// `VDI.get_nbd_info` hands out): the connection is accepted only if the
/// server presents one of exactly those certificates, whatever name it
/// carries, and proves it holds the key. A CA bundle checks the chain and
/// the host name the usual way. Accepting any certificate must be asked
/// for explicitly; clients log a warning when they use it.
#[derive(Clone, PartialEq, Eq)]
pub enum TlsTrust {
    /// Check the chain against the CA certificate(s) and the host name.
    Ca(Pem),
    /// Accept exactly the certificate(s) in this PEM, whatever their names.
    Pinned(Pem),
    /// Accept any certificate. Only for tests and labs.
    InsecureAcceptAny,
}

impl fmt::Debug for TlsTrust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsTrust::Ca(p) => write!(f, "Ca({})", p.describe()),
            TlsTrust::Pinned(p) => write!(f, "Pinned({})", p.describe()),
            TlsTrust::InsecureAcceptAny => write!(f, "InsecureAcceptAny"),
        }
    }
}

impl TlsTrust {
    /// Pins the certificate(s) in `pem`, checked now.
    pub fn pinned_pem(pem: impl Into<String>) -> Result<Self, TrustError> {
        Self::checked(TlsTrust::Pinned(Pem::Inline(pem.into())))
    }

    /// Pins the certificate(s) in the PEM file at `path`, checked now.
    pub fn pinned_file(path: impl AsRef<Path>) -> Result<Self, TrustError> {
        Self::checked(TlsTrust::Pinned(Pem::File(path.as_ref().into())))
    }

    /// Trusts the CA certificate(s) in `pem`, checked now.
    pub fn ca_pem(pem: impl Into<String>) -> Result<Self, TrustError> {
        Self::checked(TlsTrust::Ca(Pem::Inline(pem.into())))
    }

    /// Trusts the CA certificate(s) in the PEM file at `path`, checked now.
    pub fn ca_file(path: impl AsRef<Path>) -> Result<Self, TrustError> {
        Self::checked(TlsTrust::Ca(Pem::File(path.as_ref().into())))
    }

    fn checked(self) -> Result<Self, TrustError> {
        if let TlsTrust::Ca(p) | TlsTrust::Pinned(p) = &self {
            p.certificates()?;
        }
        Ok(self)
    }

    /// The rustls client configuration (without client authentication).
    /// The caller logs a warning for [`TlsTrust::InsecureAcceptAny`].
    pub fn client_config(
        &self,
        provider: Arc<CryptoProvider>,
    ) -> Result<rustls::ClientConfig, TrustError> {
        let rustls_error = |what: String| {
            move |e: rustls::Error| TrustError {
                what,
                source: Some(Box::new(e)),
            }
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(rustls_error("TLS protocol versions".into()))?;
        Ok(match self {
            TlsTrust::Ca(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in pem.certificates()? {
                    roots.add(cert).map_err(rustls_error(format!(
                        "{}: unusable CA certificate",
                        pem.describe()
                    )))?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            TlsTrust::Pinned(pem) => builder
                .dangerous()
                .with_custom_certificate_verifier(PinnedVerifier::pinned_from(
                    pem.certificates()?,
                    pem.pin_origin(),
                    &provider,
                ))
                .with_no_client_auth(),
            TlsTrust::InsecureAcceptAny => builder
                .dangerous()
                .with_custom_certificate_verifier(PinnedVerifier::accept_any(&provider))
                .with_no_client_auth(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_pem_is_refused_at_once_with_where_it_came_from() {
        let e = TlsTrust::pinned_pem("nope").unwrap_err();
        assert!(e.what.contains("inline PEM"), "{e}");
        let e = TlsTrust::ca_file("/nonexistent/ca.pem").unwrap_err();
        assert!(e.what.contains("/nonexistent/ca.pem"), "{e}");
        assert_eq!(
            format!("{:?}", TlsTrust::InsecureAcceptAny),
            "InsecureAcceptAny"
        );
        assert_eq!(
            format!("{:?}", TlsTrust::Pinned(Pem::Inline("secret-ish".into()))),
            "Pinned(inline PEM)"
        );
    }
}
