//! `[chaos]` and `x-keel-chaos`: injected faults reach keel's own policies (retry,
//! Retry-After, deadlines, fallback) exactly as real ones do, never reach the upstream
//! when they stand in for it, and are recorded apart from real failures.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{Keel, TWO_TARGETS, sim};

/// Routes for chaos tests. `single` has no retries and a rule failing every attempt;
/// `failover`'s first target is in a full outage from the start.
const CHAOS: &str = r#"

[providers.sim]
kind = "openai"
base_url = "{sim}"
api_key_env = "KEEL_TEST_PROVIDER_KEY"

[routes.smart]
targets = [
  { provider = "sim", model = "primary" },
  { provider = "sim", model = "secondary" },
]
retry = { max_attempts = 3, base = "10ms", cap = "3s", jitter = "full" }
timeouts = { connect = "1s", first_token = "1s", idle = "1s", attempt = "1s", total = "20s" }

[routes.single]
targets = [{ provider = "sim", model = "single" }]
retry = { max_attempts = 1 }

[routes.failover]
targets = [
  { provider = "sim", model = "down" },
  { provider = "sim", model = "backup" },
]
retry = { max_attempts = 2, base = "10ms", cap = "50ms" }

# So that injected failures never open a breaker mid-test.
[breaker]
min_calls = 1000

[chaos]
enabled = true
seed = 42

[[chaos.faults]]
match = { route = "single" }
rate = 1.0
kind = "status"
status = 500

[[chaos.outages]]
target = "sim/down"
start = "0s"
duration = "1h"
"#;

/// The same routes with `[chaos]` present but off.
fn chaos_off() -> String {
    CHAOS.replace("enabled = true", "enabled = false")
}

struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: String,
    took: Duration,
}

impl Answer {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// Sends a chat completion for `task` on `route`, with `x-keel-chaos: chaos` when given.
async fn call(keel: &Keel, route: &str, task: &str, chaos: Option<&str>, stream: bool) -> Answer {
    let mut request = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", keel.url))
        .header("x-keel-task", task)
        .json(&json!({
            "model": route,
            "stream": stream,
            "messages": [{"role": "user", "content": "hello chaos"}],
        }));
    if let Some(chaos) = chaos {
        request = request.header("x-keel-chaos", chaos);
    }
    let started = Instant::now();
    let response = request.send().await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.text().await.unwrap();
    Answer {
        status,
        headers,
        body,
        took: started.elapsed(),
    }
}

/// Events of one task: `(kind, data)` in order.
fn task_events(keel: &Keel, task: &str) -> Vec<(String, Value)> {
    let conn = rusqlite::Connection::open_with_flags(
        keel.db_path(),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut stmt = conn
        .prepare("SELECT kind, data FROM events WHERE task_id = ?1 ORDER BY seq")
        .unwrap();
    stmt.query_map([task], |row| {
        let kind: String = row.get(0)?;
        let data: String = row.get(1)?;
        Ok((kind, serde_json::from_str(&data).unwrap()))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

fn of_kind(events: &[(String, Value)], kind: &str) -> Vec<Value> {
    events
        .iter()
        .filter(|(k, _)| k == kind)
        .map(|(_, d)| d.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn with_chaos_off_the_header_is_ignored() {
    let sim = sim().await;
    for config in [TWO_TARGETS.to_owned(), chaos_off()] {
        let keel = Keel::start(&config, &sim).await;
        let before = sim.calls("primary");
        // Even a value that would be a 400 with chaos on is ignored.
        for (task, value) in [("off-1", "status=503"), ("off-2", "explode")] {
            let answer = call(&keel, "smart", task, Some(value), false).await;
            assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
            assert_eq!(answer.header("x-keel-attempts"), "1");
            let events = task_events(&keel, task);
            assert!(of_kind(&events, "llm_attempt_failed").is_empty());
            assert!(of_kind(&events, "llm_call")[0].get("chaos").is_none());
        }
        assert_eq!(sim.calls("primary"), before + 2);
        assert!(!keel.metrics().await.contains("keel_chaos_injected_total{"));
    }
    // `single` has a rate = 1.0 rule, which does nothing while chaos is off.
    let keel = Keel::start(&chaos_off(), &sim).await;
    let answer = call(&keel, "single", "off-3", None, false).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(sim.calls("single"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_injected_503_on_the_first_attempt_is_retried_without_reaching_the_upstream() {
    let sim = sim().await;
    let keel = Keel::start(CHAOS, &sim).await;
    let answer = call(
        &keel,
        "smart",
        "h-503",
        Some("status=503;attempts=1"),
        false,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.header("x-keel-attempts"), "2");
    assert_eq!(answer.header("x-keel-fallback"), "false");
    assert_eq!(answer.header("x-keel-target"), "sim/primary");
    assert_eq!(
        sim.calls("primary"),
        1,
        "the injected attempt reached the sim"
    );
    let events = task_events(&keel, "h-503");
    let failed = of_kind(&events, "llm_attempt_failed");
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["injected"], "status");
    assert_eq!(failed[0]["status"], 503);
    assert_eq!(failed[0]["class"], "retryable");
    assert_eq!(of_kind(&events, "retry_scheduled").len(), 1);
    let llm_call = &of_kind(&events, "llm_call")[0];
    assert_eq!(
        llm_call["chaos"],
        json!([{"attempt": 1, "target": "sim/primary", "fault": "status", "source": "header"}])
    );
    let text = keel.metrics().await;
    assert!(
        text.contains("keel_chaos_injected_total{target=\"sim/primary\",fault=\"status\"} 1"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_chaos_header_is_a_400_that_names_it() {
    let sim = sim().await;
    let keel = Keel::start(CHAOS, &sim).await;
    for value in [
        "explode",
        "status=200",
        "drop;retry_after=1s",
        "status=503;attempts=0",
    ] {
        let answer = call(&keel, "smart", "bad", Some(value), false).await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{value}: {}",
            answer.body
        );
        let error = &answer.json()["error"];
        assert_eq!(error["param"], "x-keel-chaos", "{error}");
        assert_eq!(error["type"], "invalid_request_error");
        assert!(
            error["message"].as_str().unwrap().contains("x-keel-chaos"),
            "{error}"
        );
    }
    assert_eq!(sim.calls("primary"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_outage_of_the_primary_target_falls_back() {
    let sim = sim().await;
    let keel = Keel::start(CHAOS, &sim).await;
    let answer = call(&keel, "failover", "outage", None, false).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.header("x-keel-fallback"), "true");
    assert_eq!(answer.header("x-keel-target"), "sim/backup");
    assert_eq!(answer.header("x-keel-attempts"), "3");
    assert_eq!(
        sim.calls("down"),
        0,
        "a target in an outage is never called"
    );
    assert_eq!(sim.calls("backup"), 1);
    let events = task_events(&keel, "outage");
    let failed = of_kind(&events, "llm_attempt_failed");
    assert_eq!(failed.len(), 2);
    for f in &failed {
        assert_eq!(f["injected"], "drop");
        assert_eq!(f["reason"], "connect");
    }
    assert_eq!(of_kind(&events, "fallback_used")[0]["to"], "sim/backup");
    let chaos = &of_kind(&events, "llm_call")[0]["chaos"];
    assert_eq!(chaos[0]["source"], "outage");
    assert_eq!(chaos.as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rate_one_500_without_retries_is_a_5xx_and_recorded_as_injected() {
    let sim = sim().await;
    let keel = Keel::start(CHAOS, &sim).await;
    let answer = call(&keel, "single", "rate-1", None, false).await;
    assert!(answer.status.is_server_error(), "{}", answer.status);
    assert_eq!(answer.json()["error"]["type"], "api_error");
    assert_eq!(sim.calls("single"), 0);
    let events = task_events(&keel, "rate-1");
    let failed = of_kind(&events, "llm_attempt_failed");
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["injected"], "status");
    assert_eq!(failed[0]["status"], 500);
    let llm_call = &of_kind(&events, "llm_call")[0];
    assert_eq!(llm_call["outcome"], "unavailable");
    assert_eq!(llm_call["chaos"][0]["source"], "rule");
    // A real failure on the same route is not marked injected.
    let real = call(&keel, "smart", "real", None, false).await;
    assert_eq!(real.status, StatusCode::OK);
    sim.script("primary", vec![keel_sim::Fault::status(503)]);
    let real = call(&keel, "smart", "real-503", None, false).await;
    assert_eq!(real.header("x-keel-attempts"), "2");
    let failed = of_kind(&task_events(&keel, "real-503"), "llm_attempt_failed");
    assert_eq!(failed.len(), 1);
    assert!(failed[0].get("injected").is_none(), "{}", failed[0]);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_header_fault_meets_the_policy_a_real_one_would() {
    let sim = sim().await;
    let keel = Keel::start(CHAOS, &sim).await;

    // Retry-After is honoured: the retry waits about a second.
    let answer = call(
        &keel,
        "smart",
        "h-429",
        Some("status=429;retry_after=1s;attempts=1"),
        false,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.header("x-keel-attempts"), "2");
    assert!(
        answer.took >= Duration::from_millis(900),
        "{:?}",
        answer.took
    );
    let retry = &of_kind(&task_events(&keel, "h-429"), "retry_scheduled")[0];
    assert_eq!(retry["delay_ms"], 1000);

    // A hang lasts until the attempt deadline (1s), then the retry answers.
    let answer = call(&keel, "smart", "h-hang", Some("hang;attempts=1"), false).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.header("x-keel-attempts"), "2");
    assert!(
        answer.took >= Duration::from_millis(900),
        "{:?}",
        answer.took
    );
    let failed = &of_kind(&task_events(&keel, "h-hang"), "llm_attempt_failed")[0];
    assert_eq!(
        (&failed["reason"], &failed["injected"]),
        (&json!("attempt"), &json!("hang"))
    );

    // A malformed 200 is retried like a real one.
    let answer = call(
        &keel,
        "smart",
        "h-malformed",
        Some("malformed;attempts=1"),
        false,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.header("x-keel-attempts"), "2");
    let failed = &of_kind(&task_events(&keel, "h-malformed"), "llm_attempt_failed")[0];
    assert_eq!(
        (&failed["reason"], &failed["injected"]),
        (&json!("malformed"), &json!("malformed"))
    );

    // A drop on every attempt of the primary falls back to the secondary.
    let primary_before = sim.calls("primary");
    let answer = call(&keel, "smart", "h-drop", Some("drop;attempts=3"), false).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.header("x-keel-fallback"), "true");
    assert_eq!(answer.header("x-keel-attempts"), "4");
    assert_eq!(sim.calls("primary"), primary_before);

    // Latency delays the real call and fails nothing.
    let answer = call(&keel, "smart", "h-latency", Some("latency=300ms"), false).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.header("x-keel-attempts"), "1");
    assert!(
        answer.took >= Duration::from_millis(300),
        "{:?}",
        answer.took
    );
    let events = task_events(&keel, "h-latency");
    assert!(of_kind(&events, "llm_attempt_failed").is_empty());
    assert_eq!(
        of_kind(&events, "llm_call")[0]["chaos"][0]["fault"],
        "latency"
    );

    // A stream cut before its first chunk is retried; after it, the stream ends in an error.
    let answer = call(
        &keel,
        "smart",
        "h-cut0",
        Some("stream_cut=0;attempts=1"),
        true,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.header("x-keel-attempts"), "2");
    assert!(answer.body.ends_with("data: [DONE]\n\n"), "{}", answer.body);
    let failed = &of_kind(&task_events(&keel, "h-cut0"), "llm_attempt_failed")[0];
    assert_eq!(
        (&failed["reason"], &failed["injected"]),
        (&json!("stream_cut"), &json!("stream_cut"))
    );
    let primary_before = sim.calls("primary");
    let answer = call(&keel, "smart", "h-cut2", Some("stream_cut=2"), true).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(
        answer.body.contains("stream_interrupted"),
        "{}",
        answer.body
    );
    assert!(!answer.body.contains("[DONE]"), "{}", answer.body);
    assert_eq!(answer.body.matches("data: ").count(), 3, "{}", answer.body);
    assert_eq!(
        sim.calls("primary"),
        primary_before + 1,
        "a stream cut calls the upstream"
    );
    let llm_call = &of_kind(&task_events(&keel, "h-cut2"), "llm_call")[0];
    assert_eq!(llm_call["outcome"], "stream_error");
    assert_eq!(llm_call["chaos"][0]["fault"], "stream_cut");
}
