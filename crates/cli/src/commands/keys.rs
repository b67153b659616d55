//! The key of an encrypted repository: where the secret comes from
//! (never argv), and `cbtvault key list|add|remove|passwd`.

use std::io::{BufRead, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::OnceLock;

use anyhow::{Context, Result};
use cbtvault_repo::{KdfParams, Secret, SecretKind};
use serde_json::json;

use crate::cli::{Global, KeyArgs, KeyCommand, NewKeyArgs};
use crate::output::{self, outln};

/// The sources this run was given (set once, by [`set_sources`]).
static SOURCES: OnceLock<KeyArgs> = OnceLock::new();

/// Records where this run's repository secret comes from.
pub fn set_sources(args: KeyArgs) {
    let _ = SOURCES.set(args);
}

fn sources() -> KeyArgs {
    SOURCES.get().cloned().unwrap_or_default()
}

/// The secret that opens an encrypted repository: a key file, a
/// passphrase file, `CBTVAULT_PASSWORD`, or a prompt on the terminal.
/// Asked only when the repository is encrypted.
pub fn secret_to_open() -> cbtvault_repo::Result<Secret> {
    let sources = sources();
    // No key given: the repository opens locked (verify checks its
    // structure); what needs the key says so then.
    let missing = || cbtvault_repo::Error::KeyRequired {
        what: "opening".into(),
    };
    if let Some(file) = &sources.repo_key_file {
        return read_key_file(file);
    }
    if let Some(file) = &sources.repo_password_file {
        return read_password_file(file);
    }
    if let Some(text) = std::env::var_os("CBTVAULT_PASSWORD") {
        return Ok(Secret::passphrase(text.to_string_lossy().into_owned()));
    }
    match prompt("passphrase of the repository: ") {
        Some(Ok(text)) => Ok(Secret::passphrase(text)),
        Some(Err(e)) => Err(io_error("the terminal", e)),
        None => Err(missing()),
    }
}

/// Where the source of a copy gets its secret when it has its own key
/// (`copy --from-key-file`, `--from-password-file`).
#[derive(Clone, Debug, Default)]
pub struct SourceKey {
    pub key_file: Option<std::path::PathBuf>,
    pub password_file: Option<std::path::PathBuf>,
}

/// The secret that opens the source of a copy: its own key file,
/// passphrase file or `CBTVAULT_FROM_PASSWORD` when given, else what
/// opens any repository ([`secret_to_open`]: one key on both sides, or
/// only the source encrypted).
pub fn source_secret(key: &SourceKey) -> cbtvault_repo::Result<Secret> {
    if let Some(file) = &key.key_file {
        return read_key_file(file);
    }
    if let Some(file) = &key.password_file {
        return read_password_file(file);
    }
    if let Some(text) = std::env::var_os("CBTVAULT_FROM_PASSWORD") {
        return Ok(Secret::passphrase(text.to_string_lossy().into_owned()));
    }
    let sources = sources();
    if sources.repo_key_file.is_some()
        || sources.repo_password_file.is_some()
        || std::env::var_os("CBTVAULT_PASSWORD").is_some()
    {
        return secret_to_open();
    }
    match prompt("passphrase of the source repository: ") {
        Some(Ok(text)) => Ok(Secret::passphrase(text)),
        Some(Err(e)) => Err(io_error("the terminal", e)),
        None => Err(cbtvault_repo::Error::KeyRequired {
            what: "opening".into(),
        }),
    }
}

/// The first secret of a new encrypted repository: from the same sources
/// as [`secret_to_open`], a prompt asking twice.
pub fn secret_for_init() -> Result<Secret> {
    let sources = sources();
    if sources.repo_key_file.is_some()
        || sources.repo_password_file.is_some()
        || std::env::var_os("CBTVAULT_PASSWORD").is_some()
    {
        return Ok(secret_to_open()?);
    }
    new_passphrase_on_terminal()?.ok_or_else(|| {
        crate::failure::usage_error(
            "--encrypt needs a passphrase: CBTVAULT_PASSWORD, --repo-password-file, --repo-key-file, or run it on a terminal",
        )
    })
}

/// A new secret for `key add` or `key passwd`.
fn new_secret(new: &NewKeyArgs) -> Result<Secret> {
    if let Some(file) = &new.new_key_file {
        return Ok(read_key_file(file)?);
    }
    if let Some(file) = &new.new_password_file {
        return Ok(read_password_file(file)?);
    }
    if let Some(text) = std::env::var_os("CBTVAULT_NEW_PASSWORD") {
        return Ok(Secret::passphrase(text.to_string_lossy().into_owned()));
    }
    new_passphrase_on_terminal()?.ok_or_else(|| {
        crate::failure::usage_error(
            "no new passphrase: give --new-password-file, --new-key-file or CBTVAULT_NEW_PASSWORD, or run it on a terminal",
        )
    })
}

fn new_passphrase_on_terminal() -> Result<Option<Secret>> {
    let Some(first) = prompt("new passphrase: ") else {
        return Ok(None);
    };
    let first = first.context("reading the passphrase")?;
    let again = prompt("the same again: ")
        .transpose()
        .context("reading the passphrase")?
        .unwrap_or_default();
    if first != again {
        anyhow::bail!(crate::failure::usage_error("the two passphrases differ"));
    }
    if first.is_empty() {
        anyhow::bail!(crate::failure::usage_error("an empty passphrase"));
    }
    Ok(Some(Secret::passphrase(first)))
}

fn io_error(path: &str, source: std::io::Error) -> cbtvault_repo::Error {
    cbtvault_repo::Error::Io {
        path: path.into(),
        source,
    }
}

fn read_key_file(path: &Path) -> cbtvault_repo::Result<Secret> {
    let bytes = std::fs::read(path).map_err(|e| io_error(&path.display().to_string(), e))?;
    Ok(Secret::key_file(bytes))
}

fn read_password_file(path: &Path) -> cbtvault_repo::Result<Secret> {
    let file = std::fs::File::open(path).map_err(|e| io_error(&path.display().to_string(), e))?;
    let mut line = String::new();
    std::io::BufReader::new(file)
        .read_line(&mut line)
        .map_err(|e| io_error(&path.display().to_string(), e))?;
    Ok(Secret::passphrase(line.trim_end_matches(['\r', '\n'])))
}

/// Reads a line from the controlling terminal with echo off; `None` when
/// there is no terminal (a service, a pipe).
fn prompt(question: &str) -> Option<std::io::Result<String>> {
    // Only someone at a terminal is asked: not a service nor a script
    // whose input is a pipe or nothing.
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(0) } != 1 {
        return None;
    }
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .ok()?;
    use std::os::fd::AsRawFd;
    let fd = tty.as_raw_fd();
    // SAFETY: termios is plain data; tcgetattr fills it for a valid fd.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
        return None;
    }
    let mut quiet = saved;
    quiet.c_lflag &= !libc::ECHO;
    quiet.c_lflag |= libc::ECHONL;
    let read = (|| {
        let mut out = &tty;
        out.write_all(question.as_bytes())?;
        out.flush()?;
        // SAFETY: fd is open for the whole call; quiet is a valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut line = String::new();
        let got = std::io::BufReader::new(&tty).read_line(&mut line);
        // SAFETY: as above; restores what tcgetattr read.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &saved) };
        got?;
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    })();
    Some(read)
}

pub fn key(g: &Global, command: KeyCommand) -> Result<ExitCode> {
    match command {
        KeyCommand::List { repo } => {
            let repo = super::open(&repo.repo)?;
            let slots = repo.key_list()?;
            if g.json {
                output::print_json(&json!({ "keys": slots, "current": repo.current_key_slot() }));
            } else if !g.quiet {
                for slot in &slots {
                    outln!(
                        "{}{}  {:<10} {}  argon2id m={} KiB t={} p={}",
                        if repo.current_key_slot() == Some(slot.id.as_str()) {
                            "*"
                        } else {
                            " "
                        },
                        slot.id,
                        match slot.kind {
                            SecretKind::Passphrase => "passphrase",
                            SecretKind::KeyFile => "key file",
                        },
                        super::local_time(slot.created),
                        slot.kdf.memory_kib,
                        slot.kdf.iterations,
                        slot.kdf.parallelism
                    );
                }
            }
        }
        KeyCommand::Add { repo, new } => {
            let repo = super::open(&repo.repo)?;
            let secret = new_secret(&new)?;
            let id = repo.key_add(&secret, KdfParams::default())?;
            report(g, "added", &id);
        }
        KeyCommand::Remove { repo, id } => {
            let repo = super::open(&repo.repo)?;
            repo.key_remove(&id)?;
            report(g, "removed", &id);
        }
        KeyCommand::Passwd { repo, new } => {
            let repo = super::open(&repo.repo)?;
            let secret = new_secret(&new)?;
            let id = repo.key_passwd(&secret, KdfParams::default())?;
            report(g, "replaced by", &id);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn report(g: &Global, what: &str, id: &str) {
    if g.json {
        output::print_json(&json!({ "key": id, "action": what }));
    } else if !g.quiet {
        outln!("key {what} {id}");
    }
}
