//! The translation both ways, table by table.

use bytes::Bytes;
use keel_core::class::ErrorHint;
use serde_json::{Value, json};

use super::request::{DEFAULT_MAX_TOKENS, Refusal, translate};
use super::response::{chat_completion, finish_reason, openai_error};
use super::stream::{Broken, Translator};

fn anthropic(request: Value) -> Value {
    let translated = translate(request.to_string().as_bytes()).unwrap();
    serde_json::from_slice(&translated.body).unwrap()
}

fn refusal(request: Value) -> Refusal {
    translate(request.to_string().as_bytes()).unwrap_err()
}

fn user(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

// === requests ===

#[test]
fn system_messages_max_tokens_and_sampling_are_translated() {
    let out = anthropic(json!({
        "model": "claude-x",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "developer", "content": [{"type": "text", "text": "and kind"}]},
            user("hi"),
        ],
        // A top_p of 1 cuts nothing, and current models refuse it beside a temperature.
        "temperature": 0.2, "top_p": 1, "stop": "END", "user": "u-1",
        // Dropped: they cannot change what the client gets.
        "seed": 7, "n": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": false,
        "response_format": {"type": "text"}, "store": false, "metadata": {"a": "b"},
        "top_logprobs": null,
    }));
    assert_eq!(
        out,
        json!({
            "model": "claude-x",
            "system": [{"type": "text", "text": "be brief"}, {"type": "text", "text": "and kind"}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_tokens": DEFAULT_MAX_TOKENS,
            "temperature": 0.2,
            "stop_sequences": ["END"],
            "metadata": {"user_id": "u-1"},
        })
    );
}

#[test]
fn max_tokens_comes_from_the_client_when_it_gives_one() {
    let table = [
        (json!({}), DEFAULT_MAX_TOKENS),
        (json!({"max_tokens": 50}), 50),
        (json!({"max_completion_tokens": 60}), 60),
        (json!({"max_tokens": 50, "max_completion_tokens": 60}), 60),
    ];
    for (extra, want) in table {
        let mut request = json!({"model": "m", "messages": [user("hi")]});
        request
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        assert_eq!(anthropic(request.clone())["max_tokens"], want, "{request}");
    }
    assert_eq!(
        refusal(json!({"model": "m", "messages": [], "max_tokens": 0})).param,
        "max_tokens"
    );
}

#[test]
fn streams_keep_stream_and_note_include_usage() {
    let body = json!({"model": "m", "messages": [user("hi")], "stream": true,
        "stream_options": {"include_usage": true}});
    let translated = translate(body.to_string().as_bytes()).unwrap();
    assert!(translated.include_usage);
    let out: Value = serde_json::from_slice(&translated.body).unwrap();
    assert_eq!(out["stream"], true);
    assert!(out.get("stream_options").is_none(), "{out}");
    let body = json!({"model": "m", "messages": [user("hi")], "stream": true});
    assert!(
        !translate(body.to_string().as_bytes())
            .unwrap()
            .include_usage
    );
}

fn weather_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather", "description": "weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }})
}

#[test]
fn tools_and_tool_choice_are_translated() {
    let out = anthropic(json!({"model": "m", "messages": [user("hi")], "tools": [
        weather_tool(),
        {"type": "function", "function": {"name": "now"}},
    ]}));
    assert_eq!(
        out["tools"],
        json!([
            {"name": "get_weather", "description": "weather for a city",
             "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
            {"name": "now", "input_schema": {"type": "object", "properties": {}}},
        ])
    );
    assert!(out.get("tool_choice").is_none());
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let table = [
        (json!("auto"), Value::Null, json!({"type": "auto"})),
        (json!("required"), Value::Null, json!({"type": "any"})),
        (json!("none"), Value::Null, json!({"type": "none"})),
        (
            named.clone(),
            Value::Null,
            json!({"type": "tool", "name": "get_weather"}),
        ),
        (
            json!("auto"),
            json!(false),
            json!({"type": "auto", "disable_parallel_tool_use": true}),
        ),
        (
            named,
            json!(false),
            json!({"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true}),
        ),
        (
            Value::Null,
            json!(false),
            json!({"type": "auto", "disable_parallel_tool_use": true}),
        ),
        (Value::Null, json!(true), Value::Null),
    ];
    for (choice, parallel, want) in table {
        let out = anthropic(
            json!({"model": "m", "messages": [user("hi")], "tools": [weather_tool()],
            "tool_choice": choice, "parallel_tool_calls": parallel}),
        );
        assert_eq!(
            out.get("tool_choice").unwrap_or(&Value::Null),
            &want,
            "{choice} {parallel}"
        );
    }
    // No tools: nothing to choose from, so no tool_choice either.
    let out = anthropic(json!({"model": "m", "messages": [user("hi")], "tool_choice": "auto"}));
    assert!(out.get("tool_choice").is_none() && out.get("tools").is_none());
    // ... but a call that must be made cannot be: refused, as OpenAI refuses it.
    for choice in [
        json!("required"),
        json!({"type": "function", "function": {"name": "get_weather"}}),
    ] {
        let refused = refusal(
            json!({"model": "m", "messages": [user("hi")], "tool_choice": choice, "tools": []}),
        );
        assert_eq!(refused.param, "tool_choice", "{choice}");
    }
}

#[test]
fn tools_the_history_called_are_declared_uncallable_when_none_are_offered() {
    let call = |id: &str, name: &str| json!({"id": id, "type": "function", "function": {"name": name, "arguments": "{}"}});
    let messages = json!([
        user("plan a trip"),
        {"role": "assistant", "content": null,
            "tool_calls": [call("c1", "get_weather"), call("c2", "book")]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "booked"},
        {"role": "assistant", "content": null, "tool_calls": [call("c3", "get_weather")]},
        {"role": "tool", "tool_call_id": "c3", "content": "rain"},
        user("summarize"),
    ]);
    for tools in [None, Some(json!([]))] {
        let mut request = json!({"model": "m", "messages": messages});
        if let Some(tools) = tools {
            request["tools"] = tools;
        }
        let out = anthropic(request);
        assert_eq!(
            out["tools"],
            json!([
                {"name": "get_weather", "input_schema": {"type": "object"}},
                {"name": "book", "input_schema": {"type": "object"}},
            ])
        );
        assert_eq!(out["tool_choice"], json!({"type": "none"}));
    }
}

#[test]
fn tool_calls_and_tool_results_become_tool_use_and_tool_result_blocks() {
    let out = anthropic(json!({"model": "m", "messages": [
        user("weather in Paris and Rome?"),
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "rain"}]},
        user("and tomorrow?"),
        {"role": "assistant", "content": "", "name": "bot"},
        {"role": "assistant", "content": "let me see"},
    ]}));
    assert_eq!(
        out["messages"],
        json!([
            {"role": "user", "content": [{"type": "text", "text": "weather in Paris and Rome?"}]},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {}},
            ]},
            // One user turn: both results first, then the user's text.
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "rain"}]},
                {"type": "text", "text": "and tomorrow?"},
            ]},
            // The empty assistant turn is left out.
            {"role": "assistant", "content": [{"type": "text", "text": "let me see"}]},
        ])
    );
}

/// What an earlier answer left in the history goes on as it was: tool arguments that are no
/// JSON object (an answer cut mid-call, a model's broken JSON) are wrapped, not refused on
/// every later turn; a blank user turn merged after tool results is left out.
#[test]
fn a_history_with_broken_tool_arguments_or_a_blank_turn_still_translates() {
    let call = |id: &str, arguments: &str| json!({"id": id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}});
    let out = anthropic(json!({"model": "m", "messages": [
        user("weather?"),
        {"role": "assistant", "content": null, "tool_calls": [
            call("call_1", "{\"city\":\"Par"),
            call("call_2", "[1]"),
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
        user(" "),
    ]}));
    assert_eq!(
        out["messages"][1]["content"],
        json!([
            {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"raw_arguments": "{\"city\":\"Par"}},
            {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"raw_arguments": "[1]"}},
        ])
    );
    assert_eq!(
        out["messages"][2]["content"],
        json!([
            {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
            {"type": "tool_result", "tool_use_id": "call_2", "content": "rain"},
        ])
    );
}

/// A `tool_choice` that needs tools, with none offered, is named in the refusal.
#[test]
fn a_tool_choice_without_tools_is_named() {
    let refused = refusal(json!({"model": "m", "messages": [user("hi")], "tool_choice": "any"}));
    assert_eq!(refused.param, "tool_choice");
    assert!(refused.message.contains("\"any\""), "{}", refused.message);
}

#[test]
fn images_become_image_blocks() {
    let out = anthropic(
        json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
            // As browsers and image libraries also name JPEG.
            {"type": "image_url", "image_url": {"url": "data:image/jpg;base64,/9j/"}},
            {"type": "image_url", "image_url": {"url": "data:image/JPEG;base64,/9j/"}},
        ]}]}),
    );
    let jpeg = json!({"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/"}});
    assert_eq!(
        out["messages"][0]["content"],
        json!([
            {"type": "text", "text": "what is this?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
            jpeg,
            jpeg,
        ])
    );
}

#[test]
fn what_cannot_be_translated_is_refused_naming_the_parameter() {
    let base = || json!({"model": "m", "messages": [user("hi")]});
    let with = |key: &str, value: Value| {
        let mut body = base();
        body[key] = value;
        body
    };
    let table = [
        (with("logprobs", json!(true)), "logprobs"),
        (with("top_logprobs", json!(2)), "top_logprobs"),
        (with("n", json!(2)), "n"),
        (
            with("response_format", json!({"type": "json_object"})),
            "response_format",
        ),
        (with("frequency_penalty", json!(0.5)), "frequency_penalty"),
        (with("logit_bias", json!({"50256": -100})), "logit_bias"),
        (with("reasoning_effort", json!("high")), "reasoning_effort"),
        (with("keel_unknown", json!(1)), "keel_unknown"),
        (with("temperature", json!(1.5)), "temperature"),
        (with("audio", json!({"voice": "alloy"})), "audio"),
        (
            with(
                "messages",
                json!([{"role": "function", "name": "f", "content": "x"}]),
            ),
            "messages[0].role",
        ),
        (
            with(
                "messages",
                json!([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]),
            ),
            "messages[0].content[0]",
        ),
        (
            with(
                "messages",
                json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/tiff;base64,AA"}}]}]),
            ),
            "messages[0].content[0]",
        ),
        (
            with("messages", json!([{"role": "tool", "content": "x"}])),
            "messages[0].tool_call_id",
        ),
        (
            with(
                "tools",
                json!([{"type": "custom", "custom": {"name": "x"}}]),
            ),
            "tools[0].type",
        ),
    ];
    for (body, param) in table {
        let refused = refusal(body.clone());
        assert_eq!(refused.param, param, "{body}: {}", refused.message);
        assert!(!refused.message.is_empty());
    }
    let refused = refusal(with("keel_unknown", json!(1)));
    assert!(
        refused.message.contains("'keel_unknown'") && refused.message.contains("Anthropic"),
        "{}",
        refused.message
    );
    let refused = refusal(
        json!({"model": "m", "messages": [user("hi")], "tools": [weather_tool()],
        "tool_choice": {"type": "allowed_tools", "allowed_tools": {}}}),
    );
    assert_eq!(refused.param, "tool_choice");
}

// === answers ===

#[test]
fn stop_reasons_map_to_finish_reasons() {
    let table = [
        (Some("end_turn"), "stop"),
        (Some("stop_sequence"), "stop"),
        (Some("pause_turn"), "stop"),
        (Some("max_tokens"), "length"),
        (Some("model_context_window_exceeded"), "length"),
        (Some("tool_use"), "tool_calls"),
        (Some("refusal"), "content_filter"),
        (None, "stop"),
    ];
    for (stop, want) in table {
        assert_eq!(finish_reason(stop), want, "{stop:?}");
    }
}

fn completion(answer: Value) -> Value {
    let body = chat_completion(answer.to_string().as_bytes(), 1_700_000_000).unwrap();
    serde_json::from_slice(&body).unwrap()
}

#[test]
fn an_answer_becomes_a_chat_completion() {
    let out = completion(json!({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
        "content": [
            {"type": "thinking", "thinking": "hm", "signature": "s"},
            {"type": "text", "text": "Let me check. "},
            {"type": "text", "text": "One moment."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris", "days": 2}},
        ],
        "stop_reason": "tool_use", "stop_sequence": null,
        "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 20},
    }));
    assert_eq!(out["id"], "msg_1");
    assert_eq!(out["object"], "chat.completion");
    assert_eq!(out["created"], 1_700_000_000);
    assert_eq!(out["model"], "claude-x");
    let choice = &out["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], "Let me check. One moment.");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["id"], "toolu_1");
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let arguments: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(arguments, json!({"city": "Paris", "days": 2}));
    // Cache reads and writes are prompt tokens, as OpenAI counts them.
    assert_eq!(out["usage"]["prompt_tokens"], 130);
    assert_eq!(out["usage"]["completion_tokens"], 5);
    assert_eq!(out["usage"]["total_tokens"], 135);
    assert_eq!(out["usage"]["prompt_tokens_details"]["cached_tokens"], 100);
    // What keel's budgets read.
    let usage = crate::usage::usage_in(&out).unwrap().unwrap();
    assert_eq!(usage.total(), 135);
}

#[test]
fn a_tool_only_answer_has_null_content_and_a_text_answer_no_tool_calls() {
    let only_tools = completion(json!({"id": "m", "model": "c", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": {}}], "stop_reason": "tool_use",
        "usage": {"input_tokens": 1, "output_tokens": 1}}));
    assert_eq!(only_tools["choices"][0]["message"]["content"], Value::Null);
    assert_eq!(
        only_tools["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
        "{}"
    );
    let text = completion(
        json!({"id": "m", "model": "c", "content": [{"type": "text", "text": "hi"}],
        "stop_reason": "max_tokens", "usage": {"input_tokens": 1, "output_tokens": 1}}),
    );
    assert!(text["choices"][0]["message"].get("tool_calls").is_none());
    assert_eq!(text["choices"][0]["finish_reason"], "length");
}

#[test]
fn an_answer_that_is_not_a_message_is_malformed() {
    for body in [
        &b"{\"id\": \"x\", \"content\": ["[..],
        b"{\"error\": {}}",
        b"[]",
    ] {
        assert!(chat_completion(body, 0).is_err());
    }
}

#[test]
fn anthropic_errors_come_back_in_the_openai_shape_with_their_cause() {
    let error = |kind: &str, message: &str| {
        Bytes::from(
            json!({"type": "error", "error": {"type": kind, "message": message}}).to_string(),
        )
    };
    let table = [
        (
            error("overloaded_error", "Overloaded"),
            "server_error",
            "overloaded_error",
            ErrorHint::None,
        ),
        (
            error("rate_limit_error", "slow down"),
            "rate_limit_error",
            // OpenAI's code for it.
            "rate_limit_exceeded",
            ErrorHint::None,
        ),
        (
            error(
                "invalid_request_error",
                "max_tokens: 32768 > 8192, which is the maximum allowed number of output tokens for claude-3-5-haiku-20241022",
            ),
            "invalid_request_error",
            "invalid_request_error",
            ErrorHint::Unsupported,
        ),
        (
            error("timeout_error", "Request timed out"),
            "server_error",
            "timeout_error",
            ErrorHint::None,
        ),
        (
            error(
                "invalid_request_error",
                "prompt is too long: 208310 tokens > 200000 maximum",
            ),
            "invalid_request_error",
            "context_length_exceeded",
            ErrorHint::ContextTooLong,
        ),
        (
            error("not_found_error", "model: claude-nope"),
            "invalid_request_error",
            "model_not_found",
            ErrorHint::ModelNotFound,
        ),
        (
            error("authentication_error", "invalid x-api-key"),
            "authentication_error",
            "authentication_error",
            ErrorHint::None,
        ),
        (
            error("invalid_request_error", "max_tokens: Field required"),
            "invalid_request_error",
            "invalid_request_error",
            ErrorHint::None,
        ),
    ];
    for (body, kind, code, hint) in table {
        let (translated, got) = openai_error(&body);
        let translated: Value = serde_json::from_slice(&translated).unwrap();
        assert_eq!(translated["error"]["type"], kind, "{translated}");
        assert_eq!(translated["error"]["code"], code, "{translated}");
        assert!(translated["error"]["message"].is_string());
        assert_eq!(got, hint, "{translated}");
        // keel's own reading of the translated body agrees.
        assert_eq!(
            ErrorHint::from_body(&serde_json::to_vec(&translated).unwrap()),
            hint
        );
    }
    let page = Bytes::from_static(b"<html>502 Bad Gateway</html>");
    assert_eq!(openai_error(&page), (page.clone(), ErrorHint::None));
}

#[test]
fn a_spent_credit_balance_is_keels_account_refused_not_the_clients_error() {
    for kind in ["invalid_request_error", "billing_error"] {
        let body = Bytes::from(
            json!({"type": "error", "error": {"type": kind,
                "message": "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing."}})
            .to_string(),
        );
        let (translated, hint) = openai_error(&body);
        assert_eq!(hint, ErrorHint::AccountRefused, "{kind}");
        let translated: Value = serde_json::from_slice(&translated).unwrap();
        assert_eq!(translated["error"]["code"], "billing_error");
        // Another provider may answer: the route falls back instead of failing the call.
        assert_eq!(
            keel_core::class::classify_status(reqwest::StatusCode::BAD_REQUEST, hint),
            keel_core::class::ErrorClass::FallbackOnly
        );
    }
}

#[test]
fn tool_call_ids_of_other_providers_are_made_valid_the_same_way_in_use_and_result() {
    let messages = json!([
        user("weather?"),
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "functions.get_weather:0", "type": "function",
             "function": {"name": "get_weather", "arguments": "{}"}},
            {"id": "call_ok-1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{}"}},
        ]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_ok-1", "content": "rainy"},
    ]);
    let out =
        anthropic(json!({"model": "claude-x", "messages": messages, "tools": [weather_tool()]}));
    let uses = &out["messages"][1]["content"];
    let results = &out["messages"][2]["content"];
    let id = uses[0]["id"].as_str().unwrap();
    assert!(id.starts_with("functions_get_weather_0_"), "{id}");
    assert!(
        id.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
        "{id}"
    );
    assert_eq!(results[0]["tool_use_id"], id);
    // A valid id is kept as it is.
    assert_eq!(uses[1]["id"], "call_ok-1");
    assert_eq!(results[1]["tool_use_id"], "call_ok-1");
    // Two ids that differ only in an invalid character stay two.
    assert_ne!(
        super::request::tool_id("a.b"),
        super::request::tool_id("a:b")
    );
}

#[test]
fn temperature_and_top_p_together_keep_one_or_are_refused() {
    let body = |top_p: f64| json!({"model": "claude-x", "messages": [user("hi")], "temperature": 0.2, "top_p": top_p});
    let out = anthropic(body(1.0));
    assert_eq!(out["temperature"], 0.2);
    assert!(out.get("top_p").is_none(), "{out}");
    let refused = refusal(body(0.9));
    assert_eq!(refused.param, "top_p");
    // Alone, top_p passes.
    let out = anthropic(json!({"model": "claude-x", "messages": [user("hi")], "top_p": 0.9}));
    assert_eq!(out["top_p"], 0.9);
}

#[test]
fn a_tool_whose_parameters_name_no_type_gets_an_object_schema() {
    let tool = json!({"type": "function", "function": {"name": "now", "parameters": {}}});
    let out = anthropic(json!({"model": "claude-x", "messages": [user("time?")], "tools": [tool]}));
    assert_eq!(out["tools"][0]["input_schema"], json!({"type": "object"}));
}

// === streams ===

/// Feeds `events` to a translator; the chunks as JSON, and whether the last event ended it.
fn translate_stream(include_usage: bool, events: &[Value]) -> (Vec<Value>, bool) {
    let mut translator = Translator::new(1_700_000_000, include_usage);
    let mut chunks = Vec::new();
    let mut end = false;
    for event in events {
        assert!(!end, "an event after the end");
        let out = translator.event(event.to_string().as_bytes()).unwrap();
        chunks.extend(
            out.chunks
                .iter()
                .map(|c| serde_json::from_slice::<Value>(c).unwrap()),
        );
        end = out.end;
    }
    (chunks, end)
}

fn message_start() -> Value {
    json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
        "model": "claude-x", "content": [], "stop_reason": null,
        "usage": {"input_tokens": 12, "output_tokens": 1}}})
}

fn message_end(stop_reason: &str, output_tokens: u64) -> [Value; 2] {
    [
        json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null},
            "usage": {"output_tokens": output_tokens}}),
        json!({"type": "message_stop"}),
    ]
}

fn text_delta(text: &str) -> Value {
    json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}})
}

#[test]
fn a_text_stream_becomes_role_content_finish_and_usage_chunks() {
    let mut events = vec![
        message_start(),
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        json!({"type": "ping"}),
        text_delta("Hello"),
        text_delta(" there"),
        json!({"type": "content_block_stop", "index": 0}),
    ];
    events.extend(message_end("end_turn", 7));
    let (chunks, end) = translate_stream(true, &events);
    assert!(end);
    assert_eq!(chunks.len(), 5, "{chunks:?}");
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["id"], "msg_1");
        assert_eq!(chunk["model"], "claude-x");
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Hello there");
    assert_eq!(chunks[3]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[3]["choices"][0]["delta"], json!({}));
    assert_eq!(chunks[4]["choices"], json!([]));
    assert_eq!(
        chunks[4]["usage"]["prompt_tokens"], 12,
        "input from message_start"
    );
    assert_eq!(
        chunks[4]["usage"]["completion_tokens"], 7,
        "output from message_delta"
    );
    assert_eq!(chunks[4]["usage"]["total_tokens"], 19);
    // Without include_usage, no usage chunk.
    let (chunks, end) = translate_stream(false, &events);
    assert!(end);
    assert_eq!(chunks.len(), 4);
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
}

#[test]
fn tool_use_blocks_stream_as_indexed_tool_call_deltas() {
    let tool_start = |index: u64, id: &str| {
        json!({"type": "content_block_start", "index": index,
            "content_block": {"type": "tool_use", "id": id, "name": "get_weather", "input": {}}})
    };
    let json_delta = |index: u64, partial: &str| {
        json!({"type": "content_block_delta", "index": index,
            "delta": {"type": "input_json_delta", "partial_json": partial}})
    };
    let mut events = vec![
        message_start(),
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        text_delta("Checking."),
        json!({"type": "content_block_stop", "index": 0}),
        tool_start(1, "toolu_a"),
        json_delta(1, ""),
        json_delta(1, "{\"city\": "),
        json_delta(1, "\"Paris\"}"),
        json!({"type": "content_block_stop", "index": 1}),
        tool_start(2, "toolu_b"),
        json_delta(2, "{\"city\": \"Rome\"}"),
        json!({"type": "content_block_stop", "index": 2}),
    ];
    events.extend(message_end("tool_use", 30));
    let (chunks, end) = translate_stream(false, &events);
    assert!(end);
    // What an OpenAI client does: gather each call's pieces by index.
    let mut calls: Vec<(String, String, String)> = Vec::new();
    for chunk in &chunks {
        for call in chunk["choices"][0]["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let index = usize::try_from(call["index"].as_u64().unwrap()).unwrap();
            if index == calls.len() {
                assert_eq!(call["type"], "function");
                calls.push((
                    call["id"].as_str().unwrap().to_owned(),
                    call["function"]["name"].as_str().unwrap().to_owned(),
                    String::new(),
                ));
            }
            calls[index]
                .2
                .push_str(call["function"]["arguments"].as_str().unwrap());
        }
    }
    assert_eq!(
        calls,
        vec![
            (
                "toolu_a".to_owned(),
                "get_weather".to_owned(),
                "{\"city\": \"Paris\"}".to_owned()
            ),
            (
                "toolu_b".to_owned(),
                "get_weather".to_owned(),
                "{\"city\": \"Rome\"}".to_owned()
            ),
        ]
    );
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "tool_calls");
}

#[test]
fn a_streamed_tool_call_without_input_has_the_arguments_of_an_empty_object() {
    let mut events = vec![
        message_start(),
        json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "tool_use", "id": "toolu_n", "name": "now", "input": {}}}),
        json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "input_json_delta", "partial_json": ""}}),
        json!({"type": "content_block_stop", "index": 0}),
    ];
    events.extend(message_end("tool_use", 5));
    let (chunks, _) = translate_stream(false, &events);
    let arguments: String = chunks
        .iter()
        .flat_map(|c| {
            c["choices"][0]["delta"]["tool_calls"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|call| call["function"]["arguments"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(arguments, "{}");
}

#[test]
fn the_role_chunk_waits_for_the_first_content_so_an_early_overload_is_retried() {
    let mut translator = Translator::new(0, false);
    let out = translator
        .event(message_start().to_string().as_bytes())
        .unwrap();
    assert!(
        out.chunks.is_empty(),
        "nothing reaches the client at message_start"
    );
    let ping = translator.event(br#"{"type": "ping"}"#).unwrap();
    assert!(ping.chunks.is_empty());
    let out = translator
        .event(text_delta("Hi").to_string().as_bytes())
        .unwrap();
    let chunks: Vec<Value> = out
        .chunks
        .iter()
        .map(|c| serde_json::from_slice(c).unwrap())
        .collect();
    assert_eq!(chunks.len(), 2);
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    assert_eq!(chunks[1]["choices"][0]["delta"]["content"], "Hi");
}

#[test]
fn an_error_event_or_a_broken_event_fails_the_stream() {
    let mut translator = Translator::new(0, false);
    translator
        .event(message_start().to_string().as_bytes())
        .unwrap();
    let error =
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}});
    match translator.event(error.to_string().as_bytes()) {
        Err(Broken::Reported(event)) => {
            // Classified like the same error answered over HTTP: an overload is a 529,
            // retried, and its words reach the client in the OpenAI shape.
            assert_eq!(super::response::status_of_kind(&event).as_u16(), 529);
            let (body, hint) = openai_error(&event);
            assert_eq!(hint, ErrorHint::None);
            let body: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(body["error"]["message"], "Overloaded");
            assert_eq!(body["error"]["type"], "server_error");
        }
        other => panic!("not the upstream's error: {other:?}"),
    }
    // A prompt too long, reported in the stream: the next target's to try.
    let long = json!({"type": "error", "error": {"type": "invalid_request_error", "message": "prompt is too long: 208310 tokens > 200000 maximum"}});
    let long = Bytes::from(long.to_string());
    assert_eq!(super::response::status_of_kind(&long).as_u16(), 400);
    assert_eq!(openai_error(&long).1, ErrorHint::ContextTooLong);
    let limited = Bytes::from(
        json!({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}})
            .to_string(),
    );
    assert_eq!(super::response::status_of_kind(&limited).as_u16(), 429);
    let limited: Value = serde_json::from_slice(&openai_error(&limited).0).unwrap();
    assert_eq!(limited["error"]["code"], "rate_limit_exceeded");
    assert!(matches!(
        translator.event(b"{\"type\": \"content_"),
        Err(Broken::Malformed(_))
    ));
    // Events newer than this translation are passed over.
    let out = translator
        .event(br#"{"type": "something_new", "x": 1}"#)
        .unwrap();
    assert!(out.chunks.is_empty() && !out.end);
}

#[tokio::test]
async fn a_body_that_ends_before_message_stop_is_an_error_not_a_short_success() {
    use futures::StreamExt;
    use http_body_util::BodyExt;

    let frames = [
        format!("event: message_start\ndata: {}\n\n", message_start()),
        format!(
            "event: content_block_delta\ndata: {}\n\n",
            text_delta("Hel")
        ),
    ]
    .concat();
    let body = http_body_util::Full::new(Bytes::from(frames))
        .map_err(|never| match never {})
        .boxed();
    let mut stream = super::stream::chunks(body, "claude/x".to_owned(), Translator::new(0, true));
    assert!(stream.next().await.unwrap().is_ok(), "the role chunk");
    assert!(stream.next().await.unwrap().is_ok(), "the content chunk");
    match stream.next().await {
        Some(Err(crate::error::UpstreamError::Malformed { detail, .. })) => {
            assert!(detail.contains("message_stop"), "{detail}");
        }
        other => panic!("not a malformed-stream error: {other:?}"),
    }
    assert!(stream.next().await.is_none());
}

#[test]
fn an_error_object_in_place_of_a_message_is_told_by_its_type() {
    use super::response::{is_error_object, reported_error};
    let overloaded =
        br#"{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}"#;
    assert!(is_error_object(overloaded));
    // Classified as the same error over HTTP: Anthropic answers an overload with 529.
    let error = reported_error(
        "anthropic/m".to_owned(),
        &Bytes::from_static(overloaded),
        crate::provider::Passed::default(),
    );
    assert!(
        matches!(&error, crate::provider::UpstreamError::Status { status, .. } if status.as_u16() == 529),
        "{error:?}"
    );
    let message = br#"{"id": "msg_1", "type": "message", "role": "assistant", "content": []}"#;
    assert!(!is_error_object(message));
    assert!(!is_error_object(b"not json"));
}

#[test]
fn whitespace_anthropic_refuses_is_left_out_or_refused_before_sending() {
    // A model's "\n\n" before its tool call comes back in the history: left out, as is a
    // whitespace-only system message; the final assistant words lose trailing whitespace.
    let body = anthropic(json!({
        "model": "m",
        "messages": [
            {"role": "system", "content": "  "},
            user("weather?"),
            {"role": "assistant", "content": "\n\n", "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "assistant", "content": "It is "},
        ],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
        "stop": ["", "END"],
    }));
    assert!(
        body.get("system")
            .is_none_or(|s| s.as_array().is_some_and(Vec::is_empty)),
        "{body}"
    );
    let messages = body["messages"].as_array().unwrap();
    let with_call = &messages[1]["content"];
    assert_eq!(with_call.as_array().unwrap().len(), 1, "{with_call}");
    assert_eq!(with_call[0]["type"], "tool_use");
    let last = messages.last().unwrap();
    assert_eq!(last["role"], "assistant");
    assert_eq!(last["content"][0]["text"], "It is");
    assert_eq!(body["stop_sequences"], json!(["END"]));
    // A stop sequence of whitespace alone cannot be sent: refused, so another target may
    // take the request.
    let refused = refusal(json!({"model": "m", "messages": [user("hi")], "stop": "\n"}));
    assert_eq!(refused.param, "stop");
    assert!(
        refused.message.contains("whitespace"),
        "{}",
        refused.message
    );
    // An image with a blank caption: the caption is left out.
    let body = anthropic(
        json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "\n"},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        ]}]}),
    );
    let content = body["messages"][0]["content"].as_array().unwrap();
    assert_eq!(content.len(), 1, "{body}");
    assert_eq!(content[0]["type"], "image");
    // Only system messages: OpenAI answers them, Anthropic needs a turn to answer.
    let refused =
        refusal(json!({"model": "m", "messages": [{"role": "system", "content": "say hi"}]}));
    assert_eq!(refused.param, "messages");
}
