//! The error every keel HTTP endpoint answers with, in the OpenAI shape
//! `{"error":{"message","type","code","param"}}` with the right status, so
//! OpenAI SDKs raise their usual exception classes (DESIGN §3).

use http::StatusCode;

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
    /// An error with `status`, OpenAI error `kind` and `message`.
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
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

    /// 502: a tool (or another upstream) answered something unusable.
    pub fn bad_gateway(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::BAD_GATEWAY, "api_error", message);
        e.code = Some("bad_gateway");
        e
    }

    /// 504: the call's total deadline passed.
    pub fn timeout(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::GATEWAY_TIMEOUT, "api_error", message);
        e.code = Some("timeout");
        e
    }

    /// 409: the request conflicts with the resource's state (a stale lease, a finished task).
    pub fn conflict(message: impl Into<String>, code: &'static str) -> Self {
        let mut e = Self::new(StatusCode::CONFLICT, "invalid_request_error", message);
        e.code = Some(code);
        e
    }

    /// 422: well-formed but invalid.
    pub fn unprocessable(message: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request_error",
            message,
        );
        e.code = Some("invalid_value");
        e
    }

    /// 500: keel itself failed (the store, say); the message says what.
    pub fn internal(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::INTERNAL_SERVER_ERROR, "api_error", message);
        e.code = Some("internal_error");
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

#[cfg(feature = "axum")]
impl axum::response::IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
        }
        response
    }
}

/// Middleware: an error answer that is not JSON (axum's own rejections: a wrong method, a
/// body over the limit, a query string that does not parse) is rewritten in the OpenAI
/// shape with the same status and headers, its text as the message (a body over the limit
/// names the limit in force, `max_body_bytes`, the middleware's state). Answers keel built
/// itself are JSON already and pass untouched.
#[cfg(feature = "axum")]
pub async fn openai_shaped(
    axum::extract::State(max_body_bytes): axum::extract::State<usize>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let json = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_owned();
    let message = match status {
        // axum's own words ("length limit exceeded") name neither the limit nor its setting.
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::too_large(max_body_bytes).message,
        StatusCode::METHOD_NOT_ALLOWED if text.is_empty() => "method not allowed here".to_owned(),
        other if text.is_empty() => other.canonical_reason().unwrap_or("error").to_lowercase(),
        _ => text,
    };
    let (kind, code) = match status {
        StatusCode::METHOD_NOT_ALLOWED => ("invalid_request_error", "method_not_allowed"),
        StatusCode::PAYLOAD_TOO_LARGE => ("invalid_request_error", "request_too_large"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("invalid_request_error", "unsupported_media_type"),
        s if s.is_client_error() => ("invalid_request_error", "invalid_request"),
        _ => ("api_error", "internal_error"),
    };
    let mut answer = ApiError::new(status, kind, message)
        .with_code(code)
        .into_response();
    parts.headers.remove(http::header::CONTENT_TYPE);
    parts.headers.remove(http::header::CONTENT_LENGTH);
    parts.headers.extend(answer.headers_mut().drain());
    *answer.headers_mut() = parts.headers;
    answer
}

/// The credentials of an `Authorization` header of the `Bearer` scheme, whose name is
/// case-insensitive (RFC 9110 §11.1: `bearer` and `BEARER` are the same scheme); `None` for
/// another scheme or no credentials.
pub fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
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
    fn the_bearer_scheme_is_case_insensitive() {
        for header in ["Bearer k1", "bearer k1", "BEARER  k1 ", " Bearer k1"] {
            assert_eq!(super::bearer_token(header), Some("k1"), "{header:?}");
        }
        for header in ["Basic k1", "Bearer", "Bearer   ", "k1", "Bearerk1"] {
            assert_eq!(super::bearer_token(header), None, "{header:?}");
        }
    }
}
