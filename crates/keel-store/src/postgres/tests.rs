//! The PostgreSQL store against a real server (`testing::PgServer`): the conformance
//! suite unchanged, several nodes on one database, migrations racing, a server that is
//! away or restarts, a schema from the future.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use keel_core::{EventKind, NewEvent};

use super::*;
use crate::conformance;
use crate::testing::PgServer;

fn server() -> PgServer {
    PgServer::start().unwrap_or_else(|e| panic!("cannot start PostgreSQL for the test: {e}"))
}

/// A new database on `server` and a store on it.
async fn fresh(server: &PgServer, name: &str) -> (String, PgStore) {
    fresh_with(server, name, Durability::Fsync.into()).await
}

async fn fresh_with(
    server: &PgServer,
    name: &str,
    options: crate::WriteOptions,
) -> (String, PgStore) {
    let url = server.create_database(name).await.unwrap();
    let store = PgStore::open(&url, options).await.unwrap();
    (url, store)
}

/// A store on a new database, made synchronously (the suite's `make` is a plain `Fn`).
fn maker<'s>(server: &'s PgServer, prefix: &'static str) -> impl Fn() -> PgStore + 's {
    maker_with(server, prefix, Durability::Fsync.into())
}

fn maker_with<'s>(
    server: &'s PgServer,
    prefix: &'static str,
    options: crate::WriteOptions,
) -> impl Fn() -> PgStore + 's {
    let counter = std::sync::atomic::AtomicU32::new(0);
    move || {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async {
                fresh_with(server, &format!("{prefix}_{n}"), options.clone())
                    .await
                    .1
            })
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conformance_suite_passes_on_postgres() {
    let server = server();
    conformance::run_all(maker(&server, "events"))
        .await
        .unwrap();
    conformance::run_all_tasks(maker(&server, "tasks"))
        .await
        .unwrap();
}

/// The event suite again with a writer that waits 5 ms whenever it is busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_suite_holds_with_a_commit_delay() {
    let server = server();
    let options = crate::WriteOptions {
        durability: Durability::Relaxed,
        call_durability: Durability::Relaxed,
        commit_delay: Some(Duration::from_millis(5)),
        upcoming: crate::Upcoming::default(),
    };
    conformance::run_all(maker_with(&server, "delayed", options))
        .await
        .unwrap();
}

/// The event suite with keel's default durabilities: model-call records committed with
/// `synchronous_commit = off` in their own transactions, everything else with `on`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_suite_holds_with_relaxed_call_records() {
    let server = server();
    let options = crate::WriteOptions {
        durability: Durability::Fsync,
        call_durability: Durability::Relaxed,
        commit_delay: None,
        upcoming: crate::Upcoming::default(),
    };
    conformance::run_all(maker_with(&server, "calls", options))
        .await
        .unwrap();
}

fn event(task: &str, n: u64) -> NewEvent {
    NewEvent::new(EventKind::LlmCall, Some(task.to_owned()), json!({"n": n}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_append_to_one_gapless_chain_and_one_claim_wins() {
    let server = server();
    let url = server.create_database("shared").await.unwrap();
    // Three nodes open together: the migration runs once, the others wait for it.
    let (a, b, c) = tokio::join!(
        PgStore::open(&url, Durability::Fsync),
        PgStore::open(&url, Durability::Relaxed),
        PgStore::open(&url, Durability::Fsync),
    );
    let nodes = [
        Arc::new(a.unwrap()),
        Arc::new(b.unwrap()),
        Arc::new(c.unwrap()),
    ];

    let mut writers = tokio::task::JoinSet::new();
    for (i, node) in nodes.iter().enumerate() {
        for w in 0..8 {
            let node = Arc::clone(node);
            writers.spawn(async move {
                for n in 0..25 {
                    let task = format!("node{i}-writer{w}");
                    node.append(vec![event(&task, n), event(&task, n + 1000)])
                        .await
                        .unwrap();
                }
            });
        }
    }
    while let Some(done) = writers.join_next().await {
        done.unwrap();
    }
    // Every node reads the same log: 3 nodes x 8 writers x 25 appends x 2 events.
    for node in &nodes {
        let all = node.events(EventQuery::default()).await.unwrap();
        assert_eq!(all.len(), 1200);
        let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=1200).collect::<Vec<_>>(), "one gapless seq");
        // One append's events stay consecutive whichever node wrote them.
        for pair in all.iter().filter(|e| e.data["n"].as_u64() < Some(1000)) {
            let next = &all[pair.seq as usize];
            assert_eq!(next.task_id, pair.task_id);
            assert_eq!(
                next.data["n"].as_u64(),
                pair.data["n"].as_u64().map(|n| n + 1000)
            );
        }
        assert_eq!(
            node.verify().await.unwrap(),
            Verify::Intact { events: 1200 }
        );
    }

    // A task created on one node, claimed from all three at once with the same
    // expected version: exactly one claim lands.
    let row = |version: u64, state: &str| TaskRow {
        id: "t-claim".to_owned(),
        agent: "a".to_owned(),
        state: state.to_owned(),
        version,
        snapshot: json!({"state": state}),
        created_at_ms: 1,
        updated_at_ms: 1,
        lease_expires_at_ms: None,
        approval_expires_at_ms: None,
        deadline_at_ms: None,
    };
    nodes[0]
        .write_task(TaskWrite {
            row: row(1, "queued"),
            expected_version: None,
            events: vec![event("t-claim", 0)],
            blobs: Vec::new(),
            blob_refs: Vec::new(),
            idempotency: None,
        })
        .await
        .unwrap();
    let claims = nodes.iter().map(|node| {
        let node = Arc::clone(node);
        let write = TaskWrite {
            row: row(2, "running"),
            expected_version: Some(1),
            events: vec![event("t-claim", 1)],
            blobs: Vec::new(),
            blob_refs: Vec::new(),
            idempotency: None,
        };
        async move { node.write_task(write).await }
    });
    let results = futures::future::join_all(claims).await;
    let won = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(won, 1, "{results:?}");
    assert!(
        results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| matches!(e, StoreError::Conflict { found: Some(2), .. })),
        "{results:?}"
    );
    let stored = nodes[2].task("t-claim").await.unwrap().unwrap();
    assert_eq!((stored.version, stored.state.as_str()), (2, "running"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_a_clear_error_without_the_password() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://keel:hunter2@127.0.0.1:{port}/keel");
    let err = PgStore::open(&url, Durability::Fsync).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "cannot reach the PostgreSQL store postgres://keel@127.0.0.1:{port}/keel:"
        )),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
    let err = PgStore::open("postgres://keel@[::1", Durability::Fsync)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("not a valid PostgreSQL URL"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_from_a_newer_keel_is_refused() {
    let server = server();
    let (url, store) = fresh(&server, "future").await;
    drop(store);
    let (client, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    let driver = tokio::runtime::Handle::current().spawn(connection);
    client
        .batch_execute("UPDATE keel_schema SET version = 99")
        .await
        .unwrap();
    drop(client);
    let _ = driver.await;
    let err = PgStore::open(&url, Durability::Fsync).await.unwrap_err();
    let known = u32::try_from(schema::MIGRATIONS.len()).unwrap();
    assert!(
        matches!(
            err,
            StoreError::PostgresSchemaTooNew {
                found: 99,
                known: k,
                ..
            } if k == known
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains(&format!("newer than the {known} this keel knows")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_2_copies_the_deadline_of_unfinished_tasks_only() {
    let server = server();
    let url = server.create_database("deadlines").await.unwrap();
    let (mut client, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    let driver = tokio::runtime::Handle::current().spawn(connection);
    schema::migrate(&mut client, "test", &schema::MIGRATIONS[..1])
        .await
        .unwrap();
    for (id, state, deadline) in [
        ("queued", "queued", "123"),
        ("running", "running", "456"),
        ("waiting", "awaiting_human", "789"),
        ("none", "queued", "null"),
        ("done", "succeeded", "5"),
        ("dead", "dead", "6"),
        ("nul", "queued", "321"),
    ] {
        // A client's input may hold a NUL, which serde_json writes as an escape that
        // PostgreSQL's jsonb refuses: the migration must not read snapshots through it.
        let snapshot = format!(r#"{{"input":{{"text":"a\u0000b"}},"deadline_ms":{deadline}}}"#);
        client
            .execute(
                "INSERT INTO tasks (id, agent, state, version, snapshot, created_at_ms, updated_at_ms)
                 VALUES ($1, 'a', $2, 1, $3, 0, 0)",
                &[&id, &state, &snapshot],
            )
            .await
            .unwrap();
    }
    drop(client);
    let _ = driver.await;
    let store = PgStore::open(&url, Durability::Fsync).await.unwrap();
    let mut deadlines = Vec::new();
    for id in [
        "dead", "done", "none", "nul", "queued", "running", "waiting",
    ] {
        let row = store.task(id).await.unwrap().unwrap();
        deadlines.push((id, row.deadline_at_ms));
    }
    assert_eq!(
        deadlines,
        [
            ("dead", None),
            ("done", None),
            ("none", None),
            ("nul", Some(321)),
            ("queued", Some(123)),
            ("running", Some(456)),
            ("waiting", Some(789)),
        ]
    );
    let due: Vec<String> = store
        .expired_deadlines(500, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(due, ["queued", "nul", "running"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_reconnects_after_the_server_restarts_and_loses_nothing_acknowledged() {
    let server = server();
    let (_url, store) = fresh(&server, "restart").await;
    let mut acknowledged = Vec::new();
    for n in 0..20 {
        acknowledged.extend(store.append(vec![event("before", n)]).await.unwrap());
    }
    server.stop().unwrap();
    // While the server is away, writes and reads fail promptly with a clear error.
    let started = std::time::Instant::now();
    let err = store.append(vec![event("during", 0)]).await.unwrap_err();
    assert!(matches!(err, StoreError::Unreachable { .. }), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    assert!(store.ping().await.is_err());
    server.restart().unwrap();
    // Back within the backoff (at most 5 s between attempts).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let after = loop {
        match store.append(vec![event("after", 0)]).await {
            Ok(events) => break events,
            Err(e) if std::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "not back yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the store did not reconnect: {e}"),
        }
    };
    // Reads come back too (the pool replaces its broken connections).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let all = loop {
        match store.events(EventQuery::default()).await {
            Ok(all) => break all,
            Err(e) if std::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "reads not back yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("reads did not come back: {e}"),
        }
    };
    for event in &acknowledged {
        assert!(all.contains(event), "acknowledged event {} lost", event.seq);
    }
    assert_eq!(after[0].seq, all.last().unwrap().seq);
    assert_eq!(
        store.verify().await.unwrap(),
        Verify::Intact {
            events: all.len() as u64
        }
    );
}

/// A node whose commits fail (a full disk, a standby after failover; here a trigger that
/// refuses every insert and update) is not ready while reads still work, until a write of
/// its own commits again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_commits_fail_is_not_ready_until_a_write_commits() {
    let server = server();
    let (url, store) = fresh(&server, "failing").await;
    store.append(vec![event("t", 0)]).await.unwrap();
    store.ping().await.unwrap();
    let (client, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    let driver = tokio::runtime::Handle::current().spawn(connection);
    client
        .batch_execute(
            "CREATE FUNCTION keel_test_full() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN RAISE EXCEPTION 'could not extend file: No space left on device'; END $$;
             CREATE TRIGGER full_events BEFORE INSERT ON events
               FOR EACH ROW EXECUTE FUNCTION keel_test_full();
             CREATE TRIGGER full_state BEFORE INSERT OR UPDATE ON state
               FOR EACH ROW EXECUTE FUNCTION keel_test_full();",
        )
        .await
        .unwrap();
    let err = store.append(vec![event("t", 1)]).await.unwrap_err();
    assert!(err.to_string().contains("No space left"), "{err}");
    // Reads work, but every probe until a write commits says the node is not ready.
    assert_eq!(store.events(EventQuery::default()).await.unwrap().len(), 1);
    assert!(store.ping().await.is_err());
    assert!(store.ping().await.is_err());
    client
        .batch_execute("DROP TRIGGER full_events ON events; DROP TRIGGER full_state ON state;")
        .await
        .unwrap();
    store.ping().await.unwrap();
    store.append(vec![event("t", 1)]).await.unwrap();
    drop(client);
    let _ = driver.await;
}
