//! The worker protocol's scenarios: leases, retries, cancel, approvals, the DLQ, limits.

use super::*;

// === leases and retries ===

#[test]
fn happy_path_create_claim_step_checkpoint_complete() {
    let mut world = World::new();
    world.ok(create(3));
    let claimed = world.ok(claim("w1"));
    assert_eq!(claimed.directive, Some(Directive::Continue));
    let token = world.token();
    assert_eq!(
        world.task().lease.as_ref().unwrap().expires_at_ms,
        START + 30_000
    );
    assert_eq!(world.ok(step(&token)).directive, Some(Directive::Continue));
    assert_eq!(world.ok(checkpoint(&token)).directive, None);
    world.ok(step(&token));
    world.ok(checkpoint(&token));
    world.advance(10);
    world.ok(complete(&token));

    let task = world.task();
    assert_eq!(task.state, TaskState::Succeeded);
    assert_eq!(task.output, Some(json!({"answer": "rayleigh scattering"})));
    assert_eq!(task.confidence, Some(0.9));
    assert_eq!((task.attempts, task.steps, task.version), (1, 2, 7));
    assert_eq!(task.checkpoint.as_ref().map(|c| c.seq), Some(2));
    assert_eq!(task.lease, None);
    assert_eq!(task.updated_at_ms, START + 10);
}

#[test]
fn lost_lease_requeues_and_next_claim_resumes_from_checkpoint() {
    let mut world = World::new();
    world.ok(create(3));
    world.ok(claim("w1"));
    let old = world.token();
    world.ok(checkpoint(&old));
    let saved = world.task().checkpoint.clone();

    world.advance(TTL as i64);
    let expired = world.ok(Command::ExpireLease);
    assert_eq!(kinds(&expired), ["lease_expired"]);
    assert_eq!(world.task().state, TaskState::Queued);
    assert_eq!(world.task().lease, None);

    world.ok(claim("w2"));
    let task = world.task();
    assert_eq!((task.attempts, task.checkpoint.clone()), (2, saved));
    assert_eq!(task.lease.as_ref().unwrap().worker, "w2");
    assert_ne!(world.token(), old);
}

#[test]
fn heartbeat_that_wins_the_race_keeps_the_lease() {
    let mut world = World::new();
    world.ok(create(3));
    world.ok(claim("w1"));
    let token = world.token();
    world.advance(TTL as i64 - 1);
    let beat = world.ok(heartbeat(&token));
    assert!(beat.events.is_empty());
    assert_eq!(beat.directive, Some(Directive::Continue));
    world.task = Some(renew(world.task(), &token, world.now).unwrap());
    assert_eq!(world.task().version, 2, "a heartbeat is not an event");

    world.advance(2);
    assert!(world.ok(Command::ExpireLease).events.is_empty());
    assert_eq!(world.task().state, TaskState::Running);
}

#[test]
fn renew_extends_by_ttl_and_refuses_a_wrong_token() {
    let world = World::in_state(TaskState::Running);
    let renewed = renew(world.task(), &world.token(), START + 5_000).unwrap();
    assert_eq!(renewed.lease.unwrap().expires_at_ms, START + 5_000 + 30_000);
    let error = renew(world.task(), "nope", START).unwrap_err();
    assert_eq!(error.status(), 409);
}

#[test]
fn lease_lost_on_the_last_attempt_sends_the_task_to_the_dlq() {
    let mut world = World::new();
    world.ok(create(2));
    for _ in 0..2 {
        world.ok(claim("w1"));
        world.advance(TTL as i64);
        world.ok(Command::ExpireLease);
    }
    let task = world.task();
    assert_eq!(task.state, TaskState::Dead);
    assert_eq!(
        task.last_error,
        Some(json!("lease expired after 2 attempts"))
    );
}

#[test]
fn a_single_attempt_s_lost_lease_says_attempt() {
    let mut world = World::new();
    world.ok(create(1));
    world.ok(claim("w1"));
    world.advance(TTL as i64);
    world.ok(Command::ExpireLease);
    assert_eq!(
        world.task().last_error,
        Some(json!("lease expired after 1 attempt"))
    );
}

#[test]
fn retryable_failure_out_of_attempts_is_dead_with_last_error() {
    let mut world = World::new();
    world.ok(create(2));
    world.ok(claim("w1"));
    world.ok(checkpoint(&world.token()));
    let first = world.ok(fail(&world.token(), true));
    assert_eq!(kinds(&first), ["task_failed", "task_requeued"]);
    assert!(
        world.task().checkpoint.is_some(),
        "retry keeps the checkpoint"
    );
    world.ok(claim("w2"));
    let second = world.ok(fail(&world.token(), true));
    assert_eq!(kinds(&second), ["task_failed", "task_dead"]);
    assert!(matches!(
        &second.events[1],
        TaskEvent::Dead(dead) if dead.reason == DeadReason::OutOfAttempts && dead.attempts == 2
    ));
    let task = world.task();
    assert_eq!(task.state, TaskState::Dead);
    assert_eq!(task.last_error, Some(json!({"message": "tool crashed"})));
}

#[test]
fn stale_token_is_409_and_changes_nothing() {
    let mut world = World::new();
    world.ok(create(3));
    world.ok(claim("w1"));
    let old = world.token();
    world.advance(TTL as i64);
    world.ok(Command::ExpireLease);
    world.ok(claim("w2"));
    let before = world.task().clone();
    for command in [
        heartbeat(&old),
        step(&old),
        checkpoint(&old),
        complete(&old),
        fail(&old, true),
    ] {
        let error = world.run(command).unwrap_err();
        assert!(matches!(
            error,
            TaskError::StaleLease {
                state: TaskState::Running,
                ..
            }
        ));
        assert_eq!(error.status(), 409);
    }
    assert_eq!(world.task(), &before);
}

#[test]
fn complete_after_cancel_is_409() {
    let mut world = World::in_state(TaskState::Running);
    let token = world.token();
    world.ok(Command::Cancel {
        reason: Some("user gave up".into()),
    });
    assert!(world.task().cancel_requested);
    for command in [complete(&token), fail(&token, true), checkpoint(&token)] {
        let error = world.run(command).unwrap_err();
        assert!(
            matches!(
                error,
                TaskError::InvalidState {
                    state: TaskState::Cancelled,
                    ..
                }
            ),
            "{error}"
        );
        assert_eq!(error.status(), 409);
    }
    assert_eq!(world.task().state, TaskState::Cancelled);
}

#[test]
fn heartbeat_and_step_after_cancel_answer_cancel() {
    let mut world = World::in_state(TaskState::Running);
    let token = world.token();
    world.ok(Command::Cancel { reason: None });
    let version = world.task().version;
    for command in [heartbeat(&token), step(&token)] {
        let decision = world.ok(command);
        assert!(decision.events.is_empty());
        assert_eq!(decision.directive, Some(Directive::Cancel));
    }
    assert_eq!(world.task().version, version);
    assert_eq!(
        renew(world.task(), &token, world.now).unwrap_err().status(),
        409
    );
    assert_eq!(world.run(heartbeat("other")).unwrap_err().status(), 409);
}

// === approvals ===

#[test]
fn approved_task_is_queued_again_and_resumes_from_its_checkpoint() {
    let mut world = World::in_state(TaskState::Running);
    let token = world.token();
    world.ok(checkpoint(&token));
    world.ok(request_approval(Some(&token), ApprovalDefault::Deny));
    let task = world.task();
    assert_eq!(
        (task.state, task.lease.is_none()),
        (TaskState::AwaitingHuman, true)
    );
    assert_eq!(task.approval.as_ref().unwrap().requested_at_ms, START);
    assert_eq!(world.run(heartbeat(&token)).unwrap_err().status(), 409);

    world.ok(decide_approval("ap1", ApprovalDecision::Approve));
    assert_eq!(world.task().state, TaskState::Queued);
    assert_eq!(world.task().approval, None);
    world.ok(claim("w2"));
    assert_eq!(world.task().checkpoint.as_ref().map(|c| c.seq), Some(1));
    assert_eq!(
        world
            .run(decide_approval("ap1", ApprovalDecision::Approve))
            .unwrap_err()
            .status(),
        409,
        "deciding twice is a conflict"
    );
}

#[test]
fn waiting_for_a_person_does_not_use_up_an_attempt() {
    let mut world = World::new();
    world.ok(create(1));
    // Asked and approved twice, the one attempt goes on each time.
    for _ in 0..2 {
        world.ok(claim("w1"));
        assert_eq!(world.task().attempts, 1);
        world.ok(request_approval(
            Some(&world.token()),
            ApprovalDefault::Deny,
        ));
        world.ok(decide_approval("ap1", ApprovalDecision::Approve));
        assert!(world.task().resumes_attempt);
    }
    let resumed = world.ok(claim("w1"));
    assert!(matches!(&resumed.events[0], TaskEvent::Claimed(c) if c.resumed));
    assert_eq!(world.task().attempts, 1, "1 of 1, not 3 of 1");
    assert!(!world.task().resumes_attempt);
    // A failure of that attempt is still the task's last.
    let failed = world.ok(fail(&world.token(), true));
    assert_eq!(kinds(&failed), ["task_failed", "task_dead"]);
}

#[test]
fn an_approval_asked_of_a_queued_task_does_not_give_back_its_failed_attempt() {
    let mut world = World::new();
    world.ok(create(2));
    world.ok(claim("w1"));
    world.ok(fail(&world.token(), true));
    assert_eq!(world.task().state, TaskState::Queued);
    world.ok(request_approval(None, ApprovalDefault::Deny));
    world.ok(decide_approval("ap1", ApprovalDecision::Approve));
    let claimed = world.ok(claim("w2"));
    assert_eq!(
        world.task().attempts,
        2,
        "attempt 1 failed; this is attempt 2"
    );
    assert!(matches!(
        &claimed.events[0],
        TaskEvent::Claimed(c) if !c.resumed
    ));
}

#[test]
fn a_task_approved_before_any_claim_starts_its_first_attempt() {
    let mut world = World::new();
    world.ok(create(2));
    world.ok(request_approval(None, ApprovalDefault::Deny));
    world.ok(decide_approval("ap1", ApprovalDecision::Approve));
    world.ok(claim("w1"));
    assert_eq!(world.task().attempts, 1);
}

/// keel's own approval request (a tool call through keel that needs a person).
fn asked_by_keel() -> Command {
    Command::RequestApproval {
        asker: Asker::Keel,
        approval_id: "ap1".into(),
        reason: "refund far above the usual".into(),
        context: json!({}),
        timeout_ms: 60_000,
        default: ApprovalDefault::Deny,
    }
}

#[test]
fn keel_asks_for_a_running_task_on_behalf_of_its_holder_without_its_token() {
    let mut world = World::in_state(TaskState::Running);
    let token = world.token();
    let asked = world.ok(asked_by_keel());
    let TaskEvent::ApprovalRequested(requested) = &asked.events[0] else {
        panic!("{asked:?}")
    };
    assert_eq!(requested.worker.as_deref(), Some("w1"));
    let task = world.task();
    assert_eq!(
        (task.state, task.lease.is_none()),
        (TaskState::AwaitingHuman, true)
    );
    assert_eq!(world.run(heartbeat(&token)).unwrap_err().status(), 409);
    // Of a queued task too; an operator may not put a running task on hold.
    let mut queued = World::in_state(TaskState::Queued);
    assert_eq!(kinds(&queued.ok(asked_by_keel())), ["approval_requested"]);
    let mut running = World::in_state(TaskState::Running);
    let by_operator = running.run(request_approval(None, ApprovalDefault::Deny));
    assert_eq!(by_operator.unwrap_err().status(), 409);
    let mut cancelled = World::in_state(TaskState::Cancelled);
    assert_eq!(cancelled.run(asked_by_keel()).unwrap_err().status(), 409);
}

#[test]
fn denied_task_is_dead_with_who_and_why() {
    let mut world = World::in_state(TaskState::AwaitingHuman);
    world.ok(decide_approval("ap1", ApprovalDecision::Deny));
    let task = world.task();
    assert_eq!(task.state, TaskState::Dead);
    assert_eq!(
        task.last_error,
        Some(json!({"reason": "denied", "by": "alice", "note": "checked"}))
    );
}

#[test]
fn approval_timeout_with_default_deny_denies_by_timeout() {
    let mut world = World::in_state(TaskState::AwaitingHuman);
    world.advance(59_999);
    assert!(world.ok(Command::ExpireApproval).events.is_empty());
    world.advance(1);
    let expired = world.ok(Command::ExpireApproval);
    assert_eq!(kinds(&expired), ["approval_decided", "task_dead"]);
    assert!(matches!(&expired.events[0], TaskEvent::ApprovalDecided(d) if d.by == "timeout"));
    assert!(
        matches!(&expired.events[1], TaskEvent::Dead(d) if d.reason == DeadReason::ApprovalTimeout)
    );
    assert_eq!(world.task().state, TaskState::Dead);
}

#[test]
fn approval_timeout_with_default_escalate_alerts_once_and_keeps_waiting() {
    let mut world = World::new();
    world.ok(create(3));
    world.ok(request_approval(None, ApprovalDefault::Escalate));
    world.advance(60_000);
    let first = world.ok(Command::ExpireApproval);
    assert_eq!(kinds(&first), ["alert_raised"]);
    assert!(matches!(&first.events[0], TaskEvent::AlertRaised(a) if a.severity == "warning"));
    assert!(world.task().approval.as_ref().unwrap().escalated);
    assert_eq!(world.task().state, TaskState::AwaitingHuman);

    world.advance(60_000);
    assert!(
        world.ok(Command::ExpireApproval).events.is_empty(),
        "escalates only once"
    );
    world.ok(decide_approval("ap1", ApprovalDecision::Approve));
    assert_eq!(world.task().state, TaskState::Queued);
}

#[test]
fn a_handoff_tells_the_holder_and_waits_for_a_person() {
    let mut world = World::in_state(TaskState::Running);
    let token = world.token();
    let handoff = world.ok(Command::Handoff {
        approval_id: "ho1".into(),
        reason: "loop detected".into(),
        context: json!({"kind": "loop"}),
        timeout_ms: 60_000,
    });
    assert_eq!(kinds(&handoff), ["approval_requested"]);
    assert!(
        matches!(&handoff.events[0], TaskEvent::ApprovalRequested(a) if a.handoff && a.worker.as_deref() == Some("w1"))
    );
    assert_eq!(world.task().state, TaskState::AwaitingHuman);
    assert!(world.task().approval.as_ref().unwrap().handoff);
    // The holder is told, without events, and can no longer finish the task.
    for command in [heartbeat(&token), step(&token)] {
        let told = world.ok(command);
        assert_eq!(told.directive, Some(Directive::Handoff));
        assert!(told.events.is_empty());
    }
    assert_eq!(world.run(complete(&token)).unwrap_err().status(), 409);
    assert_eq!(
        renew(world.task(), &token, START).unwrap_err().status(),
        409
    );
    // A second handoff of a waiting task is refused.
    let again = world.run(Command::Handoff {
        approval_id: "ho2".into(),
        reason: "r".into(),
        context: json!({}),
        timeout_ms: 1,
    });
    assert_eq!(again.unwrap_err().status(), 409);
    // The person approves: the task is queued again, its old lease gone.
    world.ok(decide_approval("ho1", ApprovalDecision::Approve));
    assert_eq!(world.task().state, TaskState::Queued);
    assert!(world.task().lease.is_none());
    assert_eq!(world.run(heartbeat(&token)).unwrap_err().status(), 409);
    world.ok(claim("w2"));
    assert_eq!(world.task().state, TaskState::Running);
}

// === the dead-letter queue ===

#[test]
fn dlq_requeue_resets_attempts_and_keeps_the_checkpoint() {
    let mut world = World::new();
    world.ok(create(1));
    world.ok(claim("w1"));
    world.ok(checkpoint(&world.token()));
    world.ok(fail(&world.token(), true));
    assert_eq!(world.task().state, TaskState::Dead);

    let requeued = world.ok(Command::DlqRequeue {
        by: "bob".into(),
        note: None,
    });
    assert!(
        matches!(&requeued.events[0], TaskEvent::Requeued(r) if r.by == "bob" && r.reset_attempts)
    );
    let task = world.task();
    assert_eq!((task.state, task.attempts), (TaskState::Queued, 0));
    assert!(task.checkpoint.is_some());
    world.ok(claim("w2"));
    assert_eq!(world.task().attempts, 1);
}

#[test]
fn dlq_discard_ends_cancelled_and_marked_discarded() {
    let mut world = World::in_state(TaskState::Dead);
    let discarded = world.ok(Command::DlqDiscard {
        by: "bob".into(),
        note: Some("duplicate".into()),
    });
    assert!(matches!(
        &discarded.events[0],
        TaskEvent::Cancelled(c) if c.discarded && c.by.as_deref() == Some("bob")
    ));
    assert_eq!(world.task().state, TaskState::Cancelled);
    assert!(
        world.task().last_error.is_some(),
        "the audit keeps the last error"
    );
}

// === limits ===

fn create_with(deadline_ms: Option<i64>, max_steps: Option<u32>) -> Command {
    Command::Create {
        id: "t1".into(),
        agent: "researcher".into(),
        input: Value::Null,
        deadline_ms,
        max_attempts: 3,
        max_steps,
    }
}

#[test]
fn claim_after_the_deadline_kills_the_task_instead() {
    let mut world = World::new();
    world.ok(create_with(Some(START + 1_000), None));
    world.advance(1_000);
    let decision = world.ok(claim("w1"));
    assert_eq!(kinds(&decision), ["task_failed", "task_dead"]);
    assert_eq!(decision.directive, Some(Directive::Cancel));
    let task = world.task();
    assert_eq!(
        (task.state, task.attempts, task.lease.is_none()),
        (TaskState::Dead, 0, true)
    );
    assert_eq!(task.last_error, Some(json!("task_timeout exceeded")));
}

#[test]
fn step_or_heartbeat_after_the_deadline_kills_and_answers_cancel() {
    for late in [step as fn(&str) -> Command, heartbeat] {
        let mut world = World::new();
        world.ok(create_with(Some(START + 1_000), None));
        world.ok(claim("w1"));
        world.advance(1_000);
        let decision = world.ok(late(&world.token()));
        assert_eq!(kinds(&decision), ["task_failed", "task_dead"]);
        assert_eq!(decision.directive, Some(Directive::Cancel));
        assert_eq!(world.task().state, TaskState::Dead);
    }
}

#[test]
fn deadline_timer_kills_tasks_that_are_not_final() {
    let mut world = World::new();
    world.ok(create_with(Some(START + 1_000), None));
    assert!(world.ok(Command::CheckDeadline).events.is_empty());
    world.advance(1_000);
    let decision = world.ok(Command::CheckDeadline);
    assert_eq!(kinds(&decision), ["task_failed", "task_dead"]);
    assert_eq!(world.task().state, TaskState::Dead);
}

#[test]
fn deadline_timer_ends_a_running_task_and_its_lease() {
    let mut world = World::new();
    world.ok(create_with(Some(START + 1_000), None));
    world.ok(claim("w1"));
    let token = world.token();
    world.advance(1_000);
    let decision = world.ok(Command::CheckDeadline);
    assert_eq!(kinds(&decision), ["task_failed", "task_dead"]);
    let TaskEvent::Failed(failed) = &decision.events[0] else {
        panic!("{decision:?}")
    };
    assert_eq!(failed.worker.as_deref(), Some("w1"));
    let TaskEvent::Dead(dead) = &decision.events[1] else {
        panic!("{decision:?}")
    };
    assert_eq!(dead.reason, DeadReason::TaskTimeout);
    let task = world.task();
    assert_eq!((task.state, task.lease.is_none()), (TaskState::Dead, true));
    assert_eq!(task.last_error, Some(json!("task_timeout exceeded")));
    // The worker learns on its next call: its lease is gone.
    assert_eq!(world.run(heartbeat(&token)).unwrap_err().status(), 409);
}

#[test]
fn deadline_timer_closes_the_pending_approval_of_a_waiting_task() {
    let mut world = World::new();
    world.ok(create_with(Some(START + 1_000), None));
    world.ok(request_approval(None, ApprovalDefault::Escalate));
    world.advance(999);
    assert!(world.ok(Command::CheckDeadline).events.is_empty());
    world.advance(1);
    let decision = world.ok(Command::CheckDeadline);
    assert_eq!(
        kinds(&decision),
        ["approval_decided", "task_failed", "task_dead"]
    );
    let TaskEvent::ApprovalDecided(decided) = &decision.events[0] else {
        panic!("{decision:?}")
    };
    assert_eq!(
        (
            decided.approval_id.as_str(),
            decided.decision,
            decided.by.as_str()
        ),
        ("ap1", ApprovalDecision::Deny, "deadline")
    );
    let task = world.task();
    assert_eq!(
        (task.state, task.approval.is_none()),
        (TaskState::Dead, true)
    );
    // Deciding it now is a conflict: nothing is pending any more.
    let late = world.run(decide_approval("ap1", ApprovalDecision::Approve));
    assert_eq!(late.unwrap_err().status(), 409);
}

#[test]
fn dlq_requeue_of_a_timed_out_task_gives_it_its_time_again() {
    let mut world = World::new();
    world.ok(create_with(Some(START + 1_000), None));
    world.advance(5_000);
    world.ok(Command::CheckDeadline);
    world.ok(Command::DlqRequeue {
        by: "bob".into(),
        note: None,
    });
    assert_eq!(world.task().deadline_ms, Some(START + 5_000 + 1_000));
    assert_eq!(kinds(&world.ok(claim("w1"))), ["task_claimed"]);
}

#[test]
fn step_beyond_max_steps_kills_and_answers_cancel() {
    let mut world = World::new();
    world.ok(create_with(None, Some(2)));
    world.ok(claim("w1"));
    let token = world.token();
    world.ok(step(&token));
    world.ok(step(&token));
    let third = world.ok(step(&token));
    assert_eq!(kinds(&third), ["task_failed", "task_dead"]);
    assert_eq!(third.directive, Some(Directive::Cancel));
    let task = world.task();
    assert_eq!((task.state, task.steps), (TaskState::Dead, 2));
    assert_eq!(task.last_error, Some(json!("max_steps exceeded")));
}
