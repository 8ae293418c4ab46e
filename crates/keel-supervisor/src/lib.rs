//! The pure core of keel's durable tasks (DESIGN §3 "Tasks", §5 "Nothing is lost", §6).
//!
//! Event sourcing in Restate's style: a task's event log is the truth and its state is
//! derived by folding the events.
//!
//! - [`decide`] turns a [`Command`] (a worker's call, an operator's, a timer's) and the task's
//!   current state into a [`Decision`]: the [`TaskEvent`]s to append, and the [`Directive`]
//!   for a lease holder. It refuses with a [`TaskError`] that knows its HTTP status.
//! - [`evolve`] folds one event into the state; [`fold`] folds several.
//! - [`TaskEvent::to_data`] / [`TaskEvent::from_event`] are the events' encoding in the log.
//! - [`renew`] extends a lease for a heartbeat, which is deliberately not an event.
//!
//! This crate does no I/O, reads no clock and has no runtime: time and fresh lease tokens
//! come in through [`Ctx`]. The I/O layer (keel's supervisor service) loads a task, decides,
//! appends the events atomically, folds them, and runs the timers ([`Command::ExpireLease`],
//! [`Command::ExpireApproval`], [`Command::CheckDeadline`]).
//!
//! ```
//! use keel_supervisor::{Command, Ctx, Directive, TaskState, decide, fold};
//!
//! let ctx = Ctx { now_ms: 1_000, new_token: "tok-1".into() };
//! let create = Command::Create {
//!     id: "t1".into(), agent: "researcher".into(), input: serde_json::json!({"q": "why"}),
//!     deadline_ms: None, max_attempts: 3, max_steps: None,
//! };
//! let task = fold(None, &decide(None, &create, &ctx).unwrap().events, ctx.now_ms).unwrap();
//! let claim = Command::Claim { worker: "w1".into(), lease_ttl_ms: 30_000 };
//! let claimed = decide(Some(&task), &claim, &ctx).unwrap();
//! assert_eq!(claimed.directive, Some(Directive::Continue));
//! let task = fold(Some(task), &claimed.events, ctx.now_ms).unwrap();
//! assert_eq!(task.state, TaskState::Running);
//! assert_eq!(task.attempts, 1);
//! ```

pub mod command;
mod decide;
pub mod error;
pub mod event;
mod evolve;
pub mod service;
pub mod task;

pub use command::{Asker, Command, Ctx, Decision, Directive};
pub use decide::{decide, renew};
pub use error::TaskError;
pub use event::{DeadReason, DecodeError, TaskEvent};
pub use evolve::{evolve, fold};
pub use task::{
    Approval, ApprovalDecision, ApprovalDefault, CheckpointRef, Lease, Task, TaskState, token_hash,
};

/// Words that are no task's id: `/v1/tasks/claim` is the claim call, and HTTP clients resolve
/// `.` and `..` away.
pub const RESERVED_TASK_IDS: [&str; 3] = ["claim", ".", ".."];

#[cfg(test)]
mod tests;
