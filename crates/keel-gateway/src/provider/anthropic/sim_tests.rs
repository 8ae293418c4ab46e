//! The provider against the simulated server's `/v1/messages`: what goes out, what comes
//! back, and how Anthropic's errors are classified.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use keel_core::ErrorClass;
use serde_json::{Value, json};

use super::AnthropicProvider;
use super::request::DEFAULT_MAX_TOKENS;
use crate::error::UpstreamError;
use crate::provider::{Endpoint, Provider, ProviderReply, ProviderRequest};

fn provider(sim: &keel_sim::SimHandle) -> AnthropicProvider {
    let settings = keel_config::ProviderSettings {
        name: "claude".to_owned(),
        kind: keel_config::ProviderKind::Anthropic,
        base_url: sim.base_url(),
        api_key: Some(keel_config::Secret::new("sk-ant-direct".to_owned())),
        api_key_header: None,
        headers: Vec::new(),
        query: Vec::new(),
        prices: std::collections::BTreeMap::new(),
    };
    let proxies = hyper_util::client::proxy::matcher::Matcher::builder().build();
    AnthropicProvider::with_proxies(&settings, Duration::from_secs(2), &proxies).unwrap()
}

fn request(endpoint: Endpoint, body: Value) -> ProviderRequest {
    ProviderRequest {
        endpoint,
        stream: body["stream"] == true,
        body: Bytes::from(body.to_string()),
        target: "claude/claude-sim".to_owned(),
    }
}

fn chat(extra: Value) -> ProviderRequest {
    let mut body = json!({"model": "claude-sim", "messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hello keel"}]});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    request(Endpoint::ChatCompletions, body)
}

async fn failure(provider: &AnthropicProvider, request: ProviderRequest) -> UpstreamError {
    match provider.send(request).await {
        Err(e) => e,
        Ok(_) => panic!("no error"),
    }
}

#[tokio::test]
async fn a_call_goes_out_as_a_message_and_comes_back_as_a_chat_completion() {
    let sim = keel_sim::SimServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let provider = provider(&sim);
    assert!(provider.client.is_direct());
    let Ok(ProviderReply::Json(answer, passed)) = provider.send(chat(json!({}))).await else {
        panic!("no JSON answer");
    };
    // Anthropic's `request-id` is the answer's id.
    let id = passed
        .request_id()
        .expect("the simulator names every answer");
    assert!(id.starts_with("req_sim_"), "{id:?}");
    // Its rate limits come under OpenAI's names, the reset as the time left.
    let mut headers = http::HeaderMap::new();
    passed.apply(&mut headers);
    assert_eq!(headers["x-ratelimit-limit-requests"], "10000");
    assert!(
        headers.contains_key("x-ratelimit-remaining-requests"),
        "{headers:?}"
    );
    let reset = headers["x-ratelimit-reset-requests"].to_str().unwrap();
    assert!(reset.ends_with('s') && reset.len() <= 5, "{reset}");
    assert!(!headers.contains_key("anthropic-ratelimit-requests-limit"));
    let answer: Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "sim reply to: hello keel"
    );
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    assert_eq!(answer["usage"]["total_tokens"], 4 + 5);
    assert_eq!(
        sim.last_authorization("claude-sim").as_deref(),
        Some("sk-ant-direct")
    );
    let sent = sim.last_request("claude-sim").unwrap();
    assert_eq!(sent["max_tokens"], DEFAULT_MAX_TOKENS);
    assert_eq!(sent["system"][0]["text"], "be brief");
    // A short max_tokens cuts the answer: finish_reason length.
    let Ok(ProviderReply::Json(answer, _)) = provider.send(chat(json!({"max_tokens": 2}))).await
    else {
        panic!("no JSON answer");
    };
    let answer: Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(answer["choices"][0]["finish_reason"], "length");
    assert_eq!(answer["choices"][0]["message"]["content"], "sim reply");
    sim.shutdown().await;
}

#[tokio::test]
async fn a_stream_comes_back_as_chunks_ending_with_usage() {
    let sim = keel_sim::SimServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let provider = provider(&sim);
    let streamed = chat(json!({"stream": true, "stream_options": {"include_usage": true}}));
    let Ok(ProviderReply::Stream(stream, _)) = provider.send(streamed).await else {
        panic!("no stream");
    };
    let chunks: Vec<Value> = stream
        .map(|c| serde_json::from_slice(&c.unwrap()).unwrap())
        .collect()
        .await;
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "sim reply to: hello keel");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["total_tokens"], 9);
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "stop"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn anthropic_s_errors_are_classified_like_any_provider_s() {
    let sim = keel_sim::SimServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let provider = provider(&sim);
    sim.script(
        "claude-sim",
        vec![
            keel_sim::Fault::status(529).with_retry_after("1"),
            keel_sim::Fault::status(429),
            keel_sim::Fault::status(500),
            keel_sim::Fault::error_code("context_length_exceeded"),
            keel_sim::Fault::error_code("model_not_found"),
            keel_sim::Fault::status(400),
            keel_sim::Fault::status(401),
        ],
    );
    let table = [
        (529, ErrorClass::Retryable),
        (429, ErrorClass::Retryable),
        (500, ErrorClass::Retryable),
        (400, ErrorClass::FallbackOnly),
        (404, ErrorClass::FallbackOnly),
        (400, ErrorClass::Fatal),
        (401, ErrorClass::Fatal),
    ];
    for (i, (status, class)) in table.into_iter().enumerate() {
        let error = failure(&provider, chat(json!({}))).await;
        assert_eq!(error.status().map(|s| s.as_u16()), Some(status), "{error}");
        assert_eq!(error.class(), class, "{error}");
        let UpstreamError::Status {
            body, retry_after, ..
        } = &error
        else {
            panic!("not a status error: {error}");
        };
        if i == 0 {
            assert_eq!(*retry_after, Some(Duration::from_secs(1)));
        }
        // What the client would see: OpenAI's shape.
        let body: Value = serde_json::from_slice(body).unwrap();
        assert!(body["error"]["message"].is_string(), "{body}");
        assert!(body.get("type").is_none(), "{body}");
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn what_anthropic_cannot_serve_is_refused_without_calling_it() {
    let sim = keel_sim::SimServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let provider = provider(&sim);
    let embeddings = request(
        Endpoint::Embeddings,
        json!({"model": "claude-sim", "input": "x"}),
    );
    let unsupported = chat(json!({"logprobs": true}));
    for (request, param) in [(embeddings, "model"), (unsupported, "logprobs")] {
        let error = failure(&provider, request).await;
        assert_eq!(error.class(), ErrorClass::FallbackOnly, "{error}");
        let UpstreamError::Status { status, body, .. } = &error else {
            panic!("not a status error: {error}");
        };
        assert_eq!(status.as_u16(), 400);
        let body: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(body["error"]["param"], param, "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
    assert_eq!(sim.calls("*"), 0);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_conversation_that_used_tools_can_be_sent_without_tools() {
    // A summary of a conversation with tool calls, say: OpenAI takes it without `tools`,
    // Anthropic only with the called tools declared.
    let sim = keel_sim::SimServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let provider = provider(&sim);
    let history = json!({"model": "claude-sim", "messages": [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny in Paris."},
        {"role": "user", "content": "summarize this conversation"}]});
    let Ok(ProviderReply::Json(answer, _)) = provider
        .send(request(Endpoint::ChatCompletions, history))
        .await
    else {
        panic!("no JSON answer");
    };
    let answer: Value = serde_json::from_slice(&answer).unwrap();
    let message = &answer["choices"][0]["message"];
    // Offered a tool it may call, the sim would call it (see the tool_choice below).
    assert_eq!(
        message["content"],
        "sim reply to: summarize this conversation"
    );
    assert!(message.get("tool_calls").is_none(), "{answer}");
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    let sent = sim.last_request("claude-sim").unwrap();
    assert_eq!(
        sent["tools"],
        json!([{"name": "get_weather", "input_schema": {"type": "object"}}])
    );
    assert_eq!(sent["tool_choice"], json!({"type": "none"}));
    sim.shutdown().await;
}
