//! The PostgreSQL event and task store: several keel nodes sharing one database.
//!
//! `[store] url = "postgres://USER@HOST/DB"` selects it. Each node has one writer
//! ([`writer`]: its own connection, group commit, the chain-head lock) and a pool of read
//! connections (`deadpool-postgres`). What a node knows is what is committed: task rows,
//! claims, state values (budgets, histogram profiles) and idempotency records are read from
//! and written to the database, never cached across calls, so every node sees the same
//! tasks and the version checks of `write_task` and `save_state` hold across nodes.
//!
//! The chain: every write transaction locks the one row of `keel_chain_head` before it
//! appends, so the log keeps one global, gapless `seq` and one hash chain, and
//! `keel audit verify` checks it exactly as on SQLite. The price is that the nodes' write
//! transactions run one at a time in the database; each is one node's whole batch (group
//! commit), so the lock is taken once per batch, not per event. `docs/scaling.md` says how
//! this grows (per-partition chains when one lock is no longer enough).
//!
//! Durability: `fsync` sets `synchronous_commit = on` (a commit returns once PostgreSQL
//! flushed its WAL), `relaxed` sets it `off` (a crash of the database server may lose the
//! newest commits; a crash of keel loses nothing acknowledged either way).
//!
//! Connections are plain TCP (no TLS yet): run keel beside its database or through a
//! tunnel. A URL's password never appears in logs or errors ([`describe`]).

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Config, NoTls, Row};

use keel_core::NewEvent;

use crate::chain::{ChainVerifier, StoredRow};
use crate::sqlite::writer::{Payloads, QUEUE_CAPACITY, Request, WriterHandle};
use crate::{
    Durability, Event, EventQuery, EventStore, IdempotencyRecord, PrunePolicy, PruneReport,
    StoreError, StoreStats, TaskPage, TaskQuery, TaskRow, TaskStore, TaskWrite, Verify, Versioned,
};

mod schema;
mod writer;

#[cfg(test)]
mod tests;

/// Read connections per node.
const POOL_SIZE: usize = 8;

/// How long a read waits for a pooled connection.
const POOL_WAIT: Duration = Duration::from_secs(5);

/// Events per page when `verify` walks the log.
const VERIFY_PAGE: i64 = 10_000;

const COLUMNS: &str = "seq, task_id, at, at_ms, kind, data, prev_hash, hash, layout, data_hash";

const TASK_COLUMNS: &str = "id, agent, state, version, snapshot, created_at_ms, updated_at_ms, \
                            lease_expires_at_ms, approval_expires_at_ms, deadline_at_ms";

/// Why a statement inside a write failed: SQL, or a refusal of the store's own.
pub(crate) enum PgFail {
    Sql(tokio_postgres::Error),
    Store(StoreError),
}

impl From<tokio_postgres::Error> for PgFail {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Sql(e)
    }
}

impl PgFail {
    /// The store error for this failure while doing `what`.
    pub(crate) fn into_store(self, store: &str, what: &str) -> StoreError {
        match self {
            Self::Store(err) => err,
            // A closed connection is the server going away, not a bad statement.
            Self::Sql(e) if e.is_closed() => StoreError::Unreachable {
                store: store.to_owned(),
                reason: format!("the connection closed during {what}"),
            },
            Self::Sql(source) => StoreError::Postgres {
                store: store.to_owned(),
                what: what.to_owned(),
                source: Arc::new(source),
            },
        }
    }
}

/// The PostgreSQL [`EventStore`] and [`TaskStore`].
///
/// Dropping it (or [`PgStore::close`]) lets the writer finish every write already queued.
pub struct PgStore {
    store: String,
    durability: Durability,
    /// This node's writer thread.
    writer: WriterHandle,
    pool: Pool,
    /// Whether this node's latest commit failed: `ping` then proves a write.
    failing: Arc<std::sync::atomic::AtomicBool>,
}

impl PgStore {
    /// Connects to the database at `url`, checks the server's version, runs migrations
    /// (one node at a time), and starts this node's writer.
    ///
    /// Errors, without retrying, when the URL is not valid, the server cannot be reached
    /// within 5 s, it is older than PostgreSQL 13, or its keel schema is newer than this
    /// build's. Once open, a connection that drops is made again with backoff.
    ///
    /// `options` is a [`Durability`] (with the default commit delay) or
    /// [`WriteOptions`](crate::WriteOptions).
    pub async fn open(
        url: &str,
        options: impl Into<crate::WriteOptions>,
    ) -> Result<Self, StoreError> {
        let options = options.into();
        let durabilities = options.durabilities();
        let crate::WriteOptions {
            durability,
            commit_delay,
            ..
        } = options;
        let mut config = parse_url(url).map_err(|reason| StoreError::Unreachable {
            store: "(store.url)".to_owned(),
            reason,
        })?;
        config.connect_timeout(writer::CONNECT_TIMEOUT);
        if config.get_application_name().is_none() {
            config.application_name("keel");
        }
        let store = describe(&config);

        let (queue, rx) = mpsc::channel(QUEUE_CAPACITY);
        let (ready, is_ready) = oneshot::channel();
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tap = crate::sqlite::writer::TapCell::default();
        let writer = {
            let (config, for_writer) = (config.clone(), store.clone());
            let failing = Arc::clone(&failing);
            let tap = Arc::clone(&tap);
            std::thread::Builder::new()
                .name("keel-pg-writer".to_owned())
                .spawn(move || {
                    writer_thread(
                        config,
                        for_writer,
                        (durabilities, commit_delay),
                        (rx, failing, tap),
                        ready,
                    )
                })
                .map_err(|e| StoreError::Unreachable {
                    store: store.clone(),
                    reason: format!("cannot start the writer thread: {e}"),
                })?
        };
        let opened = is_ready.await.unwrap_or_else(|_| {
            Err(StoreError::Unreachable {
                store: store.clone(),
                reason: "the writer thread stopped while connecting".to_owned(),
            })
        });
        if let Err(e) = opened {
            drop(queue);
            let _ = tokio::task::spawn_blocking(move || writer.join()).await;
            return Err(e);
        }
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(writer::CONNECT_TIMEOUT))
            .recycle_timeout(Some(writer::CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Unreachable {
                store: store.clone(),
                reason: format!("cannot build the connection pool: {e}"),
            })?;
        tracing::debug!(%store, ?durability, "opened the PostgreSQL store");
        Ok(Self {
            writer: {
                let stopped_store = store.clone();
                WriterHandle::new((queue, tap), writer, store.clone(), move || {
                    StoreError::Unreachable {
                        store: stopped_store.clone(),
                        reason: "this node's writer has stopped".to_owned(),
                    }
                })
            },
            store,
            durability,
            pool,
            failing,
        })
    }

    /// The database, as shown in logs and errors (no password).
    pub fn describe(&self) -> &str {
        &self.store
    }

    /// `append_with_payloads`, and `append_call` (`call`).
    async fn append_payloads(
        &self,
        events: Vec<NewEvent>,
        payloads: Vec<crate::Payload>,
        owner: Option<String>,
        call: bool,
    ) -> Result<Vec<Event>, StoreError> {
        if events.is_empty() && payloads.is_empty() {
            return Ok(Vec::new());
        }
        // No cache of stored payloads here: another node may prune them.
        let blobs = payloads.into_iter().map(|p| (p.hash, p.bytes)).collect();
        self.writer
            .append(events, Payloads { owner, blobs }, call)
            .await
    }

    /// The durability this store acknowledges writes with.
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// Stops accepting writes and waits for the writer to finish what is queued.
    pub async fn close(mut self) -> Result<(), StoreError> {
        match self.writer.close().await {
            Ok(true) => Ok(()),
            Ok(false) | Err(_) => Err(self.stopped()),
        }
    }

    fn stopped(&self) -> StoreError {
        self.writer.stopped()
    }

    /// A pooled read connection.
    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(|e| StoreError::Unreachable {
            store: self.store.clone(),
            reason: writer::with_causes(&e),
        })
    }

    /// Runs a read query on a pooled connection.
    async fn query(
        &self,
        what: &str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(sql)
            .await
            .map_err(|e| PgFail::Sql(e).into_store(&self.store, what))?;
        client
            .query(&statement, params)
            .await
            .map_err(|e| PgFail::Sql(e).into_store(&self.store, what))
    }

    fn event_from_row(&self, row: &Row) -> Result<Event, StoreError> {
        let seq = u64::try_from(row.get::<_, i64>(0)).unwrap_or(0);
        stored_row(row)
            .event(seq)
            .map_err(|reason| StoreError::Corrupt {
                path: self.store.clone().into(),
                seq,
                reason,
            })
    }

    fn task_from_row(&self, row: &Row) -> Result<TaskRow, StoreError> {
        let id: String = row.get(0);
        let snapshot: String = row.get(4);
        let snapshot = serde_json::from_str(&snapshot).map_err(|e| StoreError::CorruptTask {
            path: self.store.clone().into(),
            task: id.clone(),
            reason: format!("snapshot is not JSON: {e}"),
        })?;
        let version: i64 = row.get(3);
        Ok(TaskRow {
            agent: row.get(1),
            state: row.get(2),
            version: u64::try_from(version).unwrap_or(0),
            snapshot,
            created_at_ms: row.get(5),
            updated_at_ms: row.get(6),
            lease_expires_at_ms: row.get(7),
            approval_expires_at_ms: row.get(8),
            deadline_at_ms: row.get(9),
            id,
        })
    }

    async fn task_rows(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<TaskRow>, StoreError> {
        self.query("reading tasks", sql, params)
            .await?
            .iter()
            .map(|row| self.task_from_row(row))
            .collect()
    }

    /// Tasks matching `states` (an SQL condition on `state`) whose `column` (a deadline)
    /// is at or before `now_ms`, soonest first.
    async fn expired(
        &self,
        states: &'static str,
        column: &'static str,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<TaskRow>, StoreError> {
        let sql = format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE {states} AND {column} <= $1
             ORDER BY {column}, id LIMIT $2"
        );
        self.task_rows(&sql, &[&now_ms, &sql_limit(limit)]).await
    }
}

/// How long `ping`'s write after a failed commit may take before the node says it is not
/// ready (a load balancer's probe should not hang on a stalled database).
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The writer thread: its own single-threaded runtime, so closing the store can join it.
fn writer_thread(
    config: Config,
    store: String,
    (durabilities, commit_delay): (crate::Durabilities, Option<std::time::Duration>),
    (rx, failing, tap): (
        mpsc::Receiver<Request>,
        Arc<std::sync::atomic::AtomicBool>,
        crate::sqlite::writer::TapCell,
    ),
    ready: oneshot::Sender<Result<(), StoreError>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = ready.send(Err(StoreError::Unreachable {
                store,
                reason: format!("cannot start the writer's runtime: {e}"),
            }));
            return;
        }
    };
    runtime.block_on(async move {
        let durability = durabilities.writes;
        let mut client = match writer::connect(&config, &store, durability).await {
            Ok(client) => client,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        if let Err(e) = schema::migrate(&mut client, &store, schema::MIGRATIONS).await {
            let _ = ready.send(Err(e));
            return;
        }
        let mut conn = writer::Connection::new(config, store, durability);
        conn.set_client(client);
        if ready.send(Ok(())).is_err() {
            return;
        }
        writer::run(conn, rx, commit_delay, durabilities, (failing, tap)).await;
    });
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("store", &self.store)
            .field("durability", &self.durability)
            .finish_non_exhaustive()
    }
}

/// Whether `url` is a PostgreSQL URL keel can use: `Err` says what is wrong (without
/// repeating the URL, which may hold a password). Nothing is connected to.
pub fn check_url(url: &str) -> Result<(), String> {
    parse_url(url).map(|_| ())
}

/// The connection settings of `url`, or what is wrong with it.
fn parse_url(url: &str) -> Result<Config, String> {
    let config: Config = url
        .parse()
        .map_err(|e| format!("not a valid PostgreSQL URL: {e}"))?;
    if config.get_hosts().is_empty() {
        return Err("the PostgreSQL URL names no host (postgres://USER@HOST:PORT/DB)".to_owned());
    }
    Ok(config)
}

/// `postgres://user@host:port/db` of a config: what logs and errors show (no password).
pub fn describe(config: &Config) -> String {
    let user = config
        .get_user()
        .map(|u| format!("{u}@"))
        .unwrap_or_default();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let name = match host {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            };
            match config.get_ports().get(i).or(config.get_ports().first()) {
                Some(port) => format!("{name}:{port}"),
                None => name,
            }
        })
        .collect();
    let db = config.get_dbname().unwrap_or("");
    format!("postgres://{user}{}/{db}", hosts.join(","))
}

/// `LIMIT` argument for a caller's `usize` limit.
fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// Columns 1..=9 of a `SELECT {COLUMNS}` row (the schema makes their types certain).
fn stored_row(row: &Row) -> StoredRow<'_> {
    StoredRow {
        task_id: row.get(1),
        at: row.get(2),
        at_ms: row.get(3),
        kind: row.get(4),
        data: row.get(5),
        prev_hash: row.get(6),
        hash: row.get(7),
        layout: u32::try_from(row.get::<_, i32>(8)).unwrap_or(u32::MAX),
        data_hash: row.get(9),
    }
}

#[async_trait::async_trait]
impl EventStore for PgStore {
    async fn append(&self, events: Vec<NewEvent>) -> Result<Vec<Event>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        self.writer.append(events, Payloads::default(), false).await
    }

    async fn append_with_payloads(
        &self,
        events: Vec<NewEvent>,
        payloads: Vec<crate::Payload>,
        owner: Option<String>,
    ) -> Result<Vec<Event>, StoreError> {
        self.append_payloads(events, payloads, owner, false).await
    }

    async fn append_call(
        &self,
        events: Vec<NewEvent>,
        payloads: Vec<crate::Payload>,
        owner: Option<String>,
    ) -> Result<Vec<Event>, StoreError> {
        self.append_payloads(events, payloads, owner, true).await
    }

    async fn events(&self, query: EventQuery) -> Result<Vec<Event>, StoreError> {
        let after = query
            .after_seq
            .map_or(0, |s| i64::try_from(s).unwrap_or(i64::MAX));
        let limit = query.limit.map(sql_limit);
        let mut sql = format!("SELECT {COLUMNS} FROM events WHERE seq > $1");
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&after];
        if let Some(task_id) = &query.task_id {
            params.push(task_id);
            sql.push_str(&format!(" AND task_id = ${}", params.len()));
        }
        if let Some(kind) = &query.kind {
            params.push(kind);
            sql.push_str(&format!(" AND kind = ${}", params.len()));
        }
        // `LIMIT NULL` is no limit.
        params.push(&limit);
        sql.push_str(&format!(" ORDER BY seq LIMIT ${}", params.len()));
        self.query("reading events", &sql, &params)
            .await?
            .iter()
            .map(|row| self.event_from_row(row))
            .collect()
    }

    async fn verify(&self) -> Result<Verify, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM events WHERE seq > $1 ORDER BY seq LIMIT $2");
        let mut verifier = ChainVerifier::new();
        let mut after: i64 = 0;
        loop {
            let rows = self
                .query("verifying the chain", &sql, &[&after, &VERIFY_PAGE])
                .await?;
            for row in &rows {
                let seq = row.get::<_, i64>(0);
                after = seq;
                let seq = u64::try_from(seq).unwrap_or(0);
                if let Err(reason) = stored_row(row).check(&mut verifier, seq) {
                    return Ok(Verify::Broken { seq, reason });
                }
            }
            if (rows.len() as i64) < VERIFY_PAGE {
                return Ok(Verify::Intact {
                    events: verifier.checked(),
                });
            }
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        if !self.writer.is_running() {
            return Err(self.stopped());
        }
        if self.failing.load(std::sync::atomic::Ordering::Relaxed) {
            // This node's latest commit failed (a read-only standby after a failover, a full
            // disk): ready only once a write of its own commits, not merely because reads
            // still work.
            match tokio::time::timeout(PROBE_TIMEOUT, crate::probe_write(self)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    self.failing
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    return Err(e);
                }
                Err(_) => {
                    return Err(StoreError::Unreachable {
                        store: self.store.clone(),
                        reason: format!(
                            "a write did not commit within {PROBE_TIMEOUT:?} after a failed commit"
                        ),
                    });
                }
            }
        }
        self.query("ping", "SELECT 1", &[]).await.map(|_| ())
    }

    async fn load_state(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let rows = self
            .query(
                "reading state",
                "SELECT value, version FROM state WHERE key = $1",
                &[&key],
            )
            .await?;
        Ok(rows.first().map(|row| Versioned {
            value: row.get(0),
            version: u64::try_from(row.get::<_, i64>(1)).unwrap_or(0),
        }))
    }

    async fn save_state(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: Option<u64>,
    ) -> Result<Option<u64>, StoreError> {
        self.writer.save_state(key, value, expected, false).await
    }

    async fn save_call_state(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: Option<u64>,
    ) -> Result<Option<u64>, StoreError> {
        self.writer.save_state(key, value, expected, true).await
    }

    fn set_tap(&self, tap: Arc<dyn crate::Tap>) -> bool {
        self.writer.set_tap(tap)
    }
}

#[async_trait::async_trait]
impl TaskStore for PgStore {
    async fn write_task(&self, write: TaskWrite) -> Result<Vec<Event>, StoreError> {
        self.writer.write_task(write).await
    }

    async fn task(&self, id: &str) -> Result<Option<TaskRow>, StoreError> {
        let sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1");
        Ok(self.task_rows(&sql, &[&id]).await?.pop())
    }

    async fn tasks(&self, query: TaskQuery) -> Result<TaskPage, StoreError> {
        let limit = query.page_size();
        let cursor = query.after()?;
        let mut sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE true");
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
        if let Some(state) = &query.state {
            params.push(state);
            sql.push_str(&format!(" AND state = ${}", params.len()));
        }
        if let Some(agent) = &query.agent {
            params.push(agent);
            sql.push_str(&format!(" AND agent = ${}", params.len()));
        }
        if let Some((created, id)) = &cursor {
            params.push(created);
            params.push(id);
            let (c, i) = (params.len() - 1, params.len());
            sql.push_str(&format!(
                " AND (created_at_ms, id) {} (${c}, ${i})",
                query.after_op()
            ));
        }
        // One more than the page, to know whether there is a next one.
        let fetch = sql_limit(limit + 1);
        params.push(&fetch);
        sql.push_str(&format!(
            " ORDER BY {} LIMIT ${}",
            query.order_by(),
            params.len()
        ));
        Ok(query.page(self.task_rows(&sql, &params).await?))
    }

    async fn next_queued(&self, agent: &str, limit: usize) -> Result<Vec<TaskRow>, StoreError> {
        let sql = format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE state = 'queued' AND agent = $1
             ORDER BY created_at_ms, id LIMIT $2"
        );
        self.task_rows(&sql, &[&agent, &sql_limit(limit)]).await
    }

    async fn expired_leases(&self, now_ms: i64, limit: usize) -> Result<Vec<TaskRow>, StoreError> {
        self.expired("state = 'running'", "lease_expires_at_ms", now_ms, limit)
            .await
    }

    async fn expired_approvals(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<TaskRow>, StoreError> {
        self.expired(
            "state = 'awaiting_human'",
            "approval_expires_at_ms",
            now_ms,
            limit,
        )
        .await
    }

    async fn expired_deadlines(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<TaskRow>, StoreError> {
        let unfinished = "state IN ('queued', 'running', 'awaiting_human')";
        self.expired(unfinished, "deadline_at_ms", now_ms, limit)
            .await
    }

    async fn idempotent(
        &self,
        scope: &str,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let rows = self
            .query(
                "reading an idempotency record",
                "SELECT status, body, request_hash FROM idempotency WHERE scope = $1 AND key = $2",
                &[&scope, &key],
            )
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let body: String = row.get(1);
        let body = serde_json::from_str(&body).map_err(|e| StoreError::CorruptTask {
            path: self.store.clone().into(),
            task: format!("(idempotency {scope}/{key})"),
            reason: format!("body is not JSON: {e}"),
        })?;
        Ok(Some(IdempotencyRecord {
            scope: scope.to_owned(),
            key: key.to_owned(),
            status: u16::try_from(row.get::<_, i32>(0)).unwrap_or(0),
            body,
            request_hash: row.get(2),
        }))
    }

    async fn blob(&self, hash: &str) -> Result<Option<bytes::Bytes>, StoreError> {
        let rows = self
            .query(
                "reading a blob",
                "SELECT bytes FROM blobs WHERE hash = $1",
                &[&hash],
            )
            .await?;
        Ok(rows
            .first()
            .map(|row| bytes::Bytes::from(row.get::<_, Vec<u8>>(0))))
    }

    async fn count_by_state(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let rows = self
            .query(
                "counting tasks",
                "SELECT state, count(*) FROM tasks GROUP BY state ORDER BY state",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| (row.get(0), u64::try_from(row.get::<_, i64>(1)).unwrap_or(0)))
            .collect())
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        let rows = self
            .query(
                "reading sizes",
                "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM tasks),
                        (SELECT count(*) FROM blobs), (SELECT coalesce(sum(size), 0)::bigint FROM blobs),
                        pg_database_size(current_database())",
                &[],
            )
            .await?;
        let n = |row: &Row, i: usize| u64::try_from(row.get::<_, i64>(i)).unwrap_or(0);
        Ok(rows
            .first()
            .map(|row| StoreStats {
                events: n(row, 0),
                tasks: n(row, 1),
                blobs: n(row, 2),
                blob_bytes: n(row, 3),
                db_bytes: n(row, 4),
            })
            .unwrap_or_default())
    }

    async fn prune(&self, policy: PrunePolicy) -> Result<PruneReport, StoreError> {
        self.writer.prune(policy).await
    }
}

#[cfg(test)]
mod describe_tests {
    use super::*;

    #[test]
    fn urls_are_checked_without_connecting() {
        assert!(check_url("postgres://keel:pw@db:5432/keel").is_ok());
        let bad = check_url("postgres://keel@[::1").unwrap_err();
        assert!(bad.starts_with("not a valid PostgreSQL URL"), "{bad}");
        let no_host = check_url("postgres:///keel").unwrap_err();
        assert!(no_host.contains("names no host"), "{no_host}");
    }

    #[test]
    fn describe_never_shows_the_password() {
        let config: Config = "postgres://keel:s3cret@db.internal:5433/keel"
            .parse()
            .unwrap();
        assert_eq!(describe(&config), "postgres://keel@db.internal:5433/keel");
        let config: Config = "postgresql://db/keel".parse().unwrap();
        assert_eq!(describe(&config), "postgres://db:5432/keel");
    }
}
