//! The fold: a task's state is its events applied in order.
//!
//! [`evolve`] is total and pure. `decide` only emits events that make sense for the state,
//! but a log is data, so an event that does not fit is applied as best it can be rather than
//! refused: each arm below says what it does. An event for no task (`None`) starts from an
//! empty queued task with an empty id; only `task_created` sets id and agent.

use crate::event::TaskEvent;
use crate::task::{ApprovalDecision, CheckpointRef, Lease, Task, TaskState};

/// Applies `event`, which happened at `at_ms` (unix ms, the event's `at`), to `task`.
/// Every event bumps `version` and sets `updated_at_ms`.
pub fn evolve(task: Option<Task>, event: &TaskEvent, at_ms: i64) -> Task {
    let version = task.as_ref().map_or(0, |t| t.version);
    let mut task = match (task, event) {
        // A second `task_created` (not produced by `decide`) starts the task over.
        (_, TaskEvent::Created(e)) => Task {
            id: e.id.clone(),
            agent: e.agent.clone(),
            input: e.input.clone(),
            deadline_ms: e.deadline_ms,
            max_attempts: e.max_attempts,
            max_steps: e.max_steps,
            created_at_ms: at_ms,
            ..empty(at_ms)
        },
        (Some(task), _) => task,
        (None, _) => empty(at_ms),
    };
    apply(&mut task, event, at_ms);
    task.version = version.saturating_add(1);
    task.updated_at_ms = at_ms;
    task
}

/// Folds `events`, all stamped `at_ms`, into `task`; `None` stays `None` only when there are
/// no events.
pub fn fold<'a>(
    task: Option<Task>,
    events: impl IntoIterator<Item = &'a TaskEvent>,
    at_ms: i64,
) -> Option<Task> {
    events
        .into_iter()
        .fold(task, |task, event| Some(evolve(task, event, at_ms)))
}

fn empty(at_ms: i64) -> Task {
    Task {
        id: String::new(),
        agent: String::new(),
        input: serde_json::Value::Null,
        state: TaskState::Queued,
        attempts: 0,
        max_attempts: 1,
        max_steps: None,
        steps: 0,
        deadline_ms: None,
        created_at_ms: at_ms,
        updated_at_ms: at_ms,
        lease: None,
        checkpoint: None,
        last_error: None,
        output: None,
        confidence: None,
        approval: None,
        cancel_requested: false,
        resumes_attempt: false,
        version: 0,
    }
}

fn apply(task: &mut Task, event: &TaskEvent, at_ms: i64) {
    match event {
        TaskEvent::Created(_) => {}
        TaskEvent::Claimed(e) => {
            task.state = TaskState::Running;
            task.attempts = e.attempt;
            task.lease = Some(Lease {
                token_hash: e.token_hash.clone(),
                worker: e.worker.clone(),
                expires_at_ms: e.expires_at_ms,
                ttl_ms: e.lease_ttl_ms,
            });
            task.cancel_requested = false;
            task.approval = None;
            task.resumes_attempt = false;
        }
        TaskEvent::LeaseExpired(_) => {
            // Only a running task goes back to the queue; elsewhere the lease is just dropped.
            if task.state == TaskState::Running {
                task.state = TaskState::Queued;
            }
            task.lease = None;
        }
        TaskEvent::StepRecorded(e) => {
            task.steps = e.step;
            if e.confidence.is_some() {
                task.confidence = e.confidence;
            }
        }
        TaskEvent::CheckpointSaved(e) => {
            task.checkpoint = Some(CheckpointRef {
                seq: e.seq,
                label: e.label.clone(),
                state_hash: e.state_hash.clone(),
                size: e.size,
                at_ms,
            });
        }
        TaskEvent::Succeeded(e) => {
            task.state = TaskState::Succeeded;
            task.output = Some(e.output.clone());
            if e.confidence.is_some() {
                task.confidence = e.confidence;
            }
            task.lease = None;
        }
        TaskEvent::Failed(e) => {
            // The state moves with the `task_requeued` or `task_dead` that always follows.
            task.last_error = Some(e.error.clone());
            task.lease = None;
        }
        TaskEvent::Dead(e) => {
            task.state = TaskState::Dead;
            if e.error.is_some() {
                task.last_error = e.error.clone();
            }
            task.lease = None;
            task.approval = None;
            task.resumes_attempt = false;
        }
        TaskEvent::Requeued(e) => {
            task.state = TaskState::Queued;
            task.lease = None;
            task.approval = None;
            task.cancel_requested = false;
            task.resumes_attempt = false;
            if e.reset_attempts {
                task.attempts = 0;
                task.steps = 0;
                task.deadline_ms = e.deadline_ms;
            }
        }
        TaskEvent::Cancelled(_) => {
            // A holder keeps its lease so its next heartbeat or step is answered `cancel`.
            if task.state == TaskState::Running && task.lease.is_some() {
                task.cancel_requested = true;
            } else {
                task.lease = None;
            }
            task.state = TaskState::Cancelled;
            task.approval = None;
            task.resumes_attempt = false;
        }
        TaskEvent::ApprovalRequested(e) => {
            // A handed-off task keeps its holder's lease, so that the holder's next call
            // is answered `handoff` (as a cancelled one's is answered `cancel`).
            if !(e.handoff && task.state == TaskState::Running) {
                task.lease = None;
            }
            // Asked while an attempt ran, an approval lets that attempt go on; asked of a
            // queued task (whose last attempt, if any, ended), it does not.
            task.resumes_attempt = task.state == TaskState::Running;
            task.state = TaskState::AwaitingHuman;
            task.approval = Some(crate::task::Approval {
                id: e.approval_id.clone(),
                reason: e.reason.clone(),
                context: e.context.clone(),
                requested_at_ms: at_ms,
                timeout_ms: e.timeout_ms,
                default: e.default,
                escalated: false,
                handoff: e.handoff,
            });
        }
        TaskEvent::ApprovalDecided(e) => {
            task.approval = None;
            task.lease = None;
            // A deny is followed by `task_dead`; an approval resumes from the queue.
            // `resumes_attempt` stays as the request set it; a deny's `task_dead` clears it.
            if e.decision == ApprovalDecision::Approve && !task.state.is_final() {
                task.state = TaskState::Queued;
            }
        }
        TaskEvent::AlertRaised(e) => {
            if let Some(approval) = task.approval.as_mut()
                && e.approval_id.as_deref() == Some(approval.id.as_str())
            {
                approval.escalated = true;
            }
        }
    }
}
