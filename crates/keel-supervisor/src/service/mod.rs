//! The supervisor's I/O layer: runs [`Command`]s against stored tasks.
//!
//! For every command: load the task's row, [`decide`], fold the events with
//! [`crate::evolve`], and write row + events (+ checkpoint blob + idempotency record)
//! in one store transaction guarded by the row's version. A concurrent writer
//! makes the write conflict; the command is then decided again on the fresh
//! row. Timers (expired leases, approvals and deadlines) are commands too, run by
//! [`Supervisor::sweep`].

mod approvals;
pub mod http;
pub mod metrics;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use keel_core::ApiError;
use keel_store::{BlobRef, IdempotencyRecord, StoreError, TaskRow, TaskStore, TaskWrite};
use serde_json::{Value, json};

use crate::command::{Command, Ctx, Directive};
use crate::error::TaskError;
use crate::task::{Task, TaskState};
use crate::{decide, fold};
use metrics::SupervisorMetrics;

/// How many times a command is decided again after losing a version race.
const MAX_CONFLICT_RETRIES: usize = 8;

/// Per-agent task limits (from `[agents.*]`).
#[derive(Debug, Clone, Copy)]
pub struct AgentLimits {
    /// Claims before a failing task goes to the dead-letter queue.
    pub max_attempts: u32,
    /// Steps before a task is stopped.
    pub max_steps: Option<u32>,
    /// Wall-clock limit from creation.
    pub task_timeout: Option<Duration>,
}

impl Default for AgentLimits {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            max_steps: None,
            task_timeout: None,
        }
    }
}

/// Settings of the supervisor.
#[derive(Debug, Clone)]
pub struct SupervisorSettings {
    /// Limits per agent; agents not listed get `default_limits`.
    pub agents: HashMap<String, AgentLimits>,
    /// Limits of agents without a config section.
    pub default_limits: AgentLimits,
    /// Largest checkpoint state accepted, in bytes (default 1 MiB).
    pub max_checkpoint_bytes: usize,
    /// Finished tasks older than this are pruned in the background (`None`: kept).
    pub retention: Option<Duration>,
    /// Checkpoints kept per task (`None`: all).
    pub keep_checkpoints: Option<usize>,
    /// The admin token operator calls must carry (`None`: operator calls are open).
    pub admin_token: Option<String>,
    /// Agent keys (key → agent). When any is set, creating and claiming a
    /// task needs the key of the task's agent (or the admin token).
    pub agent_keys: HashMap<String, String>,
}

impl Default for SupervisorSettings {
    fn default() -> Self {
        Self {
            agents: HashMap::new(),
            default_limits: AgentLimits::default(),
            max_checkpoint_bytes: 1 << 20,
            retention: None,
            keep_checkpoints: None,
            admin_token: None,
            agent_keys: HashMap::new(),
        }
    }
}

/// The supervisor: tasks, leases, checkpoints, the DLQ and approvals over a [`TaskStore`].
pub struct Supervisor {
    store: Arc<dyn TaskStore>,
    settings: SupervisorSettings,
    metrics: Option<SupervisorMetrics>,
    /// Claims running right now; spreads concurrent claimers over the queue's head.
    claiming: std::sync::atomic::AtomicUsize,
    /// Told of each task that succeeds (the gateway learns its tool profiles from it).
    on_succeeded: Option<OnSucceeded>,
    /// Asked before a task is created whether it can succeed at all.
    preflight: Option<Arc<dyn Preflight>>,
}

/// The pre-flight check on task creation: a task that cannot succeed (a tool it needs is
/// down, its input breaks a rule) is refused with the reason instead of burning tokens.
pub trait Preflight: Send + Sync {
    /// `Err(reason)` when a task of `agent` with `input` should not be created now.
    fn check(&self, agent: &str, input: &Value) -> Result<(), String>;
}

/// What [`Supervisor::on_succeeded`] calls, with the task that just succeeded.
pub type OnSucceeded = Arc<dyn Fn(&Task) + Send + Sync>;

/// Tasks each timer of [`Supervisor::sweep`] handles per sweep (the rest wait for the next).
const SWEEP_BATCH: usize = 256;

/// Queued tasks a claim considers at once.
const CLAIM_CANDIDATES: usize = 32;

/// Counts a claim in [`Supervisor::claiming`] while it runs.
struct Claiming<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Claiming<'a> {
    /// Counts one more claim; returns the guard and the claims now running.
    fn enter(counter: &'a std::sync::atomic::AtomicUsize) -> (Self, usize) {
        let now = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        (Self(counter), now)
    }
}

impl Drop for Claiming<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What [`Supervisor::agent_of_key`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOwner<'a> {
    /// No agent keys are configured: worker calls are open.
    NoKeysConfigured,
    /// The key of this agent.
    Agent(&'a str),
    /// No key, or one nobody has.
    Unknown,
}

/// What a command answered.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status of the first answer.
    pub status: u16,
    /// The JSON body.
    pub body: Value,
}

/// An idempotency key as sent by the client, with the call it belongs to.
#[derive(Debug, Clone)]
pub struct Idem {
    /// The call, e.g. `POST /v1/tasks/{id}/complete`.
    pub scope: String,
    /// The client's key.
    pub key: String,
    /// [`Idem::request_hash`] of the request's body: a repeat must send the same.
    pub request_hash: String,
}

impl Idem {
    /// The client's `key` for the call `scope` whose request body is `body`.
    pub fn new(scope: impl Into<String>, key: impl Into<String>, body: Value) -> Self {
        Self {
            scope: scope.into(),
            key: key.into(),
            request_hash: Self::request_hash(body),
        }
    }

    /// SHA-256 (hex) of `body` as canonical JSON: the same JSON with other spacing or key
    /// order is the same request.
    pub fn request_hash(body: Value) -> String {
        keel_store::blob_hash(keel_store::chain::into_canonical_json(body).as_bytes())
    }
}

/// The answer to a repeated idempotency key with another request body.
fn key_reused() -> ApiError {
    ApiError::unprocessable(
        "this Idempotency-Key was first used with a different request body; use a new key for another call",
    )
    .with_param("idempotency_key")
    .with_code("idempotency_key_reused")
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn store_error(e: StoreError) -> ApiError {
    tracing::error!(error = %e, "store failed");
    match e {
        // Nothing was written and the node is reconnecting: the client may try again.
        StoreError::Unreachable { .. } => {
            let mut err = ApiError::unavailable(e.to_string());
            err.code = Some("store_unavailable");
            err
        }
        _ => ApiError::internal(format!("the store failed: {e}")),
    }
}

/// Maps a task error to its HTTP answer (status from [`TaskError::status`]).
pub fn task_error(e: &TaskError) -> ApiError {
    let message = e.to_string();
    match (e.status(), e) {
        (404, _) => ApiError::not_found(message, "task_not_found"),
        (409, _) => ApiError::conflict(message, "task_conflict"),
        // The field at fault is the error's `param`, as in OpenAI's errors.
        (_, TaskError::Invalid { field, .. }) => ApiError::unprocessable(message).with_param(field),
        _ => ApiError::unprocessable(message),
    }
}

/// The row the store keeps for `task`.
fn row_of(task: &Task) -> Result<TaskRow, ApiError> {
    let snapshot = serde_json::to_value(task)
        .map_err(|e| ApiError::internal(format!("cannot encode task: {e}")))?;
    Ok(TaskRow {
        id: task.id.clone(),
        agent: task.agent.clone(),
        state: task.state.as_str().to_owned(),
        version: task.version,
        snapshot,
        created_at_ms: task.created_at_ms,
        updated_at_ms: task.updated_at_ms,
        lease_expires_at_ms: match task.state {
            TaskState::Running => task.lease.as_ref().map(|l| l.expires_at_ms),
            TaskState::Queued
            | TaskState::Succeeded
            | TaskState::Dead
            | TaskState::AwaitingHuman
            | TaskState::Cancelled => None,
        },
        approval_expires_at_ms: match task.state {
            TaskState::AwaitingHuman => task
                .approval
                .as_ref()
                .filter(|a| !a.escalated)
                .map(|a| a.expires_at_ms()),
            TaskState::Queued
            | TaskState::Running
            | TaskState::Succeeded
            | TaskState::Dead
            | TaskState::Cancelled => None,
        },
        // Only an unfinished task can still run out of time.
        deadline_at_ms: task.deadline_ms.filter(|_| !task.state.is_final()),
    })
}

fn task_of(row: &TaskRow) -> Result<Task, ApiError> {
    serde_json::from_value(row.snapshot.clone())
        .map_err(|e| ApiError::internal(format!("task {} has an unreadable snapshot: {e}", row.id)))
}

/// The task as users see it: everything but the lease token.
pub fn public(task: &Task) -> Value {
    serde_json::to_value(task.redacted()).unwrap_or(Value::Null)
}

impl Supervisor {
    /// A supervisor over `store`.
    pub fn new(store: Arc<dyn TaskStore>, settings: SupervisorSettings) -> Self {
        Self {
            store,
            settings,
            metrics: None,
            claiming: std::sync::atomic::AtomicUsize::new(0),
            on_succeeded: None,
            preflight: None,
        }
    }

    /// Runs `preflight` before every task creation.
    pub fn with_preflight(mut self, preflight: Arc<dyn Preflight>) -> Self {
        self.preflight = Some(preflight);
        self
    }

    /// The pre-flight verdict on a new task of `agent` with `input`.
    pub fn preflight(&self, agent: &str, input: &Value) -> Result<(), ApiError> {
        match &self.preflight {
            Some(p) => p.check(agent, input).map_err(|reason| {
                ApiError::unprocessable(format!("task refused before it starts: {reason}"))
                    .with_code("preflight_failed")
            }),
            None => Ok(()),
        }
    }

    /// Calls `f` with each task that succeeds, once, after its success is stored.
    pub fn on_succeeded(mut self, f: OnSucceeded) -> Self {
        self.on_succeeded = Some(f);
        self
    }

    /// Counts outcomes and queue depths in `metrics`.
    pub fn with_metrics(mut self, metrics: SupervisorMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn TaskStore> {
        &self.store
    }

    /// Limits of `agent`.
    pub fn limits(&self, agent: &str) -> AgentLimits {
        self.settings
            .agents
            .get(agent)
            .copied()
            .unwrap_or(self.settings.default_limits)
    }

    /// Whom a bearer key speaks for.
    pub fn agent_of_key(&self, key: Option<&str>) -> KeyOwner<'_> {
        if self.settings.agent_keys.is_empty() {
            return KeyOwner::NoKeysConfigured;
        }
        match key.and_then(|k| self.settings.agent_keys.get(k)) {
            Some(agent) => KeyOwner::Agent(agent),
            None => KeyOwner::Unknown,
        }
    }

    /// The admin token, when one is configured.
    pub fn admin_token(&self) -> Option<&str> {
        self.settings.admin_token.as_deref()
    }

    /// Largest checkpoint accepted.
    pub fn max_checkpoint_bytes(&self) -> usize {
        self.settings.max_checkpoint_bytes
    }

    /// A stored answer for `idem`, if this call was made before.
    ///
    /// # Errors
    /// A 422 `idempotency_key_reused` when the key was first used with another request
    /// body (a record written before keel kept the body's hash matches any body).
    pub async fn replay(&self, idem: Option<&Idem>) -> Result<Option<Answer>, ApiError> {
        let Some(idem) = idem else { return Ok(None) };
        let found = self
            .store
            .idempotent(&idem.scope, &idem.key)
            .await
            .map_err(store_error)?;
        let Some(record) = found else { return Ok(None) };
        if record
            .request_hash
            .as_ref()
            .is_some_and(|hash| *hash != idem.request_hash)
        {
            return Err(key_reused());
        }
        Ok(Some(Answer {
            status: record.status,
            body: record.body,
        }))
    }

    /// Loads one task.
    pub async fn get(&self, id: &str) -> Result<Task, ApiError> {
        let row = self.store.task(id).await.map_err(store_error)?;
        let row = row.ok_or_else(|| task_error(&TaskError::task_not_found(id)))?;
        task_of(&row)
    }

    /// Creates a task; a repeated `idem` returns the first answer and appends nothing.
    pub async fn create(&self, command: Command, idem: Option<Idem>) -> Result<Answer, ApiError> {
        if let Some(answer) = self.replay(idem.as_ref()).await? {
            return Ok(answer);
        }
        let ctx = Ctx {
            now_ms: now_ms(),
            new_token: String::new(),
        };
        let decision = decide(None, &command, &ctx).map_err(|e| task_error(&e))?;
        let Some(task) = fold(None, &decision.events, ctx.now_ms) else {
            return Err(ApiError::internal("creating a task produced no events"));
        };
        let body = public(&task);
        let answer = Answer { status: 201, body };
        match self
            .write(
                None,
                &task,
                &decision.events,
                Vec::new(),
                idem.as_ref(),
                &answer,
            )
            .await
        {
            Ok(()) => Ok(answer),
            Err(WriteError::Conflict) => {
                // Either the id exists, or the same idempotency key won a race.
                if let Some(answer) = self.replay(idem.as_ref()).await? {
                    return Ok(answer);
                }
                Err(task_error(&TaskError::Exists {
                    task: task.id.clone(),
                }))
            }
            Err(WriteError::Api(e)) => Err(e),
        }
    }

    /// Runs `command` on task `id` and answers with `respond(task_after, directive)`.
    ///
    /// `blob` is a checkpoint state to store content-addressed with the write.
    pub async fn run(
        &self,
        id: &str,
        command: &Command,
        idem: Option<Idem>,
        blob: Option<Bytes>,
        respond: impl Fn(&Task, Option<Directive>) -> Value,
    ) -> Result<Answer, ApiError> {
        if let Some(answer) = self.replay(idem.as_ref()).await? {
            return Ok(answer);
        }
        for _ in 0..MAX_CONFLICT_RETRIES {
            let row = self.store.task(id).await.map_err(store_error)?;
            let row = row.ok_or_else(|| task_error(&TaskError::task_not_found(id)))?;
            let task = task_of(&row)?;
            let ctx = Ctx {
                now_ms: now_ms(),
                new_token: uuid::Uuid::new_v4().simple().to_string(),
            };
            let decision = decide(Some(&task), command, &ctx).map_err(|e| task_error(&e))?;
            let after = match (&decision.events.is_empty(), command) {
                // A heartbeat is not an event: it renews the lease in the snapshot only.
                (true, Command::Heartbeat { token }) if task.state == TaskState::Running => {
                    crate::renew(&task, token, ctx.now_ms).map_err(|e| task_error(&e))?
                }
                // A step or checkpoint shows the worker is alive: it renews the
                // lease too, in the same write (so it can never undo a renewal).
                (false, Command::Step { token, .. } | Command::Checkpoint { token, .. }) => {
                    let folded = fold(Some(task.clone()), &decision.events, ctx.now_ms)
                        .unwrap_or_else(|| task.clone());
                    match folded.state {
                        TaskState::Running => {
                            crate::renew(&folded, token, ctx.now_ms).unwrap_or(folded)
                        }
                        TaskState::Queued
                        | TaskState::Succeeded
                        | TaskState::Dead
                        | TaskState::AwaitingHuman
                        | TaskState::Cancelled => folded,
                    }
                }
                _ => fold(Some(task.clone()), &decision.events, ctx.now_ms)
                    .unwrap_or_else(|| task.clone()),
            };
            let answer = Answer {
                status: 200,
                body: respond(&after, decision.directive),
            };
            if decision.events.is_empty() && after == task && idem.is_none() {
                return Ok(answer);
            }
            let blobs = blob.clone().into_iter().collect();
            match self
                .write(
                    Some(row.version),
                    &after,
                    &decision.events,
                    blobs,
                    idem.as_ref(),
                    &answer,
                )
                .await
            {
                Ok(()) => {
                    let finished = after.state.is_final() && !task.state.is_final();
                    if let (Some(m), true) = (&self.metrics, finished) {
                        m.finished(&after);
                    }
                    if let (Some(f), true) = (
                        &self.on_succeeded,
                        finished && after.state == TaskState::Succeeded,
                    ) {
                        f(&after);
                    }
                    return Ok(answer);
                }
                Err(WriteError::Conflict) => {
                    if let Some(answer) = self.replay(idem.as_ref()).await? {
                        return Ok(answer);
                    }
                }
                Err(WriteError::Api(e)) => return Err(e),
            }
        }
        Err(ApiError::conflict(
            format!("task {id} is changing too fast; try again"),
            "task_busy",
        ))
    }

    async fn write(
        &self,
        expected: Option<u64>,
        task: &Task,
        events: &[crate::event::TaskEvent],
        blobs: Vec<Bytes>,
        idem: Option<&Idem>,
        answer: &Answer,
    ) -> Result<(), WriteError> {
        // The only blob a command carries is a checkpoint's state.
        let blob_refs = match (&task.checkpoint, blobs.is_empty()) {
            (Some(c), false) => vec![BlobRef {
                hash: c.state_hash.clone(),
                kind: "checkpoint".to_owned(),
                seq: c.seq,
            }],
            _ => Vec::new(),
        };
        let write = TaskWrite {
            row: row_of(task).map_err(WriteError::Api)?,
            expected_version: expected,
            events: events.iter().map(|e| e.to_new_event(&task.id)).collect(),
            blobs,
            blob_refs,
            idempotency: idem.map(|i| IdempotencyRecord {
                scope: i.scope.clone(),
                key: i.key.clone(),
                status: answer.status,
                body: answer.body.clone(),
                request_hash: Some(i.request_hash.clone()),
            }),
        };
        match self.store.write_task(write).await {
            Ok(_) => Ok(()),
            Err(StoreError::Conflict { .. } | StoreError::DuplicateKey { .. }) => {
                Err(WriteError::Conflict)
            }
            Err(e) => Err(WriteError::Api(store_error(e))),
        }
    }

    /// Claims a queued task of `agent` for `worker`; `None` when nothing is queued.
    ///
    /// A lone claim takes the oldest task. Claims running at once each start at a
    /// random one of the first (in-flight claims, at most 32) queued tasks, so they do
    /// not all race for the same one.
    pub async fn claim(
        &self,
        agent: &str,
        worker: &str,
        lease: Duration,
        idem: Option<Idem>,
    ) -> Result<Option<Value>, ApiError> {
        // Said here, not left to each candidate's decision: a claim that no task could
        // accept would otherwise read as "nothing queued" (204).
        for (field, value) in [("agent", agent), ("worker", worker)] {
            if value.trim().is_empty() {
                return Err(
                    ApiError::bad_request(format!("{field} must not be empty")).with_param(field)
                );
            }
        }
        // A repeated claim (its answer was lost) gets the same task and lease again.
        if let Some(answer) = self.replay(idem.as_ref()).await? {
            return Ok(Some(answer.body));
        }
        let lease_ttl_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
        let command = Command::Claim {
            worker: worker.to_owned(),
            lease_ttl_ms,
        };
        let (_claiming, in_flight) = Claiming::enter(&self.claiming);
        for _ in 0..MAX_CONFLICT_RETRIES {
            let mut candidates = self
                .store
                .next_queued(agent, CLAIM_CANDIDATES)
                .await
                .map_err(store_error)?;
            if candidates.is_empty() {
                return Ok(None);
            }
            // A lone claimer takes the oldest task. Claimers running at once would
            // all race for that one and all but one lose a write; each starts at
            // a random one of the first `in_flight` candidates instead.
            let spread = candidates.len().min(in_flight);
            if spread > 1 {
                let start = (uuid::Uuid::new_v4().as_u128() % spread as u128) as usize;
                candidates.rotate_left(start);
            }
            for row in candidates {
                let task = task_of(&row)?;
                let ctx = Ctx {
                    now_ms: now_ms(),
                    new_token: uuid::Uuid::new_v4().simple().to_string(),
                };
                let Ok(decision) = decide(Some(&task), &command, &ctx) else {
                    continue;
                };
                let Some(after) = fold(Some(task), &decision.events, ctx.now_ms) else {
                    continue;
                };
                // The answer is built before the write so that it can be the
                // idempotency record of this claim.
                let claimed = after.state == TaskState::Running;
                let answer = Answer {
                    status: 200,
                    body: if claimed {
                        self.claimed(&after, &ctx.new_token).await?
                    } else {
                        Value::Null
                    },
                };
                let record = idem.as_ref().filter(|_| claimed);
                match self
                    .write(
                        Some(row.version),
                        &after,
                        &decision.events,
                        Vec::new(),
                        record,
                        &answer,
                    )
                    .await
                {
                    Ok(()) if claimed => return Ok(Some(answer.body)),
                    // The task was past its deadline and went to the DLQ instead; try the next.
                    Ok(()) => {
                        if let Some(m) = &self.metrics {
                            m.finished(&after);
                        }
                    }
                    // Another worker took this task, or the same claim won a race.
                    Err(WriteError::Conflict) => {
                        if let Some(answer) = self.replay(idem.as_ref()).await? {
                            return Ok(Some(answer.body));
                        }
                    }
                    Err(WriteError::Api(e)) => return Err(e),
                }
            }
        }
        Ok(None)
    }

    /// The claim answer: the task, its lease `token` (only the worker gets it: the log and
    /// the task keep its hash) and its newest checkpoint with state.
    async fn claimed(&self, task: &Task, token: &str) -> Result<Value, ApiError> {
        let checkpoint = match &task.checkpoint {
            Some(c) => {
                let bytes = self.store.blob(&c.state_hash).await.map_err(store_error)?;
                let state = bytes
                    .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                    .unwrap_or(Value::Null);
                json!({"seq": c.seq, "label": c.label, "state": state})
            }
            None => Value::Null,
        };
        let mut body = public(task);
        if let Value::Object(map) = &mut body {
            map.insert("lease_token".to_owned(), json!(token));
            map.insert("checkpoint".to_owned(), checkpoint);
        }
        Ok(body)
    }

    /// Runs the timers that are due: expires leases and approvals, and ends the unfinished
    /// tasks past their deadline (queued, running or awaiting a human; DESIGN §5 "Nothing is
    /// lost": they go to the DLQ instead of waiting forever). Returns how many tasks it ran a
    /// timer on.
    pub async fn sweep(&self) -> Result<usize, ApiError> {
        let now = now_ms();
        let leases = self
            .store
            .expired_leases(now, SWEEP_BATCH)
            .await
            .map_err(store_error)?;
        let mut changed = self.timer(&leases, &Command::ExpireLease).await;
        let approvals = self
            .store
            .expired_approvals(now, SWEEP_BATCH)
            .await
            .map_err(store_error)?;
        changed += self.timer(&approvals, &Command::ExpireApproval).await;
        let overdue = self
            .store
            .expired_deadlines(now, SWEEP_BATCH)
            .await
            .map_err(store_error)?;
        changed += self.timer(&overdue, &Command::CheckDeadline).await;
        Ok(changed)
    }

    /// Runs the timer `command` on each of `rows`' tasks; how many ran without an error.
    async fn timer(&self, rows: &[TaskRow], command: &Command) -> usize {
        let mut ran = 0;
        for row in rows {
            let r = self
                .run(&row.id, command, None, None, |t, _| public(t))
                .await;
            ran += usize::from(r.is_ok());
        }
        ran
    }

    /// Prunes finished tasks past `retention` and checkpoints beyond
    /// `keep_checkpoints`; does nothing when neither is configured.
    pub async fn prune(&self) -> Result<Option<keel_store::PruneReport>, ApiError> {
        let s = &self.settings;
        if s.retention.is_none() && s.keep_checkpoints.is_none() {
            return Ok(None);
        }
        let finished_before_ms = s
            .retention
            .map(|r| now_ms().saturating_sub(i64::try_from(r.as_millis()).unwrap_or(i64::MAX)));
        let policy = keel_store::PrunePolicy {
            finished_before_ms,
            keep_checkpoints: s.keep_checkpoints,
        };
        self.store
            .prune(policy)
            .await
            .map(Some)
            .map_err(store_error)
    }

    /// Refreshes the DLQ and approval gauges.
    async fn refresh_depths(&self) {
        let Some(m) = &self.metrics else { return };
        match self.store.count_by_state().await {
            Ok(counts) => m.set_depths(&counts),
            Err(e) => tracing::warn!(error = %e, "cannot count tasks by state"),
        }
    }

    /// Runs [`Supervisor::sweep`] every `every` until `cancel` fires.
    pub async fn sweep_forever(
        self: Arc<Self>,
        every: Duration,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Gauges every few seconds, retention every minute: both scan more than a sweep.
        let mut gauges = tokio::time::interval(Duration::from_secs(5));
        let mut retention = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tick.tick() => {
                    if let Err(e) = self.sweep().await {
                        tracing::warn!(error = %e.message, "sweeping expired leases, approvals and deadlines failed");
                    }
                }
                _ = gauges.tick() => self.refresh_depths().await,
                _ = retention.tick() => match self.prune().await {
                    Ok(Some(r)) if r.tasks + r.checkpoints + r.blobs > 0 => tracing::info!(
                        tasks = r.tasks, checkpoints = r.checkpoints, blobs = r.blobs, bytes = r.blob_bytes,
                        "pruned finished tasks and old checkpoints"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e.message, "pruning failed"),
                },
            }
        }
    }
}

enum WriteError {
    Conflict,
    Api(ApiError),
}

#[cfg(test)]
mod http_tests;
#[cfg(test)]
mod tests;
