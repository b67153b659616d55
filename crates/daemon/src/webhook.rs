//! The webhook: a JSON report POSTed after a run, tried a few times with
//! a growing pause. A webhook that fails is logged; it never stops or
//! slows a backup.

use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Tries per report.
const TRIES: u32 = 3;
/// The pause before the second try; it doubles after each.
const FIRST_PAUSE: Duration = Duration::from_secs(1);
/// How long one try may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Sends `report` to `url` (an `https://` one trusted through `ca`, or the
/// public roots); returns whether it was taken (a 2xx answer).
pub async fn send(
    url: &str,
    ca: Option<&std::path::Path>,
    report: &Value,
    stop: &CancellationToken,
) -> bool {
    let body = report.to_string().into_bytes();
    let mut pause = FIRST_PAUSE;
    for attempt in 1..=TRIES {
        match crate::http::post(url, ca, body.clone(), TIMEOUT).await {
            Ok((status, _)) if (200..300).contains(&status) => {
                info!(url, status, "webhook delivered");
                return true;
            }
            Ok((status, text)) => {
                warn!(url, attempt, status, answer = %text.trim(), "webhook refused the report")
            }
            Err(e) => warn!(url, attempt, error = %crate::report::chain(&e), "webhook failed"),
        }
        if attempt < TRIES {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(pause) => {}
            }
            pause *= 2;
        }
    }
    warn!(
        url,
        "webhook not delivered; the run's report stays in `cbtvault runs`"
    );
    false
}
