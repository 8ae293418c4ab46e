//! The route executor: one client call through a route's chain of targets.
//!
//! Order of policies for one call (outermost first):
//! 1. total deadline (`timeouts.total`) over everything below;
//! 2. fallback chain: targets in order, a target whose breaker is open is skipped;
//! 3. per target, retry with backoff and jitter, gated by the route's retry budget;
//! 4. per attempt, the circuit breaker permit (a stream keeps it to its end, see
//!    [`crate::stream_attempt`]), then the attempt deadline
//!    (`timeouts.attempt`, and `first_token` for streams), then the provider call
//!    (or, when `[chaos]` picked a fault for the attempt, the injected failure in its
//!    place, under the same deadlines, so every policy above reacts to it as to a real one).
//!
//! Errors are classified once ([`UpstreamError::class`]): retryable errors are
//! retried on the same target, fallback-only errors move to the next target,
//! fatal errors go back to the client unchanged. Everything that happens is
//! collected as events in the [`CallLog`] and written by the caller in one append.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use keel_config::{Fault, FaultKind, RetrySettings, RouteSettings, TimeoutSettings};
use keel_core::{ErrorClass, EventKind, NewEvent};
use keel_policy::Clock;
use keel_policy::backoff::{Backoff, retry_after_delay};
use keel_policy::breaker::{Breaker, Outcome, Transition};
use keel_policy::budget::RetryBudget;
use parking_lot::Mutex;
use serde_json::json;
use tokio::time::Instant;

use crate::body::RawObject;
use crate::chaos::{AttemptInfo, Chaos, HeaderFault, Source};
use crate::error::UpstreamError;
use crate::metrics::{AttemptLabels, ChaosLabels, Metrics, RouteLabel};
use crate::output::OutputCheck;
use crate::provider::{ChunkStream, Endpoint, Passed, Provider, ProviderReply, ProviderRequest};
use crate::stream_attempt::StreamAttempt;
use crate::usage::Usage;

/// How long the retry budget remembers calls (tower's `TpsBudget` default).
const RETRY_BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// One target of a route: a provider and the model to ask it for.
pub struct Target {
    /// `provider/model`, the name in headers, events and metrics.
    pub id: String,
    /// The model name sent upstream.
    pub model: String,
    /// The provider client.
    pub provider: Arc<dyn Provider>,
    /// The target's breaker, shared by every route that uses this target.
    pub breaker: Arc<Mutex<Breaker>>,
    /// `keel_attempts_total{target,outcome="ok"}`, resolved once.
    pub(crate) attempts_ok: prometheus_client::metrics::counter::Counter,
    /// Set once the target refused the `stream_options` keel adds to a stream (Azure
    /// OpenAI before api-version 2024-10-21, servers that refuse unknown members): keel's
    /// later streams to it go without, as the client sent them.
    pub(crate) refuses_stream_options: AtomicBool,
}

impl Target {
    /// Counts one attempt in `keel_attempts_total{target,outcome}`.
    pub(crate) fn count_attempt(&self, metrics: &Metrics, outcome: &str) {
        if outcome == "ok" {
            self.attempts_ok.inc();
            return;
        }
        metrics
            .attempts
            .get_or_create(&AttemptLabels {
                target: self.id.clone().into(),
                outcome: outcome.into(),
            })
            .inc();
    }
}

/// A route with its live policy state.
pub struct Route {
    /// Route name (what clients send as `model`).
    pub name: String,
    /// Targets in fallback order.
    pub targets: Vec<Arc<Target>>,
    /// Static reply when every target fails.
    pub degraded_reply: Option<String>,
    /// Retry settings.
    pub retry: RetrySettings,
    /// Deadlines.
    pub timeouts: TimeoutSettings,
    /// Whether `json_schema` answers are checked and corrected.
    pub validate_output: bool,
    budget: Mutex<RetryBudget>,
    /// The series every answered call of the route updates.
    pub(crate) metrics: Arc<crate::metrics::RouteMetrics>,
}

impl Route {
    /// The reply served when every target failed, for a call to `endpoint`: chat only.
    pub(crate) fn degraded_reply_for(&self, endpoint: Endpoint) -> Option<&str> {
        self.degraded_reply
            .as_deref()
            .filter(|_| endpoint == Endpoint::ChatCompletions)
    }

    /// Builds a route over already-built targets, with its series in `metrics`.
    pub(crate) fn new(
        settings: &RouteSettings,
        targets: Vec<Arc<Target>>,
        metrics: &crate::metrics::Metrics,
    ) -> Self {
        let route_metrics = crate::metrics::RouteMetrics::new(
            metrics,
            &settings.name,
            targets.iter().map(|t| t.id.as_str()),
        );
        let budget = RetryBudget::new(
            RETRY_BUDGET_WINDOW,
            settings.retry.budget_min_per_sec,
            settings.retry.budget_ratio,
        );
        Self {
            name: settings.name.clone(),
            targets,
            degraded_reply: settings.degraded_reply.clone(),
            retry: settings.retry,
            timeouts: settings.timeouts,
            validate_output: settings.validate_output,
            budget: Mutex::new(budget),
            metrics: Arc::new(route_metrics),
        }
    }
}

/// Who a call is for, as recorded in its events.
#[derive(Debug, Clone, Default)]
pub struct Attribution {
    /// Agent name.
    pub agent: String,
    /// Task id, from `x-keel-task` or the `/tasks/{id}/v1` path.
    pub task: Option<String>,
    /// Step label, from `x-keel-step`.
    pub step: Option<String>,
    /// The name of the agent key the call came with (its environment variable), if any.
    pub key: Option<String>,
}

/// Events and counters of one call, written by the caller in one append.
pub struct CallLog {
    /// Who the call is for.
    pub who: Attribution,
    /// Events so far, in order.
    pub events: Vec<NewEvent>,
    /// Attempts made over all targets.
    pub attempts: u32,
    /// Faults injected by `[chaos]` into this call's attempts, in order.
    pub chaos: Vec<InjectedFault>,
    /// What input screening found in the request (`llm_call.injection`).
    pub screened: Option<serde_json::Value>,
    /// The answering provider's id of its answer (`llm_call.request_id`).
    pub request_id: Option<String>,
    /// The usage of answers keel paid for and did not pass on (those that did not match the
    /// request's schema), with the target that gave each: the call's spend includes them.
    pub spent: Vec<(String, Usage)>,
    /// A provider reported no usage for an answer of this call: its spend holds keel's
    /// estimate ([`crate::usage::estimate`]; `llm_call.usage_estimated`).
    pub usage_estimated: bool,
    /// Why a stream failed after its first byte (`llm_call.error`).
    pub failure: Option<String>,
}

/// One fault `[chaos]` injected into an attempt, recorded in `llm_call.chaos`.
#[derive(Debug, Clone)]
pub struct InjectedFault {
    /// 1-based attempt number within the call.
    pub attempt: u32,
    /// The target the attempt was for.
    pub target: String,
    /// The fault.
    pub fault: FaultKind,
    /// Header, outage or rule.
    pub source: Source,
}

impl InjectedFault {
    /// `{"attempt", "target", "fault", "source"}`.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "attempt": self.attempt,
            "target": self.target,
            "fault": self.fault.as_str(),
            "source": self.source.as_str(),
        })
    }
}

impl CallLog {
    /// An empty log for `who`.
    pub fn new(who: Attribution) -> Self {
        Self {
            who,
            events: Vec::new(),
            attempts: 0,
            chaos: Vec::new(),
            screened: None,
            request_id: None,
            spent: Vec::new(),
            usage_estimated: false,
            failure: None,
        }
    }

    /// Adds `answer`, paid for and not passed on, to the call's spend: its usage, or
    /// keel's estimate when it reported none.
    fn spend_on(&mut self, target: &str, request: &RawObject, answer: &JsonReply) {
        let usage = answer.usage.unwrap_or_else(|| {
            self.usage_estimated = true;
            crate::usage::estimate::answer(request, &answer.body)
        });
        self.spent.push((target.to_owned(), usage));
    }

    /// The usage of the answers keel paid for and did not pass on, summed.
    pub fn spent_usage(&self) -> Option<Usage> {
        self.spent.iter().map(|(_, u)| *u).reduce(sum_usage)
    }

    /// Appends an event of this call's task.
    pub fn push(&mut self, kind: EventKind, data: serde_json::Value) {
        self.events
            .push(NewEvent::new(kind, self.who.task.clone(), data));
    }
}

/// What the chain produced.
pub enum Answer {
    /// A complete JSON body from `target`.
    Json {
        /// The target that answered.
        target: Arc<Target>,
        /// The body, unchanged.
        body: Bytes,
        /// Token usage the body reported.
        usage: Option<Usage>,
        /// What the call's record keeps of the body.
        record: AnswerRecord,
        /// The answer's headers to pass on (its id, the account's rate limits).
        passed: Passed,
        /// Whether `target` is not the route's first.
        fallback: bool,
    },
    /// A stream whose first chunk has arrived (nothing sent to the client yet).
    Stream {
        /// The first chunk.
        first: Bytes,
        /// The rest.
        rest: ChunkStream,
        /// The answer's headers to pass on (its id, the account's rate limits).
        passed: Passed,
        /// Whether the target that answered is not the route's first.
        fallback: bool,
        /// The attempt (and the target that answered), settled when the stream ends.
        attempt: StreamAttempt,
    },
    /// Every target failed or was open; the last failure, if any attempt was made.
    Exhausted {
        /// The last error seen.
        last: Option<UpstreamError>,
        /// Whether the total deadline ran out.
        timed_out: bool,
        /// Whether every target was tried and refused the request itself (a fallback-only
        /// error such as context too long): the client's to fix, not an outage.
        refused: bool,
        /// Whether every target was tried and refused keel's account (a spent quota).
        account: bool,
    },
    /// A fatal error to return to the client unchanged.
    Fatal {
        /// The error.
        error: UpstreamError,
        /// Whether the target that gave it is not the route's first.
        fallback: bool,
    },
}

/// Runs one call through `route`. `body` is the client's JSON object.
pub struct Executor<'a> {
    /// The route.
    pub route: &'a Route,
    /// Metrics.
    pub metrics: &'a Metrics,
    /// Where breaker transitions are appended, in the order they happen.
    pub(crate) transitions: &'a crate::transitions::TransitionLog,
    /// This node's id, in breaker events (breakers are per node).
    pub node: &'a str,
    /// Clock for breakers and budgets.
    pub clock: &'a dyn Clock,
    /// Fault injection, when `[chaos]` is enabled.
    pub chaos: Option<&'a Chaos>,
    /// The request's `x-keel-chaos` fault (only parsed when chaos is enabled).
    pub chaos_header: Option<HeaderFault>,
    /// The schema the answer must match (`response_format: json_schema`), when the
    /// route validates output.
    pub output: Option<&'a OutputCheck>,
    /// Keep a JSON answer's canonical text (for the call's record): the answer is read
    /// once, its `usage` taken from that reading.
    pub keep_text: bool,
    /// The deadline of the task the call belongs to: the call's total deadline is the
    /// tighter of it and `timeouts.total`.
    pub task_deadline: Option<Instant>,
    /// keel added `stream_options.include_usage` to this stream's body (the client had not
    /// asked): a target that refuses the member gets the body again without it.
    pub asked_stream_usage: bool,
}

/// Most events of a stream held back while they say nothing (see [`says_nothing_yet`]).
const MAX_HELD_EVENTS: usize = 8;

/// Whether a stream's event carries nothing for the client yet: every choice's delta holds
/// at most a `role` (other members absent, null or empty), no choice has finished, and there
/// is no `usage`. OpenAI's role-only opening chunk, and Azure's chunk of prompt filter results
/// with no choices, are such events; an error object (no `choices`) is not.
fn says_nothing_yet(event: &serde_json::Value) -> bool {
    use serde_json::Value;
    if event.get("usage").is_some_and(|u| !u.is_null()) {
        return false;
    }
    let Some(choices) = event.get("choices").and_then(Value::as_array) else {
        return false;
    };
    choices.iter().all(|choice| {
        choice.get("finish_reason").is_none_or(Value::is_null)
            && choice
                .get("delta")
                .and_then(Value::as_object)
                .is_some_and(|delta| {
                    delta.iter().all(|(key, value)| {
                        key == "role" || value.is_null() || value.as_str() == Some("")
                    })
                })
    })
}

/// The deadline of a task with `facts`, for a call made now: `Err` (504) when it has
/// passed, since the tightest deadline wins and this one leaves no time.
pub(crate) fn task_deadline(
    task: &str,
    facts: &crate::tools::TaskFacts,
) -> Result<Option<Instant>, crate::error::ApiError> {
    let Some(deadline_ms) = facts.deadline_ms else {
        return Ok(None);
    };
    let now_ms = i64::try_from(crate::agents::wall_now().as_millis()).unwrap_or(i64::MAX);
    match u64::try_from(deadline_ms.saturating_sub(now_ms)) {
        Ok(left) if left > 0 => Ok(Some(Instant::now() + Duration::from_millis(left))),
        _ => Err(crate::error::ApiError::timeout(format!(
            "task {task:?} ran past its deadline {}ms ago; keel makes no more model calls for it",
            now_ms.saturating_sub(deadline_ms)
        ))
        .with_param("task")
        .with_code("task_deadline_exceeded")),
    }
}

impl Executor<'_> {
    /// Tries the chain; see the module docs for the order of policies.
    pub async fn run(
        &self,
        endpoint: Endpoint,
        body: &RawObject,
        stream: bool,
        log: &mut CallLog,
    ) -> Answer {
        let route = self.route;
        let total = Instant::now() + route.timeouts.total;
        let deadline = self.task_deadline.map_or(total, |task| task.min(total));
        route.budget.lock().deposit(self.clock.now());
        let mut last: Option<UpstreamError> = None;
        let mut previous: Option<&Arc<Target>> = None;
        let mut refused = !route.targets.is_empty();
        let mut account = refused;
        // Why the call left the target before this one.
        let mut moved_on = "breaker_open";
        for (index, target) in route.targets.iter().enumerate() {
            if let Some(prev) = previous {
                let reason = moved_on;
                log.push(
                    EventKind::FallbackUsed,
                    json!({"route": route.name, "from": prev.id, "to": target.id, "reason": reason}),
                );
            }
            previous = Some(target);
            // keel's `stream_options`, unless this target refused it before.
            let with_member =
                self.asked_stream_usage && !target.refuses_stream_options.load(Ordering::Relaxed);
            let request_body = if self.asked_stream_usage && !with_member {
                body.without_member("stream_options")
                    .with_model(&target.model)
            } else {
                body.with_model(&target.model)
            };
            let request = ProviderRequest {
                endpoint,
                body: request_body,
                stream,
                target: target.id.clone(),
            };
            match self
                .try_target(target, request, (body, with_member), deadline, log)
                .await
            {
                TargetResult::Answered(answer) => {
                    match self
                        .checked(target, endpoint, body, answer, deadline, log)
                        .await
                    {
                        Ok(answer) => {
                            return Answer::Json {
                                target: Arc::clone(target),
                                body: answer.body,
                                usage: answer.usage,
                                record: answer.record,
                                passed: answer.passed,
                                fallback: index > 0,
                            };
                        }
                        Err(e) => {
                            moved_on = e.reason();
                            last = Some(e);
                            refused = false;
                            account = false;
                        }
                    }
                }
                TargetResult::Streaming(first, rest, passed, attempt) => {
                    return Answer::Stream {
                        first,
                        rest,
                        passed,
                        fallback: index > 0,
                        attempt,
                    };
                }
                TargetResult::Fatal(error) => {
                    return Answer::Fatal {
                        error,
                        fallback: index > 0,
                    };
                }
                TargetResult::Next(e) => {
                    // The client's to fix: every target refused the request itself (not
                    // keel's account, which is an outage of keel's).
                    refused &= matches!(&e, Some(e @ UpstreamError::Status { .. })
                        if e.class() == keel_core::ErrorClass::FallbackOnly
                            && !e.credentials_refused());
                    account &= e.as_ref().is_some_and(UpstreamError::credentials_refused);
                    moved_on = e.as_ref().map_or("breaker_open", UpstreamError::reason);
                    // A later target's open circuit does not hide what an earlier one
                    // answered (its status and `Retry-After` are what the client gets).
                    match (e, &mut last) {
                        (
                            Some(UpstreamError::BreakerOpen { retry_in, .. }),
                            Some(UpstreamError::BreakerOpen {
                                retry_in: soonest, ..
                            }),
                        ) => {
                            // Every circuit so far is open: the soonest to let a call
                            // through (a half-open one's trials may end any moment).
                            *soonest = retry_in.min(*soonest);
                        }
                        (Some(UpstreamError::BreakerOpen { .. }), Some(_)) | (None, _) => {}
                        (Some(e), _) => last = Some(e),
                    }
                }
                TargetResult::OutOfTime(e) => {
                    return Answer::Exhausted {
                        last: e.or(last),
                        timed_out: true,
                        refused: false,
                        account: false,
                    };
                }
            }
        }
        // The last target's attempt may be the one the total deadline ended.
        let timed_out = Instant::now() >= deadline;
        Answer::Exhausted {
            last,
            timed_out,
            refused: refused && !timed_out,
            account: account && !timed_out,
        }
    }

    /// The answer if it matches the request's schema (or there is none); otherwise one
    /// second try on the same target with the error, and that answer if it matches.
    /// `Err` sends the call on to the next target.
    async fn checked(
        &self,
        target: &Arc<Target>,
        endpoint: Endpoint,
        body: &RawObject,
        answer: JsonReply,
        deadline: Instant,
        log: &mut CallLog,
    ) -> Result<JsonReply, UpstreamError> {
        let Some(check) = self.output else {
            return Ok(answer);
        };
        let Err(mismatch) = check.check(&answer.body) else {
            return Ok(answer);
        };
        // Paid for and not passed on, whatever the second try brings.
        log.spend_on(&target.id, body, &answer);
        log.push(
            EventKind::LlmAttemptFailed,
            named(
                json!({"target": target.id, "reason": "schema_mismatch", "error": mismatch.error, "correction": "asking again"}),
                answer.passed.request_id(),
            ),
        );
        self.metrics
            .self_corrections
            .get_or_create(&RouteLabel {
                route: self.route.name.clone().into(),
            })
            .inc();
        let request = ProviderRequest {
            endpoint,
            body: check.correction(body, &mismatch, &target.model),
            stream: false,
            target: target.id.clone(),
        };
        let failed = |detail: String| UpstreamError::malformed(target.id.as_str(), detail);
        // Not a stream: no `stream_options` of keel's to leave out.
        match self
            .try_target(target, request, (body, false), deadline, log)
            .await
        {
            TargetResult::Answered(answer) => match check.check(&answer.body) {
                Ok(()) => Ok(answer),
                Err(again) => {
                    log.spend_on(&target.id, body, &answer);
                    log.push(
                        EventKind::LlmAttemptFailed,
                        named(
                            json!({"target": target.id, "reason": "schema_mismatch", "error": again.error, "correction": "failed"}),
                            answer.passed.request_id(),
                        ),
                    );
                    let detail = format!(
                        "the answer did not match the schema, twice: {}",
                        again.error
                    );
                    Err(failed(detail).with_passed(answer.passed))
                }
            },
            TargetResult::Streaming(..) => Err(failed(
                "a stream answered a request that was not one".to_owned(),
            )),
            TargetResult::Fatal(e) => Err(e),
            TargetResult::Next(e) | TargetResult::OutOfTime(e) => {
                Err(e.unwrap_or_else(|| failed(mismatch.error)))
            }
        }
    }

    async fn try_target(
        &self,
        target: &Arc<Target>,
        mut request: ProviderRequest,
        (body, mut with_member): (&RawObject, bool),
        deadline: Instant,
        log: &mut CallLog,
    ) -> TargetResult {
        let route = self.route;
        let mut backoff = Backoff::new(route.retry.base, route.retry.cap, route.retry.jitter);
        let mut max_attempts = route.retry.max_attempts.get();
        let mut last = None;
        // Whether the call tried other targets first: then a cut at its total deadline is
        // keel's, since they used part of the time.
        let others_first = log.attempts > 0;
        // A slow call recorded when the client leaves is counted and logged like any other,
        // and stored with no call to wait for it.
        let note = |changes: Vec<Transition>| {
            if self.log_transitions(target, changes).is_some() {
                self.transitions.drain();
            }
        };
        // Attempts made, and those of them that were resends without keel's `stream_options`
        // (which take none of the route's retries, nor a step of its backoff).
        let mut attempt = 0;
        let mut resends = 0;
        // A resend's outcome decides whether the target is marked as refusing the member.
        let mut resent = false;
        while attempt < max_attempts {
            attempt += 1;
            let attempt = attempt - 1;
            let (acquired, logged) = {
                let mut breaker = target.breaker.lock();
                let acquired = breaker.try_acquire(self.clock.now());
                let logged = self.log_transitions(target, breaker.take_transitions());
                drop(breaker);
                (acquired, logged)
            };
            // Held from here across the attempt: if the client leaves and this future is
            // dropped (while the transition its permit made is stored, or during the
            // attempt), the guard gives the permit back, so a half-open breaker never loses
            // a trial slot.
            let (acquired, rejected) = match acquired {
                Ok(permit) => (Some(permit), None),
                Err(rejected) => (None, Some(rejected)),
            };
            let mut permit = PermitGuard {
                breaker: &target.breaker,
                permit: acquired,
                clock: self.clock,
                started: None,
                note: Some(&note),
                attempt: None,
            };
            self.transitions.stored(logged).await;
            if let Some(rejected) = rejected {
                let skipped = UpstreamError::BreakerOpen {
                    target: target.id.clone(),
                    // Zero when half-open with every trial out.
                    retry_in: rejected.retry_in,
                };
                return TargetResult::Next(last.or(Some(skipped)));
            }
            let started = self.clock.now();
            permit.started = Some(started);
            let now = Instant::now();
            if now >= deadline {
                return TargetResult::OutOfTime(last);
            }
            log.attempts += 1;
            permit.attempt = Some((target, self.metrics));
            // A stream's attempt lasts as long as the stream: its `attempt` timeout, when
            // written, too.
            let stream_deadline = route.timeouts.stream_attempt.map(|a| now + a);
            let fault = self.inject(target, log);
            // Set by the injection when the failure is its own (only allocated for a fault).
            let tripped = fault.map(|_| Arc::new(AtomicBool::new(false)));
            let result = self
                .attempt(
                    target,
                    request.clone(),
                    deadline,
                    fault.zip(tripped.as_ref()),
                )
                .await;
            if std::mem::take(&mut resent) {
                self.settle_resend(target, &result);
            }
            let Some(permit) = permit.permit.take() else {
                return TargetResult::OutOfTime(last);
            };
            let took = self.clock.now().saturating_sub(started);
            // A stream's health is known only at its end: it takes its permit along, and is
            // recorded and counted then (`StreamAttempt::settle`).
            let result = match result {
                Ok(Reply::Stream(first, rest, passed)) => {
                    let mut attempt = StreamAttempt::new(Arc::clone(target), permit, took);
                    if let Some(until) = stream_deadline {
                        attempt = attempt.until(until);
                    }
                    return TargetResult::Streaming(first, rest, passed, attempt);
                }
                Ok(Reply::Json(answer)) => Ok(answer),
                Err(e) => Err(e),
            };
            let (logged, open) = {
                let mut breaker = target.breaker.lock();
                let outcome_for_breaker = match &result {
                    Ok(_) => Some(true),
                    // Cut by keel's own deadline, its time having gone elsewhere (the task's
                    // earlier steps, the targets tried first, or this target's earlier
                    // attempts and the backoff after them): not the target's failure, but an
                    // attempt that ran past `slow_call` was slow, as resilience4j counts it.
                    Err(UpstreamError::Timeout { phase, .. })
                        if *phase == "task"
                            || (*phase == "total" && (others_first || attempt > 0)) =>
                    {
                        (took >= breaker.settings().slow_call).then_some(true)
                    }
                    Err(e) if e.counts_against_target() => Some(false),
                    Err(_) => None,
                };
                let now = self.clock.now();
                match outcome_for_breaker {
                    Some(success) => breaker.record(
                        permit,
                        now,
                        Outcome {
                            success,
                            duration: took,
                        },
                    ),
                    None => breaker.release(permit),
                }
                let logged = self.log_transitions(target, breaker.take_transitions());
                // After a failure: open now (this failure opened it, or a trial failed), or
                // half-open with every trial out, so no retry can pass.
                let open = result.is_err() && !breaker.would_admit(now);
                drop(breaker);
                (logged, open)
            };
            // Counted before the wait for the transitions' record, which a client that
            // leaves ends.
            match &result {
                Ok(_) => target.count_attempt(self.metrics, "ok"),
                Err(e) => target.count_attempt(self.metrics, e.class().as_str()),
            }
            // An answer is paid for: a client that leaves during that wait is charged it
            // with the call's other spend (taken back out once the wait is over).
            let paid = match (&result, logged) {
                (Ok(answer), Some(_)) => match answer.usage {
                    // A chat answer without usage is charged keel's estimate, as at its end.
                    None if request.endpoint == Endpoint::ChatCompletions => {
                        log.usage_estimated = true;
                        Some(crate::usage::estimate::answer(body, &answer.body))
                    }
                    usage => usage,
                },
                _ => None,
            };
            if let Some(usage) = paid {
                log.spent.push((target.id.clone(), usage));
            }
            self.transitions.stored(logged).await;
            if paid.is_some() {
                log.spent.pop();
            }
            let error = match result {
                Ok(answer) => return TargetResult::Answered(answer),
                Err(e) => e,
            };
            let class = error.class();
            let mut failed = named(
                json!({
                    "route": route.name,
                    "target": target.id,
                    "attempt": attempt + 1,
                    "class": class.as_str(),
                    "reason": error.reason(),
                    "status": error.status().map(|s| s.as_u16()),
                    "error": error.to_string(),
                    "latency_ms": took.as_millis() as u64,
                }),
                error.request_id(),
            );
            // Only a failure the fault itself caused is `injected`; a real failure behind
            // an injected latency or stream cut is not.
            if let (Some(fault), Some(tripped)) = (fault, &tripped)
                && tripped.load(Ordering::Relaxed)
                && let Some(data) = failed.as_object_mut()
            {
                data.insert("injected".into(), fault.kind().as_str().into());
            }
            if with_member && names_stream_options(&error) {
                // Sent again at once without keel's member, as the client sent the body; the
                // refusal is keel's own, so it is not kept as the target's last error.
                if let Some(data) = failed.as_object_mut() {
                    data.insert("resent".into(), "without stream_options".into());
                }
                log.push(EventKind::LlmAttemptFailed, failed);
                request.body = body
                    .without_member("stream_options")
                    .with_model(&target.model);
                with_member = false;
                resent = true;
                resends += 1;
                max_attempts += 1;
                continue;
            }
            log.push(EventKind::LlmAttemptFailed, failed);
            match class {
                ErrorClass::Fatal => return TargetResult::Fatal(error),
                ErrorClass::FallbackOnly => return TargetResult::Next(Some(error)),
                ErrorClass::Retryable => {}
            }
            if attempt + 1 >= max_attempts || open {
                return TargetResult::Next(Some(error));
            }
            let delay = self.retry_delay(&mut backoff, attempt - resends, &error);
            if Instant::now() + delay >= deadline {
                // This target's wait does not fit the time left; the next one may.
                return TargetResult::Next(Some(error));
            }
            if let Some(after) = self.asked_to_wait_over_cap(target, &error) {
                // The target will refuse until then; a later one may answer now.
                log.push(
                    EventKind::RetryScheduled,
                    json!({"route": route.name, "target": target.id, "skipped": format!(
                        "Retry-After of {} is over the retry cap of {}",
                        humantime::format_duration(Duration::from_millis(
                            u64::try_from(after.as_millis()).unwrap_or(u64::MAX)
                        )),
                        humantime::format_duration(route.retry.cap)
                    )}),
                );
                return TargetResult::Next(Some(error));
            }
            if !route.budget.lock().withdraw(self.clock.now()) {
                log.push(
                    EventKind::RetryScheduled,
                    json!({"route": route.name, "target": target.id, "skipped": "retry budget exhausted"}),
                );
                return TargetResult::Next(Some(error));
            }
            self.metrics
                .retries
                .get_or_create(&RouteLabel {
                    route: route.name.clone().into(),
                })
                .inc();
            log.push(
                EventKind::RetryScheduled,
                json!({
                    "route": route.name,
                    "target": target.id,
                    "attempt": attempt + 2,
                    "delay_ms": delay.as_millis() as u64,
                    "after": error.reason(),
                }),
            );
            tokio::time::sleep(delay).await;
            last = Some(error);
        }
        TargetResult::Next(last)
    }

    /// Asks `[chaos]` for this attempt's fault; records and counts one that fires.
    fn inject(&self, target: &Target, log: &mut CallLog) -> Option<Fault> {
        let chaos = self.chaos?;
        let info = AttemptInfo {
            route: &self.route.name,
            target: &target.id,
            agent: &log.who.agent,
            task: log.who.task.as_deref(),
            call_attempt: log.attempts,
        };
        let injection = chaos.decide(&info, self.chaos_header.as_ref(), chaos.now())?;
        let kind = injection.fault.kind();
        self.metrics
            .chaos_injected
            .get_or_create(&ChaosLabels {
                target: target.id.clone().into(),
                fault: kind.as_str().into(),
            })
            .inc();
        log.chaos.push(InjectedFault {
            attempt: log.attempts,
            target: target.id.clone(),
            fault: kind,
            source: injection.source,
        });
        Some(injection.fault)
    }

    /// One attempt under the tightest of the attempt and total deadlines; for a
    /// stream, also waits (under `first_token`) for the first chunk. With a fault, the
    /// injected failure stands in for (or wraps) the provider call, and sets its flag
    /// when the failure is the fault's own.
    async fn attempt(
        &self,
        target_ref: &Target,
        request: ProviderRequest,
        deadline: Instant,
        fault: Option<(Fault, &Arc<AtomicBool>)>,
    ) -> Result<Reply, UpstreamError> {
        let timeouts = &self.route.timeouts;
        let start = Instant::now();
        let attempt_deadline = deadline.min(start + timeouts.attempt);
        let mut phase = if attempt_deadline != deadline {
            "attempt"
        } else if self.task_deadline == Some(deadline) {
            "task"
        } else {
            "total"
        };
        let target = request.target.clone();
        let stream = request.stream;
        let endpoint = request.endpoint;
        // A stream must show its first token (a chunk that says something) within
        // `first_token`, headers included.
        let first_deadline = if stream {
            let first = attempt_deadline.min(start + timeouts.first_token);
            if first < attempt_deadline {
                phase = "first_token";
            }
            first
        } else {
            attempt_deadline
        };
        let timed_out = |after: Duration| UpstreamError::Timeout {
            target: target.clone(),
            phase,
            after,
            passed: Passed::default(),
        };
        let provider = target_ref.provider.as_ref();
        let send = async move {
            match fault {
                Some((fault, tripped)) => {
                    crate::chaos::inject::send(fault, provider, request, tripped).await
                }
                None => provider.send(request).await,
            }
        };
        let reply = match tokio::time::timeout_at(first_deadline, send).await {
            Ok(r) => r?,
            Err(_) => return Err(timed_out(start.elapsed())),
        };
        match reply {
            ProviderReply::Json(body, passed) => {
                // A stream's chunks are kept as its transcript, not as an answer's text.
                match read_json(body, &target, endpoint, self.keep_text && !stream) {
                    // A server that ignored `stream: true`: its whole answer, read and judged
                    // like any JSON answer, goes on as the chunks a stream of it would have sent.
                    Ok(read) if stream => {
                        let Some(chunks) = crate::provider::completion_chunks(&read.body) else {
                            let detail = "a stream was asked for, and the JSON answer that came has no choices to send";
                            return Err(UpstreamError::malformed(target.as_str(), detail)
                                .with_passed(passed));
                        };
                        let mut chunks = chunks.into_iter();
                        let first = chunks.next().unwrap_or_default();
                        let rest = futures::stream::iter(chunks.map(Ok)).boxed();
                        Ok(Reply::Stream(first, rest, passed))
                    }
                    Ok(read) => Ok(Reply::Json(JsonReply { passed, ..read })),
                    // An error object sent as a 200 is named like the same error sent as
                    // an HTTP answer.
                    Err(error) => Err(error.with_passed(passed)),
                }
            }
            ProviderReply::Stream(mut rest, passed) => {
                // Nothing reaches the client before the first event that says something:
                // OpenAI opens every stream with a role-only chunk (Azure with a chunk of
                // filter results and no choices), so a stream that breaks, or stays silent
                // past `first_token`, right after it is still the upstream's failure before
                // the first token, retried and fallen back from like any other. When the
                // stream ends cleanly while events are held, they go to the client.
                let mut held = Vec::new();
                // Whether the upstream's stream has ended (it must not be polled again).
                let mut ended = false;
                loop {
                    let next = tokio::time::timeout_at(first_deadline, rest.next()).await;
                    if !held.is_empty() && matches!(next, Ok(None)) {
                        ended = true;
                        break;
                    }
                    match next {
                        Ok(Some(Ok(event))) => {
                            // An event that is not JSON is the upstream's failure, retried
                            // like a malformed 200 body.
                            let opening = serde_json::from_slice::<serde_json::Value>(&event)
                                .map_err(|e| {
                                    let detail = format!(
                                        "the stream's event {} is not JSON: {e}",
                                        held.len() + 1
                                    );
                                    UpstreamError::malformed(target.as_str(), detail)
                                        .with_passed(passed.clone())
                                })?;
                            held.push(event);
                            if !says_nothing_yet(&opening) || held.len() >= MAX_HELD_EVENTS {
                                break;
                            }
                        }
                        // The upstream's own error event: classified like its HTTP answer.
                        Ok(Some(Err(e @ UpstreamError::Status { .. }))) => {
                            return Err(e.with_passed(passed));
                        }
                        Ok(Some(Err(_)) | None) => {
                            return Err(UpstreamError::StreamCut {
                                target: target.clone(),
                                passed,
                            });
                        }
                        // The answer's headers had come: its id names the silent stream.
                        Err(_) => return Err(timed_out(start.elapsed()).with_passed(passed)),
                    }
                }
                let mut held = held.into_iter();
                let first = held.next().unwrap_or_default();
                if ended {
                    rest = futures::stream::iter(held.map(Ok)).boxed();
                } else if held.len() > 0 {
                    rest = futures::stream::iter(held.map(Ok)).chain(rest).boxed();
                }
                Ok(Reply::Stream(first, rest, passed))
            }
        }
    }

    /// The `Retry-After` of `error` when it is longer than the route's `cap` (and honoured)
    /// and `target` is not the route's last: the call moves on rather than ask again before
    /// the target said it would answer.
    fn asked_to_wait_over_cap(
        &self,
        target: &Arc<Target>,
        error: &UpstreamError,
    ) -> Option<Duration> {
        let retry = &self.route.retry;
        let UpstreamError::Status {
            retry_after: Some(after),
            ..
        } = error
        else {
            return None;
        };
        let last = self
            .route
            .targets
            .last()
            .is_some_and(|t| Arc::ptr_eq(t, target));
        (retry.respect_retry_after && *after > retry.cap && !last).then_some(*after)
    }

    fn retry_delay(&self, backoff: &mut Backoff, attempt: u32, error: &UpstreamError) -> Duration {
        let retry = &self.route.retry;
        if let (
            true,
            UpstreamError::Status {
                retry_after: Some(after),
                ..
            },
        ) = (retry.respect_retry_after, error)
        {
            return retry_after_delay(*after, retry.cap);
        }
        backoff.delay(attempt, &mut rand::rng())
    }

    /// After a resend without keel's `stream_options`: unless the target refused the member
    /// again (then it was not the member it refused: a body that names it in its text,
    /// echoed back), marks the target so that keel's later streams to it go without.
    fn settle_resend(&self, target: &Target, result: &Result<Reply, UpstreamError>) {
        if matches!(result, Err(error) if names_stream_options(error)) {
            return;
        }
        if !target.refuses_stream_options.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                target = %target.id,
                "the provider refuses stream_options; keel's streams to it go without, and their tokens are estimated"
            );
        }
    }

    /// Counts and queues `transitions` (call it with the breaker's lock held, see
    /// [`crate::transitions`]); the ticket to wait for, `None` for almost every call.
    fn log_transitions(&self, target: &Target, transitions: Vec<Transition>) -> Option<u64> {
        self.transitions.note(
            &target.id,
            transitions,
            || json!({"route": self.route.name, "node": self.node}),
        )
    }
}

/// The sum of two answers' usage, when either has one.
pub(crate) fn add_usage(a: Option<Usage>, b: Option<Usage>) -> Option<Usage> {
    match (a, b) {
        (Some(a), Some(b)) => Some(sum_usage(a, b)),
        (a, b) => a.or(b),
    }
}

pub(crate) fn sum_usage(a: Usage, b: Usage) -> Usage {
    Usage {
        prompt_tokens: a.prompt_tokens.saturating_add(b.prompt_tokens),
        completion_tokens: a.completion_tokens.saturating_add(b.completion_tokens),
        total_tokens: a.total_tokens.saturating_add(b.total_tokens),
    }
}

/// A breaker permit that is released if it is dropped unrecorded (the client left): the
/// call ended by the client tells nothing of the target, unless it had already run past
/// `slow_call`, which is recorded as the slow call it was (a target that hangs longer than
/// its clients wait is then still found slow).
struct PermitGuard<'a> {
    breaker: &'a Mutex<Breaker>,
    permit: Option<keel_policy::breaker::Permit>,
    clock: &'a dyn Clock,
    /// When the attempt started (`None` until it does).
    started: Option<Duration>,
    /// Counts and queues the transitions the slow call made (with the breaker's lock held).
    note: Option<&'a (dyn Fn(Vec<Transition>) + Sync)>,
    /// Set once the attempt is under way: dropped unrecorded, it is counted in
    /// `keel_attempts_total` as `client_gone`.
    attempt: Option<(&'a Target, &'a Metrics)>,
}

impl Drop for PermitGuard<'_> {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            let now = self.clock.now();
            // Only an attempt under way can have been slow: a permit dropped before its
            // attempt started (during the wait for its transition's record) is given back.
            let took = self.started.map(|started| now.saturating_sub(started));
            let mut breaker = self.breaker.lock();
            if let Some(took) = took.filter(|took| *took >= breaker.settings().slow_call) {
                breaker.record(permit, now, Outcome::success(took));
                if let Some(note) = self.note {
                    note(breaker.take_transitions());
                }
            } else {
                breaker.release(permit);
            }
            drop(breaker);
            if let Some((target, metrics)) = self.attempt {
                target.count_attempt(metrics, "client_gone");
            }
        }
    }
}

enum Reply {
    Json(JsonReply),
    Stream(Bytes, ChunkStream, Passed),
}

enum TargetResult {
    Answered(JsonReply),
    /// A stream whose first event arrived; its attempt is settled when it ends.
    Streaming(Bytes, ChunkStream, Passed, StreamAttempt),
    Fatal(UpstreamError),
    Next(Option<UpstreamError>),
    OutOfTime(Option<UpstreamError>),
}

/// What the call's `llm_call` keeps of a JSON answer.
#[derive(Debug, Default)]
pub struct AnswerRecord {
    /// How it is kept, when [`Executor::keep_text`] asked for it.
    pub text: Option<crate::usage::Kept>,
    /// Its `model`, when a string.
    pub model: Option<String>,
    /// Its choices' `finish_reason`s that are strings.
    pub finish_reasons: Vec<String>,
}

/// A complete JSON answer, read.
struct JsonReply {
    body: Bytes,
    usage: Option<Usage>,
    record: AnswerRecord,
    /// The answer's headers to pass on (its id, the account's rate limits).
    passed: Passed,
}

/// A failed attempt's event `data` with the provider's id of the answer it failed on, when
/// one had come (the member is left out otherwise).
fn named(mut data: serde_json::Value, request_id: Option<&str>) -> serde_json::Value {
    if let (Some(id), Some(members)) = (request_id, data.as_object_mut()) {
        members.insert("request_id".into(), id.into());
    }
    data
}

/// Reads `usage` from a 200 body; a body that is not JSON, or not an answer (a chat
/// completion without choices, embeddings without data), is the upstream's failure, and
/// retryable; an error object is the error it names ([`UpstreamError::error_object`]). serde
/// reads (and so checks) the whole document once, keeping its canonical text when
/// `keep_text`, else skipping all but what it checks (an odd answer kept is read a second
/// time as a tree, [`crate::usage::read_recorded`]).
fn read_json(
    body: Bytes,
    target: &str,
    endpoint: Endpoint,
    keep_text: bool,
) -> Result<JsonReply, UpstreamError> {
    let malformed = |detail: String| UpstreamError::malformed(target, detail);
    let (usage, shape, text) = if keep_text {
        let (usage, shape, text) =
            crate::usage::read_recorded(&body).map_err(|e| malformed(e.to_string()))?;
        (usage, shape, Some(text))
    } else {
        let (usage, shape) =
            crate::usage::read_answer(&body).map_err(|e| malformed(e.to_string()))?;
        (usage, shape, None)
    };
    // An error object is classified like the same error sent as an HTTP answer.
    if let Some(error) = &shape.error {
        return Err(UpstreamError::error_object(target, body.clone(), error));
    }
    if let Some(missing) = shape.not_an_answer(endpoint) {
        let text = String::from_utf8_lossy(&body);
        let shown: String = text.chars().take(300).collect();
        return Err(malformed(format!("a 200 answer {missing}: {shown}")));
    }
    Ok(JsonReply {
        body,
        usage,
        record: AnswerRecord {
            text,
            model: shape.model,
            finish_reasons: shape.finish_reasons,
        },
        passed: Passed::default(),
    })
}

/// Whether `error` refuses `stream_options`: a 400 or 422 that names the member, as Azure
/// OpenAI before api-version 2024-10-21 and servers that refuse members they do not know
/// answer a stream that carries it.
fn names_stream_options(error: &UpstreamError) -> bool {
    const MEMBER: &[u8] = b"stream_options";
    matches!(error, UpstreamError::Status { status, body, .. }
        if matches!(status.as_u16(), 400 | 422)
            && body.windows(MEMBER.len()).any(|w| w == MEMBER))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use keel_policy::breaker::{Breaker, BreakerSettings, BreakerState, Outcome, Window};
    use keel_policy::{Clock, ManualClock};
    use parking_lot::Mutex;

    use super::PermitGuard;

    /// The call that half-opens a breaker waits for that transition to be stored before its
    /// attempt: a client that leaves during that wait gives the trial slot back, or the
    /// breaker would stay half-open, refusing every call, for good.
    #[tokio::test(flavor = "current_thread")]
    async fn a_client_leaving_while_the_half_open_transition_is_stored_gives_the_slot_back() {
        use futures::FutureExt;
        let config = "[providers.sim]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\n\
                      [routes.r]\ntargets = [{ provider = \"sim\", model = \"m\" }]\n\
                      breaker = { window_size = 2, min_calls = 1, open_for = \"100ms\", half_open_calls = 1 }\n";
        let dir = tempfile::tempdir().unwrap();
        let (gw, _store) = crate::test_gateway(config, &dir);
        let route = &gw.routes["r"];
        let target = &route.targets[0];
        {
            let mut breaker = target.breaker.lock();
            let now = gw.clock.now();
            let permit = breaker.try_acquire(now).unwrap();
            breaker.record(permit, now, Outcome::failure(Duration::from_millis(5)));
            assert_eq!(breaker.state(), BreakerState::Open);
            // Stored before the call: the only transition left to wait for is its own.
            drop(breaker.take_transitions());
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        let executor = super::Executor {
            route,
            metrics: &gw.metrics,
            transitions: &gw.transitions,
            node: &gw.node,
            clock: gw.clock.as_ref(),
            chaos: None,
            chaos_header: None,
            output: None,
            keep_text: false,
            task_deadline: None,
            asked_stream_usage: false,
        };
        let body = crate::body::RawObject::parse(br#"{"model":"r","messages":[]}"#).unwrap();
        let mut log = super::CallLog::new(super::Attribution {
            agent: "a".into(),
            task: None,
            step: None,
            key: None,
        });
        // Polled once: the breaker half-opens for this call, which then waits for the
        // transition's record (the drain task has not run); the client leaves there.
        let call = executor.run(
            crate::provider::Endpoint::ChatCompletions,
            &body,
            false,
            &mut log,
        );
        assert!(call.now_or_never().is_none(), "the call did not wait");
        let mut breaker = target.breaker.lock();
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert!(
            breaker.try_acquire(gw.clock.now()).is_ok(),
            "the trial slot leaked: the breaker refuses every call"
        );
    }

    #[test]
    fn a_dropped_attempt_gives_its_half_open_slot_back() {
        let settings = BreakerSettings {
            window: Window::Count(2),
            min_calls: 2,
            failure_rate: 0.5,
            slow_call_rate: 1.0,
            slow_call: Duration::from_secs(60),
            open_for: Duration::from_secs(1),
            half_open_calls: 1,
        };
        let breaker = Mutex::new(Breaker::new(settings));
        for _ in 0..2 {
            let p = breaker.lock().try_acquire(Duration::ZERO).unwrap();
            let failed = Outcome {
                success: false,
                duration: Duration::from_millis(1),
            };
            breaker.lock().record(p, Duration::ZERO, failed);
        }
        let later = Duration::from_secs(2);
        let clock = ManualClock::at(later);
        let trial = breaker.lock().try_acquire(later).unwrap();
        assert_eq!(breaker.lock().state(), BreakerState::HalfOpen);
        // The client leaves mid-attempt: the guard is dropped unrecorded.
        clock.advance(Duration::from_secs(1));
        drop(PermitGuard {
            breaker: &breaker,
            permit: Some(trial),
            clock: &clock,
            started: Some(later),
            note: None,
            attempt: None,
        });
        assert!(
            breaker.lock().try_acquire(later).is_ok(),
            "the trial slot leaked"
        );
    }

    #[test]
    fn a_client_that_leaves_after_slow_call_leaves_a_slow_call_recorded() {
        let settings = BreakerSettings {
            window: Window::Count(2),
            min_calls: 2,
            failure_rate: 1.0,
            slow_call_rate: 1.0,
            slow_call: Duration::from_secs(10),
            open_for: Duration::from_secs(30),
            half_open_calls: 1,
        };
        let breaker = Mutex::new(Breaker::new(settings));
        let clock = ManualClock::new();
        // Clients that give up after 15 s on a target that hangs: each attempt is dropped,
        // having run past `slow_call`, so the breaker sees two slow calls and opens.
        for _ in 0..2 {
            let started = clock.now();
            let permit = breaker.lock().try_acquire(started).unwrap();
            clock.advance(Duration::from_secs(15));
            drop(PermitGuard {
                breaker: &breaker,
                permit: Some(permit),
                clock: &clock,
                started: Some(started),
                note: None,
                attempt: None,
            });
        }
        assert_eq!(breaker.lock().state(), BreakerState::Open);
    }

    #[test]
    fn only_events_without_content_are_held_back() {
        use serde_json::json;
        let nothing = [
            // OpenAI's opening chunk.
            json!({"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": null}, "finish_reason": null}]}),
            // Azure's prompt filter results.
            json!({"id": "", "choices": [], "prompt_filter_results": [{"prompt_index": 0}]}),
            json!({"choices": [{"delta": {}}], "usage": null}),
        ];
        for event in nothing {
            assert!(super::says_nothing_yet(&event), "{event}");
        }
        let something = [
            json!({"choices": [{"delta": {"role": "assistant", "content": "Hi"}}]}),
            json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "call_1"}]}}]}),
            json!({"choices": [{"delta": {}, "finish_reason": "stop"}]}),
            json!({"choices": [], "usage": {"total_tokens": 3}}),
            json!({"choices": [{"delta": {"refusal": "no"}}]}),
            json!({"error": {"message": "overloaded"}}),
            json!({"choices": [{"index": 0}]}),
        ];
        for event in something {
            assert!(!super::says_nothing_yet(&event), "{event}");
        }
    }
}
