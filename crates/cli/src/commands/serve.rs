//! `cbtvault serve`: a restore point over NBD.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use cbtvault_engine::serve::RestorePointExport;
use cbtvault_nbd::server::{Server, ServerConfig};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::cli::{Global, ServeLimits};
use crate::failure;
use crate::output::{self, errln};

/// Where the server listens, once bound.
enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, SocketFile),
}

pub fn serve(
    g: &Global,
    repo: &Path,
    id: &str,
    listen: &str,
    tls: Option<(PathBuf, PathBuf)>,
    limits: ServeLimits,
) -> Result<ExitCode> {
    let repo = super::open(repo)?;
    let rp = super::resolve(&repo, id)?;
    // Held for as long as we serve: gc must not delete what clients read.
    let _lock = repo.lock_shared()?;
    let mut config = ServerConfig::default();
    config.max_connections = limits.max_connections as usize;
    config.max_connections_per_peer = limits.max_connections_per_peer as usize;
    config.idle_timeout =
        (limits.idle_timeout > 0).then(|| Duration::from_secs(limits.idle_timeout));
    if let Some((cert, key)) = &tls {
        let cert_pem = cbtvault_nbd::Pem::File(cert.clone());
        let key_pem = cbtvault_nbd::Pem::File(key.clone());
        let tls = cbtvault_nbd::tls::server_config(&cert_pem, &key_pem)
            .context("loading the TLS certificate and key")?;
        config = config.with_tls(tls, true);
    }
    let server = Server::new(config);
    let export = Arc::new(RestorePointExport::new(repo.clone(), &rp));
    server.add_export(rp.id.clone(), export);
    server.set_default_export(rp.id.clone());
    let rt = super::runtime()?;
    let cancel = CancellationToken::new();
    rt.block_on(async {
        // Bound before anything is announced: a failed bind prints only
        // its error.
        let (listener, address) = bind(listen).await?;
        if let Listener::Tcp(l) = &listener
            && tls.is_none()
            && let Ok(addr) = l.local_addr()
            && !addr.ip().is_loopback()
        {
            warn_cleartext(&addr.to_string());
        }
        let stop = cancel.clone();
        tokio::spawn(async move {
            stopped().await;
            stop.cancel();
        });
        if g.json {
            output::print_json(&json!({
                "restore_point": rp.id, "disk": rp.manifest.disk, "listen": address,
                "export": rp.id, "tls": tls.is_some(),
            }));
        } else if !g.quiet {
            errln!(
                "serving restore point {} of disk {:?} ({}) on {address}{} as export {:?} and the default export; ctrl-c stops",
                output::short(&rp.id),
                rp.manifest.disk,
                output::bytes(rp.manifest.virtual_size),
                if tls.is_some() { " with TLS" } else { "" },
                rp.id
            );
        }
        match listener {
            Listener::Tcp(l) => server.serve_tcp(l, cancel).await,
            // The socket file goes when `_file` drops, after the last client.
            Listener::Unix(l, _file) => server.serve_unix(l, cancel).await,
        }
        .with_context(|| format!("serving on {address}"))
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Binds `listen` (`HOST:PORT` or `unix:PATH`); returns the listener and
/// the address it is bound to (the real port when 0 was asked for).
async fn bind(listen: &str) -> Result<(Listener, String)> {
    match listen.strip_prefix("unix:") {
        Some(path) => {
            let path = Path::new(path);
            let file = SocketFile::claim(path)?;
            let listener = tokio::net::UnixListener::bind(path)
                .with_context(|| format!("listening on {listen}"))?;
            let file = file.bound()?;
            Ok((Listener::Unix(listener, file), listen.to_string()))
        }
        None => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("listening on {listen}"))?;
            let address = listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| listen.to_string());
            Ok((Listener::Tcp(listener), address))
        }
    }
}

/// Says, on stderr and in the log, that anyone who can reach `address`
/// reads the disk. Printed even with --quiet: it is about the data.
fn warn_cleartext(address: &str) {
    errln!(
        "cbtvault: WARNING: serving without TLS on {address}, which other hosts can reach: \
         anyone who can connect reads this disk, and its data crosses the network in clear. \
         Give --tls-cert and --tls-key, or listen on 127.0.0.1 or a unix: socket."
    );
    tracing::warn!(%address, "serving a restore point without TLS on a non-loopback address");
}

/// Resolves on ctrl-c (SIGINT) or SIGTERM.
async fn stopped() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch for SIGTERM; only ctrl-c stops the server");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The socket file of a unix listener: a stale one (nothing listening) is
/// removed before binding, and ours is removed when the server stops.
struct SocketFile {
    path: PathBuf,
    /// Device and inode of the socket we bound, so that we remove only it.
    id: Option<(u64, u64)>,
}

impl SocketFile {
    /// Makes room for a socket at `path`: nothing there, or a socket no
    /// process listens on any more (left by a killed server), which is
    /// removed. A live socket or any other file is left alone.
    fn claim(path: &Path) -> Result<SocketFile> {
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(failure::usage_error(format!(
                    "{} exists and is not a socket; give another path to listen on",
                    path.display()
                )));
            }
            Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(failure::tagged(
                        failure::kind::LOCKED,
                        format!(
                            "another server is listening on {}; stop it or give another path",
                            path.display()
                        ),
                    ));
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    tracing::info!(path = %path.display(), "removing a stale socket");
                    std::fs::remove_file(path)
                        .with_context(|| format!("removing stale socket {}", path.display()))?;
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("checking socket {}", path.display()));
                }
            },
        }
        Ok(SocketFile {
            path: path.to_path_buf(),
            id: None,
        })
    }

    /// Records the socket just bound at the path.
    fn bound(mut self) -> Result<SocketFile> {
        let meta = std::fs::symlink_metadata(&self.path)
            .with_context(|| format!("checking {}", self.path.display()))?;
        self.id = Some((meta.dev(), meta.ino()));
        Ok(self)
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        // Only the socket we bound: another server may have replaced it.
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| Some((m.dev(), m.ino())) == self.id);
        if ours && let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the socket");
        }
    }
}
