//! Certificate pinning for rustls clients.
//!
//! XenServer hands out the exact certificate of a host (`VDI.get_nbd_info`,
//! the pool certificate), usually self-signed, so trust means "this
//! certificate, whatever its issuer, name or dates". [`PinnedVerifier`]
//! accepts exactly the pinned end-entity certificates and still verifies
//! the handshake signatures against them, so the server must hold the
//! private key. [`TlsTrust`] says whom a client trusts (a pin, a CA, or,
//! for labs, anyone) and builds the rustls client configuration. The NBD
//! and XenAPI clients share both. [`Password`] is what the XenAPI and
//! vSphere clients log in with: read from a file or an environment
//! variable (never the command line, which every user sees in `ps`), and
//! never printed.
//!
//! # Crates used
//! `rustls` (verifier traits, signature checks) and `rustls-pki-types`
//! (certificates and PEM parsing); nothing else.

mod secret;
mod trust;

pub use secret::{Password, PasswordError};
pub use trust::{Pem, TlsTrust, TrustError};

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::hash::{Hash, HashAlgorithm};
use rustls::crypto::{
    CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature,
};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

/// The error a handshake with an unpinned certificate fails with (inside
/// `rustls::CertificateError::Other`), so callers can tell it apart and say
/// which certificate came and which was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinMismatch {
    /// SHA-256 fingerprint of the certificate the server presented, in
    /// OpenSSL's form (`AB:CD:…`), to compare with `openssl x509 -fingerprint -sha256`.
    pub presented: String,
    /// Fingerprints of the pinned certificates.
    pub pinned: Vec<String>,
    /// Where the pin came from, as a phrase: `the pin in /etc/pool.pem`.
    pub pin: String,
}

impl PinMismatch {
    /// The whole story, naming the server: "the server at HOST presented a
    /// certificate with SHA-256 fingerprint X, which does not match the pin
    /// in FILE (SHA-256 Y)".
    pub fn describe(&self, server: &str) -> String {
        format!(
            "the server at {server} presented a certificate with SHA-256 fingerprint {}, \
             which does not match {} (SHA-256 {}); if the server's certificate was replaced \
             on purpose, check the new one and update the pin",
            self.presented,
            self.pin,
            self.pinned.join(", ")
        )
    }

    /// Finds a pin mismatch in a rustls error, or in an I/O error that
    /// carries one (as TLS streams report handshake failures).
    pub fn find<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a PinMismatch> {
        let rustls_error = match e.downcast_ref::<std::io::Error>() {
            Some(io) => io.get_ref()?.downcast_ref::<rustls::Error>()?,
            None => e.downcast_ref::<rustls::Error>()?,
        };
        match rustls_error {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o)) => {
                o.0.downcast_ref::<PinMismatch>()
            }
            _ => None,
        }
    }
}

impl fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the server presented a certificate with SHA-256 fingerprint {}, which does not match {} (SHA-256 {})",
            self.presented,
            self.pin,
            self.pinned.join(", ")
        )
    }
}

impl std::error::Error for PinMismatch {}

/// Accepts exactly the pinned end-entity certificates (or, built with
/// [`PinnedVerifier::accept_any`], any certificate), checking handshake
/// signatures in every case.
pub struct PinnedVerifier {
    pinned: Option<Vec<CertificateDer<'static>>>,
    /// Where the pin came from, for [`PinMismatch::pin`].
    pin: String,
    sha256: Option<&'static dyn Hash>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for PinnedVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedVerifier")
            .field("pinned", &self.pinned.as_ref().map(Vec::len))
            .field("pin", &self.pin)
            .finish_non_exhaustive()
    }
}

impl PinnedVerifier {
    /// Trusts exactly `certificates`.
    pub fn new(certificates: Vec<CertificateDer<'static>>, provider: &CryptoProvider) -> Arc<Self> {
        Self::pinned_from(certificates, "the pinned certificate", provider)
    }

    /// Trusts exactly `certificates`, which came from where `pin` says
    /// (`the pin in /etc/pool.pem`): mismatches name it.
    pub fn pinned_from(
        certificates: Vec<CertificateDer<'static>>,
        pin: impl Into<String>,
        provider: &CryptoProvider,
    ) -> Arc<Self> {
        Arc::new(PinnedVerifier {
            pinned: Some(certificates),
            pin: pin.into(),
            sha256: sha256(provider),
            algorithms: provider.signature_verification_algorithms,
        })
    }

    /// Trusts any certificate: for labs only; callers log a warning.
    pub fn accept_any(provider: &CryptoProvider) -> Arc<Self> {
        Arc::new(PinnedVerifier {
            pinned: None,
            pin: String::new(),
            sha256: sha256(provider),
            algorithms: provider.signature_verification_algorithms,
        })
    }

    fn fingerprint(&self, der: &[u8]) -> String {
        match self.sha256 {
            Some(h) => fingerprint_with(h, der),
            None => "(unknown: the TLS provider has no SHA-256)".into(),
        }
    }
}

/// The provider's SHA-256, taken from a TLS 1.3 suite that uses it (every
/// provider has one: TLS_AES_128_GCM_SHA256 is mandatory).
fn sha256(provider: &CryptoProvider) -> Option<&'static dyn Hash> {
    provider
        .cipher_suites
        .iter()
        .filter_map(|s| s.tls13())
        .map(|s| s.common.hash_provider)
        .find(|h| h.algorithm() == HashAlgorithm::SHA256)
}

fn fingerprint_with(h: &dyn Hash, der: &[u8]) -> String {
    let digest = h.hash(der);
    let hex: Vec<String> = digest.as_ref().iter().map(|b| format!("{b:02X}")).collect();
    hex.join(":")
}

/// The SHA-256 fingerprint of a DER certificate in OpenSSL's form
/// (`AB:CD:…`), computed with `provider`; `None` if it lacks SHA-256.
pub fn fingerprint(der: &[u8], provider: &CryptoProvider) -> Option<String> {
    sha256(provider).map(|h| fingerprint_with(h, der))
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.pinned {
            None => Ok(ServerCertVerified::assertion()),
            Some(pinned) if pinned.iter().any(|p| p.as_ref() == end_entity.as_ref()) => {
                Ok(ServerCertVerified::assertion())
            }
            Some(pinned) => {
                let mismatch = PinMismatch {
                    presented: self.fingerprint(end_entity.as_ref()),
                    pinned: pinned
                        .iter()
                        .map(|p| self.fingerprint(p.as_ref()))
                        .collect(),
                    pin: self.pin.clone(),
                };
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Other(rustls::OtherError(Arc::new(mismatch))),
                ))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verify(v: &PinnedVerifier, der: &[u8]) -> Result<ServerCertVerified, rustls::Error> {
        v.verify_server_cert(
            &CertificateDer::from(der.to_vec()),
            &[],
            &ServerName::try_from("pool.example").unwrap(),
            &[],
            UnixTime::now(),
        )
    }

    #[test]
    fn a_mismatch_names_both_fingerprints_and_the_pin() {
        let provider = rustls::crypto::ring::default_provider();
        // The verifier compares bytes; any bytes stand in for a certificate.
        let v = PinnedVerifier::pinned_from(
            vec![CertificateDer::from(b"abc".to_vec())],
            "the pin in /etc/pool.pem",
            &provider,
        );
        assert!(verify(&v, b"abc").is_ok());
        let err = verify(&v, b"other").unwrap_err();
        let m = PinMismatch::find(&err).expect("a pin mismatch").clone();
        // SHA-256("abc"), as `openssl x509 -fingerprint -sha256` prints it.
        assert_eq!(
            m.pinned,
            [
                "BA:78:16:BF:8F:01:CF:EA:41:41:40:DE:5D:AE:22:23:B0:03:61:A3:96:17:7A:9C:B4:10:FF:61:F2:00:15:AD"
            ]
        );
        assert_eq!(m.presented.len(), 32 * 3 - 1);
        let text = m.describe("pool.example:443");
        assert!(
            text.starts_with(&format!(
                "the server at pool.example:443 presented a certificate with SHA-256 fingerprint {}, which does not match the pin in /etc/pool.pem",
                m.presented
            )),
            "{text}"
        );
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, err);
        assert_eq!(PinMismatch::find(&io), Some(&m));
        assert!(PinMismatch::find(&std::io::Error::other("x")).is_none());
    }

    #[test]
    fn accept_any_accepts_anything() {
        let v = PinnedVerifier::accept_any(&rustls::crypto::ring::default_provider());
        assert!(verify(&v, b"whatever").is_ok());
    }
}
