//! The HTTP API in process (`router().oneshot(...)`) over a real SQLite store: the answers
//! a client sees, status and body.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use keel_store::{Durability, SqliteStore, TaskQuery};
use serde_json::{Value, json};
use tower::ServiceExt;

use super::{Supervisor, SupervisorSettings};

/// A supervisor on a new store in `dir`.
fn supervisor(dir: &tempfile::TempDir) -> Arc<Supervisor> {
    let store = SqliteStore::open(&dir.path().join("keel.db"), Durability::Relaxed).unwrap();
    Arc::new(Supervisor::new(
        Arc::new(store),
        SupervisorSettings::default(),
    ))
}

/// `POST path` with `body` and `headers`: the status and the JSON answer.
async fn post(
    sv: &Arc<Supervisor>,
    path: &str,
    headers: &[(&str, &str)],
    body: Value,
) -> (StatusCode, Value) {
    let mut request = Request::post(path).header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    send(sv, request.body(Body::from(body.to_string())).unwrap()).await
}

/// `request` through the supervisor's router: the status and the JSON answer (null when the
/// answer is not JSON).
async fn send(sv: &Arc<Supervisor>, request: Request<Body>) -> (StatusCode, Value) {
    let response = super::http::router(Arc::clone(sv))
        .oneshot(request)
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Checks that `body` is an error in the OpenAI shape with `code`; its message.
fn openai_error(body: &Value, code: &str) -> String {
    let error = &body["error"];
    for field in ["message", "type", "code", "param"] {
        assert!(error.get(field).is_some(), "no {field} in {body}");
    }
    assert_eq!(error["code"], code, "{body}");
    error["message"].as_str().unwrap().to_owned()
}

/// Creates a task and puts it in the approval queue (as an operator); the approval's id.
async fn waiting_task(sv: &Arc<Supervisor>, id: &str) -> String {
    let (status, task) = post(sv, "/v1/tasks", &[], json!({"agent": "a", "id": id})).await;
    assert_eq!(status, StatusCode::CREATED, "{task}");
    let path = format!("/v1/tasks/{id}/approvals");
    let (status, asked) = post(sv, &path, &[], json!({"reason": "a person decides"})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{asked}");
    asked["pending_approval"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn deciding_an_approval_again_is_a_conflict_saying_how_it_was_decided() {
    let dir = tempfile::tempdir().unwrap();
    let sv = supervisor(&dir);
    let approval = waiting_task(&sv, "t1").await;
    let path = format!("/v1/approvals/{approval}");
    let deny = json!({"decision": "deny", "by": "alice", "note": "too risky"});
    let (status, task) = post(&sv, &path, &[], deny).await;
    assert_eq!(
        (status, task["state"].as_str()),
        (StatusCode::OK, Some("dead"))
    );
    for decision in ["approve", "deny"] {
        let (status, body) = post(&sv, &path, &[], json!({"decision": decision})).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        let message = openai_error(&body, "approval_already_decided");
        assert_eq!(
            message,
            format!(
                "approval {approval} of task t1 was already decided: denied by alice (\"too risky\")"
            )
        );
    }
}

#[tokio::test]
async fn an_approval_that_never_existed_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let sv = supervisor(&dir);
    waiting_task(&sv, "t1").await;
    let (status, body) = post(
        &sv,
        "/v1/approvals/apr_nope",
        &[],
        json!({"decision": "approve"}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(
        openai_error(&body, "approval_not_found"),
        "no approval apr_nope"
    );
}

#[tokio::test]
async fn an_approval_whose_task_was_cancelled_is_no_longer_pending() {
    let dir = tempfile::tempdir().unwrap();
    let sv = supervisor(&dir);
    let approval = waiting_task(&sv, "t1").await;
    let (status, _) = post(&sv, "/v1/tasks/t1/cancel", &[], json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let path = format!("/v1/approvals/{approval}");
    let (status, body) = post(&sv, &path, &[], json!({"decision": "approve"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let message = openai_error(&body, "approval_not_pending");
    assert_eq!(
        message,
        format!("approval {approval} is no longer pending: its task t1 is cancelled")
    );
}

#[tokio::test]
async fn a_repeated_idempotency_key_with_another_body_is_a_422_and_appends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sv = supervisor(&dir);
    let key = [("idempotency-key", "k1")];
    let (status, task) = post(&sv, "/v1/tasks", &key, json!({"agent": "a", "input": 1})).await;
    assert_eq!(status, StatusCode::CREATED, "{task}");
    let (status, again) = post(&sv, "/v1/tasks", &key, json!({"input": 1, "agent": "a"})).await;
    assert_eq!((status, &again["id"]), (StatusCode::CREATED, &task["id"]));
    let (status, body) = post(&sv, "/v1/tasks", &key, json!({"agent": "a", "input": 2})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    openai_error(&body, "idempotency_key_reused");
    assert_eq!(body["error"]["param"], "idempotency_key", "{body}");
    // A lease holder's call too: the second checkpoint under the key is refused.
    let claim = json!({"agent": "a", "worker": "w"});
    let (status, claimed) = post(&sv, "/v1/tasks/claim", &[], claim).await;
    assert_eq!(status, StatusCode::OK, "{claimed}");
    let (id, token) = (claimed["id"].as_str().unwrap(), &claimed["lease_token"]);
    let path = format!("/v1/tasks/{id}/checkpoints");
    let key = [("idempotency-key", "ckpt-1")];
    let first = json!({"lease_token": token, "state": {"k": 1}});
    let (status, saved) = post(&sv, &path, &key, first.clone()).await;
    assert_eq!((status, &saved["seq"]), (StatusCode::OK, &json!(1)));
    assert_eq!(post(&sv, &path, &key, first).await.1, saved);
    let other = json!({"lease_token": token, "state": {"k": 2}});
    let (status, body) = post(&sv, &path, &key, other).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    openai_error(&body, "idempotency_key_reused");
    let task = sv.get(id).await.unwrap();
    assert_eq!(
        task.checkpoint.map(|c| c.seq),
        Some(1),
        "a checkpoint was added"
    );
    let page = sv.store().tasks(TaskQuery::default()).await.unwrap();
    assert_eq!(page.tasks.len(), 1, "the refused create made a task");
}

#[tokio::test]
async fn leases_deadlines_and_approval_timeouts_outside_1ms_to_a_year_are_refused_in_words() {
    let dir = tempfile::tempdir().unwrap();
    let sv = supervisor(&dir);
    // Each refusal: a 400 naming the field, in its own words (not a time in unix ms the
    // client never sent, nor a lease that never runs out).
    let refused = |body: &Value, field: &str, says: &str| {
        assert_eq!(body["error"]["param"], field, "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{message}");
    };
    let bad = [
        ("0s", "must be longer than 0s"),
        ("500us", "shorter than 1ms"),
        ("100000000000d", "366d"),
    ];
    for (value, says) in bad {
        let create = json!({"agent": "a", "input": {}, "deadline": value});
        let (status, body) = post(&sv, "/v1/tasks", &[], create).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        refused(&body, "deadline", says);
    }
    let (status, body) = post(&sv, "/v1/tasks", &[], json!({"agent": "a", "input": {}})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let claim = |lease: &str| json!({"agent": "a", "worker": "w", "lease": lease});
    for (value, says) in bad {
        let (status, body) = post(&sv, "/v1/tasks/claim", &[], claim(value)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        refused(&body, "lease", says);
    }
    // A long lease within the bound is taken.
    let (status, task) = post(&sv, "/v1/tasks/claim", &[], claim("365d")).await;
    assert_eq!(status, StatusCode::OK, "{task}");
    let path = format!("/v1/tasks/{}/approvals", task["id"].as_str().unwrap());
    for (value, says) in bad {
        let ask = json!({"lease_token": task["lease_token"], "reason": "r", "timeout": value});
        let (status, body) = post(&sv, &path, &[], ask).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        refused(&body, "timeout", says);
    }
}

#[tokio::test]
async fn an_invalid_field_is_named_as_the_error_s_param() {
    let dir = tempfile::tempdir().unwrap();
    let sv = supervisor(&dir);
    let (status, body) = post(&sv, "/v1/tasks", &[], json!({"agent": "a", "input": {}})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let claim = json!({"agent": "a", "worker": "w", "lease": "30s"});
    let (status, task) = post(&sv, "/v1/tasks/claim", &[], claim).await;
    assert_eq!(status, StatusCode::OK, "{task}");
    let path = format!("/v1/tasks/{}/steps", task["id"].as_str().unwrap());
    let step = json!({"lease_token": task["lease_token"], "kind": "plan", "summary": "s", "progress": 1.5});
    let (status, body) = post(&sv, &path, &[], step).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["param"], "progress", "{body}");
}

/// `GET path` as an operator (the test supervisor has no admin token): the status and the
/// JSON answer.
async fn get(sv: &Arc<Supervisor>, path: &str) -> (StatusCode, Value) {
    send(sv, Request::get(path).body(Body::empty()).unwrap()).await
}

/// The ids of a task page, and its `next` cursor.
fn ids_and_next(page: &Value) -> (Vec<String>, Option<String>) {
    let ids = page["tasks"]
        .as_array()
        .unwrap_or_else(|| panic!("no tasks in {page}"))
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect();
    (ids, page["next"].as_str().map(str::to_owned))
}

#[tokio::test]
async fn tasks_are_listed_newest_first_unless_asked_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let sv = supervisor(&dir);
    for id in ["t1", "t2", "t3", "t4", "t5"] {
        let (status, task) = post(&sv, "/v1/tasks", &[], json!({"agent": "a", "id": id})).await;
        assert_eq!(status, StatusCode::CREATED, "{task}");
    }
    // Newest first, page by page, each task once.
    let mut seen = Vec::new();
    let mut path = "/v1/tasks?limit=2".to_owned();
    loop {
        let (status, page) = get(&sv, &path).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let (ids, next) = ids_and_next(&page);
        seen.extend(ids);
        match next {
            Some(next) => path = format!("/v1/tasks?limit=2&cursor={next}"),
            None => break,
        }
    }
    assert_eq!(seen, ["t5", "t4", "t3", "t2", "t1"]);
    // Oldest first when asked; its cursor continues oldest first.
    let (_, page) = get(&sv, "/v1/tasks?order=asc&limit=2").await;
    let (ids, next) = ids_and_next(&page);
    assert_eq!(ids, ["t1", "t2"]);
    let next = next.unwrap();
    let (_, page) = get(&sv, &format!("/v1/tasks?order=asc&limit=2&cursor={next}")).await;
    assert_eq!(ids_and_next(&page).0, ["t3", "t4"]);
    // That cursor in the other order would skip or repeat tasks: refused.
    let (status, body) = get(&sv, &format!("/v1/tasks?order=desc&cursor={next}")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["param"], "cursor", "{body}");
    assert!(openai_error(&body, "invalid_value").contains("same `order`"));
}

#[tokio::test]
async fn a_task_list_limit_out_of_range_or_an_unknown_order_is_a_400_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let sv = supervisor(&dir);
    for (query, param, says) in [
        ("limit=0", "limit", "from 1 to 1000"),
        ("limit=1001", "limit", "from 1 to 1000"),
        (
            "limit=abc",
            "limit",
            "limit abc is not a number from 1 to 1000",
        ),
        ("limit=-1", "limit", "from 1 to 1000"),
        ("order=newest", "order", "desc (newest first) or asc"),
    ] {
        for list in ["/v1/tasks", "/v1/dlq"] {
            let (status, body) = get(&sv, &format!("{list}?{query}")).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{list}?{query}: {body}");
            assert_eq!(body["error"]["param"], param, "{body}");
            let message = openai_error(&body, "invalid_value");
            assert!(message.contains(says), "{message}");
        }
    }
    let (status, body) = get(&sv, "/v1/tasks?limit=1000").await;
    assert_eq!(status, StatusCode::OK, "{body}");
}
