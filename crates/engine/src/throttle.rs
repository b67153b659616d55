//! A bandwidth limit shared by the disks of a job: a token bucket that
//! reads wait on before they are issued.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// At most `rate` bytes per second on average, with bursts of up to one
/// second's worth. Shared (behind an `Arc`) by every disk of a job.
#[derive(Debug)]
pub struct Throttle {
    rate: u64,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// Bytes that may be read now; negative when reads were let through on
    /// credit and later ones must wait it off.
    tokens: f64,
    updated: Instant,
}

impl Throttle {
    /// A limit of `bytes_per_second` (at least 1).
    pub fn new(bytes_per_second: u64) -> Throttle {
        let rate = bytes_per_second.max(1);
        Throttle {
            rate,
            state: Mutex::new(Bucket {
                tokens: rate as f64,
                updated: Instant::now(),
            }),
        }
    }

    /// Waits until `bytes` may be read. A read larger than the bucket goes
    /// through on credit, and those after it wait for the debt.
    pub async fn take(&self, bytes: u64) {
        let wait = {
            let mut b = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let rate = self.rate as f64;
            let refill = now.duration_since(b.updated).as_secs_f64() * rate;
            b.tokens = (b.tokens + refill).min(rate);
            b.updated = now;
            b.tokens -= bytes as f64;
            if b.tokens >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-b.tokens / rate)
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn reads_beyond_the_rate_wait_for_it() {
        let t = Throttle::new(1000);
        let start = tokio::time::Instant::now();
        // The first second's worth goes at once...
        t.take(1000).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        // ...and the next 3000 bytes take three seconds more.
        for _ in 0..3 {
            t.take(1000).await;
        }
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(2900) && took <= Duration::from_millis(3100),
            "{took:?}"
        );
    }
}
