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

use crate::provider::Passed;

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
        /// The answer's headers (its id), when the connection broke after they had arrived.
        passed: Passed,
    },
    /// A deadline passed during the attempt.
    #[error("attempt to {target} timed out after {}ms ({phase})", after.as_millis())]
    Timeout {
        /// `provider/model`.
        target: String,
        /// Which deadline: `attempt`, `first_token`, `total`, or `task` (the deadline of
        /// the task the call belongs to).
        phase: &'static str,
        /// How long was waited.
        after: Duration,
        /// The answer's headers (its id), when the deadline passed after they had arrived
        /// (a stream silent past `first_token`).
        passed: Passed,
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
        /// The answer's headers to pass on with it (its id, the account's rate limits).
        passed: Passed,
    },
    /// The target answered 200 with a body that is not what the API promises.
    #[error("{target} sent a malformed answer: {detail}")]
    Malformed {
        /// `provider/model`.
        target: String,
        /// What was wrong.
        detail: String,
        /// The answer's headers (its id), when they had arrived.
        passed: Passed,
    },
    /// A stream ended or broke before its first event.
    #[error("stream from {target} ended before the first event")]
    StreamCut {
        /// `provider/model`.
        target: String,
        /// The answer's headers (its id).
        passed: Passed,
    },
    /// The target's circuit breaker is open, or half-open with every trial slot taken.
    #[error(
        "circuit for {target} is {}",
        if retry_in.is_zero() { "half-open and its trial calls are in flight" } else { "open" }
    )]
    BreakerOpen {
        /// `provider/model`.
        target: String,
        /// How long until the breaker lets a trial call through; zero when it is half-open
        /// (its trial calls, streams to their end, still running) rather than open.
        retry_in: Duration,
    },
}

impl UpstreamError {
    /// The failure an error object sent in place of an answer stands for (a 200 body
    /// `{"error": ...}`, or such an event in a stream): a [`UpstreamError::Status`] with
    /// `body` as its body, the status [`status_of_error_object`] reads, and the hint of its
    /// text, so that it is classified like the same error sent as an HTTP answer.
    pub fn error_object(target: &str, body: Bytes, error: &serde_json::Value) -> Self {
        let hint = ErrorHint::from_body(&body);
        Self::Status {
            target: target.to_owned(),
            status: status_of_error_object(error, hint),
            retry_after: None,
            body,
            hint,
            passed: Passed::default(),
        }
    }

    /// The connection to `target` could not be made, or broke; `detail` says which.
    pub fn connect(target: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::Connect {
            target: target.into(),
            detail: detail.into(),
            passed: Passed::default(),
        }
    }

    /// A 200 answer (or stream event) from `target` that is not what the API promises.
    pub fn malformed(target: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::Malformed {
            target: target.into(),
            detail: detail.into(),
            passed: Passed::default(),
        }
    }

    /// The error with the headers of the answer it came with, when an answer had arrived:
    /// every failure but an open breaker's (which sent nothing) can come after them.
    pub fn with_passed(mut self, headers: Passed) -> Self {
        if let Some(passed) = self.passed_mut() {
            *passed = headers;
        }
        self
    }

    /// The provider's id of the answer this failure came with, if one had arrived and
    /// named itself.
    pub fn request_id(&self) -> Option<&str> {
        match self {
            Self::Connect { passed, .. }
            | Self::Timeout { passed, .. }
            | Self::Status { passed, .. }
            | Self::Malformed { passed, .. }
            | Self::StreamCut { passed, .. } => passed.request_id(),
            Self::BreakerOpen { .. } => None,
        }
    }

    fn passed_mut(&mut self) -> Option<&mut Passed> {
        match self {
            Self::Connect { passed, .. }
            | Self::Timeout { passed, .. }
            | Self::Status { passed, .. }
            | Self::Malformed { passed, .. }
            | Self::StreamCut { passed, .. } => Some(passed),
            Self::BreakerOpen { .. } => None,
        }
    }

    /// Whether the provider refused keel's credentials or account (401, 403, or an account
    /// hint): its words are never passed on or recorded, they may quote the key.
    pub fn credentials_refused(&self) -> bool {
        matches!(self, Self::Status { status, hint, .. } if refuses_credentials(*status, *hint))
    }

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
            Self::Status {
                hint: ErrorHint::AccountRefused,
                ..
            } => "account_refused",
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
    /// A fatal 4xx is the client's fault, so it neither trips nor heals the breaker; a
    /// provider refusing keel's account (a spent quota or credit) fails every call until
    /// someone pays, so it counts, and the breaker keeps calls away from it.
    /// (A cut by keel's own deadline is judged by the caller, who knows where the time went.)
    pub fn counts_against_target(&self) -> bool {
        match self.class() {
            ErrorClass::Retryable => true,
            ErrorClass::FallbackOnly => {
                matches!(self, Self::Status { hint, .. } if *hint == ErrorHint::AccountRefused)
            }
            ErrorClass::Fatal => false,
        }
    }
}

/// Whether an error answer with `status` and `hint` refuses keel's credentials or account
/// (401, 403, or an account hint).
pub fn refuses_credentials(status: StatusCode, hint: ErrorHint) -> bool {
    status == StatusCode::UNAUTHORIZED
        || status == StatusCode::FORBIDDEN
        || hint == ErrorHint::AccountRefused
}

/// The HTTP status an error object (`error`, the value of its `error` member) stands for: its
/// numeric `code` or `status` when that is an error status (OpenRouter's); else what it names:
/// a prompt too long or a content filter 400, an unknown model 404 (`hint`), a `code` of
/// `rate_limit_exceeded` or `insufficient_quota` 429, `invalid_api_key` 401, a `type` of
/// `invalid_request_error` 400, `authentication_error` 401, `permission_error` 403,
/// `not_found_error` 404, `rate_limit_error` 429; else 500 (the upstream failed answering).
pub fn status_of_error_object(error: &serde_json::Value, hint: ErrorHint) -> StatusCode {
    let numeric = |key: &str| {
        error
            .get(key)
            .and_then(serde_json::Value::as_u64)
            .and_then(|code| u16::try_from(code).ok())
            .and_then(|code| StatusCode::from_u16(code).ok())
            .filter(|status| status.is_client_error() || status.is_server_error())
    };
    if let Some(status) = numeric("code").or_else(|| numeric("status")) {
        return status;
    }
    let named = match hint {
        ErrorHint::ContextTooLong | ErrorHint::ContentFilter | ErrorHint::Unsupported => Some(400),
        ErrorHint::ModelNotFound => Some(404),
        ErrorHint::AccountRefused | ErrorHint::None => None,
    };
    let text = |key: &str| error.get(key).and_then(serde_json::Value::as_str);
    let by_code = match text("code") {
        Some("rate_limit_exceeded" | "insufficient_quota") => Some(429),
        Some("invalid_api_key") => Some(401),
        _ => None,
    };
    let by_type = match text("type") {
        Some("invalid_request_error") => Some(400),
        Some("authentication_error") => Some(401),
        Some("permission_error") => Some(403),
        Some("not_found_error") => Some(404),
        Some("rate_limit_error") => Some(429),
        _ => None,
    };
    named
        .or(by_code)
        .or(by_type)
        .and_then(|code| StatusCode::from_u16(code).ok())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spent_quota_counts_against_its_target_and_the_request_s_own_errors_do_not() {
        let answered = |status: u16, body: &'static [u8]| UpstreamError::Status {
            target: "sim/m".into(),
            status: StatusCode::from_u16(status).unwrap(),
            retry_after: None,
            body: Bytes::from_static(body),
            hint: ErrorHint::from_body(body),
            passed: Passed::default(),
        };
        let spent = answered(429, br#"{"error":{"code":"insufficient_quota"}}"#);
        assert_eq!(spent.class(), ErrorClass::FallbackOnly);
        assert!(spent.counts_against_target());
        assert_eq!(spent.reason(), "account_refused");
        let filtered = answered(400, br#"{"error":{"code":"content_filter"}}"#);
        assert!(!filtered.counts_against_target());
        assert!(!answered(400, b"{}").counts_against_target());
        assert!(answered(503, b"{}").counts_against_target());
    }

    #[test]
    fn an_error_object_stands_for_the_status_it_names() {
        let status = |error: serde_json::Value| {
            let body = serde_json::json!({ "error": error }).to_string();
            status_of_error_object(&error, ErrorHint::from_body(body.as_bytes())).as_u16()
        };
        use serde_json::json;
        assert_eq!(
            status(json!({"message": "overloaded", "type": "server_error"})),
            500
        );
        assert_eq!(
            status(json!({"code": 502, "message": "provider down"})),
            502
        );
        assert_eq!(status(json!({"status": 429})), 429);
        assert_eq!(status(json!({"code": 200, "message": "odd"})), 500);
        assert_eq!(status(json!("plain words")), 500);
        assert_eq!(status(json!({"code": "context_length_exceeded"})), 400);
        assert_eq!(status(json!({"code": "model_not_found"})), 404);
        assert_eq!(status(json!({"code": "rate_limit_exceeded"})), 429);
        assert_eq!(status(json!({"code": "invalid_api_key"})), 401);
        assert_eq!(
            status(json!({"type": "invalid_request_error", "message": "bad"})),
            400
        );
        // Classified like the same answer: a prompt too long moves to the next target.
        let too_long = json!({"code": "context_length_exceeded"});
        let body = Bytes::from(json!({ "error": too_long }).to_string());
        let err = UpstreamError::error_object("p/m", body, &too_long);
        assert_eq!(err.class(), ErrorClass::FallbackOnly);
        assert_eq!(err.status(), Some(StatusCode::BAD_REQUEST));
    }

    #[test]
    fn a_failure_keeps_the_id_of_an_answer_that_had_arrived() {
        let mut headers = axum::http::HeaderMap::new();
        headers.insert("x-request-id", "req_7".parse().unwrap());
        let passed = Passed::openai(&headers);
        let malformed = UpstreamError::malformed("p/m", "not JSON").with_passed(passed.clone());
        assert_eq!(malformed.request_id(), Some("req_7"));
        assert_eq!(malformed.class(), ErrorClass::Retryable);
        let cut = UpstreamError::StreamCut {
            target: "p/m".to_owned(),
            passed: Passed::default(),
        }
        .with_passed(passed.clone());
        assert_eq!(cut.request_id(), Some("req_7"));
        let broke = UpstreamError::connect("p/m", "reset");
        assert_eq!(broke.request_id(), None, "no answer had arrived");
        assert_eq!(broke.with_passed(passed).request_id(), Some("req_7"));
        let open = UpstreamError::BreakerOpen {
            target: "p/m".to_owned(),
            retry_in: Duration::from_secs(3),
        };
        assert_eq!(open.with_passed(Passed::default()).request_id(), None);
    }

    #[test]
    fn transport_failures_are_retryable_and_open_breaker_falls_back() {
        let t = || "p/m".to_owned();
        assert_eq!(
            UpstreamError::connect(t(), "").class(),
            ErrorClass::Retryable
        );
        assert_eq!(
            UpstreamError::Timeout {
                target: t(),
                phase: "attempt",
                after: Duration::from_secs(1),
                passed: Passed::default(),
            }
            .class(),
            ErrorClass::Retryable
        );
        assert_eq!(
            UpstreamError::StreamCut {
                target: t(),
                passed: Passed::default()
            }
            .class(),
            ErrorClass::Retryable
        );
        assert_eq!(
            UpstreamError::BreakerOpen {
                target: t(),
                retry_in: Duration::from_secs(3),
            }
            .class(),
            ErrorClass::FallbackOnly
        );
    }
}
