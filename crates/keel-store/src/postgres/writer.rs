//! The node's writer: one connection, group commit, and the global chain lock.
//!
//! Like SQLite's writer it takes the first queued request and everything else already
//! waiting, and applies them in one transaction. That transaction first locks the one row of
//! `keel_chain_head` (`SELECT ... FOR UPDATE`), so the batches of every node are applied one
//! after the other in the database, each continuing the chain where the last one left it:
//! one gapless `seq`, one verifiable chain, whatever the number of nodes. The lock is held
//! for one batch (a few inserts and the commit), and each node's batches grow with its load,
//! so the nodes share the log's write rate rather than each paying a lock per append.
//!
//! Appends are buffered and inserted with one `INSERT ... SELECT FROM UNNEST` per table;
//! each task write, prune and state write runs in its own `SAVEPOINT`, so one that is refused
//! (version conflict, duplicate key) is rolled back alone and the rest of the batch commits.
//!
//! The connection is made again when it breaks: a batch that fails on a broken connection is
//! answered with the error (nothing of it is acknowledged), and the next batch reconnects,
//! no sooner than a backoff that doubles from 100 ms to 5 s while the server stays away.
//! Batches that arrive while waiting are answered with [`StoreError::Unreachable`] at once
//! rather than held: callers (a gateway call, a worker's claim) get their error promptly.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_postgres::{Client, Config, GenericClient, NoTls};

use crate::chain;
use crate::sqlite::writer::{
    Done, Head, Link, Payloads, Prepared, Request, Stamp, StateWrite, answer, answer_err, busy,
    checked_snapshot, commit_durability, drain,
};
use crate::{
    Durabilities, Durability, PrunePolicy, PruneReport, StoreError, TaskWrite, WriteOptions,
};

use super::PgFail;

/// How long one connection attempt may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// First and longest wait between reconnection attempts.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The writer's connection, made again (with backoff) when it breaks.
pub(crate) struct Connection {
    config: Config,
    store: String,
    durability: Durability,
    client: Option<Client>,
    /// No attempt before this instant (after a failed one).
    next_attempt: Option<Instant>,
    backoff: Duration,
    /// Why the last attempt failed.
    last_error: String,
}

impl Connection {
    pub(crate) fn new(config: Config, store: String, durability: Durability) -> Self {
        Self {
            config,
            store,
            durability,
            client: None,
            next_attempt: None,
            backoff: BACKOFF_FIRST,
            last_error: String::new(),
        }
    }

    /// Uses `client`, already connected, from now on.
    pub(crate) fn set_client(&mut self, client: Client) {
        self.client = Some(client);
    }

    /// The open client, connecting first if there is none (or it broke).
    pub(crate) async fn client(&mut self) -> Result<&mut Client, StoreError> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            tracing::warn!(store = %self.store, "lost the connection to the PostgreSQL store; reconnecting");
            self.client = None;
        }
        if self.client.is_none() {
            if let Some(at) = self.next_attempt
                && Instant::now() < at
            {
                return Err(self.unreachable());
            }
            match connect(&self.config, &self.store, self.durability).await {
                Ok(client) => {
                    if self.next_attempt.take().is_some() {
                        tracing::info!(store = %self.store, "reconnected to the PostgreSQL store");
                    }
                    self.backoff = BACKOFF_FIRST;
                    self.client = Some(client);
                }
                Err(e) => {
                    self.last_error = e.to_string();
                    self.next_attempt = Some(Instant::now() + self.backoff);
                    self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                    tracing::warn!(store = %self.store, error = %self.last_error, retry_in = ?self.backoff, "cannot reach the PostgreSQL store");
                    return Err(e);
                }
            }
        }
        let unreachable = self.unreachable();
        self.client.as_mut().ok_or(unreachable)
    }

    fn unreachable(&self) -> StoreError {
        StoreError::Unreachable {
            store: self.store.clone(),
            reason: format!("{} (retrying)", self.last_error),
        }
    }
}

/// Connects once, sets the durability, and drives the connection on the current runtime.
pub(crate) async fn connect(
    config: &Config,
    store: &str,
    durability: Durability,
) -> Result<Client, StoreError> {
    let unreachable = |reason: String| StoreError::Unreachable {
        store: store.to_owned(),
        reason,
    };
    let (client, connection) = tokio::time::timeout(CONNECT_TIMEOUT, config.connect(NoTls))
        .await
        .map_err(|_| unreachable(format!("no answer within {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| unreachable(with_causes(&e)))?;
    let store_name = store.to_owned();
    // The connection ends when the client is dropped (or the server goes away).
    tokio::runtime::Handle::current().spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(store = %store_name, error = %e, "PostgreSQL connection ended");
        }
    });
    // `on`: COMMIT returns once the WAL is flushed on the server; `off`: once it is
    // written, so a crash of the database server (not of keel) may lose the newest commits.
    client
        .batch_execute(set_synchronous_commit(durability, false))
        .await
        .map_err(|e| PgFail::Sql(e).into_store(store, "setting synchronous_commit"))?;
    // A node that stalls mid-commit holding the chain's head (a partition, a paused VM) has
    // its session ended by the server after this long, so the other nodes' writes go on
    // instead of waiting for as long as it stalls. Its commit never sits idle otherwise (its
    // statements are sent back to back), and a long one that is working (a prune) is not idle.
    client
        .batch_execute(IDLE_IN_TRANSACTION_SQL)
        .await
        .map_err(|e| {
            PgFail::Sql(e).into_store(store, "setting idle_in_transaction_session_timeout")
        })?;
    Ok(client)
}

/// The writer's session's `idle_in_transaction_session_timeout` (see [`connect`]).
pub(crate) const IDLE_IN_TRANSACTION_SQL: &str = "SET idle_in_transaction_session_timeout = '30s'";

/// The statement that sets PostgreSQL's `synchronous_commit` for a durability: for the
/// session, or (`local`) for the current transaction only. Constant text, so a commit that
/// sets its own sends no formatted statement.
fn set_synchronous_commit(durability: Durability, local: bool) -> &'static str {
    match (durability, local) {
        (Durability::Fsync, false) => "SET synchronous_commit = on",
        (Durability::Relaxed, false) => "SET synchronous_commit = off",
        (Durability::Fsync, true) => "SET LOCAL synchronous_commit = on",
        (Durability::Relaxed, true) => "SET LOCAL synchronous_commit = off",
    }
}

/// `error connecting to server: Connection refused (os error 111)`: the error and its causes.
pub(crate) fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// The writer loop; returns when the queue is closed and drained. The connection's session
/// has `synchronous_commit` set for `durabilities.writes`; a commit made with the other
/// durability sets it for its own transaction.
/// `failing` is set while the latest batch failed (the store's `ping` then proves a write);
/// `tap` is told of committed events whose caller has gone.
pub(crate) async fn run(
    mut conn: Connection,
    mut queue: mpsc::Receiver<Request>,
    commit_delay: Option<Duration>,
    durabilities: Durabilities,
    (failing, tap): (Arc<AtomicBool>, crate::sqlite::writer::TapCell),
) {
    while let Some(first) = queue.recv().await {
        let mut pending = first.weight();
        let mut batch = vec![first];
        drain(&mut queue, &mut batch, &mut pending);
        let delay =
            WriteOptions::commit_delay_for(commit_delay, commit_durability(&batch, durabilities));
        if busy(&batch, pending, delay) {
            tokio::time::sleep(delay).await;
            drain(&mut queue, &mut batch, &mut pending);
        }
        let durability = commit_durability(&batch, durabilities);
        let own = (durability != durabilities.writes).then_some(durability);
        let store = conn.store.clone();
        let client = match conn.client().await {
            Ok(client) => client,
            Err(err) => {
                failing.store(true, Ordering::Relaxed);
                for request in batch {
                    answer_err(request, clone_err(&err));
                }
                continue;
            }
        };
        match write_batch(client, &batch, &store, own).await {
            Ok((stamp, results)) => {
                failing.store(false, Ordering::Relaxed);
                for (request, result) in batch.into_iter().zip(results) {
                    answer(request, result, &stamp, &tap);
                }
            }
            Err(source) => {
                failing.store(true, Ordering::Relaxed);
                tracing::error!(%store, events = pending, error = %crate::error::pg_detail(&source), "PostgreSQL store commit failed");
                let err =
                    PgFail::Sql(source).into_store(&store, &format!("commit of {pending} events"));
                for request in batch {
                    answer_err(request, clone_err(&err));
                }
            }
        }
    }
    tracing::debug!(store = %conn.store, "PostgreSQL store writer stopped");
}

/// The same error again, for each request of a failed batch.
fn clone_err(err: &StoreError) -> StoreError {
    match err {
        StoreError::Postgres {
            store,
            what,
            source,
        } => StoreError::Postgres {
            store: store.clone(),
            what: what.clone(),
            source: std::sync::Arc::clone(source),
        },
        StoreError::Unreachable { store, reason } => StoreError::Unreachable {
            store: store.clone(),
            reason: reason.clone(),
        },
        other => StoreError::Unreachable {
            store: String::new(),
            reason: other.to_string(),
        },
    }
}

/// Rows waiting to be inserted, column by column (for `UNNEST`).
#[derive(Default)]
struct Rows<'a> {
    seq: Vec<i64>,
    task: Vec<Option<&'a str>>,
    kind: Vec<&'a str>,
    data: Vec<&'a str>,
    prev: Vec<String>,
    hash: Vec<String>,
    data_hash: Vec<&'a str>,
    blob_hash: Vec<String>,
    blob_size: Vec<i64>,
    blob_bytes: Vec<&'a [u8]>,
    ref_task: Vec<&'a str>,
    ref_kind: Vec<&'a str>,
    ref_seq: Vec<i64>,
    ref_hash: Vec<String>,
}

const INSERT_EVENTS: &str = "INSERT INTO events
    (seq, task_id, at, at_ms, kind, data, prev_hash, hash, layout, data_hash)
    SELECT s, t, $1, $2, k, d, p, h, 2, dh
    FROM UNNEST($3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[])
        AS u(s, t, k, d, p, h, dh)";

const INSERT_BLOBS: &str = "INSERT INTO blobs (hash, size, bytes)
    SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bytea[]) ON CONFLICT DO NOTHING";

const INSERT_REFS: &str = "INSERT INTO task_blobs (task_id, kind, seq, hash)
    SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[]) ON CONFLICT DO NOTHING";

impl<'a> Rows<'a> {
    /// Links `events` after `head` (layout 2), buffers them, and advances `head`.
    fn events(&mut self, events: &'a [Prepared], head: &mut Head, stamp: &Stamp) -> Vec<Link> {
        let mut links = Vec::with_capacity(events.len());
        for new in events {
            let link = head.link(new, stamp);
            self.seq.push(i64::try_from(link.seq).unwrap_or(i64::MAX));
            self.task.push(new.task_id.as_deref());
            self.kind.push(new.kind);
            self.data.push(&new.text);
            self.prev.push(link.prev_hash.clone());
            self.hash.push(link.hash.clone());
            self.data_hash.push(&new.data_hash);
            links.push(link);
        }
        links
    }

    fn blob(&mut self, hash: String, bytes: &'a [u8]) {
        self.blob_hash.push(hash);
        self.blob_size
            .push(i64::try_from(bytes.len()).unwrap_or(i64::MAX));
        self.blob_bytes.push(bytes);
    }

    fn refer(&mut self, task: &'a str, kind: &'a str, seq: u64, hash: String) {
        self.ref_task.push(task);
        self.ref_kind.push(kind);
        self.ref_seq.push(i64::try_from(seq).unwrap_or(i64::MAX));
        self.ref_hash.push(hash);
    }

    /// An append's payloads under their owner (refs at seq 0, like SQLite's).
    fn payloads(&mut self, payloads: &'a Payloads) {
        let owner = payloads.owner.as_deref().unwrap_or("");
        for (hash, bytes) in &payloads.blobs {
            self.blob(hash.clone(), bytes);
            self.refer(owner, "payload", 0, hash.clone());
        }
    }

    /// Inserts what is buffered (events, blobs, refs: one statement each, sent together
    /// without waiting for each answer) and empties the buffers.
    async fn flush(
        &mut self,
        tx: &impl GenericClient,
        stamp: &Stamp,
    ) -> Result<(), tokio_postgres::Error> {
        let events = async {
            if self.seq.is_empty() {
                return Ok(0);
            }
            tx.execute(
                INSERT_EVENTS,
                &[
                    &stamp.at,
                    &stamp.at_ms,
                    &self.seq,
                    &self.task,
                    &self.kind,
                    &self.data,
                    &self.prev,
                    &self.hash,
                    &self.data_hash,
                ],
            )
            .await
        };
        let blobs = async {
            if self.blob_hash.is_empty() {
                return Ok(0);
            }
            tx.execute(
                INSERT_BLOBS,
                &[&self.blob_hash, &self.blob_size, &self.blob_bytes],
            )
            .await
        };
        let refs = async {
            if self.ref_task.is_empty() {
                return Ok(0);
            }
            tx.execute(
                INSERT_REFS,
                &[
                    &self.ref_task,
                    &self.ref_kind,
                    &self.ref_seq,
                    &self.ref_hash,
                ],
            )
            .await
        };
        // tokio-postgres pipelines statements issued together on one connection.
        tokio::try_join!(events, blobs, refs)?;
        *self = Rows::default();
        Ok(())
    }
}

/// Applies `batch` in one transaction after locking the chain head; returns the batch's
/// time and each request's result. Errs only when the batch as a whole failed.
async fn write_batch(
    client: &mut Client,
    batch: &[Request],
    store: &str,
    durability: Option<Durability>,
) -> Result<(Stamp, Vec<Result<Done, StoreError>>), tokio_postgres::Error> {
    let mut tx = client.transaction().await?;
    // The commit's own durability, when it is not the session's (sent with the head query:
    // tokio-postgres pipelines them).
    let local = async {
        match durability {
            Some(d) => tx.batch_execute(set_synchronous_commit(d, true)).await,
            None => Ok(()),
        }
    };
    let head = tx.query_one(
        "SELECT seq, hash, at_ms FROM keel_chain_head WHERE id = 1 FOR UPDATE",
        &[],
    );
    let (local, row) = tokio::join!(local, head);
    local?;
    let row = row?;
    let mut head = Head {
        seq: u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
        hash: row.get(1),
        at_ms: row.get(2),
    };
    // One time per commit, never before the previous event's (whichever node wrote it).
    let at_ms = chain::now_ms().max(head.at_ms);
    let stamp = Stamp {
        at: chain::format_rfc3339_ms(at_ms),
        at_ms,
    };
    let mut rows = Rows::default();
    let mut results = Vec::with_capacity(batch.len());
    for request in batch {
        if let Request::Append(events, payloads, ..) = request {
            rows.payloads(payloads);
            results.push(Ok(Done::Events(rows.events(events, &mut head, &stamp))));
            continue;
        }
        // What is buffered goes first, so the savepoint's rollback cannot take it along.
        rows.flush(&tx, &stamp).await?;
        let saved = head.clone();
        let savepoint = tx.savepoint("request").await?;
        let applied = match request {
            Request::Task(write, events, _) => {
                write_task(&savepoint, write, events, &mut head, &stamp)
                    .await
                    .map(Done::Events)
            }
            Request::Prune(policy, _) => prune(&savepoint, *policy).await.map(Done::Pruned),
            Request::State(write, _) => save_state(&savepoint, write, stamp.at_ms)
                .await
                .map(Done::Saved),
            // Handled above.
            Request::Append(..) => Ok(Done::Events(Vec::new())),
        };
        match applied {
            Ok(done) => {
                savepoint.commit().await?;
                results.push(Ok(done));
            }
            Err(fail) => {
                savepoint.rollback().await?;
                head = saved;
                results.push(Err(match fail {
                    PgFail::Store(err) => err,
                    PgFail::Sql(source) => {
                        tracing::error!(%store, error = %crate::error::pg_detail(&source), "PostgreSQL store write failed");
                        PgFail::Sql(source).into_store(store, "a task write")
                    }
                }));
            }
        }
    }
    let head_seq = i64::try_from(head.seq).unwrap_or(i64::MAX);
    // The last inserts and the new head go together (one round trip), then the commit.
    let moved = async {
        tx.execute(
            "UPDATE keel_chain_head SET seq = $1, hash = $2, at_ms = $3 WHERE id = 1",
            &[&head_seq, &head.hash, &stamp.at_ms],
        )
        .await
    };
    let (flushed, moved) = tokio::join!(rows.flush(&tx, &stamp), moved);
    flushed?;
    moved?;
    tx.commit().await?;
    Ok((stamp, results))
}

/// One task write (see `TaskStore::write_task`), inside the caller's savepoint.
async fn write_task(
    tx: &tokio_postgres::Transaction<'_>,
    write: &TaskWrite,
    events: &[Prepared],
    head: &mut Head,
    stamp: &Stamp,
) -> Result<Vec<Link>, PgFail> {
    let row = &write.row;
    let invalid = |reason: String| {
        PgFail::Store(StoreError::InvalidWrite {
            task: row.id.clone(),
            reason,
        })
    };
    // The key and the version are read together (one round trip).
    let taken = async {
        match &write.idempotency {
            Some(record) => tx
                .query_opt(
                    "SELECT 1 FROM idempotency WHERE scope = $1 AND key = $2",
                    &[&record.scope, &record.key],
                )
                .await
                .map(|found| found.is_some()),
            None => Ok(false),
        }
    };
    let version = async {
        tx.query_opt("SELECT version FROM tasks WHERE id = $1", &[&row.id])
            .await
    };
    let (taken, version) = tokio::try_join!(taken, version)?;
    if let (true, Some(record)) = (taken, &write.idempotency) {
        return Err(PgFail::Store(StoreError::DuplicateKey {
            scope: record.scope.clone(),
            key: record.key.clone(),
        }));
    }
    let found = version.map(|r| u64::try_from(r.get::<_, i64>(0)).unwrap_or(0));
    let snapshot = checked_snapshot(write, found, events.len()).map_err(PgFail::Store)?;
    let version = i64::try_from(row.version).unwrap_or(i64::MAX);
    let mut own = Rows::default();
    let links = own.events(events, head, stamp);
    let hashes: Vec<String> = write.blobs.iter().map(|b| chain::blob_hash(b)).collect();
    for (hash, blob) in hashes.iter().zip(&write.blobs) {
        own.blob(hash.clone(), blob);
    }
    // The row, the events and the blobs go together (one round trip).
    let upsert = async {
        tx.execute(
            "INSERT INTO tasks (id, agent, state, version, snapshot, created_at_ms, updated_at_ms,
                            lease_expires_at_ms, approval_expires_at_ms, deadline_at_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT (id) DO UPDATE SET
            agent = excluded.agent, state = excluded.state, version = excluded.version,
            snapshot = excluded.snapshot, updated_at_ms = excluded.updated_at_ms,
            lease_expires_at_ms = excluded.lease_expires_at_ms,
            approval_expires_at_ms = excluded.approval_expires_at_ms,
            deadline_at_ms = excluded.deadline_at_ms",
            &[
                &row.id,
                &row.agent,
                &row.state,
                &version,
                &snapshot,
                &row.created_at_ms,
                &row.updated_at_ms,
                &row.lease_expires_at_ms,
                &row.approval_expires_at_ms,
                &row.deadline_at_ms,
            ],
        )
        .await
    };
    let (upserted, flushed) = tokio::join!(upsert, own.flush(tx, stamp));
    upserted?;
    flushed?;

    if !write.blob_refs.is_empty() {
        let named: Vec<&str> = write.blob_refs.iter().map(|r| r.hash.as_str()).collect();
        let known: HashSet<String> = tx
            .query("SELECT hash FROM blobs WHERE hash = ANY($1)", &[&named])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if let Some(missing) = write.blob_refs.iter().find(|r| !known.contains(&r.hash)) {
            return Err(invalid(format!(
                "blob ref to {} which is neither in this write nor stored",
                missing.hash
            )));
        }
    }
    for blob_ref in &write.blob_refs {
        own.refer(&row.id, &blob_ref.kind, blob_ref.seq, blob_ref.hash.clone());
    }
    // A blob no ref names is a payload of the task, kept as long as the task.
    let payload_seq = links.last().map_or(0, |l| l.seq);
    for hash in hashes {
        if !write.blob_refs.iter().any(|r| r.hash == hash) {
            own.refer(&row.id, "payload", payload_seq, hash);
        }
    }
    own.flush(tx, stamp).await?;

    if let Some(record) = &write.idempotency {
        let body = serde_json::to_string(&record.body)
            .map_err(|e| invalid(format!("idempotency body is not serialisable: {e}")))?;
        tx.execute(
            "INSERT INTO idempotency (scope, key, status, body, created_at_ms, request_hash)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &record.scope,
                &record.key,
                &i32::from(record.status),
                &body,
                &stamp.at_ms,
                &record.request_hash,
            ],
        )
        .await?;
    }
    Ok(links)
}

/// Writes a state value if its version is still the one the caller read.
async fn save_state(
    tx: &tokio_postgres::Transaction<'_>,
    write: &StateWrite,
    at_ms: i64,
) -> Result<Option<u64>, PgFail> {
    let current = tx
        .query_opt("SELECT version FROM state WHERE key = $1", &[&write.key])
        .await?
        .map(|r| u64::try_from(r.get::<_, i64>(0)).unwrap_or(0));
    if current != write.expected {
        return Ok(None);
    }
    let next = write.expected.unwrap_or(0) + 1;
    let next_db = i64::try_from(next).unwrap_or(i64::MAX);
    tx.execute(
        "INSERT INTO state (key, value, version, updated_ms) VALUES ($1, $2, $3, $4)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value, version = excluded.version,
             updated_ms = excluded.updated_ms",
        &[&write.key, &write.value, &next_db, &at_ms],
    )
    .await?;
    Ok(Some(next))
}

/// Retention (see `TaskStore::prune`), inside the caller's savepoint.
async fn prune(
    tx: &tokio_postgres::Transaction<'_>,
    policy: PrunePolicy,
) -> Result<PruneReport, PgFail> {
    let mut report = PruneReport::default();
    if let Some(cutoff) = policy.finished_before_ms {
        let ids: Vec<String> = tx
            .query(
                "SELECT id FROM tasks WHERE state IN ('succeeded', 'cancelled') AND updated_at_ms < $1",
                &[&cutoff],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !ids.is_empty() {
            // Layout-1 hashes cover `data`; this store only ever wrote layout 2.
            report.events = tx
                .execute(
                    "UPDATE events SET data = '' WHERE task_id = ANY($1) AND layout = 2 AND data <> ''",
                    &[&ids],
                )
                .await?;
            tx.execute("DELETE FROM task_blobs WHERE task_id = ANY($1)", &[&ids])
                .await?;
            report.tasks = tx
                .execute("DELETE FROM tasks WHERE id = ANY($1)", &[&ids])
                .await?;
        }
        report.idempotency_keys = tx
            .execute(
                "DELETE FROM idempotency WHERE created_at_ms < $1",
                &[&cutoff],
            )
            .await?;
        report.idempotency_keys += tx
            .execute(
                "DELETE FROM state WHERE key LIKE 'idem/%' AND updated_ms < $1",
                &[&cutoff],
            )
            .await?;
    }
    if let Some(keep) = policy.keep_checkpoints {
        let keep = i64::try_from(keep).unwrap_or(i64::MAX);
        report.checkpoints = tx
            .execute(
                "DELETE FROM task_blobs WHERE kind = 'checkpoint' AND (task_id, seq) IN (
                    SELECT task_id, seq FROM (
                        SELECT task_id, seq,
                               DENSE_RANK() OVER (PARTITION BY task_id ORDER BY seq DESC) AS rank
                        FROM task_blobs WHERE kind = 'checkpoint'
                    ) AS ranked WHERE rank > $1
                 )",
                &[&keep],
            )
            .await?;
    }
    const UNREFERENCED: &str =
        "FROM blobs WHERE NOT EXISTS (SELECT 1 FROM task_blobs t WHERE t.hash = blobs.hash)";
    let row = tx
        .query_one(
            &format!("SELECT count(*), coalesce(sum(size), 0)::bigint {UNREFERENCED}"),
            &[],
        )
        .await?;
    let blobs = u64::try_from(row.get::<_, i64>(0)).unwrap_or(0);
    if blobs > 0 {
        tx.execute(&format!("DELETE {UNREFERENCED}"), &[]).await?;
    }
    report.blobs = blobs;
    report.blob_bytes = u64::try_from(row.get::<_, i64>(1)).unwrap_or(0);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffered_events_continue_the_chain() {
        let events = Prepared::all(vec![
            keel_core::NewEvent::new(
                keel_core::EventKind::LlmCall,
                None,
                serde_json::json!({"a": 1}),
            ),
            keel_core::NewEvent::new(
                keel_core::EventKind::LlmCall,
                Some("t".to_owned()),
                serde_json::json!({"b": 2}),
            ),
        ]);
        let mut head = Head {
            seq: 7,
            hash: "h7".to_owned(),
            at_ms: 0,
        };
        let stamp = Stamp {
            at: chain::format_rfc3339_ms(1),
            at_ms: 1,
        };
        let mut rows = Rows::default();
        let links = rows.events(&events, &mut head, &stamp);
        assert_eq!(links.iter().map(|l| l.seq).collect::<Vec<_>>(), [8, 9]);
        assert_eq!(links[0].prev_hash, "h7");
        assert_eq!(links[1].prev_hash, links[0].hash);
        assert_eq!(head.seq, 9);
        assert_eq!(head.hash, links[1].hash);
        assert_eq!(rows.seq, [8, 9]);
        assert_eq!(rows.task, [None, Some("t")]);
        assert_eq!(rows.prev, ["h7".to_owned(), links[0].hash.clone()]);
    }
}
