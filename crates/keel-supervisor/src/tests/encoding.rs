//! Events in the log and tasks and errors as callers see them.

use super::*;

#[test]
fn events_read_back_as_written() {
    let mut world = World::in_state(TaskState::Running);
    let token = world.token();
    let mut events = Vec::new();
    for command in [
        step(&token),
        checkpoint(&token),
        request_approval(Some(&token), ApprovalDefault::Escalate),
    ] {
        events.extend(world.ok(command).events);
    }
    world.advance(60_000);
    events.extend(world.ok(Command::ExpireApproval).events);
    events.extend(
        world
            .ok(decide_approval("ap1", ApprovalDecision::Deny))
            .events,
    );
    events.extend(
        world
            .ok(Command::DlqDiscard {
                by: "bob".into(),
                note: None,
            })
            .events,
    );
    for event in events {
        let kind = event.kind().as_str();
        let back = TaskEvent::from_event(kind, &event.to_data()).unwrap();
        assert_eq!(back.as_ref(), Some(&event), "{kind}");
        assert_eq!(event.to_new_event("t1").kind, event.kind());
    }
}

#[test]
fn gateway_events_do_not_change_task_state() {
    let data = json!({"model": "gpt", "tokens": 12});
    assert!(TaskEvent::from_event("llm_call", &data).unwrap().is_none());
    assert!(
        TaskEvent::from_event("backtracked", &data)
            .unwrap()
            .is_none()
    );
}

#[test]
fn unknown_kind_and_malformed_data_are_errors() {
    let unknown = TaskEvent::from_event("task_exploded", &json!({})).unwrap_err();
    assert_eq!(unknown.to_string(), "unknown event kind \"task_exploded\"");
    let malformed = TaskEvent::from_event("task_claimed", &json!({"worker": 1})).unwrap_err();
    assert!(
        malformed
            .to_string()
            .starts_with("data of task_claimed event")
    );
}

#[test]
fn alerts_from_elsewhere_read_back_and_change_nothing() {
    let world = World::in_state(TaskState::Queued);
    let alert = TaskEvent::from_event("alert_raised", &json!({"rule": "burn"}))
        .unwrap()
        .unwrap();
    let task = evolve(world.task.clone(), &alert, START);
    assert_eq!(task.version, world.task().version + 1);
    assert_eq!(task.state, TaskState::Queued);
}

#[test]
fn task_json_names_states_for_users_and_keeps_the_token_s_hash_only() {
    let world = World::in_state(TaskState::Running);
    let json = serde_json::to_value(world.task()).unwrap();
    assert_eq!(json["state"], "running");
    assert_eq!(json["lease"]["token_hash"], crate::token_hash("tok-2"));
    assert!(json["lease"].get("token").is_none(), "{json}");
    let shown = serde_json::to_value(world.task().redacted()).unwrap();
    assert_eq!(shown["lease"]["worker"], "w1");
    assert!(shown["lease"].get("token_hash").is_none(), "{shown}");
    let back: Task = serde_json::from_value(json).unwrap();
    assert_eq!(&back, world.task());
    assert_eq!(
        serde_json::to_value(TaskState::AwaitingHuman).unwrap(),
        "awaiting_human"
    );
    assert_eq!(serde_json::to_value(Directive::Handoff).unwrap(), "handoff");
}

#[test]
fn the_token_hash_is_sha256_hex() {
    assert_eq!(
        crate::token_hash("abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[test]
fn task_claimed_holds_the_hash_of_the_lease_token_not_the_token() {
    let mut world = World::in_state(TaskState::Queued);
    let claimed = world.ok(claim("w1"));
    let token = world.token();
    let data = claimed.events[0].to_data();
    assert_eq!(data["token_hash"], crate::token_hash(&token), "{data}");
    assert!(data.get("token").is_none(), "{data}");
    assert!(!data.to_string().contains(&token), "the token is in {data}");
    // The hash is no token: sent as one, it is refused.
    let hash = data["token_hash"].as_str().unwrap();
    assert_eq!(world.run(heartbeat(hash)).unwrap_err().status(), 409);
    assert_eq!(
        world.ok(heartbeat(&token)).directive,
        Some(Directive::Continue)
    );
}

/// `task_claimed` as keel wrote it before it kept only the token's hash.
fn claimed_with_the_token(token: &str) -> serde_json::Value {
    json!({"worker": "w1", "token": token, "lease_ttl_ms": TTL, "expires_at_ms": START + 30_000, "attempt": 1})
}

#[test]
fn a_log_with_the_token_in_task_claimed_replays_and_the_token_still_works() {
    let mut world = World::in_state(TaskState::Queued);
    let old = TaskEvent::from_event("task_claimed", &claimed_with_the_token("old-tok"))
        .unwrap()
        .unwrap();
    let TaskEvent::Claimed(read) = &old else {
        panic!("{old:?}")
    };
    assert_eq!(read.token_hash, crate::token_hash("old-tok"));
    // Written again, it holds the hash only.
    assert!(old.to_data().get("token").is_none());
    world.task = Some(evolve(world.task.take(), &old, START));
    assert_eq!(world.task().state, TaskState::Running);
    assert_eq!(world.run(heartbeat("other")).unwrap_err().status(), 409);
    assert_eq!(
        world.ok(heartbeat("old-tok")).directive,
        Some(Directive::Continue)
    );
    world.ok(complete("old-tok"));
    assert_eq!(world.task().state, TaskState::Succeeded);
}

#[test]
fn a_snapshot_with_the_token_in_its_lease_reads_back_with_the_hash() {
    let world = World::in_state(TaskState::Running);
    let mut old = serde_json::to_value(world.task()).unwrap();
    let lease = old["lease"].as_object_mut().unwrap();
    lease.remove("token_hash");
    lease.insert("token".into(), json!("old-tok"));
    let task: Task = serde_json::from_value(old).unwrap();
    let lease = task.lease.as_ref().unwrap();
    assert_eq!(lease.token_hash, crate::token_hash("old-tok"));
    assert!(renew(&task, "old-tok", START).is_ok());
    let again = serde_json::to_value(&task).unwrap();
    assert!(again["lease"].get("token").is_none(), "{again}");
}

#[test]
fn task_claimed_without_a_token_or_its_hash_is_malformed() {
    let mut data = claimed_with_the_token("x");
    data.as_object_mut().unwrap().remove("token");
    let err = TaskEvent::from_event("task_claimed", &data).unwrap_err();
    assert!(
        err.to_string().starts_with("data of task_claimed event"),
        "{err}"
    );
}

#[test]
fn errors_carry_facts_and_statuses() {
    let cases = [
        (TaskError::task_not_found("t9"), "task t9 not found", 404),
        (
            TaskError::Exists { task: "t1".into() },
            "task t1 already exists",
            409,
        ),
        (
            TaskError::StaleLease {
                task: "t1".into(),
                state: TaskState::Running,
            },
            "lease token is not the current lease of task t1, which is running",
            409,
        ),
        (
            TaskError::InvalidState {
                task: "t1".into(),
                state: TaskState::Cancelled,
                action: "complete",
            },
            "cannot complete task t1: it is cancelled",
            409,
        ),
        (
            TaskError::Invalid {
                field: "progress",
                message: "1.5 is not in 0..=1".into(),
            },
            "progress: 1.5 is not in 0..=1",
            422,
        ),
    ];
    for (error, message, status) in cases {
        assert_eq!(
            (error.to_string().as_str(), error.status()),
            (message, status)
        );
    }
}
