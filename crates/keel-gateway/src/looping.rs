//! The gateway's side of the loop guard ([`crate::guard::loops`] finds the loops): what a
//! loop found in a task's answers or spend records, handing the task to a person, and
//! refusing its further model calls until that person lets it go on.

use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::Gateway;
use crate::error::ApiError;
use crate::guard::loops::{PAUSE, Release, Stopped};
use crate::route::Attribution;
use crate::usage::Usage;

/// A loop found in a task: the `loop_detected` data, and why, in words.
pub(crate) struct LoopStop {
    task: String,
    /// The other end of a bounce, stopped too.
    other: Option<String>,
    reason: String,
    /// The `loop_detected` event's data (`kind` names the signal).
    pub(crate) data: Value,
}

impl Gateway {
    /// Counts a loop in `keel_loops_detected_total` from its `loop_detected` data.
    pub(crate) fn count_loop(&self, data: &Value) {
        self.metrics
            .loops_detected
            .get_or_create(&crate::metrics::LoopLabels {
                agent: self
                    .metrics
                    .agents
                    .of(data["agent"].as_str().unwrap_or_default()),
                kind: data["kind"].as_str().unwrap_or_default().into(),
            })
            .inc();
    }

    /// Whether this answer of `who`'s task (its text, read by `answer` only when the
    /// guard looks, and its usage) shows a loop: repeated or bounced answers, else token
    /// burn over the agent's limit.
    pub(crate) fn find_loop(
        &self,
        who: &Attribution,
        route: &str,
        answer: impl FnOnce() -> Option<String>,
        usage: Option<Usage>,
    ) -> Option<LoopStop> {
        let task = who.task.as_deref()?;
        let agent = who.agent.as_str();
        let limits = self.agents.loop_guard(agent)?;
        let found = answer().and_then(|answer| self.loops.observe(task, &answer, &limits));
        if let Some(found) = found {
            return Some(match found.with {
                Some(other) => LoopStop {
                    reason: format!(
                        "keel detected a loop in task {task:?}: it and task {other:?} keep passing the same content back and forth ({} near-identical answers in the last minute)",
                        found.similar
                    ),
                    data: json!({"kind": "bouncing", "agent": agent, "route": route,
                        "similar": found.similar, "task": task, "other_task": other}),
                    task: task.to_owned(),
                    other: Some(other),
                },
                None => LoopStop {
                    reason: format!(
                        "keel detected a loop in task {task:?}: {} of its last {} model answers are near-identical",
                        found.similar, found.window
                    ),
                    data: json!({"kind": "repeated_output", "agent": agent, "route": route,
                        "similar": found.similar, "window": found.window, "task": task}),
                    task: task.to_owned(),
                    other: None,
                },
            });
        }
        let limit = self.agents.burn_limit(agent)?;
        let burnt = self
            .loops
            .burn(task, usage?.total(), std::time::Instant::now(), limit)?;
        Some(LoopStop {
            reason: format!(
                "keel detected a loop in task {task:?}: it burnt {burnt} tokens in the last minute, over its agent's limit of {limit}"
            ),
            data: json!({"kind": "token_burn", "agent": agent, "route": route,
                "tokens_last_minute": burnt, "limit": limit, "task": task}),
            task: task.to_owned(),
            other: None,
        })
    }

    /// Stops the task of `stop` (and the other end of a bounce): each is handed to a
    /// person, and its further model calls are refused until that person lets it go on.
    pub(crate) async fn stop_loop(&self, stop: LoopStop) {
        self.count_loop(&stop.data);
        let mut context = stop.data;
        context["loop"] = context["kind"].take();
        context["kind"] = json!(crate::tools::LoopHandoff::KIND);
        for task in stop.other.iter().chain([&stop.task]) {
            let release = self
                .hand_off(task, stop.reason.clone(), context.clone())
                .await;
            self.loops.stop(
                task,
                Stopped {
                    reason: stop.reason.clone(),
                    release,
                },
            );
        }
    }

    /// Hands `task` to a person with `reason` and `context` (the loop guard's directive
    /// `handoff`): what lets it go on, the person deciding on the approval, or else time,
    /// [`PAUSE`] from now, when there is no queue or the supervisor refused (a task it does
    /// not know, or one that cannot wait for a person now).
    pub(crate) async fn hand_off(&self, task: &str, reason: String, context: Value) -> Release {
        let at = std::time::Instant::now() + PAUSE;
        let Some(queue) = self.approvals.as_ref() else {
            return Release::At {
                at,
                why: "this keel has no approval queue".to_owned(),
            };
        };
        match queue
            .handoff(task, reason, context, keel_config::DEFAULT_APPROVAL_TIMEOUT)
            .await
        {
            Ok(id) => Release::Person(id),
            Err(e) => {
                tracing::debug!(task, error = %e.message, "a looping task was not handed off");
                let why = if e.status == StatusCode::NOT_FOUND {
                    "there is no supervisor task by that name".to_owned()
                } else {
                    format!("the supervisor refused: {}", e.message)
                };
                Release::At { at, why }
            }
        }
    }

    /// Stops `task` again from what the supervisor says of it: a loop handoff still waiting
    /// for a person, which this process has no stop for (it started after the loop was
    /// found). [`Gateway::refuse_if_looping`] then refuses or, once the person approved,
    /// releases it, as for a stop made here.
    pub(crate) fn restore_loop_stop(&self, task: &str, facts: &crate::tools::TaskFacts) {
        let Some(handoff) = &facts.loop_handoff else {
            return;
        };
        // A pause keel set itself gives way to the person's handoff (made by another node,
        // or for a loop of tool calls).
        let decided_by_person = self
            .loops
            .stopped(task)
            .is_some_and(|s| s.decided_by_person());
        if !decided_by_person {
            self.loops.stop(
                task,
                Stopped {
                    reason: handoff.reason.clone(),
                    release: Release::Person(handoff.approval.clone()),
                },
            );
        }
    }

    /// `Err` when `task` was stopped as looping and no person has let it go on since.
    pub(crate) async fn refuse_if_looping(&self, task: &str) -> Result<(), ApiError> {
        let Some(stopped) = self.loops.stopped(task) else {
            return Ok(());
        };
        if let Release::Person(id) = &stopped.release {
            let log = self
                .task_log(task)
                .await
                .map_err(|e| ApiError::unavailable(format!("cannot read the task's log: {e}")))?;
            // Decided either way, the person's decision stands: approved, the task goes on;
            // denied, it is in the DLQ, and an operator who requeues it starts it afresh.
            if crate::tools::decided(&log, id) {
                self.loops.release(task);
                return Ok(());
            }
        }
        let next = match &stopped.release {
            Release::Person(id) => format!(
                "it waits for a person (handoff {id}: `keel approvals ls`, `keel approvals approve {id}` to let it go on)"
            ),
            Release::At { at, why } => {
                let left = at
                    .saturating_duration_since(std::time::Instant::now())
                    .as_secs()
                    + 1;
                format!("no person can let it go on ({why}), so they go on in {left}s")
            }
        };
        Err(ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            format!(
                "{}; its further model calls are refused and {next}",
                stopped.reason
            ),
        )
        .with_code("loop_detected"))
    }
}
