//! `POST /v1/actions/check` in process (`router().oneshot(...)`) over a real SQLite store.

use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use keel_store::{EventQuery, EventStore, SqliteStore};
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::Gateway;

const CONFIG: &str = r#"
[agents.support]

[tools.refund]
url = "http://127.0.0.1:9/refund"
rules = ["args.amount <= 500"]
"#;

/// A gateway with the tool `refund` on a new store in `dir`, and the store.
fn gateway(dir: &tempfile::TempDir) -> (Arc<Gateway>, Arc<SqliteStore>) {
    crate::test_gateway(CONFIG, dir)
}

/// `POST /v1/actions/check` with `body` and, when given, an `Idempotency-Key`: the status,
/// whether the answer is marked replayed, and the JSON answer.
async fn check(gw: &Arc<Gateway>, key: Option<&str>, body: &Value) -> (u16, bool, Value) {
    let mut request = Request::post("/v1/actions/check").header("content-type", "application/json");
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let request = request.body(Body::from(body.to_string())).unwrap();
    let response = crate::http::router(Arc::clone(gw))
        .oneshot(request)
        .await
        .unwrap();
    let status = response.status().as_u16();
    let replayed = response.headers().contains_key("idempotent-replayed");
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, replayed, serde_json::from_slice(&bytes).unwrap())
}

async fn checked_events(store: &SqliteStore) -> usize {
    let query = EventQuery {
        kind: Some("action_checked".into()),
        ..EventQuery::default()
    };
    store.events(query).await.unwrap().len()
}

#[tokio::test]
async fn a_keyed_check_repeated_gets_the_first_verdict_and_is_not_counted_again() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, store) = gateway(&dir);
    let body = json!({"agent": "support", "tool": "refund", "args": {"amount": 900}});
    let (status, replayed, first) = check(&gw, Some("k1"), &body).await;
    assert_eq!((status, replayed), (200, false), "{first}");
    assert_eq!(first["verdict"], "block", "{first}");
    // The same check with its keys in another order is the same request.
    let reordered = json!({"args": {"amount": 900}, "tool": "refund", "agent": "support"});
    let (status, replayed, again) = check(&gw, Some("k1"), &reordered).await;
    assert_eq!((status, replayed, &again), (200, true, &first));
    assert_eq!(
        checked_events(&store).await,
        1,
        "the repeat was checked again"
    );
    // The same key for another check is a mistake, said plainly.
    let other = json!({"agent": "support", "tool": "refund", "args": {"amount": 5}});
    let (status, _, err) = check(&gw, Some("k1"), &other).await;
    assert_eq!(status, 422, "{err}");
    assert_eq!(err["error"]["code"], "idempotency_key_reused", "{err}");
    assert_eq!(err["error"]["param"], "idempotency_key", "{err}");
    assert_eq!(checked_events(&store).await, 1);
    // Without a key every check counts.
    for _ in 0..2 {
        let (status, replayed, _) = check(&gw, None, &body).await;
        assert_eq!((status, replayed), (200, false));
    }
    assert_eq!(checked_events(&store).await, 3);
}

#[test]
fn a_tool_answer_nested_deeper_than_its_event_can_hold_is_taken_as_text() {
    let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let limit = crate::usage::INLINE_DEPTH;
    assert!(super::tool_json(nested(limit).as_bytes()).is_some());
    assert!(super::tool_json(nested(limit + 1).as_bytes()).is_none());
    assert_eq!(
        super::tool_json(br#"{"ok":true}"#),
        Some(json!({"ok": true}))
    );
    assert!(super::tool_json(b"plain text").is_none());
    // A key serde_json reserves would not read back from a saved answer: renamed.
    let answer = super::tool_json(br#"{"z":1,"$serde_json::private::RawValue":"{"}"#).unwrap();
    let saved: Value = serde_json::from_str(&answer.to_string()).unwrap();
    assert_eq!(saved, answer);
    assert_eq!(
        saved["(renamed by keel) $serde_json::private::RawValue"],
        "{"
    );
}
