//! Retrying failed calls without turning an outage into a retry storm.
//!
//! A retry helps when a failure is transient and hurts when it is not: when an upstream is
//! overloaded, every client that retries multiplies the load on it exactly when it can least
//! take it, and retries at several layers multiply again at each. So a retry here needs three
//! separate yeses:
//!
//! - **the error is worth retrying**: the caller's [`RetryPolicy`] decides (a 503 may be, a 400
//!   never is; keel's classes are in DESIGN §5). There is deliberately no "retry every error"
//!   default;
//! - **attempts remain**: at most `max_attempts` per call, the first attempt included;
//! - **the system can afford it**: a shared [`RetryBudget`](crate::budget::RetryBudget), fed
//!   one deposit per original call and charged one withdrawal per retry, bounds retries to a
//!   fraction of the traffic, so a failing upstream sees, say, 1.2× its load instead of 3×.
//!
//! The wait between attempts is the [`Backoff`](crate::backoff::Backoff) with jitter, so
//! clients that failed together do not retry together, or the server's `Retry-After` when the
//! policy reports one, but never longer than the backoff's cap.
//!
//! This module owns the decision trait. With the `tower` feature, `RetryLayer` and `Retry`
//! apply it to any `tower::Service` whose requests are `Clone`.

use std::time::Duration;

#[cfg(feature = "tower")]
mod layer;
#[cfg(all(test, feature = "tower"))]
mod tests;

#[cfg(feature = "tower")]
pub use layer::{Retry, RetryFuture, RetryLayer};

/// Decides whether a failed attempt is retried, and how soon the server asked to be retried.
///
/// `Req` is the request, so a policy can refuse to retry calls with side effects; `Res` and
/// `E` are the service's response and error. Implemented by any
/// `Fn(&Req, &Result<Res, E>) -> bool` closure (with no `Retry-After` support).
pub trait RetryPolicy<Req, Res, E> {
    /// `true` if `result`, the outcome of one attempt of `req`, may be retried.
    /// Return `false` for successes and for errors a retry cannot fix.
    fn retryable(&self, req: &Req, result: &Result<Res, E>) -> bool;

    /// The delay the server asked for (HTTP `Retry-After`), if any. When `Some`, it replaces
    /// the backoff delay, capped at the backoff's `cap`.
    fn retry_after(&self, result: &Result<Res, E>) -> Option<Duration> {
        let _ = result;
        None
    }
}

impl<Req, Res, E, F> RetryPolicy<Req, Res, E> for F
where
    F: Fn(&Req, &Result<Res, E>) -> bool,
{
    fn retryable(&self, req: &Req, result: &Result<Res, E>) -> bool {
        self(req, result)
    }
}
