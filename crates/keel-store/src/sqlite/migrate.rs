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

/// Every schema step, oldest first. The schema version of this build is `MIGRATIONS.len()`.
pub(crate) const MIGRATIONS: &[&str] = &[V1];

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
