//! The conformance suite: properties every [`EventStore`] must have, generic
//! over the implementation. Enabled in this crate's tests and by the
//! `conformance` feature for other implementations' tests.
//!
//! Each property takes a fresh, empty store and returns `Err` naming what did
//! not hold (no panics, so the suite is ordinary library code); a test calls
//! `.unwrap()` on it. [`run_all`] runs every property, each on its own store.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::json;
use tokio::task::JoinSet;

use keel_core::{EventKind, NewEvent};

use crate::{Event, EventQuery, EventStore, GENESIS_HASH, StoreError, Verify};

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

/// Runs every property, each on a store from `make` (which must be new and empty).
pub async fn run_all<S: EventStore>(make: impl Fn() -> S) -> Outcome {
    append_assigns_consecutive_seqs(&make()).await?;
    append_links_the_chain(&make()).await?;
    appended_events_read_back_unchanged(&make()).await?;
    events_by_task_in_order(&make()).await?;
    filters_kind_after_seq_and_limit(&make()).await?;
    concurrent_appends_form_one_chain(Arc::new(make())).await?;
    verify_reports_intact(&make()).await?;
    ping_succeeds(&make()).await?;
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
    let cases: [(EventQuery, &[u64]); 8] = [
        (q(Some("llm_call"), None, None, None), &[1, 3, 5, 7, 9]),
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
        let order: Vec<(u64, u64)> = got
            .iter()
            .map(|e| {
                (
                    e.data["c"].as_u64().unwrap_or(99),
                    e.data["half"].as_u64().unwrap_or(99),
                )
            })
            .collect();
        let want: Vec<(u64, u64)> = (0..CALLS as u64).flat_map(|c| [(c, 0), (c, 1)]).collect();
        ensure!(order == want, "{task}: events out of order: {order:?}");
    }
    let verdict = store.verify().await?;
    ensure!(
        verdict == Verify::Intact { events: total },
        "verify after concurrent appends: {verdict:?}"
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
