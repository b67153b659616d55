//! `cbtvault`: incremental, changed-block-tracking backups of virtual disks.
//!
//! Crates used: `clap` (the command line), `indicatif` (progress bars on a
//! terminal), `tracing-subscriber` (logs on stderr, `-v` or `RUST_LOG`),
//! `anyhow` (error chains for the one line printed on failure).

mod cli;
mod commands;
mod demo;
mod output;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    output::init_logging(args.global.verbose, args.global.quiet);
    match commands::run(args) {
        Ok(code) => code,
        Err(e) => {
            // One line: the error and its causes, as the user can act on them.
            eprintln!("cbtvault: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
