//! The background checkpointer: copies the WAL back into the database file
//! off the writer's commit path.
//!
//! SQLite's automatic checkpoint runs inside whichever commit crosses the WAL
//! size limit, so that commit (and every append waiting for it) pays for
//! copying every page the WAL holds. Here a second connection runs a
//! `PASSIVE` checkpoint every [`INTERVAL`]: it never blocks the writer, and
//! once it has caught up the writer starts the WAL over from its beginning.
//! The writer keeps a far larger automatic limit as a safety net, for a
//! checkpointer that cannot keep up.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;

use super::read::BUSY_TIMEOUT;
use crate::StoreError;

/// How often the checkpointer runs.
pub(crate) const INTERVAL: Duration = Duration::from_millis(100);

/// WAL pages after which the writer checkpoints by itself (about 200 MiB):
/// reached only when the background checkpointer falls behind.
pub(crate) const WRITER_FALLBACK_PAGES: i64 = 50_000;

/// A running checkpointer thread; stopped and joined on drop.
pub(crate) struct Checkpointer {
    /// Dropping the sender wakes the thread and ends it.
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl Checkpointer {
    /// Opens its own connection to `path` and starts the thread.
    pub(crate) fn start(path: &Path, synchronous: &str) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        // The checkpoint's own fsync of the database file follows the store's durability.
        conn.pragma_update(None, "synchronous", synchronous)
            .map_err(open_err)?;
        let (stop, wake) = mpsc::channel::<()>();
        let thread_path = path.to_owned();
        let thread = std::thread::Builder::new()
            .name("keel-store-checkpoint".to_owned())
            .spawn(move || run(&conn, &thread_path, &wake))
            .map_err(|source| StoreError::SpawnWriter {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
            path: path.to_owned(),
        })
    }
}

fn run(conn: &Connection, path: &Path, wake: &mpsc::Receiver<()>) {
    loop {
        match wake.recv_timeout(INTERVAL) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        // (busy, wal frames, frames checkpointed); a busy database just waits for the next round.
        let done = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, i64>(2)?,
            ))
        });
        if let Err(e) = done {
            tracing::debug!(path = %path.display(), error = %e, "background checkpoint failed; retrying");
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop = None;
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!(path = %self.path.display(), "event store checkpointer panicked");
        }
    }
}
