//! Finishing a call after the route executor answered: the response with
//! keel's headers, the `llm_call` event with the call's payloads, metrics, and
//! for streams the pump that forwards chunks and ends a broken stream with an
//! error event instead of a silent truncation.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use keel_core::{EventKind, NewEvent};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::error::{ApiError, UpstreamError};
use crate::guard::loops::StreamedAnswer;
use crate::metrics::{RequestLabels, RouteLabel};
use crate::provider::{ChunkStream, Endpoint, Passed};
use crate::pump::{Pumped, deliver, pump};
use crate::route::{AnswerRecord, CallLog, Route, Target, add_usage};
use crate::stream_attempt::{StreamAttempt, StreamEnd};
use crate::usage::{Kept, Usage};
use crate::{Gateway, payload};

pub(crate) fn count_request(gw: &Gateway, route: &str, target: &str, outcome: &str) {
    gw.metrics
        .requests
        .get_or_create(&RequestLabels {
            route: route.into(),
            target: target.into(),
            outcome: outcome.into(),
        })
        .inc();
}

/// Counts one of `route`'s calls in `family` (`keel_fallbacks_total`, `keel_degraded_total`,
/// `keel_stream_errors_total`).
fn count_route(
    family: &prometheus_client::metrics::family::Family<
        RouteLabel,
        prometheus_client::metrics::counter::Counter,
    >,
    route: &str,
) {
    family
        .get_or_create(&RouteLabel {
            route: route.into(),
        })
        .inc();
}

/// Charges a call's spend to the agent's budgets: `answered`, the usage of the answer the
/// client gets with the target that gave it, and the answers keel paid for and did not pass
/// on (`log.spent`, taken). A budget that crosses its warning share adds its `alert_raised`
/// to the log's events, recorded with the call's. The total, when there was any usage.
pub(crate) fn charge(
    gw: &Gateway,
    log: &mut CallLog,
    answered: Option<(&str, Usage)>,
) -> Option<Usage> {
    let spent = std::mem::take(&mut log.spent);
    let each = || {
        spent
            .iter()
            .map(|(target, u)| (target.as_str(), *u))
            .chain(answered)
    };
    let total = each().map(|(_, u)| u).reduce(crate::route::sum_usage)?;
    for (target, u) in each() {
        let (remaining, crossed) = gw.agents.spend(
            &log.who.agent,
            log.who.key.as_deref(),
            target,
            u,
            crate::agents::wall_now(),
        );
        gw.metrics.set_budget_remaining(&log.who.agent, &remaining);
        for w in &crossed {
            log.push(
                EventKind::AlertRaised,
                crate::http::budget_warning(&log.who.agent, w),
            );
        }
    }
    Some(total)
}

/// What is needed to finish a call after the executor answered.
pub(crate) struct Finish {
    pub(crate) gw: Arc<Gateway>,
    pub(crate) route_name: String,
    /// The route's series every answered call updates.
    pub(crate) route_metrics: Arc<crate::metrics::RouteMetrics>,
    pub(crate) started: Instant,
    /// When the executor started on the call (its body read): where `total` counts from.
    pub(crate) call_started: Instant,
    pub(crate) stream: bool,
    /// keel asked the stream for usage the client did not ask for: its usage-only
    /// chunk is not forwarded.
    pub(crate) hide_usage: bool,
    /// The request's payload summary and blobs (empty when payloads are not recorded).
    pub(crate) recorded: payload::Recorded,
}

/// How a call's answer is kept with its `llm_call`.
pub(crate) enum Recorded<'a> {
    /// A JSON answer (its body): in the event as its canonical text, or as a blob when nested
    /// too deep for it ([`Kept`]), with its `model` and finish reasons.
    Answer(AnswerRecord, &'a Bytes),
    /// As a content-addressed blob named in the event (a stream's chunks).
    Blob(&'a Bytes),
    /// Not kept.
    Nothing,
}

impl Finish {
    /// The call's `llm_call` event; it takes the request's payload summary (a call has one).
    fn llm_call(
        &mut self,
        log: &CallLog,
        target: &str,
        outcome: &str,
        fallback: bool,
        usage: Option<Usage>,
        response: Recorded<'_>,
    ) -> NewEvent {
        let latency = self.started.elapsed();
        let recording = self.gw.record_payloads;
        // A JSON answer goes into the event itself: answers are almost never
        // repeated, so content-addressing them would only scatter writes.
        // Streams are stored as a blob of their chunks, named by hash, and so is an answer
        // nested too deep to be read back inside its event: the blob joins the request's,
        // stored with the call's events.
        let (mut answer, mut said, mut blob) = (None, None, None);
        match response {
            Recorded::Answer(record, body) => {
                said = Some((record.model, record.finish_reasons));
                match record.text {
                    Some(Kept::Text(text)) => answer = Some(text),
                    Some(Kept::Blob) => blob = Some(body),
                    None => {}
                }
            }
            Recorded::Blob(body) => blob = Some(body),
            Recorded::Nothing => {}
        }
        let response_hash = blob.filter(|_| recording).map(|body| {
            let payload = keel_store::Payload::new(body.clone());
            let hash = payload.hash().to_owned();
            self.recorded.blobs.push(payload);
            hash
        });
        let answer = answer.filter(|_| recording);
        let (response_model, finish_reasons) = said.unzip();
        // Built member by member: `json!` would deep-copy the parsed answer
        // and the request summary through `to_value`. The members come in key order, so
        // the map is built in one pass instead of by a search and insert for each.
        let usage = usage.map(|u| {
            Value::Object(Map::from_iter([
                ("completion_tokens".to_owned(), u.completion_tokens.into()),
                ("prompt_tokens".to_owned(), u.prompt_tokens.into()),
                ("total_tokens".to_owned(), u.total_tokens.into()),
            ]))
        });
        let latency_ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
        let request = recording.then(|| std::mem::take(&mut self.recorded.summary));
        let mut data: Vec<(String, Value)> = Vec::with_capacity(16);
        data.push(("agent".into(), log.who.agent.as_str().into()));
        data.push(("attempts".into(), log.attempts.into()));
        // Present only when `[chaos]` injected something, so a report can tell injected
        // failures (and slowness) from real ones.
        if !log.chaos.is_empty() {
            let chaos = log.chaos.iter().map(|c| c.to_json()).collect();
            data.push(("chaos".into(), Value::Array(chaos)));
        }
        if let Some(failure) = &log.failure {
            data.push(("error".into(), failure.as_str().into()));
        }
        data.push(("fallback".into(), fallback.into()));
        // Present when the answer gave them (an embeddings answer has none).
        if let Some(reasons) = finish_reasons.filter(|r| !r.is_empty()) {
            data.push(("finish_reasons".into(), reasons.into()));
        }
        if let Some(screened) = &log.screened {
            data.push(("injection".into(), screened.clone()));
        }
        data.push(("latency_ms".into(), latency_ms.into()));
        data.push(("outcome".into(), outcome.into()));
        data.push(("request".into(), request.into()));
        if let Some(id) = &log.request_id {
            data.push(("request_id".into(), id.as_str().into()));
        }
        // A JSON answer's text is printed into the stored event by the store, in this place.
        if answer.is_none() {
            data.push(("response".into(), Value::Null));
        }
        data.push(("response_blob".into(), response_hash.into()));
        if let Some(model) = response_model.flatten() {
            data.push(("response_model".into(), model.into()));
        }
        data.push(("route".into(), self.route_name.as_str().into()));
        data.push(("step".into(), log.who.step.as_deref().into()));
        data.push(("stream".into(), self.stream.into()));
        data.push(("target".into(), target.into()));
        data.push(("usage".into(), usage.into()));
        if log.usage_estimated {
            data.push(("usage_estimated".into(), true.into()));
        }
        debug_assert!(
            data.is_sorted_by(|a, b| a.0 < b.0),
            "llm_call members out of order"
        );
        let data: Map<String, Value> = data.into_iter().collect();
        match answer {
            Some(text) => NewEvent::with_text(
                EventKind::LlmCall,
                log.who.task.clone(),
                data,
                "response",
                text,
            ),
            None => NewEvent::new(
                EventKind::LlmCall,
                log.who.task.clone(),
                Value::Object(data),
            ),
        }
    }

    /// The request's payloads and the answer's blob, if its `llm_call` named one, taken to be
    /// recorded with the call's events (a call is recorded once).
    fn take_blobs(&mut self) -> Vec<keel_store::Payload> {
        std::mem::take(&mut self.recorded.blobs)
    }

    /// Appends the call's events with `blobs` ([`Finish::take_blobs`]). Whether they are
    /// stored.
    async fn record(
        &self,
        events: Vec<NewEvent>,
        blobs: Vec<keel_store::Payload>,
        task: Option<String>,
    ) -> bool {
        if !self.gw.record_payloads {
            return self.gw.record_call(events, Vec::new(), None).await;
        }
        self.gw.record_call(events, blobs, task).await
    }

    /// The call's spend against the agent's budgets ([`charge`]), and its token metrics.
    /// Called before the call's events are recorded: a client that leaves while they are
    /// cannot take the spend with it.
    fn spend(&self, log: &mut CallLog, answered: Option<(&str, Usage)>) {
        if let Some(total) = charge(&self.gw, log, answered) {
            let route = &self.route_metrics;
            route.input_tokens.observe(total.prompt_tokens as f64);
            route.output_tokens.observe(total.completion_tokens as f64);
        }
    }

    /// The call's duration, once its events are recorded.
    fn observe_duration(&self) {
        self.route_metrics
            .duration
            .observe(self.started.elapsed().as_secs_f64());
    }

    /// What is left to do once the call's events are recorded ([`Ending`]): counting the
    /// request as `outcome` by `target`, with `fallback`.
    fn ending<'a>(
        &'a self,
        (route_name, target): (&'a str, &'a str),
        outcome: &'static str,
        fallback: bool,
    ) -> Ending<'a> {
        Ending {
            gw: &self.gw,
            route_name,
            route_metrics: &self.route_metrics,
            started: self.started,
            target,
            outcome,
            fallback,
            looping: None,
            ended: false,
        }
    }

    pub(crate) async fn json(
        mut self,
        route: &Route,
        mut log: CallLog,
        target: &Target,
        (body, record, passed): (Bytes, AnswerRecord, Passed),
        usage: Option<Usage>,
        fallback: bool,
    ) -> Response {
        log.request_id = passed.request_id().map(str::to_owned);
        // What the call cost: this answer and any keel did not pass on.
        let paid = add_usage(usage, log.spent_usage());
        let event = self.llm_call(
            &log,
            &target.id,
            "ok",
            fallback,
            paid,
            Recorded::Answer(record, &body),
        );
        log.events.push(event);
        let looping = self.gw.find_loop(
            &log.who,
            &route.name,
            || crate::guard::loops::answer_text(&body),
            paid,
        );
        if let Some(stop) = &looping {
            log.push(EventKind::LoopDetected, stop.data.clone());
        }
        // Spent before the wait for the store, which a client that leaves ends; counted
        // after it, or as the client leaves ([`Ending`]).
        self.spend(&mut log, usage.map(|u| (target.id.as_str(), u)));
        let blobs = self.take_blobs();
        let mut ending = self.ending((&route.name, &target.id), "ok", fallback);
        ending.looping = looping;
        let stored = self
            .record(std::mem::take(&mut log.events), blobs, log.who.task.clone())
            .await;
        ending.end(stored).await;
        if !stored {
            let mut response = crate::http::store_unavailable(true).into_response();
            keel_headers(&mut response, &target.id, log.attempts, fallback, false);
            return response;
        }
        let mut response = Response::new(Body::from(body));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        keel_headers(&mut response, &target.id, log.attempts, fallback, false);
        passed.apply(response.headers_mut());
        response
    }

    /// Streams the rest of the upstream's chunks; retries are over once this is called. The
    /// stream ends at the total deadline, or at `task_deadline` (its task's) when sooner.
    pub(crate) fn stream(
        mut self,
        route: &Route,
        mut log: CallLog,
        (first, rest, passed, attempt): (Bytes, ChunkStream, Passed, StreamAttempt),
        fallback: bool,
        task_deadline: Option<Instant>,
        request: crate::body::RawObject,
    ) -> Response {
        let (tx, rx) = mpsc::channel::<Bytes>(16);
        log.request_id = passed.request_id().map(str::to_owned);
        let attempts = log.attempts;
        let idle = route.timeouts.idle;
        let total = self.call_started + route.timeouts.total;
        let mut deadline = match task_deadline {
            Some(task) if task < total => (task, "its task's deadline"),
            _ => (total, "the total deadline"),
        };
        // The tightest deadline wins: the attempt's own, from the attempt's start.
        if let Some(until) = attempt.deadline().filter(|until| *until < deadline.0) {
            deadline = (until, "the attempt deadline");
        }
        let target_id = attempt.target().id.clone();
        let hide_usage = self.hide_usage;
        // A task's streamed answer is put together for the loop guard, as a whole one is read.
        let guarded = log.who.task.is_some() && self.gw.agents.loop_guard(&log.who.agent).is_some();
        let answered = Arc::clone(attempt.target());
        let tasks = self.gw.tasks.clone();
        // Set once the stream's last event (`[DONE]` or its error) is on its way.
        let told = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ended = Arc::clone(&told);
        tasks.spawn(async move {
            let mut transcript = self.gw.record_payloads.then(Vec::new);
            let mut answer = guarded.then(StreamedAnswer::default);
            let Pumped {
                end,
                usage,
                generated,
                last,
                error,
            } = pump(
                first,
                rest,
                &tx,
                (idle, deadline),
                &target_id,
                (transcript.as_mut(), answer.as_mut()),
                hide_usage,
            )
            .await;
            // The provider bills a stream that ended before its usage chunk all the same.
            let usage = Some(usage.unwrap_or_else(|| {
                log.usage_estimated = true;
                generated.usage(crate::usage::estimate::prompt(&request))
            }));
            let gw = Arc::clone(&self.gw);
            let ticket = attempt.settle(end, gw.clock.now(), &gw.metrics, |target, changes| {
                gw.transitions.note(
                    target,
                    changes,
                    || json!({"route": self.route_name, "node": gw.node}),
                )
            });
            gw.transitions.stored(ticket).await;
            let outcome = end.outcome();
            log.failure = error;
            let transcript = transcript.map(Bytes::from);
            let event = self.llm_call(
                &log,
                &target_id,
                outcome,
                fallback,
                usage,
                transcript
                    .as_ref()
                    .map_or(Recorded::Nothing, Recorded::Blob),
            );
            log.events.push(event);
            let looping = (outcome == "ok")
                .then(|| {
                    self.gw.find_loop(
                        &log.who,
                        &self.route_name,
                        || answer.map(StreamedAnswer::text),
                        usage,
                    )
                })
                .flatten();
            if let Some(stop) = &looping {
                log.push(EventKind::LoopDetected, stop.data.clone());
            }
            self.spend(&mut log, usage.map(|u| (target_id.as_str(), u)));
            let blobs = self.take_blobs();
            let stored = self
                .record(std::mem::take(&mut log.events), blobs, log.who.task.clone())
                .await;
            if let Some(stop) = looping {
                self.gw.stop_loop(stop).await;
            }
            // A client that left is neither a success nor a stream keel ended with an error;
            // a stream whose record failed ends with an error instead of `[DONE]`.
            let outcome = if outcome == "ok" && !stored {
                "error"
            } else {
                outcome
            };
            if outcome != "ok" || !self.route_metrics.count_ok(&target_id) {
                count_request(&self.gw, &self.route_name, &target_id, outcome);
            }
            if outcome == "stream_error" {
                count_route(&self.gw.metrics.stream_errors, &self.route_name);
            }
            if fallback {
                count_route(&self.gw.metrics.fallbacks, &self.route_name);
            }
            self.observe_duration();
            // The stream's last event (`[DONE]`, or the error that ended it) only after the
            // call is recorded: a client that saw the end of its stream can find its
            // `llm_call`, and the breaker and metrics already count it.
            let last = match end {
                // Not stored: the client is not told the stream completed.
                StreamEnd::Done if !stored => {
                    let error = crate::http::store_unavailable(true).body();
                    Some(sse_frame(error.to_string().as_bytes()))
                }
                StreamEnd::Done => Some(Bytes::from_static(b"data: [DONE]\n\n")),
                StreamEnd::ClientGone | StreamEnd::Failed { .. } => last,
            };
            // A client still reading gets the last event as it would any other: until the
            // later of the deadline (which may have ended the stream) and `idle` from now.
            if let Some(last) = last
                && deliver(&tx, last, deadline.0.max(Instant::now() + idle))
                    .await
                    .is_ok()
            {
                ended.store(true, std::sync::atomic::Ordering::Release);
            }
        });
        let mut response = Response::new(stream_body(rx, told));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        keel_headers(&mut response, &answered.id, attempts, fallback, false);
        passed.apply(response.headers_mut());
        response
    }

    pub(crate) async fn exhausted(
        self,
        route: &Route,
        endpoint: Endpoint,
        log: CallLog,
        last: Option<UpstreamError>,
        timed_out: bool,
        (refused, account): (bool, bool),
    ) -> Response {
        // Every target refused the request itself (context too long, content
        // filter): that is the client's to fix, not an outage to paper over.
        // Every target was tried, so the error passed on is the last target's. Every target
        // refusing keel's account is an outage of keel's: the degraded reply when there is
        // one, else the 502 that says so.
        if (refused || (account && route.degraded_reply_for(endpoint).is_none()))
            && let Some(e @ UpstreamError::Status { .. }) = last
        {
            let fallback = route.targets.len() > 1;
            return self.fatal(route, log, e, fallback).await;
        }
        self.unavailable(route, endpoint, log, last, timed_out)
            .await
    }

    /// Every target failed or is open: the degraded reply, or 503/504.
    async fn unavailable(
        mut self,
        route: &Route,
        endpoint: Endpoint,
        mut log: CallLog,
        last: Option<UpstreamError>,
        timed_out: bool,
    ) -> Response {
        let why = match &last {
            // No target was called: each circuit is open (or busy with its trial calls), and
            // the message names them all, not only the one that lets a trial through first.
            Some(UpstreamError::BreakerOpen { .. })
                if log.attempts == 0 && route.targets.len() > 1 =>
            {
                let targets: Vec<&str> = route.targets.iter().map(|t| t.id.as_str()).collect();
                format!(
                    "no target's circuit lets a call through now ({}); Retry-After says when the first will",
                    targets.join(", ")
                )
            }
            Some(e) => e.to_string(),
            None => "every target's circuit is open".to_owned(),
        };
        let Some(reply) = route.degraded_reply_for(endpoint).map(str::to_owned) else {
            let event = self.llm_call(
                &log,
                "none",
                if timed_out { "timeout" } else { "unavailable" },
                false,
                log.spent_usage(),
                Recorded::Nothing,
            );
            log.events.push(event);
            self.spend(&mut log, None);
            let blobs = self.take_blobs();
            let ending = self.ending((&route.name, "none"), "error", false);
            let stored = self
                .record(std::mem::take(&mut log.events), blobs, log.who.task.clone())
                .await;
            ending.end(stored).await;
            let message = format!("route {:?} could not be served: {why}", route.name);
            // A 429 that refuses keel's account (a spent quota) is no rate limit to wait out.
            let rate_limited = matches!(&last, Some(e @ UpstreamError::Status { status, .. })
                if *status == StatusCode::TOO_MANY_REQUESTS && !e.credentials_refused());
            let mut err = if timed_out {
                ApiError::timeout(message)
            } else if rate_limited {
                // The provider's rate limit outlasted keel's retries: the client's SDK sees
                // the rate limit it would have seen calling the provider itself.
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
                    .with_code("rate_limit_exceeded")
            } else {
                ApiError::unavailable(message)
            };
            match &last {
                Some(UpstreamError::Status {
                    retry_after: Some(after),
                    ..
                }) => {
                    // The upstream's wait, within reason (a day at most).
                    err.retry_after = Some(after.as_secs().clamp(1, 86_400));
                }
                Some(UpstreamError::BreakerOpen { retry_in, .. }) => {
                    // Every circuit is open: until the soonest lets a trial call through.
                    let secs = retry_in.as_secs() + u64::from(retry_in.subsec_nanos() > 0);
                    err.retry_after = Some(secs.clamp(1, 86_400));
                }
                _ => {}
            }
            let mut response = err.into_response();
            if rate_limited {
                // keel retried the rate limit already: the SDK's own retries (two by default)
                // would only multiply the calls on a provider that is refusing them.
                response
                    .headers_mut()
                    .insert(crate::http::SHOULD_RETRY, HeaderValue::from_static("false"));
            }
            keel_headers(&mut response, "none", log.attempts, false, false);
            return response;
        };
        log.push(
            EventKind::DegradedReply,
            json!({"route": route.name, "agent": log.who.agent, "reason": why}),
        );
        let event = self.llm_call(
            &log,
            "degraded",
            "degraded",
            false,
            log.spent_usage(),
            Recorded::Nothing,
        );
        log.events.push(event);
        self.spend(&mut log, None);
        let blobs = self.take_blobs();
        let ending = self.ending((&route.name, "none"), "degraded", false);
        let stored = self
            .record(std::mem::take(&mut log.events), blobs, log.who.task.clone())
            .await;
        ending.end(stored).await;
        if !stored {
            let mut response = crate::http::store_unavailable(false).into_response();
            keel_headers(&mut response, "none", log.attempts, false, false);
            return response;
        }
        let mut response = if self.stream {
            // `hide_usage`: keel asked for the usage chunk, the client did not.
            let chunks = degraded_chunks(&route.name, &reply, !self.hide_usage);
            let mut r = Response::new(Body::from(chunks));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            r
        } else {
            axum::Json(degraded_completion(&route.name, &reply)).into_response()
        };
        keel_headers(&mut response, "degraded", log.attempts, false, true);
        response
    }

    /// A fatal upstream error goes back to the client as the upstream said it; `fallback`
    /// when a target after the route's first gave it.
    pub(crate) async fn fatal(
        mut self,
        route: &Route,
        mut log: CallLog,
        error: UpstreamError,
        fallback: bool,
    ) -> Response {
        let target = target_of(&error);
        // A 401/403 from a provider is about keel's key for it, not the agent's:
        // the agent gets a 502, and the provider's message (which may quote
        // part of the key) is neither passed on nor recorded.
        let credentials_refused = error.credentials_refused();
        let upstream_body = match &error {
            UpstreamError::Status { .. } if credentials_refused => None,
            UpstreamError::Status { body, .. } => Some(body.clone()),
            UpstreamError::Connect { .. }
            | UpstreamError::Timeout { .. }
            | UpstreamError::Malformed { .. }
            | UpstreamError::StreamCut { .. }
            | UpstreamError::BreakerOpen { .. } => None,
        };
        // A JSON error body is kept like an answer (a body that is not JSON is not kept).
        let kept = upstream_body
            .as_ref()
            .filter(|_| self.gw.record_payloads)
            .and_then(|body| {
                Some((
                    Kept::of(&keel_core::Document::parse(body).ok()?, body),
                    body,
                ))
            });
        let recorded = kept.map_or(Recorded::Nothing, |(kept, body)| {
            let record = AnswerRecord {
                text: Some(kept),
                ..AnswerRecord::default()
            };
            Recorded::Answer(record, body)
        });
        log.request_id = error.request_id().map(str::to_owned);
        let event = self.llm_call(
            &log,
            &target,
            "fatal",
            fallback,
            log.spent_usage(),
            recorded,
        );
        log.events.push(event);
        self.spend(&mut log, None);
        let blobs = self.take_blobs();
        let ending = self.ending((&route.name, &target), "error", false);
        let stored = self
            .record(std::mem::take(&mut log.events), blobs, log.who.task.clone())
            .await;
        ending.end(stored).await;
        let mut response = match error {
            UpstreamError::Status { status, hint, .. } if credentials_refused => {
                let mut err = if hint == keel_core::class::ErrorHint::AccountRefused {
                    ApiError::unavailable(format!(
                        "provider {target} refused keel's account (HTTP {}): its billing or credit; check the provider account keel's key belongs to",
                        status.as_u16()
                    ))
                    .with_code("upstream_account_refused")
                } else {
                    ApiError::unavailable(format!(
                        "provider {target} refused keel's credentials (HTTP {}); check the provider's api_key_env",
                        status.as_u16()
                    ))
                    .with_code("upstream_credentials_refused")
                };
                err.status = StatusCode::BAD_GATEWAY;
                err.into_response()
            }
            // The provider's error as it sent it, with its id and the account's rate limits.
            UpstreamError::Status {
                status,
                body,
                passed,
                ..
            } if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_ok() => {
                let mut r = Response::new(Body::from(body));
                *r.status_mut() = status;
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                passed.apply(r.headers_mut());
                r
            }
            // Not JSON (an HTML error page from a proxy in front of the provider): the
            // status stands, the message says what came back, in the OpenAI shape.
            UpstreamError::Status {
                status,
                body,
                passed,
                ..
            } => {
                let mut err = ApiError::unavailable(format!(
                    "provider {target} answered HTTP {} with a body that is not JSON: {}",
                    status.as_u16(),
                    String::from_utf8_lossy(&body[..body.len().min(200)]).trim()
                ))
                .with_code("upstream_error");
                err.status = status;
                let mut r = err.into_response();
                passed.apply(r.headers_mut());
                r
            }
            other => {
                let mut err = ApiError::unavailable(other.to_string());
                err.status = StatusCode::BAD_GATEWAY;
                err.into_response()
            }
        };
        keel_headers(&mut response, &target, log.attempts, fallback, false);
        response
    }
}

/// The counting of a call that waits for its events to be recorded. Ended with the record's
/// result ([`Ending::end`]): the request counted as its outcome, or as an `error` when its
/// answer is withheld (nothing is acknowledged that is not stored); its fallback, degraded
/// reply, loop stop and duration. Dropped instead (the client left during the wait, which
/// ends the handler's future; the events are queued and commit all the same), it counts the
/// call as its outcome and hands the loop stop to a background task.
pub(crate) struct Ending<'a> {
    gw: &'a Arc<Gateway>,
    route_name: &'a str,
    route_metrics: &'a crate::metrics::RouteMetrics,
    started: Instant,
    target: &'a str,
    outcome: &'static str,
    fallback: bool,
    /// A loop found in the call's task: it is stopped whether or not the client waits.
    looping: Option<crate::looping::LoopStop>,
    ended: bool,
}

impl Ending<'_> {
    /// Counts the call (`stored`: whether its events were recorded) and stops its loop.
    async fn end(mut self, stored: bool) {
        self.ended = true;
        self.count(stored);
        if let Some(stop) = self.looping.take() {
            // On a task of its own, so a client that leaves meanwhile cannot cut it short.
            let gw = Arc::clone(self.gw);
            let _ = self
                .gw
                .tasks
                .spawn(async move { gw.stop_loop(stop).await })
                .await;
        }
    }

    fn count(&self, stored: bool) {
        let outcome = if stored { self.outcome } else { "error" };
        if outcome != "ok" || !self.route_metrics.count_ok(self.target) {
            count_request(self.gw, self.route_name, self.target, outcome);
        }
        if self.fallback {
            count_route(&self.gw.metrics.fallbacks, self.route_name);
        }
        if stored && outcome == "degraded" {
            count_route(&self.gw.metrics.degraded, self.route_name);
        }
        self.route_metrics
            .duration
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for Ending<'_> {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        self.count(true);
        if let Some(stop) = self.looping.take() {
            let gw = Arc::clone(self.gw);
            self.gw.tasks.spawn(async move { gw.stop_loop(stop).await });
        }
    }
}

fn target_of(error: &UpstreamError) -> String {
    match error {
        UpstreamError::Connect { target, .. }
        | UpstreamError::Timeout { target, .. }
        | UpstreamError::Status { target, .. }
        | UpstreamError::Malformed { target, .. }
        | UpstreamError::StreamCut { target, .. }
        | UpstreamError::BreakerOpen { target, .. } => target.clone(),
    }
}

/// A stream's body: the frames `rx` gets. When they stop before the stream's last event was
/// sent (`told`: the client fell too far behind to take it, or the pump failed), the body
/// ends with an error, so the connection is broken off (an HTTP/1 chunked body without its
/// end): the client's SDK raises an error, not a stream that looks complete.
fn stream_body(rx: mpsc::Receiver<Bytes>, told: Arc<std::sync::atomic::AtomicBool>) -> Body {
    let frames = futures::stream::unfold(Some(rx), move |rx| {
        let told = Arc::clone(&told);
        async move {
            let mut rx = rx?;
            match rx.recv().await {
                Some(frame) => Some((Ok(frame), Some(rx))),
                None if told.load(std::sync::atomic::Ordering::Acquire) => None,
                None => Some((
                    Err(std::io::Error::other(
                        "the stream ended before its last event could be sent",
                    )),
                    None,
                )),
            }
        }
    });
    Body::from_stream(frames)
}

/// `data` as one server-sent event: a `data:` line for each of its lines (an upstream's
/// event may have come in several, which the parser joined with `\n`).
pub(crate) fn sse_frame(data: &[u8]) -> Bytes {
    let mut frame = Vec::with_capacity(data.len() + 8);
    for line in data.split(|b| *b == b'\n') {
        frame.extend_from_slice(b"data: ");
        frame.extend_from_slice(line);
        frame.push(b'\n');
    }
    frame.push(b'\n');
    Bytes::from(frame)
}

fn degraded_completion(route: &str, reply: &str) -> Value {
    json!({
        "id": format!("chatcmpl-keel-degraded-{}", uuid::Uuid::new_v4().simple()),
        "object": "chat.completion",
        "created": crate::agents::wall_now().as_secs(),
        "model": route,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": reply},
            "finish_reason": "stop",
        }],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    })
}

/// The degraded reply as a stream; `with_usage` (the client set
/// `stream_options.include_usage`) adds OpenAI's last chunk of zero usage.
fn degraded_chunks(route: &str, reply: &str, with_usage: bool) -> Bytes {
    let id = format!("chatcmpl-keel-degraded-{}", uuid::Uuid::new_v4().simple());
    let created = crate::agents::wall_now().as_secs();
    let chunk = |delta: Value, finish: Value| {
        json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": route,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        })
    };
    let mut out = Vec::new();
    let mut chunks = vec![
        chunk(json!({"role": "assistant", "content": reply}), Value::Null),
        chunk(json!({}), json!("stop")),
    ];
    if with_usage {
        chunks.push(json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": route,
            "choices": [],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }));
    }
    for c in chunks {
        out.extend_from_slice(&sse_frame(c.to_string().as_bytes()));
    }
    out.extend_from_slice(b"data: [DONE]\n\n");
    Bytes::from(out)
}

pub(crate) fn keel_headers(
    response: &mut Response,
    target: &str,
    attempts: u32,
    fallback: bool,
    degraded: bool,
) {
    // Names built once: a `&str` name is copied into a new `HeaderName` on every insert.
    static TARGET: HeaderName = HeaderName::from_static("x-keel-target");
    static ATTEMPTS: HeaderName = HeaderName::from_static("x-keel-attempts");
    static FALLBACK: HeaderName = HeaderName::from_static("x-keel-fallback");
    static DEGRADED: HeaderName = HeaderName::from_static("x-keel-degraded");
    let flag = |on: bool| HeaderValue::from_static(if on { "true" } else { "false" });
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(target) {
        headers.insert(TARGET.clone(), v);
    }
    headers.insert(ATTEMPTS.clone(), HeaderValue::from(attempts));
    headers.insert(FALLBACK.clone(), flag(fallback));
    headers.insert(DEGRADED.clone(), flag(degraded));
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A stream whose last event was sent ends cleanly; one whose frames stop before it
    /// ends with an error (the connection broken off), after the frames that came.
    #[tokio::test]
    async fn a_stream_body_ends_cleanly_only_after_its_last_event() {
        for told in [true, false] {
            let (tx, rx) = mpsc::channel(4);
            let flag = Arc::new(std::sync::atomic::AtomicBool::new(told));
            tx.send(Bytes::from_static(b"data: {}\n\n")).await.unwrap();
            drop(tx);
            let mut body = stream_body(rx, flag);
            let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
            assert_eq!(first, "data: {}\n\n");
            match body.frame().await {
                None => assert!(told, "ended cleanly without its last event"),
                Some(Err(e)) => {
                    assert!(!told, "{e}");
                    assert!(e.to_string().contains("before its last event"), "{e}");
                }
                Some(Ok(frame)) => panic!("unexpected {frame:?}"),
            }
        }
    }
}
