//! keel's append-only, hash-chained event log (DESIGN §6).
//!
//! The log is the truth: task state is derived from it. This crate owns the
//! [`EventStore`] trait, the [`TaskStore`] trait for durable tasks (a derived
//! task table written atomically with the task's events, content-addressed
//! blobs, idempotency records, retention), the embedded SQLite implementation
//! ([`SqliteStore`]), the PostgreSQL one for several nodes on one database ([`PgStore`]), the
//! hash chain ([`chain`]) and a conformance suite every implementation must pass
//! (`conformance`, with the `conformance` feature, which also brings `testing::PgServer`). It
//! does not know what events or task snapshots mean; that belongs to the
//! gateway and the supervisor.
//!
//! One chain covers the whole log: `seq` is global and starts at 1, and each
//! event's `hash` covers its content and the previous event's hash (layout in
//! [`chain`]). `keel audit verify` is [`EventStore::verify`]. Retention
//! ([`TaskStore::prune`]) blanks the data of finished tasks' events without
//! breaking the chain; [`chain`] explains how.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub mod chain;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
mod error;
mod postgres;
mod sqlite;
mod task;
#[cfg(any(test, feature = "conformance"))]
pub mod testing;
mod upcoming;

pub use chain::{GENESIS_HASH, blob_hash};
// `Payload` is defined below, beside the trait that takes it.
pub use error::StoreError;
pub use postgres::{PgStore, check_url as check_postgres_url};
pub use sqlite::SqliteStore;
pub use task::{
    BlobRef, DEFAULT_PAGE, IdempotencyRecord, MAX_PAGE, PrunePolicy, PruneReport, StoreStats,
    TaskPage, TaskQuery, TaskRow, TaskStore, TaskWrite,
};
pub use upcoming::{Upcoming, UpcomingCall};

/// One event of the log, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the log: global, from 1, without gaps.
    pub seq: u64,
    /// Task the event belongs to, when it was attributed to one.
    pub task_id: Option<String>,
    /// When the store committed the event: RFC 3339 UTC with milliseconds
    /// (`2026-11-23T13:00:00.123Z`). Never goes backwards along `seq`.
    pub at: String,
    /// The same instant as `at`, in Unix milliseconds.
    pub at_ms: i64,
    /// Event kind name, one of DESIGN §6 (`llm_call`).
    pub kind: String,
    /// Facts of the event, with object keys in canonical (sorted) order.
    /// `null` when `pruned`.
    pub data: serde_json::Value,
    /// `hash` of the event at `seq - 1`, or [`GENESIS_HASH`] for `seq` 1.
    pub prev_hash: String,
    /// Lowercase hex SHA-256 over this event (layout in [`chain`]).
    pub hash: String,
    /// Hash layout of this event: [`chain::LAYOUT_V1`] or [`chain::LAYOUT_V2`].
    #[serde(default = "layout_v1")]
    pub layout: u32,
    /// [`chain::data_hash`] of `data`, which the hash covers (layout 2 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_hash: Option<String>,
    /// Retention removed `data` ([`TaskStore::prune`]); `data_hash` remains.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pruned: bool,
}

fn layout_v1() -> u32 {
    chain::LAYOUT_V1
}

impl Event {
    /// Recomputes this event's hash from its content; equals `hash` when intact.
    ///
    /// For a layout-2 event the hash covers `data_hash`; it is taken as stored
    /// when present and computed from `data` otherwise. Use
    /// [`Event::data_matches_hash`] to check `data` against `data_hash`.
    pub fn compute_hash(&self) -> String {
        if self.layout == chain::LAYOUT_V2 {
            let computed;
            let data_hash = match &self.data_hash {
                Some(h) => h.as_str(),
                None => {
                    computed = chain::data_hash(&chain::canonical_json(&self.data));
                    computed.as_str()
                }
            };
            return chain::HashInput {
                prev_hash: &self.prev_hash,
                seq: self.seq,
                task_id: self.task_id.as_deref(),
                at: &self.at,
                at_ms: self.at_ms,
                kind: &self.kind,
                data: data_hash,
            }
            .hash_v2();
        }
        let data = chain::canonical_json(&self.data);
        chain::HashInput {
            prev_hash: &self.prev_hash,
            seq: self.seq,
            task_id: self.task_id.as_deref(),
            at: &self.at,
            at_ms: self.at_ms,
            kind: &self.kind,
            data: &data,
        }
        .hash()
    }

    /// Whether `data` is what `data_hash` records. True for a pruned event and
    /// for layout 1 (whose hash covers `data` itself). An event as an append returned it
    /// lacks a member given as text, so it is false for one of those: read it back.
    pub fn data_matches_hash(&self) -> bool {
        match (&self.data_hash, self.pruned) {
            (_, true) | (None, false) => true,
            (Some(h), false) => *h == chain::data_hash(&chain::canonical_json(&self.data)),
        }
    }
}

/// Which events [`EventStore::events`] returns. Every filter given must match;
/// the default returns the whole log.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    /// Only events of this task.
    pub task_id: Option<String>,
    /// Only events of this kind (`llm_call`).
    pub kind: Option<String>,
    /// Only events with `seq` strictly greater than this.
    pub after_seq: Option<u64>,
    /// At most this many events (the lowest `seq`s that match).
    pub limit: Option<usize>,
}

/// When an append counts as done.
///
/// Both survive `kill -9` of the process once acknowledged: the commit is in the
/// OS's page cache. They differ on power loss or an OS crash.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Durability {
    /// Acknowledge after the commit is synced to disk (SQLite `synchronous=FULL`).
    /// Survives power loss.
    #[default]
    Fsync,
    /// Acknowledge after the commit is written to the OS (SQLite WAL with
    /// `synchronous=NORMAL`). A power loss may drop the newest commits, never
    /// corrupt the log.
    Relaxed,
}

/// How a store's writer commits: the [`Durability`] of an acknowledged write (of model-call
/// records and of every other write), and how long a busy writer waits for more writes to
/// share a commit.
///
/// A [`Durability`] converts into options that acknowledge every write with it, with the
/// default commit delay ([`WriteOptions::default_commit_delay`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteOptions {
    /// When a write counts as done: task writes, state, and every append but
    /// [`EventStore::append_call`].
    pub durability: Durability,
    /// When the records of a model call ([`EventStore::append_call`]) count as done. A commit
    /// holding any other write is made with [`WriteOptions::durability`] (so a synced commit
    /// also syncs the calls before it: a log never loses an event and keeps a later one).
    pub call_durability: Durability,
    /// When at least [`COMMIT_SIBLINGS`] more writes are queued behind the one the writer
    /// picks up (it is busy), it waits this long for more before committing them all. One
    /// commit then carries many calls' events, which costs less CPU than many small
    /// commits; a write that finds the writer idle is committed at once. Zero never waits.
    /// `None`: [`WriteOptions::default_commit_delay`] of each commit's durability.
    pub commit_delay: Option<std::time::Duration>,
    /// The application's count of calls in progress that will write: the SQLite writer's
    /// commit delay ends as soon as each of them has queued its write (see [`Upcoming`]).
    /// The PostgreSQL writer does not use it.
    pub upcoming: Upcoming,
}

impl WriteOptions {
    /// The commit delay unless configured: 200 microseconds with [`Durability::Relaxed`],
    /// whose commits take a few tens of microseconds, so that under load the writer would
    /// otherwise commit every two or three writes; none with [`Durability::Fsync`], where
    /// the sync of each commit already gathers the writes that arrive meanwhile (a delay
    /// there only adds to every writer's wait: measured, it cut durable appends with 16
    /// and 256 writers by a fifth to a third).
    pub fn default_commit_delay(durability: Durability) -> std::time::Duration {
        match durability {
            Durability::Fsync => std::time::Duration::ZERO,
            Durability::Relaxed => std::time::Duration::from_micros(200),
        }
    }

    /// The wait of a busy writer before a commit made with `durability`: `configured` (the
    /// options' [`WriteOptions::commit_delay`]), else [`WriteOptions::default_commit_delay`].
    pub(crate) fn commit_delay_for(
        configured: Option<std::time::Duration>,
        durability: Durability,
    ) -> std::time::Duration {
        configured.unwrap_or_else(|| Self::default_commit_delay(durability))
    }

    /// The two durabilities, for the writer.
    pub(crate) fn durabilities(&self) -> Durabilities {
        Durabilities {
            writes: self.durability,
            calls: self.call_durability,
        }
    }
}

/// The durability of each kind of write, as a writer applies them to its commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Durabilities {
    /// Every write but model-call records.
    pub(crate) writes: Durability,
    /// Model-call records ([`EventStore::append_call`]).
    pub(crate) calls: Durability,
}

impl Durabilities {
    /// The durability of one write: `call` for model-call records.
    pub(crate) fn of(self, call: bool) -> Durability {
        if call { self.calls } else { self.writes }
    }
}

/// Writes queued behind the first that make a writer busy enough to wait
/// [`WriteOptions::commit_delay`] (PostgreSQL's `commit_siblings` plays the same part).
pub const COMMIT_SIBLINGS: usize = 1;

impl From<Durability> for WriteOptions {
    fn from(durability: Durability) -> Self {
        Self {
            durability,
            call_durability: durability,
            commit_delay: None,
            upcoming: Upcoming::default(),
        }
    }
}

/// What [`EventStore::verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verify {
    /// Every link holds.
    Intact {
        /// Number of events checked.
        events: u64,
    },
    /// The first event whose link does not hold.
    Broken {
        /// Its `seq` (for a gap: the `seq` found where another was expected).
        seq: u64,
        /// Why, in lowercase words.
        reason: String,
    },
}

/// An append-only, hash-chained event log.
///
/// Implementations must pass the conformance suite (`conformance::run_all`).
#[async_trait::async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Appends `events` in order, as one atomic unit, and returns them as stored.
    ///
    /// Assigns `seq`, `at`, `prev_hash` and `hash`. Returns once the events are
    /// durable per the store's [`Durability`]; concurrent appends may share one
    /// commit. Events of one call get consecutive `seq`s. An empty `events`
    /// returns an empty list without writing. If the future is dropped after the
    /// request reached the store, the events may still be written. An event given a
    /// member as text ([`NewEvent::with_text`](keel_core::NewEvent::with_text)) is stored
    /// with it and returned without it.
    async fn append(&self, events: Vec<keel_core::NewEvent>) -> Result<Vec<Event>, StoreError>;

    /// Like [`EventStore::append`], and in the same transaction stores
    /// `payloads` content-addressed (a payload already stored is not stored
    /// again) under `owner`, the task they belong to (`None`: no task).
    ///
    /// The events are expected to name the payloads by [`blob_hash`]; a
    /// task's payloads are pruned with the task.
    async fn append_with_payloads(
        &self,
        events: Vec<keel_core::NewEvent>,
        payloads: Vec<Payload>,
        owner: Option<String>,
    ) -> Result<Vec<Event>, StoreError>;

    /// The records of one model call through the gateway (its `llm_call` and the events
    /// around it): like [`EventStore::append_with_payloads`], acknowledged with the store's
    /// call durability ([`WriteOptions::call_durability`]) instead of its durability. A
    /// store without the distinction appends them like any other events.
    async fn append_call(
        &self,
        events: Vec<keel_core::NewEvent>,
        payloads: Vec<Payload>,
        owner: Option<String>,
    ) -> Result<Vec<Event>, StoreError> {
        self.append_with_payloads(events, payloads, owner).await
    }

    /// The events matching `query`, in ascending `seq`.
    async fn events(&self, query: EventQuery) -> Result<Vec<Event>, StoreError>;

    /// Recomputes the whole chain in `seq` order and names the first broken link.
    ///
    /// An error means the log could not be read, not that it is broken.
    async fn verify(&self) -> Result<Verify, StoreError>;

    /// Succeeds when the store can read and its writer is running (for `/readyz`).
    async fn ping(&self) -> Result<(), StoreError>;

    /// The state value under `key` (state keel derives beside the log, such as the
    /// histogram profiles of tool args) and its version; `None` when never saved. Values
    /// under `idem/` are idempotency records: pruning with a retention deletes the ones
    /// older than its cutoff, like the supervisor's.
    async fn load_state(&self, key: &str) -> Result<Option<Versioned>, StoreError>;

    /// Saves `value` under `key` if its version is still `expected` (`None`: no value
    /// yet); returns the new version, or `None` when another writer saved first (read
    /// again, redo the change, save again). Durable like an append.
    async fn save_state(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: Option<u64>,
    ) -> Result<Option<u64>, StoreError>;

    /// [`EventStore::save_state`] for state that sums up model calls (a node's share of the
    /// budgets): durable like the calls' own records ([`WriteOptions::call_durability`]),
    /// so that with `relaxed` calls, saving it every second does not make the store's
    /// writer sync the disk, and hold up the calls queued behind it, every second. A store
    /// without a durability of its own for calls saves it like any state.
    async fn save_call_state(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: Option<u64>,
    ) -> Result<Option<u64>, StoreError> {
        self.save_state(key, value, expected).await
    }

    /// Sets the [`Tap`] told of every commit made through this store handle from now on
    /// (with several nodes: this node's commits); `false` if one is already set.
    fn set_tap(&self, tap: Arc<dyn Tap>) -> bool;
}

/// The state key `ping` writes to prove the store after a failed commit.
const READY_PROBE: &str = "keel/ready_probe";

/// `ping`'s proof that commits work again after one failed (a full disk, a held lock, a
/// read-only standby after a failover): a write of its own commits, not merely a read.
/// Another node's probe may win the compare-and-set: the commit is the proof.
pub(crate) async fn probe_write<S: EventStore + ?Sized>(store: &S) -> Result<(), StoreError> {
    let stamp = Vec::from(chain::now_ms().to_string());
    let version = store.load_state(READY_PROBE).await?.map(|v| v.version);
    store
        .save_state(READY_PROBE, stamp, version)
        .await
        .map(|_| ())
}

/// Sees every event a store commits, right after the commit, on the task that appended
/// it, or on the store's writer thread when that task has gone (keel's observer learns
/// baselines and raises alerts from the log this way, without reading it back). It must not
/// block: hand the work to another task.
pub trait Tap: Send + Sync + 'static {
    /// `events` were committed, in `seq` order (as appends return them: without a member
    /// given as text, so such an event's `data` is not all its `data_hash` covers and
    /// [`Event::data_matches_hash`] is false for it).
    fn committed(&self, events: &[Event]);
}

/// A payload to store content-addressed: its bytes and their [`blob_hash`], computed once
/// (the caller usually needs the hash too, to name the payload in an event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    hash: String,
    bytes: bytes::Bytes,
}

impl Payload {
    /// Hashes `bytes`.
    pub fn new(bytes: bytes::Bytes) -> Self {
        Self {
            hash: blob_hash(&bytes),
            bytes,
        }
    }

    /// The [`blob_hash`] of the bytes.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The bytes.
    pub fn bytes(&self) -> &bytes::Bytes {
        &self.bytes
    }
}

/// A state value and its version (1 for the first save, +1 for each save after it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// The bytes saved.
    pub value: Vec<u8>,
    /// Its version.
    pub version: u64,
}

#[async_trait::async_trait]
impl<S: EventStore + ?Sized> EventStore for Arc<S> {
    async fn append(&self, events: Vec<keel_core::NewEvent>) -> Result<Vec<Event>, StoreError> {
        (**self).append(events).await
    }

    async fn append_with_payloads(
        &self,
        events: Vec<keel_core::NewEvent>,
        payloads: Vec<Payload>,
        owner: Option<String>,
    ) -> Result<Vec<Event>, StoreError> {
        (**self).append_with_payloads(events, payloads, owner).await
    }

    async fn append_call(
        &self,
        events: Vec<keel_core::NewEvent>,
        payloads: Vec<Payload>,
        owner: Option<String>,
    ) -> Result<Vec<Event>, StoreError> {
        (**self).append_call(events, payloads, owner).await
    }

    async fn events(&self, query: EventQuery) -> Result<Vec<Event>, StoreError> {
        (**self).events(query).await
    }

    async fn verify(&self) -> Result<Verify, StoreError> {
        (**self).verify().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        (**self).ping().await
    }

    async fn load_state(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        (**self).load_state(key).await
    }

    async fn save_state(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: Option<u64>,
    ) -> Result<Option<u64>, StoreError> {
        (**self).save_state(key, value, expected).await
    }

    async fn save_call_state(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: Option<u64>,
    ) -> Result<Option<u64>, StoreError> {
        (**self).save_call_state(key, value, expected).await
    }

    fn set_tap(&self, tap: Arc<dyn Tap>) -> bool {
        (**self).set_tap(tap)
    }
}
