//! HTTP surface of the gateway: OpenAI-compatible endpoints, health and metrics.
//!
//! Handlers parse and check the request, name the agent, run the route
//! executor, and turn its [`Answer`] into a response with keel's headers. All
//! events of a call are appended in one batch before the answer is released, so
//! a client that saw a response can find its `llm_call` in the log.

use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use keel_core::{EventKind, NewEvent};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::body::{RawObject, StreamUsage};
use crate::chaos::{HeaderFault, header as chaos_header};
use crate::error::ApiError;
use crate::finish::{Finish, count_request};
use crate::output::OutputCheck;
use crate::provider::Endpoint;
use crate::route::{Answer, Attribution, CallLog, Executor};
use crate::{Gateway, payload};

/// The gateway's router: `/v1/...`, the same under `/tasks/{task_id}/v1/...`,
/// and `/metrics`, `/healthz`, `/readyz`. Unknown paths answer 404 in OpenAI shape.
pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/v1/models/{*model}", get(model))
        .route("/tasks/{task_id}/v1/chat/completions", post(task_chat))
        .route("/tasks/{task_id}/v1/embeddings", post(task_embeddings))
        .route("/tasks/{task_id}/v1/models", get(models))
        .route("/tasks/{task_id}/v1/models/{*model}", get(task_model))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(with_body_rules(
            crate::tools::routes(),
            gateway.max_body_bytes,
            gateway.body_timeout,
        ))
        .fallback(not_found)
        .with_state(gateway)
}

/// `api` (handlers that read their bodies with axum: the tool, task and operator APIs)
/// under the server's body rules, as the model endpoints' `read_body` keeps them: bodies of
/// at most `server.max_body_bytes`, arrived whole within `server.body_timeout` of their
/// headers (see the `body_deadline` module), and axum's own rejections (a body over the limit, a
/// query string that does not parse) in the OpenAI shape like every other error.
pub fn with_body_rules<S: Clone + Send + Sync + 'static>(
    api: Router<S>,
    max_body_bytes: usize,
    body_timeout: std::time::Duration,
) -> Router<S> {
    api.layer(axum::extract::DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            body_timeout,
            crate::body_deadline::refuse_late_bodies,
        ))
        .layer(axum::middleware::from_fn_with_state(
            max_body_bytes,
            keel_core::api_error::openai_shaped,
        ))
}

type Gw = State<Arc<Gateway>>;

async fn chat(State(gw): Gw, request: Request) -> Response {
    handle(gw, Endpoint::ChatCompletions, None, request).await
}

async fn embeddings(State(gw): Gw, request: Request) -> Response {
    handle(gw, Endpoint::Embeddings, None, request).await
}

/// A path's parameters, or the client's 400 in the OpenAI shape (axum's own refusal of a
/// path that is not UTF-8 once decoded, `/tasks/%FF/v1/...`, is plain text the SDKs
/// cannot read).
fn path_of<T>(path: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    path.map(|Path(value)| value).map_err(|rejection| {
        ApiError::bad_request(format!(
            "the URL's path is not valid: {}",
            rejection.body_text()
        ))
        .with_code("invalid_path")
    })
}

async fn task_chat(
    State(gw): Gw,
    task: Result<Path<String>, PathRejection>,
    request: Request,
) -> Response {
    task_call(gw, Endpoint::ChatCompletions, task, request).await
}

async fn task_embeddings(
    State(gw): Gw,
    task: Result<Path<String>, PathRejection>,
    request: Request,
) -> Response {
    task_call(gw, Endpoint::Embeddings, task, request).await
}

/// A model call under `/tasks/{task_id}/v1/...`, once its task id is read.
async fn task_call(
    gw: Arc<Gateway>,
    endpoint: Endpoint,
    task: Result<Path<String>, PathRejection>,
    request: Request,
) -> Response {
    match path_of(task).and_then(|task| task_label(task, "the URL's task id", "invalid_path")) {
        Ok(task) => handle(gw, endpoint, Some(task), request).await,
        Err(refused) => refused.into_response(),
    }
}

/// A task a model call names (the `/tasks/{task_id}/v1` path's id, or `x-keel-task`), as its
/// calls are recorded and looked up: not empty, and without control characters (a NUL, a
/// newline), which would make a label that reads as another in a table or a log.
pub(crate) fn task_label(task: String, what: &str, code: &'static str) -> Result<String, ApiError> {
    let problem = if task.is_empty() {
        "is empty"
    } else if task.chars().any(char::is_control) {
        "holds a control character"
    } else {
        return Ok(task);
    };
    Err(ApiError::bad_request(format!(
        "{what} {problem}; name the task with printable text"
    ))
    .with_param("task")
    .with_code(code))
}

/// The agent key check of every gateway call, for the model list too: with keys configured,
/// a caller without one learns nothing, not even the route names.
fn listing_allowed(gw: &Gateway, headers: &HeaderMap) -> Result<(), ApiError> {
    gw.agents
        .identify(
            header_str(headers, "authorization"),
            header_text(headers, "x-keel-agent")?,
        )
        .map(|_| ())
}

/// A route as OpenAI's model object.
fn model_object(route: &str) -> Value {
    json!({"id": route, "object": "model", "created": 0, "owned_by": "keel"})
}

async fn models(State(gw): Gw, headers: HeaderMap) -> Response {
    if let Err(e) = listing_allowed(&gw, &headers) {
        return e.into_response();
    }
    let data: Vec<Value> = gw.route_names().map(model_object).collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// `GET /v1/models/{model}`: one route as a model (the SDKs' `models.retrieve`).
async fn model(
    State(gw): Gw,
    headers: HeaderMap,
    model: Result<Path<String>, PathRejection>,
) -> Response {
    match path_of(model) {
        Ok(model) => one_model(&gw, &headers, &model),
        Err(refused) => refused.into_response(),
    }
}

fn one_model(gw: &Gateway, headers: &HeaderMap, model: &str) -> Response {
    if let Err(e) = listing_allowed(gw, headers) {
        return e.into_response();
    }
    if gw.routes.contains_key(model) {
        return axum::Json(model_object(model)).into_response();
    }
    ApiError::not_found(
        format!("the model {model:?} does not exist: it is not a route of this keel"),
        "model_not_found",
    )
    .with_param("model")
    .into_response()
}

async fn task_model(
    State(gw): Gw,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Response {
    match path_of(path) {
        Ok((_task, name)) => one_model(&gw, &headers, &name),
        Err(refused) => refused.into_response(),
    }
}

/// Prometheus text by default; OpenMetrics when the scraper asks for it.
async fn metrics(State(gw): Gw, headers: HeaderMap) -> Response {
    let openmetrics =
        header_str(&headers, "accept").is_some_and(|a| a.contains("application/openmetrics-text"));
    let (body, content_type) = if openmetrics {
        (
            gw.metrics.render_openmetrics(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
    } else {
        (
            gw.metrics.render(),
            "text/plain; version=0.0.4; charset=utf-8",
        )
    };
    let mut response = body.into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

async fn healthz() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn readyz(State(gw): Gw) -> Response {
    match gw.store.ping().await {
        Ok(()) => axum::Json(json!({"status": "ready"})).into_response(),
        Err(e) => {
            let mut err = ApiError::unavailable(format!("store is not ready: {e}"));
            err.code = Some("store_unavailable");
            err.into_response()
        }
    }
}

async fn not_found(request: Request) -> Response {
    ApiError::not_found(
        format!(
            "no such endpoint: {} {}",
            request.method(),
            request.uri().path()
        ),
        "unknown_url",
    )
    .into_response()
}

/// A parsed, checked gateway request.
struct Parsed {
    body: RawObject,
    route: String,
    stream: bool,
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The task `x-keel-task` names ([`task_label`]); an empty header names none.
pub(crate) fn task_header(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    match header_text(headers, "x-keel-task")? {
        None | Some("") => Ok(None),
        Some(label) => {
            task_label(label.to_owned(), "the x-keel-task header", "invalid_header").map(Some)
        }
    }
}

/// A header's value as text: any UTF-8, not only the visible ASCII `HeaderValue::to_str`
/// takes, so an agent, task or step named in another script is named all the same. A value
/// that is no UTF-8 is the client's 400, never a header silently left out (which would drop
/// a task's deadline and owner checks).
pub(crate) fn header_text<'a>(
    headers: &'a HeaderMap,
    name: &'static str,
) -> Result<Option<&'a str>, ApiError> {
    let Some(value) = headers.get(name) else {
        return Ok(None);
    };
    std::str::from_utf8(value.as_bytes())
        .map(Some)
        .map_err(|_| {
            ApiError::bad_request(format!("the {name} header is not UTF-8 text"))
                .with_param(name)
                .with_code("invalid_header")
        })
}

/// Reads a model call's body: all of it within `server.body_timeout` of its headers (a
/// client that stops sending must not hold a handler, and keel's stop, for good), and at
/// most `server.max_body_bytes`.
async fn read_body(gw: &Gateway, endpoint: Endpoint, request: Request) -> Result<Parsed, ApiError> {
    let (parts, body) = request.into_parts();
    // A compressed body is refused as such, not read as broken JSON.
    if let Some(encoding) = parts.headers.get(header::CONTENT_ENCODING)
        && !encoding.as_bytes().eq_ignore_ascii_case(b"identity")
    {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            format!(
                "the request body's Content-Encoding {:?} is not supported: send it uncompressed",
                String::from_utf8_lossy(encoding.as_bytes())
            ),
        )
        .with_code("unsupported_content_encoding"));
    }
    let limit = gw.max_body_bytes;
    let read = tokio::time::timeout(gw.body_timeout, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| crate::body_deadline::late(gw.body_timeout))?;
    let bytes = read.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            ApiError::too_large(limit)
        } else {
            ApiError::bad_request(format!("could not read the request body: {e}"))
        }
    })?;
    let parsed = parse_body(&bytes)?;
    check_required(endpoint, &parsed.body)?;
    Ok(parsed)
}

/// The endpoint's required parameter (`messages`, an array; `input`), as OpenAI checks it:
/// a request without it is the client's to fix, refused before it can spend a budget, be
/// retried, or get a route's degraded reply. Its members are the provider's to judge.
fn check_required(endpoint: Endpoint, body: &RawObject) -> Result<(), ApiError> {
    let (name, array) = match endpoint {
        Endpoint::ChatCompletions => ("messages", true),
        Endpoint::Embeddings => ("input", false),
    };
    let value = body.get(name).map(|v| v.get().trim_start());
    match value {
        None | Some("null") => Err(ApiError::bad_request(format!(
            "missing required parameter: '{name}'"
        ))
        .with_param(name)
        .with_code("missing_required_parameter")),
        Some(v) if array && !v.starts_with('[') => Err(ApiError::bad_request(format!(
            "invalid type for '{name}': expected an array of messages"
        ))
        .with_param(name)
        .with_code("invalid_type")),
        Some(_) => Ok(()),
    }
}

fn parse_body(bytes: &[u8]) -> Result<Parsed, ApiError> {
    let body = RawObject::parse(bytes).map_err(ApiError::bad_request)?;
    let route = match body
        .get("model")
        .map(|m| serde_json::from_str::<String>(m.get()))
    {
        Some(Ok(m)) if !m.is_empty() => m,
        Some(Ok(_)) => {
            return Err(
                ApiError::bad_request("'model' must be a non-empty string naming a route")
                    .with_param("model")
                    .with_code("invalid_value"),
            );
        }
        Some(Err(_)) => {
            return Err(
                ApiError::bad_request("'model' must be a non-empty string naming a route")
                    .with_param("model")
                    .with_code("invalid_type"),
            );
        }
        None => {
            return Err(ApiError::bad_request("missing required parameter: 'model'")
                .with_param("model")
                .with_code("missing_required_parameter"));
        }
    };
    // `true`, `false` or `null` (absent): anything else would silently answer a client that
    // asked to stream (`"stream": "true"`) with a whole JSON body.
    let stream = match body.get("stream").map(|s| s.get().trim()) {
        None | Some("false" | "null") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "'stream' must be true or false, not {other}"
            ))
            .with_param("stream")
            .with_code("invalid_type"));
        }
    };
    Ok(Parsed {
        body,
        route,
        stream,
    })
}

/// The request's `x-keel-chaos` fault. Read only when `[chaos]` is enabled: otherwise
/// the header is ignored, whatever it says, so a client cannot inject faults into a
/// production keel that did not opt in.
fn chaos_fault(gw: &Gateway, headers: &HeaderMap) -> Result<Option<HeaderFault>, ApiError> {
    if gw.chaos.is_none() {
        return Ok(None);
    }
    let Some(value) = headers.get(chaos_header::HEADER) else {
        return Ok(None);
    };
    let invalid = |why: String| {
        ApiError::bad_request(format!("invalid {} header: {why}", chaos_header::HEADER))
            .with_param(chaos_header::HEADER)
            .with_code("invalid_chaos_header")
    };
    let text = value
        .to_str()
        .map_err(|_| invalid("the value is not ASCII text".to_owned()))?;
    HeaderFault::parse(text).map(Some).map_err(invalid)
}

async fn handle(
    gw: Arc<Gateway>,
    endpoint: Endpoint,
    task: Option<String>,
    request: Request,
) -> Response {
    // Until the call's events are committed and it answers.
    let _call = gw.upcoming.call();
    // The SDKs wait for a `Retry-After` of up to a minute; a longer one they replace by
    // their own short backoff, which a budget's window would refuse again.
    let mut long_wait = false;
    // Boxed: the call's future is some kilobytes, and axum moves the handler's future
    // (copying it whole) before it is polled; a box moves as a pointer.
    let mut response = match Box::pin(handle_inner(&gw, endpoint, task, request)).await {
        Ok(response) => response,
        Err(e) => {
            long_wait = e.status == StatusCode::TOO_MANY_REQUESTS
                && e.retry_after.is_some_and(|secs| secs > 60);
            e.into_response()
        }
    };
    // After an upstream failure keel has retried and fallen back already, within its retry
    // budget, and a task the loop guard stopped stays stopped: the OpenAI SDKs' own retries
    // (two by default) would only multiply the load on an upstream in trouble. A budget's
    // 429 is left to the SDK, which waits for its `Retry-After` (up to a minute).
    let status = response.status();
    if status.is_server_error() || status == StatusCode::CONFLICT || long_wait {
        response
            .headers_mut()
            .insert(SHOULD_RETRY, HeaderValue::from_static("false"));
    }
    response
}

/// The header the OpenAI SDKs read before retrying an error answer: `false` stops them.
pub(crate) const SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");

async fn handle_inner(
    gw: &Arc<Gateway>,
    endpoint: Endpoint,
    task: Option<String>,
    request: Request,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    // Refused before a route is known (a wrong key, a bad body, an unknown model): counted
    // under route "none", never under the client's own `model`.
    let rejected = |e: ApiError| {
        crate::finish::count_request(gw, "none", "none", "rejected");
        e
    };
    // Authenticate before reading the body, so an unauthenticated client cannot make us buffer 4 MiB.
    let (agent, key) = gw
        .agents
        .identify_with_key(
            header_str(request.headers(), "authorization"),
            header_text(request.headers(), "x-keel-agent").map_err(rejected)?,
        )
        .map_err(rejected)?;
    // The labels a call is recorded with, read before its body.
    let step = header_text(request.headers(), "x-keel-step")
        .map_err(rejected)?
        .map(str::to_owned);
    let task = match task {
        Some(task) => Some(task),
        None => task_header(request.headers()).map_err(rejected)?,
    };
    let chaos_header = chaos_fault(gw, request.headers()).map_err(rejected)?;
    let parsed = read_body(gw, endpoint, request).await.map_err(rejected)?;
    let Some(route) = gw.routes.get(&parsed.route) else {
        let known: Vec<&str> = gw.route_names().collect();
        return Err(rejected(
            ApiError::not_found(
                format!(
                    "the model {:?} does not exist: it is not a route of this keel (routes: {})",
                    parsed.route,
                    if known.is_empty() {
                        "none configured".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
                "model_not_found",
            )
            .with_param("model"),
        ));
    };
    let who = Attribution {
        agent,
        task,
        step,
        key,
    };
    let mut task_deadline = None;
    if let Some(task) = who.task.as_deref() {
        let allowed = async {
            if let Some(facts) = gw.check_owner(task, &who.agent).await? {
                task_deadline = crate::route::task_deadline(task, &facts)?;
                gw.restore_loop_stop(task, &facts);
            }
            gw.refuse_if_looping(task).await
        }
        .await;
        if let Err(e) = allowed {
            count_request(gw, &route.name, "none", "rejected");
            return Err(e);
        }
    }
    // Only a chat completion streams: `stream` in an embeddings request is passed on, and
    // the answer read as the JSON it is.
    let stream = parsed.stream && endpoint == Endpoint::ChatCompletions;
    // Streams are not checked: their bytes reach the client as they come. A schema that is
    // none is refused before the call counts against the agent's budget.
    let output = if route.validate_output && !stream && endpoint == Endpoint::ChatCompletions {
        match OutputCheck::from_request(&parsed.body) {
            Ok(check) => check,
            Err(e) => {
                count_request(gw, &route.name, "none", "rejected");
                return Err(ApiError::bad_request(e).with_param("response_format"));
            }
        }
    } else {
        None
    };
    let mut log = CallLog::new(who);
    let mut parsed = parsed;
    if endpoint == Endpoint::ChatCompletions {
        screen_input(gw, &route.name, &mut parsed, &mut log).await?;
    }
    match gw.agents.check(
        &log.who.agent,
        log.who.key.as_deref(),
        crate::agents::wall_now(),
    ) {
        Ok(warnings) => {
            for w in warnings {
                log.push(EventKind::AlertRaised, budget_warning(&log.who.agent, &w));
            }
        }
        Err(over) => {
            log.push(
                EventKind::BudgetExceeded,
                json!({"agent": log.who.agent, "key": over.key, "unit": over.unit.as_str(), "limit": over.limit, "used": over.used, "route": route.name}),
            );
            let _ = gw
                .record_call(std::mem::take(&mut log.events), Vec::new(), None)
                .await;
            count_request(gw, &route.name, "none", "rejected");
            return Err(ApiError::budget(
                over.message(&log.who.agent),
                over.retry_after,
            ));
        }
    }
    let recorded = if gw.record_payloads {
        payload::request(&parsed.body)
    } else {
        payload::Recorded::default()
    };
    // A stream reports its tokens only when asked to; keel asks (budgets and metrics
    // need them) and keeps the extra usage chunk from a client that did not.
    let asked = stream.then(|| parsed.body.ask_for_stream_usage());
    let hide_usage = matches!(asked, Some(StreamUsage::Merged | StreamUsage::Added));
    let executor = Executor {
        route,
        metrics: &gw.metrics,
        transitions: &gw.transitions,
        node: &gw.node,
        clock: gw.clock.as_ref(),
        chaos: gw.chaos.as_ref(),
        chaos_header,
        output: output.as_ref(),
        keep_text: gw.record_payloads,
        task_deadline,
        // Only a member wholly keel's is left out again for a target that refuses it.
        asked_stream_usage: asked == Some(StreamUsage::Added),
    };
    let mut guard = CallGuard {
        gw: Arc::clone(gw),
        route: route.name.clone(),
        started,
        log: Some(log),
    };
    // The call's `total` runs from here (the body is read): the executor's and, for a
    // stream, its pump's.
    let call_started = Instant::now();
    let answer = match guard.log.as_mut() {
        Some(log) => executor.run(endpoint, &parsed.body, stream, log).await,
        None => return Err(ApiError::internal("call log missing")),
    };
    let Some(log) = guard.log.take() else {
        return Err(ApiError::internal("call log missing"));
    };
    let ctx = Finish {
        recorded,
        gw: Arc::clone(gw),
        route_name: route.name.clone(),
        route_metrics: Arc::clone(&route.metrics),
        started,
        call_started,
        stream,
        hide_usage,
    };
    Ok(match answer {
        Answer::Json {
            target,
            body,
            usage,
            record,
            passed,
            fallback,
        } => {
            let mut log = log;
            // An answer without `usage` is billed all the same: a chat's is estimated.
            let usage = match usage {
                None if endpoint == Endpoint::ChatCompletions => {
                    log.usage_estimated = true;
                    Some(crate::usage::estimate::answer(&parsed.body, &body))
                }
                usage => usage,
            };
            ctx.json(route, log, &target, (body, record, passed), usage, fallback)
                .await
        }
        Answer::Stream {
            first,
            rest,
            passed,
            fallback,
            attempt,
        } => ctx.stream(
            route,
            log,
            (first, rest, passed, attempt),
            fallback,
            task_deadline,
            // What an estimate of the prompt reads, should no usage come: not the whole body.
            crate::body::RawObject(
                parsed
                    .body
                    .0
                    .into_iter()
                    .filter(|(key, _)| matches!(key.as_str(), "messages" | "tools" | "functions"))
                    .collect(),
            ),
        ),
        Answer::Exhausted {
            last,
            timed_out,
            refused,
            account,
        } => {
            ctx.exhausted(route, endpoint, log, last, timed_out, (refused, account))
                .await
        }
        Answer::Fatal { error, fallback } => ctx.fatal(route, log, error, fallback).await,
    })
}

/// Screens the newest user message of a chat call per the agent's `screen_input`: flag
/// (noted in `llm_call.injection`), strip (the suspicious spans replaced before the model
/// sees them), or block (400 `prompt_injection`, `action_blocked`).
async fn screen_input(
    gw: &Gateway,
    route: &str,
    parsed: &mut Parsed,
    log: &mut CallLog,
) -> Result<(), ApiError> {
    use keel_config::InjectionAction;
    let action = gw.agents.screen_input(&log.who.agent);
    if action == InjectionAction::Off {
        return Ok(());
    }
    let Some(found) = crate::guard::input::screen(&parsed.body) else {
        return Ok(());
    };
    // A message `strip` cannot rewrite (one that cannot be read) is blocked instead: it
    // must not reach the model as it came.
    let stripped = match action {
        InjectionAction::Strip => crate::guard::input::strip(&parsed.body),
        _ => None,
    };
    let action = match (action, &stripped) {
        (InjectionAction::Strip, None) => InjectionAction::Block,
        (action, _) => action,
    };
    let name = match action {
        InjectionAction::Strip => "strip",
        InjectionAction::Block => "block",
        InjectionAction::Flag | InjectionAction::Off => "flag",
    };
    let noted =
        json!({"stage": "input", "score": found.score, "matched": found.matched, "action": name});
    match action {
        InjectionAction::Block => {
            let reason = format!(
                "the newest user message looks like a prompt injection (score {:.2}: {}); keel did not send it to the model",
                found.score,
                found.matched.join(", ")
            );
            gw.metrics
                .guardrail_blocks
                .get_or_create(&crate::metrics::GuardrailLabels {
                    tool: "input".into(),
                    rule: "injection".into(),
                })
                .inc();
            log.push(
                EventKind::ActionBlocked,
                json!({"route": route, "agent": log.who.agent, "rules": ["injection"], "reasons": [reason], "stage": "input", "score": found.score}),
            );
            let _ = gw
                .record_call(std::mem::take(&mut log.events), Vec::new(), None)
                .await;
            count_request(gw, route, "none", "rejected");
            Err(ApiError::bad_request(reason)
                .with_param("messages")
                .with_code("prompt_injection"))
        }
        InjectionAction::Strip => {
            if let Some(stripped) = stripped {
                parsed.body = stripped;
            }
            log.screened = Some(noted);
            Ok(())
        }
        InjectionAction::Flag | InjectionAction::Off => {
            log.screened = Some(noted);
            Ok(())
        }
    }
}

/// Records a call whose client left while keel was still working on it: the
/// handler's future is dropped (which cancels the upstream call and any
/// pending retry), and this guard's `Drop` writes what happened until then.
struct CallGuard {
    gw: Arc<Gateway>,
    route: String,
    started: Instant,
    log: Option<CallLog>,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let Some(mut log) = self.log.take() else {
            return;
        };
        // Answers keel paid for before the client left (ones that did not match the
        // request's schema) are spent all the same.
        let usage = crate::finish::charge(&self.gw, &mut log, None);
        let fallback = log.events.iter().any(|e| e.kind == EventKind::FallbackUsed);
        log.push(
            EventKind::LlmCall,
            json!({
                "route": self.route,
                "target": "none",
                "agent": log.who.agent,
                "step": log.who.step,
                "attempts": log.attempts,
                "fallback": fallback,
                "outcome": "client_gone",
                "latency_ms": self.started.elapsed().as_millis() as u64,
                "usage": usage,
            }),
        );
        crate::finish::count_request(&self.gw, &self.route, "none", "client_gone");
        // Its time and what keel paid for are observed like any call's (the route's series
        // looked up here, not held by every call for this rare end).
        if let Some(metrics) = self.gw.routes.get(&self.route).map(|r| &r.metrics) {
            metrics
                .duration
                .observe(self.started.elapsed().as_secs_f64());
            if let Some(total) = usage {
                metrics.input_tokens.observe(total.prompt_tokens as f64);
                metrics
                    .output_tokens
                    .observe(total.completion_tokens as f64);
            }
        }
        if let Some(data) = log.events.last_mut().and_then(|e| e.data.as_object_mut()) {
            if !log.chaos.is_empty() {
                let chaos: Vec<Value> = log.chaos.iter().map(|c| c.to_json()).collect();
                data.insert("chaos".into(), Value::Array(chaos));
            }
            if log.usage_estimated {
                data.insert("usage_estimated".into(), true.into());
            }
        }
        let gw = Arc::clone(&self.gw);
        let events = std::mem::take(&mut log.events);
        self.gw.tasks.spawn(async move {
            let _ = gw.record_call(events, Vec::new(), None).await;
        });
    }
}

/// The error that takes the place of an answer keel could not record: nothing is acknowledged
/// that is not stored. `answered`: a provider answered (a retry may be billed again); else
/// the answer withheld is the route's degraded reply.
pub(crate) fn store_unavailable(answered: bool) -> ApiError {
    let message = if answered {
        "keel could not record this call in its store, so its answer is withheld (the provider answered it: a retry may be billed again); keel's log says why"
    } else {
        "keel could not record this call in its store, so the route's degraded reply (every target had failed) is withheld; keel's log says why"
    };
    ApiError::unavailable(message).with_code("store_unavailable")
}

/// The `alert_raised` data of a budget that crossed its warning share.
pub(crate) fn budget_warning(agent: &str, w: &crate::agents::Warning) -> Value {
    let whose = crate::agents::whose(agent, w.key.as_deref());
    json!({
        "severity": "warning",
        "kind": "budget",
        "agent": agent,
        "key": w.key,
        "unit": w.unit.as_str(),
        "used": w.used,
        "limit": w.limit,
        "message": format!("{whose} has used {:.0}% of its {} budget", 100.0 * w.used / w.limit, w.unit.as_str()),
    })
}

impl Gateway {
    /// Records a model call's events with its payloads (owned by `task`) in one batch, with
    /// the store's call durability (`[store] call_durability`); whether they are stored. A
    /// store failure is logged, and never hidden as success: a caller with an answer to give
    /// withholds it ([`store_unavailable`]).
    pub(crate) async fn record_call(
        &self,
        events: Vec<NewEvent>,
        payloads: Vec<keel_store::Payload>,
        task: Option<String>,
    ) -> bool {
        if events.is_empty() && payloads.is_empty() {
            return true;
        }
        match self.store.append_call(events, payloads, task).await {
            Ok(_) => true,
            Err(e) => {
                tracing::error!(error = %e, "could not record gateway events");
                false
            }
        }
    }

    /// Appends events that are not a model call's records (a tool call's, say) in one
    /// batch, with the store's durability; a store failure is logged, never hidden as success.
    pub(crate) async fn append(&self, events: Vec<NewEvent>) {
        if events.is_empty() {
            return;
        }
        if let Err(e) = self.store.append(events).await {
            tracing::error!(error = %e, "could not record gateway events");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_bodies_with_clear_messages() {
        let e = parse_body(b"{not json").err().unwrap();
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        let e = parse_body(b"[1]").err().unwrap();
        assert!(e.message.contains("JSON object"));
        let e = parse_body(br#"{"messages": []}"#).err().unwrap();
        assert_eq!(e.param, Some("model"));
        let e = parse_body(b"{\"model\": \"\xff\"}").err().unwrap();
        assert!(e.message.contains("UTF-8"), "{}", e.message);
    }

    /// `path`'s answer to a request whose headers came, then nothing of its body.
    async fn stalled(path: &str) -> Response {
        let body = futures::stream::pending::<Result<bytes::Bytes, std::io::Error>>();
        post_slowly(path, body).await
    }

    /// `path`'s answer to a request whose body sends a byte every 40 s, and never ends.
    async fn trickled(path: &str) -> Response {
        let body = futures::stream::unfold((), |()| async {
            tokio::time::sleep(std::time::Duration::from_secs(40)).await;
            Some((Ok::<_, std::io::Error>(bytes::Bytes::from_static(b" ")), ()))
        });
        post_slowly(path, body).await
    }

    /// `path`'s answer to a JSON request whose body is `body`.
    async fn post_slowly(
        path: &str,
        body: impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static,
    ) -> Response {
        use tower::ServiceExt as _;
        let dir = tempfile::tempdir().unwrap();
        let request = axum::http::Request::post(path)
            .header("content-type", "application/json")
            .body(axum::body::Body::from_stream(body))
            .unwrap();
        // (Time is paused: this waits no real time, and a keel that never answers fails.)
        let answer = router(crate::test_gateway("", &dir).0).oneshot(request);
        tokio::time::timeout(std::time::Duration::from_secs(600), answer)
            .await
            .expect("keel answers within 10 minutes")
            .unwrap()
    }

    /// Asserts `response` is the 408 of a body not arrived within the default 60 s, and came
    /// when the deadline passed.
    async fn assert_late(response: Response, started: tokio::time::Instant, what: &str) {
        let waited = started.elapsed();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{what}: {error}");
        assert_eq!(error["error"]["code"], "request_timeout", "{what}: {error}");
        assert_eq!(
            error["error"]["message"],
            "the request body did not arrive within 1m (server.body_timeout)",
            "{what}"
        );
        let deadline = std::time::Duration::from_secs(60);
        assert!(
            waited >= deadline && waited < deadline + std::time::Duration::from_secs(1),
            "{what}: answered after {waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_arriving_is_a_408() {
        let started = tokio::time::Instant::now();
        let response = stalled("/v1/chat/completions").await;
        assert_late(response, started, "model call").await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_tool_call_whose_body_stops_arriving_is_refused() {
        let started = tokio::time::Instant::now();
        let response = stalled("/v1/actions/check").await;
        assert_late(response, started, "tool check").await;
    }

    /// A byte every 40 s never leaves the body silent for the 60 s, but the whole body must
    /// arrive within them, on the model endpoints and the APIs that read theirs with axum.
    #[tokio::test(start_paused = true)]
    async fn a_body_that_trickles_in_is_refused_at_the_deadline_all_the_same() {
        for path in ["/v1/chat/completions", "/v1/actions/check"] {
            let started = tokio::time::Instant::now();
            let response = trickled(path).await;
            assert_late(response, started, path).await;
        }
    }

    #[test]
    fn a_chat_needs_its_messages_and_embeddings_their_input() {
        let check = |endpoint, body: &str| {
            check_required(endpoint, &RawObject::parse(body.as_bytes()).unwrap())
        };
        assert!(check(Endpoint::ChatCompletions, r#"{"model":"m","messages":[]}"#).is_ok());
        for (body, code) in [
            (r#"{"model":"m"}"#, "missing_required_parameter"),
            (
                r#"{"model":"m","messages":null}"#,
                "missing_required_parameter",
            ),
            (r#"{"model":"m","messages":42}"#, "invalid_type"),
            (r#"{"model":"m","messages":"hi"}"#, "invalid_type"),
        ] {
            let e = check(Endpoint::ChatCompletions, body).unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.param, Some("messages"), "{body}");
            assert_eq!(e.code, Some(code), "{body}");
        }
        assert!(check(Endpoint::Embeddings, r#"{"model":"m","input":"hi"}"#).is_ok());
        assert!(check(Endpoint::Embeddings, r#"{"model":"m","input":[1,2]}"#).is_ok());
        let e = check(Endpoint::Embeddings, r#"{"model":"m"}"#).unwrap_err();
        assert_eq!(e.param, Some("input"));
    }

    #[test]
    fn reads_stream_flag_and_route() {
        let p = parse_body(br#"{"model": "smart", "stream": true, "x-unknown": 1}"#).unwrap();
        assert_eq!(p.route, "smart");
        assert!(p.stream);
        assert_eq!(p.body.get("x-unknown").unwrap().get(), "1");
        for off in [
            r#"{"model":"m"}"#,
            r#"{"model":"m","stream":false}"#,
            r#"{"model":"m","stream":null}"#,
        ] {
            assert!(!parse_body(off.as_bytes()).unwrap().stream, "{off}");
        }
        for bad in [
            r#"{"model":"m","stream":"true"}"#,
            r#"{"model":"m","stream":1}"#,
        ] {
            let e = parse_body(bad.as_bytes()).err().unwrap();
            assert_eq!(e.param, Some("stream"), "{bad}");
            assert_eq!(e.code, Some("invalid_type"), "{bad}");
            assert!(e.message.contains("true or false"), "{}", e.message);
        }
        // `model` is checked like the endpoint's other required parameters.
        for (bad, code) in [
            (r#"{"messages":[]}"#, "missing_required_parameter"),
            (r#"{"model":42,"messages":[]}"#, "invalid_type"),
            (r#"{"model":"","messages":[]}"#, "invalid_value"),
        ] {
            let e = parse_body(bad.as_bytes()).err().unwrap();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(e.param, Some("model"), "{bad}");
            assert_eq!(e.code, Some(code), "{bad}");
        }
    }

    /// axum moves a handler's future, copying it whole, before polling it; `handle` boxes
    /// the call's own future (some kilobytes), so each move copies a few hundred bytes.
    #[test]
    fn a_handler_future_stays_small() {
        let dir = tempfile::tempdir().unwrap();
        let config = "[providers.sim]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\n\
                      [routes.bench]\ntargets = [{ provider = \"sim\", model = \"m\" }]\n";
        let (gw, _store) = crate::test_gateway(config, &dir);
        let request = || axum::extract::Request::new(axum::body::Body::empty());
        let call = handle_inner(&gw, Endpoint::ChatCompletions, None, request());
        let boxed = handle(Arc::clone(&gw), Endpoint::ChatCompletions, None, request());
        assert!(
            std::mem::size_of_val(&call) > 2048,
            "the call's future is small now ({} bytes): the box may go",
            std::mem::size_of_val(&call)
        );
        assert!(
            std::mem::size_of_val(&boxed) < 1024,
            "the handler's future is {} bytes",
            std::mem::size_of_val(&boxed)
        );
    }
}
