//! `decide`: from a task's state and a command to the events that record what happens.
//!
//! Pure: time and the new lease token come in through [`Ctx`]; nothing is read or written.
//! The I/O layer loads the task, calls [`decide`], appends the events atomically (or nothing
//! on an error), folds them with [`crate::evolve`] and answers the caller. One file per group
//! of commands: [`lease`] (the lease holder's calls and the lease and deadline timers),
//! [`operator`] (create, requeue, cancel, the DLQ), [`approval`] (the approval queue).

mod approval;
mod lease;
mod operator;

use serde_json::Value;

pub use lease::renew;

use crate::command::{Command, Ctx, Decision};
use crate::error::TaskError;
use crate::event::{Dead, DeadReason, Failed, TaskEvent};
use crate::task::{ApprovalDefault, Lease, Task};

/// Decides what `command` does to `task` (`None`: no such task) at `ctx.now_ms`.
///
/// `Ok` with no events means nothing changes (a timer that found nothing to do, a
/// heartbeat). An error means the command is refused and nothing may be appended; see
/// [`TaskError::status`] for the HTTP answer.
pub fn decide(task: Option<&Task>, command: &Command, ctx: &Ctx) -> Result<Decision, TaskError> {
    let now = ctx.now_ms;
    match command {
        Command::Create {
            id,
            agent,
            input,
            deadline_ms,
            max_attempts,
            max_steps,
        } => operator::create(
            task,
            operator::NewTask {
                id,
                agent,
                input,
                deadline_ms: *deadline_ms,
                max_attempts: *max_attempts,
                max_steps: *max_steps,
            },
            now,
        ),
        Command::Claim {
            worker,
            lease_ttl_ms,
        } => lease::claim(require(task)?, worker, *lease_ttl_ms, ctx),
        Command::Heartbeat { token } => lease::heartbeat(require(task)?, token, now),
        Command::Step {
            token,
            kind,
            summary,
            progress,
            confidence,
        } => lease::step(
            require(task)?,
            token,
            lease::NewStep {
                kind,
                summary,
                progress: *progress,
                confidence: *confidence,
            },
            now,
        ),
        Command::Checkpoint {
            token,
            label,
            state_hash,
            size,
        } => lease::checkpoint(require(task)?, token, label.as_deref(), state_hash, *size),
        Command::Complete {
            token,
            output,
            confidence,
        } => lease::complete(require(task)?, token, output, *confidence),
        Command::Fail {
            token,
            error,
            retryable,
        } => lease::fail(require(task)?, token, error, *retryable),
        Command::ExpireLease => Ok(lease::expire(require(task)?, now)),
        Command::CheckDeadline => Ok(lease::check_deadline(require(task)?, now)),
        Command::Requeue { reason } => operator::requeue(require(task)?, reason.as_deref(), now),
        Command::Cancel { reason } => operator::cancel(require(task)?, reason.as_deref()),
        Command::DlqRequeue { by, note } => {
            operator::dlq_requeue(require(task)?, by, note.as_deref(), now)
        }
        Command::DlqDiscard { by, note } => {
            operator::dlq_discard(require(task)?, by, note.as_deref())
        }
        Command::RequestApproval {
            asker,
            approval_id,
            reason,
            context,
            timeout_ms,
            default,
        } => approval::request(
            require(task)?,
            asker,
            approval::NewApproval {
                id: approval_id,
                reason,
                context,
                timeout_ms: *timeout_ms,
                default: *default,
            },
        ),
        Command::DecideApproval {
            approval_id,
            decision,
            by,
            note,
        } => approval::decide(require(task)?, approval_id, *decision, by, note.as_deref()),
        Command::ExpireApproval => Ok(approval::expire(require(task)?, now)),
        Command::Handoff {
            approval_id,
            reason,
            context,
            timeout_ms,
        } => approval::handoff(
            require(task)?,
            approval::NewApproval {
                id: approval_id,
                reason,
                context,
                timeout_ms: *timeout_ms,
                default: ApprovalDefault::Deny,
            },
        ),
    }
}

// === helpers shared by the command groups ===

fn require(task: Option<&Task>) -> Result<&Task, TaskError> {
    task.ok_or_else(|| TaskError::NotFound {
        what: "task".to_owned(),
    })
}

/// Who is calling with a lease token.
enum Holder<'a> {
    /// The holder of a running task's lease.
    Running(&'a Lease),
    /// The worker that held the lease when the task was cancelled.
    Cancelled,
    /// The worker that held the lease when keel handed the task to a person.
    HandedOff,
}

/// Checks `token` against the task's lease (by its hash): a running task's, the one a cancel
/// kept, or the one a hand-off kept.
fn holder<'a>(task: &'a Task, token: &str) -> Result<Holder<'a>, TaskError> {
    use crate::task::TaskState;
    let Some(lease) = &task.lease else {
        return Err(stale(task));
    };
    if !token_eq(&lease.token_hash, &crate::task::token_hash(token)) {
        return Err(stale(task));
    }
    match task.state {
        TaskState::Running => Ok(Holder::Running(lease)),
        TaskState::Cancelled => Ok(Holder::Cancelled),
        TaskState::AwaitingHuman => Ok(Holder::HandedOff),
        TaskState::Queued | TaskState::Succeeded | TaskState::Dead => Err(stale(task)),
    }
}

/// Compares in time independent of where the strings differ (the hashes of a bearer
/// secret). An empty expected hash (a redacted lease) never matches.
fn token_eq(expected: &str, given: &str) -> bool {
    expected.len() == given.len()
        && !expected.is_empty()
        && expected
            .bytes()
            .zip(given.bytes())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

fn stale(task: &Task) -> TaskError {
    TaskError::StaleLease {
        task: task.id.clone(),
        state: task.state,
    }
}

fn invalid_state(task: &Task, action: &'static str) -> TaskError {
    TaskError::InvalidState {
        task: task.id.clone(),
        state: task.state,
        action,
    }
}

fn invalid(field: &'static str, message: impl Into<String>) -> TaskError {
    TaskError::Invalid {
        field,
        message: message.into(),
    }
}

fn not_empty(field: &'static str, value: &str) -> Result<(), TaskError> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    Ok(())
}

/// A ratio such as progress or confidence must be a number in 0..=1 (NaN is not).
fn unit(field: &'static str, value: Option<f64>) -> Result<(), TaskError> {
    match value {
        Some(v) if !(0.0..=1.0).contains(&v) => Err(invalid(field, format!("{v} is not in 0..=1"))),
        Some(_) | None => Ok(()),
    }
}

/// `task_failed` with the supervisor's `error` then `task_dead` for `reason`.
fn kill(task: &Task, worker: Option<&str>, reason: DeadReason, error: &str) -> Vec<TaskEvent> {
    let error = Value::String(error.to_owned());
    vec![
        TaskEvent::Failed(Failed {
            error: error.clone(),
            retryable: false,
            worker: worker.map(str::to_owned),
            attempt: task.attempts,
        }),
        TaskEvent::Dead(Dead {
            reason,
            error: Some(error),
            attempts: task.attempts,
        }),
    ]
}

/// The message of a task killed by its deadline.
const TASK_TIMEOUT: &str = "task_timeout exceeded";
