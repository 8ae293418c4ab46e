//! Bad input over raw HTTP: the right 4xx in OpenAI shape, and the server keeps serving.

use reqwest::StatusCode;

use crate::common::{Keel, TWO_TARGETS, sim};

async fn post(keel: &Keel, body: Vec<u8>) -> (StatusCode, serde_json::Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", keel.url))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_openai_shaped_errors_and_the_server_keeps_serving() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    let cases: Vec<(Vec<u8>, StatusCode, &str)> = vec![
        (
            b"{\"model\": \"smart\", ".to_vec(),
            StatusCode::BAD_REQUEST,
            "not valid JSON",
        ),
        (
            b"{\"messages\": []}".to_vec(),
            StatusCode::BAD_REQUEST,
            "model",
        ),
        (
            b"{\"model\": \"nope\", \"messages\": []}".to_vec(),
            StatusCode::NOT_FOUND,
            "does not exist",
        ),
        (
            b"{\"model\": \"smart\xff\"}".to_vec(),
            StatusCode::BAD_REQUEST,
            "UTF-8",
        ),
        (
            vec![b' '; 4 * 1024 * 1024 + 1024],
            StatusCode::PAYLOAD_TOO_LARGE,
            "max_body_bytes",
        ),
    ];
    for (body, status, needle) in cases {
        let (got, json) = post(&keel, body).await;
        assert_eq!(got, status, "{json}");
        let message = json["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{message}");
        assert!(json["error"]["type"].is_string());
    }
    // A task id or model name that is not UTF-8 once decoded: the client's 400, in the
    // OpenAI shape like every other.
    let client = reqwest::Client::new();
    for (method, path) in [
        ("POST", "/tasks/%FF/v1/chat/completions"),
        ("POST", "/tasks/%FF/v1/embeddings"),
        ("GET", "/v1/models/%FF"),
        ("GET", "/tasks/%FF/v1/models/smart"),
    ] {
        let url = format!("{}{path}", keel.url);
        let request = match method {
            "POST" => client
                .post(url)
                .header("content-type", "application/json")
                .body(r#"{"model":"smart","messages":[{"role":"user","content":"hi"}]}"#),
            _ => client.get(url),
        };
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{path}");
        let json: serde_json::Value = response.json().await.unwrap();
        assert_eq!(json["error"]["code"], "invalid_path", "{path}: {json}");
        assert!(
            json["error"]["message"].as_str().unwrap().contains("UTF-8"),
            "{json}"
        );
    }
    let (got, json) = post(
        &keel,
        br#"{"model":"smart","messages":[{"role":"user","content":"still here?"}]}"#.to_vec(),
    )
    .await;
    assert_eq!(got, StatusCode::OK, "{json}");
    let health = reqwest::get(format!("{}/healthz", keel.url)).await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let ready = reqwest::get(format!("{}/readyz", keel.url)).await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
}

/// The labels a call carries in its headers are read as UTF-8 text: an agent or task named in
/// another script is named all the same (not silently dropped, which skipped a task's
/// deadline and owner checks); a value that is no text, a task label with a control
/// character, and a compressed body are the client's 4xx.
#[tokio::test(flavor = "multi_thread")]
async fn header_labels_are_utf_8_and_odd_ones_are_refused() {
    use reqwest::header::HeaderValue;
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    let body = r#"{"model":"smart","messages":[{"role":"user","content":"hi"}]}"#;
    let send = |path: &'static str, headers: Vec<(&'static str, HeaderValue)>| {
        let mut request = reqwest::Client::new()
            .post(format!("{}{path}", keel.url))
            .header("content-type", "application/json")
            .body(body);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            let json: serde_json::Value = response.json().await.unwrap();
            (status, json)
        }
    };
    let utf8 = |text: &str| HeaderValue::from_bytes(text.as_bytes()).unwrap();
    let (status, json) = send(
        "/v1/chat/completions",
        vec![
            ("x-keel-agent", utf8("agént")),
            ("x-keel-task", utf8("café")),
            ("x-keel-step", utf8("étape")),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    let db = rusqlite::Connection::open(keel.db_path()).unwrap();
    let (task, data): (Option<String>, String) = db
        .query_row(
            "SELECT task_id, data FROM events WHERE kind = 'llm_call'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let data: serde_json::Value = serde_json::from_str(&data).unwrap();
    assert_eq!(task.as_deref(), Some("café"));
    assert_eq!(data["agent"], "agént", "{data}");
    assert_eq!(data["step"], "étape", "{data}");
    // An empty task header names no task.
    let (status, json) = send("/v1/chat/completions", vec![("x-keel-task", utf8(""))]).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    let untasked: i64 = db
        .query_row(
            "SELECT count(*) FROM events WHERE kind = 'llm_call' AND task_id IS NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(untasked, 1);
    // Refused: no UTF-8, a control character in a task label, a compressed body.
    let not_utf8 = HeaderValue::from_bytes(b"caf\xe9").unwrap();
    for (path, headers, param, code) in [
        (
            "/v1/chat/completions",
            vec![("x-keel-task", not_utf8.clone())],
            "x-keel-task",
            "invalid_header",
        ),
        (
            "/v1/chat/completions",
            vec![("x-keel-agent", not_utf8)],
            "x-keel-agent",
            "invalid_header",
        ),
        (
            "/tasks/victim%00evil/v1/chat/completions",
            vec![],
            "task",
            "invalid_path",
        ),
        (
            "/tasks/victim%0Aevil/v1/chat/completions",
            vec![],
            "task",
            "invalid_path",
        ),
    ] {
        let (status, json) = send(path, headers).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {json}");
        assert_eq!(json["error"]["code"], code, "{path}: {json}");
        assert_eq!(json["error"]["param"], param, "{path}: {json}");
    }
    let (status, json) = send(
        "/v1/chat/completions",
        vec![("content-encoding", utf8("gzip"))],
    )
    .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{json}");
    assert_eq!(
        json["error"]["code"], "unsupported_content_encoding",
        "{json}"
    );
    assert_eq!(sim.calls("primary"), 2, "no refused call reached the model");
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_pass_promtool_and_name_design_families() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    sim.script("primary", vec![keel_sim::Fault::status(503)]);
    let (status, _) = post(
        &keel,
        br#"{"model":"smart","messages":[{"role":"user","content":"hi"}]}"#.to_vec(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // Refused before a route is known: counted, under route "none", not the client's model.
    let (status, _) = post(
        &keel,
        br#"{"model":"no-such-route","messages":[{"role":"user","content":"hi"}]}"#.to_vec(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = post(&keel, b"{not json".to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // A label value a client chose (an agent name with a quote, a backslash and a newline)
    // is escaped, or the whole scrape would be unreadable.
    let agent = "say \"hi\" \\ then\nbye";
    let body = serde_json::json!({"agent": agent, "input": {}});
    let (status, created) = keel.post_json("/v1/tasks", &[], &body).await;
    assert_eq!(status, 201, "{created}");
    let claim = serde_json::json!({"agent": agent, "worker": "w", "lease": "30s"});
    let (status, claimed) = keel.post_json("/v1/tasks/claim", &[], &claim).await;
    assert_eq!(status, 200, "{claimed}");
    let id = created["id"].as_str().unwrap();
    let done = serde_json::json!({"lease_token": claimed["lease_token"], "output": "ok"});
    let (status, answer) = keel
        .post_json(&format!("/v1/tasks/{id}/complete"), &[], &done)
        .await;
    assert_eq!(status, 200, "{answer}");
    let text = keel.metrics().await;
    for family in [
        r#"keel_tasks_total{agent="say \"hi\" \\ then\nbye",outcome="succeeded"} 1"#,
        "keel_requests_total{route=\"smart\",target=\"sim/primary\",outcome=\"ok\"} 1",
        "keel_requests_total{route=\"none\",target=\"none\",outcome=\"rejected\"} 2",
        "keel_attempts_total{target=\"sim/primary\",outcome=\"retryable\"} 1",
        "keel_retries_total{route=\"smart\"} 1",
        "keel_request_duration_seconds_bucket",
        "gen_ai_client_token_usage_bucket",
        "keel_breaker_state{target=\"sim/primary\"} 0",
        "# TYPE keel_dlq_depth gauge",
        "# TYPE keel_approvals_pending gauge",
    ] {
        assert!(text.contains(family), "missing {family} in:\n{text}");
    }
    let promtool = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".to_owned());
    let mut child = std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {promtool} (cargo xtask test installs it): {e}"));
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_disconnects_cancels_the_upstream_call() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    // Every attempt fails and keel would retry every 700ms, five times.
    sim.set_always("stubborn", Some(keel_sim::Fault::status(503)));
    let sent = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", keel.url))
        .timeout(std::time::Duration::from_millis(300))
        .json(&serde_json::json!({"model": "stubborn", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await;
    assert!(sent.unwrap_err().is_timeout());
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(
        sim.calls("stubborn"),
        1,
        "keel kept retrying for a client that had left"
    );
}

/// A 50-call conversation resends its whole history every call; keel stores
/// each message once, so the bytes stored per call stay flat.
#[tokio::test(flavor = "multi_thread")]
async fn a_long_conversation_is_stored_once_not_once_per_call() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    let client = reqwest::Client::new();
    let mut messages = vec![
        serde_json::json!({"role": "system", "content": "You are a careful support agent. ".repeat(20)}),
    ];
    let mut sent = 0usize;
    for turn in 0..50 {
        messages.push(serde_json::json!({"role": "user", "content": format!("question {turn}: {}", "details ".repeat(40))}));
        let body = serde_json::json!({"model": "smart", "messages": messages});
        sent += body.to_string().len();
        let r = client
            .post(format!("{}/tasks/conv-1/v1/chat/completions", keel.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let answer: serde_json::Value = r.json().await.unwrap();
        messages.push(answer["choices"][0]["message"].clone());
    }
    let db = rusqlite::Connection::open(keel.db_path()).unwrap();
    let blob_bytes: i64 = db
        .query_row(
            "SELECT coalesce(sum(b.size), 0) FROM blobs b JOIN task_blobs t ON t.hash = b.hash WHERE t.task_id = 'conv-1'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let event_bytes: i64 = db
        .query_row(
            "SELECT coalesce(sum(length(data)), 0) FROM events WHERE task_id = 'conv-1'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let stored = usize::try_from(blob_bytes + event_bytes).unwrap();
    let per_call = stored / 50;
    println!(
        "50-call conversation: {sent} request bytes sent, {stored} bytes stored ({per_call} per call)"
    );
    assert!(per_call < 4096, "{per_call} bytes stored per call");
    assert!(
        sent > stored * 5,
        "sent {sent}, stored {stored}: the history is not deduplicated"
    );
    // The last call names its conversation, and every node of it is stored.
    let last: String = db
        .query_row("SELECT data FROM events WHERE task_id = 'conv-1' AND kind = 'llm_call' ORDER BY seq DESC LIMIT 1", [], |r| r.get(0))
        .unwrap();
    let last: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(last["request"]["messages"], 100);
    let mut node = last["request"]["conversation"].as_str().map(str::to_owned);
    let mut walked = 0;
    while let Some(hash) = node {
        let bytes: Vec<u8> = db
            .query_row("SELECT bytes FROM blobs WHERE hash = ?1", [&hash], |r| {
                r.get(0)
            })
            .unwrap();
        let n: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        node = n["prev"].as_str().map(str::to_owned);
        walked += 1;
    }
    assert_eq!(
        walked, 100,
        "the conversation chain must lead back to the first message"
    );
}

/// Sends a chat call in task `task` that the route's first target answers as `fault` says,
/// with a member nested 126 arrays deep: 127 levels, as deep as serde_json reads, and one
/// level too deep for the answer's place inside its `llm_call`.
async fn call_answered_too_deep(
    keel: &Keel,
    sim: &keel_sim::SimHandle,
    fault: keel_sim::Fault,
    task: &str,
) -> (u16, serde_json::Value) {
    sim.script(
        "primary",
        vec![keel_sim::Fault {
            nest: Some(126),
            ..fault
        }],
    );
    let body =
        serde_json::json!({"model": "smart", "messages": [{"role": "user", "content": "hi"}]});
    let (status, answer) = keel
        .post_json("/v1/chat/completions", &[("x-keel-task", task)], &body)
        .await;
    // The client got the member whole: 126 arrays, one inside the other.
    let mut depth = 0;
    let mut inner = &answer["keel_sim_nested"];
    while let Some(items) = inner.as_array() {
        depth += 1;
        inner = items.first().unwrap_or(&serde_json::Value::Null);
    }
    assert_eq!(depth, 126, "{answer}");
    (status, answer)
}

/// Checks that `task`'s log reads back with its `llm_call` naming a blob that holds
/// `answer`, and that the chain verifies; returns the log as printed.
fn assert_log_keeps_as_blob(keel: &Keel, task: &str, answer: &serde_json::Value) -> String {
    let log = keel.cli_ok(&["tasks", "events", task, "--json"]);
    let text = String::from_utf8_lossy(&log.stdout).into_owned();
    assert!(text.contains("\"response\":null"), "{text}");
    let hash = text
        .split("\"response_blob\":\"")
        .nth(1)
        .and_then(|rest| rest.get(..64))
        .unwrap_or_else(|| panic!("no response_blob in {text}"));
    keel.cli_ok(&["audit", "verify"]);
    let db = rusqlite::Connection::open(keel.db_path()).unwrap();
    let bytes: Vec<u8> = db
        .query_row("SELECT bytes FROM blobs WHERE hash = ?1", [hash], |r| {
            r.get(0)
        })
        .unwrap();
    let stored: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(&stored, answer);
    text
}

/// An answer nested as deep as serde_json reads would be one level deeper inside its
/// `llm_call`, past what the log could read back: keel keeps it as a blob the event names,
/// so the task's log and the chain still read whole, and the blob is the answer as sent.
#[tokio::test(flavor = "multi_thread")]
async fn an_answer_nested_too_deep_for_its_event_is_kept_as_a_blob_and_the_log_reads_back() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    let (status, answer) =
        call_answered_too_deep(&keel, &sim, keel_sim::Fault::default(), "deep-1").await;
    assert_eq!(status, 200, "{answer}");
    assert_log_keeps_as_blob(&keel, "deep-1", &answer);
}

/// A fatal upstream error's JSON body is kept like an answer: as deep, as a blob.
#[tokio::test(flavor = "multi_thread")]
async fn a_fatal_error_body_nested_too_deep_reaches_the_client_and_is_kept_as_a_blob() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    // A 400 is fatal: no retry, no fallback; its JSON body goes back as the provider sent it.
    let (status, answer) =
        call_answered_too_deep(&keel, &sim, keel_sim::Fault::status(400), "deep-err").await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["type"], "invalid_request_error", "{answer}");
    assert_eq!((sim.calls("primary"), sim.calls("secondary")), (1, 0));
    let log = assert_log_keeps_as_blob(&keel, "deep-err", &answer);
    assert!(log.contains("\"outcome\":\"fatal\""), "{log}");
}

/// Whether `/readyz` says ready.
async fn ready(keel: &Keel) -> StatusCode {
    reqwest::get(format!("{}/readyz", keel.url))
        .await
        .unwrap()
        .status()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_answer_keel_cannot_record_is_withheld_and_readyz_says_so() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    let chat = br#"{"model":"smart","messages":[{"role":"user","content":"hi"}]}"#;
    // The store refuses every write, as a full disk would.
    let db = rusqlite::Connection::open(keel.db_path()).unwrap();
    db.execute_batch(
        "CREATE TRIGGER full_events BEFORE INSERT ON events BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END;
         CREATE TRIGGER full_state BEFORE INSERT ON state BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END;
         CREATE TRIGGER full_state_again BEFORE UPDATE ON state BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END;",
    )
    .unwrap();
    // The provider answered, but keel could not record it: no answer is acknowledged.
    let (status, json) = post(&keel, chat.to_vec()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{json}");
    assert_eq!(json["error"]["code"], "store_unavailable", "{json}");
    // A stream's content has gone out already; its end says it was not recorded, not
    // [DONE].
    let body = br#"{"model":"smart","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let text = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", keel.url))
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!text.contains("[DONE]"), "{text}");
    assert!(
        text.trim_end()
            .lines()
            .last()
            .is_some_and(|l| l.contains("store_unavailable")),
        "{text}"
    );
    // Reads still work, but the store is not ready: a write must commit first, and every
    // probe until one does says so.
    assert_eq!(ready(&keel).await, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready(&keel).await, StatusCode::SERVICE_UNAVAILABLE);
    // Room again: ready, and answers are given and recorded.
    db.execute_batch(
        "DROP TRIGGER full_events; DROP TRIGGER full_state; DROP TRIGGER full_state_again;",
    )
    .unwrap();
    assert_eq!(ready(&keel).await, StatusCode::OK);
    let (status, json) = post(&keel, chat.to_vec()).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    let calls = keel.events_of("llm_call");
    assert_eq!(
        calls.len(),
        1,
        "only the answer given is recorded: {calls:?}"
    );
    // The two answers withheld are errors in the request count, not successes.
    let metrics = keel.metrics().await;
    for line in [
        "keel_requests_total{route=\"smart\",target=\"sim/primary\",outcome=\"error\"} 2",
        "keel_requests_total{route=\"smart\",target=\"sim/primary\",outcome=\"ok\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
}
