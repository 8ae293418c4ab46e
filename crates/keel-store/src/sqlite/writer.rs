//! The single writer thread and its group commit.
//!
//! One `std::thread` owns the write connection. It blocks on a channel of
//! write requests (appends, task writes, prunes), takes the first one and
//! everything else already waiting (up to [`MAX_BATCH_EVENTS`] events), applies
//! them all in one transaction, and then answers each request. So N concurrent
//! writers pay for about one commit (and one fsync with
//! [`Durability::Fsync`](crate::Durability::Fsync)), not N.
//! When it is busy (requests were already queued behind the first), it first
//! waits [`WriteOptions::commit_delay`](crate::WriteOptions::commit_delay) for more
//! (by default only for a commit that is not synced): without that, a steady stream of calls
//! meets a writer whose commits take tens of microseconds and so carry two or three
//! calls each, and the commits' fixed cost (locks, WAL frames, wake-ups) is most of
//! its work.
//!
//! A commit is synced (`synchronous=FULL`) when any write in it must be: a batch of
//! nothing but model-call records ([`EventStore::append_call`](crate::EventStore::append_call))
//! is committed with the call durability, any other with the store's durability. The
//! writer switches `synchronous` between commits only when it changes. Since the WAL
//! is one file written in order, a synced commit also syncs every commit before it.
//!
//! Each task write and prune runs inside its own `SAVEPOINT`: one that fails
//! (a version conflict, a duplicate idempotency key, an SQL error) is rolled
//! back to its savepoint and answered with its error, and the rest of the
//! batch commits. Plain appends cannot be refused, so they run without one; an
//! SQL error in an append fails the whole batch. A failed commit is answered with an error to every request in it,
//! and the thread goes on with the next batch. The chain head is read inside
//! each write transaction, so a rolled-back batch leaves nothing to undo. The
//! thread ends once every sender is dropped and the queue is drained.
//!
//! The writer is the one serial stage, so everything that does not need the
//! chain head happens before a request is queued, on the caller's thread: each
//! event's data is canonicalised, printed and hashed once ([`Prepared`]), and
//! the writer only links the chain (`hash` needs `prev_hash`) and inserts. Its
//! statements, `SAVEPOINT`s included, are prepared once and cached.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use keel_core::NewEvent;

use crate::chain::{self, GENESIS_HASH, HashInput, LAYOUT_V2};
use crate::{
    COMMIT_SIBLINGS, Durabilities, Durability, Event, PrunePolicy, PruneReport, StoreError,
    TaskWrite, WriteOptions,
};

/// Most events one commit takes from the queue. A single request larger than
/// this is still written whole, in its own commit.
pub(crate) const MAX_BATCH_EVENTS: usize = 1024;

/// How many write requests may wait for the writer before writers wait to enqueue.
pub(crate) const QUEUE_CAPACITY: usize = 4096;

/// Where the answer of one request goes.
pub(crate) type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// The tap told of a store's commits, set once after the store opens; the writer holds it
/// too, to tell it of committed events whose caller has gone ([`answer`]).
pub(crate) type TapCell = Arc<std::sync::OnceLock<Arc<dyn crate::Tap>>>;

/// Where the answer of a write that appends events goes. When the caller has gone (a client
/// that left while its call's records committed), the writer tells the tap itself, so the
/// observer still sees every committed event.
pub(crate) type EventsReply = Reply<Vec<Event>>;

/// The caller's end of an [`EventsReply`]. Dropped before its answer was read (its caller
/// gone), it closes the channel, so that either the writer finds no one to answer and tells
/// the tap itself, or the answer already sent is taken here and the tap told of it.
struct EventsAnswer<'a> {
    answer: oneshot::Receiver<Result<Vec<Event>, StoreError>>,
    tap: Option<&'a Arc<dyn crate::Tap>>,
    read: bool,
}

impl EventsAnswer<'_> {
    /// The answer, its events told to the tap; `None` when the writer dropped the request.
    async fn read(&mut self) -> Option<Result<Vec<Event>, StoreError>> {
        let answer = (&mut self.answer).await.ok();
        self.read = true;
        if let (Some(Ok(events)), Some(tap)) = (&answer, &self.tap)
            && !events.is_empty()
        {
            tap.committed(events);
        }
        answer
    }
}

impl Drop for EventsAnswer<'_> {
    fn drop(&mut self) {
        if self.read {
            return;
        }
        self.answer.close();
        if let (Ok(Ok(events)), Some(tap)) = (self.answer.try_recv(), &self.tap)
            && !events.is_empty()
        {
            tap.committed(&events);
        }
    }
}

/// One event with everything that does not depend on the chain head
/// computed: its canonical data, that data's canonical JSON text (what is
/// stored) and [`chain::data_hash`] of that text.
pub(crate) struct Prepared {
    pub(crate) task_id: Option<String>,
    pub(crate) kind: &'static str,
    /// The canonical data, handed back in the stored [`Event`] (without a member given as
    /// text).
    pub(crate) data: serde_json::Value,
    /// `data` printed once; the stored column and the input of `data_hash`.
    pub(crate) text: String,
    pub(crate) data_hash: String,
}

impl Prepared {
    /// Canonicalises, prints and hashes `event`'s data, taking it by value. A member given
    /// as text ([`NewEvent::with_text`]) is printed into `text` and is not in `data`.
    pub(crate) fn new(event: NewEvent) -> Self {
        let (task_id, kind, data, member) = event.into_parts();
        let print = |data: &serde_json::Value| match &member {
            None => chain::canonical_text(data),
            Some(member) => chain::canonical_text_with(data, member),
        };
        let mut data = chain::canonicalize(data);
        let mut text = print(&data);
        // A key serde_json reserves can only be in the data if its name is in the text: only
        // then is the tree walked ([`chain::for_storage`]) and printed again.
        if chain::may_hold_reserved_keys(&text) {
            data = chain::for_storage(data);
            text = print(&data);
        }
        let data_hash = chain::data_hash(&text);
        Self {
            task_id,
            kind: kind.as_str(),
            data,
            text,
            data_hash,
        }
    }

    /// [`Prepared::new`] of each event, in order.
    pub(crate) fn all(events: Vec<NewEvent>) -> Vec<Self> {
        events.into_iter().map(Self::new).collect()
    }
}

/// What a store keeps of its writer thread (SQLite's or a PostgreSQL node's): the queue to
/// it, the thread, and the tap told of its commits. Dropping it closes the queue and waits
/// for the thread to commit what is queued.
pub(crate) struct WriterHandle {
    /// `None` once closing.
    queue: Option<mpsc::Sender<Request>>,
    /// `None` once joined.
    thread: Option<std::thread::JoinHandle<()>>,
    tap: TapCell,
    /// The store, for the log line of a writer that panicked.
    store: String,
    /// The error of a write the writer can no longer take.
    stopped: Box<dyn Fn() -> StoreError + Send + Sync>,
    /// Told of every queued write, when the writer lingers on it ([`Linger`]).
    upcoming: Option<crate::Upcoming>,
}

impl WriterHandle {
    /// `stopped` makes the error of a write once the writer is gone.
    pub(crate) fn new(
        (queue, tap): (mpsc::Sender<Request>, TapCell),
        thread: std::thread::JoinHandle<()>,
        store: String,
        stopped: impl Fn() -> StoreError + Send + Sync + 'static,
    ) -> Self {
        Self {
            queue: Some(queue),
            thread: Some(thread),
            tap,
            store,
            stopped: Box::new(stopped),
            upcoming: None,
        }
    }

    /// Tells `upcoming` of every write queued, for a writer that [`Linger`]s on it (and
    /// tells it of the writes it takes).
    pub(crate) fn counting(mut self, upcoming: crate::Upcoming) -> Self {
        self.upcoming = Some(upcoming);
        self
    }

    /// The error of a write the writer can no longer take.
    pub(crate) fn stopped(&self) -> StoreError {
        (self.stopped)()
    }

    /// Queues a write.
    async fn enqueue(&self, request: Request) -> Result<(), StoreError> {
        let queue = self.queue.as_ref().ok_or_else(|| self.stopped())?;
        queue.send(request).await.map_err(|_| self.stopped())?;
        if let Some(upcoming) = &self.upcoming {
            upcoming.queued();
        }
        Ok(())
    }

    /// Queues a write and waits for its answer.
    async fn submit<T>(&self, request: impl FnOnce(Reply<T>) -> Request) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.enqueue(request(reply)).await?;
        // A writer that dies drops `reply`, so this never hangs.
        answer.await.map_err(|_| self.stopped())?
    }

    /// Queues a write that appends events and waits for them; the tap, if any, is told of
    /// them once committed, whether or not this caller is still waiting ([`EventsReply`]).
    async fn submit_events(
        &self,
        request: impl FnOnce(EventsReply) -> Request,
    ) -> Result<Vec<Event>, StoreError> {
        let (reply, answer) = oneshot::channel();
        let mut answer = EventsAnswer {
            answer,
            tap: self.tap.get(),
            read: false,
        };
        self.enqueue(request(reply)).await?;
        // A writer that dies drops the reply, so this never hangs.
        answer.read().await.unwrap_or_else(|| Err(self.stopped()))
    }

    /// `EventStore::append`, `append_with_payloads` and (`call`) `append_call`: the events
    /// prepared here, on the caller's thread (in parallel with other callers, not in the one
    /// writer), then queued.
    pub(crate) async fn append(
        &self,
        events: Vec<NewEvent>,
        payloads: Payloads,
        call: bool,
    ) -> Result<Vec<Event>, StoreError> {
        let events = Prepared::all(events);
        self.submit_events(|reply| Request::Append(events, payloads, reply, call))
            .await
    }

    /// `TaskStore::write_task`.
    pub(crate) async fn write_task(&self, mut write: TaskWrite) -> Result<Vec<Event>, StoreError> {
        let events = Prepared::all(std::mem::take(&mut write.events));
        self.submit_events(|reply| Request::Task(Box::new(write), events, reply))
            .await
    }

    /// `EventStore::save_state`, or `save_call_state` when `call`.
    pub(crate) async fn save_state(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: Option<u64>,
        call: bool,
    ) -> Result<Option<u64>, StoreError> {
        let write = StateWrite {
            key: key.to_owned(),
            value,
            expected,
            call,
        };
        self.submit(|reply| Request::State(write, reply)).await
    }

    /// `TaskStore::prune`.
    pub(crate) async fn prune(&self, policy: PrunePolicy) -> Result<PruneReport, StoreError> {
        self.submit(|reply| Request::Prune(policy, reply)).await
    }

    /// Whether the writer still takes writes.
    pub(crate) fn is_running(&self) -> bool {
        self.queue.as_ref().is_some_and(|q| !q.is_closed())
    }

    /// Sets the tap; `false` if one is set.
    pub(crate) fn set_tap(&self, tap: Arc<dyn crate::Tap>) -> bool {
        self.tap.set(tap).is_ok()
    }

    /// Closes the queue and waits, off the async threads, for the writer to commit what is
    /// queued: `Ok(false)` when the writer had panicked.
    pub(crate) async fn close(&mut self) -> Result<bool, tokio::task::JoinError> {
        self.queue = None;
        let Some(thread) = self.thread.take() else {
            return Ok(true);
        };
        tokio::task::spawn_blocking(move || thread.join().is_ok()).await
    }
}

impl Drop for WriterHandle {
    fn drop(&mut self) {
        // Closing the channel ends the writer once the queue is drained.
        self.queue = None;
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!(store = %self.store, "event store writer panicked");
        }
    }
}

/// One write call waiting for its commit.
pub(crate) enum Request {
    /// `EventStore::append`: the events, in order, payloads to store with them, and whether
    /// they are a model call's records (`append_call`: acknowledged with the call durability).
    Append(Vec<Prepared>, Payloads, EventsReply, bool),
    /// `TaskStore::write_task`: the write (its `events` moved out) and its events.
    Task(Box<TaskWrite>, Vec<Prepared>, EventsReply),
    /// `TaskStore::prune`.
    Prune(PrunePolicy, Reply<PruneReport>),
    /// `EventStore::save_state` and `save_call_state`.
    State(StateWrite, Reply<Option<u64>>),
}

/// One compare-and-set of a state value.
pub(crate) struct StateWrite {
    pub(crate) key: String,
    pub(crate) value: Vec<u8>,
    /// The version the caller read (`None`: it read no value).
    pub(crate) expected: Option<u64>,
    /// State that sums up model calls (`EventStore::save_call_state`): committed with the
    /// calls' durability, not the store's.
    pub(crate) call: bool,
}

impl Request {
    /// Weight of the request in a batch (events it appends; at least 1).
    pub(crate) fn weight(&self) -> usize {
        match self {
            Self::Append(events, payloads, ..) => (events.len() + payloads.blobs.len()).max(1),
            Self::Task(_, events, _) => events.len().max(1),
            Self::Prune(..) | Self::State(..) => 1,
        }
    }

    /// The durability the request must be acknowledged with.
    pub(crate) fn durability(&self, durabilities: Durabilities) -> Durability {
        let call = matches!(
            self,
            Self::Append(.., true) | Self::State(StateWrite { call: true, .. }, _)
        );
        durabilities.of(call)
    }
}

/// The durability `batch` is committed with: synced when any request in it must be.
pub(crate) fn commit_durability(batch: &[Request], durabilities: Durabilities) -> Durability {
    if batch
        .iter()
        .any(|r| r.durability(durabilities) == Durability::Fsync)
    {
        Durability::Fsync
    } else {
        Durability::Relaxed
    }
}

/// What one request produced, before its answer is sent.
pub(crate) enum Done {
    /// Where each appended event went in the chain, in order.
    Events(Vec<Link>),
    Pruned(PruneReport),
    /// The state value's new version, or `None` when another writer got there first.
    Saved(Option<u64>),
}

/// The chain fields of one inserted event; with its [`Prepared`] and the
/// batch's [`Stamp`] it is the stored [`Event`].
pub(crate) struct Link {
    pub(crate) seq: u64,
    pub(crate) prev_hash: String,
    pub(crate) hash: String,
}

impl Link {
    /// The stored event, taking the prepared event's data by value.
    fn event(self, new: Prepared, stamp: &Stamp) -> Event {
        Event {
            seq: self.seq,
            task_id: new.task_id,
            at: stamp.at.clone(),
            at_ms: stamp.at_ms,
            kind: new.kind.to_owned(),
            data: new.data,
            prev_hash: self.prev_hash,
            hash: self.hash,
            layout: LAYOUT_V2,
            data_hash: Some(new.data_hash),
            pruned: false,
        }
    }
}

/// Why one request failed inside the batch.
enum Fail {
    Sql(rusqlite::Error),
    Store(StoreError),
}

impl From<rusqlite::Error> for Fail {
    fn from(e: rusqlite::Error) -> Self {
        Self::Sql(e)
    }
}

/// Counters the writer shares with the store handle.
#[derive(Debug, Default)]
pub(crate) struct WriterStats {
    /// Successful commits.
    pub(crate) commits: AtomicU64,
    /// Those of them made with `synchronous=FULL`.
    pub(crate) synced: AtomicU64,
    /// Whether the latest commit failed (a full disk, an I/O error, a lock held too long):
    /// `ping` then proves the store with a write of its own before it says it is ready.
    pub(crate) failing: std::sync::atomic::AtomicBool,
}

/// How long a busy writer waits for more writes: `delay`
/// ([`WriteOptions::commit_delay`]; `None`: the default of the commit's durability), or until
/// every call `upcoming` counts has queued its write.
pub(crate) struct Linger {
    pub(crate) delay: Option<Duration>,
    pub(crate) upcoming: crate::Upcoming,
}

impl Linger {
    /// The wait for a commit made with `durability`.
    pub(crate) fn delay(&self, durability: Durability) -> Duration {
        WriteOptions::commit_delay_for(self.delay, durability)
    }
}

/// The writer loop; returns when the channel is closed and drained.
/// `conn` is opened with `synchronous` set for `durabilities.writes`.
pub(crate) fn run(
    mut conn: Connection,
    path: PathBuf,
    mut queue: mpsc::Receiver<Request>,
    stats: Arc<WriterStats>,
    (linger, durabilities): (Linger, Durabilities),
    tap: TapCell,
) {
    let mut synchronous = durabilities.writes;
    while let Some(first) = queue.blocking_recv() {
        let mut pending = first.weight();
        let mut batch = vec![first];
        drain(&mut queue, &mut batch, &mut pending);
        let delay = linger.delay(commit_durability(&batch, durabilities));
        if busy(&batch, pending, delay) {
            linger.upcoming.linger(delay);
            drain(&mut queue, &mut batch, &mut pending);
        }
        linger.upcoming.taken(batch.len());
        let durability = commit_durability(&batch, durabilities);
        // A failed batch whose rollback failed left its transaction open, which would fail
        // every `BEGIN` (and a change of `synchronous`) from now on: rolled back first.
        let reopened = if conn.is_autocommit() {
            Ok(())
        } else {
            conn.execute_batch("ROLLBACK")
        };
        let written = reopened
            .and_then(|()| set_synchronous(&conn, &mut synchronous, durability))
            .and_then(|()| write_batch(&mut conn, &path, &batch));
        match written {
            Ok((stamp, results)) => {
                stats.commits.fetch_add(1, Ordering::Relaxed);
                stats.failing.store(false, Ordering::Relaxed);
                if durability == Durability::Fsync {
                    stats.synced.fetch_add(1, Ordering::Relaxed);
                }
                for (request, result) in batch.into_iter().zip(results) {
                    answer(request, result, &stamp, &tap);
                }
            }
            Err(source) => {
                stats.failing.store(true, Ordering::Relaxed);
                tracing::error!(path = %path.display(), events = pending, error = %source, "event store commit failed");
                let source = Arc::new(source);
                for request in batch {
                    let err = StoreError::Commit {
                        path: path.clone(),
                        events: pending,
                        source: Arc::clone(&source),
                    };
                    answer_err(request, err);
                }
            }
        }
    }
    tracing::debug!(path = %path.display(), "event store writer stopped");
}

/// Sets the connection's `synchronous` for a commit made with `durability`, unless it is
/// already (`current`).
fn set_synchronous(
    conn: &Connection,
    current: &mut Durability,
    durability: Durability,
) -> rusqlite::Result<()> {
    if *current != durability {
        conn.pragma_update(None, "synchronous", super::synchronous(durability))?;
        *current = durability;
    }
    Ok(())
}

/// Whether the writer waits `commit_delay` for more requests before committing `batch`:
/// when it is busy ([`COMMIT_SIBLINGS`] requests were queued behind the first) and the
/// batch has room.
pub(crate) fn busy(batch: &[Request], pending: usize, commit_delay: Duration) -> bool {
    !commit_delay.is_zero() && batch.len() > COMMIT_SIBLINGS && pending < MAX_BATCH_EVENTS
}

/// Moves waiting requests into `batch` until it holds [`MAX_BATCH_EVENTS`].
pub(crate) fn drain(
    queue: &mut mpsc::Receiver<Request>,
    batch: &mut Vec<Request>,
    pending: &mut usize,
) {
    while *pending < MAX_BATCH_EVENTS {
        match queue.try_recv() {
            Ok(request) => {
                *pending += request.weight();
                batch.push(request);
            }
            Err(_) => break,
        }
    }
}

/// Sends a request of a committed batch its answer. The caller may have gone
/// away; what was committed stays committed regardless, and `tap` is told of it.
pub(crate) fn answer(
    request: Request,
    result: Result<Done, StoreError>,
    stamp: &Stamp,
    tap: &TapCell,
) {
    match request {
        Request::Append(events, _, reply, _) | Request::Task(_, events, reply) => {
            let sent = reply.send(result.map(|done| {
                match done {
                    Done::Events(links) => links
                        .into_iter()
                        .zip(events)
                        .map(|(link, new)| link.event(new, stamp))
                        .collect(),
                    Done::Pruned(_) | Done::Saved(_) => Vec::new(),
                }
            }));
            if let (Err(Ok(events)), Some(tap)) = (sent, tap.get())
                && !events.is_empty()
            {
                tap.committed(&events);
            }
        }
        Request::Prune(_, reply) => {
            let _ = reply.send(result.map(|done| match done {
                Done::Pruned(report) => report,
                Done::Events(_) | Done::Saved(_) => PruneReport::default(),
            }));
        }
        Request::State(_, reply) => {
            let _ = reply.send(result.map(|done| match done {
                Done::Saved(version) => version,
                Done::Events(_) | Done::Pruned(_) => None,
            }));
        }
    }
}

/// Sends a request of a failed batch its error.
pub(crate) fn answer_err(request: Request, err: StoreError) {
    match request {
        Request::Append(_, _, reply, _) | Request::Task(_, _, reply) => {
            let _ = reply.send(Err(err));
        }
        Request::Prune(_, reply) => {
            let _ = reply.send(Err(err));
        }
        Request::State(_, reply) => {
            let _ = reply.send(Err(err));
        }
    }
}

/// The chain head: last `seq`, its hash, its time.
#[derive(Clone)]
pub(crate) struct Head {
    pub(crate) seq: u64,
    pub(crate) hash: String,
    pub(crate) at_ms: i64,
}

impl Head {
    /// Links `new` after the head (layout 2) in a batch committed at `stamp`, and moves the
    /// head to it.
    pub(crate) fn link(&mut self, new: &Prepared, stamp: &Stamp) -> Link {
        let seq = self.seq + 1;
        let hash = HashInput {
            prev_hash: &self.hash,
            seq,
            task_id: new.task_id.as_deref(),
            at: &stamp.at,
            at_ms: stamp.at_ms,
            kind: new.kind,
            data: &new.data_hash,
        }
        .hash_v2();
        let prev_hash = std::mem::replace(&mut self.hash, hash.clone());
        self.seq = seq;
        Link {
            seq,
            prev_hash,
            hash,
        }
    }
}

fn read_head(conn: &Connection) -> rusqlite::Result<Head> {
    let head = conn
        .prepare_cached("SELECT seq, hash, at_ms FROM events ORDER BY seq DESC LIMIT 1")?
        .query_row([], |row| {
            Ok(Head {
                seq: row.get(0)?,
                // A tampered NULL must not stop the log; `verify` reports it.
                hash: row.get::<_, Option<String>>(1)?.unwrap_or_default(),
                at_ms: row.get::<_, Option<i64>>(2)?.unwrap_or(i64::MIN),
            })
        })
        .optional()?;
    Ok(head.unwrap_or(Head {
        seq: 0,
        hash: GENESIS_HASH.to_owned(),
        at_ms: i64::MIN,
    }))
}

/// The commit time shared by every event of one batch.
pub(crate) struct Stamp {
    pub(crate) at: String,
    pub(crate) at_ms: i64,
}

/// Applies every request of `batch` in one transaction, each task write and
/// prune in its own savepoint; returns the batch's commit time and each request's result. Errs
/// only when the batch as a whole failed (nothing of it is written then).
///
/// `BEGIN IMMEDIATE` and `COMMIT` are cached statements like the rest: rusqlite's
/// `Transaction` sends them as text, which SQLite parsed again for every commit (about 4% of
/// the writer's time under load).
fn write_batch(
    conn: &mut Connection,
    path: &Path,
    batch: &[Request],
) -> rusqlite::Result<(Stamp, Vec<Result<Done, StoreError>>)> {
    conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    let written = apply_batch(conn, path, batch).and_then(|written| {
        conn.prepare_cached("COMMIT")?.execute([])?;
        Ok(written)
    });
    if written.is_err()
        && !conn.is_autocommit()
        && let Err(e) = conn.execute_batch("ROLLBACK")
    {
        // The batch's own error is the one its writers get; this one would fail the next
        // `BEGIN` too, so it is worth a line of its own.
        tracing::error!(path = %path.display(), error = %e, "event store could not roll back a failed commit");
    }
    written
}

/// [`write_batch`]'s work inside its transaction.
fn apply_batch(
    tx: &Connection,
    path: &Path,
    batch: &[Request],
) -> rusqlite::Result<(Stamp, Vec<Result<Done, StoreError>>)> {
    let mut head = read_head(tx)?;
    // One time per commit, never before the previous event's.
    let at_ms = chain::now_ms().max(head.at_ms);
    let stamp = Stamp {
        at: chain::format_rfc3339_ms(at_ms),
        at_ms,
    };
    let mut results = Vec::with_capacity(batch.len());
    for request in batch {
        // A plain append cannot be refused (no versions, no keys): only SQLite
        // itself can fail it, and then the whole batch fails with it. So it
        // needs no savepoint, which halves the statements of a busy batch.
        if let Request::Append(events, payloads, ..) = request {
            let applied = insert_payloads(tx, payloads)
                .and_then(|()| insert_events(tx, events, &mut head, &stamp));
            match applied {
                Ok(links) => results.push(Ok(Done::Events(links))),
                Err(Fail::Sql(e)) => return Err(e),
                Err(Fail::Store(e)) => results.push(Err(e)),
            }
            continue;
        }
        let saved = head.clone();
        tx.prepare_cached("SAVEPOINT request")?.execute([])?;
        let applied = match request {
            Request::Append(events, payloads, ..) => insert_payloads(tx, payloads)
                .and_then(|()| insert_events(tx, events, &mut head, &stamp))
                .map(Done::Events),
            Request::Task(write, events, _) => {
                write_task(tx, write, events, &mut head, &stamp).map(Done::Events)
            }
            Request::Prune(policy, _) => prune(tx, *policy).map(Done::Pruned),
            Request::State(write, _) => save_state(tx, write, stamp.at_ms).map(Done::Saved),
        };
        match applied {
            Ok(done) => {
                tx.prepare_cached("RELEASE request")?.execute([])?;
                results.push(Ok(done));
            }
            Err(fail) => {
                tx.prepare_cached("ROLLBACK TO request")?.execute([])?;
                tx.prepare_cached("RELEASE request")?.execute([])?;
                head = saved;
                results.push(Err(match fail {
                    Fail::Store(err) => err,
                    Fail::Sql(source) => {
                        tracing::error!(path = %path.display(), error = %source, "event store write failed");
                        StoreError::Commit {
                            path: path.to_owned(),
                            events: request.weight(),
                            source: Arc::new(source),
                        }
                    }
                }));
            }
        }
    }
    Ok((stamp, results))
}

/// Writes a state value if its version is still the one the caller read.
fn save_state(tx: &Connection, write: &StateWrite, at_ms: i64) -> Result<Option<u64>, Fail> {
    let current: Option<i64> = tx
        .prepare_cached("SELECT version FROM state WHERE key = ?1")?
        .query_row([&write.key], |row| row.get(0))
        .optional()?;
    if current.map(|v| v as u64) != write.expected {
        return Ok(None);
    }
    let next = write.expected.unwrap_or(0) + 1;
    tx.prepare_cached(
        "INSERT INTO state (key, value, version, updated_ms) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value, version = excluded.version,
             updated_ms = excluded.updated_ms",
    )?
    .execute(rusqlite::params![
        write.key,
        write.value,
        next as i64,
        at_ms
    ])?;
    Ok(Some(next))
}

/// Appends `events` after `head` (layout 2) and advances `head`.
/// Content-addressed payloads of an append and the task that owns them.
#[derive(Default)]
pub(crate) struct Payloads {
    /// The task the payloads belong to; `None` files them under the empty task id,
    /// which retention never prunes.
    pub(crate) owner: Option<String>,
    /// `(blob_hash, bytes)` pairs.
    pub(crate) blobs: Vec<(String, bytes::Bytes)>,
}

/// Stores payloads that are not stored yet and refers them to their owner.
///
/// Refs use seq 0, so a payload a task sends again (a conversation prefix
/// repeated in every call) adds neither a blob nor a ref.
fn insert_payloads(tx: &Connection, payloads: &Payloads) -> Result<(), Fail> {
    if payloads.blobs.is_empty() {
        return Ok(());
    }
    let owner = payloads.owner.as_deref().unwrap_or("");
    let mut insert =
        tx.prepare_cached("INSERT OR IGNORE INTO blobs (hash, size, bytes) VALUES (?1, ?2, ?3)")?;
    let mut refer = tx.prepare_cached(
        "INSERT OR IGNORE INTO task_blobs (task_id, kind, seq, hash) VALUES (?1, 'payload', 0, ?2)",
    )?;
    for (hash, bytes) in &payloads.blobs {
        insert.execute(params![hash, bytes.len() as u64, bytes.as_ref()])?;
        refer.execute(params![owner, hash])?;
    }
    Ok(())
}

fn insert_events(
    tx: &Connection,
    events: &[Prepared],
    head: &mut Head,
    stamp: &Stamp,
) -> Result<Vec<Link>, Fail> {
    let mut insert = tx.prepare_cached(
        "INSERT INTO events (seq, task_id, at, at_ms, kind, data, prev_hash, hash, layout, data_hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?;
    let mut stored = Vec::with_capacity(events.len());
    for new in events {
        let link = head.link(new, stamp);
        insert.execute(params![
            link.seq,
            new.task_id,
            stamp.at,
            stamp.at_ms,
            new.kind,
            new.text,
            link.prev_hash,
            link.hash,
            LAYOUT_V2,
            new.data_hash
        ])?;
        stored.push(link);
    }
    Ok(stored)
}

/// One task write (see `TaskStore::write_task`), inside the caller's savepoint.
fn write_task(
    tx: &Connection,
    write: &TaskWrite,
    events: &[Prepared],
    head: &mut Head,
    stamp: &Stamp,
) -> Result<Vec<Link>, Fail> {
    let row = &write.row;
    let invalid = |reason: String| {
        Fail::Store(StoreError::InvalidWrite {
            task: row.id.clone(),
            reason,
        })
    };
    if let Some(record) = &write.idempotency {
        let taken = tx
            .prepare_cached("SELECT 1 FROM idempotency WHERE scope = ?1 AND key = ?2")?
            .exists(params![record.scope, record.key])?;
        if taken {
            return Err(Fail::Store(StoreError::DuplicateKey {
                scope: record.scope.clone(),
                key: record.key.clone(),
            }));
        }
    }
    let found: Option<u64> = tx
        .prepare_cached("SELECT version FROM tasks WHERE id = ?1")?
        .query_row([&row.id], |r| r.get(0))
        .optional()?;
    let snapshot = checked_snapshot(write, found, events.len()).map_err(Fail::Store)?;
    tx.prepare_cached(
        "INSERT INTO tasks (id, agent, state, version, snapshot, created_at_ms, updated_at_ms,
                            lease_expires_at_ms, approval_expires_at_ms, deadline_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
         ON CONFLICT (id) DO UPDATE SET
            agent = excluded.agent, state = excluded.state, version = excluded.version,
            snapshot = excluded.snapshot, updated_at_ms = excluded.updated_at_ms,
            lease_expires_at_ms = excluded.lease_expires_at_ms,
            approval_expires_at_ms = excluded.approval_expires_at_ms,
            deadline_at_ms = excluded.deadline_at_ms",
    )?
    .execute(params![
        row.id,
        row.agent,
        row.state,
        row.version,
        snapshot,
        row.created_at_ms,
        row.updated_at_ms,
        row.lease_expires_at_ms,
        row.approval_expires_at_ms,
        row.deadline_at_ms
    ])?;
    let events = insert_events(tx, events, head, stamp)?;

    let mut hashes = Vec::with_capacity(write.blobs.len());
    {
        let mut insert = tx.prepare_cached(
            "INSERT OR IGNORE INTO blobs (hash, size, bytes) VALUES (?1, ?2, ?3)",
        )?;
        for blob in &write.blobs {
            let hash = chain::blob_hash(blob);
            insert.execute(params![hash, blob.len() as u64, blob.as_ref()])?;
            hashes.push(hash);
        }
    }
    let mut refer = tx.prepare_cached(
        "INSERT OR IGNORE INTO task_blobs (task_id, kind, seq, hash) VALUES (?1, ?2, ?3, ?4)",
    )?;
    let mut known = tx.prepare_cached("SELECT 1 FROM blobs WHERE hash = ?1")?;
    for blob_ref in &write.blob_refs {
        if !known.exists([&blob_ref.hash])? {
            return Err(invalid(format!(
                "blob ref to {} which is neither in this write nor stored",
                blob_ref.hash
            )));
        }
        refer.execute(params![row.id, blob_ref.kind, blob_ref.seq, blob_ref.hash])?;
    }
    // A blob no ref names is a payload of the task, kept as long as the task.
    let payload_seq = events.last().map_or(0, |e| e.seq);
    for hash in hashes {
        if !write.blob_refs.iter().any(|r| r.hash == hash) {
            refer.execute(params![row.id, "payload", payload_seq, hash])?;
        }
    }

    if let Some(record) = &write.idempotency {
        let body = serde_json::to_string(&record.body)
            .map_err(|e| invalid(format!("idempotency body is not serialisable: {e}")))?;
        tx.prepare_cached(
            "INSERT INTO idempotency (scope, key, status, body, created_at_ms, request_hash)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            record.scope,
            record.key,
            record.status,
            body,
            stamp.at_ms,
            record.request_hash
        ])?;
    }
    Ok(events)
}

/// Checks `write` against the version the store holds (`found`; `None`: no such task) and
/// its own row version against its `events` count, and prints its snapshot: the refusals
/// `TaskStore::write_task` promises, the same for every store.
pub(crate) fn checked_snapshot(
    write: &TaskWrite,
    found: Option<u64>,
    events: usize,
) -> Result<String, StoreError> {
    let row = &write.row;
    let invalid = |reason: String| StoreError::InvalidWrite {
        task: row.id.clone(),
        reason,
    };
    if found != write.expected_version {
        return Err(StoreError::Conflict {
            task: row.id.clone(),
            expected: write.expected_version,
            found,
        });
    }
    let base = write.expected_version.unwrap_or(0);
    let want = base.saturating_add(events as u64);
    if row.version != want {
        return Err(invalid(format!(
            "row version is {} but must be {want} ({base} plus {events} events)",
            row.version
        )));
    }
    serde_json::to_string(&row.snapshot)
        .map_err(|e| invalid(format!("snapshot is not serialisable: {e}")))
}

/// Retention (see `TaskStore::prune`), inside the caller's savepoint.
fn prune(tx: &Connection, policy: PrunePolicy) -> Result<PruneReport, Fail> {
    let mut report = PruneReport::default();
    if let Some(cutoff) = policy.finished_before_ms {
        let ids: Vec<String> = tx
            .prepare_cached(
                "SELECT id FROM tasks
                 WHERE state IN ('succeeded', 'cancelled') AND updated_at_ms < ?1",
            )?
            .query_map([cutoff], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut blank = tx.prepare_cached(
            // Layout-1 hashes cover `data`, so only layout-2 events can be blanked.
            "UPDATE events SET data = '' WHERE task_id = ?1 AND layout = 2 AND data <> ''",
        )?;
        let mut unref = tx.prepare_cached("DELETE FROM task_blobs WHERE task_id = ?1")?;
        let mut delete = tx.prepare_cached("DELETE FROM tasks WHERE id = ?1")?;
        for id in &ids {
            report.events += blank.execute([id])? as u64;
            unref.execute([id])?;
            report.tasks += delete.execute([id])? as u64;
        }
        // An idempotency key older than the retention is past any client's retry.
        report.idempotency_keys = tx
            .prepare_cached("DELETE FROM idempotency WHERE created_at_ms < ?1")?
            .execute([cutoff])? as u64;
        // So is a state value under `idem/` (the gateway's record of a keyed tool call).
        report.idempotency_keys += tx
            .prepare_cached("DELETE FROM state WHERE key LIKE 'idem/%' AND updated_ms < ?1")?
            .execute([cutoff])? as u64;
    }
    if let Some(keep) = policy.keep_checkpoints {
        let keep = i64::try_from(keep).unwrap_or(i64::MAX);
        report.checkpoints = tx
            .prepare_cached(
                "DELETE FROM task_blobs WHERE kind = 'checkpoint' AND (task_id, seq) IN (
                    SELECT task_id, seq FROM (
                        SELECT task_id, seq,
                               DENSE_RANK() OVER (PARTITION BY task_id ORDER BY seq DESC) AS rank
                        FROM task_blobs WHERE kind = 'checkpoint'
                    ) WHERE rank > ?1
                 )",
            )?
            .execute([keep])? as u64;
    }
    const UNREFERENCED: &str =
        "FROM blobs WHERE NOT EXISTS (SELECT 1 FROM task_blobs t WHERE t.hash = blobs.hash)";
    let (blobs, bytes): (u64, u64) = tx.query_row(
        &format!("SELECT count(*), coalesce(sum(size), 0) {UNREFERENCED}"),
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    if blobs > 0 {
        tx.execute(&format!("DELETE {UNREFERENCED}"), [])?;
    }
    report.blobs = blobs;
    report.blob_bytes = bytes;
    Ok(report)
}
