//! One function per subcommand.

mod copy;
mod daemon;
mod data;
mod files;
mod jobs;
mod keys;
mod maintenance;
mod points;
mod restore_vm;
mod restore_vm_qemu;
mod serve;

pub use points::local_time;

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use cbtvault_repo::{Repository, RestorePointRow};

use crate::cli::{Args, Command};
use crate::failure;

pub fn run(args: Args) -> Result<ExitCode> {
    let g = args.global;
    keys::set_sources(args.keys);
    match args.command {
        Command::Init {
            repo,
            compression_level,
            pack_size_mib,
            append_only,
            encrypt,
        } => maintenance::init(
            &g,
            &repo.repo,
            compression_level,
            pack_size_mib,
            append_only,
            encrypt,
        ),
        Command::Key(command) => keys::key(&g, command),
        Command::Backup(b) => data::backup(&g, *b),
        Command::RestoreVm(args) => restore_vm::restore_vm(&g, &args),
        Command::List {
            repo,
            disk,
            vm,
            since,
            until,
        } => points::list(
            &g,
            &repo.repo,
            points::ListFilter {
                disk: disk.as_deref(),
                vm: vm.as_deref(),
                since: since.as_deref(),
                until: until.as_deref(),
            },
        ),
        Command::Show { repo, id } => maintenance::show(&g, &repo.repo, &id),
        Command::Restore(args) => {
            let crate::cli::RestoreArgs {
                repo,
                id,
                to,
                force,
                target_is_zero,
                only_changed,
                target_state,
                target_changed_blocks,
                workers,
                login,
                sr,
                vdi,
                config,
                pool,
            } = *args;
            if only_changed && to == "xapi" {
                let Some(vdi) = vdi else {
                    anyhow::bail!(crate::failure::usage!(
                        "--only-changed --to xapi rolls back an existing VDI: name it with --vdi UUID"
                    ));
                };
                if target_changed_blocks.is_some() {
                    anyhow::bail!(crate::failure::usage!(
                        "--target-changed-blocks is for files and NBD exports; a VDI's changed blocks come from its CBT"
                    ));
                }
                let choice = jobs::PoolChoice {
                    login: &login,
                    config: config.as_ref(),
                    pool: pool.as_deref(),
                };
                jobs::rollback_xapi(&g, &repo.repo, &id, choice, &vdi, target_state.as_deref())
            } else if only_changed {
                let state = data::KnownState {
                    restore_point: target_state.as_deref(),
                    changed_blocks: target_changed_blocks.as_deref(),
                };
                data::rollback(&g, &repo.repo, &id, &to, state, workers)
            } else if to == "xapi" {
                let choice = jobs::PoolChoice {
                    login: &login,
                    config: config.as_ref(),
                    pool: pool.as_deref(),
                };
                jobs::restore_to_xapi(&g, &repo.repo, &id, choice, sr.as_deref())
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
            limits,
        } => serve::serve(&g, &repo.repo, &id, &listen, tls_cert.zip(tls_key), limits),
        Command::Files(crate::cli::FilesCommand::Ls { repo, id, path }) => {
            files::ls(&g, &repo.repo, &id, &path)
        }
        Command::Files(crate::cli::FilesCommand::Get {
            repo,
            id,
            paths,
            to,
        }) => files::get(&g, &repo.repo, &id, &paths, &to),
        Command::Diff { repo, a, b } => maintenance::diff(&g, &repo.repo, &a, &b),
        Command::Copy {
            from,
            to,
            disk,
            from_password_file,
            from_key_file,
            ids,
        } => {
            let key = keys::SourceKey {
                key_file: from_key_file,
                password_file: from_password_file,
            };
            copy::copy(&g, &from, &key, &to, disk.as_deref(), &ids)
        }
        Command::Verify {
            repo,
            read_data,
            read_data_subset,
        } => {
            let check = match (read_data, read_data_subset) {
                (_, Some(subset)) => cbtvault_repo::DataCheck::parse(&subset)
                    .map_err(|e| crate::failure::usage_error(format!("--read-data-subset {e}")))?,
                (true, None) => cbtvault_repo::DataCheck::All,
                (false, None) => cbtvault_repo::DataCheck::None,
            };
            maintenance::verify(&g, &repo.repo, check)
        }
        Command::Forget(f) => maintenance::forget(&g, f),
        Command::Gc {
            repo,
            wait,
            max_unused,
            max_repack,
            dry_run,
        } => {
            if !(0.0..=1000.0).contains(&max_unused) {
                anyhow::bail!(crate::failure::usage!(
                    "--max-unused takes a percentage from 0 to 1000"
                ));
            }
            let options = cbtvault_repo::GcOptions {
                max_unused: max_unused / 100.0,
                max_repack,
                dry_run,
            };
            maintenance::gc(&g, &repo.repo, wait, options)
        }
        Command::Repair { repo, wait } => maintenance::repair(&g, &repo.repo, wait),
        Command::Cleanup(c) => jobs::cleanup(&g, &c),
        Command::Config(crate::cli::ConfigCommand::Check { file }) => check_config(&g, &file),
        Command::Daemon { config } => daemon::daemon(&config),
        Command::Run { config, job } => daemon::run_now(&g, &config, &job),
        Command::Runs { repo, job, limit } => daemon::runs(&g, &repo.repo, job.as_deref(), limit),
        Command::Status { config } => daemon::status(&g, &config),
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

/// `config check FILE`: the file loaded and validated as the daemon does.
fn check_config(g: &crate::cli::Global, file: &Path) -> Result<ExitCode> {
    let config = cbtvault_config::Config::load(file)?;
    if g.json {
        crate::output::print_json(&serde_json::json!({
            "file": file.display().to_string(),
            "ok": true,
            "pools": config.pools.iter().map(|p| &p.name).collect::<Vec<_>>(),
            "qemu_hosts": config.qemu_hosts.iter().map(|h| &h.name).collect::<Vec<_>>(),
            "vcenters": config.vcenters.iter().map(|v| &v.name).collect::<Vec<_>>(),
            "jobs": config.jobs.iter().map(|j| &j.name).collect::<Vec<_>>(),
            "maintenance": config.maintenance.iter().map(|m| &m.name).collect::<Vec<_>>(),
        }));
    } else if !g.quiet {
        crate::output::outln!(
            "{}: ok: {} pools, {} QEMU hosts, {} vCenters, {} jobs, {} maintenance tasks; repository {}",
            file.display(),
            config.pools.len(),
            config.qemu_hosts.len(),
            config.vcenters.len(),
            config.jobs.len(),
            config.maintenance.len(),
            config.repository.path.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Opens the repository at `path` with a message that names it.
pub fn open(path: &Path) -> Result<Arc<Repository>> {
    open_with_key(path, &keys::secret_to_open)
}

/// [`open`] with the secret from `key` (the source of a copy).
pub fn open_with_key(
    path: &Path,
    key: &dyn Fn() -> cbtvault_repo::Result<cbtvault_repo::Secret>,
) -> Result<Arc<Repository>> {
    // The repository's own errors name the path; they stay the chain's
    // first cause, which `--json` classifies.
    match cbtvault_s3::open_with_key(path, Some(key)) {
        Ok(repo) => Ok(Arc::new(repo)),
        Err(cbtvault_s3::Error::Repo(e)) => {
            Err(anyhow::Error::new(e).context("opening the repository"))
        }
        Err(e) => Err(anyhow::Error::new(e).context("opening the repository")),
    }
}

/// The fewest characters of an id that `resolve` accepts as a prefix.
const MIN_PREFIX: usize = 4;

/// The restore point `spec` names: an id, a unique prefix of at least
/// [`MIN_PREFIX`] characters, `DISK@latest`, `DISK@DATE`, or `VM@DATE` for
/// a VM with one disk (see [`points`]), with a message that says what to
/// give instead when it names none.
pub fn resolve(repo: &Repository, spec: &str) -> Result<RestorePointRow> {
    points::resolve_one(repo, spec)
}

/// The restore point an id or prefix names (no `@` selector).
fn resolve_id(repo: &Repository, spec: &str) -> Result<RestorePointRow> {
    let disks = || repo.catalogue().disks();
    let is_hex = !spec.is_empty() && spec.bytes().all(|b| b.is_ascii_hexdigit());
    let disk_hint =
        || format!("{spec:?} is a disk; give {spec}@latest for its newest restore point, or an id");
    if is_hex && spec.len() >= MIN_PREFIX {
        return match repo.resolve(spec) {
            Err(e @ cbtvault_repo::Error::UnknownRestorePoint(_)) => {
                if disks()?.iter().any(|d| d == spec) {
                    Err(failure::tagged(failure::kind::NOT_FOUND, disk_hint()))
                } else {
                    Err(e.into())
                }
            }
            other => Ok(other?),
        };
    }
    if disks()?.iter().any(|d| d == spec) {
        return Err(failure::usage_error(disk_hint()));
    }
    if !is_hex {
        return Err(failure::usage_error(format!(
            "{spec:?} is not a restore point id (ids are hexadecimal); give an id or a prefix \
             of one (`cbtvault list` shows them), DISK@latest, DISK@DATE or VM@DATE"
        )));
    }
    Err(failure::usage_error(format!(
        "restore point prefix {spec:?} is too short: give at least {MIN_PREFIX} characters \
         of the id (`cbtvault list` shows them)"
    )))
}

/// `disks: a, b, c` (at most 20 shown), or `it has no disks`.
pub fn listing(what: &str, names: &[String]) -> String {
    if names.is_empty() {
        return format!("it has no {what}");
    }
    let shown: Vec<&str> = names.iter().take(20).map(String::as_str).collect();
    let more = names.len().saturating_sub(shown.len());
    format!(
        "{what}: {}{}",
        shown.join(", "),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        }
    )
}

/// A tokio runtime for the network-facing parts.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("cbtvault-io")
        .build()
        .context("starting the async runtime")
}
