//! Event kinds of keel's append-only log. The names are fixed by DESIGN §6.

use serde::{Deserialize, Serialize};

use crate::canonical::CanonicalText;

/// What happened. Serialized in `snake_case`, exactly the names of DESIGN §6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A task was created.
    TaskCreated,
    /// A worker claimed a task with a lease.
    TaskClaimed,
    /// A lease was not renewed in time; the task is queued again.
    LeaseExpired,
    /// A worker reported a step.
    StepRecorded,
    /// A worker saved a checkpoint.
    CheckpointSaved,
    /// A model call through the gateway finished (answered, degraded or failed).
    LlmCall,
    /// One attempt of a model call failed.
    LlmAttemptFailed,
    /// The gateway will try the same target again after a delay.
    RetryScheduled,
    /// The gateway moved on to the next target of the route.
    FallbackUsed,
    /// A target's circuit breaker opened.
    BreakerOpened,
    /// A target's circuit breaker let trial calls through.
    BreakerHalfOpened,
    /// A target's circuit breaker closed again.
    BreakerClosed,
    /// The route's static degraded reply was served.
    DegradedReply,
    /// A call was refused because an agent's budget is spent.
    BudgetExceeded,
    /// The loop guard saw a task repeating itself.
    LoopDetected,
    /// An action was checked against the validator.
    ActionChecked,
    /// An action was blocked.
    ActionBlocked,
    /// An action waits for a human decision.
    ApprovalRequested,
    /// A human decided on an approval.
    ApprovalDecided,
    /// A tool was invoked.
    ToolInvoked,
    /// A task was sent back to a checkpoint.
    Backtracked,
    /// A task succeeded.
    TaskSucceeded,
    /// A task attempt failed.
    TaskFailed,
    /// A task ran out of attempts and went to the dead-letter queue.
    TaskDead,
    /// A task was handed to a human.
    TaskHandedOff,
    /// A task was cancelled.
    TaskCancelled,
    /// A task was put back in the queue.
    TaskRequeued,
    /// An alert was raised.
    AlertRaised,
}

impl EventKind {
    /// The fixed name, as stored and shown (`llm_call`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TaskCreated => "task_created",
            Self::TaskClaimed => "task_claimed",
            Self::LeaseExpired => "lease_expired",
            Self::StepRecorded => "step_recorded",
            Self::CheckpointSaved => "checkpoint_saved",
            Self::LlmCall => "llm_call",
            Self::LlmAttemptFailed => "llm_attempt_failed",
            Self::RetryScheduled => "retry_scheduled",
            Self::FallbackUsed => "fallback_used",
            Self::BreakerOpened => "breaker_opened",
            Self::BreakerHalfOpened => "breaker_half_opened",
            Self::BreakerClosed => "breaker_closed",
            Self::DegradedReply => "degraded_reply",
            Self::BudgetExceeded => "budget_exceeded",
            Self::LoopDetected => "loop_detected",
            Self::ActionChecked => "action_checked",
            Self::ActionBlocked => "action_blocked",
            Self::ApprovalRequested => "approval_requested",
            Self::ApprovalDecided => "approval_decided",
            Self::ToolInvoked => "tool_invoked",
            Self::Backtracked => "backtracked",
            Self::TaskSucceeded => "task_succeeded",
            Self::TaskFailed => "task_failed",
            Self::TaskDead => "task_dead",
            Self::TaskHandedOff => "task_handed_off",
            Self::TaskCancelled => "task_cancelled",
            Self::TaskRequeued => "task_requeued",
            Self::AlertRaised => "alert_raised",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event before the store gives it a `seq`, a time and its place in the hash chain.
///
/// `data` must never hold secrets or API keys (DESIGN §6).
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// The task this event belongs to, when the call was attributed to one.
    pub task_id: Option<String>,
    /// What happened.
    pub kind: EventKind,
    /// Facts of the event, as a JSON object; without the member given as text
    /// ([`NewEvent::with_text`]), which replaces a member of the same key added here later.
    pub data: serde_json::Value,
    /// One member of `data` given as its canonical text instead of a tree.
    text: Option<TextMember>,
}

/// A member of an event's data given as canonical JSON text ([`NewEvent::with_text`]): the
/// store prints `text` as the member's value, as it is; only a
/// [`Document`](crate::canonical::Document) makes a [`CanonicalText`], so the stored data stays
/// canonical and reads back as what was hashed.
#[derive(Debug, Clone, PartialEq)]
pub struct TextMember {
    /// The member's key in the event's data.
    pub key: &'static str,
    /// The member's value, printed.
    pub text: CanonicalText,
}

impl NewEvent {
    /// An event of `kind` with `data`, attributed to `task_id` when given.
    pub fn new(kind: EventKind, task_id: Option<String>, data: serde_json::Value) -> Self {
        Self {
            task_id,
            kind,
            data,
            text: None,
        }
    }

    /// An event whose data is `data` and the member `key`, given as canonical text (a model's
    /// answer read as a [`Document`](crate::canonical::Document), which need not become a
    /// tree to be stored). The store prints the member into the stored data at its place in
    /// key order; a member `key` of `data` is left out. The events a store hands back from
    /// an append, and to its tap, carry `data` without this member: read the event back
    /// to have it.
    pub fn with_text(
        kind: EventKind,
        task_id: Option<String>,
        mut data: serde_json::Map<String, serde_json::Value>,
        key: &'static str,
        text: CanonicalText,
    ) -> Self {
        data.remove(key);
        Self {
            task_id,
            kind,
            data: serde_json::Value::Object(data),
            text: Some(TextMember { key, text }),
        }
    }

    /// The member given as text, if any.
    pub fn text_member(&self) -> Option<&TextMember> {
        self.text.as_ref()
    }

    /// The event's parts: its task, kind, data and the member given as text.
    pub fn into_parts(
        self,
    ) -> (
        Option<String>,
        EventKind,
        serde_json::Value,
        Option<TextMember>,
    ) {
        (self.task_id, self.kind, self.data, self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_name_matches_as_str() {
        for kind in [
            EventKind::LlmCall,
            EventKind::BreakerHalfOpened,
            EventKind::TaskHandedOff,
        ] {
            let json = serde_json::to_value(kind).unwrap();
            assert_eq!(json, serde_json::Value::String(kind.as_str().to_owned()));
        }
    }
}
