//! The PostgreSQL benchmark: keel's log and task queue on one PostgreSQL server shared by
//! 1 and by 3 nodes.
//!
//! It starts a throwaway PostgreSQL server (`keel_store::testing::PgServer`, loopback, with
//! `fsync=on`: commits are paid for as in production) and measures, for 1 and 3 nodes, each
//! on a database of its own:
//!
//! 1. **Event appends**: [`APPENDERS`] tasks each looping `append(one llm_call-like event)`
//!    for `--duration`, spread round-robin over the nodes. A node here is a `PgStore` (its own
//!    writer connection with group commit, and its own read pool), which is what a `keel
//!    serve` process holds; they run in this process so that the figure is the database's.
//! 2. **Claim and complete**: `nodes` real `keel serve` processes on the database;
//!    [`TASKS`] tasks created through them, then [`WORKERS`] workers, each bound to one node,
//!    loop `POST /v1/tasks/claim` + `POST /v1/tasks/{id}/complete` until the queue is empty.
//!    Every task must be completed exactly once (the run fails otherwise).
//!
//! The load, the nodes and PostgreSQL share this machine's cores, so 3 nodes measure how the
//! design behaves with more writers on one database, not 3 machines' worth of capacity.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use hdrhistogram::Histogram;
use keel_core::{EventKind, NewEvent};
use keel_store::testing::PgServer;
use keel_store::{Durability, EventStore as _, PgStore};
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::bench_cmd::BenchResult;
use crate::gateway_overhead::{KeelProcess, build_keel};

/// Concurrent appenders of the append phase.
const APPENDERS: usize = 64;

/// Tasks of the claim-and-complete phase.
const TASKS: usize = 2000;

/// Workers of the claim-and-complete phase.
const WORKERS: usize = 32;

/// The node counts measured.
const NODES: [usize; 2] = [1, 3];

/// Builds release keel, starts PostgreSQL, measures, returns the `postgres/...` entries.
pub fn run(root: &Path, duration: Duration) -> anyhow::Result<Vec<BenchResult>> {
    let keel = build_keel(root)?;
    println!("    starting PostgreSQL (fsync on)");
    let server = PgServer::start_with("-c fsync=on -c shared_buffers=256MB")
        .map_err(|e| anyhow!("cannot start PostgreSQL: {e}"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let command = format!(
        "cargo xtask bench postgres --duration {}",
        duration.as_secs()
    );
    runtime.block_on(async {
        let mut appends = Vec::new();
        for nodes in NODES {
            let result = appends_with(&server, nodes, duration).await?;
            println!(
                "    appends, {nodes} node(s), {APPENDERS} appenders: {:.0} events/s, p99 {} us",
                result.0, result.1
            );
            appends.push((nodes, result));
        }
        let mut claims = Vec::new();
        for nodes in NODES {
            let per_s = claim_and_complete(&server, &keel, nodes).await?;
            println!(
                "    claim + complete, {nodes} node(s), {WORKERS} workers: {per_s:.0} tasks/s"
            );
            claims.push((nodes, per_s));
        }
        let mut entries = Vec::new();
        let one_node_events = appends.first().map(|(_, (per_s, _))| *per_s);
        for (nodes, (per_s, p99)) in appends {
            let name = format!("postgres/append_{nodes}_nodes");
            let baseline = (nodes > 1).then_some(one_node_events).flatten();
            entries.push(BenchResult::new(
                &name,
                "events_per_s",
                per_s,
                "events/s",
                baseline,
                &command,
            ));
            entries.push(BenchResult::new(
                &name,
                "p99_append_latency",
                p99 as f64,
                "us",
                None,
                &command,
            ));
        }
        let one_node_tasks = claims.first().map(|(_, per_s)| *per_s);
        for (nodes, per_s) in claims {
            let baseline = (nodes > 1).then_some(one_node_tasks).flatten();
            entries.push(BenchResult::new(
                format!("postgres/claim_complete_{nodes}_nodes"),
                "tasks_per_s",
                per_s,
                "tasks/s",
                baseline,
                &command,
            ));
        }
        Ok(entries)
    })
}

/// Events/s and p99 append latency (µs) of [`APPENDERS`] appenders over `nodes` stores.
async fn appends_with(
    server: &PgServer,
    nodes: usize,
    duration: Duration,
) -> anyhow::Result<(f64, u64)> {
    let url = server
        .create_database(&format!("append_{nodes}"))
        .await
        .map_err(|e| anyhow!(e))?;
    let mut stores = Vec::new();
    for _ in 0..nodes {
        stores.push(Arc::new(PgStore::open(&url, Durability::Fsync).await?));
    }
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let mut appenders = JoinSet::new();
    for i in 0..APPENDERS {
        let store = Arc::clone(&stores[i % nodes]);
        appenders.spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut n = 0u64;
            while Instant::now() < deadline {
                let event = NewEvent::new(
                    EventKind::LlmCall,
                    Some(format!("bench-{i}")),
                    json!({"route": "bench", "target": "sim/model", "attempts": 1, "latency_ms": 12,
                           "usage": {"prompt_tokens": 20, "completion_tokens": 8, "total_tokens": 28}, "n": n}),
                );
                let t = Instant::now();
                store.append(vec![event]).await?;
                hist.record(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX).max(1))?;
                n += 1;
            }
            anyhow::Ok((n, hist))
        });
    }
    let mut total = 0;
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    while let Some(done) = appenders.join_next().await {
        let (n, hist) = done??;
        total += n;
        all.add(hist)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok((total as f64 / elapsed, all.value_at_quantile(0.99)))
}

/// Tasks claimed and completed per second by [`WORKERS`] workers over `nodes` keel processes.
async fn claim_and_complete(server: &PgServer, keel: &Path, nodes: usize) -> anyhow::Result<f64> {
    let url = server
        .create_database(&format!("claims_{nodes}"))
        .await
        .map_err(|e| anyhow!(e))?;
    let dir = tempfile::tempdir().context("creating a temp dir")?;
    let config = dir.path().join("keel.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[store]\nurl = \"{url}\"\n\n[agents.bench]\nmax_attempts = 3\n"
        ),
    )
    .context("writing the config")?;
    let mut keels = Vec::new();
    for _ in 0..nodes {
        keels.push(KeelProcess::start(keel, &config).await?);
    }
    let urls: Arc<Vec<String>> = Arc::new(keels.iter().map(|k| k.base_url.clone()).collect());
    let client = reqwest::Client::new();

    // The queue: TASKS tasks, created through every node.
    let next = Arc::new(AtomicU64::new(0));
    let mut creators = JoinSet::new();
    for c in 0..16 {
        let (client, urls, next) = (client.clone(), Arc::clone(&urls), Arc::clone(&next));
        creators.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < TASKS as u64 {
                let node = &urls[c % urls.len()];
                let r = client
                    .post(format!("{node}/v1/tasks"))
                    .json(&json!({"agent": "bench", "input": {}}))
                    .send()
                    .await?;
                if r.status() != reqwest::StatusCode::CREATED {
                    bail!("creating a task answered {}", r.status());
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = creators.join_next().await {
        done??;
    }

    let started = Instant::now();
    let mut workers = JoinSet::new();
    for w in 0..WORKERS {
        let (client, urls) = (client.clone(), Arc::clone(&urls));
        workers.spawn(async move {
            let node = &urls[w % urls.len()];
            let mut done = Vec::new();
            loop {
                let r = client
                    .post(format!("{node}/v1/tasks/claim"))
                    .json(&json!({"agent": "bench", "worker": format!("w{w}"), "lease": "60s"}))
                    .send()
                    .await?;
                if r.status() == reqwest::StatusCode::NO_CONTENT {
                    return anyhow::Ok(done);
                }
                if r.status() != reqwest::StatusCode::OK {
                    bail!("claim answered {}", r.status());
                }
                let task: Value = r.json().await?;
                let id = task["id"].as_str().context("claim without id")?.to_owned();
                let r = client
                    .post(format!("{node}/v1/tasks/{id}/complete"))
                    .json(&json!({"lease_token": task["lease_token"], "output": {}}))
                    .send()
                    .await?;
                if r.status() != reqwest::StatusCode::OK {
                    bail!("complete of {id} answered {}", r.status());
                }
                done.push(id);
            }
        });
    }
    let mut completed = Vec::new();
    while let Some(done) = workers.join_next().await {
        completed.extend(done??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let total = completed.len();
    completed.sort();
    completed.dedup();
    if completed.len() != total || total != TASKS {
        bail!(
            "{total} completions of {} distinct tasks, for {TASKS} tasks",
            completed.len()
        );
    }
    for mut k in keels {
        k.stop().await;
    }
    Ok(total as f64 / elapsed)
}
