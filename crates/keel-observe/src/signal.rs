//! What the observer takes from each committed event: a few fields, read without copying
//! the rest (the tap runs on the appending task, so it stays cheap).

use keel_config::Severity;
use keel_store::Event;
use serde_json::Value;

/// One fact the observer acts on.
#[derive(Debug, Clone, PartialEq)]
pub enum Signal {
    /// A gateway call ended (`llm_call`).
    Call(Call),
    /// A tool call through keel ended (`tool_invoked`), or was refused (`action_blocked`).
    Tool(ToolCall),
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
        /// When, Unix ms.
        at_ms: i64,
    },
    /// A task was cancelled.
    Cancelled {
        /// The task.
        task: String,
        /// When, Unix ms.
        at_ms: i64,
    },
    /// A task went to the dead-letter queue.
    Dead {
        /// The task.
        task: String,
        /// Why, as recorded.
        reason: String,
        /// When, Unix ms.
        at_ms: i64,
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

/// One model call, as its `llm_call` event tells it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Call {
    /// The route (what the client sent as `model`).
    pub route: String,
    /// `provider/model` that answered (or was tried last), `none` when none was.
    pub target: String,
    /// The calling agent.
    pub agent: String,
    /// The task, when the call named one.
    pub task: Option<String>,
    /// `ok`, `degraded`, `error`, `timeout`, `unavailable`, `fatal`...
    pub outcome: String,
    /// Whether it was answered (`outcome: ok`).
    pub ok: bool,
    /// Attempts made.
    pub attempts: u64,
    /// Answered by a target other than the first.
    pub fallback: bool,
    /// A streamed call.
    pub stream: bool,
    /// Time to the end of the answer.
    pub latency_ms: u64,
    /// Prompt tokens.
    pub input_tokens: Option<u64>,
    /// Completion tokens.
    pub output_tokens: Option<u64>,
    /// Tokens the provider reported (`usage.total_tokens`).
    pub tokens: u64,
    /// The answer's `model` (`response_model`), for a JSON answer.
    pub response_model: Option<String>,
    /// The answer's finish reasons (`finish_reasons`), for a JSON answer.
    pub finish_reasons: Vec<String>,
    /// When the call ended (the event's commit), Unix ms.
    pub at_ms: i64,
    /// The event's hash: a unique, stable id for its span.
    pub hash: String,
}

impl Call {
    /// How the call ended, for its route's error rate and latency: a call whose client left
    /// (`client_gone`) is neither answered nor failed.
    pub fn ended(&self) -> crate::detect::Ended {
        if self.outcome == "client_gone" {
            crate::detect::Ended::ClientLeft
        } else {
            crate::detect::Ended::of(self.ok)
        }
    }
}

/// One tool call, as `tool_invoked` or `action_blocked` tells it.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// The tool.
    pub tool: String,
    /// The agent.
    pub agent: String,
    /// The task, if any.
    pub task: Option<String>,
    /// `ok` or `error`; `blocked` when a guard refused it.
    pub outcome: String,
    /// Attempts made (0 when blocked).
    pub attempts: u64,
    /// How long it took, ms (0 when blocked).
    pub latency_ms: u64,
    /// The rules that blocked it.
    pub rules: Vec<String>,
    /// When, Unix ms.
    pub at_ms: i64,
    /// The event's hash.
    pub hash: String,
}

/// Marks the `alert_raised` events the observer writes, so that it does not read its
/// own alerts back as new ones.
pub const SOURCE: &str = "observe";

fn str_of(data: &Value, key: &str) -> String {
    text(&data[key])
}

/// A string member's text; empty when it is missing or not a string.
fn text(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_owned()
}

impl Call {
    /// The call an `llm_call` event tells, read in one pass over its members (every
    /// call's event passes through here, so each member is not looked up by name).
    fn of(event: &Event) -> Self {
        let mut call = Self {
            task: event.task_id.clone(),
            at_ms: event.at_ms,
            hash: event.hash.clone(),
            ..Self::default()
        };
        let Value::Object(data) = &event.data else {
            return call;
        };
        for (key, value) in data {
            match key.as_str() {
                "route" => call.route = text(value),
                "target" => call.target = text(value),
                "agent" => call.agent = text(value),
                "outcome" => {
                    call.ok = value == "ok";
                    call.outcome = text(value);
                }
                "attempts" => call.attempts = value.as_u64().unwrap_or(0),
                "fallback" => call.fallback = value.as_bool().unwrap_or(false),
                "stream" => call.stream = value.as_bool().unwrap_or(false),
                "latency_ms" => call.latency_ms = value.as_u64().unwrap_or(0),
                "usage" => {
                    call.input_tokens = value["prompt_tokens"].as_u64();
                    call.output_tokens = value["completion_tokens"].as_u64();
                    call.tokens = value["total_tokens"].as_u64().unwrap_or(0);
                }
                "response_model" => call.response_model = value.as_str().map(str::to_owned),
                "finish_reasons" => {
                    call.finish_reasons = value
                        .as_array()
                        .map(|reasons| {
                            reasons
                                .iter()
                                .filter_map(|r| r.as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_default();
                }
                _ => {}
            }
        }
        call
    }
}

impl Signal {
    /// The signal in `event`, if it carries one.
    pub fn of(event: &Event) -> Option<Self> {
        let data = &event.data;
        Some(match event.kind.as_str() {
            "llm_call" => Self::Call(Call::of(event)),
            "tool_invoked" => Self::Tool(ToolCall {
                tool: str_of(data, "tool"),
                agent: str_of(data, "agent"),
                task: event.task_id.clone(),
                outcome: str_of(data, "outcome"),
                attempts: data["attempts"].as_u64().unwrap_or(0),
                latency_ms: data["latency_ms"].as_u64().unwrap_or(0),
                rules: Vec::new(),
                at_ms: event.at_ms,
                hash: event.hash.clone(),
            }),
            // A result withheld after the call is on the call's own span.
            "action_blocked" if data["stage"] != "result" => Self::Tool(ToolCall {
                tool: str_of(data, "tool"),
                agent: str_of(data, "agent"),
                task: event.task_id.clone(),
                outcome: "blocked".to_owned(),
                attempts: 0,
                latency_ms: 0,
                rules: data["rules"]
                    .as_array()
                    .map(|r| {
                        r.iter()
                            .filter_map(|x| x.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default(),
                at_ms: event.at_ms,
                hash: event.hash.clone(),
            }),
            "breaker_opened" | "breaker_half_opened" | "breaker_closed" => Self::Breaker {
                target: str_of(data, "target"),
                to: str_of(data, "to"),
                failure_rate: data["failure_rate"].as_f64(),
            },
            "task_succeeded" => Self::Succeeded {
                task: event.task_id.clone()?,
                at_ms: event.at_ms,
            },
            "task_cancelled" => Self::Cancelled {
                task: event.task_id.clone()?,
                at_ms: event.at_ms,
            },
            "task_dead" => Self::Dead {
                task: event.task_id.clone()?,
                reason: match &data["reason"] {
                    Value::String(s) => s.clone(),
                    Value::Null => "unknown".to_owned(),
                    other => other.to_string(),
                },
                at_ms: event.at_ms,
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(kind: &str, data: Value) -> Event {
        Event {
            seq: 7,
            task_id: Some("t-1".into()),
            at: "2026-12-05T00:00:00.000Z".into(),
            at_ms: 1_796_428_800_000,
            kind: kind.into(),
            data,
            prev_hash: "p".repeat(64),
            hash: "h".repeat(64),
            layout: 2,
            data_hash: None,
            pruned: false,
        }
    }

    #[test]
    fn an_llm_call_event_is_read_member_by_member() {
        let data = json!({
            "agent": "billing", "attempts": 2, "fallback": true, "latency_ms": 41,
            "outcome": "ok", "route": "smart", "stream": false, "target": "sim/m",
            "step": "plan", "request": {"messages": 1},
            "usage": {"prompt_tokens": 6, "completion_tokens": 9, "total_tokens": 15},
            "response_model": "m-2026", "finish_reasons": ["stop", "length"],
        });
        let Some(Signal::Call(call)) = Signal::of(&event("llm_call", data)) else {
            panic!("an llm_call is a call");
        };
        assert_eq!(
            call,
            Call {
                route: "smart".into(),
                target: "sim/m".into(),
                agent: "billing".into(),
                task: Some("t-1".into()),
                outcome: "ok".into(),
                ok: true,
                attempts: 2,
                fallback: true,
                stream: false,
                latency_ms: 41,
                input_tokens: Some(6),
                output_tokens: Some(9),
                tokens: 15,
                response_model: Some("m-2026".into()),
                finish_reasons: vec!["stop".into(), "length".into()],
                at_ms: 1_796_428_800_000,
                hash: "h".repeat(64),
            }
        );
    }

    #[test]
    fn a_call_whose_client_left_is_neither_answered_nor_failed() {
        let ended = |outcome: &str| {
            let data = json!({"outcome": outcome, "route": "smart"});
            let Some(Signal::Call(call)) = Signal::of(&event("llm_call", data)) else {
                panic!("an llm_call is a call");
            };
            call.ended()
        };
        use crate::detect::Ended;
        assert_eq!(ended("client_gone"), Ended::ClientLeft);
        assert_eq!(ended("ok"), Ended::Answered);
        assert_eq!(ended("stream_error"), Ended::Failed);
        assert_eq!(ended("degraded"), Ended::Failed);
    }

    #[test]
    fn missing_or_mistyped_members_read_as_empty() {
        let data = json!({"outcome": "timeout", "attempts": "three", "usage": null, "response_model": 7, "finish_reasons": null});
        let Some(Signal::Call(call)) = Signal::of(&event("llm_call", data)) else {
            panic!("an llm_call is a call");
        };
        assert!(!call.ok);
        assert_eq!(call.outcome, "timeout");
        assert_eq!(call.ended(), crate::detect::Ended::Failed);
        assert_eq!(
            (call.route.as_str(), call.attempts, call.tokens),
            ("", 0, 0)
        );
        assert_eq!((call.input_tokens, call.response_model), (None, None));
        assert!(call.finish_reasons.is_empty());
        // Pruned data (null) still yields the call, with what the event itself carries.
        let Some(Signal::Call(pruned)) = Signal::of(&event("llm_call", Value::Null)) else {
            panic!("an llm_call is a call");
        };
        assert_eq!(
            (pruned.task, pruned.at_ms),
            (Some("t-1".into()), 1_796_428_800_000)
        );
    }
}
