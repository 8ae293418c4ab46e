//! Request handling: routing, fault injection, and the `/_sim` control surface.
//!
//! Every request is answered by [`handle`]. Model requests (`/v1/chat/completions`,
//! `/v1/embeddings`, and Anthropic's `/v1/messages`) are counted, recorded, and matched with
//! their fault before the answer is built by [`crate::chat`], [`crate::embeddings`] or
//! [`crate::messages`]; a fault's error comes in the shape of the endpoint's API. A fault that must close the
//! connection without a response makes [`handle`] return `Err`, which hyper answers by
//! closing the connection; a stream that must be cut yields `Err` from its body, which makes
//! hyper abort the chunked response without its terminating chunk.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::fault::Fault;
use crate::state::{REQUESTS_PER_MINUTE, Shared};
use crate::{chat, embeddings, messages};

/// The largest request body the sim reads.
const MAX_BODY: usize = 64 * 1024 * 1024;

/// The body the sim answers with a half-written JSON document.
const MALFORMED: &[u8] = br#"{"id": "x", "choices": ["#;

/// The same for Anthropic's Messages API.
const MALFORMED_MESSAGE: &[u8] = br#"{"id": "msg_x", "type": "message", "content": ["#;

/// A response body; it fails only when a fault cuts a stream.
pub(crate) type SimBody = UnsyncBoxBody<Bytes, SimError>;

/// Why the sim breaks a connection on purpose. Only hyper sees these.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SimError {
    /// `drop_connection` (or `cut_after_chunks` on a non-streaming request).
    #[error("connection dropped by fault injection")]
    Dropped,
    /// `cut_after_chunks` on a stream.
    #[error("stream cut by fault injection")]
    Cut,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Embeddings,
    /// Anthropic's `POST /v1/messages`.
    Messages,
}

impl Endpoint {
    /// Whether the endpoint speaks Anthropic's wire format (its errors included).
    fn is_anthropic(self) -> bool {
        self == Self::Messages
    }
}

/// Answers one request. `Err` closes the connection without a response.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<SimBody>, SimError> {
    let path = req.uri().path();
    // Accept both `/v1/x` and `/x`, like servers that mount the API at the root.
    let route = path
        .strip_prefix("/v1")
        .filter(|p| !p.is_empty())
        .unwrap_or(path);
    let method = req.method().clone();
    match (method, route) {
        (Method::POST, "/chat/completions") => model_call(&shared, req, Endpoint::Chat).await,
        (Method::POST, "/embeddings") => model_call(&shared, req, Endpoint::Embeddings).await,
        (Method::POST, "/messages") => model_call(&shared, req, Endpoint::Messages).await,
        (Method::GET, "/models") => Ok(models(&shared)),
        (Method::POST, "/_sim/script") => Ok(control(&shared, req, Control::Script).await),
        (Method::POST, "/_sim/always") => Ok(control(&shared, req, Control::Always).await),
        (Method::POST, "/_sim/reset") => {
            shared.reset();
            Ok(json_response(StatusCode::OK, ok_body()))
        }
        (Method::POST, tool) if tool.starts_with("/tools/") => {
            let name = tool.trim_start_matches("/tools/").to_owned();
            tool_call(&shared, req, &name).await
        }
        (Method::GET, "/_sim/calls") => {
            let body = json!({ "calls": shared.all_calls() }).to_string();
            Ok(json_response(StatusCode::OK, Bytes::from(body)))
        }
        (
            _,
            "/chat/completions" | "/embeddings" | "/messages" | "/models" | "/_sim/script"
            | "/_sim/always" | "/_sim/reset" | "/_sim/calls",
        ) => Ok(error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("method not allowed on {path}"),
            "invalid_request_error",
            None,
        )),
        _ => Ok(error_response(
            StatusCode::NOT_FOUND,
            &format!("unknown path {path}"),
            "invalid_request_error",
            None,
        )),
    }
}

// === tools ===

/// `POST /tools/{name}`: a simulated HTTP tool. It answers
/// `{"tool": name, "ok": true, "received": <the request body>}`; its faults and call
/// count are those of the model `tool:{name}` (script them like a model's), and a
/// fault's `redirect` answers `302 Found` with that `Location`.
async fn tool_call(
    shared: &Shared,
    req: Request<Incoming>,
    name: &str,
) -> Result<Response<SimBody>, SimError> {
    let authorization = req.headers().get(AUTHORIZATION).cloned();
    let body = match read_body(req).await {
        Ok(body) => body,
        Err(response) => return Ok(response),
    };
    let received: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let key = format!("tool:{name}");
    let fault = shared
        .admit(&key, body, authorization)
        .or_else(|| shared.inject(&key, &received));
    let fault = fault.as_deref();
    if let Some(location) = fault.and_then(|f| f.redirect.as_deref()) {
        let mut response = json_response(StatusCode::FOUND, Bytes::new());
        if let Ok(value) = http::HeaderValue::from_str(location) {
            response.headers_mut().insert(http::header::LOCATION, value);
        }
        return Ok(response);
    }
    if let Some(fault) = fault
        && let Some(early) = apply_fault(fault, &key, false, false).await
    {
        return early.map(|response| with_retry_after(response, Some(fault)));
    }
    let answer = json!({"tool": name, "ok": true, "received": received}).to_string();
    Ok(with_retry_after(
        json_response(StatusCode::OK, Bytes::from(answer)),
        fault,
    ))
}

// === model requests ===

async fn model_call(
    shared: &Shared,
    req: Request<Incoming>,
    endpoint: Endpoint,
) -> Result<Response<SimBody>, SimError> {
    let started = std::time::Instant::now();
    let anthropic = endpoint.is_anthropic();
    // Anthropic's key comes in `x-api-key`, and Azure OpenAI's in `api-key`: each is
    // recorded where a bearer token would be.
    let authorization = if anthropic {
        req.headers().get("x-api-key")
    } else {
        req.headers()
            .get(AUTHORIZATION)
            .or_else(|| req.headers().get("api-key"))
    }
    .cloned();
    let versioned = req.headers().contains_key("anthropic-version");
    let body = match read_body(req).await {
        Ok(body) => body,
        Err(response) => return Ok(response),
    };
    let invalid = |message: &str| {
        if anthropic {
            anthropic_invalid(message)
        } else {
            invalid_request(message)
        }
    };
    if anthropic && !versioned {
        return Ok(invalid("anthropic-version: header is required"));
    }
    let request: Value = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return Ok(invalid(&format!("invalid JSON body: {e}"))),
    };
    let Some(model) = request.get("model").and_then(Value::as_str) else {
        return Ok(invalid("you must provide a model parameter"));
    };
    let fault = shared
        .admit(model, body, authorization)
        .or_else(|| shared.inject(model, &request));
    let fault = fault.as_deref();
    let stream =
        endpoint != Endpoint::Embeddings && request.get("stream") == Some(&Value::Bool(true));
    if let Some(fault) = fault
        && let Some(early) = apply_fault(fault, model, stream, anthropic).await
    {
        // An error answer is named and counted as any other.
        return early.map(|mut response| {
            describe_answer(shared, &mut response, anthropic, started);
            with_retry_after(response, Some(fault))
        });
    }
    let mut response = match endpoint {
        Endpoint::Chat => chat_response(shared, &request, model, fault),
        Endpoint::Messages => messages_response(shared, &request, model, fault),
        Endpoint::Embeddings => match embeddings::answer(&request, model) {
            Ok(body) => json_response(StatusCode::OK, body),
            Err(message) => invalid_request(&message),
        },
    };
    describe_answer(shared, &mut response, anthropic, started);
    Ok(with_retry_after(response, fault))
}

/// What a provider says of every answer, an error too, in its own headers: its id
/// (OpenAI's `x-request-id`, Anthropic's `request-id`), where the account stands against its
/// request limit (OpenAI's `x-ratelimit-*-requests`, Anthropic's
/// `anthropic-ratelimit-requests-*`), and OpenAI's `openai-processing-ms`.
fn describe_answer(
    shared: &Shared,
    response: &mut Response<SimBody>,
    anthropic: bool,
    started: std::time::Instant,
) {
    let now = SystemTime::now();
    let limit = shared.count_answer(now);
    let id = shared.next_request_id();
    let headers: [(&'static str, String); 4] = if anthropic {
        [
            ("request-id", id),
            (
                "anthropic-ratelimit-requests-limit",
                REQUESTS_PER_MINUTE.to_string(),
            ),
            (
                "anthropic-ratelimit-requests-remaining",
                limit.remaining.to_string(),
            ),
            (
                "anthropic-ratelimit-requests-reset",
                humantime::format_rfc3339_seconds(limit.reset_at).to_string(),
            ),
        ]
    } else {
        [
            ("x-request-id", id),
            (
                "x-ratelimit-limit-requests",
                REQUESTS_PER_MINUTE.to_string(),
            ),
            (
                "x-ratelimit-remaining-requests",
                limit.remaining.to_string(),
            ),
            (
                "x-ratelimit-reset-requests",
                format!("{}s", limit.reset_in.as_secs()),
            ),
        ]
    };
    let map = response.headers_mut();
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::from_str(&value) {
            map.insert(http::HeaderName::from_static(name), value);
        }
    }
    if !anthropic {
        map.insert(
            http::HeaderName::from_static("openai-processing-ms"),
            HeaderValue::from(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)),
        );
    }
}

/// Applies the parts of `fault` that come before (or instead of) the normal answer, in
/// Anthropic's wire shapes when `anthropic`. `None` means: go on and answer normally.
async fn apply_fault(
    fault: &Fault,
    model: &str,
    stream: bool,
    anthropic: bool,
) -> Option<Result<Response<SimBody>, SimError>> {
    if let Some(delay) = fault.delay {
        tokio::time::sleep(delay).await;
    }
    if fault.drop_connection || (!stream && fault.cut_after_chunks.is_some()) {
        return Some(Err(SimError::Dropped));
    }
    if let Some(status) = fault.effective_status() {
        let code = fault.error_code.as_deref();
        if anthropic {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let body = messages::error_body(status, code, model);
            return Some(Ok(json_response(status, body)));
        }
        let (status, body) = fault_error(status, code, fault.message.as_deref(), model);
        let body = match fault.nest {
            Some(depth) => nested(&body, depth),
            None => body,
        };
        return Some(Ok(json_response(status, body)));
    }
    if fault.malformed && anthropic {
        let response = if stream {
            let mut body = b"event: message_start\ndata: ".to_vec();
            body.extend_from_slice(MALFORMED_MESSAGE);
            body.extend_from_slice(
                b"\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
            );
            sse_response(full(Bytes::from(body)))
        } else {
            json_response(StatusCode::OK, Bytes::from_static(MALFORMED_MESSAGE))
        };
        return Some(Ok(response));
    }
    if fault.malformed {
        let response = if stream {
            let mut body = b"data: ".to_vec();
            body.extend_from_slice(MALFORMED);
            body.extend_from_slice(b"\n\ndata: [DONE]\n\n");
            sse_response(full(Bytes::from(body)))
        } else {
            json_response(StatusCode::OK, Bytes::from_static(MALFORMED))
        };
        return Some(Ok(response));
    }
    if !stream && fault.stall_after_chunks.is_some() {
        tokio::time::sleep(fault.stall_duration()).await;
    }
    None
}

/// `answer` with a member `keel_sim_nested` of arrays nested `depth` deep ([`Fault::nest`]).
fn nested(answer: &Bytes, depth: u32) -> Bytes {
    let depth = usize::try_from(depth)
        .unwrap_or(usize::MAX)
        .clamp(1, 10_000);
    let text = String::from_utf8_lossy(answer);
    let inner = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    // The answer is an object: the member goes in before its closing brace.
    let trimmed = text.trim_end();
    let open = trimmed.strip_suffix('}').unwrap_or(trimmed);
    Bytes::from(format!("{open},\"keel_sim_nested\":{inner}}}"))
}

fn chat_response(
    shared: &Shared,
    request: &Value,
    model: &str,
    fault: Option<&Fault>,
) -> Response<SimBody> {
    let mut plan = match chat::plan(request, fault.and_then(|f| f.reply.as_deref())) {
        Ok(plan) => plan,
        Err(message) => return invalid_request(&message),
    };
    if fault.is_some_and(|f| f.ignore_stream) {
        plan.stream = false;
    }
    if fault.is_some_and(|f| f.no_usage) {
        plan.report_usage = false;
        plan.include_usage = false;
    }
    let n = shared.next_id();
    let created = unix_now();
    let error_after = fault.and_then(|f| f.error_event_after_chunks);
    if !plan.stream {
        if error_after.is_some() {
            return json_response(StatusCode::OK, error_event(fault));
        }
        let answer = chat::completion(n, created, model, &plan);
        return match fault.and_then(|f| f.nest) {
            Some(depth) => json_response(StatusCode::OK, nested(&answer, depth)),
            None => json_response(StatusCode::OK, answer),
        };
    }
    let mut events = chat::stream_events(n, created, model, &plan);
    if let Some(chunks) = error_after {
        // The role chunk and `chunks` content chunks, at most all but `[DONE]`.
        let keep = usize::try_from(chunks)
            .map_or(usize::MAX, |c| c.saturating_add(1))
            .min(events.len().saturating_sub(1));
        events.truncate(keep);
        let mut frame = b"data: ".to_vec();
        frame.extend_from_slice(&error_event(fault));
        frame.extend_from_slice(b"\n\n");
        events.push(Bytes::from(frame));
    } else if fault.is_some_and(|f| f.no_done) {
        events.pop();
    } else if fault.is_some_and(|f| f.only_opening) && events.len() > 2 {
        // The role chunk and `[DONE]`.
        events.drain(1..events.len() - 1);
    }
    sse_response(stream_body(events, fault))
}

/// The error object an upstream sends with status 200 or inside a started stream.
fn error_event(fault: Option<&Fault>) -> Bytes {
    let code = fault
        .and_then(|f| f.error_code.as_deref())
        .unwrap_or("server_error");
    let body = json!({"error": {
        "message": format!("keel-sim: the answer failed ({code})"),
        "type": "server_error",
        "param": null,
        "code": code,
    }});
    Bytes::from(body.to_string())
}

fn messages_response(
    shared: &Shared,
    request: &Value,
    model: &str,
    fault: Option<&Fault>,
) -> Response<SimBody> {
    let plan = match messages::plan(request, fault.and_then(|f| f.reply.as_deref())) {
        Ok(plan) => plan,
        Err(message) => return anthropic_invalid(&message),
    };
    let n = shared.next_id();
    if !plan.stream {
        return json_response(StatusCode::OK, messages::message(n, model, &plan));
    }
    let events = messages::stream_events(n, model, &plan);
    sse_response(stream_body(events, fault))
}

/// Where a stream misbehaves, as indices into its events (the role chunk is event 0).
#[derive(Debug, Clone, Copy)]
struct Pacing {
    cut_at: Option<usize>,
    stall: Option<(usize, Duration)>,
    interval: Option<Duration>,
}

/// The body of a stream, paced, stalled or cut as `fault` says. Cuts and stalls never
/// happen after `[DONE]`: they are placed before it at the latest.
fn stream_body(events: Vec<Bytes>, fault: Option<&Fault>) -> SimBody {
    let last = events.len().saturating_sub(1);
    let position =
        |chunks: u32| usize::try_from(chunks).map_or(last, |n| n.saturating_add(1).min(last));
    let pacing = fault.map(|fault| Pacing {
        cut_at: fault.cut_after_chunks.map(position),
        stall: fault
            .stall_after_chunks
            .map(|chunks| (position(chunks), fault.stall_duration())),
        interval: fault.chunk_interval,
    });
    let Some(pacing) =
        pacing.filter(|p| p.cut_at.is_some() || p.stall.is_some() || p.interval.is_some())
    else {
        let frames = futures::stream::iter(events.into_iter().map(|event| Ok(Frame::data(event))));
        return BodyExt::boxed_unsync(StreamBody::new(frames));
    };
    let state = (events.into_iter(), 0_usize, false);
    let frames = futures::stream::unfold(state, move |(mut events, index, finished)| async move {
        if finished {
            return None;
        }
        if pacing.cut_at == Some(index) {
            // Let hyper flush the events already written, so the client really receives
            // them before the connection is aborted.
            tokio::task::yield_now().await;
            return Some((Err(SimError::Cut), (events, index, true)));
        }
        if let Some((at, stall)) = pacing.stall
            && at == index
        {
            tokio::time::sleep(stall).await;
        }
        if let Some(interval) = pacing.interval
            && index > 0
        {
            tokio::time::sleep(interval).await;
        }
        let event = events.next()?;
        Some((Ok(Frame::data(event)), (events, index + 1, false)))
    });
    BodyExt::boxed_unsync(StreamBody::new(frames))
}

fn models(shared: &Shared) -> Response<SimBody> {
    let mut names: Vec<String> = shared.all_calls().into_keys().collect();
    names.push("sim-model".to_owned());
    names.sort_unstable();
    names.dedup();
    let data: Vec<Value> = names
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "keel-sim"}))
        .collect();
    let body = json!({"object": "list", "data": data}).to_string();
    json_response(StatusCode::OK, Bytes::from(body))
}

// === control surface ===

#[derive(Debug, Clone, Copy)]
enum Control {
    Script,
    Always,
}

/// `POST /_sim/script` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScriptRequest {
    model: String,
    faults: Vec<Fault>,
}

/// `POST /_sim/always` body; `fault: null` (or absent) clears.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AlwaysRequest {
    model: String,
    #[serde(default)]
    fault: Option<Fault>,
}

async fn control(shared: &Shared, req: Request<Incoming>, control: Control) -> Response<SimBody> {
    let body = match read_body(req).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let applied = match control {
        Control::Script => serde_json::from_slice::<ScriptRequest>(&body)
            .map_err(|e| e.to_string())
            .and_then(|r| check_statuses(&r.faults).map(|()| r))
            .map(|r| shared.script(&r.model, r.faults)),
        Control::Always => serde_json::from_slice::<AlwaysRequest>(&body)
            .map_err(|e| e.to_string())
            .and_then(|r| check_statuses(r.fault.as_slice()).map(|()| r))
            .map(|r| shared.set_always(&r.model, r.fault)),
    };
    match applied {
        Ok(()) => json_response(StatusCode::OK, ok_body()),
        Err(message) => invalid_request(&message),
    }
}

fn check_statuses(faults: &[Fault]) -> Result<(), String> {
    for status in faults.iter().filter_map(|f| f.status) {
        StatusCode::from_u16(status)
            .map_err(|_| format!("status {status} is not an HTTP status"))?;
    }
    Ok(())
}

fn ok_body() -> Bytes {
    Bytes::from_static(br#"{"ok":true}"#)
}

// === responses ===

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Response<SimBody>> {
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => Err(invalid_request(&format!(
            "could not read the request body: {e}"
        ))),
    }
}

fn full(body: Bytes) -> SimBody {
    BodyExt::boxed_unsync(Full::new(body).map_err(|never: Infallible| match never {}))
}

fn json_response(status: StatusCode, body: Bytes) -> Response<SimBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn sse_response(body: SimBody) -> Response<SimBody> {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn with_retry_after(mut response: Response<SimBody>, fault: Option<&Fault>) -> Response<SimBody> {
    if let Some(value) = fault
        .and_then(|f| f.retry_after.as_deref())
        .and_then(|v| HeaderValue::from_str(v).ok())
    {
        response.headers_mut().insert(RETRY_AFTER, value);
    }
    response
}

/// An OpenAI-shaped error: `{"error": {"message", "type", "param", "code"}}`.
fn error_response(
    status: StatusCode,
    message: &str,
    kind: &str,
    code: Option<&str>,
) -> Response<SimBody> {
    json_response(status, error_body(message, kind, code))
}

/// The body of [`error_response`].
fn error_body(message: &str, kind: &str, code: Option<&str>) -> Bytes {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    Bytes::from(body.to_string())
}

/// A 400 in Anthropic's shape.
fn anthropic_invalid(message: &str) -> Response<SimBody> {
    json_response(
        StatusCode::BAD_REQUEST,
        messages::error("invalid_request_error", message),
    )
}

fn invalid_request(message: &str) -> Response<SimBody> {
    error_response(
        StatusCode::BAD_REQUEST,
        message,
        "invalid_request_error",
        None,
    )
}

/// The error a fault asks for, worded as OpenAI words it: its status and body.
fn fault_error(
    status: u16,
    code: Option<&str>,
    message: Option<&str>,
    model: &str,
) -> (StatusCode, Bytes) {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let message = match (message, code) {
        (Some(message), _) => message.to_owned(),
        (None, code) => fault_message(status, code, model),
    };
    let kind = match (status.as_u16(), code) {
        (429, Some("insufficient_quota")) => "insufficient_quota",
        (429, _) => "requests",
        (403, _) => "permission_error",
        (500..=599, _) => "server_error",
        _ => "invalid_request_error",
    };
    (status, error_body(&message, kind, code))
}

/// How OpenAI words the error `code` (or, for another, the `status`) from `model`.
fn fault_message(status: StatusCode, code: Option<&str>, model: &str) -> String {
    match code {
        Some("model_not_found") => {
            format!("The model `{model}` does not exist or you do not have access to it.")
        }
        Some("context_length_exceeded") => format!(
            "This model's maximum context length is 8192 tokens. However, your messages \
             resulted in more tokens. Please reduce the length of the messages. (model {model})"
        ),
        Some("rate_limit_exceeded") => format!("Rate limit reached for {model}."),
        Some("insufficient_quota") => "You exceeded your current quota.".to_owned(),
        Some("invalid_api_key") => "Incorrect API key provided.".to_owned(),
        _ => format!(
            "simulated {} ({})",
            status.as_u16(),
            status.canonical_reason().unwrap_or("error")
        ),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
