//! The worker protocol and operator endpoints over HTTP (DESIGN §3 "Tasks").
//!
//! Handlers parse and check bodies (400 in OpenAI shape for anything
//! malformed), turn them into [`Command`]s and let [`Supervisor`] run them.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use keel_core::ApiError;
use keel_store::{EventQuery, TaskQuery};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::{Answer, Idem, KeyOwner, Supervisor, public};
use crate::command::{Asker, Command, Directive};
use crate::task::{ApprovalDecision, ApprovalDefault, TaskState};

type Sv = State<Arc<Supervisor>>;

/// Routes of the task API, the approval queue, the DLQ and the audit check.
pub fn router(supervisor: Arc<Supervisor>) -> Router {
    Router::new()
        .route("/v1/tasks", post(create).get(list))
        .route("/v1/tasks/claim", post(claim))
        .route("/v1/tasks/{id}", get(show))
        .route("/v1/tasks/{id}/events", get(events))
        .route("/v1/tasks/{id}/heartbeat", post(heartbeat))
        .route("/v1/tasks/{id}/steps", post(step))
        .route("/v1/tasks/{id}/checkpoints", post(checkpoint))
        .route("/v1/tasks/{id}/complete", post(complete))
        .route("/v1/tasks/{id}/fail", post(fail))
        .route("/v1/tasks/{id}/requeue", post(requeue))
        .route("/v1/tasks/{id}/cancel", post(cancel))
        .route("/v1/tasks/{id}/approvals", post(request_approval))
        .route("/v1/approvals", get(approvals))
        .route("/v1/approvals/{id}", post(decide_approval))
        .route("/v1/dlq", get(dlq))
        .route("/v1/dlq/{id}/requeue", post(dlq_requeue))
        .route("/v1/dlq/{id}/discard", post(dlq_discard))
        .route("/v1/audit/verify", get(audit_verify))
        .with_state(supervisor)
}

/// Operator calls need `Authorization: Bearer <admin token>` when
/// `server.admin_token_env` is configured (other parts of keel check theirs with it too).
pub fn admin(sv: &Supervisor, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = sv.admin_token() else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(keel_core::bearer_token);
    match given {
        Some(given) if constant_time_eq(given.as_bytes(), expected.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::unauthorized(
            "wrong admin token: it is not the one in the server's admin_token_env variable",
        )),
        None => Err(ApiError::unauthorized(
            "this operator call needs the admin token: send 'Authorization: Bearer <token>' (the CLI reads KEEL_ADMIN_TOKEN)",
        )),
    }
}

/// Creating and claiming tasks of `agent` needs that agent's key when agent
/// keys are configured (the admin token also passes). Calls on a claimed task
/// carry its lease token instead, which is the capability.
fn worker(sv: &Supervisor, headers: &HeaderMap, agent: &str) -> Result<(), ApiError> {
    let key = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(keel_core::bearer_token);
    match sv.agent_of_key(key) {
        KeyOwner::NoKeysConfigured => Ok(()),
        KeyOwner::Agent(owner) if owner == agent => Ok(()),
        KeyOwner::Agent(owner) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            format!("this key belongs to agent {owner:?}, not {agent:?}"),
        )),
        KeyOwner::Unknown if sv.admin_token().is_some() && admin(sv, headers).is_ok() => Ok(()),
        KeyOwner::Unknown => Err(ApiError::unauthorized(
            "missing or unknown agent key: send 'Authorization: Bearer <key>' of the task's agent",
        )),
    }
}

/// Compares without stopping at the first difference.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Who may make a call.
#[derive(Clone, Copy)]
enum Caller {
    /// A worker: no admin token needed.
    Worker,
    /// An operator: the admin token, when one is configured.
    Operator,
}

/// Parses a body of type `B`, turns it into a command on task `id`, runs it
/// (idempotent under `scope` when the caller sent an `Idempotency-Key`), and
/// answers with the task.
async fn task_call<B: DeserializeOwned>(
    sv: &Supervisor,
    id: &str,
    scope: String,
    caller: Caller,
    headers: &HeaderMap,
    body: &Bytes,
    make: impl FnOnce(B) -> Command,
) -> Response {
    answer(
        async {
            if let Caller::Operator = caller {
                admin(sv, headers)?;
            }
            let command = make(parse(body)?);
            sv.run(id, &command, idem(headers, scope, body), None, |t, _| {
                public(t)
            })
            .await
        }
        .await,
    )
}

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    if body.is_empty() {
        return serde_json::from_slice(b"{}")
            .map_err(|e| ApiError::bad_request(format!("request body is required: {e}")));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

/// The longest lease, deadline or approval timeout a call may ask for: a year. Longer is a
/// mistake (a lease that never runs out keeps a dead worker's task forever), and far past it
/// times overflow.
const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

fn duration(text: &str, field: &'static str) -> Result<Duration, ApiError> {
    let parsed = humantime::parse_duration(text).map_err(|e| {
        ApiError::bad_request(format!(
            "{field}: {text:?} is not a duration like \"30s\": {e}"
        ))
        .with_param(field)
    })?;
    if parsed > MAX_DURATION {
        return Err(ApiError::bad_request(format!(
            "{field}: {text:?} is longer than the most keel takes, 366d"
        ))
        .with_param(field));
    }
    // Times are kept in milliseconds: less would be 0ms.
    if parsed.is_zero() {
        return Err(
            ApiError::bad_request(format!("{field}: {text:?} must be longer than 0s"))
                .with_param(field),
        );
    }
    if parsed < Duration::from_millis(1) {
        return Err(ApiError::bad_request(format!(
            "{field}: {text:?} is shorter than 1ms, the least keel takes"
        ))
        .with_param(field));
    }
    Ok(parsed)
}

/// The call's `Idempotency-Key` under `scope`, with the hash of its request `body`.
fn idem(headers: &HeaderMap, scope: String, body: &Bytes) -> Option<Idem> {
    let key = headers.get("idempotency-key")?.to_str().ok()?.trim();
    (!key.is_empty()).then(|| Idem::new(scope, key, request_of(body)))
}

/// The request body as JSON, for its idempotency hash: `{}` when empty (as [`parse`] reads
/// it), the text as a JSON string when it is not JSON (such a body is refused anyway).
fn request_of(body: &Bytes) -> Value {
    if body.is_empty() {
        return json!({});
    }
    serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
}

fn answer(a: Result<Answer, ApiError>) -> Response {
    match a {
        Ok(a) => {
            let status = StatusCode::from_u16(a.status).unwrap_or(StatusCode::OK);
            (status, axum::Json(a.body)).into_response()
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    agent: String,
    #[serde(default)]
    input: Value,
    id: Option<String>,
    idempotency_key: Option<String>,
    deadline: Option<String>,
    max_attempts: Option<u32>,
}

async fn create(State(sv): Sv, headers: HeaderMap, body: Bytes) -> Response {
    answer(create_inner(&sv, &headers, &body).await)
}

async fn create_inner(
    sv: &Supervisor,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Answer, ApiError> {
    let b: CreateBody = parse(body)?;
    if b.agent.trim().is_empty() {
        return Err(ApiError::bad_request("agent must not be empty").with_param("agent"));
    }
    worker(sv, headers, &b.agent)?;
    let limits = sv.limits(&b.agent);
    let now = super::now_ms();
    let timeout = match &b.deadline {
        Some(d) => Some(duration(d, "deadline")?),
        None => limits.task_timeout,
    };
    let deadline_ms =
        timeout.map(|d| now.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)));
    sv.preflight(&b.agent, &b.input)?;
    let max_attempts = b.max_attempts.unwrap_or(limits.max_attempts);
    if max_attempts == 0 {
        return Err(
            ApiError::unprocessable("max_attempts must be at least 1").with_param("max_attempts")
        );
    }
    let id =
        b.id.unwrap_or_else(|| format!("task_{}", uuid::Uuid::now_v7().simple()));
    let scope = format!("create {}", b.agent);
    let key = match b.idempotency_key {
        Some(key) => Some(Idem::new(scope, key, request_of(body))),
        None => idem(headers, scope, body),
    };
    let command = Command::Create {
        id,
        agent: b.agent,
        input: b.input,
        deadline_ms,
        max_attempts,
        max_steps: limits.max_steps,
    };
    sv.create(command, key).await
}

#[derive(Deserialize)]
struct ListQuery {
    state: Option<String>,
    agent: Option<String>,
    /// Read as text, so that `limit=abc` gets keel's message, not the query parser's.
    limit: Option<String>,
    cursor: Option<String>,
    /// `desc` (newest first) or `asc` (oldest first), as OpenAI's list endpoints take it.
    order: Option<String>,
}

/// `GET /v1/tasks`: newest first unless `order=asc`.
async fn list(State(sv): Sv, headers: HeaderMap, Query(q): Query<ListQuery>) -> Response {
    if let Err(e) = admin(&sv, &headers) {
        return e.into_response();
    }
    let state = q.state.clone();
    page(&sv, state, q, true).await
}

/// Whether `order` (`desc` or `asc`; absent: `newest_first_by_default`) lists newest first.
fn newest_first(order: Option<&str>, newest_first_by_default: bool) -> Result<bool, ApiError> {
    match order {
        None => Ok(newest_first_by_default),
        Some("desc") => Ok(true),
        Some("asc") => Ok(false),
        Some(other) => Err(ApiError::bad_request(format!(
            "unknown order {other:?}: expected desc (newest first) or asc (oldest first)"
        ))
        .with_param("order")
        .with_code("invalid_value")),
    }
}

/// The page size `limit` asks for: 1 to [`keel_store::MAX_PAGE`], [`keel_store::DEFAULT_PAGE`]
/// when absent.
fn page_size(limit: Option<&str>) -> Result<usize, ApiError> {
    let Some(text) = limit else {
        return Ok(keel_store::DEFAULT_PAGE);
    };
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=keel_store::MAX_PAGE).contains(&n) => Ok(n),
        _ => Err(ApiError::bad_request(format!(
            "limit {text} is not a number from 1 to {}: the tasks one page holds",
            keel_store::MAX_PAGE
        ))
        .with_param("limit")
        .with_code("invalid_value")),
    }
}

/// One page of tasks in `state` per the list query `q` (its own `state` is not read).
async fn page(
    sv: &Supervisor,
    state: Option<String>,
    q: ListQuery,
    newest_first_by_default: bool,
) -> Response {
    let ListQuery {
        agent,
        limit,
        cursor,
        order,
        ..
    } = q;
    let newest_first = match newest_first(order.as_deref(), newest_first_by_default) {
        Ok(newest_first) => newest_first,
        Err(e) => return e.into_response(),
    };
    let limit = match page_size(limit.as_deref()) {
        Ok(limit) => limit,
        Err(e) => return e.into_response(),
    };
    const STATES: [&str; 6] = [
        "queued",
        "running",
        "succeeded",
        "dead",
        "awaiting_human",
        "cancelled",
    ];
    if let Some(state) = state.as_deref()
        && !STATES.contains(&state)
    {
        return ApiError::bad_request(format!(
            "unknown task state {state:?}: expected one of {}",
            STATES.join(", ")
        ))
        .with_param("state")
        .with_code("invalid_value")
        .into_response();
    }
    let query = TaskQuery {
        state,
        agent,
        limit,
        cursor,
        newest_first,
    };
    match sv.store().tasks(query).await {
        Ok(page) => {
            let tasks: Vec<Value> = page
                .tasks
                .iter()
                .filter_map(|row| {
                    serde_json::from_value::<crate::task::Task>(row.snapshot.clone()).ok()
                })
                .map(|t| public(&t))
                .collect();
            axum::Json(json!({"tasks": tasks, "next": page.next})).into_response()
        }
        Err(keel_store::StoreError::InvalidCursor) => ApiError::bad_request(
            "invalid cursor: pass the `next` value of the previous page unchanged, with the same `order`",
        )
        .with_param("cursor")
        .with_code("invalid_value")
        .into_response(),
        Err(e) => super::store_error(e).into_response(),
    }
}

async fn show(State(sv): Sv, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(e) = admin(&sv, &headers) {
        return e.into_response();
    }
    match sv.get(&id).await {
        Ok(task) => axum::Json(public(&task)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The task's log as NDJSON, one event per line, oldest first.
async fn events(State(sv): Sv, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(e) = admin(&sv, &headers) {
        return e.into_response();
    }
    // A task id the supervisor does not know may still be a label a client gave its model
    // calls (`x-keel-task`): their events are that label's log.
    let unknown = match sv.get(&id).await {
        Ok(_) => None,
        Err(e) if e.status == StatusCode::NOT_FOUND => Some(e),
        Err(e) => return e.into_response(),
    };
    let query = EventQuery {
        task_id: Some(id),
        ..EventQuery::default()
    };
    let events = match sv.store().events(query).await {
        Ok(events) => events,
        Err(e) => return super::store_error(e).into_response(),
    };
    if let (true, Some(unknown)) = (events.is_empty(), unknown) {
        return unknown.into_response();
    }
    let mut out = Vec::new();
    for e in events {
        if serde_json::to_writer(&mut out, &e).is_ok() {
            out.push(b'\n');
        }
    }
    let mut r = Response::new(Body::from(out));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimBody {
    agent: String,
    worker: String,
    lease: Option<String>,
}

async fn claim(State(sv): Sv, headers: HeaderMap, body: Bytes) -> Response {
    let result = async {
        let b: ClaimBody = parse(&body)?;
        worker(&sv, &headers, &b.agent)?;
        let lease = duration(b.lease.as_deref().unwrap_or("30s"), "lease")?;
        let key = idem(&headers, format!("POST /v1/tasks/claim {}", b.agent), &body);
        sv.claim(&b.agent, &b.worker, lease, key).await
    }
    .await;
    match result {
        Ok(Some(task)) => axum::Json(task).into_response(),
        Ok(None) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

fn directive_body(task: &crate::task::Task, directive: Option<Directive>) -> Value {
    json!({
        "directive": directive.unwrap_or(Directive::Continue),
        "state": task.state,
        "steps": task.steps,
        "lease_expires_at_ms": task.lease.as_ref().map(|l| l.expires_at_ms),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    lease_token: String,
}

async fn heartbeat(
    State(sv): Sv,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let scope = format!("POST /v1/tasks/{id}/heartbeat");
    answer(
        async {
            let b: TokenBody = parse(&body)?;
            sv.run(
                &id,
                &Command::Heartbeat {
                    token: b.lease_token,
                },
                idem(&headers, scope, &body),
                None,
                directive_body,
            )
            .await
        }
        .await,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StepBody {
    lease_token: String,
    #[serde(default = "default_step_kind")]
    kind: String,
    #[serde(default)]
    summary: String,
    progress: Option<f64>,
    confidence: Option<f64>,
}

fn default_step_kind() -> String {
    "step".to_owned()
}

async fn step(State(sv): Sv, Path(id): Path<String>, headers: HeaderMap, body: Bytes) -> Response {
    let scope = format!("POST /v1/tasks/{id}/steps");
    answer(
        async {
            let b: StepBody = parse(&body)?;
            let command = Command::Step {
                token: b.lease_token,
                kind: b.kind,
                summary: b.summary,
                progress: b.progress,
                confidence: b.confidence,
            };
            sv.run(
                &id,
                &command,
                idem(&headers, scope, &body),
                None,
                directive_body,
            )
            .await
        }
        .await,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointBody {
    lease_token: String,
    state: Value,
    label: Option<String>,
}

async fn checkpoint(
    State(sv): Sv,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let scope = format!("POST /v1/tasks/{id}/checkpoints");
    answer(
        async {
            let b: CheckpointBody = parse(&body)?;
            let state = serde_json::to_vec(&b.state)
                .map_err(|e| ApiError::bad_request(format!("state: {e}")))?;
            let limit = sv.max_checkpoint_bytes();
            if state.len() > limit {
                let mut e = ApiError::too_large(limit);
                e.message = format!(
                    "checkpoint state is {} bytes, over the limit of {limit} bytes",
                    state.len()
                );
                return Err(e.with_param("state"));
            }
            let state_hash = keel_store::blob_hash(&state);
            let size = state.len() as u64;
            let command = Command::Checkpoint {
                token: b.lease_token,
                label: b.label,
                state_hash,
                size,
            };
            let respond =
                |t: &crate::task::Task, _| json!({"seq": t.checkpoint.as_ref().map(|c| c.seq)});
            sv.run(
                &id,
                &command,
                idem(&headers, scope, &body),
                Some(Bytes::from(state)),
                respond,
            )
            .await
        }
        .await,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompleteBody {
    lease_token: String,
    #[serde(default)]
    output: Value,
    confidence: Option<f64>,
}

async fn complete(
    State(sv): Sv,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let scope = format!("POST /v1/tasks/{id}/complete");
    task_call(
        &sv,
        &id,
        scope,
        Caller::Worker,
        &headers,
        &body,
        |b: CompleteBody| Command::Complete {
            token: b.lease_token,
            output: b.output,
            confidence: b.confidence,
        },
    )
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FailBody {
    lease_token: String,
    #[serde(default)]
    error: Value,
    #[serde(default = "yes")]
    retryable: bool,
}

fn yes() -> bool {
    true
}

async fn fail(State(sv): Sv, Path(id): Path<String>, headers: HeaderMap, body: Bytes) -> Response {
    let scope = format!("POST /v1/tasks/{id}/fail");
    task_call(
        &sv,
        &id,
        scope,
        Caller::Worker,
        &headers,
        &body,
        |b: FailBody| Command::Fail {
            token: b.lease_token,
            error: b.error,
            retryable: b.retryable,
        },
    )
    .await
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReasonBody {
    reason: Option<String>,
}

async fn requeue(
    State(sv): Sv,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let scope = format!("POST /v1/tasks/{id}/requeue");
    task_call(
        &sv,
        &id,
        scope,
        Caller::Operator,
        &headers,
        &body,
        |b: ReasonBody| Command::Requeue { reason: b.reason },
    )
    .await
}

async fn cancel(
    State(sv): Sv,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let scope = format!("POST /v1/tasks/{id}/cancel");
    task_call(
        &sv,
        &id,
        scope,
        Caller::Operator,
        &headers,
        &body,
        |b: ReasonBody| Command::Cancel { reason: b.reason },
    )
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApprovalRequestBody {
    lease_token: Option<String>,
    reason: String,
    #[serde(default)]
    context: Value,
    timeout: Option<String>,
    #[serde(default)]
    default: Option<ApprovalDefault>,
}

async fn request_approval(
    State(sv): Sv,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let scope = format!("POST /v1/tasks/{id}/approvals");
    answer(async {
        let b: ApprovalRequestBody = parse(&body)?;
        // Without a lease token, putting a task before a human is an operator's call.
        if b.lease_token.is_none() {
            admin(&sv, &headers)?;
        }
        let timeout = duration(b.timeout.as_deref().unwrap_or("24h"), "timeout")?;
        let asker = match b.lease_token {
            Some(token) => Asker::Holder { token },
            None => Asker::Operator,
        };
        let command = Command::RequestApproval {
            asker,
            approval_id: format!("apr_{}", uuid::Uuid::now_v7().simple()),
            reason: b.reason,
            context: b.context,
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            default: b.default.unwrap_or(ApprovalDefault::Deny),
        };
        let respond = |t: &crate::task::Task, _| json!({"pending_approval": t.approval.as_ref().map(|a| a.id.clone()), "task": public(t)});
        let mut a = sv.run(&id, &command, idem(&headers, scope, &body), None, respond).await?;
        a.status = 202;
        Ok(a)
    }.await)
}

/// Tasks awaiting a human, newest last (few by nature; scanned, not indexed): every page,
/// so none past the first is left undecidable.
pub(super) async fn awaiting(sv: &Supervisor) -> Result<Vec<crate::task::Task>, ApiError> {
    let mut tasks = Vec::new();
    let mut cursor = None;
    loop {
        let query = TaskQuery {
            state: Some(TaskState::AwaitingHuman.as_str().to_owned()),
            agent: None,
            limit: 1000,
            cursor,
            newest_first: false,
        };
        let page = sv.store().tasks(query).await.map_err(super::store_error)?;
        tasks.extend(
            page.tasks
                .iter()
                .filter_map(|r| serde_json::from_value(r.snapshot.clone()).ok()),
        );
        match page.next {
            Some(next) => cursor = Some(next),
            None => return Ok(tasks),
        }
    }
}

async fn approvals(State(sv): Sv, headers: HeaderMap) -> Response {
    if let Err(e) = admin(&sv, &headers) {
        return e.into_response();
    }
    match awaiting(&sv).await {
        Ok(tasks) => {
            let list: Vec<Value> = tasks
                .iter()
                .filter_map(|t| {
                    let a = t.approval.as_ref()?;
                    Some(json!({
                        "id": a.id, "task": t.id, "agent": t.agent, "reason": a.reason, "context": a.context,
                        "requested_at_ms": a.requested_at_ms, "expires_at_ms": a.expires_at_ms(),
                        "default": a.default, "escalated": a.escalated,
                    }))
                })
                .collect();
            axum::Json(json!({"approvals": list})).into_response()
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionBody {
    decision: ApprovalDecision,
    note: Option<String>,
    by: Option<String>,
}

/// Decides a pending approval. One that was decided already (or whose task left the queue)
/// is a 409 saying how; an id never requested is a 404.
async fn decide_approval(
    State(sv): Sv,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let scope = format!("POST /v1/approvals/{id}");
    answer(
        async {
            admin(&sv, &headers)?;
            let b: DecisionBody = parse(&body)?;
            let tasks = awaiting(&sv).await?;
            let Some(task) = tasks
                .iter()
                .find(|t| t.approval.as_ref().is_some_and(|a| a.id == id))
            else {
                if let Some(a) = sv
                    .replay(idem(&headers, scope.clone(), &body).as_ref())
                    .await?
                {
                    return Ok(a);
                }
                return Err(super::approvals::not_pending(&sv, &id).await?);
            };
            let command = Command::DecideApproval {
                approval_id: id.clone(),
                decision: b.decision,
                by: b.by.unwrap_or_else(|| "operator".to_owned()),
                note: b.note,
            };
            let decided = sv
                .run(
                    &task.id,
                    &command,
                    idem(&headers, scope, &body),
                    None,
                    |t, _| public(t),
                )
                .await;
            match decided {
                // Decided (or ended) meanwhile, by another call or a timer: say how.
                Err(e) if not_decidable(&e) => {
                    let why = super::approvals::not_pending(&sv, &id).await?;
                    Err(if why.status == StatusCode::CONFLICT {
                        why
                    } else {
                        e
                    })
                }
                other => other,
            }
        }
        .await,
    )
}

/// A refusal of a decision that finding the approval's fate can explain: not found (another
/// approval is pending now) or a conflict (none is), but not a task too busy to write.
fn not_decidable(e: &ApiError) -> bool {
    matches!(e.status.as_u16(), 404 | 409) && e.code != Some("task_busy")
}

async fn dlq(State(sv): Sv, headers: HeaderMap, Query(q): Query<ListQuery>) -> Response {
    if let Err(e) = admin(&sv, &headers) {
        return e.into_response();
    }
    // Dead letters are worked through oldest first, unless `order=desc`.
    page(&sv, Some(TaskState::Dead.as_str().to_owned()), q, false).await
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ByBody {
    by: Option<String>,
    note: Option<String>,
}

async fn dlq_requeue(
    State(sv): Sv,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let scope = format!("POST /v1/dlq/{id}/requeue");
    task_call(
        &sv,
        &id,
        scope,
        Caller::Operator,
        &headers,
        &body,
        |b: ByBody| Command::DlqRequeue {
            by: b.by.unwrap_or_else(|| "operator".to_owned()),
            note: b.note,
        },
    )
    .await
}

async fn dlq_discard(
    State(sv): Sv,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let scope = format!("POST /v1/dlq/{id}/discard");
    task_call(
        &sv,
        &id,
        scope,
        Caller::Operator,
        &headers,
        &body,
        |b: ByBody| Command::DlqDiscard {
            by: b.by.unwrap_or_else(|| "operator".to_owned()),
            note: b.note,
        },
    )
    .await
}

async fn audit_verify(State(sv): Sv, headers: HeaderMap) -> Response {
    if let Err(e) = admin(&sv, &headers) {
        return e.into_response();
    }
    match sv.store().verify().await {
        Ok(keel_store::Verify::Intact { events }) => {
            axum::Json(json!({"intact": true, "events": events})).into_response()
        }
        Ok(keel_store::Verify::Broken { seq, reason }) => {
            axum::Json(json!({"intact": false, "first_broken_seq": seq, "reason": reason}))
                .into_response()
        }
        Err(e) => super::store_error(e).into_response(),
    }
}
