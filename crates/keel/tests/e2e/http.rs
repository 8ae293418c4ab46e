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
    let text = reqwest::get(format!("{}/metrics", keel.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for family in [
        "keel_requests_total{route=\"smart\",target=\"sim/primary\",outcome=\"ok\"} 1",
        "keel_attempts_total{target=\"sim/primary\",outcome=\"retryable\"} 1",
        "keel_retries_total{route=\"smart\"} 1",
        "keel_request_duration_seconds_bucket",
        "gen_ai_client_token_usage_bucket",
        "keel_breaker_state{target=\"sim/primary\"} 0",
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
