//! The single writer thread and its group commit.
//!
//! One `std::thread` owns the write connection. It blocks on a channel of
//! append requests, takes the first one and everything else already waiting (up
//! to [`MAX_BATCH_EVENTS`] events), writes them all in one transaction, and then
//! answers each request. So N concurrent appenders pay for about one commit (and
//! one fsync with [`Durability::Fsync`](crate::Durability::Fsync)), not N.
//!
//! A failed commit is answered with an error to every request in it, and the
//! thread goes on with the next batch. The chain head is read inside each
//! write transaction, so a rolled-back batch leaves nothing to undo. The thread
//! ends once every sender is dropped and the queue is drained.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::{mpsc, oneshot};

use keel_core::NewEvent;

use crate::chain::{self, GENESIS_HASH, HashInput};
use crate::{Event, StoreError};

/// Most events one commit takes from the queue. A single request larger than
/// this is still written whole, in its own commit.
pub(crate) const MAX_BATCH_EVENTS: usize = 1024;

/// How many append requests may wait for the writer before appenders wait to enqueue.
pub(crate) const QUEUE_CAPACITY: usize = 4096;

/// One `append` call waiting for its commit.
pub(crate) struct AppendRequest {
    /// The events, in order.
    pub(crate) events: Vec<NewEvent>,
    /// Where the stored events, or the commit's error, go.
    pub(crate) reply: oneshot::Sender<Result<Vec<Event>, StoreError>>,
}

/// Counters the writer shares with the store handle.
#[derive(Debug, Default)]
pub(crate) struct WriterStats {
    /// Successful commits.
    pub(crate) commits: AtomicU64,
}

/// The writer loop; returns when the channel is closed and drained.
pub(crate) fn run(
    mut conn: Connection,
    path: PathBuf,
    mut queue: mpsc::Receiver<AppendRequest>,
    stats: Arc<WriterStats>,
) {
    while let Some(first) = queue.blocking_recv() {
        let mut pending = first.events.len();
        let mut batch = vec![first];
        while pending < MAX_BATCH_EVENTS {
            match queue.try_recv() {
                Ok(request) => {
                    pending += request.events.len();
                    batch.push(request);
                }
                Err(_) => break,
            }
        }
        match write_batch(&mut conn, &batch) {
            Ok(stored) => {
                stats.commits.fetch_add(1, Ordering::Relaxed);
                for (request, events) in batch.into_iter().zip(stored) {
                    // The appender may have gone away; its events are written regardless.
                    let _ = request.reply.send(Ok(events));
                }
            }
            Err(source) => {
                tracing::error!(path = %path.display(), events = pending, error = %source, "event store commit failed");
                let source = Arc::new(source);
                for request in batch {
                    let _ = request.reply.send(Err(StoreError::Commit {
                        path: path.clone(),
                        events: pending,
                        source: Arc::clone(&source),
                    }));
                }
            }
        }
    }
    tracing::debug!(path = %path.display(), "event store writer stopped");
}

/// The chain head: last `seq`, its hash, its time.
struct Head {
    seq: u64,
    hash: String,
    at_ms: i64,
}

fn read_head(conn: &Connection) -> rusqlite::Result<Head> {
    let head = conn
        .query_row(
            "SELECT seq, hash, at_ms FROM events ORDER BY seq DESC LIMIT 1",
            [],
            |row| {
                Ok(Head {
                    seq: row.get(0)?,
                    // A tampered NULL must not stop the log; `verify` reports it.
                    hash: row.get::<_, Option<String>>(1)?.unwrap_or_default(),
                    at_ms: row.get::<_, Option<i64>>(2)?.unwrap_or(i64::MIN),
                })
            },
        )
        .optional()?;
    Ok(head.unwrap_or(Head {
        seq: 0,
        hash: GENESIS_HASH.to_owned(),
        at_ms: i64::MIN,
    }))
}

/// Writes every request of `batch` in one transaction; returns the stored events per request.
fn write_batch(
    conn: &mut Connection,
    batch: &[AppendRequest],
) -> rusqlite::Result<Vec<Vec<Event>>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut head = read_head(&tx)?;
    // One time per commit, never before the previous event's.
    let at_ms = chain::now_ms().max(head.at_ms);
    let at = chain::format_rfc3339_ms(at_ms);
    let mut stored = Vec::with_capacity(batch.len());
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO events (seq, task_id, at, at_ms, kind, data, prev_hash, hash)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        for request in batch {
            let mut events = Vec::with_capacity(request.events.len());
            for new in &request.events {
                let seq = head.seq + 1;
                let data = chain::canonicalize(new.data.clone());
                let data_text = data.to_string();
                let kind = new.kind.as_str();
                let hash = HashInput {
                    prev_hash: &head.hash,
                    seq,
                    task_id: new.task_id.as_deref(),
                    at: &at,
                    at_ms,
                    kind,
                    data: &data_text,
                }
                .hash();
                insert.execute(params![
                    seq,
                    new.task_id,
                    at,
                    at_ms,
                    kind,
                    data_text,
                    head.hash,
                    hash
                ])?;
                let prev_hash = std::mem::replace(&mut head.hash, hash.clone());
                head.seq = seq;
                events.push(Event {
                    seq,
                    task_id: new.task_id.clone(),
                    at: at.clone(),
                    at_ms,
                    kind: kind.to_owned(),
                    data,
                    prev_hash,
                    hash,
                });
            }
            stored.push(events);
        }
    }
    tx.commit()?;
    Ok(stored)
}
