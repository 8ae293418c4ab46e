//! `POST /v1/tools/{name}/invoke` and `POST /v1/actions/check`.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use keel_config::InjectionAction;
use keel_core::{EventKind, NewEvent};
use keel_policy::breaker::Outcome;
use keel_store::EventQuery;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::{Action, Tool, Verdict};
use crate::Gateway;
use crate::error::ApiError;
use crate::metrics::GuardrailLabels;

/// The tool gateway's routes.
pub(crate) fn routes() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/v1/tools/{name}/invoke", post(invoke))
        .route("/v1/actions/check", post(check))
}

type Gw = State<Arc<Gateway>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InvokeBody {
    #[serde(default)]
    task: Option<String>,
    args: Value,
    #[serde(default)]
    idempotency_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckBody {
    agent: String,
    #[serde(default)]
    task: Option<String>,
    tool: String,
    args: Value,
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

impl Gateway {
    fn tool(&self, name: &str) -> Result<&Tool, ApiError> {
        self.tools.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.tools.names().collect();
            ApiError::not_found(
                format!(
                    "no tool {name:?} (tools: {})",
                    if known.is_empty() {
                        "none configured".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
                "tool_not_found",
            )
        })
    }

    /// This tool's `tool_invoked` events in the task so far (0 without a task).
    async fn calls_in_task(&self, tool: &str, task: Option<&str>) -> Result<u64, ApiError> {
        let Some(task) = task else { return Ok(0) };
        let events = self
            .store
            .events(EventQuery {
                task_id: Some(task.to_owned()),
                kind: Some(EventKind::ToolInvoked.as_str().to_owned()),
                ..EventQuery::default()
            })
            .await
            .map_err(|e| ApiError::unavailable(format!("cannot read the task's log: {e}")))?;
        Ok(events.iter().filter(|e| e.data["tool"] == tool).count() as u64)
    }

    /// Runs the rules; a block is recorded (event and metric) before it is returned.
    async fn verdict(
        &self,
        tool: &Tool,
        agent: &str,
        task: Option<&str>,
        args: &Value,
        checked: bool,
    ) -> Result<Verdict, ApiError> {
        if !args.is_object() {
            return Err(ApiError::bad_request("args must be a JSON object").with_param("args"));
        }
        let calls_in_task = if tool.needs_history() {
            self.calls_in_task(&tool.settings.name, task).await?
        } else {
            0
        };
        let action = Action {
            agent,
            task,
            args,
            calls_in_task,
        };
        let verdict = tool.check(&action);
        let mut events = Vec::new();
        let reasons: Vec<&str> = match &verdict {
            Verdict::Allow => Vec::new(),
            Verdict::Block(broken) => broken.iter().map(|b| b.reason.as_str()).collect(),
        };
        if checked {
            events.push(NewEvent::new(
                EventKind::ActionChecked,
                task.map(str::to_owned),
                json!({
                    "tool": tool.settings.name,
                    "agent": agent,
                    "args": tool.redact(args),
                    "verdict": if reasons.is_empty() { "allow" } else { "block" },
                    "reasons": reasons,
                }),
            ));
        }
        if let Verdict::Block(broken) = &verdict {
            for b in broken {
                self.metrics
                    .guardrail_blocks
                    .get_or_create(&GuardrailLabels {
                        tool: tool.settings.name.clone(),
                        rule: b.rule.clone(),
                    })
                    .inc();
            }
            events.push(NewEvent::new(
                EventKind::ActionBlocked,
                task.map(str::to_owned),
                json!({
                    "tool": tool.settings.name,
                    "agent": agent,
                    "args": tool.redact(args),
                    "rules": broken.iter().map(|b| b.rule.as_str()).collect::<Vec<_>>(),
                    "reasons": reasons,
                }),
            ));
        }
        if !events.is_empty() {
            self.store
                .append(events)
                .await
                .map_err(|e| ApiError::unavailable(format!("cannot record the verdict: {e}")))?;
        }
        Ok(verdict)
    }
}

async fn check(State(gw): Gw, headers: HeaderMap, body: Bytes) -> Response {
    let result = async {
        // The caller must be allowed to act for the agent it names.
        let b: CheckBody = parse(&body)?;
        let agent = gw
            .agents
            .identify(header(&headers, "authorization"), Some(b.agent.as_str()))?;
        let tool = gw.tool(&b.tool)?;
        let verdict = gw
            .verdict(tool, &agent, b.task.as_deref(), &b.args, true)
            .await?;
        Ok::<_, ApiError>(match verdict {
            Verdict::Allow => json!({"verdict": "allow", "reasons": []}),
            Verdict::Block(broken) => json!({
                "verdict": "block",
                "reasons": broken.iter().map(|b| b.reason.as_str()).collect::<Vec<_>>(),
            }),
        })
    }
    .await;
    match result {
        Ok(answer) => axum::Json(answer).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn invoke(
    State(gw): Gw,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match invoke_inner(&gw, &name, &headers, &body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn invoke_inner(
    gw: &Gateway,
    name: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let agent = gw.agents.identify(
        header(headers, "authorization"),
        header(headers, "x-keel-agent"),
    )?;
    let b: InvokeBody = parse(body)?;
    let task = b
        .task
        .or_else(|| header(headers, "x-keel-task").map(str::to_owned));
    let key = b
        .idempotency_key
        .or_else(|| header(headers, "idempotency-key").map(str::to_owned));
    let tool = gw.tool(name)?;
    if let Verdict::Block(broken) = gw
        .verdict(tool, &agent, task.as_deref(), &b.args, false)
        .await?
    {
        let reason = broken
            .iter()
            .map(|b| b.reason.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        let answer = json!({
            "blocked": reason,
            "rules": broken.iter().map(|b| b.rule.as_str()).collect::<Vec<_>>(),
        });
        return Ok((StatusCode::FORBIDDEN, axum::Json(answer)).into_response());
    }
    let called = call(gw, tool, &b.args, key.as_deref(), task.as_deref(), &agent).await;
    let (attempts, mut outcome) = called;
    // Screen what the tool returns before it enters the task.
    let action = tool.settings.injection;
    let finding = match (&outcome, action) {
        (Ok(result), InjectionAction::Flag | InjectionAction::Strip | InjectionAction::Block) => {
            super::injection_in(result)
        }
        _ => None,
    };
    let screened = finding.as_ref().map(|f| {
        json!({
            "score": f.score,
            "matched": f.matched,
            "action": match action {
                InjectionAction::Strip => "strip",
                InjectionAction::Block => "block",
                InjectionAction::Flag | InjectionAction::Off => "flag",
            },
        })
    });
    if finding.is_some() {
        match action {
            InjectionAction::Strip => {
                if let Ok(result) = &outcome {
                    outcome = Ok(super::strip_injection(result));
                }
            }
            InjectionAction::Block => {
                gw.metrics
                    .guardrail_blocks
                    .get_or_create(&GuardrailLabels {
                        tool: name.to_owned(),
                        rule: "injection".to_owned(),
                    })
                    .inc();
            }
            InjectionAction::Flag | InjectionAction::Off => {}
        }
    }
    let mut data = json!({
        "tool": name,
        "agent": agent,
        "args": tool.redact(&b.args),
        "attempts": attempts,
        "side_effects": tool.settings.side_effects,
        "idempotency_key": key.is_some(),
        "latency_ms": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    });
    match &outcome {
        Ok(result) => {
            data["outcome"] = json!("ok");
            data["result"] = tool.redact(result);
        }
        Err(e) => {
            data["outcome"] = json!("error");
            data["error"] = json!(e.message);
        }
    }
    if let Some(screened) = &screened {
        data["injection"] = screened.clone();
    }
    let blocked = finding
        .as_ref()
        .filter(|_| action == InjectionAction::Block);
    let mut events = vec![NewEvent::new(EventKind::ToolInvoked, task.clone(), data)];
    if let Some(f) = blocked {
        events.push(NewEvent::new(
            EventKind::ActionBlocked,
            task,
            json!({"tool": name, "agent": agent, "rules": ["injection"], "reasons": [injection_reason(f)], "stage": "result"}),
        ));
    }
    gw.store
        .append(events)
        .await
        .map_err(|e| ApiError::unavailable(format!("cannot record the tool call: {e}")))?;
    if let Some(f) = blocked {
        let answer = json!({"blocked": injection_reason(f), "rules": ["injection"]});
        return Ok((StatusCode::FORBIDDEN, axum::Json(answer)).into_response());
    }
    match outcome {
        Ok(result) => {
            let mut answer = json!({"result": result});
            if let Some(screened) = screened {
                answer["injection"] = screened;
            }
            Ok(axum::Json(answer).into_response())
        }
        Err(e) => Err(e),
    }
}

/// The reason given for a result withheld as a prompt injection.
fn injection_reason(f: &crate::guard::injection::Finding) -> String {
    format!(
        "the tool's result looks like a prompt injection (score {:.2}: {}); keel withheld it",
        f.score,
        f.matched.join(", ")
    )
}

/// Why one attempt failed, and whether another may help.
struct Failed {
    error: ApiError,
    retryable: bool,
}

/// Calls the tool under its timeout, breaker and retry; returns the attempts made
/// and the result (the tool's JSON answer, or its text as a string).
async fn call(
    gw: &Gateway,
    tool: &Tool,
    args: &Value,
    key: Option<&str>,
    task: Option<&str>,
    agent: &str,
) -> (u32, Result<Value, ApiError>) {
    let name = &tool.settings.name;
    let max = tool.attempts(key.is_some());
    let deadline = Instant::now() + tool.settings.timeout;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let permit = match tool.breaker.lock().try_acquire(gw.clock.now()) {
            Ok(permit) => permit,
            Err(rejected) => {
                let error = ApiError::unavailable(format!(
                    "tool {name:?} is unavailable: its circuit breaker is open (retry in {}s)",
                    rejected.retry_in.as_secs().max(1)
                ))
                .with_code("tool_unavailable");
                return (attempts, Err(error));
            }
        };
        let began = gw.clock.now();
        let mut request = tool
            .client
            .post(tool.url.clone())
            .json(&json!({"args": args, "task": task, "agent": agent}));
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        let attempt = tokio::time::timeout_at(deadline, async {
            let response = request.send().await.map_err(|e| Failed {
                error: ApiError::bad_gateway(format!(
                    "tool {name:?} cannot be reached: {}",
                    e.without_url()
                ))
                .with_code("tool_unreachable"),
                retryable: true,
            })?;
            answer(name, response).await
        })
        .await
        .unwrap_or_else(|_| {
            Err(Failed {
                error: ApiError::timeout(format!(
                    "tool {name:?} did not answer within its timeout ({}s)",
                    tool.settings.timeout.as_secs_f64()
                ))
                .with_code("tool_timeout"),
                retryable: false,
            })
        });
        {
            let mut breaker = tool.breaker.lock();
            let took = gw.clock.now().saturating_sub(began);
            breaker.record(
                permit,
                gw.clock.now(),
                Outcome {
                    success: attempt.is_ok() || attempt.as_ref().is_err_and(|f| !f.retryable),
                    duration: took,
                },
            );
            let _ = breaker.take_transitions();
        }
        match attempt {
            Ok(result) => return (attempts, Ok(result)),
            Err(failed) if !failed.retryable || attempts >= max => {
                return (attempts, Err(failed.error));
            }
            Err(_) => {
                let wait = tool.backoff(attempts);
                if Instant::now() + wait >= deadline {
                    let error = ApiError::timeout(format!(
                        "tool {name:?} kept failing and its timeout ({}s) leaves no room for another try",
                        tool.settings.timeout.as_secs_f64()
                    ))
                    .with_code("tool_timeout");
                    return (attempts, Err(error));
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// A tool's HTTP answer as a result or a classified failure.
async fn answer(name: &str, response: reqwest::Response) -> Result<Value, Failed> {
    let status = response.status();
    if status.is_redirection() {
        return Err(Failed {
            error: ApiError::bad_gateway(format!(
                "tool {name:?} answered a redirect ({status}); keel calls only the configured URL and follows no redirect"
            ))
            .with_code("tool_redirect_refused"),
            retryable: false,
        });
    }
    let text = response.text().await.map_err(|e| Failed {
        error: ApiError::bad_gateway(format!(
            "tool {name:?} broke off its answer: {}",
            e.without_url()
        ))
        .with_code("tool_unreachable"),
        retryable: true,
    })?;
    if !status.is_success() {
        let retryable = status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS;
        return Err(Failed {
            error: ApiError::bad_gateway(format!(
                "tool {name:?} answered {status}: {}",
                text.trim()
            ))
            .with_code("tool_error"),
            retryable,
        });
    }
    Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
}
