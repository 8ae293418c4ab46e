//! The approval queue: a task waits for a person, who approves (it resumes from the queue
//! and its checkpoint) or denies (it goes to the DLQ). An approval that times out takes its
//! default: deny, or escalate (one `alert_raised`, then it keeps waiting).

use serde_json::{Value, json};

use super::{Holder, holder, invalid, invalid_state, not_empty, stale};
use crate::command::{Asker, Decision};
use crate::error::TaskError;
use crate::event::{AlertRaised, ApprovalDecided, ApprovalRequested, Dead, DeadReason, TaskEvent};
use crate::task::{ApprovalDecision, ApprovalDefault, Task, TaskState};

/// The fields of an approval request.
pub(super) struct NewApproval<'a> {
    pub(super) id: &'a str,
    pub(super) reason: &'a str,
    pub(super) context: &'a Value,
    pub(super) timeout_ms: u64,
    pub(super) default: ApprovalDefault,
}

/// Puts the task in `awaiting_human`: from running, asked by the holder with its token or by
/// keel on its behalf (the lease ends; after an approval the next claim resumes from the
/// checkpoint and goes on with the same attempt), or from queued, asked by an operator or
/// keel (after an approval the next claim is a new attempt).
pub(super) fn request(
    task: &Task,
    asker: &Asker,
    new: NewApproval<'_>,
) -> Result<Decision, TaskError> {
    not_empty("approval_id", new.id)?;
    if new.timeout_ms == 0 {
        return Err(invalid("timeout", "must be longer than 0ms"));
    }
    let worker = match (task.state, asker) {
        (TaskState::Queued, Asker::Operator | Asker::Keel) => None,
        (TaskState::Running | TaskState::Cancelled, Asker::Holder { token }) => {
            match holder(task, token)? {
                Holder::Running(lease) => Some(lease.worker.clone()),
                Holder::Cancelled | Holder::HandedOff => {
                    return Err(invalid_state(task, "request an approval for"));
                }
            }
        }
        (TaskState::Running, Asker::Keel) => task.lease.as_ref().map(|l| l.worker.clone()),
        (TaskState::Queued, Asker::Holder { .. }) | (TaskState::Running, Asker::Operator) => {
            return Err(stale(task));
        }
        (
            TaskState::Succeeded
            | TaskState::Dead
            | TaskState::AwaitingHuman
            | TaskState::Cancelled,
            _,
        ) => return Err(invalid_state(task, "request an approval for")),
    };
    Ok(requested(task, &new, worker, false))
}

/// keel hands a queued or running task to a person (no token: keel itself asks). The
/// running task's holder keeps its lease only to be told `handoff`.
pub(super) fn handoff(task: &Task, new: NewApproval<'_>) -> Result<Decision, TaskError> {
    not_empty("approval_id", new.id)?;
    if new.timeout_ms == 0 {
        return Err(invalid("timeout", "must be longer than 0ms"));
    }
    let worker = match task.state {
        TaskState::Queued => None,
        TaskState::Running => task.lease.as_ref().map(|l| l.worker.clone()),
        TaskState::Succeeded
        | TaskState::Dead
        | TaskState::AwaitingHuman
        | TaskState::Cancelled => return Err(invalid_state(task, "hand off")),
    };
    Ok(requested(task, &new, worker, true))
}

/// A person decides. Another approval id than the pending one is not found; a task with no
/// pending approval (decided already) is a conflict.
pub(super) fn decide(
    task: &Task,
    approval_id: &str,
    decision: ApprovalDecision,
    by: &str,
    note: Option<&str>,
) -> Result<Decision, TaskError> {
    not_empty("by", by)?;
    let Some(pending) = task.approval.as_ref() else {
        return Err(invalid_state(task, "decide an approval of"));
    };
    if pending.id != approval_id {
        return Err(TaskError::NotFound {
            what: format!("approval {approval_id} of task {}", task.id),
        });
    }
    Ok(Decision::events(decided(
        task,
        approval_id,
        decision,
        by,
        note,
        DeadReason::ApprovalDenied,
    )))
}

/// The approval timer: once the pending approval's timeout has passed at `now_ms`, deny it
/// (`by: "timeout"`) or raise one alert. Otherwise nothing.
pub(super) fn expire(task: &Task, now_ms: i64) -> Decision {
    let Some(pending) = task.approval.as_ref() else {
        return Decision::default();
    };
    if task.state != TaskState::AwaitingHuman || pending.expires_at_ms() > now_ms {
        return Decision::default();
    }
    let events = match pending.default {
        ApprovalDefault::Deny => decided(
            task,
            &pending.id,
            ApprovalDecision::Deny,
            "timeout",
            None,
            DeadReason::ApprovalTimeout,
        ),
        ApprovalDefault::Escalate if pending.escalated => Vec::new(),
        ApprovalDefault::Escalate => vec![TaskEvent::AlertRaised(AlertRaised {
            severity: "warning".to_owned(),
            message: format!(
                "approval {} of task {} got no decision within {}ms; escalated",
                pending.id, task.id, pending.timeout_ms
            ),
            approval_id: Some(pending.id.clone()),
        })],
    };
    Decision::events(events)
}

fn decided(
    task: &Task,
    approval_id: &str,
    decision: ApprovalDecision,
    by: &str,
    note: Option<&str>,
    dead_reason: DeadReason,
) -> Vec<TaskEvent> {
    let mut events = vec![TaskEvent::ApprovalDecided(ApprovalDecided {
        approval_id: approval_id.to_owned(),
        decision,
        by: by.to_owned(),
        note: note.map(str::to_owned),
    })];
    if decision == ApprovalDecision::Deny {
        events.push(TaskEvent::Dead(Dead {
            reason: dead_reason,
            error: Some(json!({"reason": "denied", "by": by, "note": note})),
            attempts: task.attempts,
        }));
    }
    events
}

/// The `approval_requested` decision of `new`.
fn requested(
    task: &Task,
    new: &NewApproval<'_>,
    worker: Option<String>,
    handoff: bool,
) -> Decision {
    Decision::events(vec![TaskEvent::ApprovalRequested(ApprovalRequested {
        approval_id: new.id.to_owned(),
        reason: new.reason.to_owned(),
        context: new.context.clone(),
        timeout_ms: new.timeout_ms,
        default: new.default,
        worker,
        attempt: task.attempts,
        handoff,
    })])
}
