//! Create, and the operator's commands: requeue, cancel, and the dead-letter queue.

use serde_json::Value;

use super::{invalid, invalid_state, not_empty};
use crate::command::Decision;
use crate::error::TaskError;
use crate::event::{Cancelled, Created, Requeued, TaskEvent};
use crate::task::{Task, TaskState};

/// The fields of a create.
pub(super) struct NewTask<'a> {
    pub(super) id: &'a str,
    pub(super) agent: &'a str,
    pub(super) input: &'a Value,
    pub(super) deadline_ms: Option<i64>,
    pub(super) max_attempts: u32,
    pub(super) max_steps: Option<u32>,
}

/// Creates the task, queued. Refused when it exists (the I/O layer answers an idempotent
/// repeat before it gets here) or a limit is out of range.
pub(super) fn create(
    task: Option<&Task>,
    new: NewTask<'_>,
    now_ms: i64,
) -> Result<Decision, TaskError> {
    if let Some(task) = task {
        return Err(TaskError::Exists {
            task: task.id.clone(),
        });
    }
    task_id(new.id)?;
    not_empty("agent", new.agent)?;
    if new.max_attempts == 0 {
        return Err(invalid("max_attempts", "must be at least 1"));
    }
    if new.max_steps == Some(0) {
        return Err(invalid("max_steps", "must be at least 1"));
    }
    if let Some(deadline) = new.deadline_ms
        && deadline <= now_ms
    {
        return Err(invalid(
            "deadline",
            format!("{deadline} (unix ms) is not after now ({now_ms})"),
        ));
    }
    Ok(Decision::events(vec![TaskEvent::Created(Created {
        id: new.id.to_owned(),
        agent: new.agent.to_owned(),
        input: new.input.clone(),
        deadline_ms: new.deadline_ms,
        max_attempts: new.max_attempts,
        max_steps: new.max_steps,
    })]))
}

/// Most bytes a task id may have.
pub(crate) const MAX_ID_BYTES: usize = 256;

/// A task id must name the task in a URL path and a table cell: not empty, at most
/// [`MAX_ID_BYTES`], no control characters, and not `claim`, `.` or `..` (`/v1/tasks/claim` is
/// the claim call; HTTP clients resolve dot segments away).
fn task_id(id: &str) -> Result<(), TaskError> {
    not_empty("id", id)?;
    if id.len() > MAX_ID_BYTES {
        return Err(invalid(
            "id",
            format!("is {} bytes long; at most {MAX_ID_BYTES}", id.len()),
        ));
    }
    if id.chars().any(char::is_control) {
        return Err(invalid(
            "id",
            "must not hold control characters (a newline, a tab)",
        ));
    }
    if crate::RESERVED_TASK_IDS.contains(&id) {
        return Err(invalid(
            "id",
            format!("{id:?} is reserved: /v1/tasks/{id} would not reach the task"),
        ));
    }
    Ok(())
}

/// `POST /v1/tasks/{id}/requeue`: a running task loses its lease and is queued (attempts
/// kept, its holder gets 409 from now on); a dead task is queued with a fresh budget, as a
/// DLQ requeue. Other states are refused.
pub(super) fn requeue(
    task: &Task,
    reason: Option<&str>,
    now_ms: i64,
) -> Result<Decision, TaskError> {
    let reset = match task.state {
        TaskState::Running => false,
        TaskState::Dead => true,
        TaskState::Queued
        | TaskState::Succeeded
        | TaskState::AwaitingHuman
        | TaskState::Cancelled => return Err(invalid_state(task, "requeue")),
    };
    Ok(Decision::events(vec![TaskEvent::Requeued(Requeued {
        by: "operator".to_owned(),
        reason: reason.map(str::to_owned),
        reset_attempts: reset,
        deadline_ms: if reset {
            fresh_deadline(task, now_ms)
        } else {
            None
        },
    })]))
}

/// `POST /v1/tasks/{id}/cancel`: any task that is not final ends cancelled. A running task's
/// holder keeps its lease only to be told `cancel` on its next heartbeat or step.
pub(super) fn cancel(task: &Task, reason: Option<&str>) -> Result<Decision, TaskError> {
    if task.state.is_final() {
        return Err(invalid_state(task, "cancel"));
    }
    let worker = match task.state {
        TaskState::Running => task.lease.as_ref().map(|lease| lease.worker.clone()),
        TaskState::Queued
        | TaskState::AwaitingHuman
        | TaskState::Succeeded
        | TaskState::Dead
        | TaskState::Cancelled => None,
    };
    Ok(Decision::events(vec![TaskEvent::Cancelled(Cancelled {
        reason: reason.map(str::to_owned),
        by: None,
        note: None,
        discarded: false,
        worker,
    })]))
}

/// `keel dlq requeue`: a dead task is queued with attempts and steps back at 0 and, when it
/// had a deadline, a new one as far from now as the old one was from its creation.
pub(super) fn dlq_requeue(
    task: &Task,
    by: &str,
    note: Option<&str>,
    now_ms: i64,
) -> Result<Decision, TaskError> {
    not_empty("by", by)?;
    if task.state != TaskState::Dead {
        return Err(invalid_state(task, "requeue from the dead-letter queue"));
    }
    let reason = match note {
        Some(note) => format!("requeued from the dead-letter queue: {note}"),
        None => "requeued from the dead-letter queue".to_owned(),
    };
    Ok(Decision::events(vec![TaskEvent::Requeued(Requeued {
        by: by.to_owned(),
        reason: Some(reason),
        reset_attempts: true,
        deadline_ms: fresh_deadline(task, now_ms),
    })]))
}

/// `keel dlq discard`: a dead task ends cancelled, marked `discarded`.
pub(super) fn dlq_discard(
    task: &Task,
    by: &str,
    note: Option<&str>,
) -> Result<Decision, TaskError> {
    not_empty("by", by)?;
    if task.state != TaskState::Dead {
        return Err(invalid_state(task, "discard"));
    }
    Ok(Decision::events(vec![TaskEvent::Cancelled(Cancelled {
        reason: Some("discarded from the dead-letter queue".to_owned()),
        by: Some(by.to_owned()),
        note: note.map(str::to_owned),
        discarded: true,
        worker: None,
    })]))
}

/// The task's original time budget (deadline minus creation), from `now_ms`.
fn fresh_deadline(task: &Task, now_ms: i64) -> Option<i64> {
    task.deadline_ms.map(|deadline| {
        let budget = deadline.saturating_sub(task.created_at_ms).max(1);
        now_ms.saturating_add(budget)
    })
}
