//! Progress reporting: the engine says how far it got; the caller draws it.

/// Receives progress. Called from several threads.
pub trait Progress: Send + Sync {
    /// A phase begins with `total` bytes of work.
    fn start(&self, phase: &str, total: u64);
    /// `bytes` more are done.
    fn advance(&self, bytes: u64);
    /// The phase is over.
    fn finish(&self);
}

/// Progress that goes nowhere.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _phase: &str, _total: u64) {}
    fn advance(&self, _bytes: u64) {}
    fn finish(&self) {}
}
