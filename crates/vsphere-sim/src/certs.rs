//! The server's TLS certificate: self-signed, made on first start and
//! kept in the state directory, so clients can pin it across restarts. The
//! same certificate serves HTTPS and (when asked for) NBD over TLS.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{Error, Result};

/// DNS name in the certificate.
pub const SUBJECT: &str = "localhost";

/// The certificate and its key, as PEM.
#[derive(Clone)]
pub struct HostCert {
    /// Certificate PEM (what `the certificate vCenter presents` returns).
    pub cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for HostCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostCert").finish_non_exhaustive()
    }
}

const CERT_FILE: &str = "host-cert.pem";
const KEY_FILE: &str = "host-key.pem";

impl HostCert {
    /// Loads the certificate from `dir`, making one if there is none.
    pub fn load_or_create(dir: &Path) -> Result<Self> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        if cert_path.exists() && key_path.exists() {
            let read = |p: &Path| {
                std::fs::read_to_string(p).map_err(|source| Error::State {
                    path: p.to_owned(),
                    source,
                })
            };
            return Ok(HostCert {
                cert_pem: read(&cert_path)?,
                key_pem: read(&key_path)?,
            });
        }
        let bad = |e: rcgen::Error| Error::Certificate(e.to_string());
        let mut params = rcgen::CertificateParams::new(vec![SUBJECT.to_owned()]).map_err(bad)?;
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "vsphere-sim");
        let key = rcgen::KeyPair::generate().map_err(bad)?;
        let cert = params.self_signed(&key).map_err(bad)?;
        let host = HostCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        let write = |p: &Path, text: &str| {
            std::fs::write(p, text).map_err(|source| Error::State {
                path: p.to_owned(),
                source,
            })
        };
        write(&key_path, &host.key_pem)?;
        restrict(&key_path);
        write(&cert_path, &host.cert_pem)?;
        Ok(host)
    }

    /// A rustls server configuration presenting this certificate.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        let certs = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::Certificate(e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| Error::Certificate(e.to_string()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Certificate(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| Error::Certificate(e.to_string()))?;
        Ok(Arc::new(config))
    }
}

fn restrict(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}
