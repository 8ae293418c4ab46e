//! The service over a real SQLite store: retention, metrics, idempotency.

use std::sync::Arc;
use std::time::Duration;

use keel_store::{Durability, EventQuery, SqliteStore, TaskStore};
use prometheus_client::registry::Registry;
use serde_json::json;

use super::metrics::SupervisorMetrics;
use super::{Idem, Supervisor, SupervisorSettings, public};
use crate::command::Command;

fn open(dir: &tempfile::TempDir) -> Arc<dyn TaskStore> {
    Arc::new(SqliteStore::open(&dir.path().join("keel.db"), Durability::Relaxed).unwrap())
}

fn create(id: &str) -> Command {
    Command::Create {
        id: id.into(),
        agent: "a".into(),
        input: json!({}),
        deadline_ms: None,
        max_attempts: 3,
        max_steps: None,
    }
}

/// Runs a task through claim, `checkpoints` checkpoints and complete.
async fn finish(sv: &Supervisor, id: &str, checkpoints: usize) {
    sv.create(create(id), None).await.unwrap();
    let claimed = sv
        .claim("a", "w", Duration::from_secs(30), None)
        .await
        .unwrap()
        .unwrap();
    let token = claimed["lease_token"].as_str().unwrap().to_owned();
    for n in 0..checkpoints {
        let state = serde_json::to_vec(&json!({"n": n})).unwrap();
        let command = Command::Checkpoint {
            token: token.clone(),
            label: None,
            state_hash: keel_store::blob_hash(&state),
            size: state.len() as u64,
        };
        sv.run(id, &command, None, Some(state.into()), |t, _| public(t))
            .await
            .unwrap();
    }
    let done = Command::Complete {
        token,
        output: json!("ok"),
        confidence: Some(0.25 + 0.5 * (checkpoints % 2) as f64),
    };
    sv.run(id, &done, None, None, |t, _| public(t))
        .await
        .unwrap();
}

#[tokio::test]
async fn retention_prunes_finished_tasks_and_old_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let settings = SupervisorSettings {
        keep_checkpoints: Some(1),
        ..SupervisorSettings::default()
    };
    let sv = Supervisor::new(Arc::clone(&store), settings);
    finish(&sv, "t1", 3).await;
    assert_eq!(store.stats().await.unwrap().blobs, 3);
    let report = sv.prune().await.unwrap().unwrap();
    assert_eq!(report.checkpoints, 2);
    assert_eq!(store.stats().await.unwrap().blobs, 1);
    // With a retention of 1ms, the finished task itself goes; the chain still verifies.
    let settings = SupervisorSettings {
        retention: Some(Duration::from_millis(1)),
        ..SupervisorSettings::default()
    };
    let sv = Supervisor::new(Arc::clone(&store), settings);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let report = sv.prune().await.unwrap().unwrap();
    assert_eq!(report.tasks, 1);
    assert!(store.task("t1").await.unwrap().is_none());
    assert_eq!(
        store.verify().await.unwrap(),
        keel_store::Verify::Intact {
            events: store.events(EventQuery::default()).await.unwrap().len() as u64
        }
    );
}

#[tokio::test]
async fn nothing_is_pruned_without_a_policy() {
    let dir = tempfile::tempdir().unwrap();
    let sv = Supervisor::new(open(&dir), SupervisorSettings::default());
    finish(&sv, "t1", 2).await;
    assert!(sv.prune().await.unwrap().is_none());
}

#[tokio::test]
async fn finished_tasks_are_counted_once_with_their_steps() {
    let dir = tempfile::tempdir().unwrap();
    let mut registry = Registry::default();
    let metrics = SupervisorMetrics::register(&mut registry);
    let sv =
        Supervisor::new(open(&dir), SupervisorSettings::default()).with_metrics(metrics.clone());
    finish(&sv, "t1", 1).await;
    finish(&sv, "t2", 0).await;
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("keel_tasks_total{agent=\"a\",outcome=\"succeeded\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("keel_task_steps_count{agent=\"a\"} 2"),
        "{text}"
    );
    // Confidence 0.75 (t1) and 0.25 (t2): one in the 0.3 bucket, both by 0.8.
    assert!(
        text.contains("keel_task_confidence_bucket{le=\"0.3\",agent=\"a\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("keel_task_confidence_bucket{le=\"0.8\",agent=\"a\"} 2"),
        "{text}"
    );
    metrics.set_depths(&[("dead".into(), 4), ("awaiting_human".into(), 1)]);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(text.contains("keel_dlq_depth 4"), "{text}");
    assert!(text.contains("keel_approvals_pending 1"), "{text}");
}

#[tokio::test]
async fn a_repeated_create_with_the_same_key_returns_the_first_task() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let sv = Supervisor::new(Arc::clone(&store), SupervisorSettings::default());
    let idem = || Some(Idem::new("create a", "k1", json!({})));
    let first = sv.create(create("t1"), idem()).await.unwrap();
    let second = sv.create(create("t2"), idem()).await.unwrap();
    assert_eq!(first.body, second.body);
    assert!(
        store.task("t2").await.unwrap().is_none(),
        "the repeat created a second task"
    );
}

#[tokio::test]
async fn a_repeated_key_with_another_request_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let sv = Supervisor::new(Arc::clone(&store), SupervisorSettings::default());
    let first = Idem::new("create a", "k1", json!({"agent": "a", "input": {"n": 1}}));
    sv.create(create("t1"), Some(first)).await.unwrap();
    // The same JSON with its keys in another order is the same request.
    let same = Idem::new("create a", "k1", json!({"input": {"n": 1}, "agent": "a"}));
    let again = sv.create(create("t2"), Some(same)).await.unwrap();
    assert_eq!(again.body["id"], "t1");
    let other = Idem::new("create a", "k1", json!({"agent": "a", "input": {"n": 2}}));
    let err = sv.create(create("t3"), Some(other)).await.unwrap_err();
    assert_eq!(
        (err.status.as_u16(), err.code, err.param),
        (422, Some("idempotency_key_reused"), Some("idempotency_key"))
    );
    for id in ["t2", "t3"] {
        assert!(store.task(id).await.unwrap().is_none(), "{id} was created");
    }
}

#[tokio::test]
async fn a_key_recorded_before_request_hashes_still_returns_its_answer() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    // A record as an older keel wrote it: no request hash.
    let row = keel_store::TaskRow {
        id: "old".into(),
        agent: "a".into(),
        state: "queued".into(),
        version: 1,
        snapshot: json!({}),
        created_at_ms: 1,
        updated_at_ms: 1,
        lease_expires_at_ms: None,
        approval_expires_at_ms: None,
        deadline_at_ms: None,
    };
    let record = keel_store::IdempotencyRecord {
        scope: "create a".into(),
        key: "k1".into(),
        status: 201,
        body: json!({"id": "old"}),
        request_hash: None,
    };
    store
        .write_task(keel_store::TaskWrite {
            row,
            expected_version: None,
            events: vec![keel_core::NewEvent::new(
                keel_core::EventKind::TaskCreated,
                Some("old".into()),
                json!({}),
            )],
            blobs: Vec::new(),
            blob_refs: Vec::new(),
            idempotency: Some(record),
        })
        .await
        .unwrap();
    let sv = Supervisor::new(Arc::clone(&store), SupervisorSettings::default());
    let repeat = Idem::new(
        "create a",
        "k1",
        json!({"agent": "a", "input": {"any": true}}),
    );
    let answer = sv.replay(Some(&repeat)).await.unwrap().unwrap();
    assert_eq!((answer.status, answer.body), (201, json!({"id": "old"})));
}

#[tokio::test]
async fn retention_forgets_old_idempotency_keys() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let sv = Supervisor::new(Arc::clone(&store), SupervisorSettings::default());
    let idem = Some(Idem::new("create a", "k1", json!({})));
    sv.create(create("t1"), idem).await.unwrap();
    assert!(store.idempotent("create a", "k1").await.unwrap().is_some());
    let settings = SupervisorSettings {
        retention: Some(Duration::from_millis(1)),
        ..SupervisorSettings::default()
    };
    let sv = Supervisor::new(Arc::clone(&store), settings);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let report = sv.prune().await.unwrap().unwrap();
    assert_eq!(report.idempotency_keys, 1);
    assert!(store.idempotent("create a", "k1").await.unwrap().is_none());
    assert!(
        store.task("t1").await.unwrap().is_some(),
        "a queued task is never pruned"
    );
}

#[tokio::test]
async fn a_repeated_claim_gets_the_same_task_and_lease() {
    let dir = tempfile::tempdir().unwrap();
    let sv = Supervisor::new(open(&dir), SupervisorSettings::default());
    sv.create(create("t1"), None).await.unwrap();
    sv.create(create("t2"), None).await.unwrap();
    let idem = || Some(Idem::new("claim a", "c1", json!({})));
    let first = sv
        .claim("a", "w", Duration::from_secs(30), idem())
        .await
        .unwrap()
        .unwrap();
    let again = sv
        .claim("a", "w", Duration::from_secs(30), idem())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first, again);
    assert_eq!(first["id"], "t1");
    // Without the key, the next claim gets the next task.
    let next = sv
        .claim("a", "w", Duration::from_secs(30), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next["id"], "t2");
}

#[tokio::test]
async fn the_log_keeps_the_lease_token_s_hash_and_only_the_claim_answer_has_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let sv = Supervisor::new(Arc::clone(&store), SupervisorSettings::default());
    sv.create(create("t1"), None).await.unwrap();
    let claimed = sv
        .claim("a", "w", Duration::from_secs(30), None)
        .await
        .unwrap()
        .unwrap();
    let token = claimed["lease_token"].as_str().unwrap().to_owned();
    let events = store
        .events(EventQuery {
            task_id: Some("t1".into()),
            ..EventQuery::default()
        })
        .await
        .unwrap();
    let claim = events.iter().find(|e| e.kind == "task_claimed").unwrap();
    assert_eq!(claim.data["token_hash"], crate::token_hash(&token));
    let row = store.task("t1").await.unwrap().unwrap();
    for stored in [claim.data.to_string(), row.snapshot.to_string()] {
        assert!(!stored.contains(&token), "the token is stored: {stored}");
    }
    let done = Command::Complete {
        token,
        output: json!(1),
        confidence: None,
    };
    let after = sv.run("t1", &done, None, None, |t, _| public(t)).await;
    assert_eq!(after.unwrap().body["state"], "succeeded");
}

#[tokio::test]
async fn a_task_claimed_by_an_older_keel_keeps_its_token_working() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    // As an older keel wrote them: the token itself in `task_claimed` and in the snapshot.
    let created = crate::TaskEvent::Created(crate::event::Created {
        id: "old".into(),
        agent: "a".into(),
        input: json!({}),
        deadline_ms: None,
        max_attempts: 3,
        max_steps: None,
    });
    let now = super::now_ms();
    let claimed = json!({"worker": "w", "token": "old-token", "lease_ttl_ms": 60_000, "expires_at_ms": now + 60_000, "attempt": 1});
    let replayed = crate::TaskEvent::from_event("task_claimed", &claimed)
        .unwrap()
        .unwrap();
    let task = crate::fold(None, [&created, &replayed], now).unwrap();
    let mut snapshot = serde_json::to_value(&task).unwrap();
    let lease = snapshot["lease"].as_object_mut().unwrap();
    lease.remove("token_hash");
    lease.insert("token".into(), json!("old-token"));
    let mut row = super::row_of(&task).unwrap();
    row.snapshot = snapshot;
    let events = vec![
        created.to_new_event("old"),
        keel_core::NewEvent::new(
            keel_core::EventKind::TaskClaimed,
            Some("old".into()),
            claimed,
        ),
    ];
    store
        .write_task(keel_store::TaskWrite {
            row,
            expected_version: None,
            events,
            blobs: Vec::new(),
            blob_refs: Vec::new(),
            idempotency: None,
        })
        .await
        .unwrap();
    let sv = Supervisor::new(Arc::clone(&store), SupervisorSettings::default());
    let beat = |token: &str| Command::Heartbeat {
        token: token.into(),
    };
    let wrong = sv
        .run("old", &beat("other"), None, None, |t, _| public(t))
        .await;
    assert_eq!(wrong.unwrap_err().status.as_u16(), 409);
    sv.run("old", &beat("old-token"), None, None, |t, _| public(t))
        .await
        .unwrap();
    // The renewal rewrote the snapshot: now with the hash only.
    let row = store.task("old").await.unwrap().unwrap();
    assert!(
        !row.snapshot.to_string().contains("old-token"),
        "{}",
        row.snapshot
    );
    let done = Command::Complete {
        token: "old-token".into(),
        output: json!(1),
        confidence: None,
    };
    let after = sv.run("old", &done, None, None, |t, _| public(t)).await;
    assert_eq!(after.unwrap().body["state"], "succeeded");
}

#[tokio::test]
async fn steps_and_checkpoints_renew_the_lease() {
    let dir = tempfile::tempdir().unwrap();
    let sv = Supervisor::new(open(&dir), SupervisorSettings::default());
    sv.create(create("t1"), None).await.unwrap();
    let claimed = sv
        .claim("a", "w", Duration::from_millis(500), None)
        .await
        .unwrap()
        .unwrap();
    let token = claimed["lease_token"].as_str().unwrap().to_owned();
    let first_expiry = claimed["lease"]["expires_at_ms"].as_i64().unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let step = Command::Step {
        token,
        kind: "work".into(),
        summary: "s".into(),
        progress: None,
        confidence: None,
    };
    let after = sv
        .run("t1", &step, None, None, |t, _| public(t))
        .await
        .unwrap();
    let renewed = after.body["lease"]["expires_at_ms"].as_i64().unwrap();
    assert!(renewed > first_expiry, "{first_expiry} -> {renewed}");
}

/// A create of task `id` whose deadline is `deadline_ms`.
fn create_by(id: &str, deadline_ms: i64) -> Command {
    Command::Create {
        id: id.into(),
        agent: "a".into(),
        input: json!({}),
        deadline_ms: Some(deadline_ms),
        max_attempts: 3,
        max_steps: None,
    }
}

#[tokio::test]
async fn the_sweep_ends_unfinished_tasks_past_their_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let sv = Supervisor::new(Arc::clone(&store), SupervisorSettings::default());
    // A second's margin: the first sweep must come before any deadline on a busy machine.
    let soon = super::now_ms() + 1_000;
    // Running with a lease that outlasts its deadline (claimed while it is the only one
    // queued); queued and never claimed; waiting for a person.
    sv.create(create_by("running", soon), None).await.unwrap();
    let claimed = sv
        .claim("a", "w", Duration::from_secs(3600), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed["id"], "running");
    sv.create(create_by("queued", soon), None).await.unwrap();
    sv.create(create_by("waiting", soon), None).await.unwrap();
    let ask = Command::RequestApproval {
        asker: crate::Asker::Operator,
        approval_id: "apr_1".into(),
        reason: "a person decides".into(),
        context: json!({}),
        timeout_ms: 3_600_000,
        default: crate::task::ApprovalDefault::Escalate,
    };
    sv.run("waiting", &ask, None, None, |t, _| public(t))
        .await
        .unwrap();
    sv.create(create_by("later", super::now_ms() + 60_000), None)
        .await
        .unwrap();
    assert_eq!(sv.sweep().await.unwrap(), 0, "nothing is due yet");
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(
        store
            .expired_deadlines(super::now_ms(), 10)
            .await
            .unwrap()
            .len(),
        3
    );
    assert_eq!(sv.sweep().await.unwrap(), 3);
    for id in ["queued", "running", "waiting"] {
        let task = sv.get(id).await.unwrap();
        assert_eq!(task.state, crate::TaskState::Dead, "{id}");
        assert_eq!(
            task.last_error,
            Some(json!("task_timeout exceeded")),
            "{id}"
        );
        let row = store.task(id).await.unwrap().unwrap();
        assert_eq!(
            row.deadline_at_ms, None,
            "{id}: a dead task keeps no deadline"
        );
    }
    assert!(!sv.get("later").await.unwrap().state.is_final());
    let kinds: Vec<String> = store
        .events(EventQuery {
            task_id: Some("waiting".into()),
            ..EventQuery::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            "task_created",
            "approval_requested",
            "approval_decided",
            "task_failed",
            "task_dead"
        ]
    );
    // Nothing is left to do.
    assert!(
        store
            .expired_deadlines(super::now_ms(), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(sv.sweep().await.unwrap(), 0);
}

#[tokio::test]
async fn every_task_awaiting_a_human_is_found_past_the_first_page() {
    let dir = tempfile::tempdir().unwrap();
    let sv = Supervisor::new(open(&dir), SupervisorSettings::default());
    // One more than a page of the store's task list (1,000).
    for n in 0..1001 {
        let id = format!("t{n:04}");
        sv.create(create(&id), None).await.unwrap();
        let ask = Command::RequestApproval {
            asker: crate::Asker::Operator,
            approval_id: format!("apr_{n:04}"),
            reason: "a person decides".into(),
            context: json!({}),
            timeout_ms: 3_600_000,
            default: crate::task::ApprovalDefault::Escalate,
        };
        sv.run(&id, &ask, None, None, |t, _| public(t))
            .await
            .unwrap();
    }
    let waiting = super::http::awaiting(&sv).await.unwrap();
    assert_eq!(waiting.len(), 1001);
    assert!(
        waiting
            .iter()
            .any(|t| t.approval.as_ref().is_some_and(|a| a.id == "apr_1000"))
    );
}
