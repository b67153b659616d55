//! `cbtvault daemon`: the service an operator leaves alone for months. It
//! runs each job of the configuration on its schedule with
//! [`cbtvault_runner::Runner`] (the same code as `cbtvault backup
//! --config`), keeps the run history in the repository's catalogue,
//! answers on HTTP, and tells a webhook when a run fails.
//!
//! # Scheduling
//! A job's `schedule` (`at`/`days`, or `cron` with seconds optional) in
//! its time zone becomes a [`Plan`]; the scheduler sleeps until the
//! earliest next time (at most 30 s, so a jump of the wall clock is seen),
//! then starts each due job after its `random_delay`. A job never overlaps
//! itself: a run still going (or waiting out its delay) when its next time
//! comes makes that time skipped, and logged. With `catch_up`, a job whose
//! scheduled time passed since its last recorded run runs once at start.
//! `[[maintenance]]` entries (gc, verify) are scheduled the same way and
//! run on a blocking thread.
//!
//! # Lifecycle
//! SIGTERM/SIGINT: no new runs, in-flight runs are cancelled through the
//! runner's token (each capture aborts through its provider, leaving no
//! snapshot with data in the pool), bounded by [`STOP_BOUND`]. SIGHUP
//! reloads the configuration; a bad one is logged with its file, line and
//! reason and the running one stays. Under systemd (`Type=notify`) it
//! says READY and STOPPING and feeds the watchdog.
//!
//! # What happened
//! After each run: a row in the catalogue's `job_runs` table with the JSON
//! report ([`report`]), the metrics, and the webhook (on failure, or
//! always). HTTP on `[daemon] listen` (loopback by default): `GET
//! /healthz`, `GET /status` ([`status::status`], the same as `cbtvault
//! status --json`), `GET /metrics` (OpenMetrics text), `POST /run/JOB`
//! ([`ask_to_run`], what `cbtvault run JOB` calls).
//!
//! # Crates used
//! `cbtvault-engine` (the progress traits the runner reports through),
//! `croner` (cron expressions, stepped over `jiff` zoned times so
//! daylight-saving changes follow the time zone database), `sd-notify`
//! (systemd readiness and watchdog; a no-op outside systemd),
//! `prometheus-client` (the metrics and their text format), `hyper` and
//! `hyper-util` (the HTTP server and the one-connection client for the
//! webhook; `http-body-util` and `bytes` for their bodies), `rustls` and
//! `tokio-rustls` (https webhooks, trusted through `cbtvault-tls-pin`'s CA
//! handling or `webpki-roots`, Mozilla's roots carried in the binary so
//! that a host without a CA bundle still checks them), `serde_json`
//! (the reports), `rand` (the random delay), `tokio-util` (cancellation and
//! the tracker that waits for in-flight runs), `thiserror`, `tracing`.

mod daemon;
mod error;
mod http;
mod metrics;
mod progress;
pub mod report;
mod schedule;
pub mod status;
mod webhook;

pub use daemon::{STOP_BOUND, ask_to_run, run};
pub use error::{Error, Result};
pub use schedule::Plan;
