//! Output validation end to end: an answer that does not match the request's JSON
//! schema is sent back once with the error, then the call falls back.

use keel_sim::Fault;
use serde_json::{Value, json};

use crate::common::{Keel, TWO_TARGETS, sim};

fn request() -> Value {
    json!({
        "model": "smart",
        "messages": [{"role": "user", "content": "who are you?"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"],
        }}},
    })
}

async fn chat(keel: &Keel, body: &Value) -> (u16, reqwest::header::HeaderMap, Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", keel.url))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.json().await.unwrap())
}

fn content(answer: &Value) -> Value {
    serde_json::from_str(answer["choices"][0]["message"]["content"].as_str().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_answer_is_corrected_on_the_second_try() {
    let models = sim().await;
    let keel = Keel::start(TWO_TARGETS, &models).await;
    models.script("primary", vec![Fault::reply("Sure! I'm Ada, 36.")]);
    let (status, headers, answer) = chat(&keel, &request()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(headers["x-keel-target"], "sim/primary");
    let person = content(&answer);
    assert!(
        person["name"].is_string() && person["age"].is_i64(),
        "{person}"
    );
    assert_eq!(models.calls("primary"), 2);
    // The second request carried the wrong answer and what was wrong with it.
    let second = models.last_request("primary").unwrap();
    let messages = second["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 3, "{second}");
    assert_eq!(messages[1]["content"], "Sure! I'm Ada, 36.");
    assert!(
        messages[2]["content"]
            .as_str()
            .unwrap()
            .contains("does not match the JSON schema")
    );
    let failed = keel.events_of("llm_attempt_failed");
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["reason"], "schema_mismatch");
    // The wrong answer's id, for the provider's support: not the right one's.
    let wrong = failed[0]["request_id"].as_str().unwrap_or_default();
    assert!(wrong.starts_with("req_sim_"), "{:?}", failed[0]);
    assert_ne!(wrong, headers["x-request-id"].to_str().unwrap());
    let metrics = keel.metrics().await;
    assert!(
        metrics.contains("keel_self_corrections_total{route=\"smart\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_wrong_answers_fall_back_to_the_next_target() {
    let models = sim().await;
    let keel = Keel::start(TWO_TARGETS, &models).await;
    models.script(
        "primary",
        vec![
            Fault::reply("{\"name\": \"Ada\"}"),
            Fault::reply("{\"age\": 36}"),
        ],
    );
    let (status, headers, answer) = chat(&keel, &request()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(headers["x-keel-target"], "sim/secondary");
    assert_eq!(headers["x-keel-fallback"], "true");
    assert!(content(&answer)["age"].is_i64());
    assert_eq!(models.calls("primary"), 2);
    let failed = keel.events_of("llm_attempt_failed");
    assert_eq!(failed.len(), 2);
    // Each wrong answer is named by its own id.
    let ids: Vec<&str> = failed
        .iter()
        .map(|f| f["request_id"].as_str().unwrap_or_default())
        .collect();
    assert!(
        ids.iter().all(|id| id.starts_with("req_sim_")),
        "{failed:?}"
    );
    assert_ne!(ids[0], ids[1]);
    // Both wrong answers were paid for: the call's usage holds them with the right one's.
    let calls = keel.events_of("llm_call");
    let usage = &calls[0]["usage"];
    let answered = answer["usage"]["prompt_tokens"].as_u64().unwrap();
    // The secondary's prompt is the first wrong answer's; the correction's is longer.
    assert!(
        usage["prompt_tokens"].as_u64().unwrap() > 3 * answered,
        "{usage} against the answer's {}",
        answer["usage"]
    );
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );

    // A schema that is no JSON Schema is the client's mistake.
    let mut bad = request();
    bad["response_format"]["json_schema"]["schema"] = json!({"type": 7});
    let (status, _, answer) = chat(&keel, &bad).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["param"], "response_format");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_answer_cut_at_max_tokens_is_passed_on_as_it_came() {
    let models = sim().await;
    let keel = Keel::start(TWO_TARGETS, &models).await;
    models.script(
        "primary",
        vec![Fault::reply("{\"name\": \"Ada\", \"age\": 36}")],
    );
    let mut body = request();
    body["max_tokens"] = json!(2);
    let (status, headers, answer) = chat(&keel, &body).await;
    // As OpenAI answers it: the cut JSON with finish_reason "length", for the client's SDK
    // to judge; asking again with the same limit would only be cut again.
    assert_eq!(status, 200, "{answer}");
    assert_eq!(headers["x-keel-target"], "sim/primary");
    assert_eq!(answer["choices"][0]["finish_reason"], "length");
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "{\"name\": \"Ada\","
    );
    assert_eq!(models.calls("primary"), 1);
    assert_eq!(models.calls("secondary"), 0);
    assert!(keel.events_of("llm_attempt_failed").is_empty());
}

/// A wrong answer that reported no usage was paid for all the same: the call's spend holds
/// keel's estimate of it beside the right answer's reported usage.
#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_answer_without_usage_is_charged_an_estimate() {
    let models = sim().await;
    let keel = Keel::start(TWO_TARGETS, &models).await;
    models.script(
        "primary",
        vec![Fault {
            no_usage: true,
            ..Fault::reply("Sure! I'm Ada, 36.")
        }],
    );
    let (status, _, answer) = chat(&keel, &request()).await;
    assert_eq!(status, 200, "{answer}");
    let calls = keel.events_of("llm_call");
    assert_eq!(calls[0]["usage_estimated"], true, "{}", calls[0]);
    // "who are you?": 12 characters, 3 tokens, and 3 for the message and 3 for the reply;
    // "Sure! I'm Ada, 36.": 18 characters, 5 tokens.
    let reported = |key: &str| answer["usage"][key].as_u64().unwrap();
    assert_eq!(
        calls[0]["usage"]["prompt_tokens"].as_u64(),
        Some(9 + reported("prompt_tokens")),
        "{}",
        calls[0]
    );
    assert_eq!(
        calls[0]["usage"]["completion_tokens"].as_u64(),
        Some(5 + reported("completion_tokens")),
        "{}",
        calls[0]
    );
}
