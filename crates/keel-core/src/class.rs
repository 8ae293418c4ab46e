//! The one classification of upstream failures (DESIGN §5).
//!
//! Every failure of an attempt is put in exactly one [`ErrorClass`]; the retry
//! and fallback machinery acts on the class only, never on raw statuses.

use http::StatusCode;

/// What the retry and fallback machinery may do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Try the same target again after backoff.
    Retryable,
    /// Skip to the next target in the route; retrying this one cannot help.
    FallbackOnly,
    /// Return to the client unchanged.
    Fatal,
}

impl ErrorClass {
    /// Lowercase name for events and metrics (`retryable`, `fallback_only`, `fatal`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Retryable => "retryable",
            Self::FallbackOnly => "fallback_only",
            Self::Fatal => "fatal",
        }
    }
}

/// Why a non-success HTTP answer failed, read from the provider's error body.
///
/// Providers use the OpenAI error shape `{"error":{"code","type","message"}}`
/// with varying codes; [`ErrorHint::from_body`] maps the known spellings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorHint {
    /// The prompt does not fit the model's context window.
    ContextTooLong,
    /// The provider does not serve the requested model.
    ModelNotFound,
    /// The provider's content filter refused the request.
    ContentFilter,
    /// The target cannot serve the request as asked: its API lacks a parameter or endpoint
    /// (keel found this while translating the request for it and sent nothing), or the
    /// model writes fewer tokens than the request's `max_tokens` asks for (OpenAI's "max_tokens
    /// is too large", Anthropic's "the maximum allowed number of output tokens").
    Unsupported,
    /// The provider refused keel's account, not the request (OpenAI's `insufficient_quota`,
    /// Anthropic's "credit balance is too low"): another provider may answer, and the
    /// client is not at fault.
    AccountRefused,
    /// Nothing recognised.
    None,
}

impl ErrorHint {
    /// Reads the hint from an error body (any JSON or text; unknown shapes give `None`).
    pub fn from_body(body: &[u8]) -> Self {
        let text = String::from_utf8_lossy(body).to_ascii_lowercase();
        if text.contains("context_length_exceeded")
            || text.contains("maximum context length")
            || text.contains("context window")
            || text.contains("too many tokens")
        {
            Self::ContextTooLong
        } else if text.contains("model_not_found")
            || (text.contains("model") && text.contains("does not exist"))
        {
            Self::ModelNotFound
        } else if text.contains("content_filter")
            || text.contains("content_policy_violation")
            || text.contains("content management policy")
        {
            Self::ContentFilter
        } else if text.contains("max_tokens is too large")
            || text.contains("maximum allowed number of output tokens")
        {
            // Another model may write that many.
            Self::Unsupported
        } else if text.contains("insufficient_quota") {
            // OpenAI's 429 for a spent quota or an unpaid bill: no retry brings it back.
            Self::AccountRefused
        } else {
            Self::None
        }
    }
}

/// Classifies an upstream HTTP answer that was not a success.
///
/// Retryable: 408, 429, 500, 502, 503, 504, and every other 5xx but 501 (529, Anthropic's
/// "overloaded"; the 520-524 a CDN in front of a provider answers when the provider failed
/// it; the OpenAI SDKs retry every 5xx too).
/// Fallback-only: context too long, model not found at that provider, content filter
/// (whatever status carries them), a request the provider's API cannot express, the
/// provider refusing keel's account, and 501 (the server does not implement what was asked:
/// asking it again cannot help, another provider may).
/// Fatal: every other status, 400, 401, 403, 404 and 422 among them.
pub fn classify_status(status: StatusCode, hint: ErrorHint) -> ErrorClass {
    match hint {
        ErrorHint::ContextTooLong
        | ErrorHint::ModelNotFound
        | ErrorHint::ContentFilter
        | ErrorHint::Unsupported
        | ErrorHint::AccountRefused => {
            return ErrorClass::FallbackOnly;
        }
        ErrorHint::None => {}
    }
    match status.as_u16() {
        501 => ErrorClass::FallbackOnly,
        408 | 429 | 500..=599 => ErrorClass::Retryable,
        _ => ErrorClass::Fatal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_table() {
        let model_gone =
            br#"{"error":{"code":"model_not_found","message":"The model `x` does not exist"}}"#;
        let too_long = br#"{"error":{"code":"context_length_exceeded","message":"maximum context length is 8192 tokens"}}"#;
        let filtered = br#"{"error":{"code":"content_filter","message":"filtered"}}"#;
        let plain = br#"{"error":{"message":"bad"}}"#;
        let too_many_out = br#"{"error":{"message":"max_tokens is too large: 100000. This model supports at most 16384 completion tokens, whereas you provided 100000.","type":"invalid_request_error","param":"max_tokens","code":null}}"#;
        let quota = br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#;
        let table: &[(u16, &[u8], ErrorClass)] = &[
            (408, plain, ErrorClass::Retryable),
            (429, plain, ErrorClass::Retryable),
            (429, quota, ErrorClass::FallbackOnly),
            (500, plain, ErrorClass::Retryable),
            (502, b"<html>bad gateway</html>", ErrorClass::Retryable),
            (503, b"", ErrorClass::Retryable),
            (504, plain, ErrorClass::Retryable),
            (529, plain, ErrorClass::Retryable),
            (400, too_long, ErrorClass::FallbackOnly),
            (404, model_gone, ErrorClass::FallbackOnly),
            (400, filtered, ErrorClass::FallbackOnly),
            (400, plain, ErrorClass::Fatal),
            (401, plain, ErrorClass::Fatal),
            (403, plain, ErrorClass::Fatal),
            (404, plain, ErrorClass::Fatal),
            (422, plain, ErrorClass::Fatal),
            (501, plain, ErrorClass::FallbackOnly),
            (400, too_many_out, ErrorClass::FallbackOnly),
            (505, plain, ErrorClass::Retryable),
            (520, b"<html>origin error</html>", ErrorClass::Retryable),
            (
                524,
                b"<html>a timeout occurred</html>",
                ErrorClass::Retryable,
            ),
            (409, plain, ErrorClass::Fatal),
            (413, plain, ErrorClass::Fatal),
        ];
        for (status, body, want) in table {
            let status = StatusCode::from_u16(*status).unwrap();
            let got = classify_status(status, ErrorHint::from_body(body));
            assert_eq!(
                got,
                *want,
                "status {status} body {}",
                String::from_utf8_lossy(body)
            );
        }
        assert_eq!(
            classify_status(StatusCode::BAD_REQUEST, ErrorHint::Unsupported),
            ErrorClass::FallbackOnly
        );
    }
}
