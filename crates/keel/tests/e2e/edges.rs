//! The gateway at the edges of its rules: an absurd `Retry-After`, the total deadline on
//! the last target, a fatal answer from a fallback target, a refusal from one target of
//! an outage, a client that leaves a silent stream, an upstream error page that is not
//! JSON.

use std::time::Duration;

use keel_sim::Fault;
use reqwest::StatusCode;
use reqwest::header::HeaderMap;

use crate::common::{Keel, TWO_TARGETS, sim};

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
async fn the_total_deadline_running_out_on_the_last_target_is_a_504() {
    let sim = sim().await;
    let keel = Keel::start(TWO_TARGETS, &sim).await;
    // `hurried`: attempt 2s, total 3s. The first target's attempt times out at 2s, the
    // second's is cut by the total deadline at 3s.
    sim.set_always("hurried-a", Some(Fault::delay(Duration::from_secs(5))));
    sim.set_always("hurried-b", Some(Fault::delay(Duration::from_secs(5))));
    let (status, headers, body) = chat(&keel, "hurried").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(body["error"]["code"], "timeout", "{body}");
    assert_eq!(header(&headers, "x-keel-attempts"), "2");
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
    let metrics = keel.metrics().await;
    assert!(
        metrics.contains(
            "keel_requests_total{route=\"patient\",target=\"sim/patient\",outcome=\"client_gone\"} 1"
        ),
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
