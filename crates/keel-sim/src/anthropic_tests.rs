//! `POST /v1/messages` over real loopback HTTP, with reqwest as the client.

use std::time::Duration;

use serde_json::{Value, json};

use crate::{Fault, SimHandle, SimServer};

async fn sim() -> SimHandle {
    SimServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

fn body(model: &str, text: &str) -> Value {
    json!({"model": model, "max_tokens": 64, "system": "be brief",
        "messages": [{"role": "user", "content": text}]})
}

async fn post(sim: &SimHandle, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/messages", sim.base_url()))
        .timeout(Duration::from_secs(10))
        .header("x-api-key", "sk-ant-test")
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn message(sim: &SimHandle, body: &Value) -> Value {
    let response = post(sim, body).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// The `(event name, data)` pairs of an Anthropic SSE body.
fn events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (name, data) = e.split_once('\n').unwrap();
            let name = name.strip_prefix("event: ").unwrap().to_owned();
            let data: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
            assert_eq!(data["type"], name.as_str(), "{e}");
            (name, data)
        })
        .collect()
}

#[tokio::test]
async fn answers_a_message_in_anthropic_shape_and_records_the_key() {
    let sim = sim().await;
    let answer = message(&sim, &body("claude-x", "hello there")).await;
    assert!(answer["id"].as_str().unwrap().starts_with("msg_sim_"));
    assert_eq!(answer["type"], "message");
    assert_eq!(answer["role"], "assistant");
    assert_eq!(answer["model"], "claude-x");
    assert_eq!(
        answer["content"],
        json!([{"type": "text", "text": "sim reply to: hello there"}])
    );
    assert_eq!(answer["stop_reason"], "end_turn");
    assert_eq!(answer["stop_sequence"], Value::Null);
    // "be brief" and "hello there": 4 words in; "sim reply to: hello there": 5 out.
    assert_eq!(
        answer["usage"],
        json!({"input_tokens": 4, "output_tokens": 5})
    );
    assert_eq!(
        sim.last_authorization("claude-x").as_deref(),
        Some("sk-ant-test")
    );
    assert_eq!(sim.calls("claude-x"), 1);
}

#[tokio::test]
async fn a_request_anthropic_would_refuse_gets_its_400() {
    let sim = sim().await;
    let unversioned = reqwest::Client::new()
        .post(format!("{}/messages", sim.base_url()))
        .json(&body("c", "hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(unversioned.status(), 400);
    let error: Value = unversioned.json().await.unwrap();
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "invalid_request_error");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("anthropic-version"),
        "{error}"
    );
    let mut openai_field = body("c", "hi");
    openai_field["stream_options"] = json!({"include_usage": true});
    let response = post(&sim, &openai_field).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(
        error["error"]["message"],
        "stream_options: Extra inputs are not permitted"
    );
}

#[tokio::test]
async fn a_stream_sends_anthropic_events_with_the_plain_answer_s_text_and_usage() {
    let sim = sim().await;
    let plain = message(&sim, &body("c", "tell me a story")).await;
    let mut request = body("c", "tell me a story");
    request["stream"] = json!(true);
    let response = post(&sim, &request).await;
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let events = events(&response.text().await.unwrap());
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let deltas = names
        .iter()
        .filter(|n| **n == "content_block_delta")
        .count();
    assert!(deltas >= 3, "{names:?}");
    let mut want = vec!["message_start", "content_block_start", "ping"];
    want.extend(std::iter::repeat_n("content_block_delta", deltas));
    want.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(names, want);
    let text: String = events
        .iter()
        .filter_map(|(_, e)| e["delta"]["text"].as_str())
        .collect();
    assert_eq!(text, plain["content"][0]["text"]);
    assert_eq!(
        events[0].1["message"]["usage"]["input_tokens"],
        plain["usage"]["input_tokens"]
    );
    let end = &events[events.len() - 2].1;
    assert_eq!(end["delta"]["stop_reason"], "end_turn");
    assert_eq!(
        end["usage"]["output_tokens"],
        plain["usage"]["output_tokens"]
    );
}

#[tokio::test]
async fn a_tool_offer_gets_tool_use_and_a_tool_result_gets_text() {
    let sim = sim().await;
    let tools = json!([{"name": "get_weather", "description": "weather",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]);
    let mut request = body("c", "weather?");
    request["tools"] = tools.clone();
    let answer = message(&sim, &request).await;
    assert_eq!(answer["stop_reason"], "tool_use");
    let call = &answer["content"][0];
    assert_eq!(call["type"], "tool_use");
    assert!(call["id"].as_str().unwrap().starts_with("toolu_sim_"));
    assert_eq!(call["name"], "get_weather");
    assert_eq!(call["input"], json!({"city": "sim"}));
    // tool_choice none: text.
    request["tool_choice"] = json!({"type": "none"});
    let answer = message(&sim, &request).await;
    assert_eq!(answer["content"][0]["type"], "text");

    let followup = json!({"model": "c", "max_tokens": 64, "tools": tools, "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [call]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "sunny"}]},
    ]});
    let answer = message(&sim, &followup).await;
    assert_eq!(answer["stop_reason"], "end_turn");
    assert_eq!(answer["content"][0]["text"], "sim saw tool result: sunny");
    // Without tools, Anthropic refuses tool blocks in the history.
    let mut bare = followup.clone();
    bare.as_object_mut().unwrap().remove("tools");
    let response = post(&sim, &bare).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(
        error["error"]["message"],
        "Requests which include `tool_use` or `tool_result` blocks must define tools."
    );

    // Streamed, the input arrives as input_json_delta pieces of the same JSON.
    request["tool_choice"] = json!({"type": "auto"});
    request["stream"] = json!(true);
    let events = events(&post(&sim, &request).await.text().await.unwrap());
    assert_eq!(events[1].1["content_block"]["type"], "tool_use");
    assert_eq!(events[1].1["content_block"]["input"], json!({}));
    let input: String = events
        .iter()
        .filter_map(|(_, e)| e["delta"]["partial_json"].as_str())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&input).unwrap(),
        json!({"city": "sim"})
    );
    assert_eq!(
        events[events.len() - 2].1["delta"]["stop_reason"],
        "tool_use"
    );
}

#[tokio::test]
async fn faults_come_in_anthropic_s_error_shape() {
    let sim = sim().await;
    sim.script(
        "c",
        vec![
            Fault::status(529).with_retry_after("2"),
            Fault::error_code("context_length_exceeded"),
            Fault::error_code("model_not_found"),
            Fault::error_code("overloaded_error"),
        ],
    );
    let table = [
        (529, "overloaded_error", "simulated 529"),
        (400, "invalid_request_error", "prompt is too long"),
        (404, "not_found_error", "model: c"),
        (529, "overloaded_error", "Overloaded"),
    ];
    for (i, (status, kind, message)) in table.into_iter().enumerate() {
        let response = post(&sim, &body("c", "hi")).await;
        assert_eq!(response.status(), status);
        if i == 0 {
            assert_eq!(response.headers()["retry-after"], "2");
        }
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["type"], "error");
        assert_eq!(error["error"]["type"], kind);
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with(message),
            "{error}"
        );
    }
    message(&sim, &body("c", "hi")).await;
}

#[tokio::test]
async fn a_cut_stream_ends_without_message_stop() {
    let sim = sim().await;
    sim.script("c", vec![Fault::cut_after(2)]);
    let mut request = body("c", "one two three four five six");
    request["stream"] = json!(true);
    let mut response = post(&sim, &request).await;
    let mut received = Vec::new();
    let error = loop {
        match response.chunk().await {
            Ok(Some(chunk)) => received.extend_from_slice(&chunk),
            Ok(None) => panic!("clean end of a cut stream"),
            Err(error) => break error,
        }
    };
    assert!(error.is_body() || error.is_decode(), "{error:?}");
    let text = String::from_utf8(received).unwrap();
    assert!(!text.contains("message_stop"), "{text}");
    assert_eq!(text.matches("event: content_block_delta").count(), 2);
}
