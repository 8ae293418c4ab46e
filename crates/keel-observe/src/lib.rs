//! keel's observer: it watches every event keel commits (a [`keel_store::Tap`]), learns
//! baselines for each agent and route ([`detect`]), turns what goes wrong into alerts,
//! groups them into incidents ([`incident`]) and sends them where `[alerts]` says
//! ([`sink`]).
//!
//! | what happens | alert | incident resolved when |
//! | --- | --- | --- |
//! | a circuit breaker opens | critical `breaker:TARGET` | it closes |
//! | a task goes to the dead-letter queue | warning `dlq:AGENT` | 15 min without another |
//! | the loop guard stops a task | warning `loop:AGENT` | 15 min without another |
//! | a budget passes `warn_at`, an approval escalates (raised elsewhere) | as raised | 15 min without another |
//! | an anomaly ([`detect`]) | warning `anomaly:SIGNAL:WHO` | the signal is usual again |
//!
//! Every alert is an `alert_raised` event (`source: "observe"`), counted in
//! `keel_alerts_total{severity}`; critical alerts go to the webhooks at once, warnings in
//! one digest every `digest_every`, info only to the log and the incident list. The tap
//! only reads a few fields of each event and queues them: the request path never waits
//! for the observer.

pub mod detect;
pub mod fleet;
pub mod incident;
pub mod postmortem;
pub mod signal;
pub mod sink;
pub mod trace;

/// The dashboard, `GET /ui`: one page, no build step; it reads `/v1/dashboard`,
/// `/metrics`, `/v1/dlq`, `/v1/approvals`, `/v1/incidents` and a task's events.
pub const UI: &str = include_str!("ui.html");

/// Minutes of finished-task counts kept for the dashboard.
const SERIES_MINUTES: usize = 120;

/// Finished tasks per minute: `(minute start in Unix ms, succeeded, dead, cancelled)`.
#[derive(Debug, Default)]
struct Series(std::collections::VecDeque<(i64, u64, u64, u64)>);

impl Series {
    fn add(&mut self, now_ms: i64, outcome: &str) {
        let minute = now_ms - now_ms.rem_euclid(60_000);
        if self.0.back().is_none_or(|b| b.0 != minute) {
            if self.0.len() >= SERIES_MINUTES {
                self.0.pop_front();
            }
            self.0.push_back((minute, 0, 0, 0));
        }
        if let Some(b) = self.0.back_mut() {
            match outcome {
                "succeeded" => b.1 += 1,
                "dead" => b.2 += 1,
                _ => b.3 += 1,
            }
        }
    }

    /// The last hour, as JSON.
    fn recent(&self, now_ms: i64) -> Value {
        Value::Array(
            self.0
                .iter()
                .filter(|b| now_ms - b.0 < 3_600_000)
                .map(|b| json!({"minute_ms": b.0, "succeeded": b.1, "dead": b.2, "cancelled": b.3}))
                .collect(),
        )
    }
}

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use keel_config::{AlertsSettings, Severity};
use keel_core::LabelValue;
use keel_core::{ApiError, EventKind, NewEvent};
use keel_store::{Event, EventStore, TaskStore};
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::detect::{Detector, Found};
use crate::incident::{Alert, Grouped, Incidents};
use crate::signal::Signal;
use crate::sink::{Delivery, Note};

/// Signals queued for the observer at most; beyond, new ones are dropped (and counted)
/// rather than slow the request path down.
const QUEUE: usize = 65_536;

/// Labels of `keel_alerts_total` and `keel_incidents_open`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SeverityLabel {
    /// `critical`, `warning` or `info`.
    pub severity: LabelValue,
}

/// The observer's metrics.
#[derive(Clone, Default)]
pub struct ObserveMetrics {
    /// `keel_alerts_total{severity}`.
    pub alerts: Family<SeverityLabel, Counter>,
    /// `keel_incidents_open{severity}`.
    pub incidents_open: Family<SeverityLabel, Gauge>,
}

impl ObserveMetrics {
    /// Registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "keel_alerts",
            "Alerts raised, by severity",
            m.alerts.clone(),
        );
        registry.register(
            "keel_incidents_open",
            "Open incidents, by their worst severity",
            m.incidents_open.clone(),
        );
        m
    }
}

/// Checks that a caller may read the incidents (the admin token, when configured).
pub type AdminCheck = Arc<dyn Fn(&HeaderMap) -> Result<(), ApiError> + Send + Sync>;

/// The observer's handle: the store's tap, and what `GET /v1/incidents` reads.
pub struct Observe {
    tx: mpsc::Sender<Signal>,
    incidents: Arc<Mutex<Incidents>>,
    baselines: Arc<Mutex<Value>>,
    series: Arc<Mutex<Series>>,
    dropped: AtomicU64,
    /// The breakers of every node, as the log tells them.
    fleet: Mutex<fleet::Breakers>,
    /// When this observer started, Unix ms: what it counts (the finished tasks per minute)
    /// starts there.
    started_ms: i64,
}

/// The observer's work, run by [`Observing::run`] until keel stops.
pub struct Observing {
    rx: mpsc::Receiver<Signal>,
    settings: AlertsSettings,
    incidents: Arc<Mutex<Incidents>>,
    baselines: Arc<Mutex<Value>>,
    series: Arc<Mutex<Series>>,
    metrics: ObserveMetrics,
    traces: Option<trace::Traces>,
    export: Option<trace::Export>,
    /// Incidents of conditions from an earlier run, resolved when [`Observing::run`] starts.
    restarted: Vec<String>,
}

impl Observe {
    /// The handle and its work; nothing runs until [`Observing::run`].
    pub fn new(settings: AlertsSettings, metrics: ObserveMetrics) -> (Arc<Self>, Observing) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let incidents = Arc::new(Mutex::new(Incidents::default()));
        let baselines = Arc::new(Mutex::new(json!([])));
        let series = Arc::new(Mutex::new(Series::default()));
        let observe = Arc::new(Self {
            tx,
            incidents: Arc::clone(&incidents),
            baselines: Arc::clone(&baselines),
            series: Arc::clone(&series),
            dropped: AtomicU64::new(0),
            fleet: Mutex::new(fleet::Breakers::default()),
            started_ms: now().1,
        });
        let observing = Observing {
            rx,
            settings,
            incidents,
            baselines,
            series,
            metrics,
            traces: None,
            export: None,
            restarted: Vec::new(),
        };
        (observe, observing)
    }

    /// `GET /v1/incidents?state=open|resolved|all` (default `all`), `GET
    /// /v1/postmortem/{id}` (of a task or an incident, see [`postmortem`]), `GET /v1/dashboard`
    /// (what the dashboard shows beside `/metrics`) and `GET /ui` (the dashboard); `node`
    /// is this node's id (in the breakers of every node that the dashboard lists).
    pub fn router(
        self: Arc<Self>,
        admin: AdminCheck,
        tasks: Arc<dyn TaskStore>,
        node: String,
    ) -> Router {
        Router::new()
            .route("/v1/incidents", get(list))
            .route("/v1/postmortem/{id}", get(postmortem))
            .route("/v1/dashboard", get(dashboard))
            .route("/ui", get(ui))
            .with_state(Shared {
                observe: self,
                admin,
                tasks,
                node: Arc::from(node),
            })
    }

    /// The incidents, open first, as `GET /v1/incidents` answers.
    pub fn incidents(&self, open: bool, resolved: bool) -> Vec<incident::Incident> {
        self.incidents.lock().list(open, resolved)
    }
}

impl keel_store::Tap for Observe {
    fn committed(&self, events: &[Event]) {
        for signal in events.iter().filter_map(Signal::of) {
            if self.tx.try_send(signal).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// `GET /v1/postmortem/{id}`: the postmortem of a task, else of an incident.
async fn postmortem(
    State(shared): State<Shared>,
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    if let Err(e) = (shared.admin)(&headers) {
        return e.into_response();
    }
    let unavailable = |e: keel_store::StoreError| {
        ApiError::unavailable(format!("cannot read the log: {e}")).into_response()
    };
    match shared.tasks.task(&id).await {
        Ok(Some(row)) => {
            let query = keel_store::EventQuery {
                task_id: Some(id),
                ..keel_store::EventQuery::default()
            };
            match shared.tasks.events(query).await {
                Ok(events) => axum::Json(postmortem::of_task(&row, &events)).into_response(),
                Err(e) => unavailable(e),
            }
        }
        Ok(None) => {
            let incident = shared
                .observe
                .incidents(true, true)
                .into_iter()
                .find(|i| i.id == id);
            if let Some(incident) = incident {
                let affected = affected_tasks(&incident);
                return axum::Json(postmortem::of_incident(&incident, affected)).into_response();
            }
            // Neither: the label a client gave its calls (`x-keel-task`), if it has events
            // (the first LABEL_EVENTS: a label reused for days has no end).
            let query = keel_store::EventQuery {
                task_id: Some(id.clone()),
                limit: Some(postmortem::LABEL_EVENTS),
                ..keel_store::EventQuery::default()
            };
            match shared.tasks.events(query).await {
                Ok(events) if !events.is_empty() => {
                    axum::Json(postmortem::of_label(&id, &events)).into_response()
                }
                Ok(_) => ApiError::not_found(
                    format!(
                        "no task, incident or x-keel-task label {id:?} (keel keeps the open \
                         incidents and the newest 200 resolved ones)"
                    ),
                    "not_found",
                )
                .with_param("id")
                .into_response(),
                Err(e) => unavailable(e),
            }
        }
        Err(e) => unavailable(e),
    }
}

/// The tasks an incident touched: those its alerts named (a dead task for `dlq:AGENT`, a
/// looping one for `loop:AGENT`), whatever became of them since (requeued, discarded), each
/// once, the newest 100. Other incidents (a breaker, an anomaly) name no task.
fn affected_tasks(incident: &incident::Incident) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    for task in incident
        .timeline
        .iter()
        .rev()
        .filter_map(|e| e.task.as_ref())
    {
        if found.len() == 100 {
            break;
        }
        if !found.contains(task) {
            found.push(task.clone());
        }
    }
    found.reverse();
    found
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    state: Option<String>,
}

#[derive(Clone)]
struct Shared {
    observe: Arc<Observe>,
    admin: AdminCheck,
    tasks: Arc<dyn TaskStore>,
    node: Arc<str>,
}

async fn ui() -> Response {
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (axum::http::header::CACHE_CONTROL, "no-cache"),
        ],
        UI,
    )
        .into_response()
}

async fn dashboard(State(shared): State<Shared>, headers: HeaderMap) -> Response {
    if let Err(e) = (shared.admin)(&headers) {
        return e.into_response();
    }
    let counts = match shared.tasks.count_by_state().await {
        Ok(counts) => counts,
        Err(e) => {
            return ApiError::unavailable(format!("cannot count the tasks: {e}")).into_response();
        }
    };
    let by_state: serde_json::Map<String, Value> =
        counts.into_iter().map(|(s, n)| (s, json!(n))).collect();
    let (_, now_ms) = now();
    let observe = &shared.observe;
    let breakers = match fleet::Breakers::refresh(&observe.fleet, shared.tasks.as_ref()).await {
        Ok(breakers) => breakers,
        Err(e) => {
            return ApiError::unavailable(format!("cannot read the breaker events: {e}"))
                .into_response();
        }
    };
    axum::Json(json!({
        "tasks_by_state": by_state,
        "finished_per_minute": observe.series.lock().recent(now_ms),
        "incidents_open": observe.incidents.lock().list(true, false).len(),
        "node": &*shared.node,
        "breakers": breakers,
        "started_ms": observe.started_ms,
    }))
    .into_response()
}

async fn list(
    State(shared): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    let observe = &shared.observe;
    if let Err(e) = (shared.admin)(&headers) {
        return e.into_response();
    }
    let (open, resolved) = match q.state.as_deref() {
        None | Some("all") => (true, true),
        Some("open") => (true, false),
        Some("resolved") => (false, true),
        Some(other) => {
            return ApiError::bad_request(format!(
                "state must be open, resolved or all, not {other:?}"
            ))
            .with_param("state")
            .into_response();
        }
    };
    let incidents = observe.incidents(open, resolved);
    let baselines = observe.baselines.lock().clone();
    axum::Json(json!({
        "incidents": incidents,
        "baselines": baselines,
        "signals_dropped": observe.dropped.load(Ordering::Relaxed),
    }))
    .into_response()
}

fn now() -> (String, i64) {
    let t = SystemTime::now();
    let ms = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    (humantime::format_rfc3339_millis(t).to_string(), ms)
}

impl Observing {
    /// Also exports OpenTelemetry spans built from the events ([`trace`]).
    pub fn with_traces(mut self, traces: Option<(trace::Traces, trace::Export)>) -> Self {
        if let Some((traces, export)) = traces {
            self.traces = Some(traces);
            self.export = Some(export);
        }
        self
    }

    /// Hands the waiting spans to the export task; dropped when it is behind.
    fn ship(&mut self, spans: &mpsc::Sender<Vec<opentelemetry_sdk::trace::SpanData>>) {
        if let Some(traces) = &mut self.traces {
            for batch in traces.drain() {
                if spans.try_send(batch).is_err() {
                    tracing::warn!("the OTLP export is behind: a batch of spans is dropped");
                }
            }
        }
    }

    /// The `invoke_agent` span of a task that ended, from its row.
    fn trace_task(&mut self, row: &keel_store::TaskRow, ended_ms: i64) {
        if let Some(traces) = &mut self.traces {
            traces.task(&trace::TaskEnd {
                task: row.id.clone(),
                agent: row.agent.clone(),
                state: row.state.clone(),
                created_ms: row.created_at_ms,
                ended_ms,
                steps: row.snapshot["steps"].as_u64().unwrap_or(0),
                attempts: row.snapshot["attempts"].as_u64().unwrap_or(0),
                confidence: row.snapshot["confidence"].as_f64(),
            });
        }
    }

    /// Learns from the signals, raises and resolves alerts, and delivers them, until `stop`.
    pub async fn run(
        mut self,
        store: Arc<dyn EventStore>,
        tasks: Arc<dyn TaskStore>,
        stop: CancellationToken,
    ) {
        let (deliver, mut deliveries) = mpsc::unbounded_channel::<Delivery>();
        let hooks = self.settings.webhooks.clone();
        let sender = async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap_or_default();
            while let Some(delivery) = deliveries.recv().await {
                sink::deliver(&client, &hooks, &delivery).await;
            }
        };
        let (spans, batches) = mpsc::channel(trace::QUEUED_BATCHES);
        let export = self.export.take();
        let exporting = async move {
            if let Some(export) = export {
                export.run(batches).await;
            }
        };
        let mut detector = Detector::new(self.settings.anomaly);
        let mut digest: Vec<Note> = Vec::new();
        // Incidents that [`Observing::restore`] found open on conditions are resolved and
        // announced like any other resolution.
        for key in std::mem::take(&mut self.restarted) {
            let why =
                "keel restarted: breakers start closed and baselines are learnt again".to_owned();
            self.act(
                Found::Resolve(key, why),
                store.as_ref(),
                &deliver,
                &mut digest,
            )
            .await;
        }
        let mut period = tokio::time::interval(self.settings.anomaly.period);
        let mut digest_timer = tokio::time::interval(self.settings.digest_every);
        let mut export = tokio::time::interval(Duration::from_secs(1));
        period.tick().await;
        digest_timer.tick().await;
        export.tick().await;
        let work = async {
            loop {
                let found = tokio::select! {
                    () = stop.cancelled() => break,
                    signal = self.rx.recv() => match signal {
                        Some(signal) => self.learn(signal, &mut detector, tasks.as_ref()).await,
                        None => break,
                    },
                    _ = period.tick() => {
                        let mut found = detector.tick();
                        let (_, now_ms) = now();
                        let quiet = self.incidents.lock().quiet(now_ms);
                        found.extend(quiet.into_iter().map(|key| Found::Resolve(key, "no new alert for 15 minutes".to_owned())));
                        *self.baselines.lock() = detector.summary();
                        found
                    }
                    _ = digest_timer.tick() => {
                        if !digest.is_empty() {
                            let _ = deliver.send(Delivery::Digest(std::mem::take(&mut digest)));
                        }
                        Vec::new()
                    }
                    _ = export.tick() => {
                        self.ship(&spans);
                        Vec::new()
                    }
                };
                if self
                    .traces
                    .as_ref()
                    .is_some_and(|t| t.pending() >= trace::BATCH)
                {
                    self.ship(&spans);
                }
                for f in found {
                    self.act(f, store.as_ref(), &deliver, &mut digest).await;
                }
            }
            // Spans, and warnings waiting for the digest, go out before keel stops.
            self.ship(&spans);
            drop(spans);
            if !digest.is_empty() {
                let _ = deliver.send(Delivery::Digest(std::mem::take(&mut digest)));
            }
            drop(deliver);
        };
        tokio::join!(work, sender, exporting);
    }

    /// Brings back the incidents of earlier runs from the log, before keel serves: open
    /// incidents of events stay open (with their ids and timelines); those of conditions
    /// (breakers, anomalies) are resolved as soon as [`Observing::run`] starts, since the
    /// conditions start over (breakers closed, baselines learnt anew).
    pub async fn restore(&mut self, store: &dyn EventStore) {
        self.replay(store).await;
        self.restarted = self.incidents.lock().conditions();
        self.count_open();
    }

    /// Replays the alerts this observer recorded in earlier runs into the incidents.
    async fn replay(&self, store: &dyn EventStore) {
        let mut after = None;
        loop {
            let page = store
                .events(keel_store::EventQuery {
                    kind: Some(EventKind::AlertRaised.as_str().to_owned()),
                    after_seq: after,
                    limit: Some(1000),
                    ..keel_store::EventQuery::default()
                })
                .await;
            let page = match page {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read earlier alerts: incidents start empty");
                    return;
                }
            };
            let Some(last) = page.last() else { return };
            after = Some(last.seq);
            let mut incidents = self.incidents.lock();
            for event in &page {
                if event.data["source"] == signal::SOURCE {
                    incidents.replay(&event.data, event.task_id.as_deref(), event.at_ms);
                } else if let Some(Signal::Raised {
                    severity,
                    message,
                    task,
                    key,
                }) = Signal::of(event)
                {
                    // Another part's alert: the observer recorded only the opening of its
                    // incident; the alerts that joined it are its timeline (and keep it from
                    // closing as quiet).
                    incidents.join(
                        &raised(severity, message, task, key),
                        &event.at,
                        event.at_ms,
                    );
                }
            }
        }
    }

    /// What a signal teaches the detector, and the alerts it raises directly.
    async fn learn(
        &mut self,
        signal: Signal,
        detector: &mut Detector,
        tasks: &dyn TaskStore,
    ) -> Vec<Found> {
        match signal {
            Signal::Call(call) => {
                detector.call(
                    &call.route,
                    &call.agent,
                    call.ended(),
                    call.latency_ms,
                    call.tokens,
                );
                if let Some(traces) = &mut self.traces {
                    traces.call(&call);
                }
                Vec::new()
            }
            Signal::Tool(tool) => {
                if let Some(traces) = &mut self.traces {
                    traces.tool(&tool);
                }
                Vec::new()
            }
            Signal::Breaker {
                target,
                to,
                failure_rate,
            } => {
                if let Some(traces) = &mut self.traces {
                    traces.breaker(&target, &to);
                }
                let key = format!("breaker:{target}");
                match to.as_str() {
                    "open" => {
                        let rate = failure_rate
                            .map(|r| format!(" at a failure rate of {:.0}%", 100.0 * r))
                            .unwrap_or_default();
                        vec![Found::Raise(Alert {
                            key,
                            severity: Severity::Critical,
                            title: format!("circuit breaker open: {target}"),
                            message: format!(
                                "the circuit breaker of {target} opened{rate}: calls skip it (fallbacks, or the degraded reply) until it recovers"
                            ),
                            labels: labels(&[("target", json!(target))]),
                            task: None,
                            condition: true,
                            recorded: false,
                        })]
                    }
                    "closed" => vec![Found::Resolve(
                        key,
                        format!("the circuit breaker of {target} closed: calls reach it again"),
                    )],
                    _ => Vec::new(),
                }
            }
            Signal::Cancelled { task, at_ms } => {
                self.series.lock().add(now().1, "cancelled");
                if self.traces.is_some()
                    && let Ok(Some(row)) = tasks.task(&task).await
                {
                    self.trace_task(&row, at_ms);
                }
                Vec::new()
            }
            Signal::Succeeded { task, at_ms } => {
                self.series.lock().add(now().1, "succeeded");
                match tasks.task(&task).await {
                    Ok(Some(row)) => {
                        self.trace_task(&row, at_ms);
                        let steps = row.snapshot["steps"].as_u64().unwrap_or(0);
                        let confidence = row.snapshot["confidence"].as_f64();
                        detector.task(&row.agent, steps, confidence)
                    }
                    Ok(None) => Vec::new(),
                    Err(e) => {
                        tracing::warn!(task, error = %e, "observer cannot read a finished task");
                        Vec::new()
                    }
                }
            }
            Signal::Dead {
                task,
                reason,
                at_ms,
            } => {
                self.series.lock().add(now().1, "dead");
                let agent = match tasks.task(&task).await {
                    Ok(Some(row)) => {
                        self.trace_task(&row, at_ms);
                        row.agent
                    }
                    _ => "unknown".to_owned(),
                };
                vec![Found::Raise(Alert {
                    key: format!("dlq:{agent}"),
                    severity: Severity::Warning,
                    title: format!("tasks of agent {agent} in the dead-letter queue"),
                    message: format!(
                        "task {task} went to the dead-letter queue ({reason}): `keel dlq show {task}`, then requeue or discard"
                    ),
                    labels: labels(&[("agent", json!(agent))]),
                    task: Some(task),
                    condition: false,
                    recorded: false,
                })]
            }
            Signal::Loop { agent, kind, task } => vec![Found::Raise(Alert {
                key: format!("loop:{agent}"),
                severity: Severity::Warning,
                title: format!("agent {agent}'s tasks loop"),
                message: format!(
                    "the loop guard stopped task {task} ({kind}): `keel postmortem {task}`; a task of keel's supervisor waits for a person (`keel approvals ls`), a label of the client's own goes on after a minute",
                    task = task.as_deref().unwrap_or("?")
                ),
                labels: labels(&[("agent", json!(agent)), ("kind", json!(kind))]),
                task,
                condition: false,
                recorded: false,
            })],
            Signal::Raised {
                severity,
                message,
                task,
                key,
            } => vec![Found::Raise(raised(severity, message, task, key))],
        }
    }

    /// Raises or resolves: incidents, the event, the metric, the log and the sinks.
    async fn act(
        &self,
        found: Found,
        store: &dyn EventStore,
        deliver: &mpsc::UnboundedSender<Delivery>,
        digest: &mut Vec<Note>,
    ) {
        let (at, now_ms) = now();
        let (note, record) = match found {
            Found::Raise(alert) => {
                let (grouped, incident) = self.incidents.lock().raise(&alert, &at, now_ms);
                self.metrics
                    .alerts
                    .get_or_create(&SeverityLabel {
                        severity: alert.severity.as_str().into(),
                    })
                    .inc();
                let note = Note {
                    status: "firing",
                    severity: alert.severity,
                    incident,
                    key: alert.key.clone(),
                    title: alert.title.clone(),
                    message: alert.message.clone(),
                    labels: alert.labels.clone(),
                    at,
                };
                // An alert its producer recorded (a budget warning, an escalation) is not
                // recorded again, except once when it opens an incident: that record keeps the
                // incident's id for a restart. It names no task: the producer's does.
                let record = match (alert.recorded, grouped) {
                    (false, _) => Some((alert.task.clone(), note.clone())),
                    (true, Grouped::Opened) => Some((None, note.clone())),
                    (true, Grouped::Escalated | Grouped::Joined) => None,
                };
                // A repeat of an open incident is on its timeline; people hear of it once.
                let notify = matches!(grouped, Grouped::Opened | Grouped::Escalated);
                (notify.then_some(note), record)
            }
            Found::Resolve(key, message) => {
                let Some(incident) = self.incidents.lock().resolve(&key, &message, &at) else {
                    return;
                };
                let note = Note {
                    status: "resolved",
                    severity: match incident.severity {
                        "critical" => Severity::Critical,
                        "warning" => Severity::Warning,
                        _ => Severity::Info,
                    },
                    incident: incident.id.clone(),
                    key,
                    title: incident.title.clone(),
                    message,
                    labels: incident.labels.clone(),
                    at,
                };
                (Some(note.clone()), Some((None, note)))
            }
        };
        self.count_open();
        if let Some((task, note)) = record {
            let mut data = note.to_json();
            data["source"] = json!(signal::SOURCE);
            if let Err(e) = store
                .append(vec![NewEvent::new(EventKind::AlertRaised, task, data)])
                .await
            {
                tracing::warn!(error = %e, "cannot record an alert");
            }
        }
        let Some(note) = note else { return };
        if self.settings.log {
            // An alert whose message is its title (a budget warning) says it once.
            let line = if note.message == note.title {
                format!("{} ({})", note.title, note.incident)
            } else {
                format!("{} ({}): {}", note.title, note.incident, note.message)
            };
            match (note.status, note.severity) {
                ("resolved", _) => {
                    tracing::info!(severity = note.severity.as_str(), "alert resolved: {line}")
                }
                (_, Severity::Critical) => tracing::error!("critical alert: {line}"),
                (_, Severity::Warning) => tracing::warn!("warning alert: {line}"),
                (_, Severity::Info) => tracing::info!("info alert: {line}"),
            }
        }
        match note.severity {
            Severity::Critical => {
                let _ = deliver.send(Delivery::Now(note));
            }
            Severity::Warning => digest.push(note),
            Severity::Info => {}
        }
    }

    fn count_open(&self) {
        let incidents = self.incidents.lock();
        for severity in [Severity::Critical, Severity::Warning, Severity::Info] {
            self.metrics
                .incidents_open
                .get_or_create(&SeverityLabel {
                    severity: severity.as_str().into(),
                })
                .set(i64::try_from(incidents.open_count(severity)).unwrap_or(i64::MAX));
        }
    }
}

/// The alert of an `alert_raised` event another part of keel recorded.
fn raised(severity: Severity, message: String, task: Option<String>, key: String) -> Alert {
    Alert {
        title: message.clone(),
        key,
        severity,
        message,
        labels: serde_json::Map::new(),
        task,
        condition: false,
        recorded: true,
    }
}

fn labels(pairs: &[(&str, Value)]) -> serde_json::Map<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}
