//! Reporting transfers as they happen.

/// Receives the progress of a pull or push, blob by blob. `id` is the
/// blob's digest (`sha256:…`), short enough to show once trimmed.
pub trait Transfer: Send + Sync {
    /// A blob starts moving; `total` bytes when known.
    fn start(&self, id: &str, total: Option<u64>);
    /// `bytes` more of it moved.
    fn advance(&self, id: &str, bytes: u64);
    /// It is done: `how` says what happened (`pulled`, `exists`, `pushed`,
    /// `mounted`, …).
    fn finish(&self, id: &str, how: &str);
}
