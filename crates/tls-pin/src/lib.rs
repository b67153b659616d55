//! Certificate pinning for rustls clients.
//!
//! XenServer hands out the exact certificate of a host (`VDI.get_nbd_info`,
//! the pool certificate), usually self-signed, so trust means "this
//! certificate, whatever its issuer, name or dates". [`PinnedVerifier`]
//! accepts exactly the pinned end-entity certificates and still verifies
//! the handshake signatures against them, so the server must hold the
//! private key. The NBD and XenAPI clients share it; it depends only on
//! rustls.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{
    CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature,
};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

/// The error a handshake with an unpinned certificate fails with (inside
/// `rustls::CertificateError::Other`), so callers can tell it apart.
#[derive(Debug)]
pub struct PinMismatch;

impl fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the server's certificate is not the pinned certificate")
    }
}

impl std::error::Error for PinMismatch {}

/// Accepts exactly the pinned end-entity certificates (or, built with
/// [`PinnedVerifier::accept_any`], any certificate), checking handshake
/// signatures in every case.
pub struct PinnedVerifier {
    pinned: Option<Vec<CertificateDer<'static>>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for PinnedVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedVerifier")
            .field("pinned", &self.pinned.as_ref().map(Vec::len))
            .finish_non_exhaustive()
    }
}

impl PinnedVerifier {
    /// Trusts exactly `certificates`.
    pub fn new(certificates: Vec<CertificateDer<'static>>, provider: &CryptoProvider) -> Arc<Self> {
        Arc::new(PinnedVerifier {
            pinned: Some(certificates),
            algorithms: provider.signature_verification_algorithms,
        })
    }

    /// Trusts any certificate: for labs only; callers log a warning.
    pub fn accept_any(provider: &CryptoProvider) -> Arc<Self> {
        Arc::new(PinnedVerifier {
            pinned: None,
            algorithms: provider.signature_verification_algorithms,
        })
    }
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
            Some(_) => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(PinMismatch))),
            )),
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
