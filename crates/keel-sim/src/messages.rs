//! The deterministic answer to `POST /v1/messages`, in Anthropic's Messages wire shapes.
//!
//! [`plan`] checks a request the way Anthropic does (unknown fields, a missing
//! `max_tokens`, a `tool_use` without its `tool_result` right after, ... are a 400) and
//! decides the answer like the chat simulator: a `tool_use` of the chosen tool when the
//! last user turn is not a tool result, `"sim saw tool result: ..."` after one, else
//! `"sim reply to: ..."`; `stop_sequences` and `max_tokens` cut a text answer as
//! Anthropic's would (`stop_sequence`, `max_tokens`). [`message`] and [`stream_events`]
//! render it; [`error_body`] renders a fault in Anthropic's error shape.

use bytes::Bytes;
use http::StatusCode;
use serde_json::{Value, json};

use crate::chat::{Answer, placeholder, split_pieces, truncate, words};

/// The top-level members the Messages API takes; anything else is refused.
const KNOWN: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "system",
    "stop_sequences",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "tools",
    "tool_choice",
    "metadata",
    "thinking",
    "service_tier",
];

/// A Messages request, understood.
#[derive(Debug, Clone)]
pub(crate) struct MessagesPlan {
    /// `stream: true` was asked.
    pub stream: bool,
    /// What to answer (a text already cut by a stop sequence or `max_tokens`).
    pub answer: Answer,
    /// `end_turn`, `stop_sequence`, `max_tokens` or `tool_use`.
    pub stop_reason: &'static str,
    /// The stop sequence that ended the text, for `stop_reason: stop_sequence`.
    pub stop_sequence: Option<String>,
    /// Whitespace words over the system prompt and every message's text, at least 1.
    pub input_tokens: u64,
}

impl MessagesPlan {
    fn output_tokens(&self) -> u64 {
        match &self.answer {
            Answer::Text(text) => words(text),
            Answer::ToolCall { arguments, .. } => words(arguments),
        }
    }
}

/// Checks a request and decides its answer; `reply` (from a fault) forces a text answer.
/// Errors are messages for a 400 `invalid_request_error`.
pub(crate) fn plan(request: &Value, reply: Option<&str>) -> Result<MessagesPlan, String> {
    let object = request.as_object().ok_or("body must be a JSON object")?;
    if let Some(extra) = object.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(format!("{extra}: Extra inputs are not permitted"));
    }
    let max_tokens = match object.get("max_tokens") {
        None => return Err("max_tokens: Field required".to_owned()),
        Some(n) => n
            .as_u64()
            .filter(|n| *n > 0)
            .ok_or("max_tokens: Input should be a positive integer")?,
    };
    if let Some(t) = object.get("temperature").and_then(Value::as_f64)
        && !(0.0..=1.0).contains(&t)
    {
        return Err("temperature: Input should be less than or equal to 1".to_owned());
    }
    // As current Claude models do.
    if object.contains_key("temperature") && object.contains_key("top_p") {
        return Err(
            "`temperature` and `top_p` cannot both be specified for this model. Please use only one."
                .to_owned(),
        );
    }
    let messages = object
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("messages: Field required")?;
    if messages.is_empty() {
        return Err("messages: at least one message is required".to_owned());
    }
    let system = system_text(object.get("system"))?;
    let tool_blocks = check_messages(messages)?;
    let tools = check_tools(object.get("tools"), object.get("tool_choice"))?;
    if tool_blocks && tools.is_none() {
        return Err(
            "Requests which include `tool_use` or `tool_result` blocks must define tools."
                .to_owned(),
        );
    }
    let stop_sequences: Vec<&str> = object
        .get("stop_sequences")
        .and_then(Value::as_array)
        .map(|s| s.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let count = |text: &str| if text.is_empty() { 0 } else { words(text) };
    let input_tokens = (count(&system)
        + messages
            .iter()
            .map(|m| count(&content_text(&m["content"])))
            .sum::<u64>())
    .max(1);
    let mut plan = MessagesPlan {
        stream: object.get("stream") == Some(&Value::Bool(true)),
        answer: Answer::Text(String::new()),
        stop_reason: "end_turn",
        stop_sequence: None,
        input_tokens,
    };
    let chosen = tools.and_then(|(tools, choice)| chosen_tool(tools, choice));
    match (reply, chosen, last_tool_result(messages)) {
        (Some(text), _, _) => plan.answer = Answer::Text(text.to_owned()),
        (None, _, Some(result)) => {
            plan.answer = Answer::Text(format!("sim saw tool result: {}", truncate(&result)));
        }
        (None, Some(tool), None) => {
            let name = tool["name"].as_str().unwrap_or("tool").to_owned();
            let arguments = placeholder(&tool["input_schema"]).to_string();
            plan.answer = Answer::ToolCall { name, arguments };
            plan.stop_reason = "tool_use";
        }
        (None, None, None) => {
            let last_user = messages
                .iter()
                .rev()
                .find(|m| m["role"] == "user")
                .map(|m| content_text(&m["content"]))
                .unwrap_or_default();
            plan.answer = Answer::Text(format!("sim reply to: {}", truncate(&last_user)));
        }
    }
    if let Answer::Text(text) = &mut plan.answer
        && let Some((reason, stop)) = cut_text(text, &stop_sequences, max_tokens)
    {
        plan.stop_reason = reason;
        plan.stop_sequence = stop;
    }
    Ok(plan)
}

/// Cuts `text` at the first stop sequence, then to `max_tokens` words; the stop reason
/// and stop sequence when it was cut.
fn cut_text(
    text: &mut String,
    stops: &[&str],
    max_tokens: u64,
) -> Option<(&'static str, Option<String>)> {
    let first_stop = stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s).map(|at| (at, *s)))
        .min();
    let mut stop_reason = None;
    let mut stop_sequence = None;
    if let Some((at, stop)) = first_stop {
        text.truncate(at);
        stop_reason = Some("stop_sequence");
        stop_sequence = Some(stop.to_owned());
    }
    if crate::chat::cut_words(text, max_tokens) {
        stop_reason = Some("max_tokens");
        stop_sequence = None;
    }
    stop_reason.map(|reason| (reason, stop_sequence))
}

/// `system` as text: a string or an array of text blocks.
fn system_text(system: Option<&Value>) -> Result<String, String> {
    match system {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(text)) => Ok(text.clone()),
        Some(Value::Array(blocks)) => {
            let mut text = Vec::with_capacity(blocks.len());
            for (i, block) in blocks.iter().enumerate() {
                match (block["type"].as_str(), block["text"].as_str()) {
                    (Some("text"), Some(t)) if !t.is_empty() => text.push(t),
                    (Some("text"), Some(_)) => {
                        return Err(format!(
                            "system.{i}.text: text content blocks must be non-empty"
                        ));
                    }
                    _ => return Err(format!("system.{i}: only text blocks are allowed")),
                }
            }
            Ok(text.join("\n"))
        }
        Some(_) => Err("system: Input should be a valid string or list".to_owned()),
    }
}

/// Roles, block types, and every `tool_use` answered by a `tool_result` in the next turn;
/// whether any message holds a `tool_use` or `tool_result` block.
fn check_messages(messages: &[Value]) -> Result<bool, String> {
    let mut tool_blocks = false;
    let mut open_calls: Vec<&str> = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        let role = message["role"].as_str().unwrap_or_default();
        if role != "user" && role != "assistant" {
            return Err(format!(
                "messages.{i}.role: Input should be 'user' or 'assistant'"
            ));
        }
        let blocks = match &message["content"] {
            Value::String(_) => Vec::new(),
            Value::Array(blocks) => blocks.iter().collect(),
            _ => return Err(format!("messages.{i}.content: Field required")),
        };
        let mut answered = Vec::new();
        let mut calls = Vec::new();
        for (j, block) in blocks.iter().enumerate() {
            let at = format!("messages.{i}.content.{j}");
            match (role, block["type"].as_str()) {
                (_, Some("text")) => match block["text"].as_str() {
                    Some("") => {
                        return Err(format!("{at}.text: text content blocks must be non-empty"));
                    }
                    Some(_) => {}
                    None => return Err(format!("{at}.text: Field required")),
                },
                ("user", Some("image")) => {
                    let source = block["source"]["type"].as_str();
                    if !matches!(source, Some("base64" | "url")) {
                        return Err(format!("{at}.source: Field required"));
                    }
                }
                ("user", Some("tool_result")) => {
                    tool_blocks = true;
                    let id = block["tool_use_id"].as_str().unwrap_or_default();
                    if !open_calls.contains(&id) {
                        return Err(format!(
                            "{at}: unexpected `tool_use_id` found in `tool_result` blocks: {id}. Each `tool_result` block must have a corresponding `tool_use` block in the previous message."
                        ));
                    }
                    answered.push(id);
                }
                ("assistant", Some("tool_use")) => {
                    tool_blocks = true;
                    if !block["input"].is_object() || block["name"].as_str().is_none() {
                        return Err(format!(
                            "{at}: a tool_use block needs a name and an input object"
                        ));
                    }
                    let id = block["id"].as_str().unwrap_or_default();
                    if id.is_empty()
                        || !id
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                    {
                        return Err(format!(
                            "{at}.tool_use.id: String should match pattern '^[a-zA-Z0-9_-]+$'"
                        ));
                    }
                    calls.push(block["id"].as_str().unwrap_or_default());
                }
                (_, kind) => {
                    return Err(format!(
                        "{at}.type: block type {kind:?} is not allowed in a {role} message"
                    ));
                }
            }
        }
        let unanswered: Vec<&str> = open_calls
            .iter()
            .copied()
            .filter(|id| !answered.contains(id))
            .collect();
        if !unanswered.is_empty() {
            return Err(format!(
                "messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after: {}",
                unanswered.join(", ")
            ));
        }
        open_calls = calls;
    }
    Ok(tool_blocks)
}

/// The offered tools and the `tool_choice`, if any.
type Offer<'a> = (&'a [Value], Option<&'a Value>);

/// The tools and the tool choice, checked; `None` when no tools were offered.
fn check_tools<'a>(
    tools: Option<&'a Value>,
    choice: Option<&'a Value>,
) -> Result<Option<Offer<'a>>, String> {
    let Some(tools) = tools.and_then(Value::as_array).filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    for (i, tool) in tools.iter().enumerate() {
        if tool["name"].as_str().is_none() || tool["input_schema"]["type"] != "object" {
            return Err(format!(
                "tools.{i}: a tool needs a name and an input_schema of type object"
            ));
        }
    }
    if let Some(choice) = choice {
        match choice["type"].as_str() {
            Some("auto" | "any" | "none") => {}
            Some("tool") if tools.iter().any(|t| t["name"] == choice["name"]) => {}
            _ => return Err(format!("tool_choice: {choice} is not a valid tool choice")),
        }
    }
    Ok(Some((tools.as_slice(), choice)))
}

/// The tool to call: the one `tool_choice` names, else the first; none for `"none"`.
fn chosen_tool<'a>(tools: &'a [Value], choice: Option<&Value>) -> Option<&'a Value> {
    match choice.map(|c| (c["type"].as_str(), c)) {
        Some((Some("none"), _)) => None,
        Some((Some("tool"), c)) => tools.iter().find(|t| t["name"] == c["name"]),
        _ => tools.first(),
    }
}

/// The text of the last message's last `tool_result`, when the last message is a user
/// turn holding one.
fn last_tool_result(messages: &[Value]) -> Option<String> {
    let last = messages.last().filter(|m| m["role"] == "user")?;
    let result = last["content"]
        .as_array()?
        .iter()
        .rev()
        .find(|b| b["type"] == "tool_result")?;
    Some(content_text(&result["content"]))
}

/// The text of a content: a string, or the text of its text and tool_result blocks.
fn content_text(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .map(|b| match b["type"].as_str() {
                Some("tool_result") => content_text(&b["content"]),
                _ => b["text"].as_str().unwrap_or_default().to_owned(),
            })
            .filter(|t| !t.is_empty())
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

// === wire shapes ===

/// The `id` of message number `n`.
pub(crate) fn message_id(n: u64) -> String {
    format!("msg_sim_{n}")
}

fn tool_use_id(n: u64) -> String {
    format!("toolu_sim_{n}")
}

/// The answer's one content block.
fn block(n: u64, plan: &MessagesPlan) -> Value {
    match &plan.answer {
        Answer::Text(text) => json!({"type": "text", "text": text}),
        Answer::ToolCall { name, arguments } => {
            let input: Value = serde_json::from_str(arguments).unwrap_or_else(|_| json!({}));
            json!({"type": "tool_use", "id": tool_use_id(n), "name": name, "input": input})
        }
    }
}

/// The non-streaming `message` body.
pub(crate) fn message(n: u64, model: &str, plan: &MessagesPlan) -> Bytes {
    let body = json!({
        "id": message_id(n),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [block(n, plan)],
        "stop_reason": plan.stop_reason,
        "stop_sequence": plan.stop_sequence,
        "usage": {"input_tokens": plan.input_tokens, "output_tokens": plan.output_tokens()},
    });
    Bytes::from(body.to_string())
}

fn event(kind: &str, data: &Value) -> Vec<u8> {
    format!("event: {kind}\ndata: {data}\n\n").into_bytes()
}

/// The SSE frames of a streamed answer. Frame 0 holds `message_start`, the block's
/// `content_block_start` and a `ping`; frames `1..=N` one delta each (text pieces, or
/// pieces of the tool input's JSON); then `content_block_stop` with `message_delta`; the
/// last frame is `message_stop`. So a fault's "after N chunks" counts deltas, as for chat.
pub(crate) fn stream_events(n: u64, model: &str, plan: &MessagesPlan) -> Vec<Bytes> {
    let start = json!({"type": "message_start", "message": {
        "id": message_id(n), "type": "message", "role": "assistant", "model": model,
        "content": [], "stop_reason": null, "stop_sequence": null,
        "usage": {"input_tokens": plan.input_tokens, "output_tokens": 1},
    }});
    let (empty_block, pieces, delta_kind) = match (&plan.answer, block(n, plan)) {
        (Answer::Text(text), _) => (
            json!({"type": "text", "text": ""}),
            split_pieces(text),
            "text_delta",
        ),
        (Answer::ToolCall { arguments, .. }, mut block) => {
            block["input"] = json!({});
            (block, split_pieces(arguments), "input_json_delta")
        }
    };
    let mut first = event("message_start", &start);
    first.extend(event(
        "content_block_start",
        &json!({"type": "content_block_start", "index": 0, "content_block": empty_block}),
    ));
    first.extend(event("ping", &json!({"type": "ping"})));
    let mut frames = vec![Bytes::from(first)];
    for piece in pieces {
        let delta = if delta_kind == "text_delta" {
            json!({"type": "text_delta", "text": piece})
        } else {
            json!({"type": "input_json_delta", "partial_json": piece})
        };
        frames.push(Bytes::from(event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0, "delta": delta}),
        )));
    }
    let mut end = event(
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": 0}),
    );
    end.extend(event(
        "message_delta",
        &json!({"type": "message_delta",
            "delta": {"stop_reason": plan.stop_reason, "stop_sequence": plan.stop_sequence},
            "usage": {"output_tokens": plan.output_tokens()}}),
    ));
    frames.push(Bytes::from(end));
    frames.push(Bytes::from(event(
        "message_stop",
        &json!({"type": "message_stop"}),
    )));
    frames
}

/// An error in Anthropic's shape, `{"type": "error", "error": {"type", "message"}}`.
pub(crate) fn error(kind: &str, message: &str) -> Bytes {
    let body = json!({"type": "error", "error": {"type": kind, "message": message}});
    Bytes::from(body.to_string())
}

/// The error a fault asks for, as Anthropic words it: the error type follows the status
/// (529 `overloaded_error`, 429 `rate_limit_error`, ...), and a known `error_code` gives
/// Anthropic's message for that cause (`context_length_exceeded`: "prompt is too long").
pub(crate) fn error_body(status: StatusCode, code: Option<&str>, model: &str) -> Bytes {
    let kind = match status.as_u16() {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        500..=599 => "api_error",
        _ => "invalid_request_error",
    };
    let message = match code {
        Some("context_length_exceeded") => {
            "prompt is too long: 250000 tokens > 200000 maximum".to_owned()
        }
        Some("model_not_found") => format!("model: {model}"),
        Some("invalid_api_key") => "invalid x-api-key".to_owned(),
        Some("rate_limit_exceeded") => {
            "This request would exceed your organization's rate limit.".to_owned()
        }
        Some("overloaded_error") => "Overloaded".to_owned(),
        _ => format!(
            "simulated {} ({})",
            status.as_u16(),
            status.canonical_reason().unwrap_or("error")
        ),
    };
    error(kind, &message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(extra: Value) -> Value {
        let mut body = json!({"model": "c", "max_tokens": 100,
            "messages": [{"role": "user", "content": "hello there"}]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    }

    #[test]
    fn refuses_what_anthropic_refuses() {
        let table = [
            (json!({"n": 1}), "n: Extra inputs are not permitted"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"temperature": 1.5}), "temperature"),
            (json!({"messages": []}), "at least one message"),
            (
                json!({"messages": [{"role": "system", "content": "x"}]}),
                "messages.0.role",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}]}),
                "must be non-empty",
            ),
            (
                json!({"messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
                    {"role": "user", "content": "and?"},
                ]}),
                "messages.2: `tool_use` ids were found without `tool_result` blocks immediately after: t1",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t9"}]}]}),
                "unexpected `tool_use_id`",
            ),
            (
                json!({"tools": [{"name": "f", "parameters": {}}]}),
                "input_schema",
            ),
            (
                json!({"temperature": 0.2, "top_p": 0.9}),
                "cannot both be specified",
            ),
            (
                json!({"messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": [{"type": "tool_use", "id": "functions.f:0", "name": "f", "input": {}}]},
                ]}),
                "messages.1.content.0.tool_use.id: String should match pattern",
            ),
        ];
        for (extra, want) in table {
            let err = plan(&request(extra.clone()), None).unwrap_err();
            assert!(err.contains(want), "{extra}: {err}");
        }
        let mut missing = request(json!({}));
        missing.as_object_mut().unwrap().remove("max_tokens");
        assert_eq!(
            plan(&missing, None).unwrap_err(),
            "max_tokens: Field required"
        );
    }

    #[test]
    fn stop_sequences_and_max_tokens_cut_the_text() {
        let table = [
            (json!({}), "sim reply to: hello there", "end_turn", None),
            (
                json!({"stop_sequences": ["hello"]}),
                "sim reply to: ",
                "stop_sequence",
                Some("hello"),
            ),
            (json!({"max_tokens": 2}), "sim reply", "max_tokens", None),
        ];
        for (extra, text, reason, stop) in table {
            let plan = plan(&request(extra.clone()), None).unwrap();
            assert_eq!(plan.answer, Answer::Text(text.to_owned()), "{extra}");
            assert_eq!(plan.stop_reason, reason, "{extra}");
            assert_eq!(plan.stop_sequence.as_deref(), stop, "{extra}");
        }
    }

    #[test]
    fn stream_frames_count_deltas_like_chat_chunks() {
        let plan = plan(&request(json!({"stream": true})), None).unwrap();
        let frames = stream_events(1, "c", &plan);
        // Frame 0, one per word of "sim reply to: hello there", the end, message_stop.
        assert_eq!(frames.len(), 1 + 5 + 2);
        let first = String::from_utf8(frames[0].to_vec()).unwrap();
        assert!(first.starts_with("event: message_start\n"), "{first}");
        assert!(first.contains("event: ping"), "{first}");
        assert_eq!(
            frames.last().unwrap().as_ref(),
            b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"
        );
    }
}
