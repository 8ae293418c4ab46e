//! The histogram guard (`[tools.NAME] profile = { args = [...] }`): for each (agent, tool,
//! numeric arg), a DDSketch of the values seen in successful tasks, kept in the store
//! (key `profile/AGENT/TOOL/ARG`) so that it survives restarts and every node sees it.
//!
//! - Learning: when a task succeeds, the profiled args of its successful tool calls
//!   (`tool_invoked` with `outcome: ok`, and allowed `action_checked` for agents that run
//!   their tools themselves) are added. A call keel runs without a task counts once it
//!   succeeded; a check without a task teaches nothing (nothing says the action was done).
//! - Judging: after `warmup` values, a value beyond `quantile × factor` is an outlier, and
//!   the call is blocked (`action = "block"`) or sent for approval (`action = "approve"`):
//!   the task waits in the approval queue with the action and the profile's summary.
//! - Once a person approves, the same call (same tool, same args) in that task passes once.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keel_core::EventKind;
use keel_policy::profile::{Judgement, Profile, ProfileRule, Summary};
use keel_store::{Event, StoreError};
use serde_json::{Value, json};

use super::Tool;
use crate::Gateway;
use crate::error::ApiError;

/// How many times a profile save is redone after losing a race with another writer.
const MAX_SAVE_TRIES: usize = 32;

/// Where a task waits for a person. keel's supervisor implements it; a gateway without
/// one blocks the calls that need an approval, saying why.
#[async_trait]
pub trait ApprovalQueue: Send + Sync {
    /// Puts `task` in the approval queue (its lease, if any, is given up) and returns
    /// the approval's id; nobody deciding within `timeout` denies it.
    async fn request(
        &self,
        task: &str,
        reason: String,
        context: Value,
        timeout: Duration,
    ) -> Result<String, ApiError>;

    /// Hands `task` to a person (keel's guards found it looping, say): it waits in the
    /// same queue, and the worker holding its lease is told `handoff` on its next call.
    /// Returns the approval's id; a task the supervisor does not know is an error.
    async fn handoff(
        &self,
        task: &str,
        reason: String,
        context: Value,
        timeout: Duration,
    ) -> Result<String, ApiError>;

    /// The agent that owns `task` and its deadline; `None` for a task the supervisor does
    /// not know.
    async fn task_facts(&self, task: &str) -> Result<Option<TaskFacts>, ApiError>;
}

/// What the gateway needs to know of a supervisor task to place a model call in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskFacts {
    /// The agent it belongs to (never changes).
    pub agent: String,
    /// Its deadline, unix milliseconds, unless it succeeded (an operator's requeue may set
    /// a new one).
    pub deadline_ms: Option<i64>,
    /// The loop guard's pending handoff while the task waits for a person: the loop guard
    /// keeps its stops in memory, so after a restart this is how it knows one.
    pub loop_handoff: Option<LoopHandoff>,
}

/// A pending handoff of a task the loop guard stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopHandoff {
    /// The approval a person decides on.
    pub approval: String,
    /// Why the task was stopped, in words.
    pub reason: String,
}

impl LoopHandoff {
    /// `context.kind` of the approvals the loop guard asks for.
    pub(crate) const KIND: &'static str = "loop";

    /// The loop guard's handoff a task in `state` waits on, from the supervisor's task JSON.
    pub fn of_task(state: &str, snapshot: &serde_json::Value) -> Option<Self> {
        let approval = &snapshot["approval"];
        if state != "awaiting_human"
            || approval["handoff"] != true
            || approval["context"]["kind"] != Self::KIND
        {
            return None;
        }
        Some(Self {
            approval: approval["id"].as_str()?.to_owned(),
            reason: approval["reason"].as_str().unwrap_or_default().to_owned(),
        })
    }
}

/// A numeric arg far outside its profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Outlier {
    /// The arg.
    pub arg: String,
    /// Its value in this call.
    pub value: f64,
    /// `quantile × factor`.
    pub threshold: f64,
    /// The profile's value at the configured quantile.
    pub quantile_value: f64,
    /// The profile's shape.
    pub summary: Option<Summary>,
}

impl Outlier {
    /// Why the call is stopped, in words.
    pub(crate) fn reason(&self, agent: &str, tool: &Tool) -> String {
        let (quantile, factor) = tool
            .settings
            .profile
            .as_ref()
            .map_or((0.0, 0.0), |p| (p.quantile, p.factor));
        let seen = self.summary.map_or(0, |s| s.count);
        format!(
            "{} = {} is far outside what agent {agent:?} usually sends to {:?}: the threshold is {} (p{} {} × {factor}) after {seen} values from successful tasks",
            self.arg,
            self.value,
            tool.settings.name,
            round(self.threshold),
            round(quantile * 100.0),
            round(self.quantile_value),
        )
    }

    /// The outlier as the approver and the log see it.
    pub fn to_json(&self) -> Value {
        json!({
            "arg": self.arg,
            "value": self.value,
            "threshold": round(self.threshold),
            "quantile_value": round(self.quantile_value),
            "profile": self.summary.map(|s| json!({
                "count": s.count,
                "min": round(s.min),
                "p50": round(s.p50),
                "p90": round(s.p90),
                "p99": round(s.p99),
                "max": round(s.max),
            })),
        })
    }
}

/// Three significant decimals are plenty for a person (the sketch is 1% accurate).
fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// The store key of a profile.
pub(crate) fn key(agent: &str, tool: &str, arg: &str) -> String {
    format!("profile/{agent}/{tool}/{arg}")
}

/// The numbers of `args` that `tool` profiles, by arg name (args that are not numbers
/// are left to the rules).
fn profiled_values<'a>(tool_args: &'a [String], args: &Value) -> Vec<(&'a str, f64)> {
    tool_args
        .iter()
        .filter_map(|arg| args.get(arg)?.as_f64().map(|v| (arg.as_str(), v)))
        .collect()
}

/// The identity of an action for its approval: the tool and its args, canonical JSON.
pub(crate) fn action_id(tool: &str, args: &Value) -> String {
    keel_store::blob_hash(
        keel_store::chain::into_canonical_json(json!({"tool": tool, "args": args})).as_bytes(),
    )
}

/// The approval a person gave for `action` in this task's log that no call has used yet.
pub(crate) fn unused_approval(events: &[Event], action: &str) -> Option<String> {
    let requested = EventKind::ApprovalRequested.as_str();
    let ids = events
        .iter()
        .filter(|e| e.kind == requested && e.data["context"]["action"] == action)
        .filter_map(|e| e.data["approval_id"].as_str());
    let used = |id: &str| {
        events.iter().any(|e| {
            (e.kind == EventKind::ToolInvoked.as_str()
                || e.kind == EventKind::ActionChecked.as_str())
                && e.data["approval"] == id
        })
    };
    ids.filter(|id| approved(events, id))
        .find(|id| !used(id))
        .map(str::to_owned)
}

/// The `approval_decided` data of approval `id` in `events`, if it was decided.
fn decision<'a>(events: &'a [Event], id: &str) -> Option<&'a Value> {
    events
        .iter()
        .find(|e| e.kind == EventKind::ApprovalDecided.as_str() && e.data["approval_id"] == id)
        .map(|e| &e.data)
}

/// Whether approval `id` was decided, either way (by a person or its timeout), in `events`.
pub(crate) fn decided(events: &[Event], id: &str) -> bool {
    decision(events, id).is_some()
}

/// Whether a person approved approval `id` in this task's log.
fn approved(events: &[Event], id: &str) -> bool {
    decision(events, id).is_some_and(|d| d["decision"] == "approve")
}

impl Gateway {
    /// The profile under `key` and the version it was read at.
    async fn load_profile(&self, key: &str) -> Result<(Profile, Option<u64>), StoreError> {
        match self.store.load_state(key).await? {
            None => Ok((Profile::new(), None)),
            Some(saved) => match serde_json::from_slice::<Profile>(&saved.value) {
                Ok(profile) => Ok((profile, Some(saved.version))),
                Err(e) => {
                    // An unreadable profile is relearned, not a reason to stop every call.
                    tracing::warn!(key, error = %e, "unreadable profile; starting it again");
                    Ok((Profile::new(), Some(saved.version)))
                }
            },
        }
    }

    /// The profiled args of this call that are outliers (empty while learning).
    pub(crate) async fn outliers(
        &self,
        tool: &Tool,
        agent: &str,
        args: &Value,
    ) -> Result<Vec<Outlier>, ApiError> {
        let Some(settings) = &tool.settings.profile else {
            return Ok(Vec::new());
        };
        let rule = ProfileRule {
            warmup: settings.warmup,
            quantile: settings.quantile,
            factor: settings.factor,
        };
        let mut found = Vec::new();
        for (arg, value) in profiled_values(&settings.args, args) {
            let (profile, _) = self
                .load_profile(&key(agent, &tool.settings.name, arg))
                .await
                .map_err(|e| ApiError::unavailable(format!("cannot read the profile: {e}")))?;
            if let Judgement::Outlier {
                threshold,
                quantile_value,
            } = profile.judge(value, &rule)
            {
                found.push(Outlier {
                    arg: arg.to_owned(),
                    value,
                    threshold,
                    quantile_value,
                    summary: profile.summary(),
                });
            }
        }
        Ok(found)
    }

    /// Adds `values` to the profile under `key`, redoing the change when another writer
    /// saved first.
    async fn learn(&self, key: &str, values: &[f64]) -> Result<(), StoreError> {
        for _ in 0..MAX_SAVE_TRIES {
            let (mut profile, version) = self.load_profile(key).await?;
            values.iter().for_each(|v| profile.observe(*v));
            let bytes = serde_json::to_vec(&profile).unwrap_or_default();
            if self.store.save_state(key, bytes, version).await?.is_some() {
                return Ok(());
            }
        }
        tracing::warn!(key, "profile not updated: too many concurrent writers");
        Ok(())
    }

    /// Learns the profiled args of one successful call made without a task.
    pub(crate) async fn learn_call(&self, tool: &Tool, agent: &str, args: &Value) {
        let Some(settings) = &tool.settings.profile else {
            return;
        };
        for (arg, value) in profiled_values(&settings.args, args) {
            if let Err(e) = self
                .learn(&key(agent, &tool.settings.name, arg), &[value])
                .await
            {
                tracing::warn!(tool = %tool.settings.name, error = %e, "cannot update the profile");
            }
        }
    }

    /// A task succeeded: its successful tool calls teach the profiles of their tools.
    pub async fn learn_from_task(self: &Arc<Self>, task: &str) {
        let events = match self.task_log(task).await {
            Ok(events) => events,
            Err(e) => {
                tracing::warn!(task, error = %e, "cannot read the task's log to learn profiles");
                return;
            }
        };
        // (key, values) in the order first seen.
        let mut learned: Vec<(String, Vec<f64>)> = Vec::new();
        for e in &events {
            let ok_call = e.kind == EventKind::ToolInvoked.as_str() && e.data["outcome"] == "ok";
            let allowed_check =
                e.kind == EventKind::ActionChecked.as_str() && e.data["verdict"] == "allow";
            if !(ok_call || allowed_check) {
                continue;
            }
            let (Some(name), Some(agent)) = (e.data["tool"].as_str(), e.data["agent"].as_str())
            else {
                continue;
            };
            let Some(profile) = self
                .tools
                .get(name)
                .and_then(|t| t.settings.profile.as_ref())
            else {
                continue;
            };
            for (arg, value) in profiled_values(&profile.args, &e.data["args"]) {
                let key = key(agent, name, arg);
                match learned.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, values)) => values.push(value),
                    None => learned.push((key, vec![value])),
                }
            }
        }
        for (key, values) in learned {
            if let Err(e) = self.learn(&key, &values).await {
                tracing::warn!(task, key, error = %e, "cannot update the profile");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind, data: Value) -> Event {
        Event {
            seq: 0,
            task_id: Some("t".into()),
            at: String::new(),
            at_ms: 0,
            kind: kind.as_str().to_owned(),
            data,
            prev_hash: String::new(),
            hash: String::new(),
            layout: 2,
            data_hash: None,
            pruned: false,
        }
    }

    #[test]
    fn an_approval_lets_the_same_action_pass_once() {
        let action = action_id("delete_rows", &json!({"table": "users", "rows": 1000}));
        // The same args in another order are the same action.
        assert_eq!(
            action,
            action_id("delete_rows", &json!({"rows": 1000, "table": "users"}))
        );
        let other = action_id("delete_rows", &json!({"table": "users", "rows": 999}));
        let requested = event(
            EventKind::ApprovalRequested,
            json!({"approval_id": "apr_1", "context": {"action": action}}),
        );
        let mut log = vec![requested.clone()];
        assert_eq!(unused_approval(&log, &action), None, "not decided yet");
        log.push(event(
            EventKind::ApprovalDecided,
            json!({"approval_id": "apr_1", "decision": "deny"}),
        ));
        assert_eq!(unused_approval(&log, &action), None, "denied");
        let mut log = vec![
            requested,
            event(
                EventKind::ApprovalDecided,
                json!({"approval_id": "apr_1", "decision": "approve"}),
            ),
        ];
        assert_eq!(unused_approval(&log, &action).as_deref(), Some("apr_1"));
        assert_eq!(unused_approval(&log, &other), None, "other args");
        log.push(event(
            EventKind::ToolInvoked,
            json!({"tool": "delete_rows", "approval": "apr_1"}),
        ));
        assert_eq!(unused_approval(&log, &action), None, "used");
    }

    #[test]
    fn only_numbers_are_profiled() {
        let args = vec!["rows".to_owned(), "amount".to_owned()];
        let got = profiled_values(&args, &json!({"rows": 5, "amount": "12", "other": 1}));
        assert_eq!(got, vec![("rows", 5.0)]);
    }
}
