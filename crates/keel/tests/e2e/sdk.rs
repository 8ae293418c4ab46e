//! What an agent using the `openai` Python SDK sees while providers fail.

use std::time::{Duration, Instant};

use keel_sim::{Fault, SimHandle};

use crate::common::{Keel, PROVIDER_KEY, TWO_TARGETS, sdk, sim};

/// The raw text of a chat call `body` to `keel` (with agent `key`, if any): SSE events as
/// they went over the wire, for what the SDK does not show.
async fn raw_chat(keel: &Keel, key: Option<&str>, body: &serde_json::Value) -> String {
    let mut request = reqwest::Client::new()
        .post(format!("{}/chat/completions", keel.base_url()))
        .json(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().await.unwrap().text().await.unwrap()
}

/// [`raw_chat`] of a stream on route `smart` asking `prompt`.
async fn raw_stream(keel: &Keel, key: Option<&str>, prompt: &str) -> String {
    let body = serde_json::json!({"model": "smart", "stream": true,
        "messages": [{"role": "user", "content": prompt}]});
    raw_chat(keel, key, &body).await
}

/// keel on [`TWO_TARGETS`] with `fault` scripted for the primary's next call, and what the
/// SDK made of one stream through it.
async fn stream_with(fault: Fault) -> (SimHandle, Keel, serde_json::Value) {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    sim.script("primary", vec![fault]);
    let out = sdk("stream", &keel.base_url(), &[]).await;
    (sim, keel, out)
}

/// With payloads not recorded (`record_payloads = false`), an `llm_call` keeps no answer but
/// still says which model answered and why it stopped.
#[tokio::test(flavor = "multi_thread")]
async fn events_only_calls_keep_the_answering_model_and_finish_reasons() {
    let store = "url = \"sqlite://{dir}/keel.db\"\n";
    assert!(TWO_TARGETS.contains(store));
    let config = TWO_TARGETS.replace(store, &format!("{store}record_payloads = false\n"));
    let sim = sim().await;
    let keel = Keel::start(&config, &sim).await;
    let body =
        serde_json::json!({"model": "smart", "messages": [{"role": "user", "content": "hi"}]});
    let answer: serde_json::Value =
        serde_json::from_str(&raw_chat(&keel, None, &body).await).unwrap();
    let calls = keel.events_of("llm_call");
    assert_eq!(calls.len(), 1);
    assert!(calls[0]["response"].is_null(), "{}", calls[0]);
    assert!(calls[0]["request"].is_null(), "{}", calls[0]);
    assert_eq!(calls[0]["response_model"], answer["model"], "{}", calls[0]);
    assert!(answer["model"].is_string(), "{answer}");
    assert_eq!(
        calls[0]["finish_reasons"],
        serde_json::json!([answer["choices"][0]["finish_reason"]]),
        "{}",
        calls[0]
    );
}

/// A model server that refuses `stream_options` (Azure OpenAI before api-version
/// 2024-10-21; servers that refuse unknown members).
struct RefusesStreamOptions;

impl keel_sim::Injector for RefusesStreamOptions {
    fn fault_for(&self, _model: &str, request: &serde_json::Value) -> Option<Fault> {
        request.get("stream_options").map(|_| Fault {
            status: Some(400),
            message: Some("Unrecognized request argument supplied: stream_options".to_owned()),
            ..Fault::default()
        })
    }
}

/// keel asks every stream for its usage (`stream_options.include_usage`); a provider that
/// refuses the member gets the stream again without it, at once, and keel remembers: the
/// agent's stream works as it would straight to the provider. A client that sent
/// `stream_options` itself gets the provider's refusal, as it would without keel.
#[tokio::test(flavor = "multi_thread")]
async fn a_provider_that_refuses_stream_options_still_streams() {
    let sim = sim().await;
    sim.set_injector(Some(std::sync::Arc::new(RefusesStreamOptions)));
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    let out = sdk("stream", &keel.base_url(), &[]).await;
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["finish_reason"], "stop", "{out}");
    assert!(!out["content"].as_str().unwrap().is_empty(), "{out}");
    assert_eq!(out["headers"]["x-keel-target"], "sim/primary", "{out}");
    assert_eq!(out["headers"]["x-keel-attempts"], "2", "{out}");
    assert_eq!(sim.calls("primary"), 2);
    assert!(
        sim.last_request("primary")
            .unwrap()
            .get("stream_options")
            .is_none()
    );
    let failed = keel.events_of("llm_attempt_failed");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["status"], 400, "{failed:?}");
    assert_eq!(failed[0]["resent"], "without stream_options", "{failed:?}");
    // The next stream goes without at once.
    let again = sdk("stream", &keel.base_url(), &[]).await;
    assert_eq!(again["ok"], true, "{again}");
    assert_eq!(again["headers"]["x-keel-attempts"], "1", "{again}");
    assert_eq!(sim.calls("primary"), 3);
    assert_eq!(keel.events_of("llm_attempt_failed").len(), 1);
    assert_eq!(keel.events_of("llm_call").len(), 2);
    // The client's own stream_options are its own: the refusal comes back to it.
    let body = serde_json::json!({"model": "smart", "stream": true,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "hi"}]});
    let refused = raw_chat(&keel, None, &body).await;
    assert!(
        refused.contains("Unrecognized request argument supplied: stream_options"),
        "{refused}"
    );
    assert_eq!(sim.calls("primary"), 4);
}

/// A model server that refuses any request whose text names `stream_options` (so also a
/// prompt about it: an error that echoes the request, as validation errors can).
struct RefusesTheWord;

impl keel_sim::Injector for RefusesTheWord {
    fn fault_for(&self, _model: &str, request: &serde_json::Value) -> Option<Fault> {
        request
            .to_string()
            .contains("stream_options")
            .then(|| Fault {
                status: Some(422),
                message: Some(format!("unexpected input: {request}")),
                ..Fault::default()
            })
    }
}

/// keel leaves its `stream_options` out once and no more: when the resend is refused too
/// (the client's own text names the member), the refusal goes to the client, and the target
/// is not marked, since leaving the member out did not help.
#[tokio::test(flavor = "multi_thread")]
async fn a_refusal_that_is_not_about_keel_s_member_is_resent_once_and_passed_on() {
    let sim = sim().await;
    sim.set_injector(Some(std::sync::Arc::new(RefusesTheWord)));
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    let refused = raw_stream(&keel, None, "what does stream_options do?").await;
    assert!(refused.contains("unexpected input"), "{refused}");
    assert_eq!(sim.calls("primary"), 2);
    assert_eq!(sim.calls("secondary"), 0);
    // Not marked: the next stream carries keel's member again, is refused for it, and
    // goes through without it.
    let streamed = raw_stream(&keel, None, "hello").await;
    assert!(streamed.contains("[DONE]"), "{streamed}");
    assert_eq!(sim.calls("primary"), 4);
    let failed = keel.events_of("llm_attempt_failed");
    let resent = failed.iter().filter(|e| e["resent"].is_string()).count();
    assert_eq!((failed.len(), resent), (3, 2), "{failed:?}");
}

/// A provider that takes its key in a header of its own (Azure OpenAI's `api-key`) gets the
/// key there, as it is, and no bearer token; the agent's call is answered as usual.
#[tokio::test(flavor = "multi_thread")]
async fn a_provider_with_api_key_header_gets_the_key_in_that_header() {
    let key_line = "api_key_env = \"KEEL_TEST_PROVIDER_KEY\"\n";
    assert!(TWO_TARGETS.contains(key_line));
    let config = TWO_TARGETS.replace(
        key_line,
        &format!("{key_line}api_key_header = \"api-key\"\n"),
    );
    let sim = sim().await;
    let keel = Keel::start(&config, &sim).await;
    let out = sdk("chat", &keel.base_url(), &[]).await;
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["headers"]["x-keel-target"], "sim/primary", "{out}");
    // The simulator records a bearer token first and `api-key` only without one.
    assert_eq!(
        sim.last_authorization("primary").as_deref(),
        Some(PROVIDER_KEY)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_call_passes_through_and_is_recorded() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    let out = sdk(
        "chat",
        &keel.base_url(),
        &[
            "--header",
            "x-keel-task=task-42",
            "--header",
            "x-keel-step=plan",
        ],
    )
    .await;
    assert_eq!(out["ok"], true, "{out}");
    assert!(
        out["content"].as_str().unwrap().contains("hello keel"),
        "{out}"
    );
    assert_eq!(out["headers"]["x-keel-target"], "sim/primary");
    assert_eq!(out["headers"]["x-keel-attempts"], "1");
    assert_eq!(out["headers"]["x-keel-fallback"], "false");
    assert_eq!(out["headers"]["x-keel-degraded"], "false");
    // The provider's id of the answer, for its support (the SDK's `_request_id`), and where
    // keel's account stands against the provider's rate limit.
    let id = out["headers"]["x-request-id"].as_str().unwrap_or_default();
    assert!(id.starts_with("req_sim_"), "{out}");
    assert_eq!(out["request_id"], id, "{out}");
    assert_eq!(
        out["headers"]["x-ratelimit-limit-requests"], "10000",
        "{out}"
    );
    assert!(
        out["headers"]["x-ratelimit-remaining-requests"].is_string(),
        "{out}"
    );
    assert!(out["headers"]["openai-processing-ms"].is_string(), "{out}");
    assert!(out["usage"]["total_tokens"].as_u64().unwrap() > 0);
    // The upstream saw the target's model, the client's unknown field, and keel's provider key.
    let upstream = sim.last_request("primary").unwrap();
    assert_eq!(upstream["model"], "primary");
    assert_eq!(upstream["keel_test_unknown_field"]["kept"], true);
    assert_eq!(
        sim.last_authorization("primary").unwrap(),
        format!("Bearer {PROVIDER_KEY}")
    );
    let calls = keel.events_of("llm_call");
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["route"], "smart");
    assert_eq!(calls[0]["target"], "sim/primary");
    assert_eq!(calls[0]["step"], "plan");
    assert!(calls[0]["usage"]["total_tokens"].as_u64().unwrap() > 0);
    assert_eq!(calls[0]["request_id"], id);
    // The answer is stored whole in its place, with the model that answered and why it
    // stopped beside it.
    let response = &calls[0]["response"];
    assert_eq!(
        response["choices"][0]["message"]["content"], out["content"],
        "{response}"
    );
    assert_eq!(response["usage"], calls[0]["usage"], "{response}");
    assert_eq!(calls[0]["response_model"], response["model"]);
    assert!(response["model"].is_string(), "{response}");
    assert_eq!(calls[0]["finish_reasons"], serde_json::json!(["stop"]));
    // `task-42` is the client's own label, not a supervisor task: its log still reads back.
    let log = keel.cli_ok(&["tasks", "events", "task-42", "--json"]);
    let text = String::from_utf8_lossy(&log.stdout);
    assert!(text.contains("\"llm_call\""), "{text}");
    let story = keel.cli_ok(&["postmortem", "task-42"]);
    let text = String::from_utf8_lossy(&story.stdout);
    assert!(text.contains("calls labelled \"task-42\""), "{text}");
    let none = keel.cli(&["tasks", "events", "task-43"]);
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("not found"));
    let db = std::fs::read(keel.db_path()).unwrap();
    let wal = std::fs::read(keel.db_path().with_extension("db-wal")).unwrap_or_default();
    let needle = PROVIDER_KEY.as_bytes();
    assert!(
        !db.windows(needle.len()).any(|w| w == needle),
        "provider key stored in the database"
    );
    assert!(
        !wal.windows(needle.len()).any(|w| w == needle),
        "provider key stored in the WAL"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_delivers_the_same_content_as_a_plain_call() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    let out = sdk("stream", &keel.base_url(), &[]).await;
    assert_eq!(out["ok"], true, "{out}");
    assert!(out["chunks"].as_u64().unwrap() >= 3, "{out}");
    assert_eq!(out["finish_reason"], "stop");
    let id = out["headers"]["x-request-id"].as_str().unwrap_or_default();
    assert!(id.starts_with("req_sim_"), "{out}");
    assert!(
        out["headers"]["x-ratelimit-remaining-requests"].is_string(),
        "{out}"
    );
    assert!(
        out["content"]
            .as_str()
            .unwrap()
            .contains("stream to me please"),
        "{out}"
    );
    assert_eq!(out["headers"]["x-keel-target"], "sim/primary");
    let calls = keel.events_of("llm_call");
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["outcome"], "ok");
    assert_eq!(calls[0]["stream"], true);
    assert_eq!(calls[0]["request_id"], id);
}

/// A stream whose only event is the opening role chunk, then `[DONE]` (an empty answer):
/// the held opening goes to the client with the stream's end, and the call is recorded.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_of_only_its_opening_chunk_ends_cleanly_and_is_recorded() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    sim.script(
        "primary",
        vec![Fault {
            only_opening: true,
            ..Fault::default()
        }],
    );
    let text = raw_stream(&keel, None, "say nothing").await;
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.len(), 2, "{text}");
    let opening: serde_json::Value = serde_json::from_str(data[0]).unwrap();
    assert_eq!(
        opening["choices"][0]["delta"]["role"], "assistant",
        "{text}"
    );
    assert_eq!(data[1], "[DONE]", "{text}");
    let calls = keel.events_of("llm_call");
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0]["outcome"], "ok", "{:?}", calls[0]);
    assert_eq!(sim.calls("primary"), 1);
    // keel is still serving.
    let text = raw_stream(&keel, None, "and now?").await;
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_ignores_stream_true_still_streams_to_the_client() {
    let (sim, keel, out) = stream_with(Fault {
        ignore_stream: true,
        ..Fault::default()
    })
    .await;
    // The whole JSON answer, sent on as the chunks of a stream: the SDK reads a stream.
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["finish_reason"], "stop", "{out}");
    assert!(
        out["content"]
            .as_str()
            .unwrap()
            .contains("stream to me please"),
        "{out}"
    );
    assert_eq!(out["headers"]["x-keel-attempts"], "1", "{out}");
    assert_eq!(sim.calls("primary"), 1);
    let calls = keel.events_of("llm_call");
    assert_eq!(calls[0]["outcome"], "ok");
    // Its usage was counted, as a stream's is.
    assert!(
        calls[0]["usage"]["total_tokens"].as_u64().unwrap() > 0,
        "{:?}",
        calls[0]
    );
    // Tool calls too, with the index a stream's deltas carry.
    sim.script(
        "primary",
        vec![Fault {
            ignore_stream: true,
            ..Fault::default()
        }],
    );
    let body = serde_json::json!({"model": "smart", "stream": true,
        "messages": [{"role": "user", "content": "weather in Paris?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]});
    let text = raw_chat(&keel, None, &body).await;
    let events: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let call = &events[0]["choices"][0]["delta"]["tool_calls"][0];
    assert_eq!(call["index"], 0, "{text}");
    assert_eq!(call["function"]["name"], "get_weather", "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    // No usage chunk: the client did not ask for one.
    assert!(
        events
            .iter()
            .all(|e| e.get("usage").is_none_or(serde_json::Value::is_null)),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tool_calls_and_response_format_pass_through() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    let out = sdk("tools", &keel.base_url(), &[]).await;
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["finish_reason"], "tool_calls");
    assert_eq!(out["tool_calls"][0]["name"], "get_weather");
    assert!(
        out["tool_calls"][0]["arguments"].get("city").is_some(),
        "{out}"
    );
    let upstream = sim.last_request("primary").unwrap();
    assert_eq!(upstream["tools"][0]["function"]["name"], "get_weather");
    assert_eq!(upstream["response_format"]["type"], "text");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_503_is_retried_and_the_second_attempt_answers() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    sim.script("primary", vec![Fault::status(503)]);
    let out = sdk("chat", &keel.base_url(), &[]).await;
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["headers"]["x-keel-attempts"], "2");
    assert_eq!(out["headers"]["x-keel-target"], "sim/primary");
    assert_eq!(sim.calls("primary"), 2);
    let failed = keel.events_of("llm_attempt_failed");
    assert_eq!(failed.len(), 1);
    assert_eq!(keel.events_of("retry_scheduled").len(), 1);
    // The answer carries the id of the attempt that answered, not of the one that failed.
    let id = out["headers"]["x-request-id"].as_str().unwrap_or_default();
    assert_eq!(keel.events_of("llm_call")[0]["request_id"], id, "{out}");
    let failed_id = failed[0]["request_id"].as_str().unwrap_or_default();
    assert!(failed_id.starts_with("req_sim_"), "{:?}", failed[0]);
    assert_ne!(failed_id, id);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_429_retry_after_is_honoured() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    sim.script("patient", vec![Fault::status(429).with_retry_after("1")]);
    let started = Instant::now();
    let out = sdk("chat", &keel.base_url(), &["--model", "patient"]).await;
    assert_eq!(out["ok"], true, "{out}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "retried before Retry-After"
    );
    assert_eq!(out["headers"]["x-keel-attempts"], "2");
    let retries = keel.events_of("retry_scheduled");
    assert_eq!(retries[0]["delay_ms"], 1000, "{retries:?}");
    // A rate limit that outlasts keel's retries reaches the SDK as the rate limit it is,
    // with the provider's wait, as it would calling the provider itself.
    sim.set_always("patient", Some(Fault::status(429).with_retry_after("1")));
    let out = sdk("chat", &keel.base_url(), &["--model", "patient"]).await;
    assert_eq!(out["exception"], "RateLimitError", "{out}");
    assert_eq!(out["status"], 429, "{out}");
    assert_eq!(out["headers"]["retry-after"], "1", "{out}");
    assert_eq!(out["headers"]["x-keel-attempts"], "2", "{out}");
    // keel retried it already: the SDK's own retries would only add calls.
    assert_eq!(out["headers"]["x-should-retry"], "false", "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_400_is_not_retried_and_reaches_the_sdk() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    sim.script("primary", vec![Fault::status(400)]);
    let out = sdk("chat", &keel.base_url(), &[]).await;
    assert_eq!(out["exception"], "BadRequestError", "{out}");
    // The provider's id of its error reaches the SDK (`e.request_id`) and the log.
    let id = out["request_id"].as_str().unwrap_or_default();
    assert!(id.starts_with("req_sim_"), "{out}");
    assert!(
        out["headers"]["x-ratelimit-remaining-requests"].is_string(),
        "{out}"
    );
    assert_eq!(keel.events_of("llm_attempt_failed")[0]["request_id"], id);
    assert_eq!(keel.events_of("llm_call")[0]["request_id"], id);
    assert_eq!(sim.calls("primary"), 1);
    assert_eq!(
        sim.calls("secondary"),
        0,
        "a fatal error must not fall back"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn primary_down_falls_back_to_the_second_target() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    sim.set_always("primary", Some(Fault::status(503)));
    let out = sdk("chat", &keel.base_url(), &[]).await;
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["headers"]["x-keel-target"], "sim/secondary");
    assert_eq!(out["headers"]["x-keel-fallback"], "true");
    assert_eq!(out["headers"]["x-keel-attempts"], "4");
    let fallbacks = keel.events_of("fallback_used");
    assert_eq!(fallbacks[0]["from"], "sim/primary");
    assert_eq!(fallbacks[0]["to"], "sim/secondary");
}

#[tokio::test(flavor = "multi_thread")]
async fn context_too_long_falls_back_without_retrying() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    sim.script(
        "primary",
        vec![Fault::status(400).with_error_code("context_length_exceeded")],
    );
    let out = sdk("chat", &keel.base_url(), &[]).await;
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["headers"]["x-keel-target"], "sim/secondary");
    assert_eq!(sim.calls("primary"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn breaker_opens_skips_the_primary_then_half_opens() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    sim.set_always("primary", Some(Fault::status(503)));
    // Call 1: three failed attempts; call 2: the fourth failure opens the breaker.
    for _ in 0..2 {
        let out = sdk("chat", &keel.base_url(), &[]).await;
        assert_eq!(out["headers"]["x-keel-target"], "sim/secondary", "{out}");
    }
    let opened = Instant::now();
    assert_eq!(sim.calls("primary"), 4);
    assert_eq!(keel.events_of("breaker_opened").len(), 1);
    // Call 2's failure opened the breaker: it went on to the secondary at once, with no
    // retry scheduled (and waited for) that the open breaker would refuse.
    assert_eq!(
        keel.events_of("retry_scheduled").len(),
        2,
        "{:?}",
        keel.events_of("retry_scheduled")
    );
    // While open (open_for = 6s), the primary is not called at all.
    for _ in 0..2 {
        let out = sdk("chat", &keel.base_url(), &[]).await;
        assert_eq!(out["headers"]["x-keel-target"], "sim/secondary", "{out}");
        assert_eq!(out["headers"]["x-keel-attempts"], "1", "{out}");
    }
    assert_eq!(
        sim.calls("primary"),
        4,
        "an open breaker must keep calls away from the primary"
    );
    assert!(
        opened.elapsed() < Duration::from_secs(6),
        "the calls while open took too long to prove anything"
    );
    // After open_for, one trial call goes through; the primary has healed.
    sim.set_always("primary", None);
    tokio::time::sleep(Duration::from_millis(6200).saturating_sub(opened.elapsed())).await;
    let out = sdk("chat", &keel.base_url(), &[]).await;
    assert_eq!(out["headers"]["x-keel-target"], "sim/primary", "{out}");
    assert_eq!(sim.calls("primary"), 5);
    assert_eq!(keel.events_of("breaker_half_opened").len(), 1);
    assert_eq!(keel.events_of("breaker_closed").len(), 1);
    let metrics = keel.metrics().await;
    assert!(
        metrics.contains("keel_breaker_state{target=\"sim/primary\"} 0"),
        "{metrics}"
    );
    for (to, n) in [("open", 1), ("half_open", 1), ("closed", 1)] {
        let line =
            format!("keel_breaker_transitions_total{{target=\"sim/primary\",to=\"{to}\"}} {n}");
        assert!(metrics.contains(&line), "no {line} in\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn all_targets_down_serves_the_degraded_reply() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    sim.set_always("fragile-a", Some(Fault::status(500)));
    sim.set_always("fragile-b", Some(Fault::drop_connection()));
    let out = sdk("chat", &keel.base_url(), &["--model", "fragile"]).await;
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(
        out["content"],
        "I'm busy right now; please try again shortly."
    );
    assert_eq!(out["headers"]["x-keel-degraded"], "true");
    assert_eq!(keel.events_of("degraded_reply").len(), 1);
    // Streamed, it ends with the usage chunk only when the client asked for one.
    for (asked, usage_chunks) in [(true, 1), (false, 0)] {
        let mut body = serde_json::json!({"model": "fragile", "stream": true,
            "messages": [{"role": "user", "content": "hi"}]});
        if asked {
            body["stream_options"] = serde_json::json!({"include_usage": true});
        }
        let text = raw_chat(&keel, None, &body).await;
        let usage = text
            .lines()
            .filter(|l| l.contains("\"choices\":[]") && l.contains("\"usage\""))
            .count();
        assert_eq!(usage, usage_chunks, "asked {asked}: {text}");
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    }
    // A streaming client gets the degraded reply as a stream.
    let out = sdk("stream", &keel.base_url(), &["--model", "fragile"]).await;
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(
        out["content"],
        "I'm busy right now; please try again shortly."
    );
    assert_eq!(out["headers"]["x-keel-degraded"], "true");
    // Without a degraded reply, the SDK gets a 503 it understands, and does not retry it
    // (with its default of two retries): keel has retried both targets already.
    sim.set_always("primary", Some(Fault::status(503)));
    sim.set_always("secondary", Some(Fault::status(503)));
    let out = sdk("chat", &keel.base_url(), &["--max-retries", "2"]).await;
    assert_eq!(out["exception"], "InternalServerError", "{out}");
    assert_eq!(out["status"], 503);
    assert_eq!(out["headers"]["x-should-retry"], "false", "{out}");
    assert_eq!(sim.calls("secondary"), 3, "one call's three attempts");
    // A second such call opens both circuits (each target's fourth failure, not retried
    // into the circuit it opened); the next call finds both open, calls neither, and says
    // when the first lets a trial call through (open_for = 6s).
    let out = sdk("chat", &keel.base_url(), &[]).await;
    assert_eq!(out["status"], 503, "{out}");
    let opened: Vec<String> = keel
        .events_of("breaker_opened")
        .iter()
        .map(|e| e["target"].as_str().unwrap_or_default().to_owned())
        .filter(|t| !t.starts_with("sim/fragile"))
        .collect();
    assert_eq!(opened, ["sim/primary", "sim/secondary"]);
    assert_eq!(sim.calls("secondary"), 4);
    let out = sdk("chat", &keel.base_url(), &[]).await;
    assert_eq!(out["status"], 503, "{out}");
    assert_eq!(out["headers"]["retry-after"], "6", "{out}");
    assert!(
        out["message"]
            .as_str()
            .unwrap()
            .contains("no target's circuit lets a call through now (sim/primary, sim/secondary)"),
        "{out}"
    );
    assert_eq!(sim.calls("primary"), 4);
    assert_eq!(sim.calls("secondary"), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_cut_midway_is_an_error_not_a_short_success() {
    let (sim, keel, out) = stream_with(Fault::cut_after(2)).await;
    assert_eq!(out["ok"], false, "the SDK must see an error: {out}");
    assert_eq!(out["exception"], "APIError", "{out}");
    assert!(out["chunks"].as_u64().unwrap() >= 1, "{out}");
    let calls = keel.events_of("llm_call");
    assert_eq!(calls[0]["outcome"], "stream_error");
    // Why, in the call's record: no attempt failed before the first byte to say it.
    let why = calls[0]["error"].as_str().unwrap_or_default();
    assert!(
        why.starts_with("upstream stream failed after it started"),
        "{:?}",
        calls[0]
    );
    assert_eq!(sim.calls("primary"), 1, "no retry after the first byte");
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_breaking_after_their_first_byte_count_against_their_target() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    let stream_errors = |metrics: &str, n: u32| {
        let line =
            format!("keel_attempts_total{{target=\"sim/primary\",outcome=\"stream_error\"}} {n}");
        assert!(metrics.contains(&line), "no {line} in\n{metrics}");
        assert!(
            metrics.contains("keel_attempts_total{target=\"sim/primary\",outcome=\"ok\"} 0"),
            "{metrics}"
        );
    };
    // A content filter stopping an answer mid-way says nothing about the target's health:
    // the breaker does not count it (had it counted these three as successes, the third
    // cut below would open it).
    sim.set_always(
        "primary",
        Some(Fault::error_event_after(1).with_error_code("content_filter")),
    );
    for _ in 0..3 {
        let out = sdk("stream", &keel.base_url(), &[]).await;
        assert_eq!(out["ok"], false, "{out}");
    }
    assert!(keel.events_of("breaker_opened").is_empty());
    stream_errors(&keel.metrics().await, 3);
    // Cut mid-way, they are failed attempts: with min_calls = 4 and failure_rate = 0.5, the
    // fourth opens the primary's breaker (each stream's error event comes after its call is
    // recorded, so the breaker and the log already know).
    sim.set_always("primary", Some(Fault::cut_after(2)));
    for _ in 0..4 {
        let out = sdk("stream", &keel.base_url(), &[]).await;
        assert_eq!(out["exception"], "APIError", "{out}");
        assert_eq!(out["headers"]["x-keel-target"], "sim/primary", "{out}");
    }
    assert_eq!(keel.events_of("breaker_opened").len(), 1);
    // The next stream goes to the secondary, whole; the primary is not asked.
    let out = sdk("stream", &keel.base_url(), &[]).await;
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["headers"]["x-keel-target"], "sim/secondary", "{out}");
    assert_eq!(out["headers"]["x-keel-fallback"], "true", "{out}");
    assert_eq!(sim.calls("primary"), 7);
    let metrics = keel.metrics().await;
    stream_errors(&metrics, 7);
    assert!(
        metrics.contains("keel_breaker_state{target=\"sim/primary\"} 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_broken_right_after_its_role_chunk_is_retried() {
    // The simulator, like OpenAI, opens a stream with a role-only chunk: cut after it,
    // nothing the client could use has been said yet.
    let (sim, keel, out) = stream_with(Fault::cut_after(0)).await;
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["headers"]["x-keel-attempts"], "2", "{out}");
    assert_eq!(out["finish_reason"], "stop", "{out}");
    assert!(!out["content"].as_str().unwrap_or("").is_empty(), "{out}");
    assert_eq!(sim.calls("primary"), 2, "retried on the same target");
    let failed = keel.events_of("llm_attempt_failed");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(keel.events_of("llm_call")[0]["outcome"], "ok");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_error_event_before_the_first_token_is_classified_like_an_error_answer() {
    // The role chunk, then `{"error": ...}` (how OpenAI reports an overload inside a
    // stream): a failure before the first token, retried on the same target.
    let (sim, keel, out) = stream_with(Fault::error_event_after(0)).await;
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["headers"]["x-keel-attempts"], "2", "{out}");
    assert_eq!(out["headers"]["x-keel-fallback"], "false", "{out}");
    assert_eq!(sim.calls("primary"), 2, "retried on the same target");
    // An error event saying the prompt is too long: no retry, the next target answers.
    let too_long = Fault {
        error_code: Some("context_length_exceeded".to_owned()),
        ..Fault::error_event_after(0)
    };
    sim.script("primary", vec![too_long]);
    let out = sdk("stream", &keel.base_url(), &[]).await;
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["headers"]["x-keel-fallback"], "true", "{out}");
    assert_eq!(sim.calls("primary"), 3, "not retried on the same target");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_error_event_mid_stream_reaches_the_client_once_as_the_upstream_said_it() {
    let (sim, keel, out) = stream_with(Fault::error_event_after(2)).await;
    assert_eq!(out["ok"], false, "the SDK must see an error: {out}");
    assert_eq!(out["exception"], "APIError", "{out}");
    assert!(
        out["message"]
            .as_str()
            .unwrap()
            .contains("keel-sim: the answer failed"),
        "the upstream's own words: {out}"
    );
    assert_eq!(sim.calls("primary"), 1, "no retry after the first byte");
    assert_eq!(keel.events_of("llm_call")[0]["outcome"], "stream_error");
    // On the wire: the content so far, then exactly one error event, and no `[DONE]`.
    sim.script("primary", vec![Fault::error_event_after(2)]);
    let body = raw_stream(&keel, None, "stream to me please").await;
    let errors = body
        .lines()
        .filter(|l| l.starts_with("data: {\"error\""))
        .count();
    assert_eq!(errors, 1, "{body}");
    assert!(!body.contains("[DONE]"), "{body}");
    assert!(!body.contains("stream_interrupted"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_that_finishes_and_closes_without_done_is_complete() {
    let no_done = Fault {
        no_done: true,
        ..Fault::default()
    };
    let (_sim, keel, out) = stream_with(no_done).await;
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["finish_reason"], "stop", "{out}");
    assert_eq!(out["headers"]["x-keel-attempts"], "1", "{out}");
    assert_eq!(keel.events_of("llm_call")[0]["outcome"], "ok");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_200_answer_that_is_an_error_object_is_retried() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    sim.script("primary", vec![Fault::error_event_after(0)]);
    let out = sdk("chat", &keel.base_url(), &[]).await;
    assert_eq!(out["ok"], true, "{out}");
    assert!(
        out["content"].as_str().unwrap().contains("hello keel"),
        "{out}"
    );
    assert_eq!(out["headers"]["x-keel-attempts"], "2", "{out}");
    // The sim's error object says `server_error`: a 500, as if sent with that status.
    let failed = keel.events_of("llm_attempt_failed");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["status"], 500, "{}", failed[0]);
    // Named by the answer that carried it, as an HTTP error would be.
    let id = failed[0]["request_id"].as_str().unwrap_or_default();
    assert!(id.starts_with("req_sim_"), "{}", failed[0]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_silent_after_its_role_chunk_is_retried_at_first_token() {
    // The role chunk at once, then silence past `first_token` (2s): no token has come, and
    // nothing the client could use has been sent, so the attempt has timed out like one
    // without any chunk, and is retried.
    let (sim, keel, out) = stream_with(Fault::stall_after(0, Duration::from_secs(30))).await;
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["headers"]["x-keel-attempts"], "2", "{out}");
    assert!(!out["content"].as_str().unwrap_or("").is_empty(), "{out}");
    assert_eq!(sim.calls("primary"), 2, "retried on the same target");
    let failed = keel.events_of("llm_attempt_failed");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["reason"], "first_token", "{failed:?}");
    // The silent stream's headers had come: its id is the one to give the provider.
    let silent = failed[0]["request_id"].as_str().unwrap_or_default();
    let answered = out["headers"]["x-request-id"].as_str().unwrap_or_default();
    assert!(silent.starts_with("req_sim_"), "{failed:?}");
    assert!(answered.starts_with("req_sim_"), "{out}");
    assert_ne!(silent, answered);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_stream_ends_as_a_failure_after_idle() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    sim.script(
        "primary",
        vec![Fault::stall_after(2, Duration::from_secs(30))],
    );
    let started = Instant::now();
    let out = sdk("stream", &keel.base_url(), &[]).await;
    assert_eq!(out["ok"], false, "{out}");
    assert!(out["message"].as_str().unwrap().contains("idle"), "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the stall was not cut by the idle timeout"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_failing_before_its_first_byte_is_retried() {
    let (sim, keel, out) = stream_with(Fault::drop_connection()).await;
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["headers"]["x-keel-attempts"], "2");
    // A first token slower than `first_token` (2s) is a failed attempt, retried.
    sim.script("primary", vec![Fault::delay(Duration::from_secs(10))]);
    let started = Instant::now();
    let out = sdk("stream", &keel.base_url(), &[]).await;
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["headers"]["x-keel-attempts"], "2");
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "waited for the slow first token"
    );
    let failed = keel.events_of("llm_attempt_failed");
    assert_eq!(
        failed.last().unwrap()["reason"],
        "first_token",
        "{failed:?}"
    );
    // No answer had come before either failure: nothing names them.
    assert!(
        failed.iter().all(|f| f.get("request_id").is_none()),
        "{failed:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_route_is_not_found_for_the_sdk() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    let out = sdk("chat", &keel.base_url(), &["--model", "gpt-nonexistent"]).await;
    assert_eq!(out["exception"], "NotFoundError", "{out}");
    assert!(
        out["message"].as_str().unwrap().contains("smart"),
        "the message lists the routes: {out}"
    );
}

/// One route to the simulator's `primary`, and agent `support` with a key and a budget.
pub(crate) const WITH_AGENT_KEYS: &str = r#"
[server]
listen = "127.0.0.1:0"
[store]
url = "sqlite://{dir}/keel.db"
[providers.sim]
kind = "openai"
base_url = "{sim}"
[routes.smart]
targets = [{ provider = "sim", model = "primary" }]
[agents.support]
keys_env = ["KEEL_KEY_SUPPORT"]
budget = { tokens_per_hour = 100000 }
"#;

#[tokio::test(flavor = "multi_thread")]
async fn agent_keys_are_required_when_configured() {
    let sim = sim().await;
    let keel = Keel::start(WITH_AGENT_KEYS, &sim).await;
    let out = sdk("chat", &keel.base_url(), &["--key", "sk-wrong"]).await;
    assert_eq!(out["exception"], "AuthenticationError", "{out}");
    assert_eq!(sim.calls("primary"), 0);
    let out = sdk("chat", &keel.base_url(), &["--key", "sk-agent-support"]).await;
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(keel.events_of("llm_call")[0]["agent"], "support");
    // The model list too: without a key, not even the route names.
    let out = sdk("models", &keel.base_url(), &["--key", "sk-wrong"]).await;
    assert_eq!(out["exception"], "AuthenticationError", "{out}");
    let out = sdk("models", &keel.base_url(), &["--key", "sk-agent-support"]).await;
    assert_eq!(out["models"], serde_json::json!(["smart"]), "{out}");
    let client = reqwest::Client::new();
    for path in ["/v1/models/smart", "/tasks/t1/v1/models/smart"] {
        let url = format!("{}{path}", keel.base_url().trim_end_matches("/v1"));
        let wrong = client
            .get(&url)
            .bearer_auth("sk-wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), reqwest::StatusCode::UNAUTHORIZED, "{path}");
        let right = client
            .get(&url)
            .bearer_auth("sk-agent-support")
            .send()
            .await
            .unwrap();
        assert_eq!(right.status(), reqwest::StatusCode::OK, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn embeddings_models_and_task_paths_work() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    let out = sdk("embed", &keel.base_url(), &[]).await;
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["count"], 2);
    let out = sdk("models", &keel.base_url(), &[]).await;
    assert_eq!(
        out["models"],
        serde_json::json!(["fragile", "hurried", "patient", "smart", "stubborn"])
    );
    assert_eq!(out["retrieved"], "fragile", "{out}");
    let missing = reqwest::get(format!("{}/models/no-such-route", keel.base_url()))
        .await
        .unwrap();
    assert_eq!(missing.status(), reqwest::StatusCode::NOT_FOUND);
    let body: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_found", "{body}");
    let task_url = format!("{}/tasks/task-7/v1", keel.url);
    let out = sdk("chat", &task_url, &[]).await;
    assert_eq!(out["ok"], true, "{out}");
    let events = keel.events();
    let last = events.iter().rev().find(|(k, _)| k == "llm_call").unwrap();
    assert_eq!(last.1["route"], "smart");
    let db = rusqlite::Connection::open(keel.db_path()).unwrap();
    let n: i64 = db
        .query_row(
            "SELECT count(*) FROM events WHERE task_id = 'task-7' AND kind = 'llm_call'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_readme_example_agent_runs() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/agent.py");
    let out = tokio::process::Command::new(crate::common::python())
        .args([script, "--base-url", &keel.base_url(), "--model", "smart"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("answered by sim/primary after 1 attempt(s)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("stream: sim reply to: Count from one to five."),
        "{stdout}"
    );
    assert_eq!(keel.events_of("llm_call").len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_over_its_token_budget_gets_a_rate_limit_error() {
    let sim = sim().await;
    let config = WITH_AGENT_KEYS.replace("tokens_per_hour = 100000", "tokens_per_hour = 5");
    let keel = Keel::start(&config, &sim).await;
    let out = sdk("chat", &keel.base_url(), &["--key", "sk-agent-support"]).await;
    assert_eq!(out["ok"], true, "{out}");
    let out = sdk("chat", &keel.base_url(), &["--key", "sk-agent-support"]).await;
    assert_eq!(out["exception"], "RateLimitError", "{out}");
    assert!(
        out["message"].as_str().unwrap().contains("tokens per hour"),
        "{out}"
    );
    let wait: u64 = out["headers"]["retry-after"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    // The SDK waits out a Retry-After of up to a minute; a longer one is not for it to retry.
    assert_eq!(
        out["headers"]["x-should-retry"].as_str(),
        (wait > 60).then_some("false"),
        "{out}"
    );
    assert_eq!(
        sim.calls("primary"),
        1,
        "a call over budget must not reach the provider"
    );
    assert_eq!(keel.events_of("budget_exceeded").len(), 1);
    // The gauges a dashboard or a "near exhaustion" rule divides.
    let metrics = keel.metrics().await;
    for line in [
        "keel_budget_limit{agent=\"support\",unit=\"tokens\"} 5",
        "keel_budget_remaining{agent=\"support\",unit=\"tokens\"} 0",
    ] {
        assert!(metrics.contains(line), "missing {line} in:\n{metrics}");
    }

    // The spend is saved every second: a keel killed (-9) and started again on the same
    // store in the same hour still refuses, with the same message.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let Keel { mut child, dir, .. } = keel;
    child.kill().await.unwrap();
    let keel = Keel::start_in(dir, &config, &sim).await;
    let out = sdk("chat", &keel.base_url(), &["--key", "sk-agent-support"]).await;
    assert_eq!(
        out["exception"], "RateLimitError",
        "a restart is not a new budget: {out}"
    );
    assert!(
        out["message"].as_str().unwrap().contains("tokens per hour"),
        "{out}"
    );
    assert_eq!(sim.calls("primary"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn each_key_of_an_agent_can_have_its_own_budget() {
    let sim = sim().await;
    let config = WITH_AGENT_KEYS.replace(
        "keys_env = [\"KEEL_KEY_SUPPORT\"]",
        "keys_env = [\"KEEL_KEY_SUPPORT\", \"KEEL_KEY_SUPPORT_2\"]\nkey_budget = { tokens_per_hour = 5 }",
    );
    assert_ne!(config, WITH_AGENT_KEYS);
    let keel = Keel::start(&config, &sim).await;
    let out = sdk("chat", &keel.base_url(), &["--key", "sk-agent-support"]).await;
    assert_eq!(out["ok"], true, "{out}");
    let out = sdk("chat", &keel.base_url(), &["--key", "sk-agent-support"]).await;
    assert_eq!(out["exception"], "RateLimitError", "{out}");
    let message = out["message"].as_str().unwrap();
    assert!(
        message.contains("key KEEL_KEY_SUPPORT of agent \"support\" has used"),
        "the message names the key by its variable, never the key: {message}"
    );
    assert!(!message.contains("sk-agent-support"), "{message}");
    // The agent's other key has its own budget.
    let out = sdk("chat", &keel.base_url(), &["--key", "sk-agent-support-2"]).await;
    assert_eq!(out["ok"], true, "{out}");
    let exceeded = keel.events_of("budget_exceeded");
    assert_eq!(exceeded[0]["key"], "KEEL_KEY_SUPPORT");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_spends_from_the_budget_even_when_the_client_did_not_ask_for_usage() {
    let sim = sim().await;
    let config = WITH_AGENT_KEYS.replace("tokens_per_hour = 100000", "tokens_per_hour = 5");
    let keel = Keel::start(&config, &sim).await;
    // The SDK's plain stream sets no stream_options; keel asks upstream for usage ...
    let out = sdk("stream", &keel.base_url(), &["--key", "sk-agent-support"]).await;
    assert_eq!(out["ok"], true, "{out}");
    let upstream = sim.last_request("primary").unwrap();
    assert_eq!(
        upstream["stream_options"]["include_usage"], true,
        "{upstream}"
    );
    let calls = keel.events_of("llm_call");
    assert!(
        calls[0]["usage"]["total_tokens"].as_u64().unwrap() > 0,
        "{}",
        calls[0]
    );
    // ... and the tokens count: the next call is over the budget.
    let out = sdk("chat", &keel.base_url(), &["--key", "sk-agent-support"]).await;
    assert_eq!(out["exception"], "RateLimitError", "{out}");

    // The usage-only chunk a client did not ask for is not forwarded.
    let keel = Keel::start(WITH_AGENT_KEYS, &sim).await;
    let body = raw_stream(&keel, Some("sk-agent-support"), "hi").await;
    assert!(body.contains("[DONE]"), "{body}");
    assert!(
        !body.contains("\"choices\":[]"),
        "a usage chunk reached the client: {body}"
    );
}

/// A stream that ends before its usage chunk (cut, or left by its client) was billed by the
/// provider all the same: keel charges the agent an estimate, says so in the `llm_call`, and
/// an agent cannot spend past its budget by breaking its streams off.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_that_ends_before_its_usage_is_charged_an_estimate() {
    let sim = sim().await;
    let config = WITH_AGENT_KEYS.replace("tokens_per_hour = 100000", "tokens_per_hour = 5");
    let keel = Keel::start(&config, &sim).await;
    sim.script("primary", vec![Fault::cut_after(2)]);
    let out = sdk("stream", &keel.base_url(), &["--key", "sk-agent-support"]).await;
    assert_eq!(out["exception"], "APIError", "{out}");
    let calls = keel.events_of("llm_call");
    assert_eq!(calls[0]["outcome"], "stream_error", "{}", calls[0]);
    assert_eq!(calls[0]["usage_estimated"], true, "{}", calls[0]);
    // "stream to me please": 19 characters, 5 tokens; 3 for its message and 3 for the reply.
    assert_eq!(calls[0]["usage"]["prompt_tokens"], 11, "{}", calls[0]);
    let completion = calls[0]["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(completion > 0, "{}", calls[0]);
    assert_eq!(
        calls[0]["usage"]["total_tokens"].as_u64(),
        Some(11 + completion)
    );
    let out = sdk("chat", &keel.base_url(), &["--key", "sk-agent-support"]).await;
    assert_eq!(out["exception"], "RateLimitError", "{out}");
    assert_eq!(sim.calls("primary"), 1);

    // A client that leaves mid-stream is charged for what it asked and what it was sent.
    let keel = Keel::start(WITH_AGENT_KEYS, &sim).await;
    sim.script(
        "primary",
        vec![Fault::stall_after(2, std::time::Duration::from_secs(30))],
    );
    let mut response = reqwest::Client::new()
        .post(format!("{}/chat/completions", keel.base_url()))
        .bearer_auth("sk-agent-support")
        .json(&serde_json::json!({"model": "smart", "stream": true,
            "messages": [{"role": "user", "content": "0123456789abcdef"}]}))
        .send()
        .await
        .unwrap();
    let mut read = String::new();
    while !read.contains("sim") {
        let chunk = response.chunk().await.unwrap().unwrap();
        read.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(response);
    let mut calls = Vec::new();
    for _ in 0..40 {
        calls = keel.events_of("llm_call");
        if !calls.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(calls.len(), 1, "the call was not recorded within 4s");
    assert_eq!(calls[0]["outcome"], "client_gone", "{}", calls[0]);
    assert_eq!(calls[0]["usage_estimated"], true, "{}", calls[0]);
    assert_eq!(calls[0]["usage"]["prompt_tokens"], 4 + 6, "{}", calls[0]);
    assert!(
        calls[0]["usage"]["completion_tokens"].as_u64().unwrap() > 0,
        "{read}: {}",
        calls[0]
    );
    // A stream that reports its usage is charged that, not an estimate.
    let out = sdk("stream", &keel.base_url(), &["--key", "sk-agent-support"]).await;
    assert_eq!(out["ok"], true, "{out}");
    let calls = keel.events_of("llm_call");
    assert!(calls[1].get("usage_estimated").is_none(), "{}", calls[1]);
    assert_eq!(calls[1]["outcome"], "ok", "{}", calls[1]);
    // A server that reports no usage at all: a whole answer, and a whole stream.
    let no_usage = || Fault {
        no_usage: true,
        ..Fault::default()
    };
    sim.script("primary", vec![no_usage(), no_usage()]);
    let body = serde_json::json!({"model": "smart",
        "messages": [{"role": "user", "content": "0123456789abcdef"}]});
    let answer: serde_json::Value =
        serde_json::from_str(&raw_chat(&keel, Some("sk-agent-support"), &body).await).unwrap();
    assert!(answer.get("usage").is_none(), "{answer}");
    let text = answer["choices"][0]["message"]["content"].as_str().unwrap();
    let out = sdk("stream", &keel.base_url(), &["--key", "sk-agent-support"]).await;
    assert_eq!(out["ok"], true, "{out}");
    let calls = keel.events_of("llm_call");
    for call in &calls[2..] {
        assert_eq!(call["outcome"], "ok", "{call}");
        assert_eq!(call["usage_estimated"], true, "{call}");
    }
    assert_eq!(calls[2]["usage"]["prompt_tokens"], 10, "{}", calls[2]);
    // The answer's text, a token per four ASCII characters.
    assert_eq!(
        calls[2]["usage"]["completion_tokens"].as_u64(),
        Some(u64::try_from(text.len().div_ceil(4)).unwrap()),
        "{text}: {}",
        calls[2]
    );
    assert_eq!(calls[3]["usage"]["prompt_tokens"], 11, "{}", calls[3]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prompt_too_long_for_every_target_is_the_client_s_error_not_an_outage() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    for model in ["fragile-a", "fragile-b"] {
        sim.set_always(
            model,
            Some(Fault::status(400).with_error_code("context_length_exceeded")),
        );
    }
    // The route has a degraded reply; it must not hide a request no target can serve.
    let out = sdk("chat", &keel.base_url(), &["--model", "fragile"]).await;
    assert_eq!(out["exception"], "BadRequestError", "{out}");
    assert_eq!(sim.calls("fragile-a"), 1);
    assert_eq!(sim.calls("fragile-b"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_refusing_keel_s_key_is_a_502_not_the_agent_s_401() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    sim.script(
        "patient",
        vec![Fault::status(401).with_error_code("invalid_api_key")],
    );
    let out = sdk("chat", &keel.base_url(), &["--model", "patient"]).await;
    assert_eq!(out["status"], 502, "{out}");
    assert!(
        out["message"]
            .as_str()
            .unwrap()
            .contains("refused keel's credentials"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spent_quota_falls_back_at_once_and_alone_is_a_502_or_the_degraded_reply() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    let spent = || Fault::error_code("insufficient_quota");
    // OpenAI's 429 insufficient_quota: no retry brings it back, the next target answers.
    sim.script("primary", vec![spent()]);
    let out = sdk("chat", &keel.base_url(), &[]).await;
    assert_eq!(out["headers"]["x-keel-target"], "sim/secondary", "{out}");
    assert_eq!(sim.calls("primary"), 1, "not retried");
    let failed = keel.events_of("llm_attempt_failed");
    assert_eq!(failed[0]["reason"], "account_refused", "{failed:?}");
    // Every target refusing keel's account: the 502 that says so; a chain where another
    // target was down is an outage like any other, a 503.
    sim.script("primary", vec![spent()]);
    sim.script("secondary", vec![spent()]);
    let out = sdk("chat", &keel.base_url(), &[]).await;
    assert_eq!(out["status"], 502, "{out}");
    sim.script("primary", vec![Fault::status(500); 3]);
    sim.script("secondary", vec![spent()]);
    let out = sdk("chat", &keel.base_url(), &[]).await;
    assert_eq!(out["status"], 503, "{out}");
    // The only target: a 502 that says whose account it is, not the provider's words.
    sim.script("patient", vec![spent()]);
    let out = sdk("chat", &keel.base_url(), &["--model", "patient"]).await;
    assert_eq!(out["status"], 502, "{out}");
    let message = out["message"].as_str().unwrap();
    assert!(message.contains("refused keel's account"), "{out}");
    assert_eq!(sim.calls("patient"), 1, "not retried");
    // Every target of a route with a degraded reply: an outage of keel's, so the reply.
    sim.script("fragile-a", vec![spent()]);
    sim.script("fragile-b", vec![spent()]);
    let out = sdk("chat", &keel.base_url(), &["--model", "fragile"]).await;
    assert_eq!(out["headers"]["x-keel-degraded"], "true", "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_wait_longer_than_the_time_left_moves_on_to_the_next_target() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    // Retry-After 5s does not fit the route's 3s total: the next target answers at once.
    sim.script("hurried-a", vec![Fault::status(503).with_retry_after("5")]);
    let started = Instant::now();
    let out = sdk("chat", &keel.base_url(), &["--model", "hurried"]).await;
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["headers"]["x-keel-target"], "sim/hurried-b", "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "keel waited for a retry that could not fit"
    );
    // Retry-After 5s is over route smart's 100ms cap: asking the primary again before then
    // would be refused, so the next target answers at once.
    sim.script("primary", vec![Fault::status(429).with_retry_after("5")]);
    let out = sdk("chat", &keel.base_url(), &[]).await;
    assert_eq!(out["headers"]["x-keel-target"], "sim/secondary", "{out}");
    assert_eq!(out["headers"]["x-keel-attempts"], "2", "{out}");
    assert_eq!(sim.calls("primary"), 1);
    let skipped = keel.events_of("retry_scheduled");
    assert_eq!(
        skipped[0]["skipped"], "Retry-After of 5s is over the retry cap of 100ms",
        "{skipped:?}"
    );
}

/// A route whose primary's breaker opens after two failures and then takes two trial calls.
const TRIALS: &str = r#"
[providers.sim]
kind = "openai"
base_url = "{sim}"

[routes.smart]
targets = [
  { provider = "sim", model = "primary" },
  { provider = "sim", model = "secondary" },
]
retry = { max_attempts = 1 }
breaker = { window = "count", window_size = 2, min_calls = 2, failure_rate = 0.5, open_for = "1s", half_open_calls = 2 }
"#;

#[tokio::test(flavor = "multi_thread")]
async fn breaker_transitions_are_logged_in_the_order_they_happened() {
    let sim = sim().await;
    let keel = Keel::start(TRIALS, &sim).await;
    let call = |keel_url: String| async move {
        let body =
            serde_json::json!({"model": "smart", "messages": [{"role": "user", "content": "hi"}]});
        reqwest::Client::new()
            .post(format!("{keel_url}/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap()
            .status()
    };
    sim.script("primary", vec![Fault::status(503), Fault::status(503)]);
    for _ in 0..2 {
        assert!(call(keel.url.clone()).await.is_success());
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Call X takes the first trial slot (open -> half_open), fails on the primary and then
    // waits 3s on the secondary. Call Y takes the second slot, fails, and so reopens the
    // breaker (half_open -> open), then finishes at once: Y ends long before X.
    sim.script("primary", vec![Fault::status(503), Fault::status(503)]);
    sim.script("secondary", vec![Fault::delay(Duration::from_secs(3))]);
    let x = tokio::spawn(call(keel.url.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(call(keel.url.clone()).await.is_success());
    assert!(x.await.unwrap().is_success());
    let transitions: Vec<String> = keel
        .events()
        .into_iter()
        .filter(|(kind, _)| kind.starts_with("breaker_"))
        .map(|(_, data)| {
            format!(
                "{}->{}",
                data["from"].as_str().unwrap(),
                data["to"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        transitions,
        ["closed->open", "open->half_open", "half_open->open"],
        "the log's order is the breaker's"
    );
}

/// The primary eats most of the call's time; the secondary gets what is left of it.
const EATEN: &str = r#"
[providers.sim]
kind = "openai"
base_url = "{sim}"

[routes.smart]
targets = [
  { provider = "sim", model = "primary" },
  { provider = "sim", model = "secondary" },
]
retry = { max_attempts = 1 }
timeouts = { connect = "200ms", first_token = "400ms", idle = "400ms", attempt = "400ms", total = "600ms" }
breaker = { window = "count", window_size = 2, min_calls = 2, failure_rate = 0.5, open_for = "30s", half_open_calls = 1 }

[routes.alone]
targets = [{ provider = "sim", model = "alone" }]
retry = { max_attempts = 1 }
timeouts = { connect = "200ms", first_token = "300ms", idle = "300ms", attempt = "300ms", total = "300ms" }
breaker = { window = "count", window_size = 2, min_calls = 2, failure_rate = 0.5, open_for = "30s", half_open_calls = 1 }
"#;

#[tokio::test(flavor = "multi_thread")]
async fn keel_s_own_deadline_is_not_held_against_the_target_it_cut() {
    let sim = sim().await;
    let keel = Keel::start(EATEN, &sim).await;
    sim.set_always("primary", Some(Fault::delay(Duration::from_secs(2))));
    sim.set_always("secondary", Some(Fault::delay(Duration::from_secs(2))));
    // Each call: the primary times out at its attempt's 400ms (its failure), the secondary
    // at the call's total, 200ms later: keel's deadline, not the secondary's failure.
    for _ in 0..2 {
        let out = sdk("chat", &keel.base_url(), &[]).await;
        assert_eq!(out["ok"], false, "{out}");
        assert_eq!(out["status"], 504, "{out}");
    }
    let opened: Vec<String> = keel
        .events_of("breaker_opened")
        .iter()
        .map(|e| e["target"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(opened, ["sim/primary"], "only the primary failed");
    let failed = keel.events_of("llm_attempt_failed");
    assert!(
        failed
            .iter()
            .any(|f| f["target"] == "sim/secondary" && f["reason"] == "total"),
        "{failed:?}"
    );
    // The secondary's breaker is closed: the next call reaches it, now with the whole time.
    sim.set_always("secondary", None);
    let out = sdk("chat", &keel.base_url(), &[]).await;
    assert_eq!(out["headers"]["x-keel-target"], "sim/secondary", "{out}");
    assert_eq!(sim.calls("primary"), 2);
    // A target that had the call's whole time (its attempt's as long as the total) and
    // hung through it did fail: its breaker opens, and the third call does not reach it.
    sim.set_always("alone", Some(Fault::delay(Duration::from_secs(2))));
    for _ in 0..3 {
        let out = sdk("chat", &keel.base_url(), &["--model", "alone"]).await;
        assert_eq!(out["ok"], false, "{out}");
    }
    assert!(
        keel.events_of("breaker_opened")
            .iter()
            .any(|e| e["target"] == "sim/alone"),
        "{:?}",
        keel.events_of("breaker_opened")
    );
    assert_eq!(sim.calls("alone"), 2);
}
