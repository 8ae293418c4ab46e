//! Schema migrations, versioned by SQLite's `PRAGMA user_version`.
//!
//! [`MIGRATIONS`] is an ordered list: entry `i` takes the schema from version `i`
//! to `i + 1`. At open, every step the database has not seen runs in one
//! transaction, which also sets `user_version`; so a failed migration leaves the
//! database as it was. Never edit a released step: append a new one.

use std::path::Path;

use rusqlite::{Connection, TransactionBehavior};

use crate::StoreError;

/// Version 1: the event log and its two lookup indexes.
const V1: &str = "
CREATE TABLE events (
    seq       INTEGER PRIMARY KEY,
    task_id   TEXT,
    at        TEXT    NOT NULL,
    at_ms     INTEGER NOT NULL,
    kind      TEXT    NOT NULL,
    data      TEXT    NOT NULL,
    prev_hash TEXT    NOT NULL,
    hash      TEXT    NOT NULL
);
CREATE INDEX events_task_seq ON events (task_id, seq);
CREATE INDEX events_kind_seq ON events (kind, seq);
";

/// Version 2: durable tasks and hash layout 2.
///
/// Existing events keep layout 1 (their hash covers `data`); events appended
/// from now on use layout 2 (their hash covers `data_hash`, so retention can
/// blank `data`; see [`chain`](crate::chain)). `events.data` stays `NOT NULL`:
/// a pruned layout-2 event holds the empty string.
const V2: &str = "
ALTER TABLE events ADD COLUMN layout INTEGER NOT NULL DEFAULT 1;
ALTER TABLE events ADD COLUMN data_hash TEXT;

CREATE TABLE tasks (
    id                     TEXT    PRIMARY KEY,
    agent                  TEXT    NOT NULL,
    state                  TEXT    NOT NULL,
    version                INTEGER NOT NULL,
    snapshot               TEXT    NOT NULL,
    created_at_ms          INTEGER NOT NULL,
    updated_at_ms          INTEGER NOT NULL,
    lease_expires_at_ms    INTEGER,
    approval_expires_at_ms INTEGER
);
CREATE INDEX tasks_created ON tasks (created_at_ms, id);
CREATE INDEX tasks_state_agent_created ON tasks (state, agent, created_at_ms, id);
CREATE INDEX tasks_agent_created ON tasks (agent, created_at_ms, id);
CREATE INDEX tasks_state_updated ON tasks (state, updated_at_ms);
CREATE INDEX tasks_lease ON tasks (lease_expires_at_ms) WHERE state = 'running';
CREATE INDEX tasks_approval ON tasks (approval_expires_at_ms) WHERE state = 'awaiting_human';

CREATE TABLE blobs (
    hash  TEXT    PRIMARY KEY,
    size  INTEGER NOT NULL,
    bytes BLOB    NOT NULL
);

CREATE TABLE task_blobs (
    task_id TEXT    NOT NULL,
    kind    TEXT    NOT NULL,
    seq     INTEGER NOT NULL,
    hash    TEXT    NOT NULL,
    PRIMARY KEY (task_id, kind, seq, hash)
) WITHOUT ROWID;
CREATE INDEX task_blobs_hash ON task_blobs (hash);

CREATE TABLE idempotency (
    scope         TEXT    NOT NULL,
    key           TEXT    NOT NULL,
    status        INTEGER NOT NULL,
    body          TEXT    NOT NULL,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (scope, key)
) WITHOUT ROWID;
";

/// Version 3: state keel derives beside the log (histogram profiles of tool args),
/// one versioned value per key, written compare-and-set.
const V3: &str = "
CREATE TABLE state (
    key        TEXT    PRIMARY KEY,
    value      BLOB    NOT NULL,
    version    INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
";

/// Version 4: the `(task_id, seq)` index leaves out events that belong to no task (a
/// gateway call without `x-keel-task`, the common case), so appending one writes the
/// table and the `(kind, seq)` index only. Every read by task names the task
/// (`task_id = ?`), which the partial index still serves.
const V4: &str = "
DROP INDEX events_task_seq;
CREATE INDEX events_task_seq ON events (task_id, seq) WHERE task_id IS NOT NULL;
";

/// Version 5: each unfinished task's deadline in a column of its own, with an index of the
/// rows that have one (the supervisor sets it only while the task is unfinished), so its
/// deadline timer finds the tasks past it without reading every queued row.
///
/// Tasks created before keep their deadline in the supervisor's snapshot only
/// (`deadline_ms`); it is copied here for the unfinished ones, so they too are ended on
/// time. This is the one place the store reads a snapshot's field.
const V5: &str = "
ALTER TABLE tasks ADD COLUMN deadline_at_ms INTEGER;
UPDATE tasks SET deadline_at_ms = json_extract(snapshot, '$.deadline_ms')
 WHERE state IN ('queued', 'running', 'awaiting_human') AND json_valid(snapshot);
CREATE INDEX tasks_deadline ON tasks (deadline_at_ms, id) WHERE deadline_at_ms IS NOT NULL;
";

/// Version 6: an idempotency record keeps a hash of the request it answered, so that the
/// same key with another request is refused instead of answered with the first answer.
/// Records written before have none (and are answered as before).
const V6: &str = "
ALTER TABLE idempotency ADD COLUMN request_hash TEXT;
";

/// Version 7: the `(kind, seq)` index leaves out `llm_call` events, most of a log and the
/// one kind the gateway appends on every call, so a call's `events` row adds no entry to it:
/// one index insert and about one WAL page fewer per commit (the writer's and
/// checkpointer's work under load). Reads by another kind name the index's condition (`kind <> 'llm_call'`) to
/// use it; a read of `llm_call` events walks the log by `seq`, where nearly every row is one.
const V7: &str = "
DROP INDEX events_kind_seq;
CREATE INDEX events_kind_seq ON events (kind, seq) WHERE kind <> 'llm_call';
";

/// Every schema step, oldest first. The schema version of this build is `MIGRATIONS.len()`.
pub(crate) const MIGRATIONS: &[&str] = &[V1, V2, V3, V4, V5, V6, V7];

/// Brings the database at `path` to version `migrations.len()` and returns that version.
///
/// Errors if the database is newer than `migrations` knows, or a step fails.
pub(crate) fn migrate(
    conn: &mut Connection,
    path: &Path,
    migrations: &[&str],
) -> Result<u32, StoreError> {
    let known = u32::try_from(migrations.len()).unwrap_or(u32::MAX);
    let read_err = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    // IMMEDIATE: two processes opening the same new file must not both migrate.
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(read_err)?;
    let found = user_version(&tx).map_err(read_err)?;
    if found > known {
        return Err(StoreError::SchemaTooNew {
            path: path.to_owned(),
            found,
            known,
        });
    }
    if found == known {
        return Ok(found);
    }
    let migrate_err = |source| StoreError::Migrate {
        path: path.to_owned(),
        from: found,
        to: known,
        source,
    };
    for step in migrations.iter().skip(found as usize) {
        tx.execute_batch(step).map_err(migrate_err)?;
    }
    tx.pragma_update(None, "user_version", known)
        .map_err(migrate_err)?;
    tx.commit().map_err(migrate_err)?;
    tracing::info!(path = %path.display(), from = found, to = known, "migrated event store schema");
    Ok(known)
}

/// The schema version recorded in the database header (0 for a new file).
pub(crate) fn user_version(conn: &Connection) -> rusqlite::Result<u32> {
    conn.pragma_query_value(None, "user_version", |row| row.get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &tempfile::TempDir) -> (Connection, std::path::PathBuf) {
        let path = dir.path().join("m.db");
        (Connection::open(&path).unwrap(), path)
    }

    #[test]
    fn new_database_reaches_latest_version() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, path) = open(&dir);
        let version = migrate(&mut conn, &path, MIGRATIONS).unwrap();
        assert_eq!(version as usize, MIGRATIONS.len());
        assert_eq!(user_version(&conn).unwrap() as usize, MIGRATIONS.len());
    }

    /// What SQLite plans for `sql` (the `detail` column of `EXPLAIN QUERY PLAN`), joined.
    /// Parameters stay unbound, as when SQLite prepares the statement.
    fn plan(conn: &Connection, sql: &str) -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let mut rows = stmt.raw_query();
        let mut details = Vec::new();
        while let Some(row) = rows.next().unwrap() {
            details.push(row.get::<_, String>(3).unwrap());
        }
        details.join("; ")
    }

    #[test]
    fn task_reads_use_the_partial_task_index_and_task_less_events_stay_out_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, path) = open(&dir);
        migrate(&mut conn, &path, MIGRATIONS).unwrap();
        // The shape `Readers::events` builds for a task (with and without a kind).
        for sql in [
            "SELECT seq, data FROM events WHERE seq > 0 AND task_id = 't-1' ORDER BY seq LIMIT -1",
            "SELECT seq, data FROM events WHERE seq > 0 AND task_id = 't-1' AND +kind = 'llm_call' ORDER BY seq LIMIT -1",
        ] {
            let plan = plan(&conn, sql);
            assert!(
                plan.contains("USING INDEX events_task_seq"),
                "{sql}: {plan}"
            );
        }
        // `PRAGMA index_list`: name (column 1) and whether the index is partial (column 4).
        let mut list = conn.prepare("PRAGMA index_list(events)").unwrap();
        let partial: Vec<(String, bool)> = list
            .query_map([], |r| Ok((r.get(1)?, r.get(4)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert!(
            partial.contains(&("events_task_seq".to_owned(), true))
                && partial.contains(&("events_kind_seq".to_owned(), true)),
            "{partial:?}"
        );
    }

    #[test]
    fn kind_reads_use_the_kind_index_which_leaves_model_calls_out() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, path) = open(&dir);
        migrate(&mut conn, &path, &MIGRATIONS[..6]).unwrap();
        let insert = |seq: i64, kind: &str| {
            conn.execute(
                "INSERT INTO events (seq, at, at_ms, kind, data, prev_hash, hash) VALUES (?1, 'a', 0, ?2, '{}', 'p', 'h')",
                rusqlite::params![seq, kind],
            )
            .unwrap();
        };
        for seq in 1..=40 {
            let kind = if seq % 10 == 0 {
                "breaker_opened"
            } else {
                "llm_call"
            };
            insert(seq, kind);
        }
        migrate(&mut conn, &path, MIGRATIONS).unwrap();
        // The shapes `Readers::events` builds for a kind without a task, with `?N` placeholders.
        let other = "SELECT seq FROM events WHERE seq > ?1 AND kind = ?2 AND kind <> 'llm_call' ORDER BY seq LIMIT ?3";
        let calls = "SELECT seq FROM events WHERE seq > ?1 AND kind = ?2 ORDER BY seq LIMIT ?3";
        // (`COVERING` here, since these columns are in the index.)
        assert!(
            plan(&conn, other).contains("INDEX events_kind_seq (kind=? AND seq>?)"),
            "{}",
            plan(&conn, other)
        );
        assert!(
            !plan(&conn, calls).contains("events_kind_seq"),
            "{}",
            plan(&conn, calls)
        );
        let seqs = |sql: &str, kind: &str| -> Vec<i64> {
            let mut stmt = conn.prepare(sql).unwrap();
            stmt.query_map(rusqlite::params![0, kind, -1], |r| r.get(0))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        assert_eq!(seqs(other, "breaker_opened"), [10, 20, 30, 40]);
        assert_eq!(seqs(calls, "llm_call").len(), 36);
        // The migrated index holds the other kinds' rows only.
        let indexed: i64 = conn
            .query_row(
                "SELECT count(*) FROM events INDEXED BY events_kind_seq WHERE kind <> 'llm_call' AND kind > ''",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(indexed, 4);
    }

    #[test]
    fn the_deadline_timer_reads_the_partial_deadline_index() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, path) = open(&dir);
        migrate(&mut conn, &path, MIGRATIONS).unwrap();
        // The shape `Readers::expired` builds for `expired_deadlines`.
        let sql = "SELECT id, snapshot FROM tasks
                   WHERE +state IN ('queued', 'running', 'awaiting_human') AND deadline_at_ms <= 5
                   ORDER BY deadline_at_ms, id LIMIT 10";
        let plan = plan(&conn, sql);
        assert!(plan.contains("USING INDEX tasks_deadline"), "{plan}");
    }

    #[test]
    fn version_5_copies_the_deadline_of_unfinished_tasks_only() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, path) = open(&dir);
        migrate(&mut conn, &path, &MIGRATIONS[..4]).unwrap();
        for (id, state, deadline) in [
            ("queued", "queued", "123"),
            ("running", "running", "456"),
            ("waiting", "awaiting_human", "789"),
            ("none", "queued", "null"),
            ("done", "succeeded", "5"),
            ("dead", "dead", "6"),
        ] {
            conn.execute(
                "INSERT INTO tasks (id, agent, state, version, snapshot, created_at_ms, updated_at_ms)
                 VALUES (?1, 'a', ?2, 1, ?3, 0, 0)",
                rusqlite::params![id, state, format!(r#"{{"deadline_ms":{deadline}}}"#)],
            )
            .unwrap();
        }
        migrate(&mut conn, &path, MIGRATIONS).unwrap();
        let deadlines: Vec<(String, Option<i64>)> = conn
            .prepare("SELECT id, deadline_at_ms FROM tasks ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let expected = [
            ("dead", None),
            ("done", None),
            ("none", None),
            ("queued", Some(123)),
            ("running", Some(456)),
            ("waiting", Some(789)),
        ]
        .map(|(id, d)| (id.to_owned(), d));
        assert_eq!(deadlines, expected);
    }

    #[test]
    fn applies_only_missing_steps() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, path) = open(&dir);
        migrate(&mut conn, &path, &MIGRATIONS[..1]).unwrap();
        conn.execute(
            "INSERT INTO events (seq, at, at_ms, kind, data, prev_hash, hash) VALUES (1, 'a', 0, 'k', '{}', 'p', 'h')",
            [],
        )
        .unwrap();

        // A later build with one more step keeps the rows and runs only the new step.
        let mut newer: Vec<&str> = MIGRATIONS.to_vec();
        newer.push("ALTER TABLE events ADD COLUMN extra TEXT;");
        let version = migrate(&mut conn, &path, &newer).unwrap();
        assert_eq!(version as usize, newer.len());
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM events WHERE extra IS NULL", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(rows, 1);
    }

    #[test]
    fn failed_step_leaves_version_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, path) = open(&dir);
        migrate(&mut conn, &path, &MIGRATIONS[..1]).unwrap();
        let mut newer: Vec<&str> = MIGRATIONS[..1].to_vec();
        newer.push("CREATE TABLE t (x); THIS IS NOT SQL;");
        let err = migrate(&mut conn, &path, &newer).unwrap_err();
        assert!(
            err.to_string().contains("from schema version 1 to 2"),
            "{err}"
        );
        assert_eq!(user_version(&conn).unwrap(), 1);
        let tables: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 't'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(tables, 0);
    }

    #[test]
    fn refuses_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, path) = open(&dir);
        conn.pragma_update(None, "user_version", 99).unwrap();
        let err = migrate(&mut conn, &path, MIGRATIONS).unwrap_err();
        assert!(
            matches!(err, StoreError::SchemaTooNew { found: 99, .. }),
            "{err}"
        );
    }
}
