//! Reading the log: a small pool of read-only connections, queries, and the
//! chain walk of `verify`.
//!
//! Everything here blocks; the store calls it from `spawn_blocking`. In WAL mode
//! readers see the last committed state and never wait for the writer.

use std::path::{Path, PathBuf};
use std::time::Duration;

use parking_lot::Mutex;
use rusqlite::types::{Value, ValueRef};
use rusqlite::{Connection, OpenFlags, Row};

use crate::chain::{ChainVerifier, HashInput};
use crate::{Event, EventQuery, StoreError, Verify};

/// Idle read connections kept for reuse; more are opened under load and closed after.
const MAX_IDLE_READERS: usize = 4;

/// How long a connection waits for a lock (schema changes, checkpoints) before failing.
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const COLUMNS: &str = "seq, task_id, at, at_ms, kind, data, prev_hash, hash";

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
        if idle.len() < MAX_IDLE_READERS {
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
            sql.push_str(&format!(" AND kind = ?{}", args.len()));
        }
        let limit = query
            .limit
            .map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX));
        args.push(Value::Integer(limit));
        sql.push_str(&format!(" ORDER BY seq LIMIT ?{}", args.len()));

        self.with(|conn| {
            let mut stmt = conn.prepare_cached(&sql).map_err(|e| self.read_err(e))?;
            let mut rows = stmt
                .query(rusqlite::params_from_iter(args))
                .map_err(|e| self.read_err(e))?;
            let mut events = Vec::new();
            while let Some(row) = rows.next().map_err(|e| self.read_err(e))? {
                events.push(self.event_from_row(row)?);
            }
            Ok(events)
        })
    }

    fn event_from_row(&self, row: &Row<'_>) -> Result<Event, StoreError> {
        let seq: u64 = row.get(0).map_err(|e| self.read_err(e))?;
        let corrupt = |reason: String| StoreError::Corrupt {
            path: self.path.clone(),
            seq,
            reason,
        };
        let fields = RowFields::read(row).map_err(corrupt)?;
        let data = serde_json::from_str(fields.data)
            .map_err(|e| corrupt(format!("data is not JSON: {e}")))?;
        Ok(Event {
            seq,
            task_id: fields.task_id.map(str::to_owned),
            at: fields.at.to_owned(),
            at_ms: fields.at_ms,
            kind: fields.kind.to_owned(),
            data,
            prev_hash: fields.prev_hash.to_owned(),
            hash: fields.hash.to_owned(),
        })
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
                let checked = RowFields::read(row).and_then(|fields| {
                    let input = HashInput {
                        prev_hash: fields.prev_hash,
                        seq,
                        task_id: fields.task_id,
                        at: fields.at,
                        at_ms: fields.at_ms,
                        kind: fields.kind,
                        // The stored text is what was hashed; no re-serialisation.
                        data: fields.data,
                    };
                    verifier.check(&input, fields.hash)
                });
                if let Err(reason) = checked {
                    return Ok(Verify::Broken { seq, reason });
                }
            }
            Ok(Verify::Intact {
                events: verifier.checked(),
            })
        })
    }
}

/// The columns after `seq` of one row, borrowed, with their types checked.
struct RowFields<'r> {
    task_id: Option<&'r str>,
    at: &'r str,
    at_ms: i64,
    kind: &'r str,
    data: &'r str,
    prev_hash: &'r str,
    hash: &'r str,
}

impl<'r> RowFields<'r> {
    /// Reads columns 1..=7 of a `SELECT {COLUMNS}` row; errors name the bad column.
    fn read(row: &'r Row<'_>) -> Result<Self, String> {
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
        Ok(Self {
            task_id: text(1, "task_id")?,
            at: required(2, "at")?,
            at_ms,
            kind: required(4, "kind")?,
            data: required(5, "data")?,
            prev_hash: required(6, "prev_hash")?,
            hash: required(7, "hash")?,
        })
    }
}
