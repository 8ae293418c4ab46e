//! `POST /v1/tools/{name}/invoke` and `POST /v1/actions/check`.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use keel_config::{InjectionAction, ProfileAction};
use keel_core::{EventKind, NewEvent};
use keel_policy::breaker::Outcome;
use keel_store::Event;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::profile::{self, Outlier};
use super::{Action, Broken, Runner, Tool, Verdict, wasm};
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

    /// This tool's calls in the task so far: `tool_invoked` events, allowed
    /// `action_checked` events (agents that run the tool themselves), and calls still
    /// running through keel.
    fn calls_in_task(&self, log: &[Event], tool: &str, task: &str) -> u64 {
        let counted = [
            EventKind::ToolInvoked.as_str(),
            EventKind::ActionChecked.as_str(),
        ];
        let count = log
            .iter()
            .filter(|e| {
                counted.contains(&e.kind.as_str())
                    && e.data["tool"] == tool
                    && e.data["verdict"] != "block"
                    && e.data["verdict"] != "approve"
            })
            .count() as u64;
        count + self.tools.running(task, tool)
    }

    /// Runs the rules, then the histogram guard; a block is recorded (event and metric)
    /// before it is returned, and so is the verdict of a check (`checked`).
    async fn decide(
        &self,
        tool: &Tool,
        agent: &str,
        task: Option<&str>,
        args: &Value,
        checked: bool,
    ) -> Result<Decision, ApiError> {
        if !args.is_object() {
            return Err(ApiError::bad_request("args must be a JSON object").with_param("args"));
        }
        if let Some(task) = task {
            self.check_owner(task, agent).await?;
        }
        // A task's log is read for every call in a task: the loop guard counts repeats.
        let log = match (tool.needs_history(), task) {
            (_, Some(task)) => self
                .task_log(task)
                .await
                .map_err(|e| ApiError::unavailable(format!("cannot read the task's log: {e}")))?,
            (true, None) => {
                return Err(ApiError::bad_request(format!(
                    "the rules of tool {:?} count this task's earlier calls (history): send the task as \"task\" or x-keel-task",
                    tool.settings.name
                ))
                .with_param("task"));
            }
            _ => Vec::new(),
        };
        let calls_in_task = task.map_or(0, |t| self.calls_in_task(&log, &tool.settings.name, t));
        let action = Action {
            agent,
            task,
            args,
            calls_in_task,
        };
        let same_call_limit = self.agents.loop_guard(agent).map(|l| l.same_call);
        let repeats = match (task, same_call_limit) {
            (Some(_), Some(_)) => same_calls(&log, tool, args),
            _ => 0,
        };
        let looping = same_call_limit.is_some_and(|limit| repeats >= limit);
        let decision = match tool.check(&action) {
            _ if looping => Decision::Block(vec![Broken {
                rule: "loop:same_call".to_owned(),
                reason: format!(
                    "the same call of tool {:?} (same args) was already made {repeats} times in this task: keel stops it as a loop and hands the task to a person",
                    tool.settings.name
                ),
            }]),
            Verdict::Block(broken) => Decision::Block(broken),
            Verdict::Allow => {
                let outliers = self.outliers(tool, agent, args).await?;
                let block = tool
                    .settings
                    .profile
                    .as_ref()
                    .is_some_and(|p| p.action == ProfileAction::Block);
                if outliers.is_empty() {
                    Decision::Allow { approval: None }
                } else if block {
                    Decision::Block(
                        outliers
                            .iter()
                            .map(|o| Broken {
                                rule: format!("profile:{}", o.arg),
                                reason: o.reason(agent, tool),
                            })
                            .collect(),
                    )
                } else {
                    let action = profile::action_id(&tool.settings.name, args);
                    match profile::unused_approval(&log, &action) {
                        Some(id) => Decision::Allow { approval: Some(id) },
                        None => Decision::Approve(outliers),
                    }
                }
            }
        };
        let mut events = Vec::new();
        let reasons = decision.reasons(agent, tool);
        if checked {
            let mut data = json!({
                "tool": tool.settings.name,
                "agent": agent,
                "args": tool.redact(args),
                "verdict": decision.verdict(),
                "reasons": reasons,
            });
            if let Decision::Allow { approval: Some(id) } = &decision {
                data["approval"] = json!(id);
            }
            events.push(NewEvent::new(
                EventKind::ActionChecked,
                task.map(str::to_owned),
                data,
            ));
        }
        if let Decision::Block(broken) = &decision {
            for b in broken {
                self.metrics
                    .guardrail_blocks
                    .get_or_create(&GuardrailLabels {
                        tool: tool.settings.name.clone().into(),
                        rule: b.rule.clone().into(),
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
        if let (true, Some(task)) = (looping, task) {
            let data = json!({"kind": "same_tool_call", "agent": agent, "tool": tool.settings.name, "repeats": repeats, "task": task});
            self.count_loop(&data);
            events.push(NewEvent::new(
                EventKind::LoopDetected,
                Some(task.to_owned()),
                data,
            ));
        }
        if !events.is_empty() {
            self.store
                .append(events)
                .await
                .map_err(|e| ApiError::unavailable(format!("cannot record the verdict: {e}")))?;
        }
        if let (true, Some(task)) = (looping, task) {
            self.hand_off_looping_tool_calls(task, agent, &tool.settings.name, repeats)
                .await;
        }
        Ok(decision)
    }

    /// Hands a task that repeats one tool call to a person (once: a task already waiting
    /// is left as it is), and stops its model calls meanwhile; a task no person can decide
    /// on (a label, no approval queue) is paused for the loop guard's minute instead.
    async fn hand_off_looping_tool_calls(&self, task: &str, agent: &str, tool: &str, repeats: u64) {
        let reason = format!(
            "keel detected a loop in task {task:?}: the same call of tool {tool:?} was made {repeats} times"
        );
        let context = json!({"kind": "loop", "loop": "same_tool_call", "agent": agent, "tool": tool, "repeats": repeats});
        let release = self.hand_off(task, reason.clone(), context).await;
        // Its model calls are refused too, as for a loop in its answers.
        self.loops
            .stop(task, crate::guard::loops::Stopped { reason, release });
    }

    /// Sends an outlier call to the approval queue; the task waits there. A call without
    /// a task, or a keel without a queue, cannot wait: it is blocked, saying why.
    async fn hold_for_approval(
        &self,
        tool: &Tool,
        agent: &str,
        task: Option<&str>,
        args: &Value,
        outliers: &[Outlier],
    ) -> Result<Result<String, String>, ApiError> {
        let reasons: Vec<String> = outliers.iter().map(|o| o.reason(agent, tool)).collect();
        let why = reasons.join("; ");
        let (Some(task), Some(queue)) = (task, self.approvals.as_ref()) else {
            let missing = if task.is_none() {
                "approvals wait with a task: send the call's task as \"task\" or x-keel-task"
            } else {
                "this keel has no approval queue"
            };
            let reason = format!("{why}; it needs a person's approval, and {missing}");
            let rules: Vec<String> = outliers
                .iter()
                .map(|o| format!("profile:{}", o.arg))
                .collect();
            for rule in &rules {
                self.metrics
                    .guardrail_blocks
                    .get_or_create(&GuardrailLabels {
                        tool: tool.settings.name.clone().into(),
                        rule: rule.clone().into(),
                    })
                    .inc();
            }
            self.append(vec![NewEvent::new(
                EventKind::ActionBlocked,
                task.map(str::to_owned),
                json!({"tool": tool.settings.name, "agent": agent, "args": tool.redact(args), "rules": rules, "reasons": [reason]}),
            )])
            .await;
            return Ok(Err(reason));
        };
        let context = json!({
            "kind": "tool_call",
            "tool": tool.settings.name,
            "agent": agent,
            "args": tool.redact(args),
            "action": profile::action_id(&tool.settings.name, args),
            "outliers": outliers.iter().map(Outlier::to_json).collect::<Vec<_>>(),
        });
        let timeout = tool
            .settings
            .profile
            .as_ref()
            .map_or(keel_config::DEFAULT_APPROVAL_TIMEOUT, |p| p.timeout);
        let id = queue.request(task, why, context, timeout).await?;
        Ok(Ok(id))
    }
}

/// Calls of `tool` with these same `args` already in the task's log (compared as logged,
/// redacted args included), since a person last let the task go on: after a hand-off is
/// approved, the count starts again.
fn same_calls(log: &[Event], tool: &Tool, args: &Value) -> u64 {
    let action = profile::action_id(&tool.settings.name, &tool.redact(args));
    let since = log
        .iter()
        .rposition(|e| {
            e.kind == EventKind::ApprovalDecided.as_str() && e.data["decision"] == "approve"
        })
        .map_or(0, |i| i + 1);
    log[since..]
        .iter()
        .filter(|e| {
            (e.kind == EventKind::ToolInvoked.as_str()
                || (e.kind == EventKind::ActionChecked.as_str() && e.data["verdict"] == "allow"))
                && e.data["tool"] == tool.settings.name.as_str()
                && profile::action_id(&tool.settings.name, &e.data["args"]) == action
        })
        .count() as u64
}

/// What keel decided about one action.
#[derive(Debug)]
enum Decision {
    /// Go ahead; `approval` is the person's approval this call uses, if it needed one.
    Allow { approval: Option<String> },
    /// Refused: rules that do not hold, or (`action = "block"`) outliers.
    Block(Vec<Broken>),
    /// Outliers that need a person's approval.
    Approve(Vec<Outlier>),
}

impl Decision {
    fn verdict(&self) -> &'static str {
        match self {
            Self::Allow { .. } => "allow",
            Self::Block(_) => "block",
            Self::Approve(_) => "approve",
        }
    }

    fn reasons(&self, agent: &str, tool: &Tool) -> Vec<String> {
        match self {
            Self::Allow { .. } => Vec::new(),
            Self::Block(broken) => broken.iter().map(|b| b.reason.clone()).collect(),
            Self::Approve(outliers) => outliers.iter().map(|o| o.reason(agent, tool)).collect(),
        }
    }
}

/// `POST /v1/actions/check`. A check repeated with its `Idempotency-Key` gets the first
/// verdict, recorded per agent and key, and is not checked (nor counted by the loop guard)
/// again; the same key with another tool, task or args is a 422.
async fn check(State(gw): Gw, headers: HeaderMap, body: Bytes) -> Response {
    let result = async {
        // The caller must be allowed to act for the agent it names.
        let b: CheckBody = parse(&body)?;
        let agent = gw
            .agents
            .identify(header(&headers, "authorization"), Some(b.agent.as_str()))?;
        if agent != b.agent {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "permission_error",
                format!("this key belongs to agent {agent:?}, not {:?}", b.agent),
            )
            .with_param("agent"));
        }
        let tool = gw.tool(&b.tool)?;
        let record = header(&headers, "idempotency-key")
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(|k| format!("idem/check/{agent}/{k}"));
        let check_key = check_id(&b);
        let differs = "another tool, task or args";
        if let Some(record) = &record
            && let Some(first) = replayed(&gw, record, &check_key, differs).await?
        {
            return Ok(first);
        }
        let answer = check_answer(&gw, tool, &agent, &b).await?;
        if let Some(record) = &record {
            let saved = json!({"action": check_key, "answer": answer});
            // A concurrent check with the same key may have saved first: its verdict stands.
            if let Err(e) = gw
                .store
                .save_state(record, saved.to_string().into_bytes(), None)
                .await
            {
                tracing::warn!(tool = %b.tool, error = %e, "cannot record the keyed check's verdict");
            }
        }
        Ok(axum::Json(answer).into_response())
    }
    .await;
    match result {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

/// What a repeated check must match: its tool, task and args (the agent is in the record's key).
fn check_id(b: &CheckBody) -> String {
    keel_store::blob_hash(
        keel_store::chain::into_canonical_json(
            json!({"tool": b.tool, "task": b.task, "args": b.args}),
        )
        .as_bytes(),
    )
}

/// Checks the action of `b` and answers with the verdict, holding the task for a person
/// when the verdict is `approve`.
async fn check_answer(
    gw: &Gateway,
    tool: &Tool,
    agent: &str,
    b: &CheckBody,
) -> Result<Value, ApiError> {
    let task = b.task.as_deref();
    let decision = gw.decide(tool, agent, task, &b.args, true).await?;
    let reasons = decision.reasons(agent, tool);
    Ok(match decision {
        Decision::Allow { approval } => {
            let mut answer = json!({"verdict": "allow", "reasons": []});
            if let Some(id) = approval {
                answer["approval"] = json!(id);
            }
            answer
        }
        Decision::Block(_) => json!({"verdict": "block", "reasons": reasons}),
        // An agent that runs its tools itself still waits for the person: the task
        // goes to the approval queue, as it would had keel run the tool.
        Decision::Approve(outliers) => {
            match gw
                .hold_for_approval(tool, agent, task, &b.args, &outliers)
                .await?
            {
                Ok(id) => {
                    json!({"verdict": "approve", "reasons": reasons, "pending_approval": id})
                }
                Err(why) => json!({"verdict": "approve", "reasons": [why]}),
            }
        }
    })
}

async fn invoke(
    State(gw): Gw,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // Run to completion even if the client leaves: the tool may act, and its breaker
    // permit and `tool_invoked` must be settled either way.
    let tasks = gw.tasks.clone();
    let run = tasks.spawn(async move {
        match invoke_inner(&gw, &name, &headers, &body).await {
            Ok(response) => response,
            Err(e) => e.into_response(),
        }
    });
    match run.await {
        Ok(response) => response,
        Err(e) => {
            ApiError::internal(format!("the tool call failed inside keel: {e}")).into_response()
        }
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
        crate::http::header_text(headers, "x-keel-agent")?,
    )?;
    let b: InvokeBody = parse(body)?;
    let task = match b.task {
        Some(task) => Some(crate::http::task_label(
            task,
            "the body's task",
            "invalid_value",
        )?),
        None => crate::http::task_header(headers)?,
    };
    let key = b
        .idempotency_key
        .or_else(|| header(headers, "idempotency-key").map(str::to_owned));
    let tool = gw.tool(name)?;
    // A call repeated with its Idempotency-Key gets the first answer; the tool is not
    // called again. A tool that redacts keeps no record: its answer would hold what the
    // log must not (the tool itself still gets the key, to deduplicate).
    let record = key
        .as_deref()
        .filter(|_| tool.settings.redact.is_empty())
        .map(|k| format!("idem/tool/{name}/{agent}/{k}"));
    let action_key = profile::action_id(name, &b.args);
    if let Some(record) = &record
        && let Some(first) = replayed(gw, record, &action_key, "other args").await?
    {
        return Ok(first);
    }
    let approval = match gw
        .decide(tool, &agent, task.as_deref(), &b.args, false)
        .await?
    {
        Decision::Allow { approval } => approval,
        Decision::Block(broken) => {
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
        Decision::Approve(outliers) => {
            let held = gw
                .hold_for_approval(tool, &agent, task.as_deref(), &b.args, &outliers)
                .await?;
            return Ok(match held {
                Ok(id) => {
                    let reasons: Vec<String> =
                        outliers.iter().map(|o| o.reason(&agent, tool)).collect();
                    let answer = json!({"pending_approval": id, "reasons": reasons});
                    (StatusCode::ACCEPTED, axum::Json(answer)).into_response()
                }
                Err(why) => {
                    let rules: Vec<String> = outliers
                        .iter()
                        .map(|o| format!("profile:{}", o.arg))
                        .collect();
                    let answer = json!({"blocked": why, "rules": rules});
                    (StatusCode::FORBIDDEN, axum::Json(answer)).into_response()
                }
            });
        }
    };
    let running = task.as_deref().map(|t| gw.tools.start(t, name));
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
                        tool: name.into(),
                        rule: "injection".into(),
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
    if let Some(id) = &approval {
        data["approval"] = json!(id);
    }
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
    let learn_now = task.is_none() && outcome.is_ok();
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
    drop(running);
    if learn_now {
        gw.learn_call(tool, &agent, &b.args).await;
    }
    if let Some(f) = blocked {
        // The tool has run: say so, so that an agent does not call it again.
        let answer =
            json!({"blocked": injection_reason(f), "rules": ["injection"], "executed": true});
        return Ok((StatusCode::FORBIDDEN, axum::Json(answer)).into_response());
    }
    match outcome {
        Ok(result) => {
            let mut answer = json!({"result": result});
            if let Some(screened) = screened {
                answer["injection"] = screened;
            }
            if let Some(record) = &record {
                let saved = json!({"action": action_key, "answer": answer});
                // A concurrent call with the same key may have saved first: its answer stands.
                if let Err(e) = gw
                    .store
                    .save_state(record, saved.to_string().into_bytes(), None)
                    .await
                {
                    tracing::warn!(tool = %name, error = %e, "cannot record the keyed call's answer");
                }
            }
            Ok(axum::Json(answer).into_response())
        }
        Err(e) => Err(e),
    }
}

/// The first answer to a call with this idempotency record, marked `idempotent-replayed`;
/// a 422 when the key was first used for another `action` (`other`: what differs, in words).
async fn replayed(
    gw: &Gateway,
    record: &str,
    action: &str,
    other: &str,
) -> Result<Option<Response>, ApiError> {
    let Some(saved) =
        gw.store.load_state(record).await.map_err(|e| {
            ApiError::unavailable(format!("cannot read the idempotency record: {e}"))
        })?
    else {
        return Ok(None);
    };
    let saved: Value = serde_json::from_slice(&saved.value)
        .map_err(|e| ApiError::internal(format!("unreadable idempotency record: {e}")))?;
    if saved["action"] != action {
        return Err(ApiError::unprocessable(format!(
            "this Idempotency-Key was first used with {other}; use a new key for another call"
        ))
        .with_param("idempotency_key")
        .with_code("idempotency_key_reused"));
    }
    let mut response = axum::Json(saved["answer"].clone()).into_response();
    response.headers_mut().insert(
        "idempotent-replayed",
        axum::http::HeaderValue::from_static("true"),
    );
    Ok(Some(response))
}

/// The reason given for a result withheld as a prompt injection.
fn injection_reason(f: &crate::guard::injection::Finding) -> String {
    format!(
        "the tool's result looks like a prompt injection (score {:.2}: {}); keel withheld it",
        f.score,
        f.matched.join(", ")
    )
}

/// Why one attempt failed, whether another may help, and whether it counts against
/// the tool's breaker.
struct Failed {
    error: ApiError,
    retryable: bool,
    /// A failure of the tool (timeouts, connection errors, 5xx, 429, redirects), not of
    /// the request (other 4xx).
    tool_fault: bool,
}

/// The most of a tool's answer keel reads.
const MAX_TOOL_ANSWER: usize = 4 * 1024 * 1024;

/// The most of a tool's error text that reaches a message or the log.
const MAX_ERROR_TEXT: usize = 1024;

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
    let mut backoff = tool.backoff();
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
        let attempt = tokio::time::timeout_at(deadline, async {
            match &tool.runner {
                Runner::Http { url, client } => {
                    let mut request = client
                        .post(url.clone())
                        .json(&json!({"args": args, "task": task, "agent": agent}));
                    if let Some(key) = key {
                        request = request.header("idempotency-key", key);
                    }
                    let response = request.send().await.map_err(|e| Failed {
                        error: ApiError::bad_gateway(format!(
                            "tool {name:?} cannot be reached: {}",
                            e.without_url()
                        ))
                        .with_code("tool_unreachable"),
                        retryable: true,
                        tool_fault: true,
                    })?;
                    answer(tool, response).await
                }
                Runner::Wasm(module) => {
                    let input =
                        json!({"args": args, "task": task, "agent": agent, "idempotency_key": key})
                            .to_string()
                            .into_bytes();
                    let module = Arc::clone(module);
                    let left = deadline.saturating_duration_since(Instant::now());
                    let ran = tokio::task::spawn_blocking(move || {
                        module.run(input, left, MAX_TOOL_ANSWER)
                    })
                    .await;
                    wasm_answer(tool, ran)
                }
            }
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
                tool_fault: true,
            })
        });
        let logged = {
            let mut breaker = tool.breaker.lock();
            let took = gw.clock.now().saturating_sub(began);
            let success = match &attempt {
                Ok(_) => true,
                Err(f) => !f.tool_fault,
            };
            breaker.record(
                permit,
                gw.clock.now(),
                Outcome {
                    success,
                    duration: took,
                },
            );
            // The same metrics and events as a model target's, under `tool/NAME` (named
            // only when the breaker changed state: almost never).
            let transitions = breaker.take_transitions();
            if transitions.is_empty() {
                None
            } else {
                gw.transitions.note(
                    &format!("tool/{name}"),
                    transitions,
                    || json!({"tool": name, "node": gw.node}),
                )
            }
        };
        gw.transitions.stored(logged).await;
        match attempt {
            Ok(result) => return (attempts, Ok(result)),
            Err(failed) if !failed.retryable || attempts >= max => {
                return (attempts, Err(failed.error));
            }
            Err(failed) => {
                let wait = backoff.delay(attempts, &mut rand::rng());
                if Instant::now() + wait >= deadline {
                    let error = ApiError::timeout(format!(
                        "tool {name:?} kept failing and its timeout ({}s) leaves no room for another try; last error: {}",
                        tool.settings.timeout.as_secs_f64(),
                        failed.error.message
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
async fn answer(tool: &Tool, mut response: reqwest::Response) -> Result<Value, Failed> {
    let name = &tool.settings.name;
    let status = response.status();
    if status.is_redirection() {
        return Err(Failed {
            error: ApiError::bad_gateway(format!(
                "tool {name:?} answered a redirect ({status}); keel calls only the configured URL and follows no redirect"
            ))
            .with_code("tool_redirect_refused"),
            retryable: false,
            tool_fault: true,
        });
    }
    let mut bytes = Vec::new();
    loop {
        let chunk = response.chunk().await.map_err(|e| Failed {
            error: ApiError::bad_gateway(format!(
                "tool {name:?} broke off its answer: {}",
                e.without_url()
            ))
            .with_code("tool_unreachable"),
            retryable: true,
            tool_fault: true,
        })?;
        let Some(chunk) = chunk else { break };
        if bytes.len() + chunk.len() > MAX_TOOL_ANSWER {
            return Err(Failed {
                error: ApiError::bad_gateway(format!(
                    "tool {name:?} answered more than {MAX_TOOL_ANSWER} bytes"
                ))
                .with_code("tool_error"),
                retryable: false,
                tool_fault: true,
            });
        }
        bytes.extend_from_slice(&chunk);
    }
    let parsed = tool_json(&bytes);
    if !status.is_success() {
        let retryable = status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS;
        // Only a JSON body can be redacted; other text stays out of the message.
        let detail = match &parsed {
            Some(body) => tool
                .redact(body)
                .to_string()
                .chars()
                .take(MAX_ERROR_TEXT)
                .collect::<String>(),
            None => format!("{} bytes of non-JSON text", bytes.len()),
        };
        return Err(Failed {
            error: ApiError::bad_gateway(format!("tool {name:?} answered {status}: {detail}"))
                .with_code("tool_error"),
            retryable,
            tool_fault: retryable,
        });
    }
    Ok(parsed.unwrap_or_else(|| Value::String(String::from_utf8_lossy(&bytes).into_owned())))
}

/// A tool's answer read as JSON, when it is JSON nested no deeper than
/// [`crate::usage::INLINE_DEPTH`] (inside the `tool_invoked` event, and inside a saved
/// idempotent answer, it sits deeper than on its own, and serde_json reads back 127 levels at
/// most); otherwise `None`, and the answer is taken as its text, as one that is not JSON. A
/// key serde_json reserves for itself is renamed, as the log renames it
/// ([`keel_store::chain::for_storage`]), so a saved answer reads back as the one given.
fn tool_json(bytes: &[u8]) -> Option<Value> {
    let value: Value = serde_json::from_slice(bytes).ok()?;
    let limit = crate::usage::INLINE_DEPTH;
    // The text nests at least as deep as the value (a repeated key's earlier value counts);
    // only a text past the limit is printed again to tell.
    let too_deep = keel_core::canonical::nests_deeper_than(bytes, limit)
        && keel_core::canonical::nests_deeper_than(value.to_string().as_bytes(), limit);
    (!too_deep).then(|| keel_store::chain::for_storage(value))
}

/// How a Wasm tool's run ended, as a result or a classified failure (see [`super::wasm`]
/// for what each exit code means).
fn wasm_answer(
    tool: &Tool,
    ran: Result<wasm::Ran, tokio::task::JoinError>,
) -> Result<Value, Failed> {
    let name = &tool.settings.name;
    let failed = |message: String, retryable: bool, tool_fault: bool| Failed {
        error: ApiError::bad_gateway(message).with_code("tool_error"),
        retryable,
        tool_fault,
    };
    let ran = ran.map_err(|e| failed(format!("tool {name:?} did not finish: {e}"), false, true))?;
    match ran {
        wasm::Ran::TimedOut => Err(Failed {
            error: ApiError::timeout(format!(
                "tool {name:?} did not answer within its timeout ({}s); keel stopped the module",
                tool.settings.timeout.as_secs_f64()
            ))
            .with_code("tool_timeout"),
            retryable: false,
            tool_fault: true,
        }),
        wasm::Ran::Trapped { message, stderr } => Err(failed(
            format!("tool {name:?} crashed: {message}{}", said(tool, &stderr)),
            false,
            true,
        )),
        wasm::Ran::Exited {
            stdout_full: true, ..
        } => Err(failed(
            format!("tool {name:?} answered more than {MAX_TOOL_ANSWER} bytes"),
            false,
            true,
        )),
        wasm::Ran::Exited {
            code: 0, stdout, ..
        } => Ok(tool_json(&stdout)
            .unwrap_or_else(|| Value::String(String::from_utf8_lossy(&stdout).into_owned()))),
        wasm::Ran::Exited { code, stderr, .. } => {
            let (why, retryable, tool_fault) = match code {
                wasm::EXIT_TEMPFAIL => ("failed for now", true, true),
                c if wasm::EXIT_BAD_ARGS.contains(&c) => ("refused its args", false, false),
                _ => ("failed", false, true),
            };
            Err(failed(
                format!(
                    "tool {name:?} {why} (exit code {code}){}",
                    said(tool, &stderr)
                ),
                retryable,
                tool_fault,
            ))
        }
    }
}

/// What a Wasm tool wrote to standard error, for an error message: a JSON text
/// redacted like its answer; other text only when the tool redacts nothing.
fn said(tool: &Tool, stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    if text.is_empty() {
        return String::new();
    }
    let shown = match serde_json::from_str::<Value>(text) {
        Ok(body) => tool.redact(&body).to_string(),
        Err(_) if tool.settings.redact.is_empty() => text.to_owned(),
        Err(_) => {
            return format!(
                ": {} bytes on stderr (withheld: the tool redacts)",
                text.len()
            );
        }
    };
    format!(
        ": {}",
        shown.chars().take(MAX_ERROR_TEXT).collect::<String>()
    )
}

#[cfg(test)]
mod tests;
