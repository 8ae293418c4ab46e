//! The lease holder's calls (claim, heartbeat, step, checkpoint, complete, fail) and the
//! timers that end a lease or a task (lease expiry, deadline).
//!
//! A heartbeat is not an event: it would flood the log. [`renew`] gives the task with the
//! lease extended and the I/O layer persists it as a snapshot only. After a crash of keel the
//! lease is as old as the last persisted snapshot (or the claim, on replay), which is safe:
//! a lease can only come out shorter, so a task is re-dispatched early, never lost.

use serde_json::Value;

use super::{Holder, TASK_TIMEOUT, holder, invalid, invalid_state, kill, not_empty, unit};
use crate::command::{Ctx, Decision, Directive};
use crate::error::TaskError;
use crate::event::{
    ApprovalDecided, CheckpointSaved, Claimed, Dead, DeadReason, Failed, LeaseExpired, Requeued,
    StepRecorded, Succeeded, TaskEvent,
};
use crate::task::{ApprovalDecision, Task, TaskState};

/// Claims a queued task: a new attempt, or the current one again after a person approved
/// (see [`Task::resumes_attempt`]). A task whose deadline has passed dies instead: `task_failed` +
/// `task_dead`, no lease, directive `cancel` (a successful claim answers `continue`), and the
/// I/O layer moves on to the next queued task.
pub(super) fn claim(
    task: &Task,
    worker: &str,
    lease_ttl_ms: u64,
    ctx: &Ctx,
) -> Result<Decision, TaskError> {
    not_empty("worker", worker)?;
    if lease_ttl_ms == 0 {
        return Err(invalid("lease", "must be longer than 0ms"));
    }
    not_empty("lease_token", &ctx.new_token)?;
    if task.state != TaskState::Queued {
        return Err(invalid_state(task, "claim"));
    }
    if task.past_deadline(ctx.now_ms) {
        let events = kill(task, None, DeadReason::TaskTimeout, TASK_TIMEOUT);
        return Ok(Decision::events(events).with_directive(Directive::Cancel));
    }
    let claimed = Claimed {
        worker: worker.to_owned(),
        token_hash: crate::task::token_hash(&ctx.new_token),
        lease_ttl_ms,
        expires_at_ms: ctx.now_ms.saturating_add_unsigned(lease_ttl_ms),
        // After a person's approval the claim goes on with the attempt that asked.
        attempt: if task.resumes_attempt {
            task.attempts
        } else {
            task.attempts.saturating_add(1)
        },
        resumed: task.resumes_attempt,
    };
    Ok(Decision::events(vec![TaskEvent::Claimed(claimed)]).with_directive(Directive::Continue))
}

/// Answers a heartbeat. No events, except when the deadline has passed (`task_failed` +
/// `task_dead`, directive `cancel`). The holder of a cancelled task's lease gets `cancel`,
/// the holder of a handed-off one `handoff`.
pub(super) fn heartbeat(task: &Task, token: &str, now_ms: i64) -> Result<Decision, TaskError> {
    let lease = match holder(task, token)? {
        Holder::Cancelled => return Ok(Decision::default().with_directive(Directive::Cancel)),
        Holder::HandedOff => return Ok(Decision::default().with_directive(Directive::Handoff)),
        Holder::Running(lease) => lease,
    };
    if task.past_deadline(now_ms) {
        let events = kill(
            task,
            Some(&lease.worker),
            DeadReason::TaskTimeout,
            TASK_TIMEOUT,
        );
        return Ok(Decision::events(events).with_directive(Directive::Cancel));
    }
    Ok(Decision::default().with_directive(continue_or_cancel(task)))
}

/// The task with its lease renewed for a heartbeat at `now_ms` (`expires_at_ms = now + ttl`).
/// Not an event: persist the result as a snapshot only, and only when [`crate::decide`]
/// answered the heartbeat with `continue` and no events.
///
/// # Errors
/// [`TaskError::StaleLease`] for a wrong token or a task without a lease;
/// [`TaskError::InvalidState`] for the lease a cancel kept (it is not renewed).
pub fn renew(task: &Task, token: &str, now_ms: i64) -> Result<Task, TaskError> {
    match holder(task, token)? {
        Holder::Cancelled | Holder::HandedOff => Err(invalid_state(task, "renew the lease of")),
        Holder::Running(_) => {
            let mut renewed = task.clone();
            if let Some(lease) = renewed.lease.as_mut() {
                lease.expires_at_ms = now_ms.saturating_add_unsigned(lease.ttl_ms);
            }
            Ok(renewed)
        }
    }
}

/// What the worker reports in a step.
pub(super) struct NewStep<'a> {
    pub(super) kind: &'a str,
    pub(super) summary: &'a str,
    pub(super) progress: Option<f64>,
    pub(super) confidence: Option<f64>,
}

/// Records a step, or ends the task when its deadline passed or the step is one more than
/// `max_steps` (`task_failed` + `task_dead`, directive `cancel`).
pub(super) fn step(
    task: &Task,
    token: &str,
    step: NewStep<'_>,
    now_ms: i64,
) -> Result<Decision, TaskError> {
    not_empty("kind", step.kind)?;
    unit("progress", step.progress)?;
    unit("confidence", step.confidence)?;
    let lease = match holder(task, token)? {
        Holder::Cancelled => return Ok(Decision::default().with_directive(Directive::Cancel)),
        Holder::HandedOff => return Ok(Decision::default().with_directive(Directive::Handoff)),
        Holder::Running(lease) => lease,
    };
    let worker = Some(lease.worker.as_str());
    if task.past_deadline(now_ms) {
        let events = kill(task, worker, DeadReason::TaskTimeout, TASK_TIMEOUT);
        return Ok(Decision::events(events).with_directive(Directive::Cancel));
    }
    let number = task.steps.saturating_add(1);
    if task.max_steps.is_some_and(|max| number > max) {
        let events = kill(task, worker, DeadReason::MaxSteps, "max_steps exceeded");
        return Ok(Decision::events(events).with_directive(Directive::Cancel));
    }
    let recorded = StepRecorded {
        step: number,
        kind: step.kind.to_owned(),
        summary: step.summary.to_owned(),
        progress: step.progress,
        confidence: step.confidence,
        worker: lease.worker.clone(),
        attempt: task.attempts,
    };
    Ok(Decision::events(vec![TaskEvent::StepRecorded(recorded)])
        .with_directive(continue_or_cancel(task)))
}

/// Records a checkpoint with the next `seq`. Refused after a cancel.
pub(super) fn checkpoint(
    task: &Task,
    token: &str,
    label: Option<&str>,
    state_hash: &str,
    size: u64,
) -> Result<Decision, TaskError> {
    not_empty("state_hash", state_hash)?;
    let lease = running_holder(task, token, "checkpoint")?;
    let saved = CheckpointSaved {
        seq: task
            .checkpoint
            .as_ref()
            .map_or(0, |c| c.seq)
            .saturating_add(1),
        label: label.map(str::to_owned),
        state_hash: state_hash.to_owned(),
        size,
        worker: lease.worker.clone(),
        attempt: task.attempts,
    };
    Ok(Decision::events(vec![TaskEvent::CheckpointSaved(saved)]))
}

/// Completes the task. Refused after a cancel. A deadline that passed meanwhile does not
/// refuse the result: the work is done.
pub(super) fn complete(
    task: &Task,
    token: &str,
    output: &Value,
    confidence: Option<f64>,
) -> Result<Decision, TaskError> {
    unit("confidence", confidence)?;
    let lease = running_holder(task, token, "complete")?;
    let succeeded = Succeeded {
        output: output.clone(),
        confidence,
        worker: lease.worker.clone(),
        attempt: task.attempts,
    };
    Ok(Decision::events(vec![TaskEvent::Succeeded(succeeded)]))
}

/// Fails this attempt: `task_failed`, then `task_requeued` when retryable with attempts left
/// (the checkpoint is kept for the next claim), else `task_dead`.
pub(super) fn fail(
    task: &Task,
    token: &str,
    error: &Value,
    retryable: bool,
) -> Result<Decision, TaskError> {
    let lease = running_holder(task, token, "fail")?;
    let failed = TaskEvent::Failed(Failed {
        error: error.clone(),
        retryable,
        worker: Some(lease.worker.clone()),
        attempt: task.attempts,
    });
    let next = if retryable && task.attempts < task.max_attempts {
        TaskEvent::Requeued(Requeued {
            by: "supervisor".to_owned(),
            reason: Some(format!("retry after attempt {} failed", task.attempts)),
            reset_attempts: false,
            deadline_ms: None,
        })
    } else {
        TaskEvent::Dead(Dead {
            reason: if retryable {
                DeadReason::OutOfAttempts
            } else {
                DeadReason::NotRetryable
            },
            error: None,
            attempts: task.attempts,
        })
    };
    Ok(Decision::events(vec![failed, next]))
}

/// The lease timer: a running task whose lease expired at or before `now_ms` gets
/// `lease_expired` (back to the queue, checkpoint kept), then `task_dead` when it has no
/// attempts left. Otherwise nothing, so that a heartbeat that won the race keeps the task.
pub(super) fn expire(task: &Task, now_ms: i64) -> Decision {
    let Some(lease) = task.lease.as_ref() else {
        return Decision::default();
    };
    if task.state != TaskState::Running || lease.expires_at_ms > now_ms {
        return Decision::default();
    }
    let mut events = vec![TaskEvent::LeaseExpired(LeaseExpired {
        worker: lease.worker.clone(),
        attempt: task.attempts,
        expired_at_ms: lease.expires_at_ms,
    })];
    if task.attempts >= task.max_attempts {
        events.push(TaskEvent::Dead(Dead {
            reason: DeadReason::LeaseExpired,
            error: Some(Value::String(format!(
                "lease expired after {} attempt{}",
                task.attempts,
                if task.attempts == 1 { "" } else { "s" }
            ))),
            attempts: task.attempts,
        }));
    }
    Decision::events(events)
}

/// The deadline timer: a task that is not final and past its deadline gets `task_failed` +
/// `task_dead` (reason `task_timeout`). A worker holding it learns on its next call (409, the
/// task is dead). A pending approval is closed first with `approval_decided` (deny, by
/// `"deadline"`), so the log says how it ended and deciding it later is a conflict.
pub(super) fn check_deadline(task: &Task, now_ms: i64) -> Decision {
    if task.state.is_final() || !task.past_deadline(now_ms) {
        return Decision::default();
    }
    let mut events = Vec::new();
    let worker = match task.state {
        TaskState::Running => task.lease.as_ref().map(|lease| lease.worker.as_str()),
        TaskState::AwaitingHuman => {
            if let Some(pending) = &task.approval {
                events.push(TaskEvent::ApprovalDecided(ApprovalDecided {
                    approval_id: pending.id.clone(),
                    decision: ApprovalDecision::Deny,
                    by: "deadline".to_owned(),
                    note: Some(TASK_TIMEOUT.to_owned()),
                }));
            }
            None
        }
        TaskState::Queued | TaskState::Succeeded | TaskState::Dead | TaskState::Cancelled => None,
    };
    events.extend(kill(task, worker, DeadReason::TaskTimeout, TASK_TIMEOUT));
    Decision::events(events)
}

/// The lease of a running task held with `token`; the holder of a cancelled task's lease
/// may not `action` any more.
fn running_holder<'a>(
    task: &'a Task,
    token: &str,
    action: &'static str,
) -> Result<&'a crate::task::Lease, TaskError> {
    match holder(task, token)? {
        Holder::Running(lease) => Ok(lease),
        Holder::Cancelled | Holder::HandedOff => Err(invalid_state(task, action)),
    }
}

fn continue_or_cancel(task: &Task) -> Directive {
    if task.cancel_requested {
        Directive::Cancel
    } else {
        Directive::Continue
    }
}
