//! Failures of an event store. Messages are lowercase and name the database.

use std::path::PathBuf;
use std::sync::Arc;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The directory that should hold the database could not be created.
    #[error("create directory {} for the event store failed", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The database could not be opened or configured.
    #[error("open event store {} failed", path.display())]
    Open {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// A schema migration failed; the database was left at version `from`.
    #[error("migrate event store {} from schema version {from} to {to} failed", path.display())]
    Migrate {
        /// The database file.
        path: PathBuf,
        /// Schema version found.
        from: u32,
        /// Schema version this build wanted.
        to: u32,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// The database was written by a newer keel.
    #[error(
        "event store {} has schema version {found}, newer than the {known} this keel knows",
        path.display()
    )]
    SchemaTooNew {
        /// The database file.
        path: PathBuf,
        /// Schema version found.
        found: u32,
        /// Newest schema version this build knows.
        known: u32,
    },
    /// The writer thread could not be started.
    #[error("start the writer thread for event store {} failed", path.display())]
    SpawnWriter {
        /// The database file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A group commit failed; none of its events were written.
    ///
    /// Every appender that shared the commit gets this error, hence the `Arc`.
    #[error("commit of {events} events to event store {} failed", path.display())]
    Commit {
        /// The database file.
        path: PathBuf,
        /// Number of events in the failed commit (all appenders together).
        events: usize,
        /// What SQLite said.
        #[source]
        source: Arc<rusqlite::Error>,
    },
    /// Reading events failed.
    #[error("read from event store {} failed", path.display())]
    Read {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// A stored row could not be turned back into an event.
    #[error("event {seq} in event store {} is malformed: {reason}", path.display())]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// The row's `seq`.
        seq: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// The writer thread is gone (the store was closed, or the thread died);
    /// the append was not written.
    #[error("the writer of event store {} has stopped", path.display())]
    WriterStopped {
        /// The database file.
        path: PathBuf,
    },
    /// A blocking read task panicked or was cancelled.
    #[error("a read task on event store {} failed", path.display())]
    Task {
        /// The database file.
        path: PathBuf,
        /// What tokio said.
        #[source]
        source: tokio::task::JoinError,
    },
    /// A task write expected another version of the task; nothing was written.
    #[error(
        "task {task}: the write expected {}, the store has {}",
        show_version(.expected),
        show_version(.found)
    )]
    Conflict {
        /// The task id.
        task: String,
        /// The version the write expected (`None`: that the task does not exist).
        expected: Option<u64>,
        /// The version stored (`None`: the task does not exist).
        found: Option<u64>,
    },
    /// The idempotency key was already used; nothing of the write was applied.
    #[error("idempotency key {key} in scope {scope} was already used")]
    DuplicateKey {
        /// Namespace of the key.
        scope: String,
        /// The key.
        key: String,
    },
    /// A task write is inconsistent in itself (wrong row version, a blob ref
    /// to an unknown blob); nothing was written.
    #[error("invalid write to task {task}: {reason}")]
    InvalidWrite {
        /// The task id.
        task: String,
        /// What is wrong, in lowercase words.
        reason: String,
    },
    /// The PostgreSQL server could not be reached (at open, or while reconnecting);
    /// nothing of the operation was written.
    #[error("cannot reach the PostgreSQL store {store}: {reason}")]
    Unreachable {
        /// The database, without its password (`postgres://keel@db:5432/keel`).
        store: String,
        /// What the connection attempt said.
        reason: String,
    },
    /// A statement on the PostgreSQL store failed. For a write, nothing of it was
    /// acknowledged (it may have committed if the connection broke during `COMMIT`).
    #[error("{what} on the PostgreSQL store {store} failed: {}", pg_detail(source))]
    Postgres {
        /// The database, without its password.
        store: String,
        /// What keel was doing, in lowercase words (`commit of 3 events`).
        what: String,
        /// What PostgreSQL (or the connection) said.
        #[source]
        source: Arc<tokio_postgres::Error>,
    },
    /// The PostgreSQL schema was written by a newer keel.
    #[error(
        "the PostgreSQL store {store} has schema version {found}, newer than the {known} this keel knows"
    )]
    PostgresSchemaTooNew {
        /// The database, without its password.
        store: String,
        /// Schema version found.
        found: u32,
        /// Newest schema version this build knows.
        known: u32,
    },
    /// A task list cursor that this store did not hand out.
    #[error("invalid task list cursor")]
    InvalidCursor,
    /// A stored task row could not be read back.
    #[error("task {task} in event store {} is malformed: {reason}", path.display())]
    CorruptTask {
        /// The database file.
        path: PathBuf,
        /// The task id.
        task: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// `version 3` or `no task`, for [`StoreError::Conflict`].
fn show_version(version: &Option<u64>) -> String {
    version.map_or_else(|| "no task".to_owned(), |v| format!("version {v}"))
}

/// What PostgreSQL said: the server's own message and SQLSTATE for an error it reported
/// (`tokio_postgres` shows only "db error" for those), else the client's error.
pub(crate) fn pg_detail(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => error.to_string(),
    }
}
