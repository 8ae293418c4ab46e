//! What became of an approval that is no longer pending: the answer to deciding it again.
//!
//! A pending approval lives in its task's row (`awaiting_human`); once it is decided (by a
//! person, its timeout or the task's deadline) or its task leaves the queue otherwise (a
//! cancel), only the log knows it. Approval ids are not indexed, so the log's
//! `approval_decided` events, then its `approval_requested` ones, are read by kind a page at
//! a time: approvals are few next to the rest of the log, and this runs only when a decision
//! finds nothing pending. An approval whose events retention pruned reads as unknown.

use keel_core::{ApiError, EventKind};
use keel_store::{Event, EventQuery};

use super::{Supervisor, store_error};
use crate::event::ApprovalDecided;
use crate::task::ApprovalDecision;

/// Events read per page while looking.
const PAGE: usize = 1000;

/// Why approval `id`, which is not pending, cannot be decided now: a 409 when it was
/// decided already (saying how and by whom) or its task left the queue otherwise, a 404
/// when no approval `id` was ever requested.
pub(super) async fn not_pending(sv: &Supervisor, id: &str) -> Result<ApiError, ApiError> {
    if let Some(event) = find(sv, EventKind::ApprovalDecided, id).await? {
        let task = event.task_id.as_deref().unwrap_or("-");
        let decided: ApprovalDecided = serde_json::from_value(event.data).map_err(|e| {
            ApiError::internal(format!(
                "approval_decided of task {task} is unreadable: {e}"
            ))
        })?;
        return Ok(ApiError::conflict(
            already_decided(id, task, &decided),
            "approval_already_decided",
        ));
    }
    if let Some(event) = find(sv, EventKind::ApprovalRequested, id).await? {
        let task = event.task_id.unwrap_or_default();
        let state = match sv.store().task(&task).await.map_err(store_error)? {
            Some(row) => row.state,
            None => "pruned".to_owned(),
        };
        return Ok(ApiError::conflict(
            format!("approval {id} is no longer pending: its task {task} is {state}"),
            "approval_not_pending",
        ));
    }
    Ok(ApiError::not_found(
        format!("no approval {id}"),
        "approval_not_found",
    ))
}

/// `approval apr_1 of task t1 was already decided: denied by alice ("too risky")`.
fn already_decided(id: &str, task: &str, decided: &ApprovalDecided) -> String {
    let how = match decided.decision {
        ApprovalDecision::Approve => "approved",
        ApprovalDecision::Deny => "denied",
    };
    let note = decided
        .note
        .as_deref()
        .map(|note| format!(" ({note:?})"))
        .unwrap_or_default();
    format!(
        "approval {id} of task {task} was already decided: {how} by {}{note}",
        decided.by
    )
}

/// The event of `kind` about approval `id`, if the log holds one (an approval id, a fresh
/// UUIDv7, is requested once and decided at most once, so the first found is the one).
async fn find(sv: &Supervisor, kind: EventKind, id: &str) -> Result<Option<Event>, ApiError> {
    let mut after_seq = None;
    loop {
        let query = EventQuery {
            kind: Some(kind.as_str().to_owned()),
            after_seq,
            limit: Some(PAGE),
            ..EventQuery::default()
        };
        let page = sv.store().events(query).await.map_err(store_error)?;
        let full = page.len() == PAGE;
        after_seq = page.last().map(|e| e.seq);
        if let Some(event) = page.into_iter().find(|e| e.data["approval_id"] == id) {
            return Ok(Some(event));
        }
        if !full {
            return Ok(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decided(decision: ApprovalDecision, note: Option<&str>) -> ApprovalDecided {
        ApprovalDecided {
            approval_id: "apr_1".into(),
            decision,
            by: "alice".into(),
            note: note.map(str::to_owned),
        }
    }

    #[test]
    fn the_message_says_how_and_by_whom() {
        assert_eq!(
            already_decided(
                "apr_1",
                "t1",
                &decided(ApprovalDecision::Deny, Some("too risky"))
            ),
            "approval apr_1 of task t1 was already decided: denied by alice (\"too risky\")"
        );
        assert_eq!(
            already_decided("apr_1", "t1", &decided(ApprovalDecision::Approve, None)),
            "approval apr_1 of task t1 was already decided: approved by alice"
        );
    }
}
