//! End-to-end behaviour over real loopback HTTP, with reqwest as the client.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{Fault, SimHandle, SimServer};

async fn sim() -> SimHandle {
    SimServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn chat_body(model: &str, text: &str) -> Value {
    json!({"model": model, "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": text}
    ]})
}

async fn post(sim: &SimHandle, path: &str, body: &Value) -> reqwest::Result<reqwest::Response> {
    client()
        .post(format!("{}{path}", sim.base_url()))
        .json(body)
        .send()
        .await
}

async fn chat(sim: &SimHandle, body: &Value) -> Value {
    let response = post(sim, "/chat/completions", body).await.unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// The JSON payloads of an SSE body, `[DONE]` included as a string.
fn sse_events(text: &str) -> Vec<Value> {
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    text.split("\n\n")
        .filter(|event| !event.is_empty())
        .map(|event| {
            let data = event.strip_prefix("data: ").unwrap();
            if data == "[DONE]" {
                Value::String(data.to_owned())
            } else {
                serde_json::from_str(data).unwrap()
            }
        })
        .collect()
}

#[tokio::test]
async fn answers_a_chat_completion_in_openai_shape() {
    let sim = sim().await;
    let body = chat(&sim, &chat_body("gpt-x", "hello there")).await;
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-sim-"));
    assert_eq!(body["object"], "chat.completion");
    assert!(body["created"].as_u64().unwrap() > 0);
    assert_eq!(body["model"], "gpt-x");
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], "sim reply to: hello there");
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(body["usage"]["prompt_tokens"], 4);
    assert_eq!(body["usage"]["completion_tokens"], 5);
    assert_eq!(body["usage"]["total_tokens"], 9);
}

#[tokio::test]
async fn stream_ends_with_done_and_matches_the_plain_answer() {
    let sim = sim().await;
    let plain = chat(&sim, &chat_body("m", "tell me a story")).await;
    let mut request = chat_body("m", "tell me a story");
    request["stream"] = json!(true);
    request["stream_options"] = json!({"include_usage": true});
    let response = post(&sim, "/chat/completions", &request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let events = sse_events(&response.text().await.unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks = &events[..events.len() - 1];
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, plain["choices"][0]["message"]["content"]);
    let content_chunks = chunks
        .iter()
        .filter(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|s| !s.is_empty())
        })
        .count();
    assert!(content_chunks >= 3);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], plain["usage"]);
}

#[tokio::test]
async fn stream_without_include_usage_has_no_usage_chunk() {
    let sim = sim().await;
    let mut request = chat_body("m", "hi");
    request["stream"] = json!(true);
    let response = post(&sim, "/chat/completions", &request).await.unwrap();
    let events = sse_events(&response.text().await.unwrap());
    let finish = &events[events.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert!(events.iter().all(|e| e.get("usage").is_none()));
}

#[tokio::test]
async fn scripted_503_with_retry_after_then_success() {
    let sim = sim().await;
    sim.script("m", vec![Fault::status(503).with_retry_after("1")]);
    let first = post(&sim, "/chat/completions", &chat_body("m", "hi"))
        .await
        .unwrap();
    assert_eq!(first.status(), 503);
    assert_eq!(first.headers()["retry-after"], "1");
    let error: Value = first.json().await.unwrap();
    assert_eq!(error["error"]["type"], "server_error");
    assert!(error["error"]["message"].is_string());
    let second = post(&sim, "/chat/completions", &chat_body("m", "hi"))
        .await
        .unwrap();
    assert_eq!(second.status(), 200);
    assert!(second.headers().get("retry-after").is_none());
    assert_eq!(sim.calls("m"), 2);
}

#[tokio::test]
async fn error_code_fault_answers_openai_error_body() {
    let sim = sim().await;
    sim.script("m", vec![Fault::error_code("model_not_found")]);
    let response = post(&sim, "/chat/completions", &chat_body("m", "hi"))
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "model_not_found");
    assert_eq!(error["error"]["param"], Value::Null);
}

#[tokio::test]
async fn nest_fault_nests_the_openai_error_body_it_answers_with() {
    let sim = sim().await;
    sim.script(
        "m",
        vec![Fault {
            nest: Some(3),
            ..Fault::status(400)
        }],
    );
    let response = post(&sim, "/chat/completions", &chat_body("m", "hi"))
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
    assert_eq!(
        error["keel_sim_nested"],
        serde_json::json!([[[]]]),
        "{error}"
    );
}

#[tokio::test]
async fn drop_connection_gives_the_client_a_connection_error() {
    let sim = sim().await;
    sim.script("m", vec![Fault::drop_connection()]);
    let error = post(&sim, "/chat/completions", &chat_body("m", "hi"))
        .await
        .unwrap_err();
    assert!(error.status().is_none(), "{error:?}");
    assert!(error.is_request() || error.is_connect(), "{error:?}");
    // The server itself keeps working.
    chat(&sim, &chat_body("m", "hi")).await;
    assert_eq!(sim.calls("m"), 2);
}

#[tokio::test]
async fn cut_after_chunks_aborts_the_stream_with_a_body_error() {
    let sim = sim().await;
    sim.script("m", vec![Fault::cut_after(2)]);
    let mut request = chat_body("m", "one two three four five six");
    request["stream"] = json!(true);
    let mut response = post(&sim, "/chat/completions", &request).await.unwrap();
    assert_eq!(response.status(), 200);
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
    assert!(!text.contains("[DONE]"));
    // The role chunk and exactly two content chunks arrived.
    assert_eq!(text.matches("data: ").count(), 3, "{text}");
}

#[tokio::test]
async fn cut_on_a_plain_request_drops_the_connection() {
    let sim = sim().await;
    sim.script("m", vec![Fault::cut_after(1)]);
    assert!(
        post(&sim, "/chat/completions", &chat_body("m", "hi"))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn stall_keeps_the_stream_open_and_silent_then_finishes() {
    let sim = sim().await;
    sim.script("m", vec![Fault::stall_after(1, Duration::from_millis(600))]);
    let mut request = chat_body("m", "one two three four");
    request["stream"] = json!(true);
    let mut response = post(&sim, "/chat/completions", &request).await.unwrap();
    let mut received = Vec::new();
    // The role chunk and one content chunk arrive, then nothing.
    let silent = loop {
        match tokio::time::timeout(Duration::from_millis(200), response.chunk()).await {
            Ok(chunk) => received.extend_from_slice(&chunk.unwrap().unwrap()),
            Err(_elapsed) => break String::from_utf8(received.clone()).unwrap(),
        }
    };
    assert_eq!(silent.matches("data: ").count(), 2, "{silent}");
    // After the stall the stream completes normally.
    while let Some(chunk) = response.chunk().await.unwrap() {
        received.extend_from_slice(&chunk);
    }
    sse_events(&String::from_utf8(received).unwrap());
}

#[tokio::test]
async fn stall_on_a_plain_request_is_a_delay() {
    let sim = sim().await;
    sim.script("m", vec![Fault::stall_after(0, Duration::from_millis(300))]);
    let started = Instant::now();
    chat(&sim, &chat_body("m", "hi")).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn delay_waits_before_answering() {
    let sim = sim().await;
    sim.script("m", vec![Fault::delay(Duration::from_millis(300))]);
    let started = Instant::now();
    chat(&sim, &chat_body("m", "hi")).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    let timed_out = client()
        .post(format!("{}/chat/completions", sim.base_url()))
        .timeout(Duration::from_millis(100))
        .json(&chat_body("m", "hi"))
        .send();
    sim.script("m", vec![Fault::delay(Duration::from_secs(5))]);
    assert!(timed_out.await.unwrap_err().is_timeout());
}

#[tokio::test]
async fn chunk_interval_paces_the_stream() {
    let sim = sim().await;
    sim.script(
        "m",
        vec![Fault {
            chunk_interval: Some(Duration::from_millis(50)),
            ..Fault::default()
        }],
    );
    let mut request = chat_body("m", "a b c");
    request["stream"] = json!(true);
    let started = Instant::now();
    let response = post(&sim, "/chat/completions", &request).await.unwrap();
    sse_events(&response.text().await.unwrap());
    // role + 5 content pieces + finish + [DONE]: 7 gaps.
    assert!(started.elapsed() >= Duration::from_millis(350));
}

#[tokio::test]
async fn malformed_body_fails_json_parsing() {
    let sim = sim().await;
    sim.script("m", vec![Fault::malformed(), Fault::malformed()]);
    let response = post(&sim, "/chat/completions", &chat_body("m", "hi"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert!(response.json::<Value>().await.is_err());
    let mut request = chat_body("m", "hi");
    request["stream"] = json!(true);
    let text = post(&sim, "/chat/completions", &request)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let first = text.split("\n\n").next().unwrap();
    assert!(serde_json::from_str::<Value>(first.strip_prefix("data: ").unwrap()).is_err());
}

#[tokio::test]
async fn calls_count_every_model_request_including_faulted_ones() {
    let sim = sim().await;
    sim.script("a", vec![Fault::status(500)]);
    post(&sim, "/chat/completions", &chat_body("a", "x"))
        .await
        .unwrap();
    chat(&sim, &chat_body("a", "x")).await;
    post(&sim, "/embeddings", &json!({"model": "a", "input": "x"}))
        .await
        .unwrap();
    chat(&sim, &chat_body("b", "x")).await;
    assert_eq!(sim.calls("a"), 3);
    assert_eq!(sim.calls("b"), 1);
    assert_eq!(sim.calls("never"), 0);
    assert_eq!(sim.calls("*"), 4);
    sim.reset();
    assert_eq!(sim.calls("a"), 0);
}

#[tokio::test]
async fn wildcard_scripts_apply_to_every_model_and_model_entries_win() {
    let sim = sim().await;
    sim.script("*", vec![Fault::status(502), Fault::status(502)]);
    sim.script("special", vec![Fault::status(429)]);
    let status = |model: &'static str| {
        let sim = sim.clone();
        async move {
            post(&sim, "/chat/completions", &chat_body(model, "x"))
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(status("special").await, 429);
    assert_eq!(status("a").await, 502);
    assert_eq!(status("b").await, 502);
    assert_eq!(status("a").await, 200);
}

#[tokio::test]
async fn sticky_fault_lasts_until_cleared() {
    let sim = sim().await;
    sim.set_always("*", Some(Fault::status(503)));
    for _ in 0..3 {
        let response = post(&sim, "/chat/completions", &chat_body("m", "x"))
            .await
            .unwrap();
        assert_eq!(response.status(), 503);
    }
    sim.set_always("*", None);
    chat(&sim, &chat_body("m", "x")).await;
}

#[tokio::test]
async fn tool_offer_gets_a_tool_call_and_tool_result_gets_text() {
    let sim = sim().await;
    let tools = json!([{"type": "function", "function": {
        "name": "get_weather",
        "parameters": {"type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"]}
    }}]);
    let mut request = chat_body("m", "weather?");
    request["tools"] = tools.clone();
    let body = chat(&sim, &request).await;
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], Value::Null);
    let call = &choice["message"]["tool_calls"][0];
    assert!(call["id"].as_str().unwrap().starts_with("call_sim_"));
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let arguments: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(arguments, json!({"city": "sim"}));

    let followup = json!({"model": "m", "tools": tools, "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}
    ]});
    let body = chat(&sim, &followup).await;
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "sim saw tool result: sunny"
    );

    // Streamed, the call arrives as OpenAI sends it.
    request["stream"] = json!(true);
    let text = post(&sim, "/chat/completions", &request)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events = sse_events(&text);
    let head = &events[0]["choices"][0]["delta"]["tool_calls"][0];
    assert_eq!(head["index"], 0);
    assert_eq!(head["function"]["name"], "get_weather");
    let streamed: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str())
        .collect();
    assert_eq!(streamed, call["function"]["arguments"]);
    assert_eq!(
        events[events.len() - 2]["choices"][0]["finish_reason"],
        "tool_calls"
    );
}

#[tokio::test]
async fn json_object_format_answers_a_json_object() {
    let sim = sim().await;
    let mut request = chat_body("m", "hi");
    request["response_format"] = json!({"type": "json_object"});
    let body = chat(&sim, &request).await;
    let content: Value =
        serde_json::from_str(body["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    assert!(content.is_object());
}

#[tokio::test]
async fn reply_fault_overrides_the_text() {
    let sim = sim().await;
    sim.script("m", vec![Fault::reply("forced")]);
    let body = chat(&sim, &chat_body("m", "hi")).await;
    assert_eq!(body["choices"][0]["message"]["content"], "forced");
}

#[tokio::test]
async fn embeddings_have_openai_shape_and_are_deterministic() {
    let sim = sim().await;
    let request = json!({"model": "emb", "input": ["alpha", "beta gamma"]});
    let response = post(&sim, "/embeddings", &request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "emb");
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    assert_eq!(body["data"][1]["object"], "embedding");
    assert_eq!(body["data"][1]["index"], 1);
    assert_eq!(body["data"][0]["embedding"].as_array().unwrap().len(), 8);
    assert_eq!(body["usage"]["prompt_tokens"], 3);
    assert_eq!(body["usage"]["total_tokens"], 3);
    let single: Value = post(
        &sim,
        "/embeddings",
        &json!({"model": "emb", "input": "alpha"}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(single["data"][0]["embedding"], body["data"][0]["embedding"]);
}

#[tokio::test]
async fn invalid_json_gets_an_openai_400() {
    let sim = sim().await;
    let response = client()
        .post(format!("{}/chat/completions", sim.base_url()))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn records_authorization_and_request_body_per_model() {
    let sim = sim().await;
    let mut request = chat_body("m", "hi");
    request["x_unknown"] = json!({"kept": true});
    client()
        .post(format!("{}/chat/completions", sim.base_url()))
        .bearer_auth("sk-test")
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(
        sim.last_authorization("m").as_deref(),
        Some("Bearer sk-test")
    );
    assert_eq!(sim.last_request("m"), Some(request));
    assert_eq!(sim.last_request("other"), None);
    // Azure OpenAI's key header, recorded when no bearer token came.
    client()
        .post(format!("{}/chat/completions", sim.base_url()))
        .header("api-key", "azure-key")
        .json(&chat_body("m", "hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(sim.last_authorization("m").as_deref(), Some("azure-key"));
}

#[tokio::test]
async fn models_lists_seen_models_and_sim_model() {
    let sim = sim().await;
    chat(&sim, &chat_body("seen", "x")).await;
    let body: Value = client()
        .get(format!("{}/models", sim.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["seen", "sim-model"]);
}

#[tokio::test]
async fn http_control_surface_scripts_counts_and_resets() {
    let sim = sim().await;
    let root = format!("http://{}", sim.addr());
    let client = client();
    let ok = client
        .post(format!("{root}/_sim/script"))
        .json(&json!({"model": "m", "faults": [{"status": 429, "retry_after": "2", "delay": "10ms"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let response = post(&sim, "/chat/completions", &chat_body("m", "x"))
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "2");

    let always = json!({"model": "*", "fault": {"status": 500}});
    client
        .post(format!("{root}/_sim/always"))
        .json(&always)
        .send()
        .await
        .unwrap();
    let response = post(&sim, "/chat/completions", &chat_body("n", "x"))
        .await
        .unwrap();
    assert_eq!(response.status(), 500);
    client
        .post(format!("{root}/_sim/always"))
        .json(&json!({"model": "*", "fault": null}))
        .send()
        .await
        .unwrap();
    chat(&sim, &chat_body("n", "x")).await;

    let calls: Value = client
        .get(format!("{root}/_sim/calls"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(calls, json!({"calls": {"m": 1, "n": 2}}));

    let bad = client
        .post(format!("{root}/_sim/script"))
        .json(&json!({"model": "m", "faults": [{"stauts": 500}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);

    client
        .post(format!("{root}/_sim/reset"))
        .send()
        .await
        .unwrap();
    assert_eq!(sim.calls("*"), 0);
}

#[tokio::test]
async fn shutdown_stops_serving_even_with_a_stalled_stream() {
    let sim = sim().await;
    let url = format!("{}/chat/completions", sim.base_url());
    sim.script("m", vec![Fault::stall_after(0, Duration::from_secs(3600))]);
    let mut request = chat_body("m", "x");
    request["stream"] = json!(true);
    let mut stalled = post(&sim, "/chat/completions", &request).await.unwrap();
    stalled.chunk().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), sim.shutdown())
        .await
        .unwrap();
    assert!(stalled.chunk().await.is_err());
    let after = reqwest::Client::new()
        .post(url)
        .json(&chat_body("m", "x"))
        .send()
        .await;
    assert!(after.is_err());
}

#[tokio::test]
async fn dropping_the_last_handle_stops_the_server() {
    let sim = sim().await;
    let url = format!("{}/chat/completions", sim.base_url());
    let clone = sim.clone();
    drop(sim);
    chat(&clone, &chat_body("m", "x")).await;
    drop(clone);
    // The accept loop notices the cancellation on its next poll.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let after = reqwest::Client::new()
        .post(url)
        .json(&chat_body("m", "x"))
        .send()
        .await;
    assert!(after.is_err());
}
