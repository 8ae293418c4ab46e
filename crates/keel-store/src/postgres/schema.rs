//! The PostgreSQL schema and its migrations, versioned in the one-row table `keel_schema`.
//!
//! [`MIGRATIONS`] is an ordered list like SQLite's: entry `i` takes the schema from version
//! `i` to `i + 1`. At open, the missing steps run in one transaction that first takes a
//! transaction-scoped advisory lock ([`SCHEMA_LOCK`]), so nodes starting together migrate
//! one after the other: the first does the work, the others find it done. A failed step
//! leaves the database as it was. Never edit a released step: append a new one.

use tokio_postgres::Client;

use crate::StoreError;

use super::PgFail;

/// The advisory lock key that serialises migrations (`"keelschm"` in ASCII).
pub(crate) const SCHEMA_LOCK: i64 = 0x6b65_656c_7363_686d;

/// The oldest PostgreSQL this store runs on (`server_version_num`).
pub(crate) const MIN_SERVER_VERSION: i32 = 13_00_00;

/// Version 1: the event log with its chain head, durable tasks, blobs, idempotency
/// records and derived state; the same tables as SQLite's schema version 3.
///
/// `keel_chain_head` is the one row every write transaction locks first (`FOR UPDATE`):
/// it holds the last `seq` and hash, so appends from every node form one gapless chain.
/// `data` is the canonical JSON text exactly as hashed (not `jsonb`, which would
/// re-encode it).
const V1: &str = "
CREATE TABLE keel_chain_head (
    id    smallint PRIMARY KEY CHECK (id = 1),
    seq   bigint   NOT NULL,
    hash  text     NOT NULL,
    at_ms bigint   NOT NULL
);
INSERT INTO keel_chain_head (id, seq, hash, at_ms)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000', -9223372036854775808);

CREATE TABLE events (
    seq       bigint  PRIMARY KEY,
    task_id   text,
    at        text    NOT NULL,
    at_ms     bigint  NOT NULL,
    kind      text    NOT NULL,
    data      text    NOT NULL,
    prev_hash text    NOT NULL,
    hash      text    NOT NULL,
    layout    integer NOT NULL,
    data_hash text
);
CREATE INDEX events_task_seq ON events (task_id, seq);
CREATE INDEX events_kind_seq ON events (kind, seq);

CREATE TABLE tasks (
    id                     text    PRIMARY KEY,
    agent                  text    NOT NULL,
    state                  text    NOT NULL,
    version                bigint  NOT NULL,
    snapshot               text    NOT NULL,
    created_at_ms          bigint  NOT NULL,
    updated_at_ms          bigint  NOT NULL,
    lease_expires_at_ms    bigint,
    approval_expires_at_ms bigint
);
CREATE INDEX tasks_created ON tasks (created_at_ms, id);
CREATE INDEX tasks_state_agent_created ON tasks (state, agent, created_at_ms, id);
CREATE INDEX tasks_agent_created ON tasks (agent, created_at_ms, id);
CREATE INDEX tasks_state_updated ON tasks (state, updated_at_ms);
CREATE INDEX tasks_lease ON tasks (lease_expires_at_ms) WHERE state = 'running';
CREATE INDEX tasks_approval ON tasks (approval_expires_at_ms) WHERE state = 'awaiting_human';

CREATE TABLE blobs (
    hash  text   PRIMARY KEY,
    size  bigint NOT NULL,
    bytes bytea  NOT NULL
);

CREATE TABLE task_blobs (
    task_id text   NOT NULL,
    kind    text   NOT NULL,
    seq     bigint NOT NULL,
    hash    text   NOT NULL,
    PRIMARY KEY (task_id, kind, seq, hash)
);
CREATE INDEX task_blobs_hash ON task_blobs (hash);

CREATE TABLE idempotency (
    scope         text    NOT NULL,
    key           text    NOT NULL,
    status        integer NOT NULL,
    body          text    NOT NULL,
    created_at_ms bigint  NOT NULL,
    PRIMARY KEY (scope, key)
);

CREATE TABLE state (
    key        text   PRIMARY KEY,
    value      bytea  NOT NULL,
    version    bigint NOT NULL,
    updated_ms bigint NOT NULL
);
";

/// Version 2: each unfinished task's deadline in a column of its own, with an index of the
/// rows that have one (the supervisor sets it only while the task is unfinished), so its
/// deadline timer finds the tasks past it without reading every queued row (SQLite's
/// schema version 5).
///
/// Tasks created before keep their deadline in the supervisor's snapshot only
/// (`deadline_ms`); [`copy_deadlines`] copies it here for the unfinished ones, so they too
/// are ended on time.
const V2: &str = "
ALTER TABLE tasks ADD COLUMN deadline_at_ms bigint;
CREATE INDEX tasks_deadline ON tasks (deadline_at_ms, id) WHERE deadline_at_ms IS NOT NULL;
";

/// The schema version whose step adds `tasks.deadline_at_ms` ([`V2`]).
const DEADLINE_COLUMN: u32 = 2;

/// Version 3: an idempotency record keeps a hash of the request it answered, so that the
/// same key with another request is refused instead of answered with the first answer
/// (SQLite's schema version 6). Records written before have none (and are answered as
/// before).
const V3: &str = "
ALTER TABLE idempotency ADD COLUMN request_hash text;
";

/// Every schema step, oldest first. The schema version of this build is `MIGRATIONS.len()`.
pub(crate) const MIGRATIONS: &[&str] = &[V1, V2, V3];

/// Checks the server's version, then brings the schema to `migrations.len()`; returns it.
pub(crate) async fn migrate(
    client: &mut Client,
    store: &str,
    migrations: &[&str],
) -> Result<u32, StoreError> {
    let failed = |what: &str| {
        let what = what.to_owned();
        move |e: tokio_postgres::Error| PgFail::Sql(e).into_store(store, &what)
    };
    let version: String = client
        .query_one("SHOW server_version_num", &[])
        .await
        .map_err(failed("reading the server version"))?
        .get(0);
    let number: i32 = version.trim().parse().unwrap_or(0);
    if number < MIN_SERVER_VERSION {
        return Err(StoreError::Unreachable {
            store: store.to_owned(),
            reason: format!(
                "PostgreSQL {} is too old: keel needs {} or newer",
                show_version(number),
                show_version(MIN_SERVER_VERSION)
            ),
        });
    }
    let known = u32::try_from(migrations.len()).unwrap_or(u32::MAX);
    let tx = client
        .transaction()
        .await
        .map_err(failed("starting the schema migration"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
        .await
        .map_err(failed("taking the schema lock"))?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS keel_schema (version integer NOT NULL)")
        .await
        .map_err(failed("creating keel_schema"))?;
    let found = tx
        .query_opt("SELECT version FROM keel_schema", &[])
        .await
        .map_err(failed("reading the schema version"))?
        .map(|row| row.get::<_, i32>(0));
    let found_version = found.map_or(0, |v| u32::try_from(v).unwrap_or(0));
    if found_version > known {
        return Err(StoreError::PostgresSchemaTooNew {
            store: store.to_owned(),
            found: found_version,
            known,
        });
    }
    if found_version == known {
        return Ok(known);
    }
    let step_failed = format!("migrating the schema from version {found_version} to {known}");
    for step in migrations.iter().skip(found_version as usize) {
        tx.batch_execute(step).await.map_err(failed(&step_failed))?;
    }
    if found_version < DEADLINE_COLUMN && known >= DEADLINE_COLUMN {
        copy_deadlines(&tx).await.map_err(failed(&step_failed))?;
    }
    let new_version = i32::try_from(known).unwrap_or(i32::MAX);
    let recorded = if found.is_some() {
        tx.execute("UPDATE keel_schema SET version = $1", &[&new_version])
            .await
    } else {
        tx.execute(
            "INSERT INTO keel_schema (version) VALUES ($1)",
            &[&new_version],
        )
        .await
    };
    recorded.map_err(failed(&step_failed))?;
    tx.commit().await.map_err(failed(&step_failed))?;
    tracing::info!(%store, from = found_version, to = known, "migrated the PostgreSQL store's schema");
    Ok(known)
}

/// Copies each unfinished task's deadline from its snapshot into `deadline_at_ms`. The
/// snapshot is read by serde_json, not by a cast to `jsonb`: a snapshot holds the client's
/// `input`, and `jsonb` refuses some JSON that serde_json writes (the escape `\u0000`), which
/// would stop the migration and so every node. This is the one place the store reads a
/// snapshot's field.
async fn copy_deadlines(tx: &tokio_postgres::Transaction<'_>) -> Result<(), tokio_postgres::Error> {
    let rows = tx
        .query(
            "SELECT id, snapshot FROM tasks WHERE state IN ('queued', 'running', 'awaiting_human')",
            &[],
        )
        .await?;
    let (ids, deadlines): (Vec<String>, Vec<i64>) = rows
        .iter()
        .filter_map(|row| {
            let snapshot: &str = row.get(1);
            let deadline = serde_json::from_str::<serde_json::Value>(snapshot)
                .ok()?
                .get("deadline_ms")?
                .as_i64()?;
            Some((row.get::<_, String>(0), deadline))
        })
        .unzip();
    tx.execute(
        "UPDATE tasks SET deadline_at_ms = d.deadline
           FROM unnest($1::text[], $2::bigint[]) AS d(id, deadline)
          WHERE tasks.id = d.id",
        &[&ids, &deadlines],
    )
    .await?;
    Ok(())
}

/// `150004` as `15.4`, `90624` as `9.6`.
fn show_version(number: i32) -> String {
    if number >= 10_00_00 {
        format!("{}.{}", number / 10000, number % 10000)
    } else {
        format!("{}.{}", number / 10000, number / 100 % 100)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions_read_like_postgres_prints_them() {
        assert_eq!(show_version(150004), "15.4");
        assert_eq!(show_version(130000), "13.0");
        assert_eq!(show_version(90624), "9.6");
    }
}
