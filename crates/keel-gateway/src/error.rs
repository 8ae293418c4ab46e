//! Errors the gateway answers with, and failures of upstream attempts.
//!
//! [`ApiError`] is what a client sees, always in the OpenAI error shape so SDKs
//! raise their usual exception classes. [`UpstreamError`] is one failed attempt;
//! its [`UpstreamError::class`] is the only input the retry and fallback logic uses.

use std::time::Duration;

use axum::http::StatusCode;
use bytes::Bytes;
pub use keel_core::ApiError;
use keel_core::ErrorClass;
use keel_core::class::{ErrorHint, classify_status};

/// One failed attempt at one target.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The TCP/TLS connection could not be made, or broke (before an answer, or in the
    /// middle of a stream: `detail` says which).
    #[error("connection to {target}: {detail}")]
    Connect {
        /// `provider/model`.
        target: String,
        /// What the HTTP client said (never contains the API key).
        detail: String,
    },
    /// A deadline passed during the attempt.
    #[error("attempt to {target} timed out after {after:?} ({phase})")]
    Timeout {
        /// `provider/model`.
        target: String,
        /// Which deadline: `attempt`, `first_token`, `total`, or `task` (the deadline of
        /// the task the call belongs to).
        phase: &'static str,
        /// How long was waited.
        after: Duration,
    },
    /// The target answered with a non-success status.
    #[error("{target} answered {status}")]
    Status {
        /// `provider/model`.
        target: String,
        /// The status.
        status: StatusCode,
        /// The `Retry-After` the target asked for.
        retry_after: Option<Duration>,
        /// The body, passed to the client unchanged for fatal errors.
        body: Bytes,
        /// What the body says about the cause.
        hint: ErrorHint,
    },
    /// The target answered 200 with a body that is not what the API promises.
    #[error("{target} sent a malformed answer: {detail}")]
    Malformed {
        /// `provider/model`.
        target: String,
        /// What was wrong.
        detail: String,
    },
    /// A stream ended or broke before its first event.
    #[error("stream from {target} ended before the first event")]
    StreamCut {
        /// `provider/model`.
        target: String,
    },
    /// The target's circuit breaker is open.
    #[error("circuit for {target} is open")]
    BreakerOpen {
        /// `provider/model`.
        target: String,
    },
}

impl UpstreamError {
    /// Classifies this error (DESIGN §5). Exhaustive on purpose: a new variant must choose.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Connect { .. }
            | Self::Timeout { .. }
            | Self::Malformed { .. }
            | Self::StreamCut { .. } => ErrorClass::Retryable,
            Self::BreakerOpen { .. } => ErrorClass::FallbackOnly,
            Self::Status { status, hint, .. } => classify_status(*status, *hint),
        }
    }

    /// Short machine name for events and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Connect { .. } => "connect",
            Self::Timeout { phase, .. } => phase,
            Self::Status { .. } => "status",
            Self::Malformed { .. } => "malformed",
            Self::StreamCut { .. } => "stream_cut",
            Self::BreakerOpen { .. } => "breaker_open",
        }
    }

    /// The upstream status, when there was one.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Status { status, .. } => Some(*status),
            Self::Connect { .. }
            | Self::Timeout { .. }
            | Self::Malformed { .. }
            | Self::StreamCut { .. }
            | Self::BreakerOpen { .. } => None,
        }
    }

    /// Whether this failure says anything about the target's health (for the breaker).
    /// A fatal 4xx is the client's fault, so it neither trips nor heals the breaker.
    pub fn counts_against_target(&self) -> bool {
        match self.class() {
            ErrorClass::Retryable => true,
            ErrorClass::FallbackOnly | ErrorClass::Fatal => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_failures_are_retryable_and_open_breaker_falls_back() {
        let t = || "p/m".to_owned();
        assert_eq!(
            UpstreamError::Connect {
                target: t(),
                detail: String::new()
            }
            .class(),
            ErrorClass::Retryable
        );
        assert_eq!(
            UpstreamError::Timeout {
                target: t(),
                phase: "attempt",
                after: Duration::from_secs(1)
            }
            .class(),
            ErrorClass::Retryable
        );
        assert_eq!(
            UpstreamError::StreamCut { target: t() }.class(),
            ErrorClass::Retryable
        );
        assert_eq!(
            UpstreamError::BreakerOpen { target: t() }.class(),
            ErrorClass::FallbackOnly
        );
    }
}
