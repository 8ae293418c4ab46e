//! Reading the log and the task tables: a small pool of read-only
//! connections, queries, and the chain walk of `verify`.
//!
//! Everything here blocks; the store calls it from `spawn_blocking`. In WAL mode
//! readers see the last committed state and never wait for the writer.

use std::path::{Path, PathBuf};
use std::time::Duration;

use keel_core::EventKind;
use parking_lot::Mutex;
use rusqlite::types::{Value, ValueRef};
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row};

use crate::chain::{ChainVerifier, StoredRow};
use crate::{
    Event, EventQuery, IdempotencyRecord, StoreError, StoreStats, TaskPage, TaskQuery, TaskRow,
    Verify, Versioned,
};

/// Read connections, and so reads running at once. The store makes further
/// reads wait for one of these (asynchronously) instead of opening a connection
/// and a blocking thread each: under a burst of a thousand claims that would mean
/// a thousand threads, a thousand page caches and a schema parse per read.
pub(crate) const MAX_READERS: usize = 4;

/// How long a connection waits for a lock (schema changes, checkpoints) before failing.
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const COLUMNS: &str = "seq, task_id, at, at_ms, kind, data, prev_hash, hash, layout, data_hash";

const TASK_COLUMNS: &str = "id, agent, state, version, snapshot, created_at_ms, updated_at_ms, \
                            lease_expires_at_ms, approval_expires_at_ms, deadline_at_ms";

/// Read connections to one database file.
pub(crate) struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl Readers {
    /// Opens one connection now, so a bad file fails at open rather than at first read.
    pub(crate) fn open(path: &Path) -> Result<Self, StoreError> {
        let readers = Self {
            path: path.to_owned(),
            idle: Mutex::new(Vec::new()),
        };
        let conn = readers.connect()?;
        readers.idle.lock().push(conn);
        Ok(readers)
    }

    fn connect(&self) -> Result<Connection, StoreError> {
        let open_err = |source| StoreError::Open {
            path: self.path.clone(),
            source,
        };
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(&self.path, flags).map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        // Read-write open (a read-only one cannot create the WAL index), but it never writes.
        conn.pragma_update(None, "query_only", true)
            .map_err(open_err)?;
        Ok(conn)
    }

    /// Runs `f` on a pooled connection.
    fn with<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let pooled = self.idle.lock().pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => self.connect()?,
        };
        let result = f(&conn);
        let mut idle = self.idle.lock();
        if idle.len() < MAX_READERS {
            idle.push(conn);
        }
        result
    }

    fn read_err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Read {
            path: self.path.clone(),
            source,
        }
    }

    /// `SELECT 1`: the file is there and readable.
    pub(crate) fn ping(&self) -> Result<(), StoreError> {
        self.with(|conn| {
            conn.query_row("SELECT 1", [], |_| Ok(()))
                .map_err(|e| self.read_err(e))
        })
    }

    /// The events matching `query`, ascending `seq`.
    pub(crate) fn events(&self, query: &EventQuery) -> Result<Vec<Event>, StoreError> {
        // Only the filters given appear in the SQL, so SQLite can use the
        // (task_id, seq) and (kind, seq) indexes.
        let mut sql = format!("SELECT {COLUMNS} FROM events WHERE seq > ?1");
        let after = query
            .after_seq
            .map_or(0, |s| i64::try_from(s).unwrap_or(i64::MAX));
        let mut args = vec![Value::Integer(after)];
        if let Some(task_id) = &query.task_id {
            args.push(Value::Text(task_id.clone()));
            sql.push_str(&format!(" AND task_id = ?{}", args.len()));
        }
        if let Some(kind) = &query.kind {
            args.push(Value::Text(kind.clone()));
            let n = args.len();
            if query.task_id.is_some() {
                // With a task, its (short) log is the way in: the unary `+` keeps SQLite
                // from walking the kind index over every task's events instead.
                sql.push_str(&format!(" AND +kind = ?{n}"));
            } else if kind == EventKind::LlmCall.as_str() {
                // The kind index leaves these out (schema version 7): most of the log is
                // model calls, so the walk by `seq` finds them.
                sql.push_str(&format!(" AND kind = ?{n}"));
            } else {
                // The kind index's own condition, word for word, lets SQLite use it.
                sql.push_str(&format!(" AND kind = ?{n} AND kind <> 'llm_call'"));
            }
        }
        let limit = query
            .limit
            .map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX));
        args.push(Value::Integer(limit));
        sql.push_str(&format!(" ORDER BY seq LIMIT ?{}", args.len()));

        self.rows(&sql, args, Self::event_from_row)
    }

    fn event_from_row(&self, row: &Row<'_>) -> Result<Event, StoreError> {
        let seq: u64 = row.get(0).map_err(|e| self.read_err(e))?;
        let corrupt = |reason: String| StoreError::Corrupt {
            path: self.path.clone(),
            seq,
            reason,
        };
        stored_row(row)
            .and_then(|fields| fields.event(seq))
            .map_err(corrupt)
    }

    /// Walks the whole log in one read transaction and names the first broken link.
    pub(crate) fn verify(&self) -> Result<Verify, StoreError> {
        self.with(|conn| {
            let sql = format!("SELECT {COLUMNS} FROM events ORDER BY seq");
            let mut stmt = conn.prepare(&sql).map_err(|e| self.read_err(e))?;
            let mut rows = stmt.query([]).map_err(|e| self.read_err(e))?;
            let mut verifier = ChainVerifier::new();
            while let Some(row) = rows.next().map_err(|e| self.read_err(e))? {
                let seq = match row.get_ref(0).map_err(|e| self.read_err(e))? {
                    ValueRef::Integer(seq) => u64::try_from(seq).unwrap_or(0),
                    _ => 0,
                };
                let checked = stored_row(row).and_then(|fields| fields.check(&mut verifier, seq));
                if let Err(reason) = checked {
                    return Ok(Verify::Broken { seq, reason });
                }
            }
            Ok(Verify::Intact {
                events: verifier.checked(),
            })
        })
    }

    /// Runs a task query and reads every row.
    fn task_rows(&self, sql: &str, args: Vec<Value>) -> Result<Vec<TaskRow>, StoreError> {
        self.rows(sql, args, Self::task_from_row)
    }

    /// Runs `sql` with `args` and turns every row into a `T` with `read`.
    fn rows<T>(
        &self,
        sql: &str,
        args: Vec<Value>,
        read: impl Fn(&Self, &Row<'_>) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        self.with(|conn| {
            let mut stmt = conn.prepare_cached(sql).map_err(|e| self.read_err(e))?;
            let mut rows = stmt
                .query(rusqlite::params_from_iter(args))
                .map_err(|e| self.read_err(e))?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().map_err(|e| self.read_err(e))? {
                out.push(read(self, row)?);
            }
            Ok(out)
        })
    }

    fn task_from_row(&self, row: &Row<'_>) -> Result<TaskRow, StoreError> {
        let id: String = row.get(0).map_err(|e| self.read_err(e))?;
        let corrupt = |reason: String| StoreError::CorruptTask {
            path: self.path.clone(),
            task: id.clone(),
            reason,
        };
        let snapshot: String = row.get(4).map_err(|e| corrupt(e.to_string()))?;
        let snapshot = serde_json::from_str(&snapshot)
            .map_err(|e| corrupt(format!("snapshot is not JSON: {e}")))?;
        Ok(TaskRow {
            agent: row.get(1).map_err(|e| corrupt(e.to_string()))?,
            state: row.get(2).map_err(|e| corrupt(e.to_string()))?,
            version: row.get(3).map_err(|e| corrupt(e.to_string()))?,
            snapshot,
            created_at_ms: row.get(5).map_err(|e| corrupt(e.to_string()))?,
            updated_at_ms: row.get(6).map_err(|e| corrupt(e.to_string()))?,
            lease_expires_at_ms: row.get(7).map_err(|e| corrupt(e.to_string()))?,
            approval_expires_at_ms: row.get(8).map_err(|e| corrupt(e.to_string()))?,
            deadline_at_ms: row.get(9).map_err(|e| corrupt(e.to_string()))?,
            id,
        })
    }

    /// The row of task `id`.
    pub(crate) fn task(&self, id: &str) -> Result<Option<TaskRow>, StoreError> {
        let sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?1");
        let mut rows = self.task_rows(&sql, vec![Value::Text(id.to_owned())])?;
        Ok(rows.pop())
    }

    /// One page of tasks by (`created_at_ms`, `id`), in the query's order.
    pub(crate) fn tasks(&self, query: &TaskQuery) -> Result<TaskPage, StoreError> {
        let limit = query.page_size();
        let mut sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE 1 = 1");
        let mut args = Vec::new();
        if let Some(state) = &query.state {
            args.push(Value::Text(state.clone()));
            sql.push_str(&format!(" AND state = ?{}", args.len()));
        }
        if let Some(agent) = &query.agent {
            args.push(Value::Text(agent.clone()));
            sql.push_str(&format!(" AND agent = ?{}", args.len()));
        }
        if let Some((created, id)) = query.after()? {
            args.push(Value::Integer(created));
            args.push(Value::Text(id));
            let (c, i) = (args.len() - 1, args.len());
            sql.push_str(&format!(
                " AND (created_at_ms, id) {} (?{c}, ?{i})",
                query.after_op()
            ));
        }
        // One more than the page, to know whether there is a next one.
        args.push(Value::Integer(i64::try_from(limit + 1).unwrap_or(i64::MAX)));
        sql.push_str(&format!(
            " ORDER BY {} LIMIT ?{}",
            query.order_by(),
            args.len()
        ));
        Ok(query.page(self.task_rows(&sql, args)?))
    }

    /// The oldest `queued` tasks of `agent`.
    pub(crate) fn next_queued(
        &self,
        agent: &str,
        limit: usize,
    ) -> Result<Vec<TaskRow>, StoreError> {
        let sql = format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE state = 'queued' AND agent = ?1
             ORDER BY created_at_ms, id LIMIT ?2"
        );
        self.task_rows(&sql, vec![Value::Text(agent.to_owned()), sql_limit(limit)])
    }

    /// Tasks matching `states` (an SQL condition on `state`) whose `column` (a deadline)
    /// is at or before `now_ms`, soonest first.
    pub(crate) fn expired(
        &self,
        states: &'static str,
        column: &'static str,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<TaskRow>, StoreError> {
        let sql = format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE {states} AND {column} <= ?1
             ORDER BY {column}, id LIMIT ?2"
        );
        self.task_rows(&sql, vec![Value::Integer(now_ms), sql_limit(limit)])
    }

    /// The idempotency record under `(scope, key)`.
    pub(crate) fn idempotent(
        &self,
        scope: &str,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let found: Option<(u16, String, Option<String>)> = self.with(|conn| {
            conn.prepare_cached(
                "SELECT status, body, request_hash FROM idempotency WHERE scope = ?1 AND key = ?2",
            )
            .and_then(|mut stmt| {
                stmt.query_row([scope, key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .optional()
            })
            .map_err(|e| self.read_err(e))
        })?;
        let Some((status, body, request_hash)) = found else {
            return Ok(None);
        };
        let body = serde_json::from_str(&body).map_err(|e| StoreError::CorruptTask {
            path: self.path.clone(),
            task: format!("(idempotency {scope}/{key})"),
            reason: format!("body is not JSON: {e}"),
        })?;
        Ok(Some(IdempotencyRecord {
            scope: scope.to_owned(),
            key: key.to_owned(),
            status,
            body,
            request_hash,
        }))
    }

    /// The blob under `hash`.
    pub(crate) fn blob(&self, hash: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.with(|conn| {
            conn.prepare_cached("SELECT bytes FROM blobs WHERE hash = ?1")
                .and_then(|mut stmt| stmt.query_row([hash], |r| r.get(0)).optional())
                .map_err(|e| self.read_err(e))
        })
    }

    /// The state value under `key` and its version.
    pub(crate) fn state(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        self.with(|conn| {
            conn.prepare_cached("SELECT value, version FROM state WHERE key = ?1")
                .and_then(|mut stmt| {
                    stmt.query_row([key], |r| {
                        Ok(Versioned {
                            value: r.get(0)?,
                            version: r.get::<_, i64>(1)? as u64,
                        })
                    })
                    .optional()
                })
                .map_err(|e| self.read_err(e))
        })
    }

    /// Tasks per state.
    pub(crate) fn count_by_state(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.with(|conn| {
            conn.prepare_cached("SELECT state, count(*) FROM tasks GROUP BY state ORDER BY state")
                .and_then(|mut stmt| {
                    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                        .collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(|e| self.read_err(e))
        })
    }

    /// Row counts and sizes; `db_bytes` from the file and its WAL.
    pub(crate) fn stats(&self) -> Result<StoreStats, StoreError> {
        let mut stats = self.with(|conn| {
            conn.query_row(
                "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM tasks),
                        (SELECT count(*) FROM blobs), (SELECT coalesce(sum(size), 0) FROM blobs)",
                [],
                |r| {
                    Ok(StoreStats {
                        events: r.get(0)?,
                        tasks: r.get(1)?,
                        blobs: r.get(2)?,
                        blob_bytes: r.get(3)?,
                        db_bytes: 0,
                    })
                },
            )
            .map_err(|e| self.read_err(e))
        })?;
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        stats.db_bytes = [self.path.as_os_str(), wal.as_os_str()]
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        Ok(stats)
    }
}

/// `LIMIT` argument for a caller's `usize` limit.
fn sql_limit(limit: usize) -> Value {
    Value::Integer(i64::try_from(limit).unwrap_or(i64::MAX))
}

/// Columns 1..=9 of a `SELECT {COLUMNS}` row, borrowed, with their types checked; errors
/// name the bad column.
fn stored_row<'r>(row: &'r Row<'_>) -> Result<StoredRow<'r>, String> {
    let text = |i: usize, name: &str| -> Result<Option<&'r str>, String> {
        match row.get_ref(i).map_err(|e| format!("column {name}: {e}"))? {
            ValueRef::Null => Ok(None),
            ValueRef::Text(bytes) => std::str::from_utf8(bytes)
                .map(Some)
                .map_err(|_| format!("column {name} is not UTF-8")),
            ValueRef::Integer(_) | ValueRef::Real(_) | ValueRef::Blob(_) => {
                Err(format!("column {name} is not text"))
            }
        }
    };
    let required = |i: usize, name: &str| -> Result<&'r str, String> {
        text(i, name)?.ok_or_else(|| format!("column {name} is null"))
    };
    let at_ms = match row.get_ref(3).map_err(|e| format!("column at_ms: {e}"))? {
        ValueRef::Integer(ms) => ms,
        ValueRef::Null | ValueRef::Real(_) | ValueRef::Text(_) | ValueRef::Blob(_) => {
            return Err("column at_ms is not an integer".to_owned());
        }
    };
    let layout = match row.get_ref(8).map_err(|e| format!("column layout: {e}"))? {
        ValueRef::Integer(layout) => u32::try_from(layout).unwrap_or(u32::MAX),
        ValueRef::Null | ValueRef::Real(_) | ValueRef::Text(_) | ValueRef::Blob(_) => {
            return Err("column layout is not an integer".to_owned());
        }
    };
    Ok(StoredRow {
        task_id: text(1, "task_id")?,
        at: required(2, "at")?,
        at_ms,
        kind: required(4, "kind")?,
        data: required(5, "data")?,
        prev_hash: required(6, "prev_hash")?,
        hash: required(7, "hash")?,
        layout,
        data_hash: text(9, "data_hash")?,
    })
}
