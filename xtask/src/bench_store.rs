//! The event-store benchmark: how fast keel's SQLite log commits durably, beside what the disk
//! under it can do, and how quickly a large store is ready again after a restart.
//!
//! Everything runs in a temp dir under `bench/out/`, so on the repository's disk:
//!
//! 1. **Disk**: a loop of 4 KiB `write` + `fdatasync` ([`std::fs::File::sync_data`]) for
//!    [`StoreBenchConfig::fsync_duration`], twice: overwriting blocks in place in a preallocated
//!    file (what a WAL that has wrapped around does; the faster case, and the baseline) and
//!    appending to a growing file. A durable store pays at least one such sync per commit.
//! 2. **Append**: 1, 16 and 256 concurrent writers (tokio tasks on a multi-thread runtime), each
//!    looping `append(vec![one llm_call-like event])` on a [`Durability::Fsync`] store for
//!    [`StoreBenchConfig::append_duration`]. Group commit lets many appends share one sync, so
//!    events/s can exceed the disk's fsyncs/s; that ratio is the point of the figure.
//! 3. **Recovery**: a store of [`EVENTS_PER_TASK`] events per task, written with
//!    [`keel_store::TaskStore::write_task`] by [`BUILDERS`] concurrent writers on a [`Durability::Relaxed`]
//!    store, is closed and then reopened: `SqliteStore::open` + first `ping` + one `task` read
//!    ("reopen and ready"), first with the database's pages dropped from the page cache
//!    (`dd iflag=nocache`, best effort) and then warm.

use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use keel_core::{EventKind, NewEvent};
use keel_store::{
    Durability, EventStore as _, SqliteStore, StoreStats, TaskRow, TaskStore as _, TaskWrite,
};
use serde_json::json;
use tokio::runtime::Runtime;
use tokio::task::JoinSet;

use crate::bench_cmd::BenchResult;

/// Events in the recovery store unless `--events` says otherwise.
pub const DEFAULT_EVENTS: u64 = 1_000_000;

/// Events per task in the recovery store (100,000 tasks for the default 1,000,000 events).
pub const EVENTS_PER_TASK: u64 = 10;

/// Concurrent `write_task` callers building the recovery store.
pub const BUILDERS: usize = 64;

/// Size of one write in the disk loop.
const BLOCK: usize = 4096;

/// Blocks the in-place disk loop cycles over (1 MiB, about a WAL's size between checkpoints).
const RING_BLOCKS: u64 = 256;

/// Histogram range: 1 µs to 60 s, 3 significant digits.
const HIST_MAX_US: u64 = 60_000_000;

/// The targets on this machine.
const TARGET_EVENTS_PER_S: f64 = 50_000.0;
const TARGET_WRITERS: usize = 256;
const TARGET_P99_US: u64 = 10_000;
const TARGET_REOPEN: Duration = Duration::from_secs(2);

/// What one run of the store benchmark does.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreBenchConfig {
    /// Events in the recovery store (rounded down to whole tasks).
    pub events: u64,
    /// How long each disk loop runs.
    pub fsync_duration: Duration,
    /// How long each append phase runs.
    pub append_duration: Duration,
    /// Concurrent writers of each append phase.
    pub writers: Vec<usize>,
}

impl StoreBenchConfig {
    /// The benchmark as `cargo xtask bench store --events N` runs it.
    pub fn new(events: u64) -> StoreBenchConfig {
        StoreBenchConfig {
            events,
            fsync_duration: Duration::from_secs(3),
            append_duration: Duration::from_secs(5),
            writers: vec![1, 16, 256],
        }
    }
}

/// Measures in a temp dir under `root/bench/out` and returns the `store/...` entries.
pub fn run(root: &Path, config: &StoreBenchConfig) -> anyhow::Result<Vec<BenchResult>> {
    let out = root.join("bench").join("out");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let dir = tempfile::Builder::new()
        .prefix("store-")
        .tempdir_in(&out)
        .with_context(|| format!("creating a temp dir in {}", out.display()))?;
    let command = format!("cargo xtask bench store --events {}", config.events);
    measure(dir.path(), config, &command)
}

/// Runs the three measurements in `dir`, prints their tables, returns the entries.
fn measure(
    dir: &Path,
    config: &StoreBenchConfig,
    command: &str,
) -> anyhow::Result<Vec<BenchResult>> {
    let plan = BuildPlan::for_events(config.events)?;
    println!("    scratch dir {}", dir.display());

    println!(
        "    disk: 4 KiB write + fdatasync, {:.1}s in place then {:.1}s appending",
        config.fsync_duration.as_secs_f64(),
        config.fsync_duration.as_secs_f64()
    );
    let disk = DiskResult {
        in_place: fsync_loop(&dir.join("fsync-in-place.bin"), config.fsync_duration, true)?,
        appending: fsync_loop(&dir.join("fsync-append.bin"), config.fsync_duration, false)?,
    };
    print_lines(&disk_table(&disk));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let mut appends = Vec::with_capacity(config.writers.len());
    for &writers in &config.writers {
        println!(
            "    append: {writers} writers, Durability::Fsync, {:.1}s",
            config.append_duration.as_secs_f64()
        );
        let path = dir.join(format!("append-{writers}.db"));
        let result = runtime.block_on(append_phase(&path, writers, config.append_duration))?;
        appends.push(result);
        remove_db(&path);
    }
    print_lines(&append_table(&disk, &appends));

    let recovery = recovery(&runtime, &dir.join("recovery.db"), plan)?;
    print_lines(&recovery_lines(&recovery));
    print_lines(&target_lines(&appends, &recovery));
    Ok(entries(&disk, &appends, &recovery, command))
}

fn print_lines(lines: &[String]) {
    for line in lines {
        println!("    {line}");
    }
}

/// Deletes a database and its WAL files; what is left is removed with the temp dir anyway.
fn remove_db(path: &Path) {
    for file in db_files(path) {
        let _ = std::fs::remove_file(file);
    }
}

/// The database file and the WAL files beside it.
fn db_files(path: &Path) -> [PathBuf; 3] {
    let with = |suffix: &str| {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    };
    [path.to_owned(), with("-wal"), with("-shm")]
}

// === latency ===

/// A latency distribution in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Latency {
    p50_us: u64,
    p99_us: u64,
    max_us: u64,
}

fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).context("creating a latency histogram")
}

fn record(hist: &mut Histogram<u64>, took: Duration) {
    let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
    hist.saturating_record(micros.max(1));
}

fn latency_of(hist: &Histogram<u64>) -> Latency {
    Latency {
        p50_us: hist.value_at_quantile(0.50),
        p99_us: hist.value_at_quantile(0.99),
        max_us: hist.max(),
    }
}

fn per_second(count: u64, elapsed: Duration) -> f64 {
    if elapsed.is_zero() {
        0.0
    } else {
        count as f64 / elapsed.as_secs_f64()
    }
}

// === disk ===

/// One disk loop: durable 4 KiB writes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct FsyncResult {
    syncs: u64,
    elapsed: Duration,
    latency: Latency,
}

impl FsyncResult {
    fn per_s(&self) -> f64 {
        per_second(self.syncs, self.elapsed)
    }
}

/// Both disk loops; `in_place` is the baseline.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct DiskResult {
    in_place: FsyncResult,
    appending: FsyncResult,
}

/// `write` + `fdatasync` of 4 KiB for `duration`, each timed. `in_place` overwrites the blocks
/// of a preallocated, synced 1 MiB file in turn; otherwise each write extends the file.
fn fsync_loop(path: &Path, duration: Duration, in_place: bool) -> anyhow::Result<FsyncResult> {
    let file = std::fs::OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    let block = vec![0xa5_u8; BLOCK];
    let fail = |what: &str| format!("{what} {}", path.display());
    if in_place {
        for i in 0..RING_BLOCKS {
            file.write_all_at(&block, i * BLOCK as u64)
                .with_context(|| fail("preallocating"))?;
        }
        file.sync_all().with_context(|| fail("syncing"))?;
    }
    let mut hist = new_histogram()?;
    let mut syncs = 0_u64;
    let start = Instant::now();
    while start.elapsed() < duration {
        let offset = if in_place {
            (syncs % RING_BLOCKS) * BLOCK as u64
        } else {
            syncs * BLOCK as u64
        };
        let began = Instant::now();
        file.write_all_at(&block, offset)
            .with_context(|| fail("writing"))?;
        file.sync_data().with_context(|| fail("syncing"))?;
        record(&mut hist, began.elapsed());
        syncs += 1;
    }
    let elapsed = start.elapsed();
    drop(file);
    let _ = std::fs::remove_file(path);
    Ok(FsyncResult {
        syncs,
        elapsed,
        latency: latency_of(&hist),
    })
}

// === append ===

/// One append phase.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct AppendResult {
    writers: usize,
    /// Events appended (one per `append` call).
    events: u64,
    /// Commits the store made for them.
    commits: u64,
    elapsed: Duration,
    /// Latency of one `append` call, request to acknowledgement.
    latency: Latency,
}

impl AppendResult {
    fn events_per_s(&self) -> f64 {
        per_second(self.events, self.elapsed)
    }

    fn commits_per_s(&self) -> f64 {
        per_second(self.commits, self.elapsed)
    }

    fn events_per_commit(&self) -> f64 {
        if self.commits == 0 {
            0.0
        } else {
            self.events as f64 / self.commits as f64
        }
    }
}

/// `writers` tasks appending one event per call to a fresh `Fsync` store until `duration` ends.
async fn append_phase(
    path: &Path,
    writers: usize,
    duration: Duration,
) -> anyhow::Result<AppendResult> {
    let store = Arc::new(
        SqliteStore::open(path, Durability::Fsync)
            .with_context(|| format!("opening {}", path.display()))?,
    );
    // The first commit pays for the schema; keep it out of the figures.
    store
        .append(vec![llm_call(None, 0)])
        .await
        .context("first append")?;
    let commits_before = store.commits();
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = JoinSet::new();
    for writer in 0..writers {
        tasks.spawn(append_loop(Arc::clone(&store), writer, deadline));
    }
    let mut hist = new_histogram()?;
    let mut events = 0;
    while let Some(joined) = tasks.join_next().await {
        let (count, latency) = joined.context("append writer panicked")??;
        events += count;
        hist.add(&latency).context("merging latency histograms")?;
    }
    let elapsed = start.elapsed();
    let commits = store.commits() - commits_before;
    if let Ok(store) = Arc::try_unwrap(store) {
        store.close().await.context("closing the store")?;
    }
    Ok(AppendResult {
        writers,
        events,
        commits,
        elapsed,
        latency: latency_of(&hist),
    })
}

/// One writer: append, wait for the acknowledgement, repeat until `deadline`.
async fn append_loop(
    store: Arc<SqliteStore>,
    writer: usize,
    deadline: Instant,
) -> anyhow::Result<(u64, Histogram<u64>)> {
    let task = Some(format!("bench-task-{writer:03}"));
    let mut hist = new_histogram()?;
    let mut count = 0;
    while Instant::now() < deadline {
        let event = llm_call(task.clone(), count);
        let began = Instant::now();
        store.append(vec![event]).await.context("append")?;
        record(&mut hist, began.elapsed());
        count += 1;
    }
    Ok((count, hist))
}

/// An event shaped like the gateway's `llm_call` (about 250 bytes of data).
fn llm_call(task: Option<String>, step: u64) -> NewEvent {
    NewEvent::new(
        EventKind::LlmCall,
        task,
        json!({
            "route": "bench",
            "target": "sim/sim-model",
            "agent": "bench-agent",
            "step": step,
            "attempts": 1,
            "fallback": false,
            "outcome": "ok",
            "stream": false,
            "latency_ms": 412,
            "usage": {"prompt_tokens": 24, "completion_tokens": 8, "total_tokens": 32},
        }),
    )
}

// === recovery ===

/// The shape of the recovery store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BuildPlan {
    tasks: u64,
    events_per_task: u64,
}

impl BuildPlan {
    /// Whole tasks of [`EVENTS_PER_TASK`] events, as many as fit in `events`.
    fn for_events(events: u64) -> anyhow::Result<BuildPlan> {
        if events < EVENTS_PER_TASK {
            bail!("the recovery store needs at least {EVENTS_PER_TASK} events, not {events}");
        }
        Ok(BuildPlan {
            tasks: events / EVENTS_PER_TASK,
            events_per_task: EVENTS_PER_TASK,
        })
    }

    fn events(&self) -> u64 {
        self.tasks * self.events_per_task
    }
}

/// What the recovery measurement found.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct RecoveryResult {
    tasks: u64,
    events: u64,
    build: Duration,
    /// Reopen and ready with the database's pages dropped from the page cache, when that worked.
    cold: Option<Duration>,
    /// Reopen and ready right after another reopen.
    warm: Duration,
    db_bytes: u64,
}

impl RecoveryResult {
    /// The reported "reopen and ready": cold when measured, warm otherwise.
    fn reopen(&self) -> Duration {
        self.cold.unwrap_or(self.warm)
    }

    fn bytes_per_event(&self) -> f64 {
        if self.events == 0 {
            0.0
        } else {
            self.db_bytes as f64 / self.events as f64
        }
    }
}

fn recovery(runtime: &Runtime, path: &Path, plan: BuildPlan) -> anyhow::Result<RecoveryResult> {
    println!(
        "    recovery: building {} tasks / {} events (write_task, Durability::Relaxed, {BUILDERS} writers)",
        plan.tasks,
        plan.events()
    );
    let build = runtime.block_on(build_store(path, plan))?;
    println!("    built in {:.1}s; closed", build.as_secs_f64());
    let probe = task_id(plan.tasks / 2);
    let cold = if drop_from_page_cache(path) {
        Some(reopen(runtime, path, &probe)?.0)
    } else {
        println!("    (could not drop the database from the page cache; reporting warm only)");
        None
    };
    let (warm, stats) = reopen(runtime, path, &probe)?;
    if stats.events != plan.events() || stats.tasks != plan.tasks {
        bail!(
            "the recovery store holds {} tasks / {} events, expected {} / {}",
            stats.tasks,
            stats.events,
            plan.tasks,
            plan.events()
        );
    }
    Ok(RecoveryResult {
        tasks: stats.tasks,
        events: stats.events,
        build,
        cold,
        warm,
        db_bytes: stats.db_bytes,
    })
}

/// Writes `plan` into a fresh `Relaxed` store with [`BUILDERS`] concurrent writers, closes it.
async fn build_store(path: &Path, plan: BuildPlan) -> anyhow::Result<Duration> {
    let store = Arc::new(
        SqliteStore::open(path, Durability::Relaxed)
            .with_context(|| format!("opening {}", path.display()))?,
    );
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut builders = JoinSet::new();
    for _ in 0..BUILDERS {
        builders.spawn(build_tasks(
            Arc::clone(&store),
            plan,
            Arc::clone(&next),
            Arc::clone(&done),
            start,
        ));
    }
    while let Some(joined) = builders.join_next().await {
        joined.context("builder panicked")??;
    }
    let store = Arc::try_unwrap(store)
        .map_err(|_| anyhow::anyhow!("the recovery store is still shared after the build"))?;
    store.close().await.context("closing the recovery store")?;
    Ok(start.elapsed())
}

/// One builder: takes the next task number and writes that task, until none are left.
async fn build_tasks(
    store: Arc<SqliteStore>,
    plan: BuildPlan,
    next: Arc<AtomicU64>,
    done: Arc<AtomicU64>,
    start: Instant,
) -> anyhow::Result<()> {
    loop {
        let index = next.fetch_add(1, Ordering::Relaxed);
        if index >= plan.tasks {
            return Ok(());
        }
        for write in task_writes(index, plan.events_per_task, unix_ms()) {
            store
                .write_task(write)
                .await
                .with_context(|| format!("writing {}", task_id(index)))?;
        }
        let finished = done.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(percent) = progress_percent(finished, plan.tasks) {
            println!(
                "    building: {percent:>3}% ({finished} tasks, {} events, {:.1}s)",
                finished * plan.events_per_task,
                start.elapsed().as_secs_f64()
            );
        }
    }
}

/// The percentage to print when `finished` of `total` crosses a multiple of 10%.
fn progress_percent(finished: u64, total: u64) -> Option<u64> {
    if total == 0 || finished == 0 || finished > total {
        return None;
    }
    let before = (finished - 1) * 10 / total;
    let now = finished * 10 / total;
    (now > before).then_some(now * 10)
}

fn task_id(index: u64) -> String {
    format!("task-{index:07}")
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Events of each write of one task: the create alone, then steps of up to three.
fn write_sizes(events_per_task: u64) -> Vec<u64> {
    let mut sizes = vec![1];
    let mut left = events_per_task.saturating_sub(1);
    while left > 0 {
        let size = left.min(3);
        sizes.push(size);
        left -= size;
    }
    sizes
}

/// The kind of the task's `n`th event (from 0) of `total`.
fn task_event_kind(n: u64, total: u64) -> EventKind {
    if n == 0 {
        EventKind::TaskCreated
    } else if n + 1 == total {
        EventKind::TaskSucceeded
    } else if n == 1 {
        EventKind::TaskClaimed
    } else if n.is_multiple_of(2) {
        EventKind::LlmCall
    } else {
        EventKind::StepRecorded
    }
}

/// The writes that take task number `index` from created to succeeded, versions chained.
fn task_writes(index: u64, events_per_task: u64, now_ms: i64) -> Vec<TaskWrite> {
    let id = task_id(index);
    let agent = format!("agent-{:02}", index % 16);
    let sizes = write_sizes(events_per_task);
    let last = sizes.len() - 1;
    let mut version = 0;
    let mut writes = Vec::with_capacity(sizes.len());
    for (i, size) in sizes.into_iter().enumerate() {
        let events = (version..version + size)
            .map(|n| task_event(&id, &agent, n, events_per_task))
            .collect();
        let expected_version = (i > 0).then_some(version);
        version += size;
        let state = match i {
            _ if i == last => "succeeded",
            0 => "queued",
            _ => "running",
        };
        writes.push(TaskWrite {
            row: TaskRow {
                id: id.clone(),
                agent: agent.clone(),
                state: state.to_owned(),
                version,
                snapshot: json!({
                    "id": id,
                    "agent": agent,
                    "state": state,
                    "steps": version,
                    "input": {"prompt": "Summarise the quarterly report in three bullet points."},
                }),
                created_at_ms: now_ms,
                updated_at_ms: now_ms,
                lease_expires_at_ms: (state == "running").then_some(now_ms + 30_000),
                approval_expires_at_ms: None,
                deadline_at_ms: None,
            },
            expected_version,
            events,
            blobs: Vec::new(),
            blob_refs: Vec::new(),
            idempotency: None,
        });
    }
    writes
}

fn task_event(id: &str, agent: &str, n: u64, total: u64) -> NewEvent {
    let task = Some(id.to_owned());
    let kind = task_event_kind(n, total);
    match kind {
        EventKind::LlmCall => llm_call(task, n),
        EventKind::TaskCreated => NewEvent::new(
            kind,
            task,
            json!({"agent": agent, "max_attempts": 3, "input_bytes": 57}),
        ),
        _ => NewEvent::new(kind, task, json!({"step": n, "agent": agent})),
    }
}

/// Syncs the database files and asks the kernel to drop them from the page cache
/// (`dd iflag=nocache count=0`, which is `posix_fadvise(DONTNEED)`). True if every file went.
fn drop_from_page_cache(path: &Path) -> bool {
    db_files(path)
        .iter()
        .filter(|file| file.exists())
        .all(|file| {
            let synced = std::fs::File::open(file).and_then(|f| f.sync_all()).is_ok();
            let mut input = std::ffi::OsString::from("if=");
            input.push(file.as_os_str());
            synced
                && Command::new("dd")
                    .arg(input)
                    .args(["iflag=nocache", "count=0", "status=none"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|status| status.success())
        })
}

/// Times open + first `ping` + one `task` read; returns that time and the store's sizes.
fn reopen(runtime: &Runtime, path: &Path, probe: &str) -> anyhow::Result<(Duration, StoreStats)> {
    let start = Instant::now();
    let store = SqliteStore::open(path, Durability::Fsync)
        .with_context(|| format!("reopening {}", path.display()))?;
    let row = runtime.block_on(async {
        store.ping().await?;
        store.task(probe).await
    });
    let ready = start.elapsed();
    if row.context("first reads after reopening")?.is_none() {
        bail!("{probe} is missing from the reopened store");
    }
    let stats = runtime
        .block_on(store.stats())
        .context("reading store stats")?;
    runtime
        .block_on(store.close())
        .context("closing the reopened store")?;
    Ok((ready, stats))
}

// === tables ===

fn disk_table(disk: &DiskResult) -> Vec<String> {
    let mut lines = vec![format!(
        "{:<30} {:>10} {:>9} {:>9} {:>9}",
        "disk (4 KiB write+fdatasync)", "fsyncs/s", "p50 us", "p99 us", "max us"
    )];
    for (name, result) in [
        ("in place (baseline)", &disk.in_place),
        ("appending", &disk.appending),
    ] {
        lines.push(format!(
            "{:<30} {:>10.0} {:>9} {:>9} {:>9}",
            name,
            result.per_s(),
            result.latency.p50_us,
            result.latency.p99_us,
            result.latency.max_us
        ));
    }
    lines
}

fn append_table(disk: &DiskResult, rows: &[AppendResult]) -> Vec<String> {
    let baseline = disk.in_place.per_s();
    let mut lines = vec![format!(
        "{:<20} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "append (Fsync)",
        "events/s",
        "x fsync",
        "commits/s",
        "ev/commit",
        "p50 us",
        "p99 us",
        "max us"
    )];
    for row in rows {
        let ratio = if baseline > 0.0 {
            format!("{:.2}", row.events_per_s() / baseline)
        } else {
            "-".to_owned()
        };
        lines.push(format!(
            "{:<20} {:>10.0} {:>9} {:>9.0} {:>9.1} {:>9} {:>9} {:>9}",
            format!("{} writers", row.writers),
            row.events_per_s(),
            ratio,
            row.commits_per_s(),
            row.events_per_commit(),
            row.latency.p50_us,
            row.latency.p99_us,
            row.latency.max_us
        ));
    }
    lines
}

fn recovery_lines(r: &RecoveryResult) -> Vec<String> {
    let cold = match r.cold {
        Some(cold) => format!("{:.3}s with a cold page cache, ", cold.as_secs_f64()),
        None => String::new(),
    };
    vec![
        format!(
            "recovery store: {} tasks, {} events, built in {:.1}s ({:.0} events/s, Relaxed)",
            r.tasks,
            r.events,
            r.build.as_secs_f64(),
            per_second(r.events, r.build)
        ),
        format!(
            "db size: {:.1} MiB, {:.0} bytes/event",
            r.db_bytes as f64 / (1024.0 * 1024.0),
            r.bytes_per_event()
        ),
        format!(
            "reopen and ready (open + ping + task read): {cold}{:.3}s warm",
            r.warm.as_secs_f64()
        ),
    ]
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

/// The targets and whether this run met them.
fn target_lines(appends: &[AppendResult], recovery: &RecoveryResult) -> Vec<String> {
    let mut lines = Vec::new();
    match appends.iter().find(|a| a.writers == TARGET_WRITERS) {
        Some(a) => {
            lines.push(format!(
                "target >= {TARGET_EVENTS_PER_S:.0} durable events/s at {TARGET_WRITERS} writers: {} ({:.0})",
                met(a.events_per_s() >= TARGET_EVENTS_PER_S),
                a.events_per_s()
            ));
            lines.push(format!(
                "target p99 commit < {} ms at {TARGET_WRITERS} writers: {} ({:.2} ms)",
                TARGET_P99_US / 1000,
                met(a.latency.p99_us < TARGET_P99_US),
                a.latency.p99_us as f64 / 1000.0
            ));
        }
        None => lines.push(format!(
            "targets at {TARGET_WRITERS} writers: not measured in this run"
        )),
    }
    lines.push(format!(
        "target reopen and ready < {}s: {} ({:.3}s)",
        TARGET_REOPEN.as_secs(),
        met(recovery.reopen() < TARGET_REOPEN),
        recovery.reopen().as_secs_f64()
    ));
    lines
}

// === results ===

fn entries(
    disk: &DiskResult,
    appends: &[AppendResult],
    recovery: &RecoveryResult,
    command: &str,
) -> Vec<BenchResult> {
    let fsyncs = disk.in_place.per_s();
    let (d50, d99) = (
        disk.in_place.latency.p50_us as f64,
        disk.in_place.latency.p99_us as f64,
    );
    let mut out = vec![
        BenchResult::new(
            "store/disk_fsync",
            "fsyncs_per_s",
            fsyncs,
            "fsync/s",
            None,
            command,
        ),
        BenchResult::new(
            "store/disk_fsync",
            "p50_fsync_latency",
            d50,
            "us",
            None,
            command,
        ),
        BenchResult::new(
            "store/disk_fsync",
            "p99_fsync_latency",
            d99,
            "us",
            None,
            command,
        ),
        BenchResult::new(
            "store/disk_fsync",
            "fsyncs_per_s_appending",
            disk.appending.per_s(),
            "fsync/s",
            None,
            command,
        ),
        BenchResult::new(
            "store/disk_fsync",
            "p99_fsync_latency_appending",
            disk.appending.latency.p99_us as f64,
            "us",
            None,
            command,
        ),
    ];
    for a in appends {
        let name = format!("store/append_{}_writers", a.writers);
        out.extend([
            BenchResult::new(
                name.clone(),
                "events_per_s",
                a.events_per_s(),
                "events/s",
                Some(fsyncs),
                command,
            ),
            BenchResult::new(
                name.clone(),
                "commits_per_s",
                a.commits_per_s(),
                "commits/s",
                Some(fsyncs),
                command,
            ),
            BenchResult::new(
                name.clone(),
                "events_per_commit",
                a.events_per_commit(),
                "events",
                None,
                command,
            ),
            BenchResult::new(
                name.clone(),
                "p50_commit_latency",
                a.latency.p50_us as f64,
                "us",
                Some(d50),
                command,
            ),
            BenchResult::new(
                name,
                "p99_commit_latency",
                a.latency.p99_us as f64,
                "us",
                Some(d99),
                command,
            ),
        ]);
    }
    let name = "store/recovery";
    out.extend([
        BenchResult::new(
            name,
            "reopen_ready_s",
            recovery.reopen().as_secs_f64(),
            "s",
            None,
            command,
        ),
        BenchResult::new(
            name,
            "reopen_ready_warm_s",
            recovery.warm.as_secs_f64(),
            "s",
            None,
            command,
        ),
        BenchResult::new(
            name,
            "events",
            recovery.events as f64,
            "events",
            None,
            command,
        ),
        BenchResult::new(
            name,
            "db_bytes",
            recovery.db_bytes as f64,
            "bytes",
            None,
            command,
        ),
        BenchResult::new(
            name,
            "bytes_per_event",
            recovery.bytes_per_event(),
            "bytes",
            None,
            command,
        ),
        BenchResult::new(
            name,
            "build_events_per_s",
            per_second(recovery.events, recovery.build),
            "events/s",
            None,
            command,
        ),
    ]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn latency(p50_us: u64, p99_us: u64) -> Latency {
        Latency {
            p50_us,
            p99_us,
            max_us: p99_us * 2,
        }
    }

    fn disk() -> DiskResult {
        DiskResult {
            in_place: FsyncResult {
                syncs: 2000,
                elapsed: Duration::from_secs(2),
                latency: latency(900, 2000),
            },
            appending: FsyncResult {
                syncs: 500,
                elapsed: Duration::from_secs(1),
                latency: latency(1800, 4000),
            },
        }
    }

    fn append(writers: usize, events: u64) -> AppendResult {
        AppendResult {
            writers,
            events,
            commits: events / writers as u64,
            elapsed: Duration::from_secs(5),
            latency: latency(1500, 8000),
        }
    }

    fn recovery_result() -> RecoveryResult {
        RecoveryResult {
            tasks: 100,
            events: 1000,
            build: Duration::from_secs(2),
            cold: Some(Duration::from_millis(30)),
            warm: Duration::from_millis(10),
            db_bytes: 500_000,
        }
    }

    #[test]
    fn plan_rounds_events_down_to_whole_tasks() {
        let plan = BuildPlan::for_events(1_000_000).unwrap();
        assert_eq!(plan.tasks, 100_000);
        assert_eq!(plan.events(), 1_000_000);
        assert_eq!(BuildPlan::for_events(25).unwrap().events(), 20);
        assert!(BuildPlan::for_events(9).is_err());
    }

    #[test]
    fn a_task_is_one_create_then_steps_of_three() {
        assert_eq!(write_sizes(10), [1, 3, 3, 3]);
        assert_eq!(write_sizes(2), [1, 1]);
        assert_eq!(write_sizes(1), [1]);
        assert_eq!(write_sizes(10).iter().sum::<u64>(), 10);
    }

    #[test]
    fn task_writes_chain_versions_from_create_to_success() {
        let writes = task_writes(42, EVENTS_PER_TASK, 1_000);
        assert_eq!(writes.len(), 4);
        assert_eq!(writes[0].expected_version, None);
        assert_eq!(writes[0].row.state, "queued");
        assert_eq!(writes[0].events[0].kind, EventKind::TaskCreated);
        let mut version = 0;
        for write in &writes {
            assert_eq!(write.expected_version.unwrap_or(0), version);
            version += write.events.len() as u64;
            assert_eq!(write.row.version, version);
            assert_eq!(write.row.id, "task-0000042");
            assert!(
                write
                    .events
                    .iter()
                    .all(|e| e.task_id.as_deref() == Some("task-0000042"))
            );
        }
        assert_eq!(version, EVENTS_PER_TASK);
        let last = writes.last().unwrap();
        assert_eq!(last.row.state, "succeeded");
        assert_eq!(last.row.lease_expires_at_ms, None);
        assert_eq!(last.events.last().unwrap().kind, EventKind::TaskSucceeded);
        assert_eq!(writes[1].row.state, "running");
        assert!(writes[1].row.lease_expires_at_ms.is_some());
        let kinds: Vec<_> = writes
            .iter()
            .flat_map(|w| w.events.iter().map(|e| e.kind))
            .collect();
        assert!(kinds.contains(&EventKind::LlmCall));
    }

    #[test]
    fn progress_is_printed_once_per_tenth() {
        let printed: Vec<_> = (1..=100)
            .filter_map(|done| progress_percent(done, 100))
            .collect();
        assert_eq!(printed, [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]);
        let printed: Vec<_> = (1..=100_000)
            .filter_map(|done| progress_percent(done, 100_000))
            .collect();
        assert_eq!(printed.len(), 10);
        assert_eq!(progress_percent(0, 10), None);
        assert_eq!(progress_percent(11, 10), None);
        assert_eq!(progress_percent(1, 0), None);
    }

    #[test]
    fn append_table_shows_events_per_fsync_and_group_commit() {
        let lines = append_table(&disk(), &[append(256, 500_000)]);
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("append (Fsync)"));
        let cells: Vec<_> = lines[1].split_whitespace().collect();
        // 100,000 events/s over 1,000 fsyncs/s; 256 events per commit.
        assert_eq!(
            cells,
            [
                "256", "writers", "100000", "100.00", "391", "256.0", "1500", "8000", "16000"
            ]
        );
    }

    #[test]
    fn disk_table_has_both_loops() {
        let lines = disk_table(&disk());
        assert_eq!(lines.len(), 3);
        assert!(lines[1].starts_with("in place (baseline)"));
        assert!(lines[1].contains(" 1000 "));
        assert!(lines[2].starts_with("appending"));
        assert!(lines[2].contains(" 500 "));
    }

    #[test]
    fn recovery_lines_report_cold_and_warm_reopen_and_size() {
        let lines = recovery_lines(&recovery_result());
        assert!(lines[0].contains("100 tasks, 1000 events"), "{}", lines[0]);
        assert!(lines[1].contains("500 bytes/event"), "{}", lines[1]);
        assert!(
            lines[2].contains("0.030s with a cold page cache, 0.010s warm"),
            "{}",
            lines[2]
        );
    }

    #[test]
    fn targets_say_honestly_whether_they_are_met() {
        let lines = target_lines(&[append(256, 200_000)], &recovery_result());
        assert_eq!(lines.len(), 3);
        assert!(lines[0].contains("NOT met (40000)"), "{}", lines[0]);
        assert!(lines[1].contains(": met (8.00 ms)"), "{}", lines[1]);
        assert!(lines[2].contains(": met (0.030s)"), "{}", lines[2]);
        let lines = target_lines(&[append(1, 10)], &recovery_result());
        assert!(lines[0].contains("not measured"));
    }

    #[test]
    fn entries_compare_appends_with_the_disk() {
        let entries = entries(
            &disk(),
            &[append(1, 5_000), append(256, 500_000)],
            &recovery_result(),
            "cargo xtask bench store --events 1000",
        );
        assert!(entries.iter().all(|e| e.name.starts_with("store/")));
        let find = |name: &str, metric: &str| {
            entries
                .iter()
                .find(|e| e.name == name && e.metric == metric)
                .unwrap_or_else(|| panic!("no {name} {metric}"))
        };
        assert_eq!(find("store/disk_fsync", "fsyncs_per_s").value, 1000.0);
        assert_eq!(find("store/disk_fsync", "p99_fsync_latency").value, 2000.0);
        let events = find("store/append_256_writers", "events_per_s");
        assert_eq!(events.value, 100_000.0);
        assert_eq!(events.baseline, Some(1000.0));
        assert_eq!(events.ratio, Some(100.0));
        assert_eq!(
            find("store/append_1_writers", "p99_commit_latency").ratio,
            Some(4.0)
        );
        assert_eq!(find("store/recovery", "reopen_ready_s").value, 0.03);
        assert_eq!(find("store/recovery", "bytes_per_event").value, 500.0);
        assert_eq!(find("store/recovery", "db_bytes").value, 500_000.0);
        assert!(
            entries
                .iter()
                .all(|e| e.command == "cargo xtask bench store --events 1000")
        );
    }

    /// The whole benchmark at a tiny scale: it runs, and writes the entries it promises.
    #[test]
    fn a_tiny_run_measures_everything() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreBenchConfig {
            events: 200,
            fsync_duration: Duration::from_millis(20),
            append_duration: Duration::from_millis(50),
            writers: vec![1, 8],
        };
        let entries = measure(dir.path(), &config, "cmd").unwrap();
        let find = |name: &str, metric: &str| {
            entries
                .iter()
                .find(|e| e.name == name && e.metric == metric)
                .unwrap_or_else(|| panic!("no {name} {metric}"))
                .value
        };
        assert!(find("store/disk_fsync", "fsyncs_per_s") > 0.0);
        assert!(find("store/append_1_writers", "events_per_s") > 0.0);
        assert!(find("store/append_8_writers", "p99_commit_latency") >= 1.0);
        assert_eq!(find("store/recovery", "events"), 200.0);
        assert!(find("store/recovery", "db_bytes") > 0.0);
        assert!(find("store/recovery", "reopen_ready_s") > 0.0);
    }
}
