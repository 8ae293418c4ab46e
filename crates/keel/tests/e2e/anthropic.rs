//! An agent using the `openai` Python SDK with a route whose target is an Anthropic model
//! (`kind = "anthropic"`, the simulated server's `/v1/messages`): nothing changes on the
//! client's side, and keel's policies and records work as for any provider.

use keel_sim::Fault;

use crate::common::{Keel, PROVIDER_KEY, sdk, sim};

const CONFIG: &str = r#"
[providers.claude]
kind = "anthropic"
base_url = "{sim}"
api_key_env = "KEEL_TEST_PROVIDER_KEY"

[providers.sim]
kind = "openai"
base_url = "{sim}"
api_key_env = "KEEL_TEST_PROVIDER_KEY"

[routes.claude]
targets = [{ provider = "claude", model = "claude-sim" }]
retry = { max_attempts = 3, base = "10ms", cap = "100ms", jitter = "full" }
timeouts = { connect = "1s", first_token = "2s", idle = "1s", attempt = "5s", total = "20s" }

[routes.mixed]
targets = [
  { provider = "claude", model = "claude-down" },
  { provider = "sim", model = "gpt-backup" },
]
retry = { max_attempts = 2, base = "10ms", cap = "100ms", jitter = "full" }
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_plain_call_and_a_stream_through_the_sdk_reach_an_anthropic_target() {
    let sim = sim().await;
    let keel = Keel::start(CONFIG, &sim).await;
    let out = sdk(
        "chat",
        &keel.base_url(),
        &["--model", "claude", "--no-extra-body"],
    )
    .await;
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["content"], "sim reply to: hello keel");
    assert_eq!(out["model"], "claude-sim");
    assert_eq!(out["headers"]["x-keel-target"], "claude/claude-sim");
    assert_eq!(out["headers"]["x-keel-attempts"], "1");
    // Anthropic's `request-id` and rate limits reach the SDK under OpenAI's names.
    let plain_id = out["headers"]["x-request-id"].as_str().unwrap_or_default();
    assert!(plain_id.starts_with("req_sim_"), "{out}");
    assert_eq!(out["request_id"], plain_id, "{out}");
    assert_eq!(
        out["headers"]["x-ratelimit-limit-requests"], "10000",
        "{out}"
    );
    let reset = out["headers"]["x-ratelimit-reset-requests"]
        .as_str()
        .unwrap_or_default();
    assert!(reset.ends_with('s'), "{out}");
    // "hello keel" in, "sim reply to: hello keel" out, in the sim's words-as-tokens.
    assert_eq!(
        out["usage"]["prompt_tokens"].as_u64(),
        Some(2),
        "{}",
        out["usage"]
    );
    assert_eq!(out["usage"]["completion_tokens"].as_u64(), Some(5));
    assert_eq!(out["usage"]["total_tokens"].as_u64(), Some(7));
    // What went upstream was a Messages request, with keel's key in x-api-key.
    let upstream = sim.last_request("claude-sim").unwrap();
    assert_eq!(upstream["max_tokens"], 4096, "{upstream}");
    assert_eq!(
        upstream["messages"],
        serde_json::json!([{"role": "user", "content": [{"type": "text", "text": "hello keel"}]}])
    );
    assert_eq!(
        sim.last_authorization("claude-sim").as_deref(),
        Some(PROVIDER_KEY)
    );

    let out = sdk("stream", &keel.base_url(), &["--model", "claude"]).await;
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["content"], "sim reply to: stream to me please");
    assert_eq!(out["finish_reason"], "stop");
    assert!(out["chunks"].as_u64().unwrap() >= 5, "{out}");
    let stream_id = out["headers"]["x-request-id"].as_str().unwrap_or_default();
    assert!(stream_id.starts_with("req_sim_"), "{out}");
    assert!(
        out["headers"]["x-ratelimit-remaining-requests"].is_string(),
        "{out}"
    );

    // Both calls are recorded with the usage Anthropic reported, the stream's included
    // (keel asked for it; the SDK did not).
    let calls = keel.events_of("llm_call");
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0]["target"], "claude/claude-sim");
    assert_eq!(calls[0]["outcome"], "ok");
    assert_eq!(calls[0]["usage"]["total_tokens"], 7, "{}", calls[0]);
    assert_eq!(calls[0]["request_id"], plain_id);
    assert_eq!(calls[1]["stream"], true);
    assert_eq!(calls[1]["request_id"], stream_id);
    assert_eq!(calls[1]["outcome"], "ok");
    assert_eq!(calls[1]["usage"]["prompt_tokens"], 4, "{}", calls[1]);
    assert_eq!(calls[1]["usage"]["completion_tokens"], 7, "{}", calls[1]);
    let metrics = keel.metrics().await;
    assert!(
        metrics.contains(
            "keel_requests_total{route=\"claude\",target=\"claude/claude-sim\",outcome=\"ok\"} 2"
        ),
        "{metrics}"
    );
    // The key went to the provider only: not into the store.
    let needle = PROVIDER_KEY.as_bytes();
    for file in [keel.db_path(), keel.db_path().with_extension("db-wal")] {
        let bytes = std::fs::read(&file).unwrap_or_default();
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "provider key stored in {}",
            file.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tool_call_round_trip_works_plain_and_streamed() {
    let sim = sim().await;
    let keel = Keel::start(CONFIG, &sim).await;
    let out = sdk("tool_round_trip", &keel.base_url(), &["--model", "claude"]).await;
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["first_finish_reason"], "tool_calls");
    let call = &out["tool_calls"][0];
    assert_eq!(call["name"], "get_weather");
    assert_eq!(call["arguments"], serde_json::json!({"city": "sim"}));
    assert_eq!(out["finish_reason"], "stop");
    assert_eq!(out["content"], "sim saw tool result: sunny in sim");
    // The second request carried the call and its result as Anthropic blocks, paired by id.
    let upstream = sim.last_request("claude-sim").unwrap();
    let messages = upstream["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 3, "{upstream}");
    assert_eq!(upstream["system"][0]["text"], "use the tools");
    assert_eq!(messages[1]["content"][0]["type"], "tool_use");
    assert_eq!(messages[1]["content"][0]["id"], call["id"]);
    assert_eq!(messages[1]["content"][0]["input"]["city"], "sim");
    assert_eq!(messages[2]["role"], "user");
    assert_eq!(messages[2]["content"][0]["type"], "tool_result");
    assert_eq!(messages[2]["content"][0]["tool_use_id"], call["id"]);

    let out = sdk("stream_tools", &keel.base_url(), &["--model", "claude"]).await;
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["finish_reason"], "tool_calls");
    assert_eq!(out["tool_calls"][0]["name"], "get_weather");
    assert!(
        out["tool_calls"][0]["id"]
            .as_str()
            .unwrap()
            .starts_with("toolu_"),
        "{out}"
    );
    assert_eq!(
        out["tool_calls"][0]["arguments"],
        serde_json::json!({"city": "sim"})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_529_overloaded_is_retried_and_the_second_attempt_answers() {
    let sim = sim().await;
    let keel = Keel::start(CONFIG, &sim).await;
    sim.script("claude-sim", vec![Fault::status(529)]);
    let out = sdk(
        "chat",
        &keel.base_url(),
        &["--model", "claude", "--no-extra-body"],
    )
    .await;
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["headers"]["x-keel-attempts"], "2");
    assert_eq!(out["headers"]["x-keel-target"], "claude/claude-sim");
    assert_eq!(sim.calls("claude-sim"), 2);
    let failed = keel.events_of("llm_attempt_failed");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["status"], 529);
    assert_eq!(failed[0]["class"], "retryable");
    assert_eq!(keel.events_of("retry_scheduled").len(), 1);
    // A stream is retried the same way before its first byte.
    sim.script("claude-sim", vec![Fault::status(529)]);
    let out = sdk("stream", &keel.base_url(), &["--model", "claude"]).await;
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["headers"]["x-keel-attempts"], "2");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_anthropic_target_that_is_down_falls_back_to_an_openai_target() {
    let sim = sim().await;
    let keel = Keel::start(CONFIG, &sim).await;
    sim.set_always("claude-down", Some(Fault::status(529)));
    let plain = ["--model", "mixed", "--no-extra-body"];
    let out = sdk("chat", &keel.base_url(), &plain).await;
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["headers"]["x-keel-target"], "sim/gpt-backup");
    assert_eq!(out["headers"]["x-keel-fallback"], "true");
    assert_eq!(out["headers"]["x-keel-attempts"], "3");
    assert_eq!(out["content"], "sim reply to: hello keel");
    let fallbacks = keel.events_of("fallback_used");
    assert_eq!(fallbacks[0]["from"], "claude/claude-down");
    assert_eq!(fallbacks[0]["to"], "sim/gpt-backup");
    // A prompt too long for Claude goes to the next target at once, without a retry.
    sim.set_always("claude-down", None);
    sim.script(
        "claude-down",
        vec![Fault::error_code("context_length_exceeded")],
    );
    let before = sim.calls("claude-down");
    let out = sdk("chat", &keel.base_url(), &plain).await;
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["headers"]["x-keel-target"], "sim/gpt-backup");
    assert_eq!(out["headers"]["x-keel-attempts"], "2");
    assert_eq!(sim.calls("claude-down"), before + 1);
    // The SDK's unknown field cannot go to Anthropic: the OpenAI target, which takes it,
    // answers instead, and Claude is never called.
    let before = sim.calls("claude-down");
    let out = sdk("chat", &keel.base_url(), &["--model", "mixed"]).await;
    assert_eq!(out["headers"]["x-keel-target"], "sim/gpt-backup", "{out}");
    assert_eq!(sim.calls("claude-down"), before);
    let upstream = sim.last_request("gpt-backup").unwrap();
    assert_eq!(upstream["keel_test_unknown_field"]["kept"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn what_an_anthropic_target_cannot_do_is_an_openai_error_the_sdk_understands() {
    let sim = sim().await;
    let keel = Keel::start(CONFIG, &sim).await;
    // An unknown parameter: a 400 naming it, and nothing sent.
    let out = sdk("chat", &keel.base_url(), &["--model", "claude"]).await;
    assert_eq!(out["exception"], "BadRequestError", "{out}");
    let message = out["message"].as_str().unwrap();
    assert!(message.contains("keel_test_unknown_field"), "{message}");
    assert!(message.contains("Anthropic"), "{message}");
    // Embeddings: Anthropic has none.
    let out = sdk("embed", &keel.base_url(), &["--model", "claude"]).await;
    assert_eq!(out["exception"], "BadRequestError", "{out}");
    assert!(
        out["message"].as_str().unwrap().contains("no embeddings"),
        "{out}"
    );
    assert_eq!(sim.calls("claude-sim"), 0);
    // Anthropic refusing keel's key is keel's problem, not the agent's: a 502.
    sim.script(
        "claude-sim",
        vec![Fault::status(401).with_error_code("invalid_api_key")],
    );
    let out = sdk(
        "chat",
        &keel.base_url(),
        &["--model", "claude", "--no-extra-body"],
    )
    .await;
    assert_eq!(out["status"], 502, "{out}");
    assert!(
        out["message"]
            .as_str()
            .unwrap()
            .contains("refused keel's credentials"),
        "{out}"
    );
    // An Anthropic 400 reaches the SDK as a BadRequestError in the OpenAI shape.
    sim.script("claude-sim", vec![Fault::status(400)]);
    let out = sdk(
        "chat",
        &keel.base_url(),
        &["--model", "claude", "--no-extra-body"],
    )
    .await;
    assert_eq!(out["exception"], "BadRequestError", "{out}");
    assert_eq!(out["status"], 400);
    assert!(
        out["message"].as_str().unwrap().contains("simulated 400"),
        "{out}"
    );
    assert_eq!(sim.calls("claude-sim"), 2);
}
