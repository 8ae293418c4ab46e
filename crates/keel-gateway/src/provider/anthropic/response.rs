//! An Anthropic Messages answer as an OpenAI chat completion, and an Anthropic error
//! body as an OpenAI error body.

use bytes::Bytes;
use http::StatusCode;
use keel_core::class::ErrorHint;

use crate::error::UpstreamError;
use crate::provider::Passed;
use serde::Deserialize;
use serde_json::{Map, Value, json};

/// A Messages answer, as far as keel reads it.
#[derive(Debug, Deserialize)]
struct Message {
    id: String,
    model: String,
    content: Vec<Block>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Usage,
}

/// A content block of an answer. Blocks keel does not ask for (`thinking`, server tools)
/// are skipped.
#[derive(Debug, Deserialize)]
#[serde(tag = "type")]
enum Block {
    #[serde(rename = "text")]
    Text { text: String },
    #[serde(rename = "tool_use")]
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
    #[serde(other)]
    Other,
}

/// Anthropic's token counts. Input tokens read from or written to the prompt cache are
/// counted apart from `input_tokens`; OpenAI's `prompt_tokens` includes them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
pub(super) struct Usage {
    #[serde(default)]
    pub input_tokens: u64,
    #[serde(default)]
    pub output_tokens: u64,
    #[serde(default)]
    pub cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    pub cache_read_input_tokens: Option<u64>,
}

impl Usage {
    /// Takes the counts `newer` reports (a stream's `message_delta` repeats some).
    pub(super) fn update(&mut self, newer: &Value) {
        let get = |key: &str| newer.get(key).and_then(Value::as_u64);
        if let Some(n) = get("input_tokens") {
            self.input_tokens = n;
        }
        if let Some(n) = get("output_tokens") {
            self.output_tokens = n;
        }
        if let Some(n) = get("cache_creation_input_tokens") {
            self.cache_creation_input_tokens = Some(n);
        }
        if let Some(n) = get("cache_read_input_tokens") {
            self.cache_read_input_tokens = Some(n);
        }
    }

    /// OpenAI's `usage` object.
    pub(super) fn to_openai(self) -> Value {
        let cached = self.cache_read_input_tokens.unwrap_or(0);
        let prompt = self.input_tokens + self.cache_creation_input_tokens.unwrap_or(0) + cached;
        json!({
            "prompt_tokens": prompt,
            "completion_tokens": self.output_tokens,
            "total_tokens": prompt + self.output_tokens,
            "prompt_tokens_details": { "cached_tokens": cached },
        })
    }
}

/// OpenAI's `finish_reason` for Anthropic's `stop_reason`.
pub(super) fn finish_reason(stop_reason: Option<&str>) -> &'static str {
    match stop_reason {
        Some("max_tokens" | "model_context_window_exceeded") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        // end_turn, stop_sequence, pause_turn, and anything newer: the model stopped.
        _ => "stop",
    }
}

/// The OpenAI `chat.completion` for a Messages answer; `Err` says what is malformed.
pub(super) fn chat_completion(body: &[u8], created: u64) -> Result<Bytes, String> {
    let message: Message =
        serde_json::from_slice(body).map_err(|e| format!("not an Anthropic message: {e}"))?;
    let mut text = String::new();
    let mut calls = Vec::new();
    for block in message.content {
        match block {
            Block::Text { text: t } => text.push_str(&t),
            Block::ToolUse { id, name, input } => calls.push(json!({
                "id": id,
                "type": "function",
                "function": { "name": name, "arguments": input.to_string() },
            })),
            Block::Other => {}
        }
    }
    let mut reply = Map::new();
    reply.insert("role".into(), "assistant".into());
    // OpenAI gives `content: null` for a turn that only calls tools.
    let content = if text.is_empty() && !calls.is_empty() {
        Value::Null
    } else {
        Value::String(text)
    };
    reply.insert("content".into(), content);
    if !calls.is_empty() {
        reply.insert("tool_calls".into(), Value::Array(calls));
    }
    reply.insert("refusal".into(), Value::Null);
    let completion = json!({
        "id": message.id,
        "object": "chat.completion",
        "created": created,
        "model": message.model,
        "choices": [{
            "index": 0,
            "message": reply,
            "logprobs": null,
            "finish_reason": finish_reason(message.stop_reason.as_deref()),
        }],
        "usage": message.usage.to_openai(),
    });
    serde_json::to_vec(&completion)
        .map(Bytes::from)
        .map_err(|e| e.to_string())
}

/// Anthropic's error body `{"type": "error", "error": {"type", "message"}}`.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Debug, Deserialize)]
pub(super) struct ErrorDetail {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub message: String,
}

/// An Anthropic error body in the OpenAI shape, and what it says of the cause. A body in
/// another shape (a proxy's page) is kept as it came, its hint read as for OpenAI.
pub(super) fn openai_error(body: &Bytes) -> (Bytes, ErrorHint) {
    let Ok(ErrorBody { error }) = serde_json::from_slice::<ErrorBody>(body) else {
        return (body.clone(), ErrorHint::from_body(body));
    };
    let hint = hint_of(&error);
    let (kind, code) = openai_kind(&error, hint);
    let translated = json!({"error": {
        "message": error.message,
        "type": kind,
        "code": code,
        "param": null,
    }});
    (Bytes::from(translated.to_string()), hint)
}

/// Whether `body` is Anthropic's error object (`{"type": "error", ...}`), sent in place of a
/// message.
pub(super) fn is_error_object(body: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Kind<'a> {
        #[serde(rename = "type", borrow)]
        kind: Option<&'a str>,
    }
    serde_json::from_slice::<Kind<'_>>(body).is_ok_and(|k| k.kind == Some("error"))
}

/// Anthropic's error object `body` (a stream's `error` event, or a 200 body in place of a
/// message) as the error the same error answered over HTTP is: its status from its type,
/// its body in the OpenAI shape.
pub(super) fn reported_error(target: String, body: &Bytes, passed: Passed) -> UpstreamError {
    let (translated, hint) = openai_error(body);
    UpstreamError::Status {
        target,
        status: status_of_kind(body),
        retry_after: None,
        body: translated,
        hint,
        passed,
    }
}

/// The HTTP status Anthropic answers an error of the type an error event (or body) names
/// with; 500 for a type it does not list.
pub(super) fn status_of_kind(event: &[u8]) -> StatusCode {
    let kind = serde_json::from_slice::<ErrorBody>(event).map(|b| b.error.kind);
    let code = match kind.as_deref() {
        Ok("invalid_request_error") => 400,
        Ok("authentication_error") => 401,
        Ok("billing_error") => 402,
        Ok("permission_error") => 403,
        Ok("not_found_error") => 404,
        Ok("request_too_large") => 413,
        Ok("rate_limit_error") => 429,
        Ok("timeout_error") => 504,
        Ok("overloaded_error") => 529,
        _ => 500,
    };
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// What an Anthropic error says of its cause.
pub(super) fn hint_of(error: &ErrorDetail) -> ErrorHint {
    let message = error.message.to_ascii_lowercase();
    match error.kind.as_str() {
        // "prompt is too long: 208310 tokens > 200000 maximum", or the prompt and
        // max_tokens together: "input length and `max_tokens` exceed context limit".
        "invalid_request_error"
            if message.contains("prompt is too long")
                || message.contains("exceed context limit")
                || message.contains("context window") =>
        {
            ErrorHint::ContextTooLong
        }
        // "model: claude-x"
        "not_found_error" if message.starts_with("model:") => ErrorHint::ModelNotFound,
        // "max_tokens: 32768 > 8192, which is the maximum allowed number of output tokens for
        // claude-...": another model may write that many.
        "invalid_request_error" if message.contains("maximum allowed number of output tokens") => {
            ErrorHint::Unsupported
        }
        // "Your credit balance is too low to access the Anthropic API...": keel's account.
        "billing_error" => ErrorHint::AccountRefused,
        "invalid_request_error" if message.contains("credit balance") => ErrorHint::AccountRefused,
        _ => ErrorHint::None,
    }
}

/// OpenAI's error `type` and `code` for an Anthropic error.
fn openai_kind(error: &ErrorDetail, hint: ErrorHint) -> (&'static str, String) {
    let code = match hint {
        ErrorHint::ContextTooLong => "context_length_exceeded".to_owned(),
        ErrorHint::ModelNotFound => "model_not_found".to_owned(),
        ErrorHint::AccountRefused => "billing_error".to_owned(),
        // OpenAI's code for it.
        ErrorHint::None if error.kind == "rate_limit_error" => "rate_limit_exceeded".to_owned(),
        ErrorHint::ContentFilter | ErrorHint::Unsupported | ErrorHint::None => error.kind.clone(),
    };
    let kind = match error.kind.as_str() {
        "authentication_error" => "authentication_error",
        "permission_error" => "permission_error",
        "rate_limit_error" => "rate_limit_error",
        "api_error" | "overloaded_error" | "timeout_error" => "server_error",
        _ => "invalid_request_error",
    };
    (kind, code)
}
