//! The provider seam: how the gateway talks to one kind of upstream API.
//!
//! The gateway speaks the OpenAI wire format on both sides. A provider takes an
//! OpenAI-shaped request body whose `model` is already the target's model and
//! returns an OpenAI-shaped answer: a JSON body, or a stream of SSE `data`
//! payloads (without the final `[DONE]`). A provider with another wire format
//! (Anthropic's Messages API) translates inside its own module; nothing else in
//! the gateway changes. Providers do not retry, time out or record: the route
//! executor does that around them.

pub mod anthropic;
mod client;
pub mod openai;
mod passed;

pub use passed::Passed;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

use crate::error::UpstreamError;

/// Which OpenAI endpoint a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /chat/completions`.
    ChatCompletions,
    /// `POST /embeddings`.
    Embeddings,
}

impl Endpoint {
    /// Path relative to the provider's `base_url`.
    pub fn path(self) -> &'static str {
        match self {
            Self::ChatCompletions => "/chat/completions",
            Self::Embeddings => "/embeddings",
        }
    }
}

/// The chunks a stream of the whole `chat.completion` `answer` would have sent, for a server
/// that ignored `stream: true`: per choice, one chunk with the message's members (the role,
/// the content, and whatever else it holds: a refusal, reasoning, annotations, a legacy
/// `function_call`), its tool calls each with their `index`; then one chunk of every
/// choice's `finish_reason`; then the usage, when the answer has one, in a chunk of its own.
/// `None` when `answer` is not a chat completion with choices to send.
pub(crate) fn completion_chunks(answer: &[u8]) -> Option<Vec<Bytes>> {
    use serde_json::{Value, json};
    let answer: Value = serde_json::from_slice(answer).ok()?;
    let choices = answer.get("choices")?.as_array()?;
    let chunk = |choices: Value, usage: Option<&Value>| {
        let mut chunk = serde_json::Map::new();
        for key in ["id", "created", "model", "system_fingerprint"] {
            if let Some(value) = answer.get(key) {
                chunk.insert(key.to_owned(), value.clone());
            }
        }
        chunk.insert("object".to_owned(), json!("chat.completion.chunk"));
        chunk.insert("choices".to_owned(), choices);
        if let Some(usage) = usage {
            chunk.insert("usage".to_owned(), usage.clone());
        }
        Bytes::from(Value::Object(chunk).to_string())
    };
    let mut chunks = Vec::with_capacity(choices.len() + 2);
    let mut finishes = Vec::with_capacity(choices.len());
    for (i, choice) in choices.iter().enumerate() {
        let index = choice.get("index").cloned().unwrap_or_else(|| json!(i));
        let message = choice.get("message").and_then(Value::as_object)?;
        let mut delta = serde_json::Map::new();
        delta.insert("role".to_owned(), json!("assistant"));
        delta.insert("content".to_owned(), Value::Null);
        for (key, value) in message {
            match key.as_str() {
                // `"tool_calls": null` and the like: nothing to send (servers write them).
                _ if value.is_null() => {}
                "tool_calls" => {
                    let calls = value.as_array()?;
                    let mut indexed = Vec::with_capacity(calls.len());
                    for (k, call) in calls.iter().enumerate() {
                        let mut call = call.as_object()?.clone();
                        call.insert("index".to_owned(), json!(k));
                        indexed.push(Value::Object(call));
                    }
                    delta.insert(key.clone(), Value::Array(indexed));
                }
                _ => {
                    delta.insert(key.clone(), value.clone());
                }
            }
        }
        let mut said = json!({"index": index, "delta": delta, "finish_reason": null});
        if let Some(logprobs) = choice.get("logprobs").filter(|v| !v.is_null()) {
            said["logprobs"] = logprobs.clone();
        }
        chunks.push(chunk(json!([said]), None));
        let reason = choice
            .get("finish_reason")
            .filter(|v| !v.is_null())
            .cloned()
            .unwrap_or_else(|| json!("stop"));
        finishes.push(json!({"index": index, "delta": {}, "finish_reason": reason}));
    }
    if finishes.is_empty() {
        return None;
    }
    chunks.push(chunk(Value::Array(finishes), None));
    if let Some(usage) = answer.get("usage").filter(|u| !u.is_null()) {
        chunks.push(chunk(json!([]), Some(usage)));
    }
    Some(chunks)
}

/// One request to one target.
#[derive(Debug, Clone)]
pub struct ProviderRequest {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// OpenAI-shaped JSON body with `model` set to the target's model.
    pub body: Bytes,
    /// Whether the body asks for `stream: true`.
    pub stream: bool,
    /// `provider/model`, for error messages.
    pub target: String,
}

/// A stream of SSE `data` payloads, each one OpenAI chunk (JSON), `[DONE]` excluded.
///
/// The stream ends cleanly only after the upstream sent `[DONE]` (or closed cleanly right
/// after a chunk that finished the answer); an upstream that stops early yields an error, so
/// truncation is never silent. An error the upstream reports inside the stream is an
/// [`UpstreamError::Status`] whose body is its error event.
pub type ChunkStream = BoxStream<'static, Result<Bytes, UpstreamError>>;

/// A successful answer from a provider.
pub enum ProviderReply {
    /// A complete JSON body, and the answer's headers to pass on.
    Json(Bytes, Passed),
    /// A stream of chunks, and the answer's headers to pass on.
    Stream(ChunkStream, Passed),
}

/// One kind of upstream API.
#[async_trait]
pub trait Provider: Send + Sync {
    /// Sends one attempt. Must not retry. Errors carry the target, never secrets.
    async fn send(&self, request: ProviderRequest) -> Result<ProviderReply, UpstreamError>;
}

#[cfg(test)]
mod chunk_tests {
    #[test]
    fn a_whole_completion_becomes_the_chunks_of_its_stream() {
        use serde_json::{Value, json};
        let answer = json!({
            "id": "c1", "object": "chat.completion", "created": 7, "model": "m",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"},
                {"index": 1, "message": {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                ]}, "finish_reason": "tool_calls"},
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        });
        let chunks: Vec<Value> = super::completion_chunks(answer.to_string().as_bytes())
            .unwrap()
            .iter()
            .map(|c| serde_json::from_slice(c).unwrap())
            .collect();
        assert_eq!(chunks.len(), 4);
        assert!(
            chunks
                .iter()
                .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == "c1")
        );
        assert_eq!(chunks[0]["choices"][0]["delta"]["content"], "hi");
        assert!(chunks[0]["choices"][0]["finish_reason"].is_null());
        let call = &chunks[1]["choices"][0]["delta"]["tool_calls"][0];
        assert_eq!(
            (call["index"].clone(), call["id"].clone()),
            (json!(0), json!("call_1"))
        );
        let reasons: Vec<&Value> = chunks[2]["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| &c["finish_reason"])
            .collect();
        assert_eq!(reasons, [&json!("stop"), &json!("tool_calls")]);
        assert_eq!(chunks[3]["choices"], json!([]));
        assert_eq!(chunks[3]["usage"]["total_tokens"], 5);
        // Not a completion, or a tool call that is no object: nothing to send.
        assert!(super::completion_chunks(br#"{"data": []}"#).is_none());
        assert!(super::completion_chunks(br#"{"choices": []}"#).is_none());
        let odd = br#"{"choices": [{"message": {"role": "assistant", "tool_calls": ["x"]}}]}"#;
        assert!(super::completion_chunks(odd).is_none());
        // Members written as null, as some servers do, are left out, not refused.
        let nulls = br#"{"choices": [{"message": {"role": "assistant", "content": "ok", "tool_calls": null, "refusal": null}, "finish_reason": null}]}"#;
        let chunks: Vec<Value> = super::completion_chunks(nulls)
            .unwrap()
            .iter()
            .map(|c| serde_json::from_slice(c).unwrap())
            .collect();
        let delta = &chunks[0]["choices"][0]["delta"];
        assert_eq!(delta, &json!({"role": "assistant", "content": "ok"}));
        assert_eq!(chunks[1]["choices"][0]["finish_reason"], "stop");
    }
}
