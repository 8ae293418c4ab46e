//! What callers ask of a task, and what the supervisor answers.
//!
//! The worker protocol (DESIGN §3), operators, the approval queue and the I/O layer's timers
//! all speak [`Command`]s. [`crate::decide`] turns one into a [`Decision`]: the events to append
//! (in order, atomically) and, for the calls of a lease holder, a [`Directive`].

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::event::TaskEvent;
use crate::task::{ApprovalDecision, ApprovalDefault};

/// A request to change one task. Lease-holder commands carry the lease `token`.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Create the task (the I/O layer fills defaults from the agent's config).
    Create {
        /// The new task's id.
        id: String,
        /// The agent that runs it.
        agent: String,
        /// What the task is about, passed to the worker.
        input: Value,
        /// Absolute deadline in unix ms (from the call's `deadline` or the agent's `task_timeout`).
        deadline_ms: Option<i64>,
        /// Claims allowed, at least 1.
        max_attempts: u32,
        /// Steps allowed, at least 1 when given.
        max_steps: Option<u32>,
    },
    /// Claim this queued task. The I/O layer picks which task (the oldest queued of the agent).
    Claim {
        /// The claiming worker's name.
        worker: String,
        /// The lease's time to live, milliseconds, more than 0.
        lease_ttl_ms: u64,
    },
    /// Keep the lease. Appends nothing: the I/O layer persists [`crate::renew`]'s task.
    Heartbeat {
        /// The lease token.
        token: String,
    },
    /// Report a step.
    Step {
        /// The lease token.
        token: String,
        /// The step's kind, not empty.
        kind: String,
        /// What happened.
        summary: String,
        /// How far the task is, 0..=1.
        progress: Option<f64>,
        /// The worker's confidence, 0..=1.
        confidence: Option<f64>,
    },
    /// Record a checkpoint whose state the I/O layer has stored under `state_hash`.
    Checkpoint {
        /// The lease token.
        token: String,
        /// The worker's name for it.
        label: Option<String>,
        /// Content hash of the stored state, not empty.
        state_hash: String,
        /// Size of the state, bytes (the I/O layer enforces the size limit).
        size: u64,
    },
    /// Finish the task with an output.
    Complete {
        /// The lease token.
        token: String,
        /// The output.
        output: Value,
        /// The worker's confidence, 0..=1.
        confidence: Option<f64>,
    },
    /// Report that this attempt failed.
    Fail {
        /// The lease token.
        token: String,
        /// The error, as the worker describes it.
        error: Value,
        /// Whether another attempt may help.
        retryable: bool,
    },
    /// Operator: put a running (the lease is dropped) or dead task back in the queue.
    Requeue {
        /// Why, when given.
        reason: Option<String>,
    },
    /// Operator: cancel a task that is not final.
    Cancel {
        /// Why, when given.
        reason: Option<String>,
    },
    /// Timer: the lease's `expires_at_ms` has passed (checked again against `Ctx::now_ms`).
    ExpireLease,
    /// Put the task in the approval queue, from running (the holder, or keel on its behalf)
    /// or queued.
    RequestApproval {
        /// Who asks: the holder of a running task's lease, or (for a queued task) an operator
        /// or keel, which may also ask for a running task on behalf of its holder.
        asker: Asker,
        /// The approval's id, not empty.
        approval_id: String,
        /// Why a person must decide.
        reason: String,
        /// What they need to see.
        context: Value,
        /// How long it may wait, milliseconds, more than 0.
        timeout_ms: u64,
        /// What happens when nobody decides in time.
        default: ApprovalDefault,
    },
    /// A person decides on the pending approval.
    DecideApproval {
        /// The approval's id.
        approval_id: String,
        /// Approve or deny.
        decision: ApprovalDecision,
        /// Who decided.
        by: String,
        /// Their note.
        note: Option<String>,
    },
    /// Timer: the pending approval's timeout has passed (checked again against `Ctx::now_ms`).
    ExpireApproval,
    /// keel's guards hand a queued or running task to a person (it loops, say): it waits in
    /// the approval queue, and the worker holding its lease is answered `handoff` on its next
    /// call. Approving resumes the task from the queue; denying (or the timeout) ends it dead.
    Handoff {
        /// The approval's id, not empty.
        approval_id: String,
        /// Why a person must take over.
        reason: String,
        /// What they need to see.
        context: Value,
        /// How long it may wait, milliseconds, more than 0.
        timeout_ms: u64,
    },
    /// Operator: take a dead task out of the DLQ and queue it with a fresh budget.
    DlqRequeue {
        /// Who.
        by: String,
        /// Their note.
        note: Option<String>,
    },
    /// Operator: discard a dead task (it ends cancelled).
    DlqDiscard {
        /// Who.
        by: String,
        /// Their note.
        note: Option<String>,
    },
    /// Timer: end the task if its deadline has passed.
    CheckDeadline,
}

/// Who asks for an approval ([`Command::RequestApproval`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Asker {
    /// The worker holding a running task's lease, with its lease token.
    Holder {
        /// The lease token.
        token: String,
    },
    /// An operator: only a queued task (a running one is its holder's to put on hold).
    Operator,
    /// keel itself: a tool call through keel that needs a person puts its task on hold,
    /// queued or running (for the holder, whose token keel does not keep).
    Keel,
}

/// What `decide` needs from the world: the time and, for a claim, a fresh lease token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ctx {
    /// Now, unix milliseconds.
    pub now_ms: i64,
    /// The token a claim hands out; unguessable (the I/O layer makes it from a CSPRNG).
    pub new_token: String,
}

/// What the supervisor tells the lease holder to do next, in answer to a heartbeat or step.
///
/// [`Directive::Continue`], [`Directive::Cancel`] and [`Directive::Handoff`] (the loop
/// guard's) are produced now; `backtrack` and `degrade` are part of the protocol already and
/// come with later work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Directive {
    /// Go on.
    Continue,
    /// Stop working on the task now; the lease is no longer good for anything but this answer.
    Cancel,
    /// Go back to a checkpoint and try another path.
    Backtrack,
    /// Switch to a cheaper or safer strategy.
    Degrade,
    /// Stop; a person takes over.
    Handoff,
}

/// The outcome of a command: events to append in this order, all or none, and the directive
/// for the caller when it is a lease holder's call (`None` for others).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Decision {
    /// Events to append atomically, in order. Empty when nothing changes.
    pub events: Vec<TaskEvent>,
    /// The directive for the caller.
    pub directive: Option<Directive>,
}

impl Decision {
    pub(crate) fn events(events: Vec<TaskEvent>) -> Self {
        Self {
            events,
            directive: None,
        }
    }

    pub(crate) fn with_directive(mut self, directive: Directive) -> Self {
        self.directive = Some(directive);
        self
    }
}
