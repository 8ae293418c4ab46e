//! The state table: what each command does in each state.

use super::*;

/// What a command does in a state: the events it appends and the state it leaves, or the
/// status it is refused with.
enum Expect {
    Ok(&'static [&'static str], TaskState),
    Refused(u16),
}

#[test]
fn state_table() {
    use ApprovalDecision::{Approve, Deny};
    use Expect::{Ok, Refused};
    use TaskState::{AwaitingHuman, Cancelled, Dead, Queued, Running, Succeeded};
    type Build = fn(&World) -> Command;
    let wrong = |_: &World| heartbeat("not-the-token");
    let table: Vec<(TaskState, &str, Build, Expect)> = vec![
        (Queued, "create again", |_| create(3), Refused(409)),
        (
            Queued,
            "claim",
            |_| claim("w1"),
            Ok(&["task_claimed"], Running),
        ),
        (Queued, "heartbeat without lease", wrong, Refused(409)),
        (
            Queued,
            "complete without lease",
            |_| complete("x"),
            Refused(409),
        ),
        (
            Queued,
            "cancel",
            |_| Command::Cancel { reason: None },
            Ok(&["task_cancelled"], Cancelled),
        ),
        (
            Queued,
            "requeue",
            |_| Command::Requeue { reason: None },
            Refused(409),
        ),
        (
            Queued,
            "request approval",
            |_| request_approval(None, ApprovalDefault::Deny),
            Ok(&["approval_requested"], AwaitingHuman),
        ),
        (
            Queued,
            "request approval with a token",
            |_| request_approval(Some("x"), ApprovalDefault::Deny),
            Refused(409),
        ),
        (
            Queued,
            "decide approval",
            |_| decide_approval("ap1", Approve),
            Refused(409),
        ),
        (
            Queued,
            "dlq requeue",
            |_| Command::DlqRequeue {
                by: "op".into(),
                note: None,
            },
            Refused(409),
        ),
        (
            Queued,
            "expire lease",
            |_| Command::ExpireLease,
            Ok(&[], Queued),
        ),
        (
            Queued,
            "check deadline",
            |_| Command::CheckDeadline,
            Ok(&[], Queued),
        ),
        (Running, "claim", |_| claim("w2"), Refused(409)),
        (
            Running,
            "heartbeat",
            |w| heartbeat(&w.token()),
            Ok(&[], Running),
        ),
        (Running, "wrong token", wrong, Refused(409)),
        (
            Running,
            "step",
            |w| step(&w.token()),
            Ok(&["step_recorded"], Running),
        ),
        (
            Running,
            "checkpoint",
            |w| checkpoint(&w.token()),
            Ok(&["checkpoint_saved"], Running),
        ),
        (
            Running,
            "complete",
            |w| complete(&w.token()),
            Ok(&["task_succeeded"], Succeeded),
        ),
        (
            Running,
            "fail retryable",
            |w| fail(&w.token(), true),
            Ok(&["task_failed", "task_requeued"], Queued),
        ),
        (
            Running,
            "fail fatal",
            |w| fail(&w.token(), false),
            Ok(&["task_failed", "task_dead"], Dead),
        ),
        (
            Running,
            "requeue",
            |_| Command::Requeue { reason: None },
            Ok(&["task_requeued"], Queued),
        ),
        (
            Running,
            "cancel",
            |_| Command::Cancel { reason: None },
            Ok(&["task_cancelled"], Cancelled),
        ),
        (
            Running,
            "request approval",
            |w| request_approval(Some(&w.token()), ApprovalDefault::Deny),
            Ok(&["approval_requested"], AwaitingHuman),
        ),
        (
            Running,
            "request approval without token",
            |_| request_approval(None, ApprovalDefault::Deny),
            Refused(409),
        ),
        (
            Running,
            "expire lease too early",
            |_| Command::ExpireLease,
            Ok(&[], Running),
        ),
        (
            Running,
            "dlq discard",
            |_| Command::DlqDiscard {
                by: "op".into(),
                note: None,
            },
            Refused(409),
        ),
        (
            Running,
            "step with progress above 1",
            |w| Command::Step {
                token: w.token(),
                kind: "k".into(),
                summary: String::new(),
                progress: Some(1.5),
                confidence: None,
            },
            Refused(422),
        ),
        (
            Running,
            "step with NaN confidence",
            |w| Command::Step {
                token: w.token(),
                kind: "k".into(),
                summary: String::new(),
                progress: None,
                confidence: Some(f64::NAN),
            },
            Refused(422),
        ),
        (
            Running,
            "checkpoint without hash",
            |w| Command::Checkpoint {
                token: w.token(),
                label: None,
                state_hash: String::new(),
                size: 0,
            },
            Refused(422),
        ),
        (
            Succeeded,
            "cancel",
            |_| Command::Cancel { reason: None },
            Refused(409),
        ),
        (
            Succeeded,
            "requeue",
            |_| Command::Requeue { reason: None },
            Refused(409),
        ),
        (
            Succeeded,
            "complete with the old token",
            |_| complete("tok-2"),
            Refused(409),
        ),
        (
            Succeeded,
            "dlq discard",
            |_| Command::DlqDiscard {
                by: "op".into(),
                note: None,
            },
            Refused(409),
        ),
        (
            Dead,
            "dlq requeue",
            |_| Command::DlqRequeue {
                by: "op".into(),
                note: None,
            },
            Ok(&["task_requeued"], Queued),
        ),
        (
            Dead,
            "dlq discard",
            |_| Command::DlqDiscard {
                by: "op".into(),
                note: None,
            },
            Ok(&["task_cancelled"], Cancelled),
        ),
        (
            Dead,
            "requeue",
            |_| Command::Requeue {
                reason: Some("fixed the tool".into()),
            },
            Ok(&["task_requeued"], Queued),
        ),
        (
            Dead,
            "cancel",
            |_| Command::Cancel { reason: None },
            Refused(409),
        ),
        (Dead, "claim", |_| claim("w2"), Refused(409)),
        (
            Dead,
            "check deadline",
            |_| Command::CheckDeadline,
            Ok(&[], Dead),
        ),
        (
            AwaitingHuman,
            "approve",
            |_| decide_approval("ap1", Approve),
            Ok(&["approval_decided"], Queued),
        ),
        (
            AwaitingHuman,
            "deny",
            |_| decide_approval("ap1", Deny),
            Ok(&["approval_decided", "task_dead"], Dead),
        ),
        (
            AwaitingHuman,
            "decide another approval",
            |_| decide_approval("ap2", Approve),
            Refused(404),
        ),
        (AwaitingHuman, "claim", |_| claim("w1"), Refused(409)),
        (
            AwaitingHuman,
            "request a second approval",
            |_| request_approval(None, ApprovalDefault::Deny),
            Refused(409),
        ),
        (
            AwaitingHuman,
            "cancel",
            |_| Command::Cancel { reason: None },
            Ok(&["task_cancelled"], Cancelled),
        ),
        (
            AwaitingHuman,
            "expire approval too early",
            |_| Command::ExpireApproval,
            Ok(&[], AwaitingHuman),
        ),
        (
            Cancelled,
            "cancel",
            |_| Command::Cancel { reason: None },
            Refused(409),
        ),
        (Cancelled, "claim", |_| claim("w1"), Refused(409)),
        (Cancelled, "heartbeat without lease", wrong, Refused(409)),
        (
            Cancelled,
            "requeue",
            |_| Command::Requeue { reason: None },
            Refused(409),
        ),
    ];
    for (state, what, build, expect) in table {
        let mut world = World::in_state(state);
        let before = world.task().clone();
        let command = build(&world);
        match (world.run(command), expect) {
            (Result::Ok(decision), Ok(want_kinds, want_state)) => {
                assert_eq!(kinds(&decision), want_kinds, "{state} / {what}");
                assert_eq!(world.task().state, want_state, "{state} / {what}");
            }
            (Err(error), Refused(status)) => {
                assert_eq!(error.status(), status, "{state} / {what}: {error}");
                assert_eq!(
                    world.task(),
                    &before,
                    "{state} / {what}: refused but changed"
                );
            }
            (Result::Ok(decision), Refused(status)) => {
                panic!(
                    "{state} / {what}: accepted with {:?}, wanted {status}",
                    kinds(&decision)
                )
            }
            (Err(error), Ok(..)) => panic!("{state} / {what}: refused: {error}"),
        }
    }
}

#[test]
fn commands_on_a_missing_task_are_not_found_except_create() {
    let mut world = World::new();
    for command in [
        claim("w1"),
        heartbeat("x"),
        Command::Cancel { reason: None },
        Command::ExpireLease,
    ] {
        assert_eq!(world.run(command).unwrap_err().status(), 404);
    }
    let decision = world.ok(create(3));
    assert_eq!(kinds(&decision), ["task_created"]);
    let task = world.task();
    assert_eq!(
        (task.state, task.version, task.created_at_ms),
        (TaskState::Queued, 1, START)
    );
}

#[test]
fn create_refuses_limits_out_of_range() {
    let mut world = World::new();
    let mut bad = |command: Command| world.run(command).unwrap_err();
    assert!(matches!(
        bad(create(0)),
        TaskError::Invalid {
            field: "max_attempts",
            ..
        }
    ));
    let past = Command::Create {
        id: "t1".into(),
        agent: "a".into(),
        input: Value::Null,
        deadline_ms: Some(START),
        max_attempts: 1,
        max_steps: None,
    };
    assert!(matches!(
        bad(past),
        TaskError::Invalid {
            field: "deadline",
            ..
        }
    ));
    let no_steps = Command::Create {
        id: "t1".into(),
        agent: "a".into(),
        input: Value::Null,
        deadline_ms: None,
        max_attempts: 1,
        max_steps: Some(0),
    };
    assert!(matches!(
        bad(no_steps),
        TaskError::Invalid {
            field: "max_steps",
            ..
        }
    ));
}

#[test]
fn create_refuses_ids_a_url_or_a_table_cannot_carry() {
    let with_id = |id: String| Command::Create {
        id,
        agent: "a".into(),
        input: Value::Null,
        deadline_ms: None,
        max_attempts: 1,
        max_steps: None,
    };
    for id in [
        String::new(),
        "claim".to_owned(),
        ".".to_owned(),
        "..".to_owned(),
        "two\nlines".to_owned(),
        "x".repeat(257),
    ] {
        let mut world = World::new();
        let error = world.run(with_id(id.clone())).unwrap_err();
        assert!(
            matches!(error, TaskError::Invalid { field: "id", .. }),
            "{id:?}: {error:?}"
        );
    }
    for id in ["ticket-1234", "a/b c", "x.y", "claims", &"x".repeat(256)] {
        let mut world = World::new();
        world.ok(with_id(id.to_owned()));
    }
}
