//! The conformance suite: properties every [`EventStore`] and every
//! [`TaskStore`] must have, generic over the implementation. Enabled in this
//! crate's tests and by the `conformance` feature for other implementations'
//! tests.
//!
//! Each property takes a fresh, empty store and returns `Err` naming what did
//! not hold (no panics, so the suite is ordinary library code); a test calls
//! `.unwrap()` on it. [`run_all`] runs every event-log property and
//! [`run_all_tasks`] every task property, each on its own store.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::json;
use tokio::task::JoinSet;

use keel_core::{EventKind, NewEvent};

use crate::{
    BlobRef, Event, EventQuery, EventStore, GENESIS_HASH, IdempotencyRecord, PrunePolicy,
    StoreError, TaskQuery, TaskRow, TaskStore, TaskWrite, Verify, blob_hash,
};

/// Why a conformance property failed.
#[derive(Debug, thiserror::Error)]
pub enum ConformanceError {
    /// The store returned an error.
    #[error("store error: {0}")]
    Store(#[from] StoreError),
    /// The store answered, but wrongly.
    #[error("{0}")]
    Check(String),
}

/// The result of one property.
pub type Outcome = Result<(), ConformanceError>;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(ConformanceError::Check(format!($($fmt)+)));
        }
    };
}

fn event(kind: EventKind, task: Option<&str>, data: serde_json::Value) -> NewEvent {
    NewEvent::new(kind, task.map(str::to_owned), data)
}

fn seqs(events: &[Event]) -> Vec<u64> {
    events.iter().map(|e| e.seq).collect()
}

/// `(c, half)` of each event, in order: the call and which of its two events it is.
fn call_halves<'e>(events: impl Iterator<Item = &'e Event>) -> Vec<(u64, u64)> {
    events
        .map(|e| {
            (
                e.data["c"].as_u64().unwrap_or(99),
                e.data["half"].as_u64().unwrap_or(99),
            )
        })
        .collect()
}

/// `(c, 0), (c, 1)` for each of `calls` calls: every call's two events, in order.
fn both_halves(calls: usize) -> Vec<(u64, u64)> {
    (0..calls as u64).flat_map(|c| [(c, 0), (c, 1)]).collect()
}

/// Runs every property, each on a store from `make` (which must be new and empty).
pub async fn run_all<S: EventStore>(make: impl Fn() -> S) -> Outcome {
    append_assigns_consecutive_seqs(&make()).await?;
    append_links_the_chain(&make()).await?;
    appended_events_read_back_unchanged(&make()).await?;
    a_member_given_as_text_is_stored_in_its_place(&make()).await?;
    reserved_keys_are_renamed_and_read_back(&make()).await?;
    events_by_task_in_order(&make()).await?;
    filters_kind_after_seq_and_limit(&make()).await?;
    concurrent_appends_form_one_chain(Arc::new(make())).await?;
    call_records_and_other_appends_form_one_chain(Arc::new(make())).await?;
    verify_reports_intact(&make()).await?;
    ping_succeeds(&make()).await?;
    state_is_compare_and_set(&make()).await?;
    concurrent_state_saves_lose_nothing(Arc::new(make())).await?;
    Ok(())
}

/// Data holding an object key serde_json reserves for itself (a client's tool arguments can)
/// is stored with that key renamed, so the log reads back as what was hashed.
pub async fn reserved_keys_are_renamed_and_read_back<S: EventStore>(store: &S) -> Outcome {
    let data = json!({"args": {"z": 1, "$serde_json::private::RawValue": "{"}});
    let appended = store
        .append(vec![event(EventKind::ToolInvoked, None, data)])
        .await?;
    let expected =
        json!({"args": {"z": 1, "(renamed by keel) $serde_json::private::RawValue": "{"}});
    ensure!(
        appended.len() == 1 && appended[0].data == expected,
        "an append returned {appended:?}"
    );
    let stored = store.events(EventQuery::default()).await?;
    ensure!(
        stored == appended,
        "read back {stored:?}, appended {appended:?}"
    );
    ensure!(
        stored[0].data_matches_hash(),
        "the data does not match its hash"
    );
    let verified = store.verify().await?;
    ensure!(
        verified == Verify::Intact { events: 1 },
        "verify said {verified:?}"
    );
    Ok(())
}

/// A member given as canonical text (a model's answer) is stored in its place in the
/// data, as if it had been a tree: the event reads back whole, its stored text is the
/// canonical JSON of the whole data, and the chain verifies. The appended event comes back
/// without that member.
pub async fn a_member_given_as_text_is_stored_in_its_place<S: EventStore>(store: &S) -> Outcome {
    let answer = br#"{"model":"m","choices":[{"finish_reason":"stop","message":{"content":"caf\u00e9"}}],"id":"x"}"#;
    let whole = |key: &str| {
        let mut data = json!({"agent": "a", "outcome": "ok", "zzz": 1, "aaa": [2]});
        data[key] = serde_json::from_slice(answer).unwrap_or_default();
        data
    };
    let mut appended = Vec::new();
    // First, between and last in key order, and a tree member of the same key left out.
    for key in ["a", "response", "zzzz", "agent"] {
        let data = whole(key);
        let mut members = data.as_object().cloned().unwrap_or_default();
        members.insert(key.to_owned(), json!("a tree member the text replaces"));
        let document = keel_core::Document::parse(answer)
            .map_err(|e| ConformanceError::Check(format!("the answer does not parse: {e}")))?;
        let event = NewEvent::with_text(
            EventKind::LlmCall,
            Some("t-text".to_owned()),
            members,
            key,
            document.canonical_text(),
        );
        let returned = store.append_call(vec![event], Vec::new(), None).await?;
        let mut without = data.clone();
        if let Some(members) = without.as_object_mut() {
            members.remove(key);
        }
        ensure!(
            returned.len() == 1 && returned[0].data == without,
            "an append returned {returned:?}, not the data without {key}"
        );
        appended.push((returned[0].seq, data));
    }
    let stored = store.events(EventQuery::default()).await?;
    for (seq, data) in &appended {
        let Some(event) = stored.iter().find(|e| e.seq == *seq) else {
            return Err(ConformanceError::Check(format!(
                "event {seq} is not stored"
            )));
        };
        ensure!(
            event.data == *data,
            "event {seq} read back as {}",
            event.data
        );
        ensure!(
            event.data_hash.as_deref()
                == Some(crate::chain::data_hash(&crate::chain::canonical_json(data)).as_str()),
            "event {seq}'s data_hash is not that of its data's canonical JSON"
        );
        ensure!(
            event.data_matches_hash(),
            "event {seq}'s data does not match its hash"
        );
    }
    let verified = store.verify().await?;
    ensure!(
        verified == Verify::Intact { events: 4 },
        "verify said {verified:?}"
    );
    Ok(())
}

/// `seq` starts at 1 and each append continues it without gaps; an empty
/// append writes nothing.
pub async fn append_assigns_consecutive_seqs<S: EventStore>(store: &S) -> Outcome {
    let empty = store.append(Vec::new()).await?;
    ensure!(
        empty.is_empty(),
        "empty append returned {} events",
        empty.len()
    );
    let first = store
        .append(vec![
            event(EventKind::TaskCreated, Some("t1"), json!({"n": 1})),
            event(EventKind::TaskClaimed, Some("t1"), json!({"n": 2})),
            event(EventKind::LlmCall, None, json!({"n": 3})),
        ])
        .await?;
    ensure!(
        seqs(&first) == [1, 2, 3],
        "first append got seqs {:?}",
        seqs(&first)
    );
    let second = store
        .append(vec![
            event(EventKind::StepRecorded, Some("t1"), json!({})),
            event(EventKind::TaskSucceeded, Some("t1"), json!({})),
        ])
        .await?;
    ensure!(
        seqs(&second) == [4, 5],
        "second append got seqs {:?}",
        seqs(&second)
    );
    let all = store.events(EventQuery::default()).await?;
    ensure!(
        seqs(&all) == [1, 2, 3, 4, 5],
        "log holds seqs {:?}",
        seqs(&all)
    );
    Ok(())
}

/// The first `prev_hash` is genesis, each next one is the previous `hash`,
/// every `hash` matches the content, and `at` is RFC 3339 UTC millis that never
/// goes backwards.
pub async fn append_links_the_chain<S: EventStore>(store: &S) -> Outcome {
    for i in 0..3 {
        store
            .append(vec![
                event(EventKind::LlmCall, Some("t"), json!({"i": i})),
                event(EventKind::RetryScheduled, None, json!({"i": i})),
            ])
            .await?;
    }
    let all = store.events(EventQuery::default()).await?;
    let mut prev = GENESIS_HASH.to_owned();
    let mut prev_at_ms = i64::MIN;
    for e in &all {
        ensure!(
            e.prev_hash == prev,
            "seq {} prev_hash {} != {prev}",
            e.seq,
            e.prev_hash
        );
        ensure!(
            e.hash == e.compute_hash(),
            "seq {} hash does not match its content",
            e.seq
        );
        ensure!(
            e.at == crate::chain::format_rfc3339_ms(e.at_ms),
            "seq {} at {} does not match at_ms {}",
            e.seq,
            e.at,
            e.at_ms
        );
        ensure!(e.at_ms >= prev_at_ms, "seq {} at_ms goes backwards", e.seq);
        prev = e.hash.clone();
        prev_at_ms = e.at_ms;
    }
    Ok(())
}

/// What `append` returns is exactly what `events` reads back later, including
/// nested data, unicode, numbers, and an absent task.
pub async fn appended_events_read_back_unchanged<S: EventStore>(store: &S) -> Outcome {
    let data = json!({
        "zeta": {"b": [1, 2.5, -3, {"y": null, "x": true}], "a": "é ✓ \"q\" \n"},
        "alpha": 18_446_744_073_709_551_615u64,
        "mid": 0.1,
    });
    let appended = store
        .append(vec![
            event(EventKind::LlmCall, None, data.clone()),
            event(EventKind::ToolInvoked, Some(""), json!([])),
        ])
        .await?;
    let read = store.events(EventQuery::default()).await?;
    ensure!(
        appended == read,
        "append returned {appended:?} but events read {read:?}"
    );
    ensure!(
        appended[0].data == data,
        "data changed: {:?}",
        appended[0].data
    );
    ensure!(
        appended[0].task_id.is_none(),
        "absent task_id became {:?}",
        appended[0].task_id
    );
    ensure!(
        appended[1].task_id.as_deref() == Some(""),
        "empty task_id became {:?}",
        appended[1].task_id
    );
    ensure!(
        appended[0].kind == "llm_call",
        "kind stored as {}",
        appended[0].kind
    );
    Ok(())
}

/// Events of one task come back in ascending `seq`, without other tasks' events.
pub async fn events_by_task_in_order<S: EventStore>(store: &S) -> Outcome {
    let mut expected: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for i in 0..6u64 {
        let task = if i % 2 == 0 { "a" } else { "b" };
        let stored = store
            .append(vec![
                event(EventKind::StepRecorded, Some(task), json!({"step": i})),
                event(EventKind::LlmCall, None, json!({})),
            ])
            .await?;
        expected.entry(task).or_default().push(stored[0].seq);
    }
    for (task, want) in &expected {
        let query = EventQuery {
            task_id: Some((*task).to_owned()),
            ..EventQuery::default()
        };
        let got = store.events(query).await?;
        ensure!(
            seqs(&got) == *want,
            "task {task}: seqs {:?}, want {want:?}",
            seqs(&got)
        );
        ensure!(
            got.iter().all(|e| e.task_id.as_deref() == Some(*task)),
            "task {task}: got another task's event"
        );
    }
    let none = store
        .events(EventQuery {
            task_id: Some("nobody".to_owned()),
            ..EventQuery::default()
        })
        .await?;
    ensure!(
        none.is_empty(),
        "unknown task returned {} events",
        none.len()
    );
    Ok(())
}

/// `kind`, `after_seq` and `limit` filter, alone and together.
pub async fn filters_kind_after_seq_and_limit<S: EventStore>(store: &S) -> Outcome {
    for i in 0..5 {
        store
            .append(vec![
                event(EventKind::LlmCall, Some("t"), json!({"i": i})),
                event(EventKind::BreakerOpened, None, json!({"i": i})),
            ])
            .await?;
    }
    let q = |kind: Option<&str>, task: Option<&str>, after_seq, limit| EventQuery {
        task_id: task.map(str::to_owned),
        kind: kind.map(str::to_owned),
        after_seq,
        limit,
    };
    let cases: [(EventQuery, &[u64]); 11] = [
        (q(Some("llm_call"), None, None, None), &[1, 3, 5, 7, 9]),
        // A kind other than `llm_call` with `after_seq` and `limit` (SQLite reads these through
        // its kind index, which leaves `llm_call` out), a kind within a task, and no such kind.
        (q(Some("breaker_opened"), None, Some(4), Some(2)), &[6, 8]),
        (q(Some("llm_call"), Some("t"), Some(3), None), &[5, 7, 9]),
        (q(Some(""), None, None, None), &[]),
        (
            q(Some("breaker_opened"), None, None, None),
            &[2, 4, 6, 8, 10],
        ),
        (q(None, None, Some(7), None), &[8, 9, 10]),
        (q(None, None, None, Some(3)), &[1, 2, 3]),
        (q(None, None, None, Some(0)), &[]),
        (q(Some("llm_call"), None, Some(3), Some(2)), &[5, 7]),
        (q(Some("breaker_opened"), Some("t"), None, None), &[]),
        (q(None, None, Some(10), None), &[]),
    ];
    for (query, want) in cases {
        let got = store.events(query.clone()).await?;
        ensure!(
            seqs(&got) == want,
            "{query:?}: seqs {:?}, want {want:?}",
            seqs(&got)
        );
    }
    Ok(())
}

/// Tasks appending concurrently: 50 tokio tasks × 10 appends of 2 events. All
/// 1000 events land, `seq` has no gaps, each append's events are consecutive,
/// each task's events are in its order, and the chain is intact.
pub async fn concurrent_appends_form_one_chain<S: EventStore>(store: Arc<S>) -> Outcome {
    const TASKS: usize = 50;
    const CALLS: usize = 10;
    let mut set = JoinSet::new();
    for t in 0..TASKS {
        let store = Arc::clone(&store);
        set.spawn(async move {
            let task = format!("task-{t}");
            let mut broken = Vec::new();
            for c in 0..CALLS {
                let stored = store
                    .append(vec![
                        event(
                            EventKind::StepRecorded,
                            Some(&task),
                            json!({"c": c, "half": 0}),
                        ),
                        event(EventKind::LlmCall, Some(&task), json!({"c": c, "half": 1})),
                    ])
                    .await?;
                if stored.len() != 2 || stored[1].seq != stored[0].seq + 1 {
                    broken.push(seqs(&stored));
                }
            }
            Ok::<_, StoreError>(broken)
        });
    }
    while let Some(joined) = set.join_next().await {
        let broken =
            joined.map_err(|e| ConformanceError::Check(format!("append task failed: {e}")))??;
        ensure!(
            broken.is_empty(),
            "appends not given consecutive seqs: {broken:?}"
        );
    }
    let all = store.events(EventQuery::default()).await?;
    let total = (TASKS * CALLS * 2) as u64;
    ensure!(
        seqs(&all) == (1..=total).collect::<Vec<_>>(),
        "log does not hold seqs 1..={total} (has {})",
        all.len()
    );
    for t in 0..TASKS {
        let task = format!("task-{t}");
        let got = store
            .events(EventQuery {
                task_id: Some(task.clone()),
                ..EventQuery::default()
            })
            .await?;
        let order = call_halves(got.iter());
        ensure!(
            order == both_halves(CALLS),
            "{task}: events out of order: {order:?}"
        );
    }
    let verdict = store.verify().await?;
    ensure!(
        verdict == Verify::Intact { events: total },
        "verify after concurrent appends: {verdict:?}"
    );
    Ok(())
}

/// Model-call records ([`EventStore::append_call`], which a store may acknowledge with a
/// weaker durability) and other appends made at the same time share one chain: consecutive
/// `seq`s, each call's events together and in order, the log intact.
pub async fn call_records_and_other_appends_form_one_chain<S: EventStore>(
    store: Arc<S>,
) -> Outcome {
    const WRITERS: usize = 16;
    const CALLS: usize = 10;
    let mut set = JoinSet::new();
    for w in 0..WRITERS {
        let store = Arc::clone(&store);
        set.spawn(async move {
            let task = format!("task-{w}");
            for c in 0..CALLS {
                let events = vec![
                    event(
                        EventKind::RetryScheduled,
                        Some(&task),
                        json!({"c": c, "half": 0}),
                    ),
                    event(EventKind::LlmCall, Some(&task), json!({"c": c, "half": 1})),
                ];
                let stored = if w % 2 == 0 {
                    let answer =
                        crate::Payload::new(bytes::Bytes::from(format!("{task} answer {c}")));
                    store
                        .append_call(events, vec![answer], Some(task.clone()))
                        .await?
                } else {
                    store.append(events).await?
                };
                if stored.len() != 2 || stored[1].seq != stored[0].seq + 1 {
                    return Ok(Err(format!("{task} call {c}: seqs {:?}", seqs(&stored))));
                }
            }
            Ok::<_, StoreError>(Ok(()))
        });
    }
    while let Some(joined) = set.join_next().await {
        let done =
            joined.map_err(|e| ConformanceError::Check(format!("append task failed: {e}")))??;
        if let Err(broken) = done {
            return Err(ConformanceError::Check(format!(
                "a call's events were not given consecutive seqs: {broken}"
            )));
        }
    }
    let total = (WRITERS * CALLS * 2) as u64;
    let all = store.events(EventQuery::default()).await?;
    ensure!(
        seqs(&all) == (1..=total).collect::<Vec<_>>(),
        "log does not hold seqs 1..={total} (has {})",
        all.len()
    );
    for w in 0..WRITERS {
        let task = format!("task-{w}");
        let mine = call_halves(
            all.iter()
                .filter(|e| e.task_id.as_deref() == Some(task.as_str())),
        );
        ensure!(
            mine == both_halves(CALLS),
            "{task}: events out of order: {mine:?}"
        );
    }
    let verdict = store.verify().await?;
    ensure!(
        verdict == Verify::Intact { events: total },
        "verify after call records and appends: {verdict:?}"
    );
    Ok(())
}

/// `verify` is intact on an empty log and counts every event of a sound one.
pub async fn verify_reports_intact<S: EventStore>(store: &S) -> Outcome {
    let empty = store.verify().await?;
    ensure!(
        empty == Verify::Intact { events: 0 },
        "empty log verified as {empty:?}"
    );
    for i in 0..4 {
        store
            .append(vec![event(EventKind::AlertRaised, None, json!({"i": i}))])
            .await?;
    }
    let verdict = store.verify().await?;
    ensure!(
        verdict == Verify::Intact { events: 4 },
        "sound log verified as {verdict:?}"
    );
    Ok(())
}

/// `ping` succeeds on a working store.
pub async fn ping_succeeds<S: EventStore>(store: &S) -> Outcome {
    store.ping().await?;
    Ok(())
}

/// A state value is saved only over the version it was read at; a stale save changes
/// nothing and says so; a value survives being read back.
pub async fn state_is_compare_and_set<S: EventStore>(store: &S) -> Outcome {
    ensure!(
        store.load_state("k").await?.is_none(),
        "a new store has state"
    );
    let v1 = store.save_state("k", b"one".to_vec(), None).await?;
    ensure!(v1 == Some(1), "first save gave version {v1:?}");
    let again = store.save_state("k", b"dup".to_vec(), None).await?;
    ensure!(again.is_none(), "a second first save was accepted");
    let v2 = store.save_state("k", b"two".to_vec(), Some(1)).await?;
    ensure!(v2 == Some(2), "save over version 1 gave {v2:?}");
    let stale = store.save_state("k", b"old".to_vec(), Some(1)).await?;
    ensure!(stale.is_none(), "a save over a stale version was accepted");
    let read = store.load_state("k").await?;
    ensure!(
        read == Some(crate::Versioned {
            value: b"two".to_vec(),
            version: 2
        }),
        "read back {read:?}"
    );
    ensure!(
        store.load_state("other").await?.is_none(),
        "keys are not apart"
    );
    // State that sums up calls (saved with the calls' durability) is the same state.
    let v3 = store
        .save_call_state("k", b"three".to_vec(), Some(2))
        .await?;
    ensure!(
        v3 == Some(3),
        "a call state's save over version 2 gave {v3:?}"
    );
    let stale = store.save_call_state("k", b"old".to_vec(), Some(2)).await?;
    ensure!(
        stale.is_none(),
        "a call state's save over a stale version was accepted"
    );
    let read = store.load_state("k").await?.map(|v| (v.value, v.version));
    ensure!(read == Some((b"three".to_vec(), 3)), "read back {read:?}");
    Ok(())
}

/// Writers that each read, add one and save (again on a lost race) all land: the
/// counter ends at the number of increments.
pub async fn concurrent_state_saves_lose_nothing<S: EventStore>(store: Arc<S>) -> Outcome {
    const WRITERS: u64 = 8;
    const EACH: u64 = 10;
    let mut set = JoinSet::new();
    for _ in 0..WRITERS {
        let store = Arc::clone(&store);
        set.spawn(async move {
            for _ in 0..EACH {
                loop {
                    let current = store.load_state("counter").await?;
                    let (n, version) = match &current {
                        Some(v) => (
                            String::from_utf8_lossy(&v.value)
                                .parse::<u64>()
                                .unwrap_or(0),
                            Some(v.version),
                        ),
                        None => (0, None),
                    };
                    let next = (n + 1).to_string().into_bytes();
                    if store.save_state("counter", next, version).await?.is_some() {
                        break;
                    }
                }
            }
            Ok::<_, StoreError>(())
        });
    }
    while let Some(joined) = set.join_next().await {
        joined.map_err(|e| ConformanceError::Check(format!("writer failed: {e}")))??;
    }
    let end = store.load_state("counter").await?;
    let n = end
        .as_ref()
        .map(|v| String::from_utf8_lossy(&v.value).into_owned());
    ensure!(
        n.as_deref() == Some(&(WRITERS * EACH).to_string()),
        "counter ended at {n:?}, not {}",
        WRITERS * EACH
    );
    Ok(())
}

// === task properties ===

/// Runs every task property, each on a store from `make` (which must be new and empty).
pub async fn run_all_tasks<S: TaskStore>(make: impl Fn() -> S) -> Outcome {
    task_create_then_read(&make()).await?;
    task_version_conflict_changes_nothing(&make()).await?;
    task_create_of_existing_id_conflicts(&make()).await?;
    task_wrong_row_version_is_refused(&make()).await?;
    task_duplicate_idempotency_key_changes_nothing(&make()).await?;
    concurrent_task_writes_all_land(Arc::new(make())).await?;
    same_task_concurrent_writers_one_wins(Arc::new(make())).await?;
    blobs_are_stored_once(&make()).await?;
    task_list_pagination_visits_each_once(&make()).await?;
    next_queued_is_fifo(&make()).await?;
    expired_leases_and_approvals_filter(&make()).await?;
    expired_deadlines_are_of_unfinished_tasks(&make()).await?;
    task_events_read_back_in_order(&make()).await?;
    prune_keeps_the_chain_verifiable(&make()).await?;
    prune_keeps_newest_checkpoints(&make()).await?;
    Ok(())
}

/// A task row with the given fields; no lease, no approval.
fn row(id: &str, agent: &str, state: &str, version: u64, created_at_ms: i64) -> TaskRow {
    TaskRow {
        id: id.to_owned(),
        agent: agent.to_owned(),
        state: state.to_owned(),
        version,
        snapshot: json!({"id": id, "state": state, "version": version}),
        created_at_ms,
        updated_at_ms: created_at_ms,
        lease_expires_at_ms: None,
        approval_expires_at_ms: None,
        deadline_at_ms: None,
    }
}

/// A write of `row` after `expected`, with one event per version step.
fn write(row: TaskRow, expected: Option<u64>) -> TaskWrite {
    let from = expected.unwrap_or(0);
    let events = (from..row.version)
        .map(|v| {
            let kind = if v == 0 {
                EventKind::TaskCreated
            } else {
                EventKind::StepRecorded
            };
            event(kind, Some(&row.id), json!({"v": v + 1}))
        })
        .collect();
    TaskWrite {
        row,
        expected_version: expected,
        events,
        blobs: Vec::new(),
        blob_refs: Vec::new(),
        idempotency: None,
    }
}

/// A create of a `queued` task of `agent` at `created_at_ms`.
fn create(id: &str, agent: &str, created_at_ms: i64) -> TaskWrite {
    write(row(id, agent, "queued", 1, created_at_ms), None)
}

async fn event_count<S: TaskStore>(store: &S) -> Result<usize, ConformanceError> {
    Ok(store.events(EventQuery::default()).await?.len())
}

/// A created task reads back exactly as written, and its events are returned.
pub async fn task_create_then_read<S: TaskStore>(store: &S) -> Outcome {
    let mut created = create("t1", "a", 1_000);
    created.row.lease_expires_at_ms = Some(5);
    created.row.approval_expires_at_ms = Some(6);
    created.row.snapshot = json!({"nested": {"b": [1, 2.5], "a": "é"}, "z": null});
    let events = store.write_task(created.clone()).await?;
    ensure!(
        events.len() == 1 && events[0].task_id.as_deref() == Some("t1"),
        "create returned {events:?}"
    );
    let read = store.task("t1").await?;
    ensure!(
        read.as_ref() == Some(&created.row),
        "read back {read:?}, wrote {:?}",
        created.row
    );
    ensure!(
        store.task("nobody").await?.is_none(),
        "unknown task has a row"
    );
    let verdict = store.verify().await?;
    ensure!(
        verdict == Verify::Intact { events: 1 },
        "verify: {verdict:?}"
    );
    Ok(())
}

/// A write with a stale version fails with `Conflict` and changes nothing.
pub async fn task_version_conflict_changes_nothing<S: TaskStore>(store: &S) -> Outcome {
    store.write_task(create("t", "a", 1)).await?;
    store
        .write_task(write(row("t", "a", "running", 2, 1), Some(1)))
        .await?;
    let before = store.task("t").await?;
    let events_before = event_count(store).await?;
    let mut stale = write(row("t", "a", "succeeded", 2, 1), Some(1));
    stale.blobs = vec![bytes::Bytes::from_static(b"stale")];
    stale.idempotency = Some(IdempotencyRecord {
        scope: "s".to_owned(),
        key: "k".to_owned(),
        status: 200,
        body: json!({}),
        request_hash: None,
    });
    match store.write_task(stale).await {
        Err(StoreError::Conflict {
            task,
            expected: Some(1),
            found: Some(2),
        }) if task == "t" => {}
        other => {
            return Err(ConformanceError::Check(format!(
                "stale write answered {other:?}"
            )));
        }
    }
    ensure!(
        store.task("t").await? == before,
        "row changed by a conflict"
    );
    ensure!(
        event_count(store).await? == events_before,
        "events appended by a conflict"
    );
    ensure!(
        store.idempotent("s", "k").await?.is_none(),
        "idempotency record kept by a conflict"
    );
    ensure!(store.stats().await?.blobs == 0, "blob kept by a conflict");
    Ok(())
}

/// Creating a task whose id exists fails with `Conflict` (found the version).
pub async fn task_create_of_existing_id_conflicts<S: TaskStore>(store: &S) -> Outcome {
    store.write_task(create("t", "a", 1)).await?;
    let again = store.write_task(create("t", "b", 2)).await;
    ensure!(
        matches!(
            &again,
            Err(StoreError::Conflict {
                expected: None,
                found: Some(1),
                ..
            })
        ),
        "second create answered {again:?}"
    );
    let update_missing = store
        .write_task(write(row("missing", "a", "running", 2, 1), Some(1)))
        .await;
    ensure!(
        matches!(
            &update_missing,
            Err(StoreError::Conflict {
                expected: Some(1),
                found: None,
                ..
            })
        ),
        "update of a missing task answered {update_missing:?}"
    );
    let row = store.task("t").await?;
    ensure!(
        row.as_ref().is_some_and(|r| r.agent == "a"),
        "row overwritten: {row:?}"
    );
    ensure!(event_count(store).await? == 1, "events appended");
    Ok(())
}

/// A row version that is not expected + events is refused; a snapshot-only
/// write (no events) keeps the version.
pub async fn task_wrong_row_version_is_refused<S: TaskStore>(store: &S) -> Outcome {
    store.write_task(create("t", "a", 1)).await?;
    let mut wrong = write(row("t", "a", "running", 2, 1), Some(1));
    wrong.row.version = 5;
    let answer = store.write_task(wrong).await;
    ensure!(
        matches!(&answer, Err(StoreError::InvalidWrite { .. })),
        "wrong version answered {answer:?}"
    );
    // A lease renewal: no events, same version.
    let mut renew = write(row("t", "a", "queued", 1, 1), Some(1));
    renew.row.lease_expires_at_ms = Some(99);
    renew.row.updated_at_ms = 50;
    let events = store.write_task(renew).await?;
    ensure!(events.is_empty(), "renewal appended {events:?}");
    let read = store.task("t").await?;
    ensure!(
        read.as_ref()
            .is_some_and(|r| r.version == 1 && r.lease_expires_at_ms == Some(99)),
        "renewal read back {read:?}"
    );
    Ok(())
}

/// A repeated idempotency key fails with `DuplicateKey`, applies nothing, and
/// the first record stays, its request hash with it (or none, when it had none).
pub async fn task_duplicate_idempotency_key_changes_nothing<S: TaskStore>(store: &S) -> Outcome {
    let record = |status: u16, body| IdempotencyRecord {
        scope: "create".to_owned(),
        key: "key-1".to_owned(),
        status,
        body,
        request_hash: Some(format!("hash-{status}")),
    };
    let mut first = create("t1", "a", 1);
    first.idempotency = Some(record(201, json!({"id": "t1"})));
    store.write_task(first).await?;
    let events_before = event_count(store).await?;

    let mut repeat = create("t2", "a", 2);
    repeat.blobs = vec![bytes::Bytes::from_static(b"x")];
    repeat.idempotency = Some(record(202, json!({"id": "t2"})));
    let answer = store.write_task(repeat).await;
    ensure!(
        matches!(&answer, Err(StoreError::DuplicateKey { scope, key }) if scope == "create" && key == "key-1"),
        "repeat answered {answer:?}"
    );
    ensure!(store.task("t2").await?.is_none(), "repeat created its task");
    ensure!(
        event_count(store).await? == events_before,
        "repeat appended events"
    );
    ensure!(store.stats().await?.blobs == 0, "repeat stored its blob");
    let kept = store.idempotent("create", "key-1").await?;
    ensure!(
        kept == Some(record(201, json!({"id": "t1"}))),
        "idempotent returned {kept:?}"
    );
    ensure!(
        store.idempotent("create", "other").await?.is_none(),
        "unknown key has a record"
    );
    let mut unhashed = create("t3", "a", 3);
    let without = IdempotencyRecord {
        key: "key-2".to_owned(),
        request_hash: None,
        ..record(201, json!({"id": "t3"}))
    };
    unhashed.idempotency = Some(without.clone());
    store.write_task(unhashed).await?;
    let kept = store.idempotent("create", "key-2").await?;
    ensure!(kept == Some(without), "idempotent returned {kept:?}");
    Ok(())
}

/// 50 tasks written concurrently, each a create plus 10 updates: every write
/// lands, versions are right, each task's events are in order, the chain is intact.
pub async fn concurrent_task_writes_all_land<S: TaskStore>(store: Arc<S>) -> Outcome {
    const TASKS: u64 = 50;
    const UPDATES: u64 = 10;
    let mut set = JoinSet::new();
    for t in 0..TASKS {
        let store = Arc::clone(&store);
        set.spawn(async move {
            let id = format!("task-{t}");
            let created = i64::try_from(t).unwrap_or(0);
            store.write_task(create(&id, "a", created)).await?;
            for v in 1..=UPDATES {
                store
                    .write_task(write(row(&id, "a", "running", v + 1, created), Some(v)))
                    .await?;
            }
            Ok::<_, StoreError>(())
        });
    }
    while let Some(joined) = set.join_next().await {
        joined.map_err(|e| ConformanceError::Check(format!("writer task failed: {e}")))??;
    }
    for t in 0..TASKS {
        let id = format!("task-{t}");
        let row = store.task(&id).await?;
        ensure!(
            row.as_ref().is_some_and(|r| r.version == UPDATES + 1),
            "{id}: row {row:?}"
        );
        let events = store
            .events(EventQuery {
                task_id: Some(id.clone()),
                ..EventQuery::default()
            })
            .await?;
        let order: Vec<u64> = events
            .iter()
            .map(|e| e.data["v"].as_u64().unwrap_or(0))
            .collect();
        ensure!(
            order == (1..=UPDATES + 1).collect::<Vec<_>>(),
            "{id}: events {order:?}"
        );
    }
    let total = TASKS * (UPDATES + 1);
    let verdict = store.verify().await?;
    ensure!(
        verdict == Verify::Intact { events: total },
        "verify: {verdict:?}"
    );
    Ok(())
}

/// Two writers racing on one task with the same expected version: exactly one wins.
pub async fn same_task_concurrent_writers_one_wins<S: TaskStore>(store: Arc<S>) -> Outcome {
    store.write_task(create("t", "a", 1)).await?;
    for round in 1..=5u64 {
        let mut set = JoinSet::new();
        for w in 0..2 {
            let store = Arc::clone(&store);
            set.spawn(async move {
                let mut next = write(row("t", "a", "running", round + 1, 1), Some(round));
                next.row.snapshot = json!({"writer": w});
                store.write_task(next).await
            });
        }
        let (mut wins, mut conflicts) = (0, 0);
        while let Some(joined) = set.join_next().await {
            match joined.map_err(|e| ConformanceError::Check(format!("writer failed: {e}")))? {
                Ok(_) => wins += 1,
                Err(StoreError::Conflict { .. }) => conflicts += 1,
                Err(other) => return Err(other.into()),
            }
        }
        ensure!(
            (wins, conflicts) == (1, 1),
            "round {round}: {wins} wins, {conflicts} conflicts"
        );
    }
    let row = store.task("t").await?;
    ensure!(row.as_ref().is_some_and(|r| r.version == 6), "row {row:?}");
    ensure!(event_count(&*store).await? == 6, "events appended twice");
    Ok(())
}

/// The same bytes written twice are stored once and read back by their hash.
pub async fn blobs_are_stored_once<S: TaskStore>(store: &S) -> Outcome {
    let payload = bytes::Bytes::from_static(b"a conversation prefix repeated in every call");
    let mut first = create("t1", "a", 1);
    first.blobs = vec![payload.clone(), payload.clone()];
    store.write_task(first).await?;
    let mut second = create("t2", "a", 2);
    second.blobs = vec![payload.clone()];
    store.write_task(second).await?;
    let stats = store.stats().await?;
    ensure!(
        stats.blobs == 1 && stats.blob_bytes == payload.len() as u64,
        "stats after two writes of one blob: {stats:?}"
    );
    ensure!(
        stats.tasks == 2 && stats.events == 2 && stats.db_bytes > 0,
        "stats: {stats:?}"
    );
    let read = store.blob(&blob_hash(&payload)).await?;
    ensure!(read == Some(payload), "blob read back as {read:?}");
    ensure!(
        store.blob(&blob_hash(b"never stored")).await?.is_none(),
        "unknown blob found"
    );
    Ok(())
}

/// Paging through `tasks` (with and without filters) visits every matching
/// task exactly once, in (`created_at_ms`, `id`) order or its reverse; a bad cursor, or one
/// of the other order, is refused.
pub async fn task_list_pagination_visits_each_once<S: TaskStore>(store: &S) -> Outcome {
    // Ties on created_at_ms, so the order must fall back to the id.
    for i in 0..23i64 {
        let agent = if i % 3 == 0 { "b" } else { "a" };
        store
            .write_task(create(&format!("t{i:02}"), agent, i / 4))
            .await?;
    }
    for newest_first in [false, true] {
        for (agent, limit, want) in [(None, 5, 23), (Some("a"), 4, 15), (Some("b"), 0, 8)] {
            let mut seen = Vec::new();
            let mut cursor = None;
            let mut pages = 0;
            loop {
                let page = store
                    .tasks(TaskQuery {
                        state: Some("queued".to_owned()),
                        agent: agent.map(str::to_owned),
                        limit,
                        cursor: cursor.take(),
                        newest_first,
                    })
                    .await?;
                pages += 1;
                ensure!(pages < 100, "pagination does not end");
                seen.extend(page.tasks.iter().map(|t| (t.created_at_ms, t.id.clone())));
                match page.next {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
            let mut sorted = seen.clone();
            sorted.sort();
            sorted.dedup();
            if newest_first {
                sorted.reverse();
            }
            ensure!(
                seen == sorted && seen.len() == want,
                "agent {agent:?} limit {limit} newest first {newest_first}: visited {seen:?}"
            );
        }
    }
    let first = |newest_first| TaskQuery {
        limit: 3,
        newest_first,
        ..TaskQuery::default()
    };
    let newest = store.tasks(first(true)).await?;
    ensure!(
        newest.tasks.first().map(|t| t.id.as_str()) == Some("t22"),
        "newest first starts at {:?}",
        newest.tasks.first().map(|t| &t.id)
    );
    for newest_first in [false, true] {
        let page = store.tasks(first(newest_first)).await?;
        let other_order = store
            .tasks(TaskQuery {
                cursor: page.next,
                ..first(!newest_first)
            })
            .await;
        ensure!(
            matches!(other_order, Err(StoreError::InvalidCursor)),
            "a cursor of the other order (newest first {newest_first}) answered {other_order:?}"
        );
    }
    let none = store
        .tasks(TaskQuery {
            state: Some("running".to_owned()),
            ..TaskQuery::default()
        })
        .await?;
    ensure!(
        none.tasks.is_empty() && none.next.is_none(),
        "state filter: {none:?}"
    );
    let bad = store
        .tasks(TaskQuery {
            cursor: Some("not a cursor".to_owned()),
            ..TaskQuery::default()
        })
        .await;
    ensure!(
        matches!(bad, Err(StoreError::InvalidCursor)),
        "bad cursor answered {bad:?}"
    );
    let counts = store.count_by_state().await?;
    ensure!(
        counts == [("queued".to_owned(), 23)],
        "count_by_state: {counts:?}"
    );
    Ok(())
}

/// `next_queued` returns an agent's queued tasks oldest first, nothing else.
pub async fn next_queued_is_fifo<S: TaskStore>(store: &S) -> Outcome {
    for (id, agent, created) in [
        ("c", "a", 30),
        ("a", "a", 10),
        ("x", "b", 5),
        ("b", "a", 20),
    ] {
        store.write_task(create(id, agent, created)).await?;
    }
    store
        .write_task(write(row("a", "a", "running", 2, 10), Some(1)))
        .await?;
    let ids = |rows: Vec<TaskRow>| rows.into_iter().map(|r| r.id).collect::<Vec<_>>();
    let got = ids(store.next_queued("a", 10).await?);
    ensure!(got == ["b", "c"], "next_queued(a): {got:?}");
    let got = ids(store.next_queued("a", 1).await?);
    ensure!(got == ["b"], "next_queued(a, 1): {got:?}");
    let got = ids(store.next_queued("nobody", 10).await?);
    ensure!(got.is_empty(), "next_queued(nobody): {got:?}");
    Ok(())
}

/// `expired_leases` and `expired_approvals` return only tasks in the right
/// state whose deadline is at or before `now`, soonest first.
pub async fn expired_leases_and_approvals_filter<S: TaskStore>(store: &S) -> Outcome {
    let cases: [(&str, &str, Option<i64>, Option<i64>); 7] = [
        ("run-early", "running", Some(100), None),
        ("run-now", "running", Some(200), None),
        ("run-later", "running", Some(300), None),
        ("queued-lease", "queued", Some(50), None),
        ("wait-early", "awaiting_human", None, Some(150)),
        ("wait-later", "awaiting_human", None, Some(250)),
        ("dead-approval", "dead", None, Some(10)),
    ];
    for (i, (id, state, lease, approval)) in cases.into_iter().enumerate() {
        let mut created = write(row(id, "a", state, 1, i64::try_from(i).unwrap_or(0)), None);
        created.row.lease_expires_at_ms = lease;
        created.row.approval_expires_at_ms = approval;
        store.write_task(created).await?;
    }
    let ids = |rows: Vec<TaskRow>| rows.into_iter().map(|r| r.id).collect::<Vec<_>>();
    let got = ids(store.expired_leases(200, 10).await?);
    ensure!(
        got == ["run-early", "run-now"],
        "expired_leases(200): {got:?}"
    );
    let got = ids(store.expired_leases(1000, 1).await?);
    ensure!(got == ["run-early"], "expired_leases(1000, 1): {got:?}");
    let got = ids(store.expired_approvals(200, 10).await?);
    ensure!(got == ["wait-early"], "expired_approvals(200): {got:?}");
    let got = ids(store.expired_approvals(99, 10).await?);
    ensure!(got.is_empty(), "expired_approvals(99): {got:?}");
    Ok(())
}

/// `expired_deadlines` returns only queued, running and awaiting tasks whose deadline is
/// at or before `now`, soonest first; a write that clears the deadline takes the task out.
pub async fn expired_deadlines_are_of_unfinished_tasks<S: TaskStore>(store: &S) -> Outcome {
    let cases: [(&str, &str, Option<i64>); 8] = [
        ("queued-early", "queued", Some(100)),
        ("running-now", "running", Some(200)),
        ("waiting", "awaiting_human", Some(150)),
        ("queued-later", "queued", Some(300)),
        ("queued-none", "queued", None),
        ("succeeded", "succeeded", Some(10)),
        ("dead", "dead", Some(10)),
        ("cancelled", "cancelled", Some(10)),
    ];
    for (i, (id, state, deadline)) in cases.into_iter().enumerate() {
        let mut created = write(row(id, "a", state, 1, i64::try_from(i).unwrap_or(0)), None);
        created.row.deadline_at_ms = deadline;
        store.write_task(created).await?;
    }
    let ids = |rows: Vec<TaskRow>| rows.into_iter().map(|r| r.id).collect::<Vec<_>>();
    let got = store.expired_deadlines(200, 10).await?;
    ensure!(
        got.iter()
            .all(|r| r.deadline_at_ms.is_some_and(|d| d <= 200)),
        "rows read back without their deadline: {got:?}"
    );
    let got = ids(got);
    ensure!(
        got == ["queued-early", "waiting", "running-now"],
        "expired_deadlines(200): {got:?}"
    );
    let got = ids(store.expired_deadlines(1000, 2).await?);
    ensure!(
        got == ["queued-early", "waiting"],
        "expired_deadlines(1000, 2): {got:?}"
    );
    let got = ids(store.expired_deadlines(99, 10).await?);
    ensure!(got.is_empty(), "expired_deadlines(99): {got:?}");
    // The timer ended "queued-early": its row no longer carries a deadline.
    store
        .write_task(write(row("queued-early", "a", "dead", 2, 0), Some(1)))
        .await?;
    let got = ids(store.expired_deadlines(200, 10).await?);
    ensure!(
        got == ["waiting", "running-now"],
        "expired_deadlines(200) after the write: {got:?}"
    );
    Ok(())
}

/// A task's events (`EventQuery::task_id`) are its writes' events in order,
/// interleaved with other appends in the log.
pub async fn task_events_read_back_in_order<S: TaskStore>(store: &S) -> Outcome {
    let mut appended = store.write_task(create("t", "a", 1)).await?;
    store
        .append(vec![event(EventKind::LlmCall, None, json!({}))])
        .await?;
    store.write_task(create("other", "a", 2)).await?;
    appended.extend(
        store
            .write_task(write(row("t", "a", "running", 3, 1), Some(1)))
            .await?,
    );
    let read = store
        .events(EventQuery {
            task_id: Some("t".to_owned()),
            ..EventQuery::default()
        })
        .await?;
    ensure!(
        read == appended,
        "task events read {read:?}, written {appended:?}"
    );
    ensure!(
        seqs(&read) == [1, 4, 5],
        "task event seqs {:?}",
        seqs(&read)
    );
    Ok(())
}

/// Pruning finished tasks deletes their rows and blobs, keeps `dead` and
/// unfinished ones, blanks their events' data, and leaves the chain intact.
pub async fn prune_keeps_the_chain_verifiable<S: TaskStore>(store: &S) -> Outcome {
    let blob = |s: &'static str| bytes::Bytes::from_static(s.as_bytes());
    let cases = [
        ("old-ok", "succeeded", 100, "p-ok"),
        ("old-cancel", "cancelled", 100, "p-cancel"),
        ("old-dead", "dead", 100, "p-dead"),
        ("old-running", "running", 100, "p-running"),
        ("new-ok", "succeeded", 900, "p-new"),
    ];
    for (id, state, at, payload) in cases {
        let mut created = write(row(id, "a", state, 2, at), None);
        created.blobs = vec![blob(payload), blob("shared")];
        store.write_task(created).await?;
    }
    let report = store
        .prune(PrunePolicy {
            finished_before_ms: Some(500),
            keep_checkpoints: None,
        })
        .await?;
    ensure!(
        report.tasks == 2 && report.events == 4 && report.blobs == 2,
        "report {report:?}"
    );
    for (id, _, _, payload) in cases {
        let kept = store.task(id).await?.is_some();
        let pruned = id == "old-ok" || id == "old-cancel";
        ensure!(kept != pruned, "{id}: row kept = {kept}");
        let blob_kept = store.blob(&blob_hash(payload.as_bytes())).await?.is_some();
        ensure!(blob_kept != pruned, "{id}: blob kept = {blob_kept}");
        let events = store
            .events(EventQuery {
                task_id: Some(id.to_owned()),
                ..EventQuery::default()
            })
            .await?;
        ensure!(
            events.len() == 2 && events.iter().all(|e| e.pruned == pruned),
            "{id}: events {events:?}"
        );
        ensure!(
            events
                .iter()
                .all(|e| e.hash == e.compute_hash() && e.data_matches_hash()),
            "{id}: events do not match their hashes"
        );
    }
    ensure!(
        store.blob(&blob_hash(b"shared")).await?.is_some(),
        "blob still referenced by kept tasks was deleted"
    );
    let verdict = store.verify().await?;
    ensure!(
        verdict == Verify::Intact { events: 10 },
        "verify after prune: {verdict:?}"
    );
    let again = store.prune(PrunePolicy::default()).await?;
    ensure!(
        again == Default::default(),
        "second prune removed {again:?}"
    );
    Ok(())
}

/// `keep_checkpoints` keeps the newest N checkpoints of every task and
/// deletes the blobs only older checkpoints referenced.
pub async fn prune_keeps_newest_checkpoints<S: TaskStore>(store: &S) -> Outcome {
    let checkpoint = |task: &str, n: u64| bytes::Bytes::from(format!("{task} checkpoint {n}"));
    for task in ["t1", "t2"] {
        store.write_task(create(task, "a", 1)).await?;
        for n in 1..=4u64 {
            let body = checkpoint(task, n);
            let mut next = write(row(task, "a", "running", n + 1, 1), Some(n));
            next.blob_refs = vec![BlobRef {
                hash: blob_hash(&body),
                kind: "checkpoint".to_owned(),
                seq: n,
            }];
            next.blobs = vec![body];
            store.write_task(next).await?;
        }
    }
    // The same bytes as t1's oldest checkpoint, also held by t2 as a payload.
    let mut shared = write(row("t2", "a", "running", 6, 1), Some(5));
    shared.blobs = vec![checkpoint("t1", 1)];
    store.write_task(shared).await?;

    let report = store
        .prune(PrunePolicy {
            finished_before_ms: None,
            keep_checkpoints: Some(2),
        })
        .await?;
    ensure!(
        report.checkpoints == 4 && report.blobs == 3 && report.tasks == 0,
        "report {report:?}"
    );
    for task in ["t1", "t2"] {
        for n in 1..=4u64 {
            let kept = store
                .blob(&blob_hash(&checkpoint(task, n)))
                .await?
                .is_some();
            let want = n >= 3 || (task == "t1" && n == 1);
            ensure!(kept == want, "{task} checkpoint {n}: kept = {kept}");
        }
    }
    let refused = store
        .write_task(TaskWrite {
            blob_refs: vec![BlobRef {
                hash: blob_hash(b"missing"),
                kind: "checkpoint".to_owned(),
                seq: 9,
            }],
            ..write(row("t1", "a", "running", 6, 1), Some(5))
        })
        .await;
    ensure!(
        matches!(refused, Err(StoreError::InvalidWrite { .. })),
        "ref to a missing blob answered {refused:?}"
    );
    let verdict = store.verify().await?;
    ensure!(
        matches!(verdict, Verify::Intact { .. }),
        "verify: {verdict:?}"
    );
    Ok(())
}
