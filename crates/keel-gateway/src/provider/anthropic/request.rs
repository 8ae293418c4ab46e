//! An OpenAI chat-completions request as an Anthropic Messages request.
//!
//! Every parameter is either translated, dropped because dropping it cannot change what
//! the client gets (`seed`, `store`, a zero penalty, `n: 1`, ...), or refused with a
//! [`Refusal`] naming it: an unknown parameter is refused too, since keel cannot tell
//! whether the client relies on it. Nothing is sent for a refused request. A function
//! tool's `strict` flag is dropped too: the model still gets the schema, and the client
//! reads the arguments as it would any others.

use bytes::Bytes;
use serde_json::{Map, Value, json};

/// `max_tokens` when the client sets neither `max_tokens` nor `max_completion_tokens`:
/// Anthropic requires one, OpenAI does not.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// A request keel cannot express in the Messages API: the parameter at fault and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Refusal {
    /// The OpenAI parameter, like `logprobs` or `messages[2].content[0].type`.
    pub param: String,
    /// What the client reads.
    pub message: String,
}

impl Refusal {
    fn new(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            param: param.into(),
            message: message.into(),
        }
    }

    /// The parameter is not supported at all by an Anthropic target.
    fn unsupported(param: &str, why: &str) -> Self {
        Self::new(
            param,
            format!("parameter '{param}' is not supported by an Anthropic target ({why})"),
        )
    }
}

/// The Messages request and what translating its answer needs.
#[derive(Debug)]
pub(super) struct Translated {
    /// The JSON body for `POST {base_url}/messages`.
    pub body: Bytes,
    /// `stream_options.include_usage` was asked: the stream ends with a usage-only chunk.
    pub include_usage: bool,
}

/// Parameters keel drops because they cannot change the answer the client receives
/// (OpenAI platform features and best-effort hints).
const DROPPED: &[&str] = &[
    "seed",
    "store",
    "metadata",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
];

/// Translates an OpenAI chat-completions body (its `model` already the target's).
pub(super) fn translate(body: &[u8]) -> Result<Translated, Refusal> {
    let request: Map<String, Value> = serde_json::from_slice(body)
        .map_err(|e| Refusal::new("", format!("request body is not a JSON object: {e}")))?;
    let mut params = Params::default();
    for (key, value) in &request {
        // An explicit null is the parameter left out, in OpenAI's API as in Anthropic's.
        if !value.is_null() {
            params.take(key, value)?;
        }
    }
    let Params {
        mut out,
        max_tokens,
        max_completion_tokens,
        include_usage,
        tools,
        tool_choice,
        parallel,
    } = params;
    // Current Claude models take `temperature` or `top_p`, not both: a `top_p` of 1 (no
    // cut) is left out, another is refused so that the call can fall back.
    if out.contains_key("temperature") {
        match out.get("top_p").and_then(Value::as_f64) {
            Some(p) if p >= 1.0 => {
                out.remove("top_p");
            }
            Some(_) => {
                return Err(Refusal::unsupported(
                    "top_p",
                    "Anthropic models take temperature or top_p, not both",
                ));
            }
            None => {}
        }
    }
    let max_tokens = max_completion_tokens
        .or(max_tokens)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    out.insert("max_tokens".into(), max_tokens.into());
    if let Some(tools) = tools.filter(|t| !t.is_empty()) {
        if let Some(choice) = anthropic_tool_choice(tool_choice, parallel)? {
            out.insert("tool_choice".into(), choice);
        }
        out.insert("tools".into(), Value::Array(tools));
    } else if let Some(choice) =
        tool_choice.filter(|c| !matches!(c.as_str(), Some("auto" | "none")))
    {
        // A tool must be called, but none is offered: OpenAI refuses this too.
        return Err(Refusal::new(
            "tool_choice",
            format!(
                "tool_choice {choice} needs 'tools' (with none offered, only \"auto\" or \"none\" can be)"
            ),
        ));
    } else if let Some(tools) = history_tools(out.get("messages")) {
        // Anthropic refuses tool_use and tool_result blocks in a request without tools
        // (a summary of a conversation that used tools, say). The tools the history
        // called are declared with any input, and the model may call none of them: what
        // an OpenAI model does when the request offers no tools.
        out.insert("tools".into(), Value::Array(tools));
        out.insert("tool_choice".into(), json!({ "type": "none" }));
    }
    let body = serde_json::to_vec(&Value::Object(out))
        .map_err(|e| Refusal::new("", format!("cannot write the request: {e}")))?;
    Ok(Translated {
        body: Bytes::from(body),
        include_usage,
    })
}

/// The Messages request being built, and the parameters read so far that are translated
/// together once all are known.
#[derive(Default)]
struct Params<'a> {
    out: Map<String, Value>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    include_usage: bool,
    tools: Option<Vec<Value>>,
    tool_choice: Option<&'a Value>,
    parallel: Option<bool>,
}

impl<'a> Params<'a> {
    /// Reads one parameter (not null).
    fn take(&mut self, key: &str, value: &'a Value) -> Result<(), Refusal> {
        let out = &mut self.out;
        match key {
            "model" => {
                out.insert("model".into(), value.clone());
            }
            "messages" => {
                let (system, messages) = messages(value)?;
                if !system.is_empty() {
                    out.insert("system".into(), Value::Array(system));
                }
                out.insert("messages".into(), Value::Array(messages));
            }
            "max_tokens" => self.max_tokens = Some(positive(key, value)?),
            "max_completion_tokens" => self.max_completion_tokens = Some(positive(key, value)?),
            "temperature" => {
                let t = number(key, value)?;
                if !(0.0..=1.0).contains(&t) {
                    return Err(Refusal::new(
                        key,
                        format!(
                            "temperature {t} is outside 0..1, the range an Anthropic model takes"
                        ),
                    ));
                }
                out.insert(key.into(), value.clone());
            }
            "top_p" | "top_k" => {
                number(key, value)?;
                out.insert(key.into(), value.clone());
            }
            "stop" => {
                let mut stops = match value {
                    Value::String(s) => vec![Value::String(s.clone())],
                    Value::Array(items) if items.iter().all(Value::is_string) => items.clone(),
                    _ => return Err(Refusal::new(key, "'stop' must be a string or strings")),
                };
                // An empty one stops nothing; Anthropic refuses it.
                stops.retain(|s| s.as_str().is_some_and(|s| !s.is_empty()));
                if stops
                    .iter()
                    .any(|s| s.as_str().is_some_and(|s| s.trim().is_empty()))
                {
                    return Err(Refusal::unsupported(
                        key,
                        "it takes no stop sequence that is only whitespace (such as \"\\n\")",
                    ));
                }
                if !stops.is_empty() {
                    out.insert("stop_sequences".into(), Value::Array(stops));
                }
            }
            "stream" => {
                let stream = value
                    .as_bool()
                    .ok_or_else(|| Refusal::new(key, "'stream' must be true or false"))?;
                out.insert(key.into(), Value::Bool(stream));
            }
            "stream_options" => {
                self.include_usage = value.get("include_usage") == Some(&Value::Bool(true));
            }
            "tools" => self.tools = Some(function_tools(value)?),
            "tool_choice" => self.tool_choice = Some(value),
            "parallel_tool_calls" => self.parallel = value.as_bool(),
            "user" => {
                let user = value
                    .as_str()
                    .ok_or_else(|| Refusal::new(key, "'user' must be a string"))?;
                out.insert("metadata".into(), json!({ "user_id": user }));
            }
            other => check_dropped(other, value)?,
        }
        Ok(())
    }
}

/// A parameter without a counterpart: dropped when that is harmless, refused otherwise.
fn check_dropped(key: &str, value: &Value) -> Result<(), Refusal> {
    let harmless = match key {
        k if DROPPED.contains(&k) => true,
        "n" => value.as_u64() == Some(1),
        "frequency_penalty" | "presence_penalty" => value.as_f64() == Some(0.0),
        "logprobs" => value == &Value::Bool(false),
        "logit_bias" => value.as_object().is_some_and(Map::is_empty),
        "modalities" => value == &json!(["text"]),
        "response_format" => value.get("type").and_then(Value::as_str) == Some("text"),
        _ => false,
    };
    if harmless {
        return Ok(());
    }
    let why = match key {
        "n" => "it answers one choice per request",
        "frequency_penalty" | "presence_penalty" => "it has no penalties; leave it out or 0",
        "logprobs" | "top_logprobs" => "it returns no log probabilities",
        "logit_bias" => "it takes no token biases",
        "response_format" => "only {\"type\": \"text\"}; ask for JSON in the prompt instead",
        "modalities" | "audio" => "it answers text only",
        "functions" | "function_call" => "use 'tools' and 'tool_choice' instead",
        _ => "keel cannot translate it to the Messages API",
    };
    Err(Refusal::unsupported(key, why))
}

fn positive(key: &str, value: &Value) -> Result<u64, Refusal> {
    value
        .as_u64()
        .filter(|n| *n > 0)
        .ok_or_else(|| Refusal::new(key, format!("'{key}' must be a positive integer")))
}

fn number(key: &str, value: &Value) -> Result<f64, Refusal> {
    value
        .as_f64()
        .ok_or_else(|| Refusal::new(key, format!("'{key}' must be a number")))
}

// === messages ===

/// The `system` text blocks and the `messages` of a Messages request.
fn messages(value: &Value) -> Result<(Vec<Value>, Vec<Value>), Refusal> {
    let list = value
        .as_array()
        .ok_or_else(|| Refusal::new("messages", "'messages' must be an array"))?;
    let mut system = Vec::new();
    let mut out: Vec<Value> = Vec::with_capacity(list.len());
    for (i, message) in list.iter().enumerate() {
        let at = format!("messages[{i}]");
        let role = message
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| Refusal::new(format!("{at}.role"), "a message needs a 'role'"))?;
        let content = message.get("content").unwrap_or(&Value::Null);
        match role {
            // Anthropic has one system prompt, outside the conversation: every system
            // message goes there, in order.
            "system" | "developer" => system.extend(text_blocks(content, &at)?),
            "user" => push(&mut out, "user", user_blocks(content, &at)?),
            "assistant" => push(&mut out, "assistant", assistant_blocks(message, &at)?),
            "tool" => push(&mut out, "user", vec![tool_result(message, &at)?]),
            other => {
                return Err(Refusal::new(
                    format!("{at}.role"),
                    format!("role {other:?} is not supported by an Anthropic target"),
                ));
            }
        }
    }
    // A conversation that ends with the assistant's words is, to Anthropic, an answer to
    // continue, and it refuses one that ends in whitespace.
    if let Some(last) = out.last_mut()
        && last["role"] == "assistant"
        && let Some(content) = last.get_mut("content").and_then(Value::as_array_mut)
    {
        if let Some(Value::String(text)) = content.last_mut().and_then(|b| b.get_mut("text")) {
            let end = text.trim_end().len();
            text.truncate(end);
        }
        content.retain(|block| block.get("text").is_none_or(|t| t != ""));
        if content.is_empty() {
            out.pop();
        }
    }
    if out.is_empty() {
        return Err(Refusal::unsupported(
            "messages",
            "it needs a user or assistant message with something in it to answer; system messages alone, or messages of whitespace alone, cannot be sent",
        ));
    }
    Ok((system, out))
}

/// Appends `blocks` as a message of `role`, merged into the previous message when it has
/// the same role: tool results of one turn go back as one user message, as Anthropic
/// requires. An assistant message with nothing in it is left out (Anthropic refuses one).
fn push(out: &mut Vec<Value>, role: &str, blocks: Vec<Value>) {
    if blocks.is_empty() && role == "assistant" {
        return;
    }
    if let Some(last) = out.last_mut()
        && last["role"] == role
        && let Some(content) = last.get_mut("content").and_then(Value::as_array_mut)
    {
        content.extend(blocks);
        // Merged with other blocks (a blank user turn after tool results), text of
        // whitespace alone says nothing, and Anthropic refuses it.
        if content.iter().any(|b| !blank_text(b)) {
            content.retain(|b| !blank_text(b));
        }
        return;
    }
    out.push(json!({ "role": role, "content": blocks }));
}

fn text_block(text: &str) -> Value {
    json!({ "type": "text", "text": text })
}

/// A text-only content (a string or `text` parts) as text blocks, leaving out those that are
/// empty or only whitespace (Anthropic refuses them; they say nothing: a model's answer is
/// often `"\n\n"` before its tool calls, and comes back so in the history).
fn text_blocks(content: &Value, at: &str) -> Result<Vec<Value>, Refusal> {
    match content {
        Value::String(s) if s.trim().is_empty() => Ok(Vec::new()),
        Value::String(s) => Ok(vec![text_block(s)]),
        Value::Array(parts) => {
            let mut blocks = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                match (part_type(part), part.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(text)) if text.trim().is_empty() => {}
                    (Some("text"), Some(text)) => blocks.push(text_block(text)),
                    (kind, _) => {
                        return Err(Refusal::new(
                            format!("{at}.content[{j}]"),
                            format!("content part {kind:?} is not supported here; only text parts"),
                        ));
                    }
                }
            }
            Ok(blocks)
        }
        Value::Null => Ok(Vec::new()),
        _ => Err(Refusal::new(
            format!("{at}.content"),
            "'content' must be a string or an array of parts",
        )),
    }
}

fn part_type(part: &Value) -> Option<&str> {
    part.get("type").and_then(Value::as_str)
}

/// A user message's content: text and images.
fn user_blocks(content: &Value, at: &str) -> Result<Vec<Value>, Refusal> {
    let Value::Array(parts) = content else {
        // A string: Anthropic refuses an empty text block, but an empty user turn is the
        // client's to send, so it goes as it came and Anthropic says what it thinks.
        return match content {
            Value::String(s) => Ok(vec![text_block(s)]),
            _ => text_blocks(content, at),
        };
    };
    let mut blocks = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        let param = format!("{at}.content[{j}]");
        match part_type(part) {
            Some("text") => match part.get("text").and_then(Value::as_str) {
                Some("") => {}
                Some(text) => blocks.push(text_block(text)),
                None => return Err(Refusal::new(param, "a text part needs 'text'")),
            },
            Some("image_url") => blocks.push(image(part, &param)?),
            kind => {
                return Err(Refusal::new(
                    param,
                    format!(
                        "content part {kind:?} is not supported by an Anthropic target; text and image_url are"
                    ),
                ));
            }
        }
    }
    // Beside something else (an image with a blank caption), text of whitespace alone says
    // nothing, and Anthropic refuses it. Alone, it is the client's to send.
    if blocks.iter().any(|b| !blank_text(b)) {
        blocks.retain(|b| !blank_text(b));
    }
    Ok(blocks)
}

/// A text block of whitespace alone.
fn blank_text(block: &Value) -> bool {
    block["type"] == "text" && block["text"].as_str().is_some_and(|t| t.trim().is_empty())
}

/// The media types Anthropic takes for images.
const IMAGE_TYPES: &[&str] = &["image/jpeg", "image/png", "image/gif", "image/webp"];

/// An `image_url` part: a `data:` URL becomes a base64 source, an `http(s)` URL a URL source.
fn image(part: &Value, param: &str) -> Result<Value, Refusal> {
    let url = part
        .get("image_url")
        .and_then(|i| i.get("url").or(Some(i)))
        .and_then(Value::as_str)
        .ok_or_else(|| Refusal::new(param, "an image_url part needs 'image_url.url'"))?;
    if let Some(rest) = url.strip_prefix("data:") {
        let Some((media_type, data)) = rest.split_once(";base64,") else {
            return Err(Refusal::new(
                param,
                "a data: image URL must be base64 (data:image/png;base64,...)",
            ));
        };
        // As browsers and image libraries also write them: `image/JPEG`, `image/jpg`.
        let named = if media_type.eq_ignore_ascii_case("image/jpg") {
            Some("image/jpeg")
        } else {
            IMAGE_TYPES
                .iter()
                .copied()
                .find(|known| known.eq_ignore_ascii_case(media_type))
        };
        let Some(media_type) = named else {
            return Err(Refusal::new(
                param,
                format!(
                    "image type {media_type:?} is not supported by an Anthropic target (jpeg, png, gif, webp are)"
                ),
            ));
        };
        return Ok(json!({
            "type": "image",
            "source": { "type": "base64", "media_type": media_type, "data": data },
        }));
    }
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(json!({ "type": "image", "source": { "type": "url", "url": url } }));
    }
    Err(Refusal::new(
        param,
        "an image URL must be http(s):// or a data: URL",
    ))
}

/// An assistant message: its text, then its tool calls as `tool_use` blocks.
fn assistant_blocks(message: &Value, at: &str) -> Result<Vec<Value>, Refusal> {
    if message.get("function_call").is_some_and(|f| !f.is_null()) {
        return Err(Refusal::unsupported(
            &format!("{at}.function_call"),
            "use 'tool_calls' instead",
        ));
    }
    let content = message.get("content").unwrap_or(&Value::Null);
    let mut blocks = match content {
        Value::Array(parts) => {
            // A refusal part is what the assistant said: text, for the model's history.
            let mut blocks = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                let text = match part_type(part) {
                    Some("text") => part.get("text"),
                    Some("refusal") => part.get("refusal"),
                    _ => None,
                };
                match text.and_then(Value::as_str) {
                    Some(text) if text.trim().is_empty() => {}
                    Some(text) => blocks.push(text_block(text)),
                    None => {
                        return Err(Refusal::new(
                            format!("{at}.content[{j}]"),
                            "an assistant content part must be text or refusal",
                        ));
                    }
                }
            }
            blocks
        }
        other => text_blocks(other, at)?,
    };
    let calls = match message.get("tool_calls") {
        None | Some(Value::Null) => return Ok(blocks),
        Some(Value::Array(calls)) => calls,
        Some(_) => {
            return Err(Refusal::new(
                format!("{at}.tool_calls"),
                "'tool_calls' must be an array",
            ));
        }
    };
    for (j, call) in calls.iter().enumerate() {
        blocks.push(tool_use(call, &format!("{at}.tool_calls[{j}]"))?);
    }
    Ok(blocks)
}

/// One OpenAI tool call as a `tool_use` block; its arguments (a JSON string) become the
/// block's `input` object.
fn tool_use(call: &Value, at: &str) -> Result<Value, Refusal> {
    let id = call
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| Refusal::new(format!("{at}.id"), "a tool call needs an 'id'"))?;
    let name = call
        .pointer("/function/name")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            Refusal::new(
                format!("{at}.function.name"),
                "a tool call needs 'function.name'",
            )
        })?;
    let arguments = call
        .pointer("/function/arguments")
        .and_then(Value::as_str)
        .unwrap_or("");
    // Anthropic takes a tool call's input as an object. Arguments that are none (an answer
    // cut at `max_tokens` mid-call, a model that wrote broken JSON) stay in the history as
    // they were written, wrapped, rather than refusing every later turn of the conversation.
    let input = if arguments.trim().is_empty() {
        json!({})
    } else {
        match serde_json::from_str::<Value>(arguments) {
            Ok(input @ Value::Object(_)) => input,
            _ => json!({ "raw_arguments": arguments }),
        }
    };
    Ok(json!({ "type": "tool_use", "id": tool_id(id), "name": name, "input": input }))
}

/// A tool call's id as Anthropic takes it (`^[a-zA-Z0-9_-]+$`): an id from another
/// provider earlier in the conversation (`functions.get_weather:0`) has its other
/// characters replaced, and a short hash of the original added so two ids stay two. The
/// same id maps the same way in a `tool_use` and in its `tool_result`.
pub(super) fn tool_id(id: &str) -> String {
    let valid = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if !id.is_empty() && id.chars().all(valid) {
        return id.to_owned();
    }
    let kept: String = id.chars().map(|c| if valid(c) { c } else { '_' }).collect();
    let hash = keel_store::blob_hash(id.as_bytes());
    format!("{kept}_{}", &hash[..8])
}

/// A `role: "tool"` message as a `tool_result` block (sent in a user message).
fn tool_result(message: &Value, at: &str) -> Result<Value, Refusal> {
    let id = message
        .get("tool_call_id")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            Refusal::new(
                format!("{at}.tool_call_id"),
                "a tool message needs 'tool_call_id'",
            )
        })?;
    let mut block = json!({ "type": "tool_result", "tool_use_id": tool_id(id) });
    match message.get("content").unwrap_or(&Value::Null) {
        // Whitespace alone, which Anthropic refuses as text, is no result to give.
        Value::String(s) if s.trim().is_empty() => {}
        Value::String(s) => block["content"] = Value::String(s.clone()),
        other => {
            let blocks = text_blocks(other, at)?;
            if !blocks.is_empty() {
                block["content"] = Value::Array(blocks);
            }
        }
    }
    Ok(block)
}

// === tools ===

/// OpenAI function tools as Anthropic tools (`name`, `description`, `input_schema`).
fn function_tools(value: &Value) -> Result<Vec<Value>, Refusal> {
    let list = value
        .as_array()
        .ok_or_else(|| Refusal::new("tools", "'tools' must be an array"))?;
    let mut tools = Vec::with_capacity(list.len());
    for (i, tool) in list.iter().enumerate() {
        let at = format!("tools[{i}]");
        if part_type(tool) != Some("function") {
            return Err(Refusal::new(
                format!("{at}.type"),
                "only function tools are supported by an Anthropic target",
            ));
        }
        let function = tool.get("function").unwrap_or(&Value::Null);
        let name = function
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                Refusal::new(
                    format!("{at}.function.name"),
                    "a function tool needs a name",
                )
            })?;
        // Anthropic requires an object schema; a function without parameters takes none,
        // and `"parameters": {}` (which OpenAI takes) is that empty object schema.
        let schema = match function.get("parameters") {
            None | Some(Value::Null) => json!({ "type": "object", "properties": {} }),
            Some(Value::Object(schema)) => {
                let mut schema = schema.clone();
                schema
                    .entry("type")
                    .or_insert_with(|| Value::String("object".into()));
                Value::Object(schema)
            }
            Some(_) => {
                return Err(Refusal::new(
                    format!("{at}.function.parameters"),
                    "'parameters' must be a JSON schema object",
                ));
            }
        };
        let mut out = json!({ "name": name, "input_schema": schema });
        if let Some(description) = function.get("description").and_then(Value::as_str) {
            out["description"] = Value::String(description.to_owned());
        }
        tools.push(out);
    }
    Ok(tools)
}

/// The tools the `tool_use` blocks of translated `messages` call, once each and in order
/// of first use, each taking any object; `None` when no block calls one.
fn history_tools(messages: Option<&Value>) -> Option<Vec<Value>> {
    let mut names: Vec<&str> = Vec::new();
    let blocks = messages?
        .as_array()?
        .iter()
        .filter_map(|m| m["content"].as_array())
        .flatten();
    for block in blocks {
        if part_type(block) == Some("tool_use")
            && let Some(name) = block["name"].as_str()
            && !names.contains(&name)
        {
            names.push(name);
        }
    }
    (!names.is_empty()).then(|| {
        names
            .into_iter()
            .map(|name| json!({ "name": name, "input_schema": { "type": "object" } }))
            .collect()
    })
}

/// `tool_choice` and `parallel_tool_calls` as Anthropic's `tool_choice`, if either was set.
fn anthropic_tool_choice(
    choice: Option<&Value>,
    parallel: Option<bool>,
) -> Result<Option<Value>, Refusal> {
    let mut out = match choice {
        None => {
            if parallel != Some(false) {
                return Ok(None);
            }
            json!({ "type": "auto" })
        }
        Some(Value::String(s)) => match s.as_str() {
            "auto" => json!({ "type": "auto" }),
            "required" => json!({ "type": "any" }),
            "none" => return Ok(Some(json!({ "type": "none" }))),
            other => {
                return Err(Refusal::new(
                    "tool_choice",
                    format!("tool_choice {other:?} is not one of none, auto, required"),
                ));
            }
        },
        Some(object) => match (
            part_type(object),
            object.pointer("/function/name").and_then(Value::as_str),
        ) {
            (Some("function"), Some(name)) => json!({ "type": "tool", "name": name }),
            _ => {
                return Err(Refusal::unsupported(
                    "tool_choice",
                    "only none, auto, required or one named function",
                ));
            }
        },
    };
    if parallel == Some(false) {
        out["disable_parallel_tool_use"] = Value::Bool(true);
    }
    Ok(Some(out))
}
