//! Postmortems (`keel postmortem`, `GET /v1/postmortem/{id}`): what happened to a task or
//! in an incident, told from the log. Three parts, as an on-call engineer writes them:
//!
//! - the **timeline**: every event, with its time since the first and what it says;
//! - the **root cause**: where it started to go wrong. For a task, the first sign of
//!   trouble (a failed attempt, a lost lease, a loop, a blocked action, a budget, ...)
//!   after the last sign of progress (a step, a checkpoint, an answered model call) that
//!   comes before its end; for an incident, its first alert;
//! - the **remediations**: what keel and people did about it (retries, fallbacks, degraded
//!   replies, re-dispatches after a lost lease, hand-offs, decisions, requeues), counted.
//!
//! Everything here is a pure function of rows and events, so the rules are unit-tested.

use keel_store::{Event, TaskRow};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::incident::Incident;

/// A postmortem of a task or an incident.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Postmortem {
    /// `task` or `incident`.
    pub subject: String,
    /// The task's or incident's id.
    pub id: String,
    /// One line: what it is and how it ended.
    pub title: String,
    /// The task's state, or the incident's (`open`, `resolved`).
    pub outcome: String,
    /// When it began (RFC 3339 UTC).
    pub started_at: Option<String>,
    /// When it ended, if it has.
    pub ended_at: Option<String>,
    /// From the first event to the last, in milliseconds.
    pub duration_ms: Option<i64>,
    /// Where it started to go wrong; `None` when nothing did.
    pub root_cause: Option<Line>,
    /// What keel and people did about it, one entry per kind, in order of first use.
    pub remediations: Vec<Remediation>,
    /// Every event (of an incident: every alert), oldest first.
    pub timeline: Vec<Line>,
    /// Tasks the incident touched (dead or handed off in its time), at most 100.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub affected_tasks: Vec<String>,
}

/// One event in words.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Line {
    /// The event's `seq` (0 for an incident's alerts, which are not read from the log).
    pub seq: u64,
    /// When (RFC 3339 UTC).
    pub at: String,
    /// Milliseconds since the first line.
    pub offset_ms: i64,
    /// The event kind (of an incident's alert: `firing` or `resolved`).
    pub kind: String,
    /// What it says.
    pub what: String,
    /// Whether it is trouble (a failure, a refusal, an alert).
    pub trouble: bool,
}

/// One kind of remediation and how often it was used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Remediation {
    /// The event kind that records it.
    pub kind: String,
    /// What it is, in words.
    pub what: String,
    /// How many times.
    pub count: u64,
    /// The first time (RFC 3339 UTC).
    pub first_at: String,
}

/// The postmortem of `task` from its events (its whole log, oldest first).
pub fn of_task(task: &TaskRow, events: &[Event]) -> Postmortem {
    let attempts = task.snapshot["attempts"].as_u64().unwrap_or(0);
    let ended = matches!(
        task.state.as_str(),
        "succeeded" | "dead" | "cancelled" | "awaiting_human"
    );
    let title = format!(
        "task {} of agent {:?}: {} after {attempts} attempt{}",
        task.id,
        task.agent,
        task.state,
        plural(attempts)
    );
    of_log(
        &task.id,
        title,
        &task.state,
        ended,
        task.created_at_ms,
        events,
    )
}

/// Events a label's postmortem reads at most: the first ones.
pub const LABEL_EVENTS: usize = 10_000;

/// The postmortem of the model calls a client labelled `label` with `x-keel-task` (no task of
/// keel's supervisor has that id), from their events, oldest first (at most [`LABEL_EVENTS`]).
pub fn of_label(label: &str, events: &[Event]) -> Postmortem {
    let calls = events.iter().filter(|e| e.kind == "llm_call").count();
    let title = format!(
        "calls labelled {label:?} (x-keel-task; not a task of keel's supervisor): {calls} model call{}{}",
        plural(calls),
        if events.len() >= LABEL_EVENTS {
            format!(" in its first {LABEL_EVENTS} events")
        } else {
            String::new()
        }
    );
    let first_ms = events.first().map_or(0, |e| e.at_ms);
    of_log(label, title, "calls", false, first_ms, events)
}

/// What [`of_task`] and [`of_label`] share: the timeline, the root cause and the remediations.
fn of_log(
    id: &str,
    title: String,
    outcome: &str,
    ended: bool,
    created_at_ms: i64,
    events: &[Event],
) -> Postmortem {
    let first_ms = events.first().map_or(created_at_ms, |e| e.at_ms);
    let timeline: Vec<Line> = events
        .iter()
        .map(|e| Line {
            seq: e.seq,
            at: e.at.clone(),
            offset_ms: e.at_ms - first_ms,
            kind: e.kind.clone(),
            what: describe(&e.kind, &e.data),
            trouble: is_trouble(&e.kind, &e.data),
        })
        .collect();
    let root_cause = root_cause(events).map(|i| timeline[i].clone());
    let mut remediations: Vec<Remediation> = Vec::new();
    for e in events {
        let Some(what) = remediation(&e.kind, &e.data) else {
            continue;
        };
        match remediations.iter_mut().find(|r| r.kind == e.kind) {
            Some(r) => r.count += 1,
            None => remediations.push(Remediation {
                kind: e.kind.clone(),
                what: what.to_owned(),
                count: 1,
                first_at: e.at.clone(),
            }),
        }
    }
    Postmortem {
        subject: "task".to_owned(),
        id: id.to_owned(),
        title,
        outcome: outcome.to_owned(),
        started_at: events.first().map(|e| e.at.clone()),
        ended_at: events.last().filter(|_| ended).map(|e| e.at.clone()),
        duration_ms: events.last().map(|e| e.at_ms - first_ms),
        root_cause,
        remediations,
        timeline,
        affected_tasks: Vec::new(),
    }
}

/// An RFC 3339 time (as incidents keep them) in Unix milliseconds; `None` if it is not one.
fn unix_ms(at: &str) -> Option<i64> {
    humantime::parse_rfc3339(at)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .and_then(|d| i64::try_from(d.as_millis()).ok())
}

/// The postmortem of `incident`; `affected` are the tasks it touched.
pub fn of_incident(incident: &Incident, affected: Vec<String>) -> Postmortem {
    let ms = |at: &str| unix_ms(at).unwrap_or(0);
    let first_ms = ms(&incident.opened_at);
    let timeline: Vec<Line> = incident
        .timeline
        .iter()
        .map(|entry| Line {
            seq: 0,
            at: entry.at.clone(),
            offset_ms: ms(&entry.at) - first_ms,
            kind: entry.status.to_owned(),
            what: format!("[{}] {}", entry.severity, entry.message),
            trouble: entry.status == "firing",
        })
        .collect();
    let duration_ms = incident
        .resolved_at
        .as_deref()
        .map(|resolved| ms(resolved) - first_ms);
    Postmortem {
        subject: "incident".to_owned(),
        id: incident.id.clone(),
        title: format!(
            "incident {} ({}, {}): {}",
            incident.id, incident.key, incident.severity, incident.title
        ),
        outcome: incident.state.to_owned(),
        started_at: Some(incident.opened_at.clone()),
        ended_at: incident.resolved_at.clone(),
        duration_ms,
        root_cause: timeline.first().cloned(),
        remediations: Vec::new(),
        timeline,
        affected_tasks: affected,
    }
}

/// The index of the root-cause event: the first trouble after the last progress that
/// precedes the last trouble. `None` when there was no trouble.
fn root_cause(events: &[Event]) -> Option<usize> {
    let last_trouble = events.iter().rposition(|e| is_trouble(&e.kind, &e.data))?;
    let progress_before = events[..last_trouble]
        .iter()
        .rposition(|e| is_progress(&e.kind, &e.data));
    let from = progress_before.map_or(0, |i| i + 1);
    events[from..=last_trouble]
        .iter()
        .position(|e| is_trouble(&e.kind, &e.data))
        .map(|i| from + i)
}

/// Whether an event is a sign of trouble.
fn is_trouble(kind: &str, data: &Value) -> bool {
    match kind {
        "llm_attempt_failed" | "breaker_opened" | "degraded_reply" | "budget_exceeded"
        | "loop_detected" | "action_blocked" | "lease_expired" | "task_failed" | "task_dead"
        | "task_handed_off" | "alert_raised" => true,
        "llm_call" => data["outcome"].as_str().is_some_and(|o| o != "ok"),
        "approval_decided" => data["decision"] == "deny",
        "tool_invoked" => data["outcome"].as_str().is_some_and(|o| o != "ok"),
        _ => false,
    }
}

/// Whether an event shows the task moving on.
fn is_progress(kind: &str, data: &Value) -> bool {
    match kind {
        "step_recorded" | "checkpoint_saved" | "task_succeeded" => true,
        "llm_call" => data["outcome"] == "ok",
        "approval_decided" => data["decision"] == "approve",
        _ => false,
    }
}

/// What a remediation event did, in words; `None` for other events.
fn remediation(kind: &str, data: &Value) -> Option<&'static str> {
    Some(match kind {
        // A retry keel did not make (its budget spent, a `Retry-After` over the cap) is no
        // remediation: its event says why the call moved on instead.
        "retry_scheduled" if data.get("skipped").is_some() => return None,
        "retry_scheduled" => "keel retried a failed model call",
        "fallback_used" => "keel fell back to the next target",
        "degraded_reply" => "keel served the route's degraded reply",
        "task_claimed" if data["resumed"] == true => "the task went on after a person's approval",
        "task_claimed" if data["attempt"].as_u64().is_some_and(|a| a > 1) => {
            "the task was dispatched again (from its newest checkpoint)"
        }
        "backtracked" => "the supervisor backtracked to a checkpoint",
        "task_handed_off" => "the task was handed to a person",
        "approval_requested" => "a person's approval was asked for",
        "approval_decided" => "a person decided",
        "task_requeued" => "the task was requeued",
        "action_blocked" => "keel blocked an action",
        "budget_exceeded" => "keel refused a call over budget",
        _ => return None,
    })
}

/// One event's data in words.
fn describe(kind: &str, data: &Value) -> String {
    let s = |key: &str| data[key].as_str().unwrap_or("?").to_owned();
    let n = |key: &str| data[key].as_u64().unwrap_or(0);
    match kind {
        "task_created" => format!("created for agent {:?}", s("agent")),
        "task_claimed" => format!(
            "claimed by worker {:?} (attempt {})",
            s("worker"),
            n("attempt")
        ),
        "lease_expired" => format!(
            "worker {:?} went quiet: its lease expired (attempt {})",
            s("worker"),
            n("attempt")
        ),
        "step_recorded" => format!("step {} ({}): {}", n("step"), s("kind"), s("summary")),
        "checkpoint_saved" => match data["label"].as_str() {
            Some(label) => format!("checkpoint {} ({label:?})", n("seq")),
            None => format!("checkpoint {}", n("seq")),
        },
        "llm_call" => format!(
            "model call on route {:?}{}: {} after {} attempt{} in {} ms{}",
            s("route"),
            // `none` when no target answered, `degraded` for the route's degraded reply.
            match s("target").as_str() {
                "" | "?" | "none" | "degraded" => String::new(),
                target => format!(" via {target}"),
            },
            s("outcome"),
            n("attempts"),
            plural(n("attempts")),
            n("latency_ms"),
            if data["fallback"] == true {
                " (fallback)"
            } else {
                ""
            }
        ),
        "llm_attempt_failed" => format!(
            "attempt {} on {} failed ({}): {}",
            n("attempt"),
            s("target"),
            s("reason"),
            s("error")
        ),
        "retry_scheduled" if data.get("skipped").is_some() => {
            format!("no retry on {}: {}", s("target"), s("skipped"))
        }
        "retry_scheduled" => format!(
            "retry {} on {} in {} ms (after {})",
            n("attempt"),
            s("target"),
            n("delay_ms"),
            s("after")
        ),
        "fallback_used" => format!("fell back from {} to {}", s("from"), s("to")),
        "breaker_opened" | "breaker_half_opened" | "breaker_closed" => {
            format!("{} of {}", kind.replace('_', " "), s("target"))
        }
        "degraded_reply" => format!("degraded reply on route {:?}: {}", s("route"), s("reason")),
        "budget_exceeded" => format!(
            "over budget: {} of {} {} used",
            data["used"],
            data["limit"],
            s("unit")
        ),
        "loop_detected" => format!("loop detected ({})", s("kind")),
        "action_checked" | "action_blocked" | "tool_invoked" => {
            let reasons = data["reasons"]
                .as_array()
                .map(|r| {
                    r.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join("; ")
                })
                .unwrap_or_default();
            let verdict = data["verdict"]
                .as_str()
                .or(data["outcome"].as_str())
                .unwrap_or(if kind == "action_blocked" {
                    "blocked"
                } else {
                    ""
                });
            format!("tool {:?}: {verdict} {reasons}", s("tool"))
                .trim_end()
                .to_owned()
        }
        "approval_requested" => format!("approval {} asked: {}", s("approval_id"), s("reason")),
        "approval_decided" => {
            let note = data["note"]
                .as_str()
                .map(|n| format!(": {n}"))
                .unwrap_or_default();
            format!("{} by {:?}{note}", s("decision"), s("by"))
        }
        "task_succeeded" => "succeeded".to_owned(),
        "task_failed" => format!(
            "failed ({}): {}",
            if data["retryable"] == true {
                "retryable"
            } else {
                "not retryable"
            },
            compact(&data["error"])
        ),
        "task_dead" => format!(
            "dead ({}) after {} attempt{}{}",
            compact(&data["reason"]),
            n("attempts"),
            plural(n("attempts")),
            match &data["error"] {
                Value::Null => String::new(),
                error => format!(": {}", compact(error)),
            }
        ),
        "task_handed_off" => format!("handed to a person: {}", s("reason")),
        "task_cancelled" => format!(
            "cancelled{}",
            data["reason"]
                .as_str()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        ),
        "task_requeued" => format!(
            "requeued by {:?}{}",
            s("by"),
            data["reason"]
                .as_str()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        ),
        "alert_raised" => format!("[{}] {}", s("severity"), s("message")),
        other => format!("{other} {}", compact(data)),
    }
}

/// A value on one line, strings without quotes, at most 200 characters, no control
/// character printed ([`keel_core::text::one_line`]).
fn compact(value: &Value) -> String {
    match value {
        Value::String(s) => keel_core::text::one_line(s, 200),
        other => keel_core::text::one_line(&other.to_string(), 200),
    }
}

impl Postmortem {
    /// The postmortem as Markdown, for people: summary, root cause, remediations,
    /// timeline. Runs of routine events (answered calls, steps, checkpoints) between
    /// the notable ones are folded into one line.
    pub fn to_markdown(&self) -> String {
        let mut out = format!("# Postmortem: {}\n\n", self.title);
        out.push_str(&format!("- outcome: **{}**\n", self.outcome));
        if let Some(at) = &self.started_at {
            out.push_str(&format!("- started: {at}\n"));
        }
        if let Some(at) = &self.ended_at {
            out.push_str(&format!("- ended: {at}\n"));
        }
        if let Some(ms) = self.duration_ms {
            out.push_str(&format!("- duration: {}\n", duration(ms)));
        }
        out.push_str("\n## Root cause\n\n");
        match &self.root_cause {
            Some(line) => out.push_str(&format!(
                "At +{} (`{}`{}): {}\n",
                duration(line.offset_ms),
                line.kind,
                if line.seq > 0 {
                    format!(", seq {}", line.seq)
                } else {
                    String::new()
                },
                line.what
            )),
            None => out.push_str("Nothing went wrong.\n"),
        }
        out.push_str("\n## Remediations\n\n");
        if self.remediations.is_empty() {
            out.push_str("None.\n");
        }
        for r in &self.remediations {
            out.push_str(&format!(
                "- {} (`{}`): {} time{}, first at {}\n",
                r.what,
                r.kind,
                r.count,
                plural(r.count),
                r.first_at
            ));
        }
        if !self.affected_tasks.is_empty() {
            out.push_str("\n## Affected tasks\n\n");
            for task in &self.affected_tasks {
                out.push_str(&format!("- {task}\n"));
            }
        }
        out.push_str("\n## Timeline\n\n");
        let root = self.root_cause.as_ref().map(|l| (l.seq, l.at.as_str()));
        let mut routine: Vec<&Line> = Vec::new();
        for line in &self.timeline {
            let notable = line.trouble
                || root == Some((line.seq, line.at.as_str()))
                || !matches!(
                    line.kind.as_str(),
                    "llm_call" | "step_recorded" | "checkpoint_saved" | "action_checked"
                );
            if !notable {
                routine.push(line);
                continue;
            }
            fold(&mut out, &mut routine);
            let marker = if root == Some((line.seq, line.at.as_str())) {
                " **(root cause)**"
            } else {
                ""
            };
            out.push_str(&format!(
                "- +{} `{}` {}{marker}\n",
                duration(line.offset_ms),
                line.kind,
                line.what
            ));
        }
        fold(&mut out, &mut routine);
        out
    }
}

/// Writes a run of routine lines: one as it is, more as one line.
fn fold(out: &mut String, routine: &mut Vec<&Line>) {
    match routine.as_slice() {
        [] => {}
        [line] => out.push_str(&format!(
            "- +{} `{}` {}\n",
            duration(line.offset_ms),
            line.kind,
            line.what
        )),
        [first, .., last] => out.push_str(&format!(
            "- +{} to +{}: {} routine events (answered model calls, steps, checkpoints)\n",
            duration(first.offset_ms),
            duration(last.offset_ms),
            routine.len()
        )),
    }
    routine.clear();
}

/// Milliseconds as `850ms`, `12.3s` or `4m05s`.
/// The plural ending of a count's noun: `""` for one, else `"s"`.
fn plural(count: impl TryInto<u64>) -> &'static str {
    if count.try_into().ok() == Some(1) {
        ""
    } else {
        "s"
    }
}

fn duration(ms: i64) -> String {
    match ms {
        ..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1_000.0),
        _ => format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1_000),
    }
}

#[cfg(test)]
mod tests;
