//! `cbtvault`: incremental, changed-block-tracking backups of virtual disks.
//!
//! Crates used: `clap` (the command line), `indicatif` (progress bars on a
//! terminal), `tracing-subscriber` (logs on stderr, `-v` or `RUST_LOG`),
//! `anyhow` (error chains for the one line printed on failure).

mod cli;
mod commands;
mod demo;
mod failure;
mod output;
mod progress;

use std::process::ExitCode;

use clap::Parser;

use crate::output::errln;

fn main() -> ExitCode {
    let args = match cli::Args::try_parse() {
        Ok(args) => args,
        Err(e) => return usage_error(e),
    };
    let json = args.global.json;
    // The daemon's log is its record of what happened: info by default.
    let verbose = match args.command {
        cli::Command::Daemon { .. } => args.global.verbose.max(1),
        _ => args.global.verbose,
    };
    output::init_logging(verbose, args.global.quiet);
    let result = commands::run(args);
    // Output lost to a full disk is a failure; to a reader that left
    // (`| head`), it is not.
    let result = match (result, output::stdout_failure()) {
        (Ok(_), Some(kind)) => Err(failure::tagged(
            failure::kind::IO,
            format!(
                "writing to standard output failed ({}); the output is incomplete",
                std::io::Error::from(kind)
            ),
        )),
        (result, _) => result,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            report(&e, json);
            ExitCode::FAILURE
        }
    }
}

/// One line on stderr: the error and its causes as the user can act on
/// them, or the same as a JSON object under `--json`.
fn report(e: &anyhow::Error, json: bool) {
    // The library says the key is missing; the fix is in the CLI's words.
    // (Matched by its text: transparent wrappers of other crates hide
    // the repository's error from the chain.)
    let keyless = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<cbtvault_repo::Error>(),
            Some(cbtvault_repo::Error::KeyRequired { .. })
        ) || c.to_string().contains("was opened without its key")
    });
    let hinted;
    let e = if keyless {
        hinted = failure::tagged(
            failure::kind_of(e),
            format!(
                "{} (give the passphrase with CBTVAULT_PASSWORD or --repo-password-file, or a key file with --repo-key-file)",
                failure::message(e)
            ),
        );
        &hinted
    } else {
        e
    };
    if json {
        errln!("{}", failure::json(e));
    } else {
        errln!("cbtvault: error: {}", failure::message(e));
    }
}

/// Bad arguments: clap's text, or under `--json` a JSON object; exit code 2
/// either way (help and version print as usual and exit 0).
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let informational = matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    );
    if informational || !std::env::args_os().any(|a| a == "--json") {
        let _ = e.print();
        return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
    }
    let text = e.render().to_string();
    let first = text.lines().next().unwrap_or_default();
    let message = first.strip_prefix("error: ").unwrap_or(first);
    report(&failure::usage_error(message.to_string()), true);
    ExitCode::from(2)
}
