//! A task's derived state: what `GET /v1/tasks/{id}` shows.
//!
//! A [`Task`] is never edited directly; it is the fold ([`crate::evolve`]) of the task's
//! events. The one exception is the lease renewal of a heartbeat ([`crate::renew`]), which is
//! persisted as a snapshot only so that heartbeats do not flood the log.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where a task is in its life (DESIGN §3).
///
/// `queued → running → (succeeded | failed → queued again | dead | awaiting_human |
/// cancelled)`.
/// "failed" is an event (`task_failed`), not a resting state: a failed attempt is queued again
/// or dead in the same decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting for a worker to claim it.
    Queued,
    /// Claimed by a worker that holds the lease.
    Running,
    /// Finished with an output. Final.
    Succeeded,
    /// In the dead-letter queue: out of attempts, out of time, denied, or not retryable. Final
    /// until an operator requeues it from the DLQ.
    Dead,
    /// Waiting for a person to decide on an approval.
    AwaitingHuman,
    /// Cancelled by an operator, or discarded from the DLQ. Final.
    Cancelled,
}

impl TaskState {
    /// True for the states a task rests in for good: succeeded, dead and cancelled.
    pub fn is_final(self) -> bool {
        match self {
            Self::Succeeded | Self::Dead | Self::Cancelled => true,
            Self::Queued | Self::Running | Self::AwaitingHuman => false,
        }
    }

    /// The name as serialized (`awaiting_human`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Dead => "dead",
            Self::AwaitingHuman => "awaiting_human",
            Self::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One durable agent task, as derived from its events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// The task's id.
    pub id: String,
    /// The agent that runs it; workers claim tasks per agent.
    pub agent: String,
    /// What the creator asked for, passed to the worker as is.
    pub input: Value,
    /// Where the task is in its life.
    pub state: TaskState,
    /// Claims so far (the current attempt's number while running).
    pub attempts: u32,
    /// Claims allowed before a failure or a lost lease sends the task to the DLQ.
    pub max_attempts: u32,
    /// Steps allowed over the task's life; `None` means no limit.
    pub max_steps: Option<u32>,
    /// Steps recorded so far, over all attempts.
    pub steps: u32,
    /// Absolute deadline in unix milliseconds, from the create call or the agent's `task_timeout`.
    pub deadline_ms: Option<i64>,
    /// When the task was created, unix milliseconds.
    pub created_at_ms: i64,
    /// When the last event was folded, unix milliseconds.
    pub updated_at_ms: i64,
    /// The current lease while running; kept after a cancel so the holder learns of it.
    pub lease: Option<Lease>,
    /// The newest checkpoint; survives retries so the next claim resumes from it.
    pub checkpoint: Option<CheckpointRef>,
    /// The last error: a worker's `fail` body, or the supervisor's reason as a string
    /// (`"task_timeout exceeded"`).
    pub last_error: Option<Value>,
    /// The output of a succeeded task.
    pub output: Option<Value>,
    /// The last confidence a worker reported (0..=1).
    pub confidence: Option<f64>,
    /// The pending approval while `awaiting_human`.
    pub approval: Option<Approval>,
    /// True when the task was cancelled while a worker held its lease: that worker's next
    /// heartbeat or step answers `cancel`.
    pub cancel_requested: bool,
    /// True from an approval request made while an attempt ran until the next claim, which
    /// (the request approved) goes on with that attempt instead of using a new one: waiting
    /// for a person is not a failed try.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resumes_attempt: bool,
    /// Number of events folded into this state.
    pub version: u64,
}

impl Task {
    /// True when the task has a deadline and it is at or before `now_ms`.
    pub fn past_deadline(&self, now_ms: i64) -> bool {
        self.deadline_ms.is_some_and(|deadline| deadline <= now_ms)
    }

    /// This task as people and HTTP clients see it: the lease's token hash is blanked (and
    /// then left out of the JSON); it is no secret, but of no use to them either. Snapshots
    /// for the store keep [`Task`] as is.
    pub fn redacted(&self) -> Task {
        let mut task = self.clone();
        if let Some(lease) = task.lease.as_mut() {
            lease.token_hash.clear();
        }
        task
    }
}

/// SHA-256 (lowercase hex) of a lease token: what the log and the task's snapshot keep, so
/// that a worker's token can be checked without either holding the token itself.
pub fn token_hash(token: &str) -> String {
    keel_store::blob_hash(token.as_bytes())
}

/// A worker's claim on a running task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "LeaseData")]
pub struct Lease {
    /// [`token_hash`] of the lease token, the bearer capability for heartbeat, steps,
    /// checkpoints, complete and fail that the claim handed to the worker. Empty in a
    /// [`Task::redacted`] view (and then not serialized); an empty hash matches no token.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token_hash: String,
    /// The worker that holds the lease, as it named itself in the claim.
    pub worker: String,
    /// When the lease expires unless renewed, unix milliseconds.
    pub expires_at_ms: i64,
    /// How long each renewal extends the lease, milliseconds.
    pub ttl_ms: u64,
}

/// A [`Lease`] as stored: snapshots written by keel before it kept only the token's hash
/// hold the token itself (`token`), which is hashed when read.
#[derive(Deserialize)]
struct LeaseData {
    #[serde(default)]
    token_hash: String,
    #[serde(default)]
    token: String,
    worker: String,
    expires_at_ms: i64,
    ttl_ms: u64,
}

impl From<LeaseData> for Lease {
    fn from(data: LeaseData) -> Self {
        let token_hash = match (data.token_hash.is_empty(), data.token.is_empty()) {
            (true, false) => token_hash(&data.token),
            (true, true) | (false, _) => data.token_hash,
        };
        Self {
            token_hash,
            worker: data.worker,
            expires_at_ms: data.expires_at_ms,
            ttl_ms: data.ttl_ms,
        }
    }
}

/// The newest checkpoint of a task. The state itself lives in the store, content-addressed
/// by `state_hash`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRef {
    /// 1, 2, 3… per task.
    pub seq: u64,
    /// The worker's name for it, when given.
    pub label: Option<String>,
    /// Content hash of the saved state, the key of the blob in the store.
    pub state_hash: String,
    /// Size of the saved state, bytes.
    pub size: u64,
    /// When it was saved, unix milliseconds.
    pub at_ms: i64,
}

/// A pending request for a person's decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Approval {
    /// The approval's id (`POST /v1/approvals/{id}`).
    pub id: String,
    /// Why a person must decide, in words.
    pub reason: String,
    /// What the person needs to see to decide.
    pub context: Value,
    /// When it was requested, unix milliseconds.
    pub requested_at_ms: i64,
    /// How long it may wait before `default` applies, milliseconds.
    pub timeout_ms: u64,
    /// What happens when nobody decides in time.
    pub default: ApprovalDefault,
    /// True once the timeout escalated it (an alert was raised); it then waits without limit.
    pub escalated: bool,
    /// keel handed the task over (see [`crate::Command::Handoff`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub handoff: bool,
}

impl Approval {
    /// When the approval times out, unix milliseconds.
    pub fn expires_at_ms(&self) -> i64 {
        self.requested_at_ms
            .saturating_add_unsigned(self.timeout_ms)
    }
}

/// What an approval's timeout does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalDefault {
    /// The request is denied (by `"timeout"`) and the task goes to the DLQ.
    Deny,
    /// An alert is raised once and the request keeps waiting for a person.
    Escalate,
}

/// A person's answer to an approval request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalDecision {
    /// Go on: the task is queued again and resumes from its checkpoint.
    Approve,
    /// Stop: the task goes to the DLQ.
    Deny,
}
