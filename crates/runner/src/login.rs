//! From a pool's settings to a logged-in XenAPI session.

use cbtvault_config::{PasswordSource, Pool, Transport};
use cbtvault_xenapi::{Client, ClientOptions, Password, TlsTrust, TransportChoice};

use crate::error::{Error, Result};

/// The client options for `pool`: its password (read now, from the file or
/// the environment variable it names), how its certificate is trusted, and
/// the transport. A plain-HTTP address is refused unless the pool allows it.
pub fn client_options(pool: &Pool) -> Result<ClientOptions> {
    let password = match pool.password_source() {
        PasswordSource::File(f) => Password::from_file(&f),
        PasswordSource::Env(v) => Password::from_env(&v),
    }
    .map_err(|source| Error::Password {
        pool: pool.name.clone(),
        source: source.into(),
    })?;
    let mut options =
        ClientOptions::new(&pool.url, pool.username.clone(), password).map_err(|source| {
            Error::PoolUrl {
                pool: pool.name.clone(),
                source: source.into(),
            }
        })?;
    if options.url.scheme() == "http" {
        if !pool.allow_insecure_http {
            return Err(Error::PlainHttp {
                pool: pool.name.clone(),
                url: options.url.to_string(),
            });
        }
        tracing::warn!(url = %pool.url, "XenAPI over plain HTTP: the password and session cross the network in clear");
    }
    let trust = |r: std::result::Result<TlsTrust, cbtvault_xenapi::Error>| {
        r.map_err(|source| Error::Trust {
            pool: pool.name.clone(),
            source: source.into(),
        })
    };
    options.tls = match (&pool.ca, &pool.pin, pool.insecure) {
        (Some(ca), _, _) => Some(trust(TlsTrust::ca_file(ca).map_err(Into::into))?),
        (None, Some(pin), _) => Some(trust(TlsTrust::pinned_file(pin).map_err(Into::into))?),
        (None, None, true) => {
            tracing::warn!(pool = %pool.name, "the pool's certificate is not checked (insecure)");
            Some(TlsTrust::InsecureAcceptAny)
        }
        (None, None, false) => None,
    };
    options.transport = match pool.transport {
        Transport::Auto => TransportChoice::Auto,
        Transport::JsonRpc => TransportChoice::JsonRpc,
        Transport::XmlRpc => TransportChoice::XmlRpc,
    };
    Ok(options)
}

/// Logs in to `pool`.
pub async fn login(pool: &Pool) -> Result<Client> {
    let options = client_options(pool)?;
    let url = options.url.to_string();
    Client::connect(options)
        .await
        .map_err(|source| Error::Login {
            url,
            source: source.into(),
        })
}

/// Logs in to `vcenter` with its password (read now) and trust setting.
pub(crate) async fn vcenter(v: &cbtvault_config::Vcenter) -> Result<cbtvault_vsphere::Client> {
    use cbtvault_vsphere::{ClientOptions, Password, TlsTrust};
    let err = |what: &str| {
        let (vcenter, what) = (v.name.clone(), what.to_string());
        move |e: cbtvault_vsphere::Error| Error::Vcenter {
            vcenter,
            what,
            source: e.into(),
        }
    };
    let password = match v.password_source() {
        PasswordSource::File(f) => Password::from_file(&f),
        PasswordSource::Env(var) => Password::from_env(&var),
    }
    .map_err(|e| err("reading the password")(e.into()))?;
    let mut options =
        ClientOptions::new(&v.url, v.username.clone(), password).map_err(err("the address"))?;
    let trust = |r: std::result::Result<TlsTrust, cbtvault_tls_pin::TrustError>| {
        r.map_err(|e| Error::Vcenter {
            vcenter: v.name.clone(),
            what: "the TLS trust setting".into(),
            source: Box::new(e),
        })
    };
    options.tls = Some(match (&v.ca, &v.pin) {
        (Some(ca), _) => trust(TlsTrust::ca_file(ca))?,
        (None, Some(pin)) => trust(TlsTrust::pinned_file(pin))?,
        (None, None) => {
            tracing::warn!(vcenter = %v.name, "the vCenter's certificate is not checked (insecure)");
            TlsTrust::InsecureAcceptAny
        }
    });
    let url = v.url.clone();
    cbtvault_vsphere::Client::connect(options)
        .await
        .map_err(|source| Error::Login {
            url,
            source: source.into(),
        })
}
