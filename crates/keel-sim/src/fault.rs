//! What a scripted fault does to one request.
//!
//! A [`Fault`] is plain data: it is queued by [`SimHandle::script`](crate::SimHandle::script),
//! made sticky by [`SimHandle::set_always`](crate::SimHandle::set_always), or sent as JSON to
//! `POST /_sim/script`. The server module interprets it; this module owns only the shape and
//! the small amount of meaning that does not need I/O (defaults, which status a code implies).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How long `stall_after_chunks` stays silent when `stall` is not given.
pub const DEFAULT_STALL: Duration = Duration::from_secs(3600);

/// One injected misbehaviour, applied to a single request (or to every request while sticky).
///
/// The parts apply in this order: `delay`, then `drop_connection`, then `status` /
/// `error_code`, then `malformed`, then the normal answer shaped by `reply`,
/// `chunk_interval`, `cut_after_chunks` and `stall_after_chunks`. `retry_after` is added
/// to whatever response is sent. All fields default to "no fault", so
/// `Fault::default()` answers normally.
///
/// ```
/// use keel_sim::Fault;
/// let outage = Fault::status(503).with_retry_after("1");
/// assert_eq!(outage.status, Some(503));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// Answer this HTTP status with an error body in the endpoint's shape (OpenAI's, or
    /// Anthropic's on `/v1/messages`).
    #[serde(default)]
    pub status: Option<u16>,
    /// The error body's `error.code`, e.g. `context_length_exceeded`, `model_not_found`.
    /// Without `status`, the status is implied by the code (see [`Fault::effective_status`]).
    #[serde(default)]
    pub error_code: Option<String>,
    /// `Retry-After` header value, e.g. `"1"` (seconds), added to the response.
    #[serde(default)]
    pub retry_after: Option<String>,
    /// Wait this long before answering (before the response headers).
    #[serde(with = "humantime_serde", default)]
    pub delay: Option<Duration>,
    /// Close the TCP connection without sending any response.
    #[serde(default)]
    pub drop_connection: bool,
    /// Streaming: send the role chunk and N content chunks, then abort the connection
    /// (no finish chunk, no `[DONE]`). Non-streaming: behaves as `drop_connection`.
    #[serde(default)]
    pub cut_after_chunks: Option<u32>,
    /// Streaming: send the role chunk and N content chunks, then go silent for `stall`,
    /// then finish normally. Non-streaming: a delay of `stall` before the answer.
    #[serde(default)]
    pub stall_after_chunks: Option<u32>,
    /// How long `stall_after_chunks` stays silent; [`DEFAULT_STALL`] (1h) when absent.
    #[serde(with = "humantime_serde", default)]
    pub stall: Option<Duration>,
    /// Answer 200 with a body that is not valid JSON (for streams: an SSE event whose data
    /// is not valid JSON, followed by `[DONE]`).
    #[serde(default)]
    pub malformed: bool,
    /// Override the assistant text. When set, the answer is this text even if tools were
    /// offered.
    #[serde(default)]
    pub reply: Option<String>,
    /// Streaming: wait this long between SSE events (pacing, for time-to-first-token and
    /// idle-timeout tests).
    #[serde(with = "humantime_serde", default)]
    pub chunk_interval: Option<Duration>,
    /// Chat: report an error the way OpenAI, vLLM and OpenRouter do once an answer has
    /// started. Streaming: send the role chunk and N content chunks, then an event
    /// `{"error": {...}}` (its code `error_code`, else `server_error`), and close without
    /// `[DONE]`. Not streaming: answer 200 with that error object as the body.
    #[serde(default)]
    pub error_event_after_chunks: Option<u32>,
    /// Chat streaming: leave out the final `data: [DONE]`; the stream closes cleanly after
    /// its last chunk, as some OpenAI-compatible servers do.
    #[serde(default)]
    pub no_done: bool,
    /// Chat: answer a streaming request with the whole completion as JSON
    /// (`application/json`), as a server or proxy that ignores `stream` does.
    #[serde(default)]
    pub ignore_stream: bool,
    /// Chat streaming: send only the opening role chunk, then `[DONE]`: an empty answer with
    /// no finish chunk, as some servers and proxies end a stream that produced nothing.
    #[serde(default)]
    pub only_opening: bool,
    /// Chat: report no token usage: no `usage` in the answer, and no usage chunk at the end
    /// of a stream even when `stream_options.include_usage` asks for one, as some
    /// OpenAI-compatible servers do.
    #[serde(default)]
    pub no_usage: bool,
    /// Tools only: answer `302 Found` with this `Location` instead.
    #[serde(default)]
    pub redirect: Option<String>,
    /// Chat, not streaming: the answer carries a member `keel_sim_nested` of arrays nested
    /// this deep (a provider's answer nesting deeper than a log can hold inside an event).
    /// With an error status (`status`, or one `error_code` implies) on an OpenAI-shaped
    /// endpoint (chat, streaming or not; embeddings; tools), the error body carries it
    /// instead. Anthropic-shaped answers and errors ignore it.
    #[serde(default)]
    pub nest: Option<u32>,
    /// The error body's `error.message` on an OpenAI-shaped endpoint, for a provider's own
    /// wording (`"Unrecognized request argument supplied: stream_options"`); by default the
    /// message OpenAI gives for `error_code`, or one naming the status.
    #[serde(default)]
    pub message: Option<String>,
}

// === impl Fault ===

impl Fault {
    /// A fault answering `status` with an OpenAI-shaped error body.
    pub fn status(status: u16) -> Self {
        Self {
            status: Some(status),
            ..Self::default()
        }
    }

    /// A fault answering the error `code`; the status is implied by the code unless set.
    pub fn error_code(code: impl Into<String>) -> Self {
        Self {
            error_code: Some(code.into()),
            ..Self::default()
        }
    }

    /// A fault closing the connection without any response.
    pub fn drop_connection() -> Self {
        Self {
            drop_connection: true,
            ..Self::default()
        }
    }

    /// A fault aborting a stream after `chunks` content chunks.
    pub fn cut_after(chunks: u32) -> Self {
        Self {
            cut_after_chunks: Some(chunks),
            ..Self::default()
        }
    }

    /// A fault reporting an error event after `chunks` content chunks of a stream (a 200
    /// error object for a call that does not stream); see
    /// [`Fault::error_event_after_chunks`].
    pub fn error_event_after(chunks: u32) -> Self {
        Self {
            error_event_after_chunks: Some(chunks),
            ..Self::default()
        }
    }

    /// A fault making a stream silent for `stall` after `chunks` content chunks.
    pub fn stall_after(chunks: u32, stall: Duration) -> Self {
        Self {
            stall_after_chunks: Some(chunks),
            stall: Some(stall),
            ..Self::default()
        }
    }

    /// A fault answering 200 with a truncated, invalid JSON body.
    pub fn malformed() -> Self {
        Self {
            malformed: true,
            ..Self::default()
        }
    }

    /// A fault that only waits `delay` before answering normally.
    pub fn delay(delay: Duration) -> Self {
        Self {
            delay: Some(delay),
            ..Self::default()
        }
    }

    /// A fault that answers normally with `text` as the assistant content.
    pub fn reply(text: impl Into<String>) -> Self {
        Self {
            reply: Some(text.into()),
            ..Self::default()
        }
    }

    /// Adds a `Retry-After` header value (e.g. `"1"`).
    #[must_use]
    pub fn with_retry_after(mut self, value: impl Into<String>) -> Self {
        self.retry_after = Some(value.into());
        self
    }

    /// Adds an `error.code` to the error body.
    #[must_use]
    pub fn with_error_code(mut self, code: impl Into<String>) -> Self {
        self.error_code = Some(code.into());
        self
    }

    /// Adds a delay before the answer.
    #[must_use]
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    /// The error status this fault answers, if it answers an error: `status` when given,
    /// otherwise the status OpenAI uses for `error_code` (`model_not_found` 404,
    /// `invalid_api_key` 401, `rate_limit_exceeded`/`insufficient_quota` 429, anything else 400),
    /// and Anthropic's 529 for `overloaded_error`. With `error_event_after_chunks` the code is
    /// the error event's, and only `status` answers an error status.
    pub fn effective_status(&self) -> Option<u16> {
        if let Some(status) = self.status {
            return Some(status);
        }
        if self.error_event_after_chunks.is_some() {
            return None;
        }
        self.error_code.as_deref().map(|code| match code {
            "model_not_found" => 404,
            "invalid_api_key" => 401,
            "rate_limit_exceeded" | "insufficient_quota" => 429,
            "overloaded_error" => 529,
            _ => 400,
        })
    }

    /// How long a stall lasts: `stall`, or [`DEFAULT_STALL`].
    pub fn stall_duration(&self) -> Duration {
        self.stall.unwrap_or(DEFAULT_STALL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_humantime_durations_and_rejects_unknown_fields() {
        let fault: Fault =
            serde_json::from_str(r#"{"status": 503, "retry_after": "1", "delay": "250ms"}"#)
                .unwrap();
        assert_eq!(fault.status, Some(503));
        assert_eq!(fault.delay, Some(Duration::from_millis(250)));
        assert!(serde_json::from_str::<Fault>(r#"{"statuss": 503}"#).is_err());
        let empty: Fault = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, Fault::default());
    }

    #[test]
    fn error_code_implies_status() {
        assert_eq!(
            Fault::error_code("model_not_found").effective_status(),
            Some(404)
        );
        assert_eq!(
            Fault::error_code("context_length_exceeded").effective_status(),
            Some(400)
        );
        assert_eq!(
            Fault::status(503).with_error_code("x").effective_status(),
            Some(503)
        );
        assert_eq!(Fault::drop_connection().effective_status(), None);
    }
}
