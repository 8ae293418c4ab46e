//! The embedded SQLite event and task store: one file, WAL mode, one writer
//! thread with group commit, a small pool of readers.
//!
//! Durability: the database runs in WAL mode. A commit is appended to the WAL
//! with `write()` before it is acknowledged, so it survives `kill -9` of the
//! process under both [`Durability`] settings; [`Durability::Fsync`]
//! (`synchronous=FULL`) also syncs the WAL before acknowledging, so it survives
//! power loss too. Group commit ([`writer`]) keeps that to one sync per batch of
//! concurrent appends rather than one per request. Model-call records
//! ([`EventStore::append_call`]) have their own durability
//! ([`WriteOptions::call_durability`]): a commit of nothing else is made with it, any other
//! with the store's. Commits that are not synced reach the disk when the background
//! checkpointer syncs the WAL before copying it (every 100 ms that there is
//! something to copy) or with the next synced commit, whichever comes first.
//!
//! One process should own a database file: the writer serialises appends within
//! the process, and re-reads the chain head inside each write transaction, so a
//! second writer would be safe but slow.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use rusqlite::Connection;
use tokio::sync::mpsc;

use keel_core::NewEvent;

use crate::{
    Durability, Event, EventQuery, EventStore, IdempotencyRecord, PrunePolicy, PruneReport,
    StoreError, StoreStats, TaskPage, TaskQuery, TaskRow, TaskStore, TaskWrite, Verify, Versioned,
    WriteOptions,
};

mod checkpoint;
mod migrate;
mod read;
pub(crate) mod writer;

#[cfg(test)]
mod tests;

use read::{BUSY_TIMEOUT, Readers};
use writer::{Payloads, QUEUE_CAPACITY, WriterHandle, WriterStats};

/// The SQLite [`EventStore`] and [`TaskStore`].
///
/// Dropping it (or [`SqliteStore::close`]) lets the writer finish every append
/// already queued, then closes the file; `drop` waits for that.
pub struct SqliteStore {
    path: PathBuf,
    durability: Durability,
    /// The writer thread (dropped first: it commits what is queued before the rest closes).
    writer: WriterHandle,
    readers: Arc<Readers>,
    /// One permit per read connection; see [`read::MAX_READERS`].
    read_permits: Arc<tokio::sync::Semaphore>,
    stats: Arc<WriterStats>,
    /// Copies the WAL into the database off the commit path.
    _checkpointer: checkpoint::Checkpointer,
    /// Payloads (owner, hash) known to be stored, so a resent payload (a
    /// conversation prefix, repeated request parameters) is not sent to the
    /// single writer again. Filled only after a commit; cleared by `prune`.
    stored_payloads: parking_lot::Mutex<PayloadCache>,
}

/// Payload hashes known to be stored, per owner; bounded by starting over.
#[derive(Default)]
struct PayloadCache {
    by_owner: std::collections::HashMap<String, std::collections::HashSet<String>>,
    len: usize,
}

impl PayloadCache {
    fn contains(&self, owner: &str, hash: &str) -> bool {
        self.by_owner
            .get(owner)
            .is_some_and(|hashes| hashes.contains(hash))
    }

    fn remember(&mut self, owner: String, hashes: Vec<String>) {
        if self.len + hashes.len() > PAYLOAD_CACHE_LIMIT {
            self.clear();
        }
        self.len += hashes.len();
        self.by_owner.entry(owner).or_default().extend(hashes);
    }

    fn clear(&mut self) {
        self.by_owner.clear();
        self.len = 0;
    }
}

/// Entries of the stored-payload cache before it starts over.
const PAYLOAD_CACHE_LIMIT: usize = 100_000;

// === impl SqliteStore ===

impl SqliteStore {
    /// Opens or creates the database file (creating parent directories), runs
    /// migrations, and starts the writer thread.
    ///
    /// `options` is a [`Durability`] (with the default commit delay) or [`WriteOptions`].
    ///
    /// Errors if the directory or file cannot be created or opened, the schema
    /// is newer than this build, or a migration fails.
    pub fn open(path: &Path, options: impl Into<WriteOptions>) -> Result<Self, StoreError> {
        let options = options.into();
        let durabilities = options.durabilities();
        let WriteOptions {
            durability,
            commit_delay,
            upcoming,
            ..
        } = options;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                path: dir.to_owned(),
                source,
            })?;
        }
        let mut conn = open_writer(path, durability)?;
        migrate::migrate(&mut conn, path, migrate::MIGRATIONS)?;
        let readers = Arc::new(Readers::open(path)?);
        let checkpointer = checkpoint::Checkpointer::start(path, synchronous(durability))?;
        let stats = Arc::new(WriterStats::default());
        let (queue, rx) = mpsc::channel(QUEUE_CAPACITY);
        let tap = writer::TapCell::default();
        let writer = {
            let writer_path = path.to_owned();
            let stats = Arc::clone(&stats);
            let linger = writer::Linger {
                delay: commit_delay,
                upcoming: upcoming.clone(),
            };
            let tap = Arc::clone(&tap);
            std::thread::Builder::new()
                .name("keel-store-writer".to_owned())
                .spawn(move || {
                    writer::run(conn, writer_path, rx, stats, (linger, durabilities), tap)
                })
                .map_err(|source| StoreError::SpawnWriter {
                    path: path.to_owned(),
                    source,
                })?
        };
        upcoming.set_writer(writer.thread().clone());
        tracing::debug!(path = %path.display(), ?durabilities, "opened event store");
        Ok(Self {
            path: path.to_owned(),
            durability,
            writer: {
                let stopped_path = path.to_owned();
                WriterHandle::new(
                    (queue, tap),
                    writer,
                    path.display().to_string(),
                    move || StoreError::WriterStopped {
                        path: stopped_path.clone(),
                    },
                )
                .counting(upcoming)
            },
            readers,
            read_permits: Arc::new(tokio::sync::Semaphore::new(read::MAX_READERS)),
            stats,
            _checkpointer: checkpointer,
            stored_payloads: parking_lot::Mutex::new(PayloadCache::default()),
        })
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
        if payloads.is_empty() {
            return self.writer.append(events, Payloads::default(), call).await;
        }
        // The payloads come hashed (on the caller's thread, not in the single writer);
        // leave out what an earlier commit already stored for this owner.
        let blobs: Vec<(String, bytes::Bytes)> = {
            let known = self.stored_payloads.lock();
            let key = owner.as_deref().unwrap_or_default();
            payloads
                .into_iter()
                .filter(|p| !known.contains(key, &p.hash))
                .map(|p| (p.hash, p.bytes))
                .collect()
        };
        // A conversation's prefix and parameters resent: nothing new to remember.
        let new: Vec<String> = blobs.iter().map(|(h, _)| h.clone()).collect();
        let key = (!new.is_empty()).then(|| owner.clone().unwrap_or_default());
        let payloads = Payloads { owner, blobs };
        let stored = self.writer.append(events, payloads, call).await?;
        if let Some(key) = key {
            self.stored_payloads.lock().remember(key, new);
        }
        Ok(stored)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The durability this store acknowledges appends with.
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// Number of successful commits since open. Concurrent appends share
    /// commits, so this grows more slowly than the number of `append` calls.
    pub fn commits(&self) -> u64 {
        self.stats.commits.load(Ordering::Relaxed)
    }

    /// How many of [`SqliteStore::commits`] synced the WAL to disk (`synchronous=FULL`).
    pub fn synced_commits(&self) -> u64 {
        self.stats.synced.load(Ordering::Relaxed)
    }

    /// Stops accepting appends, waits for the writer to commit everything
    /// already queued, and closes the database.
    ///
    /// Errors only if the writer thread had died.
    pub async fn close(mut self) -> Result<(), StoreError> {
        match self.writer.close().await {
            Ok(true) => Ok(()),
            Ok(false) => Err(self.stopped()),
            Err(source) => Err(self.task_err(source)),
        }
    }

    fn stopped(&self) -> StoreError {
        self.writer.stopped()
    }

    fn task_err(&self, source: tokio::task::JoinError) -> StoreError {
        StoreError::Task {
            path: self.path.clone(),
            source,
        }
    }

    /// Runs a blocking read on the pool.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Readers) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let readers = Arc::clone(&self.readers);
        // The semaphore is never closed, so acquiring only fails if it were.
        let permit = Arc::clone(&self.read_permits)
            .acquire_owned()
            .await
            .map_err(|_| self.stopped())?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            f(&readers)
        })
        .await
        .map_err(|source| self.task_err(source))?
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .field("durability", &self.durability)
            .field("commits", &self.commits())
            .finish_non_exhaustive()
    }
}

/// Opens the write connection: WAL, the durability's `synchronous`, a busy timeout.
fn open_writer(path: &Path, durability: Durability) -> Result<Connection, StoreError> {
    let open_err = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    let conn = Connection::open(path).map_err(open_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    // The writer caches every statement it runs (about twenty, `BEGIN` and `COMMIT` among
    // them): rusqlite's default cache of 16 would evict some under mixed writes.
    conn.set_prepared_statement_cache_capacity(64);
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(open_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(path = %path.display(), %mode, "event store could not switch to WAL mode");
    }
    conn.pragma_update(None, "synchronous", synchronous(durability))
        .map_err(open_err)?;
    // The background checkpointer keeps the WAL short; the writer checkpoints
    // by itself only if that one falls far behind (see `checkpoint`).
    conn.pragma_update(
        None,
        "wal_autocheckpoint",
        checkpoint::WRITER_FALLBACK_PAGES,
    )
    .map_err(open_err)?;
    Ok(conn)
}

/// SQLite's `synchronous` for a durability.
fn synchronous(durability: Durability) -> &'static str {
    match durability {
        Durability::Fsync => "FULL",
        Durability::Relaxed => "NORMAL",
    }
}

#[async_trait::async_trait]
impl EventStore for SqliteStore {
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
        self.read(move |readers| readers.events(&query)).await
    }

    async fn verify(&self) -> Result<Verify, StoreError> {
        self.read(Readers::verify).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        if !self.writer.is_running() {
            return Err(self.stopped());
        }
        if self.stats.failing.load(Ordering::Relaxed) {
            // The latest commit failed: ready only once a write commits again (the disk has
            // room, the lock is free), not merely because reads still work.
            if let Err(e) = crate::probe_write(self).await {
                // Its own write failed inside a batch that committed: still failing.
                self.stats.failing.store(true, Ordering::Relaxed);
                return Err(e);
            }
        }
        self.read(Readers::ping).await
    }

    async fn load_state(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let key = key.to_owned();
        self.read(move |readers| readers.state(&key)).await
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
impl TaskStore for SqliteStore {
    async fn write_task(&self, write: TaskWrite) -> Result<Vec<Event>, StoreError> {
        self.writer.write_task(write).await
    }

    async fn task(&self, id: &str) -> Result<Option<TaskRow>, StoreError> {
        let id = id.to_owned();
        self.read(move |readers| readers.task(&id)).await
    }

    async fn tasks(&self, query: TaskQuery) -> Result<TaskPage, StoreError> {
        self.read(move |readers| readers.tasks(&query)).await
    }

    async fn next_queued(&self, agent: &str, limit: usize) -> Result<Vec<TaskRow>, StoreError> {
        let agent = agent.to_owned();
        self.read(move |readers| readers.next_queued(&agent, limit))
            .await
    }

    async fn expired_leases(&self, now_ms: i64, limit: usize) -> Result<Vec<TaskRow>, StoreError> {
        self.read(move |readers| {
            readers.expired("state = 'running'", "lease_expires_at_ms", now_ms, limit)
        })
        .await
    }

    async fn expired_approvals(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<TaskRow>, StoreError> {
        self.read(move |readers| {
            readers.expired(
                "state = 'awaiting_human'",
                "approval_expires_at_ms",
                now_ms,
                limit,
            )
        })
        .await
    }

    async fn expired_deadlines(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<TaskRow>, StoreError> {
        // The unary `+` keeps SQLite off the indexes on `state`, which hold every queued
        // task: it walks the partial index on `deadline_at_ms` instead.
        let unfinished = "+state IN ('queued', 'running', 'awaiting_human')";
        self.read(move |readers| readers.expired(unfinished, "deadline_at_ms", now_ms, limit))
            .await
    }

    async fn idempotent(
        &self,
        scope: &str,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let (scope, key) = (scope.to_owned(), key.to_owned());
        self.read(move |readers| readers.idempotent(&scope, &key))
            .await
    }

    async fn blob(&self, hash: &str) -> Result<Option<bytes::Bytes>, StoreError> {
        let hash = hash.to_owned();
        let blob = self.read(move |readers| readers.blob(&hash)).await?;
        Ok(blob.map(bytes::Bytes::from))
    }

    async fn count_by_state(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.read(Readers::count_by_state).await
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        self.read(Readers::stats).await
    }

    async fn prune(&self, policy: PrunePolicy) -> Result<PruneReport, StoreError> {
        // Pruned payloads must be stored again if they come back.
        self.stored_payloads.lock().clear();
        let report = self.writer.prune(policy).await;
        self.stored_payloads.lock().clear();
        report
    }
}
