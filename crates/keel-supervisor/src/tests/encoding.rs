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
fn task_json_names_states_for_users_and_redacted_hides_the_token() {
    let world = World::in_state(TaskState::Running);
    let json = serde_json::to_value(world.task()).unwrap();
    assert_eq!(json["state"], "running");
    assert_eq!(json["lease"]["token"], "tok-2");
    let shown = serde_json::to_value(world.task().redacted()).unwrap();
    assert_eq!(shown["lease"]["worker"], "w1");
    assert!(shown["lease"].get("token").is_none());
    let back: Task = serde_json::from_value(json).unwrap();
    assert_eq!(&back, world.task());
    assert_eq!(
        serde_json::to_value(TaskState::AwaitingHuman).unwrap(),
        "awaiting_human"
    );
    assert_eq!(serde_json::to_value(Directive::Handoff).unwrap(), "handoff");
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
