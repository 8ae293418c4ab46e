//! SQLite-specific tests, plus the conformance suite run against [`SqliteStore`].

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rusqlite::Connection;
use serde_json::json;
use tempfile::TempDir;
use tokio::task::JoinSet;

use keel_core::{EventKind, NewEvent};

use super::migrate::{self, MIGRATIONS};
use super::*;
use crate::chain::{GENESIS_HASH, HashInput};
use crate::conformance;

fn open(dir: &TempDir) -> SqliteStore {
    SqliteStore::open(&dir.path().join("keel.db"), Durability::Fsync).unwrap()
}

fn step(task: &str, i: u64) -> NewEvent {
    NewEvent::new(
        EventKind::StepRecorded,
        Some(task.to_owned()),
        json!({"i": i}),
    )
}

fn seqs_of(events: &[Event]) -> Vec<u64> {
    events.iter().map(|e| e.seq).collect()
}

async fn all(store: &SqliteStore) -> Vec<Event> {
    store.events(EventQuery::default()).await.unwrap()
}

// === conformance ===

#[tokio::test]
async fn conformance_append_assigns_consecutive_seqs() {
    let dir = tempfile::tempdir().unwrap();
    conformance::append_assigns_consecutive_seqs(&open(&dir))
        .await
        .unwrap();
}

#[tokio::test]
async fn conformance_append_links_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    conformance::append_links_the_chain(&open(&dir))
        .await
        .unwrap();
}

#[tokio::test]
async fn conformance_appended_events_read_back_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    conformance::appended_events_read_back_unchanged(&open(&dir))
        .await
        .unwrap();
}

#[tokio::test]
async fn conformance_events_by_task_in_order() {
    let dir = tempfile::tempdir().unwrap();
    conformance::events_by_task_in_order(&open(&dir))
        .await
        .unwrap();
}

#[tokio::test]
async fn conformance_filters_kind_after_seq_and_limit() {
    let dir = tempfile::tempdir().unwrap();
    conformance::filters_kind_after_seq_and_limit(&open(&dir))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_concurrent_appends_form_one_chain() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(&dir));
    conformance::concurrent_appends_form_one_chain(Arc::clone(&store))
        .await
        .unwrap();
    assert!(
        store.commits() < 500,
        "{} commits for 500 appends",
        store.commits()
    );
}

#[tokio::test]
async fn conformance_verify_reports_intact() {
    let dir = tempfile::tempdir().unwrap();
    conformance::verify_reports_intact(&open(&dir))
        .await
        .unwrap();
}

#[tokio::test]
async fn conformance_ping_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    conformance::ping_succeeds(&open(&dir)).await.unwrap();
}

#[tokio::test]
async fn conformance_state_is_compare_and_set() {
    let dir = tempfile::tempdir().unwrap();
    conformance::state_is_compare_and_set(&open(&dir))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_concurrent_state_saves_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    conformance::concurrent_state_saves_lose_nothing(Arc::new(open(&dir)))
        .await
        .unwrap();
}

/// The event suite on stores opened with `options`, a fresh file for each property.
async fn run_all_with(options: WriteOptions) {
    let dir = tempfile::tempdir().unwrap();
    let n = AtomicUsize::new(0);
    conformance::run_all(|| {
        let path = dir
            .path()
            .join(format!("{}.db", n.fetch_add(1, Ordering::Relaxed)));
        SqliteStore::open(&path, options.clone()).unwrap()
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_run_all_with_relaxed_durability() {
    run_all_with(Durability::Relaxed.into()).await;
}

/// The suite again with a writer that waits 5 ms whenever it is busy: waiting for more
/// writes must not change what is stored, in what order, or what a compare-and-set sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_run_all_with_a_commit_delay() {
    run_all_with(WriteOptions {
        durability: Durability::Relaxed,
        call_durability: Durability::Relaxed,
        commit_delay: Some(Duration::from_millis(5)),
        upcoming: crate::Upcoming::default(),
    })
    .await;
}

/// keel's default: synced writes, model-call records committed without a sync.
fn calls_relaxed() -> WriteOptions {
    WriteOptions {
        durability: Durability::Fsync,
        call_durability: Durability::Relaxed,
        commit_delay: None,
        upcoming: crate::Upcoming::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_run_all_with_relaxed_call_records() {
    run_all_with(calls_relaxed()).await;
}

#[test]
fn by_default_only_a_commit_that_is_not_synced_waits_for_more_writes() {
    let default = writer::Linger {
        delay: None,
        upcoming: crate::Upcoming::default(),
    };
    assert_eq!(
        default.delay(Durability::Relaxed),
        Duration::from_micros(200)
    );
    assert_eq!(default.delay(Durability::Fsync), Duration::ZERO);
    let configured = writer::Linger {
        delay: Some(Duration::from_millis(1)),
        upcoming: crate::Upcoming::default(),
    };
    assert_eq!(
        configured.delay(Durability::Fsync),
        Duration::from_millis(1)
    );
    assert_eq!(WriteOptions::from(Durability::Relaxed).commit_delay, None);
}

/// A commit is synced when any write in it must be: model-call records alone take the
/// call durability, anything else the store's.
#[test]
fn a_commit_is_synced_when_any_write_in_it_must_be() {
    let d = calls_relaxed().durabilities();
    let call = || writer::Request::Append(Vec::new(), writer::Payloads::default(), reply(), true);
    let plain = || writer::Request::Append(Vec::new(), writer::Payloads::default(), reply(), false);
    let state = |call: bool| {
        let write = writer::StateWrite {
            key: "budget/a".to_owned(),
            value: Vec::new(),
            expected: None,
            call,
        };
        writer::Request::State(write, tokio::sync::oneshot::channel().0)
    };
    assert_eq!(
        writer::commit_durability(&[call(), call()], d),
        Durability::Relaxed
    );
    assert_eq!(
        writer::commit_durability(&[call(), plain(), call()], d),
        Durability::Fsync
    );
    assert_eq!(writer::commit_durability(&[plain()], d), Durability::Fsync);
    // State that sums up calls (budget shares) takes the calls' durability; other state
    // the store's.
    assert_eq!(
        writer::commit_durability(&[call(), state(true)], d),
        Durability::Relaxed
    );
    assert_eq!(
        writer::commit_durability(&[state(true), state(false)], d),
        Durability::Fsync
    );
    // Both relaxed: nothing syncs; calls at fsync: a call's commit syncs.
    let relaxed = WriteOptions::from(Durability::Relaxed).durabilities();
    assert_eq!(
        writer::commit_durability(&[call(), plain()], relaxed),
        Durability::Relaxed
    );
    let strict_calls = WriteOptions {
        call_durability: Durability::Fsync,
        ..WriteOptions::from(Durability::Relaxed)
    }
    .durabilities();
    assert_eq!(
        writer::commit_durability(&[call()], strict_calls),
        Durability::Fsync
    );
    assert_eq!(
        writer::commit_durability(&[plain()], strict_calls),
        Durability::Relaxed
    );
}

/// A reply channel nobody listens to: the requests built here are never answered.
fn reply() -> writer::EventsReply {
    tokio::sync::oneshot::channel().0
}

/// The writer commits model-call records without a sync and syncs every other commit
/// (counted by the store as it sets SQLite's `synchronous` for each commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_records_are_committed_without_a_sync_and_other_writes_with_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("keel.db"), calls_relaxed()).unwrap();
    let call = |n: u64| vec![NewEvent::new(EventKind::LlmCall, None, json!({"n": n}))];
    for n in 0..20 {
        store.append_call(call(n), Vec::new(), None).await.unwrap();
    }
    assert_eq!((store.commits(), store.synced_commits()), (20, 0));
    store
        .append(vec![NewEvent::new(EventKind::AlertRaised, None, json!({}))])
        .await
        .unwrap();
    assert_eq!((store.commits(), store.synced_commits()), (21, 1));
    store.append_call(call(20), Vec::new(), None).await.unwrap();
    assert_eq!((store.commits(), store.synced_commits()), (22, 1));
    // Every event is there, in one intact chain.
    assert_eq!(store.verify().await.unwrap(), Verify::Intact { events: 22 });
    // A budget share sums up calls: saved without a sync, like them (the gateway saves one
    // every second under load); other state is synced.
    let share = b"[1]".to_vec();
    let v = store
        .save_call_state("budget/a", share.clone(), None)
        .await
        .unwrap();
    assert_eq!((store.commits(), store.synced_commits()), (23, 1));
    assert_eq!(
        store.load_state("budget/a").await.unwrap().unwrap().value,
        share
    );
    store
        .save_state("profile/b", Vec::new(), None)
        .await
        .unwrap();
    assert_eq!((store.commits(), store.synced_commits()), (24, 2));
    // A stale version is refused as for any state.
    assert_eq!(
        store
            .save_call_state("budget/a", Vec::new(), None)
            .await
            .unwrap(),
        None
    );
    store
        .save_call_state("budget/a", Vec::new(), v)
        .await
        .unwrap()
        .unwrap();

    // Opened with one durability for everything, every commit is synced.
    let strict = SqliteStore::open(&dir.path().join("strict.db"), Durability::Fsync).unwrap();
    strict.append_call(call(0), Vec::new(), None).await.unwrap();
    assert_eq!((strict.commits(), strict.synced_commits()), (1, 1));
    strict
        .save_call_state("budget/a", Vec::new(), None)
        .await
        .unwrap();
    assert_eq!((strict.commits(), strict.synced_commits()), (2, 2));
}

#[test]
fn the_writer_waits_only_when_writes_queue_behind_the_first() {
    use super::writer::{MAX_BATCH_EVENTS, Request, StateWrite, busy};
    let request = || {
        let (reply, _) = tokio::sync::oneshot::channel();
        let write = StateWrite {
            key: "k".to_owned(),
            value: Vec::new(),
            expected: None,
            call: false,
        };
        Request::State(write, reply)
    };
    let delay = Duration::from_micros(200);
    let batch = |n: usize| (0..n).map(|_| request()).collect::<Vec<_>>();
    // A write that finds the writer idle is committed at once.
    assert!(!busy(&batch(1), 1, delay));
    // One more write queued behind it: the writer is busy and waits for more.
    assert!(busy(&batch(1 + crate::COMMIT_SIBLINGS), 2, delay));
    // Never with no delay configured, nor when the batch is already full.
    assert!(!busy(&batch(3), 3, Duration::ZERO));
    assert!(!busy(&batch(3), MAX_BATCH_EVENTS, delay));
}

#[tokio::test]
async fn conformance_holds_through_a_dyn_arc() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn EventStore> = Arc::new(open(&dir));
    conformance::append_assigns_consecutive_seqs(&store)
        .await
        .unwrap();
}

// === task conformance ===

macro_rules! task_conformance {
    ($($name:ident: $property:ident $(($arc:ident))?;)+) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let dir = tempfile::tempdir().unwrap();
            let store = open(&dir);
            $(let store = $arc::new(store);)?
            conformance::$property(store.task_store_arg()).await.unwrap();
        }
    )+};
}

/// How a property takes its store: by reference, or an `Arc` by value.
trait TaskStoreArg {
    type Arg<'a>
    where
        Self: 'a;
    fn task_store_arg(&self) -> Self::Arg<'_>;
}

impl TaskStoreArg for SqliteStore {
    type Arg<'a> = &'a SqliteStore;
    fn task_store_arg(&self) -> &SqliteStore {
        self
    }
}

impl TaskStoreArg for Arc<SqliteStore> {
    type Arg<'a> = Arc<SqliteStore>;
    fn task_store_arg(&self) -> Arc<SqliteStore> {
        Arc::clone(self)
    }
}

task_conformance! {
    conformance_task_create_then_read: task_create_then_read;
    conformance_task_version_conflict_changes_nothing: task_version_conflict_changes_nothing;
    conformance_task_create_of_existing_id_conflicts: task_create_of_existing_id_conflicts;
    conformance_task_wrong_row_version_is_refused: task_wrong_row_version_is_refused;
    conformance_task_duplicate_idempotency_key_changes_nothing: task_duplicate_idempotency_key_changes_nothing;
    conformance_concurrent_task_writes_all_land: concurrent_task_writes_all_land(Arc);
    conformance_same_task_concurrent_writers_one_wins: same_task_concurrent_writers_one_wins(Arc);
    conformance_blobs_are_stored_once: blobs_are_stored_once;
    conformance_task_list_pagination_visits_each_once: task_list_pagination_visits_each_once;
    conformance_next_queued_is_fifo: next_queued_is_fifo;
    conformance_expired_leases_and_approvals_filter: expired_leases_and_approvals_filter;
    conformance_task_events_read_back_in_order: task_events_read_back_in_order;
    conformance_prune_keeps_the_chain_verifiable: prune_keeps_the_chain_verifiable;
    conformance_prune_keeps_newest_checkpoints: prune_keeps_newest_checkpoints;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_run_all_tasks_with_relaxed_durability() {
    let dir = tempfile::tempdir().unwrap();
    let n = AtomicUsize::new(0);
    conformance::run_all_tasks(|| {
        let path = dir
            .path()
            .join(format!("{}.db", n.fetch_add(1, Ordering::Relaxed)));
        SqliteStore::open(&path, Durability::Relaxed).unwrap()
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_task_writes_share_commits_and_failures_stay_apart() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(&dir));
    store.write_task(task_create("dup")).await.unwrap();
    // Hold the write lock so every write queues behind one blocked commit.
    let raw = Connection::open(store.path()).unwrap();
    raw.execute_batch("BEGIN IMMEDIATE").unwrap();
    let mut set = JoinSet::new();
    for i in 0..40 {
        let store = Arc::clone(&store);
        // Every fourth write is a create of an existing id: it must fail alone.
        let id = if i % 4 == 0 {
            "dup".to_owned()
        } else {
            format!("t{i}")
        };
        set.spawn(async move { store.write_task(task_create(&id)).await });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let commits_before = store.commits();
    raw.execute_batch("COMMIT").unwrap();
    let (mut ok, mut conflicts) = (0, 0);
    while let Some(result) = set.join_next().await {
        match result.unwrap() {
            Ok(_) => ok += 1,
            Err(StoreError::Conflict { .. }) => conflicts += 1,
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert_eq!((ok, conflicts), (30, 10));
    assert!(
        store.commits() - commits_before < 10,
        "{} commits",
        store.commits()
    );
    assert_eq!(store.verify().await.unwrap(), Verify::Intact { events: 31 });
}

fn task_create(id: &str) -> TaskWrite {
    TaskWrite {
        row: TaskRow {
            id: id.to_owned(),
            agent: "a".to_owned(),
            state: "succeeded".to_owned(),
            version: 1,
            snapshot: json!({"id": id}),
            created_at_ms: 1,
            updated_at_ms: 1,
            lease_expires_at_ms: None,
            approval_expires_at_ms: None,
            deadline_at_ms: None,
        },
        expected_version: None,
        events: vec![NewEvent::new(
            EventKind::TaskCreated,
            Some(id.to_owned()),
            json!({"id": id}),
        )],
        blobs: vec![bytes::Bytes::from(format!("payload of {id}"))],
        blob_refs: Vec::new(),
        idempotency: None,
    }
}

// === pruning and the chain ===

/// A store with a pruned task (`gone`, seqs 1..=1) and a kept one (`kept`, seq 2).
async fn pruned_store(dir: &TempDir) -> SqliteStore {
    let store = open(dir);
    store.write_task(task_create("gone")).await.unwrap();
    let mut kept = task_create("kept");
    kept.row.state = "running".to_owned();
    store.write_task(kept).await.unwrap();
    let report = store
        .prune(crate::PrunePolicy {
            finished_before_ms: Some(10),
            keep_checkpoints: None,
        })
        .await
        .unwrap();
    assert_eq!((report.tasks, report.events, report.blobs), (1, 1, 1));
    store
}

#[tokio::test]
async fn prune_then_verify_is_intact() {
    let dir = tempfile::tempdir().unwrap();
    let store = pruned_store(&dir).await;
    assert_eq!(store.verify().await.unwrap(), Verify::Intact { events: 2 });
    let raw = Connection::open(store.path()).unwrap();
    let data: String = raw
        .query_row("SELECT data FROM events WHERE seq = 1", [], |r| r.get(0))
        .unwrap();
    assert_eq!(data, "");
    let events = all(&store).await;
    assert!(events[0].pruned && events[0].data.is_null());
    assert!(!events[1].pruned);
}

#[tokio::test]
async fn tampered_data_of_a_kept_event_breaks_verify_after_prune() {
    let dir = tempfile::tempdir().unwrap();
    let store = pruned_store(&dir).await;
    let raw = Connection::open(store.path()).unwrap();
    raw.execute(
        r#"UPDATE events SET data = '{"id":"forged"}' WHERE seq = 2"#,
        [],
    )
    .unwrap();
    let verdict = store.verify().await.unwrap();
    assert!(
        matches!(&verdict, Verify::Broken { seq: 2, reason } if reason.contains("data_hash")),
        "{verdict:?}"
    );
}

#[tokio::test]
async fn tampered_data_hash_breaks_verify() {
    // seq 1 is pruned (no data), seq 2 is kept.
    for seq in [1u64, 2] {
        let dir = tempfile::tempdir().unwrap();
        let store = pruned_store(&dir).await;
        let raw = Connection::open(store.path()).unwrap();
        raw.execute(
            "UPDATE events SET data_hash = ?1 WHERE seq = ?2",
            rusqlite::params![crate::chain::data_hash("{}"), seq],
        )
        .unwrap();
        let verdict = store.verify().await.unwrap();
        assert!(
            matches!(&verdict, Verify::Broken { seq: s, reason } if *s == seq && reason.contains("does not match the content")),
            "seq {seq}: {verdict:?}"
        );
    }
}

#[tokio::test]
async fn restoring_pruned_data_with_other_content_breaks_verify() {
    let dir = tempfile::tempdir().unwrap();
    let store = pruned_store(&dir).await;
    let raw = Connection::open(store.path()).unwrap();
    raw.execute(
        r#"UPDATE events SET data = '{"id":"forged"}' WHERE seq = 1"#,
        [],
    )
    .unwrap();
    let verdict = store.verify().await.unwrap();
    assert!(
        matches!(&verdict, Verify::Broken { seq: 1, .. }),
        "{verdict:?}"
    );
}

#[tokio::test]
async fn stats_count_the_file_and_its_wal() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    store.write_task(task_create("t")).await.unwrap();
    let stats = store.stats().await.unwrap();
    let on_disk = std::fs::metadata(store.path()).unwrap().len();
    assert!(stats.db_bytes > on_disk, "{stats:?} vs file {on_disk}");
    assert_eq!((stats.events, stats.tasks, stats.blobs), (1, 1, 1));
}

// === open, reopen, migrations ===

#[tokio::test]
async fn open_creates_parent_directories() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/keel.db");
    let store = SqliteStore::open(&path, Durability::Fsync).unwrap();
    store.ping().await.unwrap();
    assert!(path.exists());
}

#[tokio::test]
async fn open_puts_the_database_in_wal_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.db");
    let _store = SqliteStore::open(&path, Durability::Relaxed).unwrap();
    let raw = Connection::open(&path).unwrap();
    let mode: String = raw
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn reopen_continues_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(&dir);
    let before = first
        .append(vec![step("t", 0), step("t", 1)])
        .await
        .unwrap();
    first.close().await.unwrap();

    let second = open(&dir);
    let after = second.append(vec![step("t", 2)]).await.unwrap();
    assert_eq!(after[0].seq, 3);
    assert_eq!(after[0].prev_hash, before[1].hash);
    assert_eq!(second.verify().await.unwrap(), Verify::Intact { events: 3 });
}

#[tokio::test]
async fn acknowledged_events_are_present_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(&dir));
    let mut set = JoinSet::new();
    for t in 0..8 {
        let store = Arc::clone(&store);
        set.spawn(async move { store.append(vec![step(&format!("t{t}"), t)]).await.unwrap() });
    }
    let mut acked = Vec::new();
    while let Some(stored) = set.join_next().await {
        acked.extend(stored.unwrap());
    }
    acked.sort_by_key(|e| e.seq);
    drop(store);

    let reopened = open(&dir);
    assert_eq!(all(&reopened).await, acked);
}

#[tokio::test]
async fn opens_a_database_created_at_schema_version_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.db");
    // Build a version-1 file by hand, as the first release wrote it.
    let mut prev = GENESIS_HASH.to_owned();
    {
        let mut raw = Connection::open(&path).unwrap();
        migrate::migrate(&mut raw, &path, &MIGRATIONS[..1]).unwrap();
        for seq in 1..=2u64 {
            let at = "2026-11-23T13:00:00.123Z";
            let at_ms = 1_795_438_800_123;
            let data = format!(r#"{{"seq":{seq}}}"#);
            let hash = HashInput {
                prev_hash: &prev,
                seq,
                task_id: Some("old"),
                at,
                at_ms,
                kind: "task_created",
                data: &data,
            }
            .hash();
            raw.execute(
                "INSERT INTO events (seq, task_id, at, at_ms, kind, data, prev_hash, hash) VALUES (?1, 'old', ?2, ?3, 'task_created', ?4, ?5, ?6)",
                rusqlite::params![seq, at, at_ms, data, prev, hash],
            )
            .unwrap();
            prev = hash;
        }
    }

    let store = SqliteStore::open(&path, Durability::Fsync).unwrap();
    assert_eq!(store.verify().await.unwrap(), Verify::Intact { events: 2 });
    let old = all(&store).await;
    assert_eq!(old[1].data, json!({"seq": 2}));
    let new = store.append(vec![step("new", 3)]).await.unwrap();
    assert_eq!((new[0].seq, new[0].prev_hash.as_str()), (3, prev.as_str()));
    assert!(new[0].at_ms >= 1_795_438_800_123, "time went backwards");
    store.close().await.unwrap();

    let raw = Connection::open(&path).unwrap();
    assert_eq!(
        migrate::user_version(&raw).unwrap() as usize,
        MIGRATIONS.len()
    );
    let layouts: Vec<(u64, u32)> = raw
        .prepare("SELECT seq, layout FROM events ORDER BY seq")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(layouts, [(1, 1), (2, 1), (3, 2)]);

    // The migrated store keeps tasks, and a chain mixing both layouts verifies.
    let store = SqliteStore::open(&path, Durability::Fsync).unwrap();
    // "old" owns the two layout-1 events; its create is layout 2.
    let stored = store.write_task(task_create("old")).await.unwrap();
    assert_eq!(stored[0].seq, 4);
    assert_eq!(store.verify().await.unwrap(), Verify::Intact { events: 4 });
    let old = all(&store).await;
    assert_eq!((old[0].layout, old[0].data.clone()), (1, json!({"seq": 1})));
    assert!(old.iter().all(|e| e.hash == e.compute_hash()));
    // Pruning never blanks a layout-1 event: its hash covers its data.
    let report = store
        .prune(crate::PrunePolicy {
            finished_before_ms: Some(10),
            keep_checkpoints: None,
        })
        .await
        .unwrap();
    assert_eq!((report.tasks, report.events), (1, 1));
    let after = all(&store).await;
    assert!(!after[0].pruned && !after[1].pruned && after[3].pruned);
    assert_eq!(after[0].data, json!({"seq": 1}));
    assert_eq!(store.verify().await.unwrap(), Verify::Intact { events: 4 });
}

#[test]
fn refuses_a_database_from_a_newer_keel() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.db");
    Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 999)
        .unwrap();
    let err = SqliteStore::open(&path, Durability::Fsync).unwrap_err();
    assert!(err.to_string().contains("schema version 999"), "{err}");
    assert!(err.to_string().contains("keel.db"), "{err}");
}

// === tampering ===

#[tokio::test]
async fn edited_data_breaks_verify_at_that_seq() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    store
        .append((0..5).map(|i| step("t", i)).collect())
        .await
        .unwrap();
    let raw = Connection::open(store.path()).unwrap();
    raw.execute(r#"UPDATE events SET data = '{"i":99}' WHERE seq = 3"#, [])
        .unwrap();

    match store.verify().await.unwrap() {
        Verify::Broken { seq, reason } => {
            assert_eq!(seq, 3);
            assert!(reason.contains("does not match the content"), "{reason}");
        }
        intact @ Verify::Intact { .. } => panic!("tampered log verified as {intact:?}"),
    }
}

#[tokio::test]
async fn deleted_row_breaks_verify_at_the_gap() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    store
        .append((0..5).map(|i| step("t", i)).collect())
        .await
        .unwrap();
    let raw = Connection::open(store.path()).unwrap();
    raw.execute("DELETE FROM events WHERE seq = 2", []).unwrap();

    let verdict = store.verify().await.unwrap();
    assert!(
        matches!(&verdict, Verify::Broken { seq: 3, reason } if reason.contains("expected seq 2")),
        "{verdict:?}"
    );
}

#[tokio::test]
async fn rewritten_chain_link_breaks_verify() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    store
        .append((0..3).map(|i| step("t", i)).collect())
        .await
        .unwrap();
    let raw = Connection::open(store.path()).unwrap();
    raw.execute(
        "UPDATE events SET prev_hash = ?1 WHERE seq = 2",
        [GENESIS_HASH],
    )
    .unwrap();

    let verdict = store.verify().await.unwrap();
    assert!(
        matches!(&verdict, Verify::Broken { seq: 2, reason } if reason.contains("prev_hash")),
        "{verdict:?}"
    );
}

// === group commit and the writer ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_share_commits() {
    const CALLERS: u64 = 100;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(&dir));
    // Hold the write lock so every caller queues behind one blocked commit.
    let raw = Connection::open(store.path()).unwrap();
    raw.execute_batch("BEGIN IMMEDIATE").unwrap();
    let mut set = JoinSet::new();
    for i in 0..CALLERS {
        let store = Arc::clone(&store);
        set.spawn(async move { store.append(vec![step("t", i)]).await.unwrap() });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    raw.execute_batch("COMMIT").unwrap();
    while let Some(stored) = set.join_next().await {
        assert_eq!(stored.unwrap().len(), 1);
    }

    let commits = store.commits();
    assert!(
        (1..CALLERS / 10).contains(&commits),
        "{commits} commits for {CALLERS} callers"
    );
    assert_eq!(
        store.verify().await.unwrap(),
        Verify::Intact { events: CALLERS }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_error_reaches_every_waiting_appender() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(&dir));
    store.append(vec![step("t", 0)]).await.unwrap();
    let raw = Connection::open(store.path()).unwrap();
    raw.execute_batch("ALTER TABLE events RENAME TO hidden")
        .unwrap();

    let mut set = JoinSet::new();
    for i in 0..20 {
        let store = Arc::clone(&store);
        set.spawn(async move { store.append(vec![step("t", i)]).await });
    }
    while let Some(result) = set.join_next().await {
        let err = result.unwrap().unwrap_err();
        assert!(matches!(err, StoreError::Commit { .. }), "{err}");
        assert!(err.to_string().contains("keel.db"), "{err}");
    }

    // The writer survives the failure and the chain resumes where it was.
    raw.execute_batch("ALTER TABLE hidden RENAME TO events")
        .unwrap();
    let stored = store.append(vec![step("t", 1)]).await.unwrap();
    assert_eq!(stored[0].seq, 2);
    assert_eq!(store.verify().await.unwrap(), Verify::Intact { events: 2 });
}

#[tokio::test]
async fn append_larger_than_a_batch_is_written_whole() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let big: Vec<NewEvent> = (0..3000).map(|i| step("t", i)).collect();
    let stored = store.append(big).await.unwrap();
    assert_eq!(seqs_of(&stored), (1..=3000).collect::<Vec<_>>());
    assert_eq!(store.commits(), 1);
    assert_eq!(
        store.verify().await.unwrap(),
        Verify::Intact { events: 3000 }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_drains_appends_already_queued() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let path = store.path().to_owned();
    let raw = Connection::open(&path).unwrap();
    raw.execute_batch("BEGIN IMMEDIATE").unwrap();
    // The caller gives up waiting, but its request is already queued.
    let gave_up =
        tokio::time::timeout(Duration::from_millis(50), store.append(vec![step("t", 0)])).await;
    assert!(gave_up.is_err());
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        raw.execute_batch("COMMIT").unwrap();
    });
    store.close().await.unwrap();
    release.join().unwrap();

    let reopened = SqliteStore::open(&path, Durability::Fsync).unwrap();
    assert_eq!(seqs_of(&all(&reopened).await), [1]);
}

#[tokio::test]
async fn data_is_stored_as_canonical_json() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let mut data = serde_json::Map::new();
    data.insert("b".to_owned(), json!(1));
    data.insert("a".to_owned(), json!({"d": 1, "c": 2}));
    store
        .append(vec![NewEvent::new(EventKind::LlmCall, None, data.into())])
        .await
        .unwrap();
    let raw = Connection::open(store.path()).unwrap();
    let text: String = raw
        .query_row("SELECT data FROM events", [], |r| r.get(0))
        .unwrap();
    assert_eq!(text, r#"{"a":{"c":2,"d":1},"b":1}"#);
}

#[tokio::test]
async fn payloads_are_stored_once_and_pruned_with_their_task() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    let prefix =
        bytes::Bytes::from_static(b"{\"role\":\"system\",\"content\":\"a long shared prefix\"}");
    for i in 0..5u64 {
        let own = bytes::Bytes::from(format!("{{\"role\":\"user\",\"content\":\"turn {i}\"}}"));
        store
            .append_with_payloads(
                vec![step("t1", i)],
                vec![
                    crate::Payload::new(prefix.clone()),
                    crate::Payload::new(own),
                ],
                Some("t1".into()),
            )
            .await
            .unwrap();
    }
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.blobs, 6, "the repeated prefix must be stored once");
    let refs: i64 = Connection::open(dir.path().join("keel.db"))
        .unwrap()
        .query_row(
            "SELECT count(*) FROM task_blobs WHERE task_id = 't1'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(refs, 6, "a repeated payload must not add a ref");
    assert_eq!(
        store.blob(&crate::blob_hash(&prefix)).await.unwrap(),
        Some(prefix)
    );
    // Payloads without a task are kept; they are filed under no task.
    store
        .append_with_payloads(
            vec![step("", 9)],
            vec![crate::Payload::new(bytes::Bytes::from_static(b"free"))],
            None,
        )
        .await
        .unwrap();
    assert_eq!(store.stats().await.unwrap().blobs, 7);
    assert!(matches!(
        store.verify().await.unwrap(),
        Verify::Intact { .. }
    ));
}

#[tokio::test]
async fn the_background_checkpointer_copies_the_wal_back() {
    let dir = TempDir::new().unwrap();
    let db = dir.path().join("keel.db");
    let store = open(&dir);
    // Only a checkpoint writes to the database file itself; appends go to the WAL.
    tokio::time::sleep(super::checkpoint::INTERVAL * 3).await;
    let before = std::fs::metadata(&db).unwrap().len();
    for i in 0..300u64 {
        store.append(vec![step("t1", i)]).await.unwrap();
    }
    // The writer alone would not checkpoint before ~200 MiB of WAL.
    tokio::time::sleep(super::checkpoint::INTERVAL * 4).await;
    let after = std::fs::metadata(&db).unwrap().len();
    assert!(
        after > before,
        "the database file did not grow ({before} -> {after}): no checkpoint ran"
    );
    assert_eq!(all(&store).await.len(), 300);
}

#[tokio::test]
async fn pruning_drops_old_idempotency_state_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    store
        .save_state("idem/tool/charge/support/k1", b"{}".to_vec(), None)
        .await
        .unwrap();
    store
        .save_state("profile/support/charge/amount", b"{}".to_vec(), None)
        .await
        .unwrap();
    let report = store
        .prune(crate::PrunePolicy {
            finished_before_ms: Some(crate::chain::now_ms() + 1_000),
            keep_checkpoints: None,
        })
        .await
        .unwrap();
    assert_eq!(report.idempotency_keys, 1);
    assert!(
        store
            .load_state("idem/tool/charge/support/k1")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .load_state("profile/support/charge/amount")
            .await
            .unwrap()
            .is_some(),
        "profiles are not idempotency records"
    );
}

/// Records the seqs a tap is told of.
#[derive(Default)]
struct Seen(parking_lot::Mutex<Vec<u64>>);

impl crate::Tap for Seen {
    fn committed(&self, events: &[Event]) {
        self.0.lock().extend(events.iter().map(|e| e.seq));
    }
}

#[tokio::test]
async fn a_tap_is_told_of_every_commit_and_of_nothing_else() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    store.append(vec![step("t", 0)]).await.unwrap();
    let seen = Arc::new(Seen::default());
    assert!(store.set_tap(seen.clone()));
    assert!(!store.set_tap(seen.clone()), "one tap per store");
    store
        .append(vec![step("t", 1), step("t", 2)])
        .await
        .unwrap();
    store
        .append_with_payloads(
            vec![step("t", 3)],
            vec![crate::Payload::new(bytes::Bytes::from_static(b"p"))],
            Some("t".into()),
        )
        .await
        .unwrap();
    store.append(Vec::new()).await.unwrap();
    assert_eq!(
        *seen.0.lock(),
        vec![2, 3, 4],
        "only what was committed after the tap"
    );
}

/// A caller that leaves while its events commit (a client gone mid-call) does not keep them
/// from the tap: told once, whether the writer answered before the caller left or after.
#[tokio::test]
async fn a_tap_is_told_of_events_whose_caller_left() {
    use futures::FutureExt;
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    let seen = Arc::new(Seen::default());
    assert!(store.set_tap(seen.clone()));
    // Left after the answer was sent: the caller's end takes it as it drops.
    let mut answered = Box::pin(store.append(vec![step("t", 0)]));
    assert!(
        (&mut answered).now_or_never().is_none(),
        "queued, not committed"
    );
    store.append(vec![step("t", 1)]).await.unwrap();
    drop(answered);
    // Left right after queueing (the writer most likely answers no one).
    assert!(store.append(vec![step("t", 2)]).now_or_never().is_none());
    store.append(vec![step("t", 3)]).await.unwrap();
    let mut seqs = seen.0.lock().clone();
    seqs.sort_unstable();
    assert_eq!(seqs, vec![1, 2, 3, 4], "every committed event, once");
}
