//! What the observer takes from each committed event: a few fields, read without copying
//! the rest (the tap runs on the appending task, so it stays cheap).

use keel_config::Severity;
use keel_store::Event;
use serde_json::Value;

/// One fact the observer acts on.
#[derive(Debug, Clone, PartialEq)]
pub enum Signal {
    /// A gateway call ended (`llm_call`).
    Call {
        /// The route (what the client sent as `model`).
        route: String,
        /// The calling agent.
        agent: String,
        /// Whether it was answered (`outcome: ok`).
        ok: bool,
        /// Time to the end of the answer.
        latency_ms: u64,
        /// Tokens the provider reported (`usage.total_tokens`).
        tokens: u64,
    },
    /// A circuit breaker changed state.
    Breaker {
        /// `provider/model`, or `tool/NAME`.
        target: String,
        /// `open`, `half_open` or `closed`.
        to: String,
        /// The failure rate that moved it.
        failure_rate: Option<f64>,
    },
    /// A task reached a final state the detector learns from (`task_succeeded`).
    Succeeded {
        /// The task.
        task: String,
    },
    /// A task was cancelled.
    Cancelled {
        /// The task.
        task: String,
    },
    /// A task went to the dead-letter queue.
    Dead {
        /// The task.
        task: String,
        /// Why, as recorded.
        reason: String,
    },
    /// The loop guard stopped a task.
    Loop {
        /// The agent.
        agent: String,
        /// `repeated_output`, `bouncing`, `same_tool_call`, `token_burn`.
        kind: String,
        /// The task.
        task: Option<String>,
    },
    /// Another part of keel raised an alert (a budget warning, an escalated approval).
    Raised {
        /// Its severity.
        severity: Severity,
        /// What it says.
        message: String,
        /// The task it is about, if any.
        task: Option<String>,
        /// What groups it into an incident.
        key: String,
    },
}

/// Marks the `alert_raised` events the observer writes, so that it does not read its
/// own alerts back as new ones.
pub const SOURCE: &str = "observe";

fn str_of(data: &Value, key: &str) -> String {
    data[key].as_str().unwrap_or_default().to_owned()
}

impl Signal {
    /// The signal in `event`, if it carries one.
    pub fn of(event: &Event) -> Option<Self> {
        let data = &event.data;
        Some(match event.kind.as_str() {
            "llm_call" => Self::Call {
                route: str_of(data, "route"),
                agent: str_of(data, "agent"),
                ok: data["outcome"] == "ok",
                latency_ms: data["latency_ms"].as_u64().unwrap_or(0),
                tokens: data["usage"]["total_tokens"].as_u64().unwrap_or(0),
            },
            "breaker_opened" | "breaker_half_opened" | "breaker_closed" => Self::Breaker {
                target: str_of(data, "target"),
                to: str_of(data, "to"),
                failure_rate: data["failure_rate"].as_f64(),
            },
            "task_succeeded" => Self::Succeeded {
                task: event.task_id.clone()?,
            },
            "task_cancelled" => Self::Cancelled {
                task: event.task_id.clone()?,
            },
            "task_dead" => Self::Dead {
                task: event.task_id.clone()?,
                reason: match &data["reason"] {
                    Value::String(s) => s.clone(),
                    Value::Null => "unknown".to_owned(),
                    other => other.to_string(),
                },
            },
            "loop_detected" => Self::Loop {
                agent: str_of(data, "agent"),
                kind: str_of(data, "kind"),
                task: event.task_id.clone(),
            },
            "alert_raised" if data["source"] != SOURCE => {
                let severity = match data["severity"].as_str() {
                    Some("critical") => Severity::Critical,
                    Some("info") => Severity::Info,
                    _ => Severity::Warning,
                };
                let message = data["message"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| data.to_string());
                // Budget warnings name the agent and unit; escalations their approval.
                let key = match (data["kind"].as_str(), &data["agent"], &data["approval_id"]) {
                    (Some("budget"), Value::String(a), _) => match data["key"].as_str() {
                        Some(k) => format!("budget:{a}:{k}:{}", str_of(data, "unit")),
                        None => format!("budget:{a}:{}", str_of(data, "unit")),
                    },
                    (_, _, Value::String(id)) => format!("approval:{id}"),
                    (_, Value::String(a), _) => format!("alert:{a}"),
                    _ => format!("alert:{}", event.task_id.as_deref().unwrap_or("keel")),
                };
                Self::Raised {
                    severity,
                    message,
                    task: event.task_id.clone(),
                    key,
                }
            }
            _ => return None,
        })
    }
}
