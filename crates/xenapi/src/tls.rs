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
//!
//! [`TlsTrust`] is `cbtvault-tls-pin`'s, shared with the NBD client.

use std::sync::Arc;

pub use cbtvault_tls_pin::{TlsTrust, TrustError};

use crate::error::{Error, Result};

impl From<TrustError> for Error {
    fn from(e: TrustError) -> Error {
        Error::Config(match &e.source {
            Some(cause) => format!("{}: {cause}", e.what),
            None => e.what,
        })
    }
}

/// Builds the rustls client configuration for `trust`.
pub(crate) fn client_config(trust: &TlsTrust) -> Result<Arc<rustls::ClientConfig>> {
    if *trust == TlsTrust::InsecureAcceptAny {
        tracing::warn!(
            "TLS certificate verification is disabled: any server can impersonate the \
             XenServer pool (use a pinned certificate or a CA instead)"
        );
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(Arc::new(trust.client_config(provider)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_pem_is_a_config_error() {
        let e: Error = TlsTrust::pinned_pem("nope").unwrap_err().into();
        assert!(matches!(e, Error::Config(_)));
        let e: Error = TlsTrust::ca_file("/nonexistent/ca.pem").unwrap_err().into();
        assert!(
            matches!(&e, Error::Config(m) if m.contains("/nonexistent/ca.pem")),
            "{e}"
        );
        assert_eq!(
            format!("{:?}", TlsTrust::InsecureAcceptAny),
            "InsecureAcceptAny"
        );
    }
}
