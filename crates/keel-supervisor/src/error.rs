//! Why a command was refused. A refused command appends nothing and changes nothing.

use crate::task::TaskState;

/// A command the task cannot take, with the HTTP status the worker protocol answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskError {
    /// The task (or the approval) does not exist. `what` names it: `task t1`,
    /// `approval a1 of task t1`.
    #[error("{what} not found")]
    NotFound {
        /// What was looked for.
        what: String,
    },
    /// A create named a task that exists already.
    #[error("task {task} already exists")]
    Exists {
        /// The task's id.
        task: String,
    },
    /// The lease token is wrong or old, or the task holds no lease.
    #[error("lease token is not the current lease of task {task}, which is {state}")]
    StaleLease {
        /// The task's id.
        task: String,
        /// The state the task is in.
        state: TaskState,
    },
    /// The task's state does not allow the action (complete after cancel, claim of a task
    /// that is not queued…).
    #[error("cannot {action} task {task}: it is {state}")]
    InvalidState {
        /// The task's id.
        task: String,
        /// The state the task is in.
        state: TaskState,
        /// What was tried, in words (`complete`, `claim`).
        action: &'static str,
    },
    /// A field of the command is out of its range.
    #[error("{field}: {message}")]
    Invalid {
        /// The field, as named in the worker protocol.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

impl TaskError {
    /// `NotFound` for the task `id`, for a caller that looked it up and found nothing.
    pub fn task_not_found(id: &str) -> Self {
        Self::NotFound {
            what: format!("task {id}"),
        }
    }

    /// The HTTP status of the worker protocol (DESIGN §3). Exhaustive on purpose: a new
    /// variant must choose.
    pub fn status(&self) -> u16 {
        match self {
            Self::NotFound { .. } => 404,
            Self::Exists { .. } | Self::StaleLease { .. } | Self::InvalidState { .. } => 409,
            Self::Invalid { .. } => 422,
        }
    }
}
