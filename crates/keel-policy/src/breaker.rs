//! Circuit breaker with resilience4j's semantics.

use std::time::Duration;

/// How the breaker's sliding window counts calls.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Window {
    /// The last `n` calls.
    Count(u32),
    /// The calls of the last `d` (aggregated in one-second buckets).
    Time(Duration),
}

/// Validated breaker settings (resilience4j's meaning for every field).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerSettings {
    /// The sliding window.
    pub window: Window,
    /// Calls needed in the window before rates are evaluated.
    pub min_calls: u32,
    /// Failure rate (0..=1) at or above which the breaker opens.
    pub failure_rate: f64,
    /// Slow-call rate (0..=1) at or above which the breaker opens.
    pub slow_call_rate: f64,
    /// A call at least this long is slow.
    pub slow_call: Duration,
    /// How long the breaker stays open before letting trial calls through.
    pub open_for: Duration,
    /// Trial calls permitted while half-open.
    pub half_open_calls: u32,
}
