//! One function per subcommand.

mod data;
mod jobs;
mod maintenance;
mod serve;

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use cbtvault_repo::Repository;

use crate::cli::{Args, Command};

pub fn run(args: Args) -> Result<ExitCode> {
    let g = args.global;
    match args.command {
        Command::Init {
            repo,
            compression_level,
            pack_size_mib,
        } => maintenance::init(&g, &repo.repo, compression_level, pack_size_mib),
        Command::Backup(b) => data::backup(&g, *b),
        Command::List { repo, disk } => maintenance::list(&g, &repo.repo, disk.as_deref()),
        Command::Show { repo, id } => maintenance::show(&g, &repo.repo, &id),
        Command::Restore {
            repo,
            id,
            to,
            force,
            target_is_zero,
            workers,
            login,
            sr,
        } => {
            if to == "xapi" {
                jobs::restore_to_xapi(&g, &repo.repo, &id, &login, sr.as_deref())
            } else {
                data::restore(&g, &repo.repo, &id, &to, force, target_is_zero, workers)
            }
        }
        Command::Serve {
            repo,
            id,
            listen,
            tls_cert,
            tls_key,
        } => serve::serve(&g, &repo.repo, &id, &listen, tls_cert.zip(tls_key)),
        Command::Diff { repo, a, b } => maintenance::diff(&g, &repo.repo, &a, &b),
        Command::Verify { repo, read_data } => maintenance::verify(&g, &repo.repo, read_data),
        Command::Forget(f) => maintenance::forget(&g, f),
        Command::Gc {
            repo,
            wait,
            dry_run,
        } => maintenance::gc(&g, &repo.repo, wait, dry_run),
        Command::Repair { repo, wait } => maintenance::repair(&g, &repo.repo, wait),
        Command::Demo {
            dir,
            vms,
            disk_size_mib,
            nights,
            churn,
        } => crate::demo::run(
            &g,
            dir.as_deref(),
            crate::demo::DemoSpec {
                vms,
                disk_mib: disk_size_mib,
                nights,
                churn,
            },
        ),
    }
}

/// Opens the repository at `path` with a message that names it.
pub fn open(path: &Path) -> Result<Arc<Repository>> {
    // The repository's own errors name the path.
    Ok(Arc::new(
        Repository::open(path).context("opening the repository")?,
    ))
}

/// A tokio runtime for the network-facing parts.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("cbtvault-io")
        .build()
        .context("starting the async runtime")
}
