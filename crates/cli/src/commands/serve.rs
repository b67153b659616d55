//! `cbtvault serve`: a restore point over NBD.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use cbtvault_engine::serve::RestorePointExport;
use cbtvault_nbd::server::{Server, ServerConfig};
use tokio_util::sync::CancellationToken;

use crate::cli::Global;
use crate::output;

pub fn serve(
    g: &Global,
    repo: &Path,
    id: &str,
    listen: &str,
    tls: Option<(PathBuf, PathBuf)>,
) -> Result<ExitCode> {
    let repo = super::open(repo)?;
    let rp = repo.resolve(id)?;
    // Held for as long as we serve: gc must not delete what clients read.
    let _lock = repo.lock_shared()?;
    let mut config = ServerConfig::default();
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
        let stop = cancel.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            stop.cancel();
        });
        if !g.quiet {
            eprintln!(
                "serving restore point {} of disk {:?} ({}) on {listen} as export {:?} and the default export; ctrl-c stops",
                output::short(&rp.id),
                rp.manifest.disk,
                output::bytes(rp.manifest.virtual_size),
                rp.id
            );
        }
        match listen.strip_prefix("unix:") {
            Some(path) => {
                let listener = tokio::net::UnixListener::bind(path).with_context(|| format!("listening on {listen}"))?;
                server.serve_unix(listener, cancel).await?;
            }
            None => {
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("listening on {listen}"))?;
                server.serve_tcp(listener, cancel).await?;
            }
        }
        anyhow::Ok(())
    })
    .with_context(|| format!("serving on {listen}"))?;
    Ok(ExitCode::SUCCESS)
}
