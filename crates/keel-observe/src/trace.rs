//! OpenTelemetry traces over OTLP/HTTP, following the GenAI semantic conventions, built
//! from the events keel commits (so tracing adds nothing to the request path):
//!
//! - `invoke_agent {agent}` per task (kind internal), from its creation to its final state;
//! - `chat {model}` per model call (kind client; `model` is what the client asked for,
//!   keel's route), a child of its task's span when the call named a task;
//! - `execute_tool {name}` per tool call through keel, or refused by a guard.
//!
//! A task's trace id and span id are derived from its id (SHA-256), so its calls find
//! their parent without keel keeping any span open; other spans take their ids from
//! their event's hash. Spans are batched every second (or every 512) and handed to an
//! export task ([`Export`]) that sends them with `opentelemetry-otlp`'s exporter over keel's
//! own HTTP client: a slow collector never holds up the observer's alerts.

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use keel_config::{OtlpProtocol, TelemetrySettings};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue, StringValue, Value};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};

use crate::signal::{Call, ToolCall};

/// Spans exported in one request at most.
pub const BATCH: usize = 512;

/// keel's HTTP client for the exporter (reqwest, on keel's runtime).
#[derive(Debug)]
struct Client(reqwest::Client);

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Client {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let (parts, body) = request.into_parts();
        let response = self
            .0
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers)
            .body(body)
            .send()
            .await?;
        let mut out = http::Response::builder().status(response.status());
        if let Some(headers) = out.headers_mut() {
            *headers = response.headers().clone();
        }
        Ok(out.body(response.bytes().await?)?)
    }
}

/// Spans being built, and the batches waiting for the export task.
pub struct Traces {
    scope: InstrumentationScope,
    batch: Vec<SpanData>,
    /// The last state seen of each breaker (`keel.breaker.state` on model calls).
    breakers: HashMap<String, String>,
}

/// Batches queued for the export task at most; beyond, new ones are dropped (traces are
/// best effort: the event log keeps everything).
pub const QUEUED_BATCHES: usize = 16;

/// The export task's side: sends each batch it is given.
pub struct Export {
    exporter: opentelemetry_otlp::SpanExporter,
}

impl Export {
    /// Exports every batch from `batches` until the sender is gone; a failed export is
    /// logged and dropped.
    pub async fn run(self, mut batches: tokio::sync::mpsc::Receiver<Vec<SpanData>>) {
        while let Some(batch) = batches.recv().await {
            let n = batch.len();
            if let Err(e) = self.exporter.export(batch).await {
                tracing::warn!(error = %e, spans = n, "cannot export spans over OTLP");
            }
        }
    }
}

fn time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

fn digest(text: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(text.as_bytes()).into()
}

/// A task's trace id and its `invoke_agent` span id.
pub fn task_ids(task: &str) -> (TraceId, SpanId) {
    let d = digest(task);
    let mut trace = [0u8; 16];
    let mut span = [0u8; 8];
    trace.copy_from_slice(&d[..16]);
    span.copy_from_slice(&d[16..24]);
    (TraceId::from_bytes(trace), SpanId::from_bytes(span))
}

/// Ids for an event's span: its trace (the task's, or its own) and its own span id.
fn event_ids(hash: &str, task: Option<&str>) -> (TraceId, SpanId, SpanId) {
    let d = digest(hash);
    let mut span = [0u8; 8];
    span.copy_from_slice(&d[..8]);
    match task {
        Some(task) => {
            let (trace, parent) = task_ids(task);
            (trace, SpanId::from_bytes(span), parent)
        }
        None => {
            let mut trace = [0u8; 16];
            trace.copy_from_slice(&d[8..24]);
            (
                TraceId::from_bytes(trace),
                SpanId::from_bytes(span),
                SpanId::INVALID,
            )
        }
    }
}

/// A task at its end, for its `invoke_agent` span.
#[derive(Debug, Clone)]
pub struct TaskEnd {
    /// Its id.
    pub task: String,
    /// Its agent.
    pub agent: String,
    /// `succeeded`, `dead` or `cancelled`.
    pub state: String,
    /// Created, Unix ms.
    pub created_ms: i64,
    /// Ended, Unix ms.
    pub ended_ms: i64,
    /// Steps it took.
    pub steps: u64,
    /// Claims it had.
    pub attempts: u64,
    /// The confidence reported, if any.
    pub confidence: Option<f64>,
}

impl Traces {
    /// Spans for an exporter to `settings.otlp_endpoint`, or `None` when traces are off.
    pub fn new(settings: &TelemetrySettings) -> Result<Option<(Self, Export)>, String> {
        let Some(endpoint) = &settings.otlp_endpoint else {
            return Ok(None);
        };
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("cannot build the OTLP client: {e}"))?;
        let protocol = match settings.otlp_protocol {
            OtlpProtocol::HttpProtobuf => Protocol::HttpBinary,
            OtlpProtocol::HttpJson => Protocol::HttpJson,
        };
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(Client(client))
            .with_protocol(protocol)
            .with_endpoint(format!("{endpoint}/v1/traces"))
            .with_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("cannot build the OTLP exporter: {e}"))?;
        exporter.set_resource(
            &Resource::builder()
                .with_service_name(settings.service_name.clone())
                .build(),
        );
        let traces = Self {
            scope: InstrumentationScope::builder("keel")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
            batch: Vec::new(),
            breakers: HashMap::new(),
        };
        Ok(Some((traces, Export { exporter })))
    }

    fn span(
        &mut self,
        ids: (TraceId, SpanId, SpanId),
        kind: SpanKind,
        name: String,
        (start_ms, end_ms): (i64, i64),
        attributes: Vec<KeyValue>,
        status: Status,
    ) {
        let (trace, span, parent) = ids;
        self.batch.push(SpanData {
            span_context: SpanContext::new(
                trace,
                span,
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: parent,
            parent_span_is_remote: false,
            span_kind: kind,
            name: Cow::Owned(name),
            start_time: time(start_ms),
            end_time: time(end_ms.max(start_ms)),
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: self.scope.clone(),
        });
    }

    /// A breaker changed state.
    pub fn breaker(&mut self, target: &str, to: &str) {
        self.breakers.insert(target.to_owned(), to.to_owned());
    }

    /// A `chat {model}` span for a model call.
    pub fn call(&mut self, c: &Call) {
        let (provider, model) = c.target.split_once('/').unwrap_or((c.target.as_str(), ""));
        let mut attributes = vec![
            KeyValue::new("gen_ai.operation.name", "chat"),
            KeyValue::new("gen_ai.system", "openai"),
            KeyValue::new("gen_ai.request.model", c.route.clone()),
            KeyValue::new(
                "gen_ai.response.model",
                c.response_model.clone().unwrap_or_else(|| model.to_owned()),
            ),
            KeyValue::new("keel.route", c.route.clone()),
            KeyValue::new("keel.target", c.target.clone()),
            KeyValue::new("keel.provider", provider.to_owned()),
            KeyValue::new("keel.agent", c.agent.clone()),
            KeyValue::new("keel.outcome", c.outcome.clone()),
            KeyValue::new(
                "keel.attempts",
                i64::try_from(c.attempts).unwrap_or(i64::MAX),
            ),
            KeyValue::new("keel.fallback", c.fallback),
            KeyValue::new("keel.stream", c.stream),
            KeyValue::new(
                "keel.breaker.state",
                self.breakers
                    .get(&c.target)
                    .cloned()
                    .unwrap_or_else(|| "closed".to_owned()),
            ),
        ];
        if let Some(n) = c.input_tokens {
            attributes.push(KeyValue::new(
                "gen_ai.usage.input_tokens",
                i64::try_from(n).unwrap_or(i64::MAX),
            ));
        }
        if let Some(n) = c.output_tokens {
            attributes.push(KeyValue::new(
                "gen_ai.usage.output_tokens",
                i64::try_from(n).unwrap_or(i64::MAX),
            ));
        }
        if !c.finish_reasons.is_empty() {
            let reasons: Vec<StringValue> = c
                .finish_reasons
                .iter()
                .cloned()
                .map(StringValue::from)
                .collect();
            attributes.push(KeyValue::new(
                "gen_ai.response.finish_reasons",
                Value::Array(reasons.into()),
            ));
        }
        if let Some(task) = &c.task {
            attributes.push(KeyValue::new("keel.task.id", task.clone()));
        }
        let status = if c.ok {
            Status::Ok
        } else {
            Status::error(format!("call ended {}", c.outcome))
        };
        let start = c.at_ms - i64::try_from(c.latency_ms).unwrap_or(0);
        self.span(
            event_ids(&c.hash, c.task.as_deref()),
            SpanKind::Client,
            format!("chat {}", c.route),
            (start, c.at_ms),
            attributes,
            status,
        );
    }

    /// An `execute_tool {name}` span for a tool call (or a guard's refusal).
    pub fn tool(&mut self, t: &ToolCall) {
        let blocked = t.outcome == "blocked";
        let mut attributes = vec![
            KeyValue::new("gen_ai.operation.name", "execute_tool"),
            KeyValue::new("gen_ai.tool.name", t.tool.clone()),
            KeyValue::new("keel.agent", t.agent.clone()),
            KeyValue::new("keel.outcome", t.outcome.clone()),
            KeyValue::new(
                "keel.attempts",
                i64::try_from(t.attempts).unwrap_or(i64::MAX),
            ),
            KeyValue::new(
                "keel.guardrail.verdict",
                if blocked { "block" } else { "allow" },
            ),
        ];
        if blocked {
            let rules: Vec<StringValue> = t.rules.iter().cloned().map(StringValue::from).collect();
            attributes.push(KeyValue::new(
                "keel.guardrail.rules",
                Value::Array(rules.into()),
            ));
        }
        if let Some(task) = &t.task {
            attributes.push(KeyValue::new("keel.task.id", task.clone()));
        }
        let status = match t.outcome.as_str() {
            "ok" => Status::Ok,
            "blocked" => Status::error(format!("blocked by {}", t.rules.join(", "))),
            other => Status::error(format!("tool call ended {other}")),
        };
        let start = t.at_ms - i64::try_from(t.latency_ms).unwrap_or(0);
        self.span(
            event_ids(&t.hash, t.task.as_deref()),
            SpanKind::Client,
            format!("execute_tool {}", t.tool),
            (start, t.at_ms),
            attributes,
            status,
        );
    }

    /// The `invoke_agent {agent}` span of a task that ended.
    pub fn task(&mut self, t: &TaskEnd) {
        let (trace, span) = task_ids(&t.task);
        let mut attributes = vec![
            KeyValue::new("gen_ai.operation.name", "invoke_agent"),
            KeyValue::new("gen_ai.agent.name", t.agent.clone()),
            KeyValue::new("keel.task.id", t.task.clone()),
            KeyValue::new("keel.task.state", t.state.clone()),
            KeyValue::new(
                "keel.task.steps",
                i64::try_from(t.steps).unwrap_or(i64::MAX),
            ),
            KeyValue::new(
                "keel.task.attempts",
                i64::try_from(t.attempts).unwrap_or(i64::MAX),
            ),
        ];
        if let Some(c) = t.confidence {
            attributes.push(KeyValue::new("keel.task.confidence", c));
        }
        let status = match t.state.as_str() {
            "succeeded" => Status::Ok,
            other => Status::error(format!("task ended {other}")),
        };
        self.span(
            (trace, span, SpanId::INVALID),
            SpanKind::Internal,
            format!("invoke_agent {}", t.agent),
            (t.created_ms, t.ended_ms),
            attributes,
            status,
        );
    }

    /// Spans waiting for export.
    pub fn pending(&self) -> usize {
        self.batch.len()
    }

    /// The spans waiting, in batches of at most [`BATCH`].
    pub fn drain(&mut self) -> Vec<Vec<SpanData>> {
        let mut batches = Vec::new();
        while !self.batch.is_empty() {
            let take = self.batch.len().min(BATCH);
            batches.push(self.batch.drain(..take).collect());
        }
        batches
    }
}
