//! NBD URIs, as libnbd and QEMU write them:
//!
//! | form | meaning |
//! |---|---|
//! | `nbd://host[:port]/export` | TCP, default port 10809 |
//! | `nbds://host[:port]/export` | TCP with TLS |
//! | `nbd+unix:///export?socket=PATH` | unix socket |
//! | `nbds+unix:///export?socket=PATH` | unix socket with TLS |
//!
//! Query options: `socket=PATH`, `tls-certificates=DIR` (trust
//! `DIR/ca-cert.pem`, the layout libnbd and QEMU use), `tls-hostname=NAME`
//! (the name to verify), and our own `tls-pin=FILE` (accept exactly the
//! server certificate in FILE). The export is the path without its leading
//! `/`, percent-decoded. Unknown query options are refused so a typo does
//! not silently weaken security.

use std::path::PathBuf;

use url::{Host, Url};

use crate::error::{Error, Result};
use crate::options::{Address, ConnectOptions};
use crate::tls::TlsOptions;

/// The IANA port for NBD.
pub const DEFAULT_PORT: u16 = 10809;

impl ConnectOptions {
    /// Parses an `nbd://`, `nbds://`, `nbd+unix://` or `nbds+unix://` URI.
    pub fn from_uri(uri: &str) -> Result<ConnectOptions> {
        let bad = |what: &str| Error::Uri {
            uri: uri.to_owned(),
            what: what.to_owned(),
        };
        let url = Url::parse(uri).map_err(|e| bad(&e.to_string()))?;
        let (tls, unix) = match url.scheme() {
            "nbd" => (false, false),
            "nbds" => (true, false),
            "nbd+unix" => (false, true),
            "nbds+unix" => (true, true),
            other => {
                return Err(bad(&format!(
                    "scheme {other:?} is not nbd, nbds, nbd+unix or nbds+unix"
                )));
            }
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad("user names and passwords are not supported"));
        }
        if url.fragment().is_some() {
            return Err(bad("a fragment (#...) is not allowed"));
        }
        let path = url.path();
        let export = percent_decode(path.strip_prefix('/').unwrap_or(path))
            .ok_or_else(|| bad("the export name is not valid percent-encoded UTF-8"))?;

        let mut socket = None;
        let mut cert_dir = None;
        let mut pin = None;
        let mut hostname = None;
        for (key, value) in url.query_pairs() {
            let slot = match key.as_ref() {
                "socket" => &mut socket,
                "tls-certificates" => &mut cert_dir,
                "tls-pin" => &mut pin,
                "tls-hostname" => &mut hostname,
                other => return Err(bad(&format!("unknown query option {other:?}"))),
            };
            if slot.replace(value.into_owned()).is_some() {
                return Err(bad(&format!("query option {key:?} given twice")));
            }
        }

        let address = if unix {
            if url.host_str().is_some_and(|h| !h.is_empty()) || url.port().is_some() {
                return Err(bad("a unix-socket URI has no host or port"));
            }
            let socket = socket.ok_or_else(|| bad("a unix-socket URI needs ?socket=PATH"))?;
            Address::Unix(PathBuf::from(socket))
        } else {
            if socket.is_some() {
                return Err(bad("socket= is only for nbd+unix:// and nbds+unix://"));
            }
            let host = match url.host() {
                Some(Host::Domain(d)) if !d.is_empty() => d.to_owned(),
                Some(Host::Ipv4(a)) => a.to_string(),
                Some(Host::Ipv6(a)) => a.to_string(),
                _ => return Err(bad("no host")),
            };
            Address::Tcp {
                host,
                port: url.port().unwrap_or(DEFAULT_PORT),
            }
        };

        let tls = match (tls, cert_dir, pin) {
            (false, None, None) if hostname.is_none() => None,
            (false, ..) => {
                return Err(bad(
                    "TLS options need a TLS scheme (nbds:// or nbds+unix://)",
                ));
            }
            (true, Some(_), Some(_)) => {
                return Err(bad("give either tls-certificates= or tls-pin=, not both"));
            }
            (true, Some(dir), None) => {
                Some(TlsOptions::ca_file(PathBuf::from(dir).join("ca-cert.pem")))
            }
            (true, None, Some(file)) => Some(TlsOptions::pinned_file(file)),
            (true, None, None) => {
                return Err(bad(
                    "a TLS URI needs tls-certificates=DIR (with ca-cert.pem) or tls-pin=FILE",
                ));
            }
        };
        let tls = tls.map(|t| match hostname {
            Some(h) => t.with_server_name(h),
            None => t,
        });

        let mut opts = ConnectOptions::new(address, export);
        opts.tls = tls;
        Ok(opts)
    }
}

/// Decodes `%XX` escapes; `None` on a malformed escape or invalid UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{Pem, TlsTrust};

    fn tcp(host: &str, port: u16) -> Address {
        Address::Tcp {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn plain_tcp() {
        let o = ConnectOptions::from_uri("nbd://example.com/disk0").unwrap();
        assert_eq!(o.address, tcp("example.com", DEFAULT_PORT));
        assert_eq!(o.export, "disk0");
        assert!(o.tls.is_none());
        let o = ConnectOptions::from_uri("nbd://127.0.0.1:10900").unwrap();
        assert_eq!(o.address, tcp("127.0.0.1", 10900));
        assert_eq!(o.export, "");
        let o = ConnectOptions::from_uri("nbd://[::1]:5000/a%20b%2Fc").unwrap();
        assert_eq!(o.address, tcp("::1", 5000));
        assert_eq!(o.export, "a b/c");
    }

    #[test]
    fn unix_sockets() {
        let o = ConnectOptions::from_uri("nbd+unix:///exp?socket=/tmp/s.sock").unwrap();
        assert_eq!(o.address, Address::Unix("/tmp/s.sock".into()));
        assert_eq!(o.export, "exp");
        let o = ConnectOptions::from_uri("nbd+unix://?socket=/tmp/x").unwrap();
        assert_eq!(o.export, "");
        assert!(ConnectOptions::from_uri("nbd+unix:///exp").is_err());
        assert!(ConnectOptions::from_uri("nbd+unix://host/exp?socket=/x").is_err());
        assert!(ConnectOptions::from_uri("nbd://host/exp?socket=/x").is_err());
    }

    #[test]
    fn tls_options() {
        let o = ConnectOptions::from_uri("nbds://h:1/e?tls-certificates=/etc/pki/qemu").unwrap();
        let t = o.tls.unwrap();
        assert_eq!(
            t.trust,
            TlsTrust::Ca(Pem::File("/etc/pki/qemu/ca-cert.pem".into()))
        );
        assert_eq!(t.server_name, None);
        let o = ConnectOptions::from_uri(
            "nbds+unix:///e?socket=/s&tls-pin=/certs/host.pem&tls-hostname=xen1",
        )
        .unwrap();
        let t = o.tls.unwrap();
        assert_eq!(
            t.trust,
            TlsTrust::Pinned(Pem::File("/certs/host.pem".into()))
        );
        assert_eq!(t.server_name.as_deref(), Some("xen1"));
    }

    #[test]
    fn rejected() {
        for uri in [
            "http://h/e",
            "nbds://h/e",
            "nbd://h/e?tls-pin=/x",
            "nbds://h/e?tls-pin=/x&tls-certificates=/d",
            "nbd://h/e?bogus=1",
            "nbd://h/e?socket=/a&socket=/b",
            "nbd://user:pw@h/e",
            "nbd:///e",
            "nbd://h/%zz",
            "nbd://h/e#frag",
            "not a uri",
        ] {
            let e = ConnectOptions::from_uri(uri).unwrap_err();
            assert!(matches!(e, Error::Uri { .. }), "{uri}: {e}");
        }
    }

    #[test]
    fn percent() {
        assert_eq!(percent_decode("a%41b").as_deref(), Some("aAb"));
        assert_eq!(percent_decode("%"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%ff"), None);
    }
}
