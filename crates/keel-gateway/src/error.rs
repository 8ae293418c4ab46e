//! Errors the gateway answers with, and failures of upstream attempts.
//!
//! [`ApiError`] is what a client sees, always in the OpenAI error shape so SDKs
//! raise their usual exception classes. [`UpstreamError`] is one failed attempt;
//! its [`UpstreamError::class`] is the only input the retry and fallback logic uses.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use keel_core::ErrorClass;
use keel_core::class::{ErrorHint, classify_status};

/// An error answered to the client as `{"error":{"message","type","code","param"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message.
    pub message: String,
    /// OpenAI error type (`invalid_request_error`, `authentication_error`, ...).
    pub kind: &'static str,
    /// Machine-readable code (`model_not_found`, `invalid_api_key`, ...).
    pub code: Option<&'static str>,
    /// The request parameter at fault, when one is.
    pub param: Option<&'static str>,
    /// `Retry-After` seconds, for 429 and 503.
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            code: None,
            param: None,
            retry_after: None,
        }
    }

    /// 400: the request cannot be understood.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 401: no or wrong agent key.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::UNAUTHORIZED, "authentication_error", message);
        e.code = Some("invalid_api_key");
        e
    }

    /// 404: no such route or path.
    pub fn not_found(message: impl Into<String>, code: &'static str) -> Self {
        let mut e = Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message);
        e.code = Some(code);
        e
    }

    /// 413: body over `max_body_bytes`.
    pub fn too_large(limit: usize) -> Self {
        let mut e = Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!(
                "request body is larger than the limit of {limit} bytes (server.max_body_bytes)"
            ),
        );
        e.code = Some("request_too_large");
        e
    }

    /// 429: an agent's budget is spent.
    pub fn budget(message: impl Into<String>, retry_after: u64) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message);
        e.code = Some("budget_exceeded");
        e.retry_after = Some(retry_after);
        e
    }

    /// 503: every target failed or is open and no degraded reply is configured.
    pub fn unavailable(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "api_error", message);
        e.code = Some("upstream_unavailable");
        e
    }

    /// 504: the call's total deadline passed.
    pub fn timeout(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::GATEWAY_TIMEOUT, "api_error", message);
        e.code = Some("timeout");
        e
    }

    /// Sets `param`.
    pub fn with_param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    /// Sets `code`.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "code": self.code,
                "param": self.param,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// One failed attempt at one target.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The TCP/TLS connection could not be made, or broke before an answer.
    #[error("connect to {target} failed: {detail}")]
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
        /// Which deadline: `attempt`, `first_token`, `total`.
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
    fn api_error_has_openai_shape() {
        let e = ApiError::not_found("route \"x\" does not exist", "model_not_found")
            .with_param("model");
        let body = e.body();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "model_not_found");
        assert_eq!(body["error"]["param"], "model");
        assert_eq!(e.status, StatusCode::NOT_FOUND);
    }

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
