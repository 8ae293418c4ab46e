//! Anthropic's Messages event stream as OpenAI `chat.completion.chunk`s.
//!
//! | Anthropic event | OpenAI chunk |
//! | --- | --- |
//! | `message_start` | the role chunk, `{"role": "assistant", "content": ""}`, sent with the first chunk after it, so the stream commits at its first content, not before (an `overloaded_error` right after `message_start` is retried) |
//! | `content_block_start` (`tool_use`) | a tool call's first delta: `index`, `id`, `name`, `arguments: ""` |
//! | `content_block_delta` (`text_delta`) | a content delta |
//! | `content_block_delta` (`input_json_delta`) | an arguments delta of that tool call |
//! | `message_delta` | the finish chunk, `finish_reason` from `stop_reason` |
//! | `message_stop` | the usage-only chunk (`choices: []`) when `include_usage`; then the end |
//! | `content_block_stop` of a `tool_use` block whose input had no text | the arguments `{}` (a tool without parameters; OpenAI sends `{}` too) |
//! | `ping`, other `content_block_stop`s, thinking deltas, unknown events | nothing |
//! | `error` | an error: the stream failed |
//!
//! The stream ends cleanly only after `message_stop`, as an OpenAI stream does after
//! `[DONE]`: a body that ends before it is an error, never a silent truncation.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::BodyExt;
use serde_json::{Value, json};

use super::response::{Usage, finish_reason};
use crate::error::UpstreamError;
use crate::provider::client::{Body, SseParser, error_chain};
use crate::provider::{ChunkStream, Passed};

/// Why an event cannot be translated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Broken {
    /// The event is not what the protocol promises.
    Malformed(String),
    /// The connection broke.
    Upstream(String),
    /// Anthropic reported an error in the stream (`{"type": "error", "error": {"type":
    /// "overloaded_error", ...}}`): the event as it came.
    Reported(Bytes),
}

/// The state of one stream's translation.
#[derive(Debug)]
pub(super) struct Translator {
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    /// Content block index → the OpenAI tool-call index of its `tool_use` block, and
    /// whether any of its input text has come.
    tools: HashMap<u64, (u64, bool)>,
    usage: Usage,
    finished: bool,
    /// `message_start` came and its role chunk waits for the first chunk after it.
    role_pending: bool,
}

/// What one event gave: chunks to send, and whether the stream is complete.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Output {
    pub chunks: Vec<Bytes>,
    pub end: bool,
}

impl Translator {
    /// A translator for a stream started at `created` (Unix seconds); `include_usage`
    /// adds the usage-only chunk at the end.
    pub(super) fn new(created: u64, include_usage: bool) -> Self {
        Self {
            id: String::new(),
            model: String::new(),
            created,
            include_usage,
            tools: HashMap::new(),
            usage: Usage::default(),
            finished: false,
            role_pending: false,
        }
    }

    /// Translates one event's data.
    pub(super) fn event(&mut self, data: &[u8]) -> Result<Output, Broken> {
        let event: Value = serde_json::from_slice(data)
            .map_err(|e| Broken::Malformed(format!("an event is not JSON: {e}")))?;
        let mut out = Output::default();
        match event.get("type").and_then(Value::as_str) {
            Some("message_start") => {
                let message = &event["message"];
                self.id = message["id"].as_str().unwrap_or_default().to_owned();
                self.model = message["model"].as_str().unwrap_or_default().to_owned();
                self.usage.update(&message["usage"]);
                self.role_pending = true;
            }
            Some("content_block_start") => self.block_start(&event, &mut out),
            Some("content_block_delta") => self.block_delta(&event, &mut out)?,
            Some("content_block_stop") => {
                let block = event["index"].as_u64();
                if let Some((index, false)) = block.and_then(|b| self.tools.get(&b)).copied() {
                    let call = json!({ "index": index, "function": { "arguments": "{}" } });
                    out.chunks
                        .push(self.chunk(json!({ "tool_calls": [call] }), None));
                }
            }
            Some("message_delta") => {
                self.usage.update(&event["usage"]);
                let stop = event.pointer("/delta/stop_reason").and_then(Value::as_str);
                out.chunks
                    .push(self.chunk(json!({}), Some(finish_reason(stop))));
                self.finished = true;
            }
            Some("message_stop") => {
                if !self.finished {
                    out.chunks.push(self.chunk(json!({}), Some("stop")));
                    self.finished = true;
                }
                if self.include_usage {
                    out.chunks.push(self.usage_chunk());
                }
                out.end = true;
            }
            Some("error") => return Err(Broken::Reported(Bytes::from(event.to_string()))),
            // ping, and event types newer than this translation.
            _ => {}
        }
        if self.role_pending && !out.chunks.is_empty() {
            self.role_pending = false;
            let role = self.chunk(json!({"role": "assistant", "content": ""}), None);
            out.chunks.insert(0, role);
        }
        Ok(out)
    }

    fn block_start(&mut self, event: &Value, out: &mut Output) {
        let block = &event["content_block"];
        match block["type"].as_str() {
            Some("text") => {
                if let Some(text) = block["text"].as_str().filter(|t| !t.is_empty()) {
                    out.chunks
                        .push(self.chunk(json!({ "content": text }), None));
                }
            }
            Some("tool_use") => {
                let index = u64::try_from(self.tools.len()).unwrap_or(u64::MAX);
                if let Some(block_index) = event["index"].as_u64() {
                    self.tools.insert(block_index, (index, false));
                }
                let call = json!({
                    "index": index,
                    "id": block["id"],
                    "type": "function",
                    "function": { "name": block["name"], "arguments": "" },
                });
                out.chunks
                    .push(self.chunk(json!({ "tool_calls": [call] }), None));
            }
            _ => {}
        }
    }

    fn block_delta(&mut self, event: &Value, out: &mut Output) -> Result<(), Broken> {
        let delta = &event["delta"];
        match delta["type"].as_str() {
            Some("text_delta") => {
                if let Some(text) = delta["text"].as_str().filter(|t| !t.is_empty()) {
                    out.chunks
                        .push(self.chunk(json!({ "content": text }), None));
                }
            }
            Some("input_json_delta") => {
                let Some(partial) = delta["partial_json"].as_str().filter(|p| !p.is_empty()) else {
                    return Ok(());
                };
                let (index, got_input) = event["index"]
                    .as_u64()
                    .and_then(|i| self.tools.get_mut(&i))
                    .ok_or_else(|| {
                        Broken::Malformed("tool input for a block that is not a tool_use".into())
                    })?;
                *got_input = true;
                let index = *index;
                let call = json!({ "index": index, "function": { "arguments": partial } });
                out.chunks
                    .push(self.chunk(json!({ "tool_calls": [call] }), None));
            }
            // thinking, signatures, citations: not part of an OpenAI answer.
            _ => {}
        }
        Ok(())
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Bytes {
        let chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }],
        });
        Bytes::from(chunk.to_string())
    }

    fn usage_chunk(&self) -> Bytes {
        let chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": self.usage.to_openai(),
        });
        Bytes::from(chunk.to_string())
    }
}

/// Where a stream is.
struct State {
    bytes: http_body_util::BodyDataStream<Body>,
    parser: SseParser,
    translator: Translator,
    pending: VecDeque<Bytes>,
    target: String,
    /// `message_stop` was seen, or the stream failed: nothing more is read.
    over: bool,
}

/// The OpenAI chunks of an Anthropic event stream; see the module docs.
pub(super) fn chunks(body: Body, target: String, translator: Translator) -> ChunkStream {
    let state = State {
        bytes: body.into_data_stream(),
        parser: SseParser::default(),
        translator,
        pending: VecDeque::new(),
        target,
        over: false,
    };
    futures::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(chunk) = s.pending.pop_front() {
                return Some((Ok(chunk), s));
            }
            if s.over {
                return None;
            }
            if let Some(data) = s.parser.next_data() {
                match s.translator.event(&data) {
                    Ok(out) => {
                        s.pending.extend(out.chunks);
                        s.over = out.end;
                    }
                    Err(broken) => {
                        s.over = true;
                        let err = failure(&s.target, broken);
                        return Some((Err(err), s));
                    }
                }
                continue;
            }
            let broken = match s.bytes.next().await {
                Some(Ok(bytes)) => match s.parser.push(&bytes) {
                    Ok(()) => continue,
                    Err(detail) => Broken::Malformed(detail),
                },
                Some(Err(e)) => {
                    Broken::Upstream(format!("stream broke: {}", error_chain(e.as_ref())))
                }
                None => Broken::Malformed("stream ended without message_stop".to_owned()),
            };
            s.over = true;
            return Some((Err(failure(&s.target, broken)), s));
        }
    })
    // Ended, it stays ended: an unfold polled again after its end panics.
    .fuse()
    .boxed()
}

fn failure(target: &str, broken: Broken) -> UpstreamError {
    let target = target.to_owned();
    match broken {
        Broken::Malformed(detail) => UpstreamError::malformed(target, detail),
        // A connection that broke: the upstream failing mid-answer.
        Broken::Upstream(detail) => UpstreamError::connect(target, detail),
        // Anthropic's own error event, classified like the same error sent as an HTTP
        // answer (an overload retried, a prompt too long sent on to the next target).
        Broken::Reported(event) => {
            super::response::reported_error(target, &event, Passed::default())
        }
    }
}
