//! Durable tasks: a derived task table written atomically with the task's
//! events, content-addressed blobs, idempotency records, and retention.
//!
//! The supervisor owns what a task *means*: its state machine, its snapshot
//! (opaque JSON here), its lease and approval rules. The store owns making each
//! step of it atomic: one [`TaskWrite`] checks the task's version, upserts its
//! row, appends its events to the one hash chain, stores its blobs and its
//! idempotency record, all or nothing ([`TaskStore::write_task`]). The row is
//! derived state kept beside the log so that listing and claiming need no replay.
//!
//! Blobs are keyed by [`blob_hash`](crate::blob_hash) (SHA-256 hex), so the
//! same bytes (a conversation prefix repeated in every model call, an unchanged
//! checkpoint) are stored once. A blob lives as long as some task references
//! it: explicitly through [`TaskWrite::blob_refs`], or implicitly (kind
//! `payload`) when the write that stored it named no ref for it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{Event, EventStore, StoreError};

/// Most rows one [`TaskStore::tasks`] page holds.
pub const MAX_PAGE: usize = 1000;

/// Rows per [`TaskStore::tasks`] page when the query says 0.
pub const DEFAULT_PAGE: usize = 100;

/// The derived state of one task, as the store keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRow {
    /// Task id.
    pub id: String,
    /// Agent the task belongs to.
    pub agent: String,
    /// State name (`queued`, `running`, `awaiting_human`, `succeeded`, `dead`,
    /// `cancelled`, ...). Retention prunes only `succeeded` and `cancelled`.
    pub state: String,
    /// Number of task events written so far (optimistic concurrency token).
    pub version: u64,
    /// The supervisor's task JSON, opaque to the store.
    pub snapshot: serde_json::Value,
    /// Creation time, Unix ms. Fixed by the create: later writes keep the stored value.
    pub created_at_ms: i64,
    /// Last write time, Unix ms; retention measures a finished task's age from it.
    pub updated_at_ms: i64,
    /// When the current lease expires (state `running`), Unix ms.
    pub lease_expires_at_ms: Option<i64>,
    /// When the pending approval expires (state `awaiting_human`), Unix ms.
    pub approval_expires_at_ms: Option<i64>,
    /// The task's deadline, Unix ms, while it is not finished (states `queued`, `running`,
    /// `awaiting_human`); `None` without a deadline, and for a finished task (the index
    /// [`TaskStore::expired_deadlines`] reads holds only the rows that have one).
    pub deadline_at_ms: Option<i64>,
}

/// A reference from a task to a stored blob, so retention knows what it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    /// [`blob_hash`](crate::blob_hash) of the blob; it must be stored by this
    /// write or already be in the store.
    pub hash: String,
    /// What the blob is to the task: `checkpoint` for checkpoints (the kind
    /// `keep_checkpoints` prunes), anything else is kept while the task is.
    pub kind: String,
    /// Ordering among the task's refs of this kind (the checkpoint number);
    /// higher is newer.
    pub seq: u64,
}

/// The answer recorded for an idempotency key, returned again on a repeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    /// Namespace of the key (for example the endpoint and task).
    pub scope: String,
    /// The caller's key.
    pub key: String,
    /// HTTP status of the first answer.
    pub status: u16,
    /// Body of the first answer.
    pub body: serde_json::Value,
    /// A hash of the request that got the answer, so that a repeat with the same key and
    /// another request can be refused; `None` in records written before keel kept it.
    #[serde(default)]
    pub request_hash: Option<String>,
}

/// One atomic step of a task: see [`TaskStore::write_task`].
#[derive(Debug, Clone)]
pub struct TaskWrite {
    /// The row after this write.
    pub row: TaskRow,
    /// The version the writer read; `None` creates the task.
    pub expected_version: Option<u64>,
    /// Events to append, in order.
    pub events: Vec<keel_core::NewEvent>,
    /// Content-addressed payloads to store (a blob already stored is not stored again).
    pub blobs: Vec<bytes::Bytes>,
    /// What the blobs are to the task (checkpoints, ...). A blob of `blobs`
    /// named by no ref gets an implicit ref of kind `payload`.
    pub blob_refs: Vec<BlobRef>,
    /// The answer to record under an idempotency key.
    pub idempotency: Option<IdempotencyRecord>,
}

/// Which tasks [`TaskStore::tasks`] lists. Every filter given must match.
#[derive(Debug, Clone, Default)]
pub struct TaskQuery {
    /// Only tasks in this state.
    pub state: Option<String>,
    /// Only tasks of this agent.
    pub agent: Option<String>,
    /// Page size: 0 means 100, at most 1000.
    pub limit: usize,
    /// Where to continue: [`TaskPage::next`] of the previous page (of a query in the same
    /// order; a cursor of the other order is [`StoreError::InvalidCursor`]).
    pub cursor: Option<String>,
    /// Newest first (by `created_at_ms`, then `id`, both descending) instead of oldest first.
    pub newest_first: bool,
}

/// One page of [`TaskStore::tasks`].
#[derive(Debug, Clone, PartialEq)]
pub struct TaskPage {
    /// Tasks ordered by (`created_at_ms`, `id`), or the reverse when
    /// [`TaskQuery::newest_first`].
    pub tasks: Vec<TaskRow>,
    /// Cursor of the next page; `None` on the last one.
    pub next: Option<String>,
}

impl TaskQuery {
    /// The page size asked for: 0 means [`DEFAULT_PAGE`], at most [`MAX_PAGE`].
    pub(crate) fn page_size(&self) -> usize {
        match self.limit {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        }
    }

    /// The (`created_at_ms`, `id`) the page starts after, from the cursor.
    pub(crate) fn after(&self) -> Result<Option<(i64, String)>, StoreError> {
        let Some(cursor) = &self.cursor else {
            return Ok(None);
        };
        let text = hex::decode(cursor)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or(StoreError::InvalidCursor)?;
        // A newest-first cursor says so; one without the prefix continues oldest first.
        let (newest_first, text) = match text.strip_prefix(NEWEST_FIRST_CURSOR) {
            Some(rest) => (true, rest),
            None => (false, text.as_str()),
        };
        if newest_first != self.newest_first {
            return Err(StoreError::InvalidCursor);
        }
        let (created, id) = text.split_once(':').ok_or(StoreError::InvalidCursor)?;
        let created = created.parse().map_err(|_| StoreError::InvalidCursor)?;
        Ok(Some((created, id.to_owned())))
    }

    /// The SQL comparison a row's (`created_at_ms`, `id`) passes to come after the cursor's.
    pub(crate) fn after_op(&self) -> &'static str {
        if self.newest_first { "<" } else { ">" }
    }

    /// The SQL `ORDER BY` terms of the page.
    pub(crate) fn order_by(&self) -> &'static str {
        if self.newest_first {
            "created_at_ms DESC, id DESC"
        } else {
            "created_at_ms, id"
        }
    }

    /// The page of `fetched`, which was read with one row more than [`Self::page_size`] to
    /// tell whether a next page exists; its cursor is opaque (hex of `created_at_ms:id`, with
    /// a prefix when newest first).
    pub(crate) fn page(&self, mut fetched: Vec<TaskRow>) -> TaskPage {
        let size = self.page_size();
        let next = if fetched.len() > size {
            fetched.truncate(size);
            fetched.last().map(|t| {
                let prefix = if self.newest_first {
                    NEWEST_FIRST_CURSOR
                } else {
                    ""
                };
                hex::encode(format!("{prefix}{}:{}", t.created_at_ms, t.id))
            })
        } else {
            None
        };
        TaskPage {
            tasks: fetched,
            next,
        }
    }
}

/// What a newest-first page's cursor starts with (before hex).
const NEWEST_FIRST_CURSOR: &str = "desc:";

/// Sizes of the store, for metrics and the benchmark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStats {
    /// Events in the log (pruned ones included: rows are never deleted).
    pub events: u64,
    /// Task rows.
    pub tasks: u64,
    /// Distinct blobs stored.
    pub blobs: u64,
    /// Bytes of blob content stored.
    pub blob_bytes: u64,
    /// Size of the database on disk, WAL included.
    pub db_bytes: u64,
}

/// What [`TaskStore::prune`] removes. Each `None` skips that part.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrunePolicy {
    /// Prune `succeeded` and `cancelled` tasks last written before this time
    /// (Unix ms). `dead` tasks (the DLQ) are never pruned.
    pub finished_before_ms: Option<i64>,
    /// Keep only this many newest checkpoints per task (by [`BlobRef::seq`]).
    pub keep_checkpoints: Option<usize>,
}

/// What [`TaskStore::prune`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneReport {
    /// Task rows deleted.
    pub tasks: u64,
    /// Events whose `data` was blanked (the rows and the chain stay).
    pub events: u64,
    /// Checkpoint refs dropped by `keep_checkpoints`.
    pub checkpoints: u64,
    /// Blobs deleted because no task references them any more.
    pub blobs: u64,
    /// Bytes of those blobs.
    pub blob_bytes: u64,
    /// Idempotency records older than the cutoff, deleted.
    pub idempotency_keys: u64,
}

/// An [`EventStore`] that also keeps durable tasks.
///
/// Implementations must pass the task properties of the conformance suite
/// (`conformance::run_all_tasks`).
#[async_trait::async_trait]
pub trait TaskStore: EventStore {
    /// Applies one task write as one transaction and returns the appended events.
    ///
    /// Checks that the stored version is `expected_version` (`None`: the task
    /// must not exist) or fails with [`StoreError::Conflict`]; checks that
    /// `row.version` is `expected_version` (0 for a create) plus the number of
    /// events, or fails with [`StoreError::InvalidWrite`]; upserts the row
    /// (keeping the stored `created_at_ms`); appends the events to the global
    /// chain; stores the blobs (once per hash) and their refs; records the
    /// idempotency answer, failing with [`StoreError::DuplicateKey`] if its
    /// `(scope, key)` is taken. On any error nothing of the write is applied.
    /// Concurrent writes share commits; one failing does not fail the others.
    async fn write_task(&self, write: TaskWrite) -> Result<Vec<Event>, StoreError>;

    /// The task's row, if it exists.
    async fn task(&self, id: &str) -> Result<Option<TaskRow>, StoreError>;

    /// A page of tasks ordered by (`created_at_ms`, `id`). Errors with
    /// [`StoreError::InvalidCursor`] for a cursor this store did not hand out.
    async fn tasks(&self, query: TaskQuery) -> Result<TaskPage, StoreError>;

    /// Up to `limit` `queued` tasks of `agent`, oldest first (FIFO claim order).
    async fn next_queued(&self, agent: &str, limit: usize) -> Result<Vec<TaskRow>, StoreError>;

    /// Up to `limit` `running` tasks whose lease expired at or before `now_ms`,
    /// soonest-expired first.
    async fn expired_leases(&self, now_ms: i64, limit: usize) -> Result<Vec<TaskRow>, StoreError>;

    /// Up to `limit` `awaiting_human` tasks whose approval expired at or before
    /// `now_ms`, soonest-expired first.
    async fn expired_approvals(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<TaskRow>, StoreError>;

    /// Up to `limit` tasks in `queued`, `running` or `awaiting_human` whose deadline
    /// ([`TaskRow::deadline_at_ms`]) is at or before `now_ms`, soonest first.
    async fn expired_deadlines(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<TaskRow>, StoreError>;

    /// The answer recorded under `(scope, key)`, if any.
    async fn idempotent(
        &self,
        scope: &str,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, StoreError>;

    /// The blob stored under `hash`, if any.
    async fn blob(&self, hash: &str) -> Result<Option<bytes::Bytes>, StoreError>;

    /// Number of tasks per state, ordered by state name; states without tasks are absent.
    async fn count_by_state(&self) -> Result<Vec<(String, u64)>, StoreError>;

    /// Sizes of the store.
    async fn stats(&self) -> Result<StoreStats, StoreError>;

    /// Retention, as one transaction: deletes the rows and blob refs of
    /// `succeeded` and `cancelled` tasks last written before
    /// `finished_before_ms`, blanking the data of their events (the chain stays
    /// verifiable, see [`chain`](crate::chain)); drops all but the newest
    /// `keep_checkpoints` checkpoint refs of every task; then deletes every blob
    /// no ref points to.
    async fn prune(&self, policy: PrunePolicy) -> Result<PruneReport, StoreError>;
}

#[async_trait::async_trait]
impl<S: TaskStore + ?Sized> TaskStore for Arc<S> {
    async fn write_task(&self, write: TaskWrite) -> Result<Vec<Event>, StoreError> {
        (**self).write_task(write).await
    }

    async fn task(&self, id: &str) -> Result<Option<TaskRow>, StoreError> {
        (**self).task(id).await
    }

    async fn tasks(&self, query: TaskQuery) -> Result<TaskPage, StoreError> {
        (**self).tasks(query).await
    }

    async fn next_queued(&self, agent: &str, limit: usize) -> Result<Vec<TaskRow>, StoreError> {
        (**self).next_queued(agent, limit).await
    }

    async fn expired_leases(&self, now_ms: i64, limit: usize) -> Result<Vec<TaskRow>, StoreError> {
        (**self).expired_leases(now_ms, limit).await
    }

    async fn expired_approvals(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<TaskRow>, StoreError> {
        (**self).expired_approvals(now_ms, limit).await
    }

    async fn expired_deadlines(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<TaskRow>, StoreError> {
        (**self).expired_deadlines(now_ms, limit).await
    }

    async fn idempotent(
        &self,
        scope: &str,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        (**self).idempotent(scope, key).await
    }

    async fn blob(&self, hash: &str) -> Result<Option<bytes::Bytes>, StoreError> {
        (**self).blob(hash).await
    }

    async fn count_by_state(&self) -> Result<Vec<(String, u64)>, StoreError> {
        (**self).count_by_state().await
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        (**self).stats().await
    }

    async fn prune(&self, policy: PrunePolicy) -> Result<PruneReport, StoreError> {
        (**self).prune(policy).await
    }
}
