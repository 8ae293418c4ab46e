//! The gateway at the edges of its rules: an absurd `Retry-After`, the total deadline on
//! the last target, a fatal answer from a fallback target (the same model in a later place
//! too), a refusal from one target of
//! an outage, a client that leaves a silent stream, an upstream error page that is not
//! JSON, a provider that routes reach with different connect timeouts, a stop while a stream
//! is in flight.

use std::time::Duration;

use keel_sim::{Fault, SimHandle};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;

use crate::common::{Keel, TWO_TARGETS, sim};
use crate::sdk::WITH_AGENT_KEYS;

async fn chat(keel: &Keel, route: &str) -> (StatusCode, HeaderMap, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", keel.url))
        .json(&serde_json::json!({"model": route, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    (status, headers, body)
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> &'h str {
    headers.get(name).map_or("(none)", |v| v.to_str().unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_after_too_large_for_a_duration_waits_the_cap_and_retries() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    // `patient`: 2 attempts, Retry-After honoured up to a cap of 3s.
    sim.script(
        "patient",
        vec![Fault::status(429).with_retry_after("99999999999999999999")],
    );
    let started = std::time::Instant::now();
    let (status, headers, body) = chat(&keel, "patient").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(header(&headers, "x-keel-attempts"), "2");
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "did not wait the cap"
    );
    // keel still serves.
    assert_eq!(chat(&keel, "patient").await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_total_deadline_running_out_during_the_last_targets_attempt_is_a_504() {
    let sim = sim().await;
    // One target whose single attempt may last as long as the whole call: the total
    // deadline ends that attempt, after which no target is left to try.
    let config = r#"
[providers.sim]
kind = "openai"
base_url = "{sim}"

[routes.tight]
targets = [{ provider = "sim", model = "slow" }]
retry = { max_attempts = 2, base = "10ms", cap = "10ms" }
timeouts = { connect = "500ms", first_token = "1s", attempt = "1s", total = "1s" }
"#;
    let keel = Keel::start(config, &sim).await;
    sim.set_always("slow", Some(Fault::delay(Duration::from_secs(3))));
    let (status, headers, body) = chat(&keel, "tight").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(body["error"]["code"], "timeout", "{body}");
    assert_eq!(header(&headers, "x-keel-attempts"), "1");
    let calls = keel.events_of("llm_call");
    assert_eq!(calls.last().unwrap()["outcome"], "timeout", "{calls:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fatal_answer_from_the_second_target_is_marked_as_a_fallback() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    sim.set_always("primary", Some(Fault::status(503)));
    sim.script("secondary", vec![Fault::status(400)]);
    let (status, headers, body) = chat(&keel, "smart").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(header(&headers, "x-keel-target"), "sim/secondary");
    assert_eq!(header(&headers, "x-keel-fallback"), "true");
    assert_eq!(header(&headers, "x-keel-attempts"), "4");
    let calls = keel.events_of("llm_call");
    assert_eq!(calls.last().unwrap()["fallback"], true, "{calls:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fatal_answer_from_a_later_place_in_the_chain_is_a_fallback_even_for_the_same_model() {
    let sim = sim().await;
    // The same target twice: the second place is a fallback although its id is the first's.
    let config = format!(
        "{TWO_TARGETS}\n[routes.twice]\ntargets = [{{ provider = \"sim\", model = \"again\" }}, \
         {{ provider = \"sim\", model = \"again\" }}]\nretry = {{ max_attempts = 1 }}\n"
    );
    let keel = Keel::start(&config, &sim).await;
    sim.script("again", vec![Fault::status(503), Fault::status(400)]);
    let (status, headers, body) = chat(&keel, "twice").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(header(&headers, "x-keel-attempts"), "2");
    assert_eq!(header(&headers, "x-keel-fallback"), "true");
    let calls = keel.events_of("llm_call");
    assert_eq!(calls.last().unwrap()["fallback"], true, "{calls:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refusal_from_one_target_while_the_other_is_down_is_an_outage_not_the_clients_error() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    sim.set_always("primary", Some(Fault::status(503)));
    sim.set_always(
        "secondary",
        Some(Fault::error_code("context_length_exceeded")),
    );
    let (status, headers, body) = chat(&keel, "smart").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "upstream_unavailable", "{body}");
    assert_eq!(header(&headers, "x-keel-attempts"), "4");
    // When every target refuses, the refusal is the client's to fix and passes through.
    sim.set_always(
        "primary",
        Some(Fault::error_code("context_length_exceeded")),
    );
    let (status, headers, body) = chat(&keel, "smart").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "context_length_exceeded", "{body}");
    assert_eq!(header(&headers, "x-keel-fallback"), "true");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_leaving_a_silent_stream_cancels_it_at_once_and_is_not_a_stream_error() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    // `patient` has the default idle timeout (15s): the stream goes silent after one chunk.
    sim.script(
        "patient",
        vec![Fault::stall_after(1, Duration::from_secs(30))],
    );
    let mut response = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", keel.url))
        .json(&serde_json::json!({"model": "patient", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let first = response.chunk().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "), "{first:?}");
    drop(response);
    let mut recorded = Vec::new();
    for _ in 0..40 {
        recorded = keel.events_of("llm_call");
        if !recorded.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        recorded.len(),
        1,
        "the call was not ended within 4s of the client leaving"
    );
    assert_eq!(recorded[0]["outcome"], "client_gone", "{recorded:?}");
    // Counted right after the record is written.
    let counted =
        "keel_requests_total{route=\"patient\",target=\"sim/patient\",outcome=\"client_gone\"} 1";
    let mut metrics = String::new();
    for _ in 0..20 {
        metrics = keel.metrics().await;
        if metrics.contains(counted) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(metrics.contains(counted), "{metrics}");
    // Its time is in the route's duration histogram like any call's.
    assert!(
        metrics.contains("keel_request_duration_seconds_count{route=\"patient\"} 1"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("keel_stream_errors_total{route=\"patient\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_error_page_that_is_not_json_reaches_the_client_in_the_openai_shape() {
    // A proxy in front of a provider answering every request with an HTML page.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let _ = conn.read(&mut buf).await;
                let page = "<!DOCTYPE html><html><body>Unsupported method</body></html>";
                let answer = format!(
                    "HTTP/1.1 501 Not Implemented\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{page}",
                    page.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
            });
        }
    });
    let sim = sim().await;
    let config = format!(
        r#"
[providers.edge]
kind = "openai"
base_url = "{upstream}"

[routes.edge]
targets = [{{ provider = "edge", model = "m" }}]
"#
    );
    let keel = Keel::start(&config, &sim).await;
    let (status, headers, body) = chat(&keel, "edge").await;
    assert_eq!(status, StatusCode::NOT_IMPLEMENTED, "{body}");
    assert_eq!(header(&headers, "content-type"), "application/json");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("not JSON"), "{body}");
    assert!(message.contains("Unsupported method"), "{body}");
    assert_eq!(header(&headers, "x-keel-target"), "edge/m");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_whose_first_event_is_not_json_is_retried_before_the_client_sees_it() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    sim.script("primary", vec![Fault::malformed()]);
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", keel.url))
        .json(&serde_json::json!({"model": "smart", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(r.headers(), "x-keel-attempts"), "2");
    let answered = header(r.headers(), "x-request-id").to_owned();
    let text = r.text().await.unwrap();
    // Every event the client got is JSON, and the stream ends properly.
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    for event in &events[..events.len() - 1] {
        assert!(
            serde_json::from_str::<serde_json::Value>(event).is_ok(),
            "{text}"
        );
    }
    // The failed attempt names the provider's id of the stream it got, for its support.
    assert_failed_attempt_named(&keel, &answered);
}

/// The call's one failed attempt was a malformed answer, recorded with the provider's id
/// of that answer, which is not the id of the `answered` one.
fn assert_failed_attempt_named(keel: &Keel, answered: &str) {
    let failed = keel.events_of("llm_attempt_failed");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["reason"], "malformed");
    let failed_id = failed[0]["request_id"].as_str().unwrap_or_default();
    assert!(failed_id.starts_with("req_sim_"), "{:?}", failed[0]);
    assert!(answered.starts_with("req_sim_"), "{answered}");
    assert_ne!(failed_id, answered);
    assert_eq!(keel.events_of("llm_call")[0]["request_id"], answered);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_answer_is_retried_and_its_failure_names_the_provider_s_id() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    sim.script("primary", vec![Fault::malformed()]);
    let (status, headers, body) = chat(&keel, "smart").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(header(&headers, "x-keel-attempts"), "2");
    assert_eq!(header(&headers, "x-keel-target"), "sim/primary");
    assert_failed_attempt_named(&keel, header(&headers, "x-request-id"));
}

/// `keel_budget_remaining{agent,unit}` as `keel.metrics()` shows it, if it is there.
async fn budget_left(keel: &Keel, agent: &str, unit: &str) -> Option<f64> {
    let text = keel.metrics().await;
    let prefix = format!("keel_budget_remaining{{agent=\"{agent}\",unit=\"{unit}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_budget_gauge_shows_the_budget_from_the_start_and_follows_calls_without_usage() {
    // Three requests a minute, counted in the clock minute: keep clear of its end.
    let second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        % 60;
    if second >= 35 {
        tokio::time::sleep(Duration::from_secs(61 - second)).await;
    }
    let sim = sim().await;
    let config = r#"
[providers.sim]
kind = "openai"
base_url = "{sim}"

[routes.down]
targets = [{ provider = "sim", model = "down" }]
retry = { max_attempts = 1 }
degraded_reply = "later"

[agents.counted]
budget = { requests_per_minute = 3 }
"#;
    let keel = Keel::start(config, &sim).await;
    sim.set_always("down", Some(Fault::status(503)));
    let mut left = None;
    for _ in 0..30 {
        left = budget_left(&keel, "counted", "requests").await;
        if left.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        left,
        Some(3.0),
        "the gauge is not there before the first call"
    );
    // Degraded replies carry no usage, but each is a request of the budget.
    for _ in 0..3 {
        let r = reqwest::Client::new()
            .post(format!("{}/v1/chat/completions", keel.url))
            .header("x-keel-agent", "counted")
            .json(&serde_json::json!({"model": "down", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(header(r.headers(), "x-keel-degraded"), "true");
    }
    for _ in 0..30 {
        left = budget_left(&keel, "counted", "requests").await;
        if left == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(left, Some(0.0), "the gauge did not follow the spent budget");
}

/// A loopback address that never completes a TCP handshake: a listener with a backlog of
/// 0 whose queue is full (its owner never accepts), so the kernel drops further SYNs.
async fn black_hole() -> (tokio::net::TcpListener, Vec<tokio::net::TcpStream>, String) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut queued = Vec::new();
    loop {
        let connect = tokio::net::TcpStream::connect(addr);
        match tokio::time::timeout(Duration::from_millis(300), connect).await {
            Ok(stream) => queued.push(stream.unwrap()),
            Err(_) => return (listener, queued, format!("http://{addr}/v1")),
        }
        assert!(queued.len() < 64, "the listen queue never filled");
    }
}

#[tokio::test]
async fn each_route_waits_its_own_connect_timeout_on_a_shared_provider() {
    let (_hole, _queued, url) = black_hole().await;
    let sim = sim().await;
    let config = format!(
        r#"
[providers.far]
kind = "openai"
base_url = "{url}"

[routes.hasty]
targets = [{{ provider = "far", model = "m" }}]
retry = {{ max_attempts = 1 }}
timeouts = {{ connect = "200ms", first_token = "10s", attempt = "10s", total = "10s" }}

[routes.patient]
targets = [{{ provider = "far", model = "m" }}]
retry = {{ max_attempts = 1 }}
timeouts = {{ connect = "2s", first_token = "10s", attempt = "10s", total = "10s" }}
"#
    );
    let keel = Keel::start(&config, &sim).await;
    for route in ["hasty", "patient"] {
        let (status, _, body) = chat(&keel, route).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{route}: {body}");
    }
    let failed = keel.events_of("llm_attempt_failed");
    let latency = |route: &str| {
        let e = failed
            .iter()
            .find(|e| e["route"] == route)
            .unwrap_or_else(|| panic!("no failed attempt of {route}: {failed:?}"));
        assert_eq!(e["reason"], "connect", "{e}");
        e["latency_ms"].as_u64().unwrap()
    };
    // The patient route's attempt lasted its own 2s connect timeout, not the hasty
    // route's 200ms (one client per provider used to take the smallest of the two).
    assert!(latency("patient") >= 1_900, "{failed:?}");
    assert!(latency("hasty") < latency("patient"), "{failed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tasks_deadline_bounds_its_model_calls_and_refuses_them_once_passed() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    let (status, task) = crate::common::post(
        &keel.url,
        "/v1/tasks",
        serde_json::json!({"agent": "timed", "input": {}, "deadline": "2s"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{task}");
    let id = task["id"].as_str().unwrap();
    // Both targets would answer in 10s, inside the route's 20s total but past the task's 2s.
    sim.set_always("primary", Some(Fault::delay(Duration::from_secs(10))));
    sim.set_always("secondary", Some(Fault::delay(Duration::from_secs(10))));
    let call = || async {
        let r = reqwest::Client::new()
            .post(format!("{}/v1/chat/completions", keel.url))
            .header("x-keel-agent", "timed")
            .header("x-keel-task", id)
            .json(&serde_json::json!({"model": "smart", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        (r.status(), r.json::<serde_json::Value>().await.unwrap())
    };
    let (status, body) = call().await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    let failed = keel.events_of("llm_attempt_failed");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["reason"], "task", "{failed:?}");
    // Once the deadline has passed, no model is called for the task.
    let (status, body) = call().await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(body["error"]["code"], "task_deadline_exceeded", "{body}");
    assert_eq!(keel.events_of("llm_attempt_failed").len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_ends_at_its_tasks_deadline_when_that_comes_before_the_routes() {
    let sim = sim().await;
    let config = format!(
        "{TWO_TARGETS}\n[routes.slow]\ntargets = [{{ provider = \"sim\", model = \"drip\" }}]\n\
         timeouts = {{ first_token = \"5s\", idle = \"20s\", attempt = \"30s\", total = \"30s\" }}\n"
    );
    let keel = Keel::start(&config, &sim).await;
    let (status, task) = crate::common::post(
        &keel.url,
        "/v1/tasks",
        serde_json::json!({"agent": "timed", "input": {}, "deadline": "2s"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{task}");
    let id = task["id"].as_str().unwrap();
    // One chunk, then silence for longer than the task has left (but within `idle`).
    sim.set_always("drip", Some(Fault::stall_after(1, Duration::from_secs(25))));
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", keel.url))
        .header("x-keel-agent", "timed")
        .header("x-keel-task", id)
        .json(&serde_json::json!({"model": "slow", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let text = tokio::time::timeout(Duration::from_secs(15), r.text())
        .await
        .expect("the stream outlived its task's deadline")
        .unwrap();
    assert!(
        text.contains(
            "the stream from sim/drip ended: it was still coming when its task's deadline passed"
        ),
        "{text}"
    );
}

/// Sends SIGINT to `keel`.
fn interrupt(keel: &Keel) {
    let pid = keel.child.id().unwrap().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// Starts a stream on route `smart` of `keel` whose answer is `words` words, `interval`
/// apart, with agent key `key` if any, and waits until it reached the model. The stream's
/// text, or `None` when it did not complete.
async fn slow_stream(
    keel: &Keel,
    sim: &SimHandle,
    (words, interval): (usize, Duration),
    key: Option<&'static str>,
) -> tokio::task::JoinHandle<Option<String>> {
    let reply = (1..=words)
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(" ");
    sim.set_always(
        "primary",
        Some(Fault {
            chunk_interval: Some(interval),
            reply: Some(reply),
            ..Fault::default()
        }),
    );
    let url = keel.base_url();
    let stream = tokio::spawn(async move {
        let body = serde_json::json!({"model": "smart", "stream": true,
            "messages": [{"role": "user", "content": "take your time"}]});
        let mut request = reqwest::Client::new()
            .post(format!("{url}/chat/completions"))
            .json(&body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send().await.ok()?.text().await.ok()
    });
    let started = tokio::time::timeout(Duration::from_secs(10), async {
        while sim.calls("primary") == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(started.is_ok(), "the stream never reached the model");
    stream
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_interrupt_stops_keel_without_waiting_for_streams_in_flight() {
    let sim = sim().await;
    let mut keel = Keel::start(TWO_TARGETS, &sim).await;
    // A stream of about ten seconds.
    let stream = slow_stream(&keel, &sim, (20, Duration::from_millis(500)), None).await;
    // The first interrupt drains: keel stops accepting, and waits for the stream.
    interrupt(&keel);
    let addr = keel.url.trim_start_matches("http://").to_owned();
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        while tokio::net::TcpStream::connect(&addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(closed.is_ok(), "keel kept accepting after the interrupt");
    // Past the second in which a repeated signal counts as the same one.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        keel.child.try_wait().unwrap().is_none(),
        "keel did not wait for the stream in flight"
    );
    // The second stops it at once, saying the drain was cut short.
    interrupt(&keel);
    let status = tokio::time::timeout(Duration::from_secs(3), keel.child.wait())
        .await
        .expect("keel did not stop at the second interrupt")
        .unwrap();
    assert!(!status.success(), "{status}");
    assert_eq!(
        stream.await.unwrap(),
        None,
        "the stream cannot have completed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_that_ends_during_the_drain_is_spent_from_the_budget() {
    let sim = sim().await;
    let keel = Keel::start(WITH_AGENT_KEYS, &sim).await;
    // A stream of about three seconds, still running when keel is told to stop.
    let stream = slow_stream(
        &keel,
        &sim,
        (10, Duration::from_millis(300)),
        Some("sk-agent-support"),
    )
    .await;
    interrupt(&keel);
    let Keel { mut child, dir, .. } = keel;
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("keel did not stop after the stream")
        .unwrap();
    assert!(status.success(), "{status}");
    let text = stream.await.unwrap().expect("the stream completed");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    // Started again on the same store, keel knows what the stream spent.
    let keel = Keel::start_in(dir, WITH_AGENT_KEYS, &sim).await;
    let spent = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let metrics = keel.metrics().await;
            let left = metrics
                .lines()
                .find_map(|l| {
                    l.strip_prefix("keel_budget_remaining{agent=\"support\",unit=\"tokens\"} ")
                })
                .and_then(|v| v.parse::<f64>().ok());
            if left.is_some_and(|left| left < 100_000.0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        spent.is_ok(),
        "the stream's tokens were not saved at the stop"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_does_not_hold_the_stop() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let sim = sim().await;
    // A stream far longer than the sockets' buffers, on a route with a 3 s deadline.
    let config = TWO_TARGETS.replace(
        r#"attempt = "5s", total = "20s""#,
        r#"attempt = "3s", total = "3s""#,
    );
    let mut keel = Keel::start(&config, &sim).await;
    // 5,000 words of 2,000 letters: a chunk each, 10 MB in all, more than the loopback
    // sockets' buffers hold (4 MB at most for keel's send buffer by Linux's default
    // `tcp_wmem`, and the client's receive buffer does not grow while it does not read).
    let reply = vec!["w".repeat(2_000); 5_000].join(" ");
    sim.set_always(
        "primary",
        Some(Fault {
            reply: Some(reply),
            ..Fault::default()
        }),
    );
    // The client reads the answer's first bytes, then keeps its connection open without
    // reading another.
    let addr = keel.url.trim_start_matches("http://").to_owned();
    let mut client = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let body =
        r#"{"model":"smart","stream":true,"messages":[{"role":"user","content":"all of it"}]}"#;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    client.write_all(request.as_bytes()).await.unwrap();
    let mut first = [0u8; 1024];
    let n = client.read(&mut first).await.unwrap();
    assert!(
        String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&first[..n])
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    interrupt(&keel);
    // The stream ends at its deadline; the client gets a few seconds more to read, then
    // keel stops without it.
    let status = tokio::time::timeout(Duration::from_secs(20), keel.child.wait())
        .await
        .expect("keel waited for a client that does not read")
        .unwrap();
    assert!(status.success(), "{status}");
    // The call is on record: its stream ended at the deadline with the client behind.
    let calls = keel.events_of("llm_call");
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0]["stream"], true);
    assert_eq!(calls[0]["outcome"], "stream_error", "{}", calls[0]);
    drop(client);
}

/// The status and JSON error keel answers to a POST to `path` whose headers promise 100
/// bytes of body, of which the client sends 9 and then, with the connection open, nothing
/// (`trickle` `None`) or a space every `trickle` (never falling silent for long, never
/// done); and how long the answer took.
async fn stalled_post(
    keel: &Keel,
    path: &str,
    trickle: Option<Duration>,
) -> (u16, serde_json::Value, Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = keel.url.trim_start_matches("http://").to_owned();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (mut read, mut write) = tcp.into_split();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"model\":"
    );
    let started = std::time::Instant::now();
    write.write_all(head.as_bytes()).await.unwrap();
    let sender = tokio::spawn(async move {
        let Some(every) = trickle else {
            // Keep the connection open, sending nothing.
            return std::future::pending::<()>().await;
        };
        // 91 more bytes would complete the body; stop short of that.
        for _ in 0..90 {
            tokio::time::sleep(every).await;
            if write.write_all(b" ").await.is_err() {
                return;
            }
        }
        std::future::pending::<()>().await
    });
    let mut answer = Vec::new();
    let read_answer = async {
        let mut buf = [0u8; 4096];
        loop {
            match read.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
                // keel closes the connection after its answer; a trickled byte it did not
                // read makes that close a reset, which may reach us after the answer.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !answer.is_empty() => {
                    break;
                }
                Err(e) => panic!("{path}: reading keel's answer: {e}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read_answer)
        .await
        .expect("keel answers a stalled body");
    sender.abort();
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text}"));
    let (_, body) = text.split_once("\r\n\r\n").unwrap();
    let json = &body[body.find('{').unwrap()..=body.rfind('}').unwrap()];
    (status, serde_json::from_str(json).unwrap(), took)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_that_stops_arriving_is_refused_after_server_body_timeout_on_every_api() {
    let sim = sim().await;
    let config = TWO_TARGETS.replacen(
        "listen = \"127.0.0.1:0\"\n",
        "listen = \"127.0.0.1:0\"\nbody_timeout = \"1s\"\n",
        1,
    );
    let keel = Keel::start(&config, &sim).await;
    // Silent, or a byte every 300 ms (never silent for the 1 s): either way the whole body
    // must be there within 1 s of the headers.
    for trickle in [None, Some(Duration::from_millis(300))] {
        for path in ["/v1/chat/completions", "/v1/tasks", "/v1/actions/check"] {
            let (status, error, took) = stalled_post(&keel, path, trickle).await;
            assert_eq!(status, 408, "{path} {trickle:?}: {error}");
            assert_eq!(error["error"]["code"], "request_timeout", "{path}: {error}");
            assert_eq!(
                error["error"]["message"],
                "the request body did not arrive within 1s (server.body_timeout)",
                "{path}"
            );
            assert!(
                took >= Duration::from_secs(1) && took < Duration::from_secs(15),
                "{path} {trickle:?}: {took:?}"
            );
        }
    }
    // keel still serves.
    let (status, _, body) = chat(&keel, "smart").await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// Clients that give up on a target hanging past `slow_call` leave slow calls recorded; the
/// breaker they open is logged and stored at once, with no later call to carry it.
#[tokio::test(flavor = "multi_thread")]
async fn a_breaker_opened_by_clients_that_left_is_stored_at_once() {
    let breaker = "half_open_calls = 1\n";
    assert!(TWO_TARGETS.contains(breaker));
    let config = TWO_TARGETS.replace(
        breaker,
        &format!("{breaker}slow_call = \"300ms\"\nslow_call_rate = 0.5\n"),
    );
    let sim = sim().await;
    let keel = Keel::start(&config, &sim).await;
    sim.set_always(
        "patient",
        Some(Fault {
            delay: Some(Duration::from_secs(10)),
            ..Fault::default()
        }),
    );
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(700))
        .build()
        .unwrap();
    let calls = (0..4).map(|_| {
        client
            .post(format!("{}/v1/chat/completions", keel.url))
            .json(&serde_json::json!({"model": "patient", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    });
    for left in futures::future::join_all(calls).await {
        assert!(left.unwrap_err().is_timeout());
    }
    let mut opened = Vec::new();
    for _ in 0..30 {
        opened = keel.events_of("breaker_opened");
        if !opened.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        opened.len(),
        1,
        "no breaker_opened within 3s of the fourth slow call"
    );
    assert_eq!(opened[0]["target"], "sim/patient", "{opened:?}");
    assert_eq!(opened[0]["slow_call_rate"], 1.0, "{opened:?}");
    // The calls whose clients left are counted, and timed like any call.
    let metrics = keel.metrics().await;
    for line in [
        "keel_requests_total{route=\"patient\",target=\"none\",outcome=\"client_gone\"} 4",
        "keel_request_duration_seconds_count{route=\"patient\"} 4",
        "keel_attempts_total{target=\"sim/patient\",outcome=\"client_gone\"} 4",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
}

/// A stream's attempt lasts as long as the stream: `timeouts.attempt` ends a stream still
/// coming with an error event, well before `total`, and the cut is not the target's failure.
#[tokio::test(flavor = "multi_thread")]
async fn the_attempt_timeout_ends_a_stream_that_outlasts_it() {
    let config = format!(
        "{TWO_TARGETS}\n[routes.long]\ntargets = [{{ provider = \"sim\", model = \"long\" }}]\n\
         timeouts = {{ first_token = \"800ms\", idle = \"800ms\", attempt = \"1s\", total = \"30s\" }}\n"
    );
    let sim = sim().await;
    let keel = Keel::start(&config, &sim).await;
    let words = vec!["word"; 60].join(" ");
    sim.script(
        "long",
        vec![Fault {
            reply: Some(words),
            chunk_interval: Some(Duration::from_millis(100)),
            ..Fault::default()
        }],
    );
    let started = std::time::Instant::now();
    let text = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", keel.url))
        .json(&serde_json::json!({"model": "long", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "{took:?}");
    let last = text.trim_end().lines().last().unwrap();
    assert!(
        last.contains("error") && last.contains("the attempt deadline"),
        "{text}"
    );
    assert!(!text.contains("[DONE]"), "{text}");
    let calls = keel.events_of("llm_call");
    assert_eq!(calls[0]["outcome"], "stream_error", "{calls:?}");
    // A long answer is not a failing target.
    let metrics = keel.metrics().await;
    assert!(
        metrics.contains("keel_attempts_total{target=\"sim/long\",outcome=\"stream_error\"} 1"),
        "{metrics}"
    );
    assert!(keel.events_of("breaker_opened").is_empty());
}

/// A retry cut by the call's total deadline had only what its earlier attempt and the
/// backoff left of it: keel's cut, not the target's failure. Only the first attempt, which
/// ran to its own `attempt` timeout, counts against the target's breaker.
#[tokio::test(flavor = "multi_thread")]
async fn a_retry_cut_by_the_total_deadline_is_not_the_target_s_failure() {
    let config = format!(
        "{TWO_TARGETS}\n[routes.late]\ntargets = [{{ provider = \"sim\", model = \"late\" }}]\n\
         retry = {{ max_attempts = 2, base = \"10ms\", cap = \"10ms\" }}\n\
         timeouts = {{ attempt = \"1s\", total = \"1500ms\" }}\n\
         breaker = {{ window_size = 2, min_calls = 2, failure_rate = 1.0 }}\n"
    );
    let sim = sim().await;
    let keel = Keel::start(&config, &sim).await;
    sim.set_always(
        "late",
        Some(Fault {
            delay: Some(Duration::from_secs(5)),
            ..Fault::default()
        }),
    );
    let (status, headers, body) = chat(&keel, "late").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(header(&headers, "x-keel-attempts"), "2");
    // One failure of two needed: the circuit stays closed.
    assert!(keel.events_of("breaker_opened").is_empty());
    let metrics = keel.metrics().await;
    assert!(
        metrics.contains("keel_breaker_state{target=\"sim/late\"} 0"),
        "{metrics}"
    );
    // The next call's first attempt is the second failure: it opens the circuit, and is
    // not retried into it.
    let (status, headers, body) = chat(&keel, "late").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(header(&headers, "x-keel-attempts"), "1");
    assert_eq!(keel.events_of("breaker_opened").len(), 1);
}
