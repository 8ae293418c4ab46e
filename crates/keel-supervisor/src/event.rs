//! The events that change a task, and their encoding as `(kind, data)` in the log.
//!
//! One struct per event kind of DESIGN §6 that concerns a task's state; [`TaskEvent`] is
//! their sum. [`TaskEvent::kind`] gives the fixed name, [`TaskEvent::to_data`] the JSON stored
//! in the event's `data`, and [`TaskEvent::from_event`] reads a stored event back; kinds that
//! do not change task state (a task's log also holds the gateway's `llm_call` and friends)
//! read back as `None`.
//!
//! Each event carries what a person auditing the task needs: the worker, the attempt, the
//! error, who decided and their note. No secrets: `task_claimed` holds the SHA-256 of the
//! lease token ([`crate::task::token_hash`]), not the token, which is enough to rebuild the
//! state on replay and to check a worker's token, and of no use to act as the lease holder
//! (the token is 128 random bits, so its hash cannot be turned back). Only the claim's answer
//! carries the token, to the worker (and, for a claim with an `Idempotency-Key`, the store's
//! idempotency record of that answer, outside the log).
//!
//! Logs written by keel before it kept only the hash have the token itself in
//! `task_claimed` (`token`); such an event reads back with the token hashed, so those logs
//! replay and the tokens handed out then still work.

use keel_core::EventKind;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::task::{ApprovalDecision, ApprovalDefault};

/// `task_created`: a task was created.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Created {
    /// The task's id.
    pub id: String,
    /// The agent that runs it.
    pub agent: String,
    /// What the creator asked for.
    pub input: Value,
    /// Absolute deadline, unix milliseconds.
    pub deadline_ms: Option<i64>,
    /// Claims allowed.
    pub max_attempts: u32,
    /// Steps allowed, `None` for no limit.
    pub max_steps: Option<u32>,
}

/// `task_claimed`: a worker claimed the task with a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ClaimedData")]
pub struct Claimed {
    /// The worker that claimed it.
    pub worker: String,
    /// [`crate::task::token_hash`] of the lease token (see the module doc).
    pub token_hash: String,
    /// The lease's time to live, milliseconds.
    pub lease_ttl_ms: u64,
    /// When the lease expires unless renewed, unix milliseconds.
    pub expires_at_ms: i64,
    /// The attempt this claim starts (1 for the first), or goes on with when `resumed`.
    pub attempt: u32,
    /// The claim goes on with the attempt a person's approval let go on (it is not a new
    /// try). Left out of the event when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resumed: bool,
}

/// `task_claimed` as stored: `token_hash`, or in logs written before keel kept only the
/// hash, the token itself (`token`), which is hashed when read.
#[derive(Deserialize)]
struct ClaimedData {
    worker: String,
    #[serde(default)]
    token_hash: Option<String>,
    #[serde(default)]
    token: Option<String>,
    lease_ttl_ms: u64,
    expires_at_ms: i64,
    attempt: u32,
    #[serde(default)]
    resumed: bool,
}

impl TryFrom<ClaimedData> for Claimed {
    type Error = &'static str;

    fn try_from(data: ClaimedData) -> Result<Self, Self::Error> {
        let token_hash = match (data.token_hash, data.token) {
            (Some(hash), _) if !hash.is_empty() => hash,
            (_, Some(token)) if !token.is_empty() => crate::task::token_hash(&token),
            _ => return Err("task_claimed has neither a token_hash nor a token"),
        };
        Ok(Self {
            worker: data.worker,
            token_hash,
            lease_ttl_ms: data.lease_ttl_ms,
            expires_at_ms: data.expires_at_ms,
            attempt: data.attempt,
            resumed: data.resumed,
        })
    }
}

/// `lease_expired`: the holder did not renew the lease in time; the task is queued again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseExpired {
    /// The worker that held the lease.
    pub worker: String,
    /// The attempt that was lost.
    pub attempt: u32,
    /// When the lease had expired, unix milliseconds.
    pub expired_at_ms: i64,
}

/// `step_recorded`: the worker reported a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecorded {
    /// The step's number over the task's life (1 for the first).
    pub step: u32,
    /// What kind of step (`"plan"`, `"tool_call"`…), as the worker named it.
    pub kind: String,
    /// What happened, in words.
    pub summary: String,
    /// How far the task is, 0..=1, when the worker knows.
    pub progress: Option<f64>,
    /// The worker's confidence, 0..=1.
    pub confidence: Option<f64>,
    /// The worker that holds the lease.
    pub worker: String,
    /// The attempt it belongs to.
    pub attempt: u32,
}

/// `checkpoint_saved`: the worker saved a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointSaved {
    /// 1, 2, 3… per task.
    pub seq: u64,
    /// The worker's name for it.
    pub label: Option<String>,
    /// Content hash of the state, the key of its blob in the store.
    pub state_hash: String,
    /// Size of the state, bytes.
    pub size: u64,
    /// The worker that holds the lease.
    pub worker: String,
    /// The attempt it belongs to.
    pub attempt: u32,
}

/// `task_succeeded`: the worker completed the task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Succeeded {
    /// The task's output.
    pub output: Value,
    /// The worker's confidence in it, 0..=1.
    pub confidence: Option<f64>,
    /// The worker that completed it.
    pub worker: String,
    /// The attempt that succeeded.
    pub attempt: u32,
}

/// `task_failed`: an attempt failed. Always followed, in the same decision, by
/// `task_requeued` or `task_dead`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failed {
    /// The error: the worker's `fail` body, or the supervisor's reason as a string.
    pub error: Value,
    /// Whether another attempt may help (the worker's word; always false for the supervisor's).
    pub retryable: bool,
    /// The worker whose attempt failed; `None` when the supervisor failed a task nobody held.
    pub worker: Option<String>,
    /// The attempt that failed (0 if it never ran).
    pub attempt: u32,
}

/// Why a task went to the dead-letter queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadReason {
    /// A retryable failure with no attempts left.
    OutOfAttempts,
    /// The worker said the failure is not retryable.
    NotRetryable,
    /// The lease expired and no attempts were left.
    LeaseExpired,
    /// The task's deadline passed.
    TaskTimeout,
    /// The task took more steps than `max_steps`.
    MaxSteps,
    /// A person denied the approval.
    ApprovalDenied,
    /// The approval timed out and its default is deny.
    ApprovalTimeout,
}

/// `task_dead`: the task went to the dead-letter queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dead {
    /// Why.
    pub reason: DeadReason,
    /// The error that becomes the task's `last_error`; `None` keeps the one it has.
    pub error: Option<Value>,
    /// Claims made, for the audit.
    pub attempts: u32,
}

/// `task_requeued`: the task is queued again, by a retry or by an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requeued {
    /// Who: `"supervisor"` for a retry, `"operator"` or the named person otherwise.
    pub by: String,
    /// Why, when given.
    pub reason: Option<String>,
    /// True when the task gets a fresh budget (a DLQ requeue): attempts and steps go back
    /// to 0 and `deadline_ms` below replaces the old deadline.
    pub reset_attempts: bool,
    /// The new deadline when `reset_attempts`, unix milliseconds.
    pub deadline_ms: Option<i64>,
}

/// `task_cancelled`: the task was cancelled, or discarded from the DLQ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancelled {
    /// Why, when given.
    pub reason: Option<String>,
    /// Who, when known.
    pub by: Option<String>,
    /// Their note.
    pub note: Option<String>,
    /// True when a dead task was discarded from the DLQ.
    pub discarded: bool,
    /// The worker that held the lease when it was cancelled, if any: it gets `cancel` next.
    pub worker: Option<String>,
}

/// `approval_requested`: the task waits for a person.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalRequested {
    /// The approval's id.
    pub approval_id: String,
    /// Why a person must decide.
    pub reason: String,
    /// What they need to see.
    pub context: Value,
    /// How long it may wait, milliseconds.
    pub timeout_ms: u64,
    /// What happens when nobody decides in time.
    pub default: ApprovalDefault,
    /// The worker that asked, when it held the lease.
    pub worker: Option<String>,
    /// The attempt during which it was asked.
    pub attempt: u32,
    /// keel's guards handed the task over (a loop, say): the worker that held the lease
    /// keeps it only to be told `handoff` on its next call.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub handoff: bool,
}

/// `approval_decided`: a person (or the timeout, `by: "timeout"`) decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalDecided {
    /// The approval's id.
    pub approval_id: String,
    /// Approve or deny.
    pub decision: ApprovalDecision,
    /// Who decided.
    pub by: String,
    /// Their note.
    pub note: Option<String>,
}

/// `alert_raised`: an alert about the task (here: an approval escalated by its timeout).
///
/// Every field has a default so that alerts raised by other parts of keel into a task's log
/// read back too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertRaised {
    /// `"warning"` or `"critical"`.
    #[serde(default)]
    pub severity: String,
    /// What happened, in words.
    #[serde(default)]
    pub message: String,
    /// The approval that escalated, if that is what the alert is about.
    #[serde(default)]
    pub approval_id: Option<String>,
}

/// An event that changes a task's state.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskEvent {
    /// `task_created`.
    Created(Created),
    /// `task_claimed`.
    Claimed(Claimed),
    /// `lease_expired`.
    LeaseExpired(LeaseExpired),
    /// `step_recorded`.
    StepRecorded(StepRecorded),
    /// `checkpoint_saved`.
    CheckpointSaved(CheckpointSaved),
    /// `task_succeeded`.
    Succeeded(Succeeded),
    /// `task_failed`.
    Failed(Failed),
    /// `task_dead`.
    Dead(Dead),
    /// `task_requeued`.
    Requeued(Requeued),
    /// `task_cancelled`.
    Cancelled(Cancelled),
    /// `approval_requested`.
    ApprovalRequested(ApprovalRequested),
    /// `approval_decided`.
    ApprovalDecided(ApprovalDecided),
    /// `alert_raised`.
    AlertRaised(AlertRaised),
}

/// A stored event that should be a task event but cannot be read as one.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The kind is not one of DESIGN §6.
    #[error("unknown event kind {kind:?}")]
    UnknownKind {
        /// The kind as stored.
        kind: String,
    },
    /// The data does not have the fields of its kind.
    #[error("data of {kind} event is malformed")]
    Data {
        /// The event's kind.
        kind: EventKind,
        /// What serde found wrong.
        #[source]
        source: serde_json::Error,
    },
}

// === impl TaskEvent ===

impl TaskEvent {
    /// The event's fixed name (DESIGN §6).
    pub fn kind(&self) -> EventKind {
        match self {
            Self::Created(_) => EventKind::TaskCreated,
            Self::Claimed(_) => EventKind::TaskClaimed,
            Self::LeaseExpired(_) => EventKind::LeaseExpired,
            Self::StepRecorded(_) => EventKind::StepRecorded,
            Self::CheckpointSaved(_) => EventKind::CheckpointSaved,
            Self::Succeeded(_) => EventKind::TaskSucceeded,
            Self::Failed(_) => EventKind::TaskFailed,
            Self::Dead(_) => EventKind::TaskDead,
            Self::Requeued(_) => EventKind::TaskRequeued,
            Self::Cancelled(_) => EventKind::TaskCancelled,
            Self::ApprovalRequested(_) => EventKind::ApprovalRequested,
            Self::ApprovalDecided(_) => EventKind::ApprovalDecided,
            Self::AlertRaised(_) => EventKind::AlertRaised,
        }
    }

    /// The event's `data`: a JSON object with the fields of its struct.
    pub fn to_data(&self) -> Value {
        let data = match self {
            Self::Created(e) => serde_json::to_value(e),
            Self::Claimed(e) => serde_json::to_value(e),
            Self::LeaseExpired(e) => serde_json::to_value(e),
            Self::StepRecorded(e) => serde_json::to_value(e),
            Self::CheckpointSaved(e) => serde_json::to_value(e),
            Self::Succeeded(e) => serde_json::to_value(e),
            Self::Failed(e) => serde_json::to_value(e),
            Self::Dead(e) => serde_json::to_value(e),
            Self::Requeued(e) => serde_json::to_value(e),
            Self::Cancelled(e) => serde_json::to_value(e),
            Self::ApprovalRequested(e) => serde_json::to_value(e),
            Self::ApprovalDecided(e) => serde_json::to_value(e),
            Self::AlertRaised(e) => serde_json::to_value(e),
        };
        // Serializing these structs into a `Value` cannot fail: they have no maps with
        // non-string keys, and a non-finite float becomes `null`.
        data.unwrap_or(Value::Null)
    }

    /// This event as the store's [`keel_core::NewEvent`] for `task_id`.
    pub fn to_new_event(&self, task_id: &str) -> keel_core::NewEvent {
        keel_core::NewEvent::new(self.kind(), Some(task_id.to_owned()), self.to_data())
    }

    /// Reads a stored event back. `Ok(None)` for kinds of DESIGN §6 that do not change a
    /// task's state (`llm_call`, `retry_scheduled`, `backtracked`, `task_handed_off`…).
    pub fn from_event(kind: &str, data: &Value) -> Result<Option<TaskEvent>, DecodeError> {
        let kind: EventKind =
            serde_json::from_value(Value::String(kind.to_owned())).map_err(|_| {
                DecodeError::UnknownKind {
                    kind: kind.to_owned(),
                }
            })?;
        let event = match kind {
            EventKind::TaskCreated => decode(kind, data).map(Self::Created),
            EventKind::TaskClaimed => decode(kind, data).map(Self::Claimed),
            EventKind::LeaseExpired => decode(kind, data).map(Self::LeaseExpired),
            EventKind::StepRecorded => decode(kind, data).map(Self::StepRecorded),
            EventKind::CheckpointSaved => decode(kind, data).map(Self::CheckpointSaved),
            EventKind::TaskSucceeded => decode(kind, data).map(Self::Succeeded),
            EventKind::TaskFailed => decode(kind, data).map(Self::Failed),
            EventKind::TaskDead => decode(kind, data).map(Self::Dead),
            EventKind::TaskRequeued => decode(kind, data).map(Self::Requeued),
            EventKind::TaskCancelled => decode(kind, data).map(Self::Cancelled),
            EventKind::ApprovalRequested => decode(kind, data).map(Self::ApprovalRequested),
            EventKind::ApprovalDecided => decode(kind, data).map(Self::ApprovalDecided),
            EventKind::AlertRaised => decode(kind, data).map(Self::AlertRaised),
            // Gateway, tool and policy events land in a task's log for its trajectory, but
            // the task's state does not depend on them (backtracking and hand-off come with
            // the directives issue).
            EventKind::LlmCall
            | EventKind::LlmAttemptFailed
            | EventKind::RetryScheduled
            | EventKind::FallbackUsed
            | EventKind::BreakerOpened
            | EventKind::BreakerHalfOpened
            | EventKind::BreakerClosed
            | EventKind::DegradedReply
            | EventKind::BudgetExceeded
            | EventKind::LoopDetected
            | EventKind::ActionChecked
            | EventKind::ActionBlocked
            | EventKind::ToolInvoked
            | EventKind::Backtracked
            | EventKind::TaskHandedOff => return Ok(None),
        };
        event.map(Some)
    }
}

fn decode<T: serde::de::DeserializeOwned>(kind: EventKind, data: &Value) -> Result<T, DecodeError> {
    T::deserialize(data).map_err(|source| DecodeError::Data { kind, source })
}
