//! The deterministic answer to `POST /v1/chat/completions`, in OpenAI's exact wire shapes.
//!
//! [`plan`] reads a request and decides the answer (text or a tool call) without I/O;
//! [`completion`] and [`stream_events`] render it as a JSON body or as SSE events. Faults
//! are not handled here: the server decides whether this answer is sent, and how.

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;

/// How much of a user or tool message the reply quotes, in characters.
const QUOTE_CHARS: usize = 200;

/// What the simulated model answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Assistant text, `finish_reason: "stop"`.
    Text(String),
    /// One call of a tool, `finish_reason: "tool_calls"`, content null.
    ToolCall {
        /// The function name.
        name: String,
        /// The arguments as a JSON object string.
        arguments: String,
    },
}

/// A chat request, understood.
#[derive(Debug, Clone)]
pub(crate) struct ChatPlan {
    /// `stream: true` was asked.
    pub stream: bool,
    /// `stream_options.include_usage: true` was asked.
    pub include_usage: bool,
    /// A whole answer carries `usage` (false: [`crate::Fault::no_usage`]).
    pub report_usage: bool,
    /// What to answer.
    pub answer: Answer,
    /// Whitespace words over all message contents, at least 1.
    pub prompt_tokens: u64,
    /// The text answer was cut at the request's `max_tokens` (or `max_completion_tokens`):
    /// `finish_reason: "length"`.
    pub cut: bool,
}

impl ChatPlan {
    /// Whitespace words of the answer, at least 1.
    pub(crate) fn completion_tokens(&self) -> u64 {
        match &self.answer {
            Answer::Text(text) => words(text),
            Answer::ToolCall { arguments, .. } => words(arguments),
        }
    }
}

/// Reads a chat request. `reply` (from a fault) forces a text answer.
///
/// Errors are messages for a 400 `invalid_request_error`.
pub(crate) fn plan(request: &Value, reply: Option<&str>) -> Result<ChatPlan, String> {
    let messages = request
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("'messages' must be an array of messages")?;
    let prompt_tokens = messages
        .iter()
        .map(|message| words(&content_text(message.get("content"))))
        .sum::<u64>()
        .max(1);
    let stream = request.get("stream").and_then(Value::as_bool) == Some(true);
    let include_usage = request
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    let mut answer = match reply {
        Some(text) => Answer::Text(text.to_owned()),
        None => decide(request, messages),
    };
    // A text longer than the request allows is cut there, as a model's is.
    let limit = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|key| request.get(*key).and_then(Value::as_u64));
    let mut cut = false;
    if let (Some(limit), Answer::Text(text)) = (limit, &mut answer) {
        cut = cut_words(text, limit.max(1));
    }
    Ok(ChatPlan {
        stream,
        include_usage,
        report_usage: true,
        answer,
        prompt_tokens,
        cut,
    })
}

/// Cuts `text` after its first `n` words (the sim's tokens) when it has more; whether it did.
pub(crate) fn cut_words(text: &mut String, n: u64) -> bool {
    match end_of_words(text, n) {
        Some(end) => {
            text.truncate(end);
            true
        }
        None => false,
    }
}

/// Where `text`'s first `n` words end, when it has more than `n`.
fn end_of_words(text: &str, n: u64) -> Option<usize> {
    let mut words = 0;
    let mut in_word = false;
    for (at, c) in text.char_indices() {
        if c.is_whitespace() {
            if in_word {
                words += 1;
                if words == n {
                    // Only when another word follows.
                    return text[at..].split_whitespace().next().map(|_| at);
                }
            }
            in_word = false;
        } else {
            in_word = true;
        }
    }
    None
}

fn decide(request: &Value, messages: &[Value]) -> Answer {
    let last_role = messages
        .last()
        .and_then(|message| message.get("role"))
        .and_then(Value::as_str);
    if last_role == Some("user")
        && let Some(tool) = chosen_tool(request)
    {
        let name = tool
            .pointer("/function/name")
            .and_then(Value::as_str)
            .unwrap_or("tool")
            .to_owned();
        let arguments = tool
            .pointer("/function/parameters")
            .map_or_else(|| "{}".to_owned(), |schema| placeholder(schema).to_string());
        return Answer::ToolCall { name, arguments };
    }
    let text = if last_role == Some("tool") {
        let result = content_text(messages.last().and_then(|m| m.get("content")));
        format!("sim saw tool result: {}", truncate(&result))
    } else {
        let last_user = messages
            .iter()
            .rev()
            .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
            .map(|m| content_text(m.get("content")))
            .unwrap_or_default();
        format!("sim reply to: {}", truncate(&last_user))
    };
    match request
        .pointer("/response_format/type")
        .and_then(Value::as_str)
    {
        Some("json_object") => Answer::Text(serde_json::json!({ "reply": text }).to_string()),
        Some("json_schema") => {
            let schema = request.pointer("/response_format/json_schema/schema");
            Answer::Text(schema.map_or_else(|| "{}".to_owned(), |s| placeholder(s).to_string()))
        }
        _ => Answer::Text(text),
    }
}

/// The tool to call: the one `tool_choice` names, else the first; none when
/// `tool_choice` is `"none"` or no tools were offered.
fn chosen_tool(request: &Value) -> Option<&Value> {
    let tools = request.get("tools").and_then(Value::as_array)?;
    match request.get("tool_choice") {
        Some(Value::String(choice)) if choice == "none" => None,
        Some(choice @ Value::Object(_)) => {
            let wanted = choice.pointer("/function/name").and_then(Value::as_str);
            tools
                .iter()
                .find(|tool| tool.pointer("/function/name").and_then(Value::as_str) == wanted)
                .or_else(|| tools.first())
        }
        _ => tools.first(),
    }
}

/// A value satisfying `schema`'s type with placeholders; objects get their required
/// properties only.
pub(crate) fn placeholder(schema: &Value) -> Value {
    if let Some(first) = schema
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|e| e.first())
    {
        return first.clone();
    }
    let kind = match schema.get("type") {
        Some(Value::String(kind)) => kind.as_str(),
        // A list of types such as ["string", "null"]: take the first non-null one.
        Some(Value::Array(kinds)) => kinds
            .iter()
            .filter_map(Value::as_str)
            .find(|k| *k != "null")
            .unwrap_or("null"),
        _ if schema.get("properties").is_some() => "object",
        _ => "string",
    };
    match kind {
        "object" => {
            let mut object = serde_json::Map::new();
            let required = schema.get("required").and_then(Value::as_array);
            for name in required.into_iter().flatten().filter_map(Value::as_str) {
                let property = schema
                    .get("properties")
                    .and_then(|p| p.get(name))
                    .unwrap_or(&Value::Null);
                object.insert(name.to_owned(), placeholder(property));
            }
            Value::Object(object)
        }
        "array" => Value::Array(Vec::new()),
        "integer" | "number" => Value::from(1),
        "boolean" => Value::Bool(true),
        "null" => Value::Null,
        _ => Value::String("sim".to_owned()),
    }
}

/// The text of a message's `content`: a string, or the `text` parts of an array.
fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// `text` up to its first [`QUOTE_CHARS`] characters.
pub(crate) fn truncate(text: &str) -> &str {
    match text.char_indices().nth(QUOTE_CHARS) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

/// Whitespace-separated words, at least 1: the sim's notion of tokens.
pub(crate) fn words(text: &str) -> u64 {
    u64::try_from(text.split_whitespace().count())
        .unwrap_or(u64::MAX)
        .max(1)
}

// === wire shapes ===

#[derive(Serialize)]
struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

impl Usage {
    fn of(plan: &ChatPlan) -> Self {
        let completion_tokens = plan.completion_tokens();
        Self {
            prompt_tokens: plan.prompt_tokens,
            completion_tokens,
            total_tokens: plan.prompt_tokens + completion_tokens,
        }
    }
}

#[derive(Serialize)]
struct Completion<'a> {
    id: String,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [Choice<'a>; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
    system_fingerprint: &'static str,
}

#[derive(Serialize)]
struct Choice<'a> {
    index: u32,
    message: Message<'a>,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<[ToolCall<'a>; 1]>,
    refusal: Option<()>,
}

#[derive(Serialize)]
struct ToolCall<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    function: FunctionCall<'a>,
}

#[derive(Serialize)]
struct FunctionCall<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    arguments: &'a str,
}

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: &'static str,
    choices: &'a [ChunkChoice<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<Usage>>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize, Default)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<Option<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<[ToolCall<'a>; 1]>,
}

const FINGERPRINT: &str = "fp_keel_sim";

/// The `id` of completion number `n`.
pub(crate) fn completion_id(n: u64) -> String {
    format!("chatcmpl-sim-{n}")
}

fn tool_call_id(n: u64) -> String {
    format!("call_sim_{n}")
}

/// The non-streaming `chat.completion` body.
pub(crate) fn completion(n: u64, created: u64, model: &str, plan: &ChatPlan) -> Bytes {
    let (content, tool_calls, finish_reason) = match &plan.answer {
        Answer::Text(text) => (
            Some(text.as_str()),
            None,
            if plan.cut { "length" } else { "stop" },
        ),
        Answer::ToolCall { name, arguments } => {
            let call = ToolCall {
                index: None,
                id: Some(tool_call_id(n)),
                kind: Some("function"),
                function: FunctionCall {
                    name: Some(name),
                    arguments,
                },
            };
            (None, Some([call]), "tool_calls")
        }
    };
    let body = Completion {
        id: completion_id(n),
        object: "chat.completion",
        created,
        model,
        choices: [Choice {
            index: 0,
            message: Message {
                role: "assistant",
                content,
                tool_calls,
                refusal: None,
            },
            logprobs: None,
            finish_reason,
        }],
        usage: plan.report_usage.then(|| Usage::of(plan)),
        system_fingerprint: FINGERPRINT,
    };
    to_bytes(&body)
}

/// The SSE events of a streamed answer, each a complete `data: ...\n\n` frame: the role
/// chunk, the content (or tool-argument) chunks, the finish chunk, the usage chunk when
/// asked, and `data: [DONE]`. The content chunks are at indices `1..=content_chunks`.
pub(crate) fn stream_events(n: u64, created: u64, model: &str, plan: &ChatPlan) -> Vec<Bytes> {
    let id = completion_id(n);
    let event = |delta: Delta<'_>, finish_reason: Option<&'static str>| {
        let choices = [ChunkChoice {
            index: 0,
            delta,
            logprobs: None,
            finish_reason,
        }];
        sse(&Chunk {
            id: &id,
            object: "chat.completion.chunk",
            created,
            model,
            system_fingerprint: FINGERPRINT,
            choices: &choices,
            usage: plan.include_usage.then_some(None),
        })
    };
    let mut events = Vec::with_capacity(16);
    let finish_reason = match &plan.answer {
        Answer::Text(text) => {
            events.push(event(
                Delta {
                    role: Some("assistant"),
                    content: Some(Some("")),
                    tool_calls: None,
                },
                None,
            ));
            for piece in split_pieces(text) {
                let delta = Delta {
                    content: Some(Some(piece)),
                    ..Delta::default()
                };
                events.push(event(delta, None));
            }
            if plan.cut { "length" } else { "stop" }
        }
        Answer::ToolCall { name, arguments } => {
            let head = ToolCall {
                index: Some(0),
                id: Some(tool_call_id(n)),
                kind: Some("function"),
                function: FunctionCall {
                    name: Some(name),
                    arguments: "",
                },
            };
            events.push(event(
                Delta {
                    role: Some("assistant"),
                    content: Some(None),
                    tool_calls: Some([head]),
                },
                None,
            ));
            for piece in split_pieces(arguments) {
                let call = ToolCall {
                    index: Some(0),
                    id: None,
                    kind: None,
                    function: FunctionCall {
                        name: None,
                        arguments: piece,
                    },
                };
                let delta = Delta {
                    tool_calls: Some([call]),
                    ..Delta::default()
                };
                events.push(event(delta, None));
            }
            "tool_calls"
        }
    };
    events.push(event(Delta::default(), Some(finish_reason)));
    if plan.include_usage {
        events.push(sse(&Chunk {
            id: &id,
            object: "chat.completion.chunk",
            created,
            model,
            system_fingerprint: FINGERPRINT,
            choices: &[],
            usage: Some(Some(Usage::of(plan))),
        }));
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    events
}

/// Splits `text` into pieces whose concatenation is `text`: one per word (with its
/// trailing whitespace), or three by characters when there are fewer than three words.
pub(crate) fn split_pieces(text: &str) -> Vec<&str> {
    let pieces: Vec<&str> = text.split_inclusive(char::is_whitespace).collect();
    if pieces.len() >= 3 {
        return pieces;
    }
    let chars = text.chars().count();
    if chars < 3 {
        return if text.is_empty() {
            Vec::new()
        } else {
            vec![text]
        };
    }
    let at = |k: usize| {
        text.char_indices()
            .nth(chars * k / 3)
            .map_or(text.len(), |(i, _)| i)
    };
    let (a, b) = (at(1), at(2));
    vec![&text[..a], &text[a..b], &text[b..]]
}

fn sse<T: Serialize>(value: &T) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"data: ");
    // Serializing these plain structs into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, value);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

fn to_bytes<T: Serialize>(value: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn placeholder_fills_required_properties_by_type() {
        let schema = json!({
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "unit": {"type": "string", "enum": ["c", "f"]},
                "opts": {"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"]},
                "optional": {"type": "string"}
            },
            "required": ["city", "days", "unit", "opts"]
        });
        assert_eq!(
            placeholder(&schema),
            json!({"city": "sim", "days": 1, "unit": "c", "opts": {"x": true}})
        );
    }

    #[test]
    fn split_pieces_concatenate_to_the_text() {
        for text in ["sim reply to: hello world", "ab", "abcdef", "", "héllo"] {
            let pieces = split_pieces(text);
            assert_eq!(pieces.concat(), text);
            if text.chars().count() >= 3 {
                assert!(pieces.len() >= 3, "{text}: {pieces:?}");
            }
        }
    }

    #[test]
    fn a_text_over_max_tokens_is_cut_there() {
        let request = serde_json::json!({
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
        });
        let p = plan(&request, Some("{\"name\": \"Ada\",  \"age\": 36}")).unwrap();
        assert_eq!(p.answer, Answer::Text("{\"name\": \"Ada\",".to_owned()));
        assert!(p.cut);
        let body: Value = serde_json::from_slice(&completion(1, 0, "m", &p)).unwrap();
        assert_eq!(body["choices"][0]["finish_reason"], "length");
        assert_eq!(body["usage"]["completion_tokens"], 2);
        // Exactly at the limit, or under it: whole.
        for text in ["one two", "one two ", "one"] {
            let p = plan(&request, Some(text)).unwrap();
            assert!(!p.cut, "{text}");
        }
    }

    #[test]
    fn truncates_quotes_by_characters() {
        let long = "é".repeat(300);
        assert_eq!(truncate(&long).chars().count(), QUOTE_CHARS);
    }
}
