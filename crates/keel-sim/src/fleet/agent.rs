//! One simulated agent: a real keel worker over loopback HTTP.
//!
//! It claims a task, resumes from the task's checkpoint, makes the script's model
//! calls through keel's gateway (with `x-keel-task`), records a step and saves a
//! checkpoint after each, heartbeats while it works, and completes the task (or
//! fails it: retryably when a model call failed, for good when the goal turns out
//! infeasible). It knows nothing of the faults and does the same with policies on
//! or off. Like any worker, it waits out a keel that cannot be reached, and retries
//! supervisor calls with the same `Idempotency-Key`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::inject::{FleetInjector, call_message, kind};
use super::script::{Draws, TaskScript, Trap};

/// What every agent of a run shares.
#[derive(Debug)]
pub(crate) struct Crew {
    pub(crate) client: reqwest::Client,
    /// keel's base URL, e.g. `http://127.0.0.1:8420`.
    pub(crate) base: String,
    /// The route the agents ask for as `model`.
    pub(crate) route: String,
    /// The keel agent name the tasks belong to.
    pub(crate) agent: String,
    pub(crate) lease: Duration,
    pub(crate) think: Duration,
    pub(crate) call_timeout: Duration,
    pub(crate) seed: u64,
    pub(crate) killed_share: f64,
    pub(crate) scripts: Arc<[TaskScript]>,
    pub(crate) injector: Arc<FleetInjector>,
    /// Prefix of the run's task ids.
    pub(crate) id_prefix: String,
    /// The admin token for listing tasks, when keel has one.
    pub(crate) admin_token: Option<String>,
    /// Cancelled once the run has drained: idle agents go home.
    pub(crate) drained: CancellationToken,
    /// Cancelled to stop everything at once (the run's deadline).
    pub(crate) abort: CancellationToken,
    pub(crate) tally: Tally,
}

/// Counters the progress display reads.
#[derive(Debug, Default)]
pub struct Tally {
    /// Tasks this run's agents completed.
    pub completed: AtomicU64,
    /// Tasks this run's agents failed (retryably or not).
    pub failed: AtomicU64,
    /// Model calls that answered well.
    pub calls_ok: AtomicU64,
    /// Model calls that did not.
    pub calls_failed: AtomicU64,
    /// Risky actions the tool carried out (keel did not stop them).
    pub risky_done: AtomicU64,
}

/// The tool fleet agents act through, and the amounts they use.
pub const ACT_TOOL: &str = "act";
/// An ordinary action's amount.
pub const USUAL_AMOUNT: u64 = 20;
/// A risky action's amount: far above the usual.
pub const RISKY_AMOUNT: u64 = 5_000;
/// The capability an infeasible task needs and no agent has: a pre-flight rule over the
/// task's `needs` can refuse the task before it burns tokens.
pub const MISSING_TOOL: &str = "teleport";
/// How often a loop-prone task repeats its action if nothing stops it.
pub const LOOP_REPEATS: u32 = 10;

/// Why a piece of work stopped early.
pub(crate) enum Stop {
    /// The run is being aborted.
    Abort,
    /// keel said the lease is gone (expired and given to someone else).
    LeaseLost,
    /// keel refused the call for another reason (logged).
    Refused,
}

/// Tries of a supervisor call that keel answers with 5xx or 429.
const MAX_REFUSALS: u32 = 10;

/// First and longest wait between claims that found nothing.
const IDLE_POLL: Duration = Duration::from_millis(50);
const MAX_IDLE_POLL: Duration = Duration::from_secs(1);

/// Runs agent `n` until the run drains or aborts.
pub(crate) async fn run(crew: Arc<Crew>, n: u32) {
    let mut life = 0u32;
    let mut claims = 0u64;
    // Nothing to claim: poll again after 50 ms, doubling up to 1 s, as a worker
    // that does not want to hammer its queue would.
    let mut idle = IDLE_POLL;
    loop {
        if crew.abort.is_cancelled() {
            return;
        }
        let worker = format!("agent-{n}.{life}");
        let key = format!("claim-{worker}-{claims}");
        let body = json!({"agent": crew.agent, "worker": worker, "lease": format!("{}ms", crew.lease.as_millis())});
        let Ok((status, task)) = crew
            .supervisor(Method::POST, "/v1/tasks/claim", Some(&body), Some(&key))
            .await
        else {
            return;
        };
        match status {
            StatusCode::OK => {
                claims += 1;
                idle = IDLE_POLL;
                if crew.work(task).await {
                    // This agent died mid-task; a fresh one takes its place.
                    life += 1;
                    claims = 0;
                    pause(&crew.abort, Duration::from_millis(100)).await;
                }
            }
            StatusCode::NO_CONTENT => {
                if crew.drained.is_cancelled() {
                    return;
                }
                pause(&crew.abort, idle).await;
                idle = (idle * 2).min(MAX_IDLE_POLL);
            }
            other => {
                tracing::warn!(%other, %task, "claim refused");
                pause(&crew.abort, Duration::from_millis(500)).await;
            }
        }
    }
}

/// Sleeps `d` unless `abort` fires first.
async fn pause(abort: &CancellationToken, d: Duration) {
    tokio::select! {
        () = abort.cancelled() => {}
        () = tokio::time::sleep(d) => {}
    }
}

// === impl Crew ===

impl Crew {
    /// Works one claimed task; returns true when the agent died doing it.
    async fn work(&self, task: Value) -> bool {
        let (Some(id), Some(token)) = (task["id"].as_str(), task["lease_token"].as_str()) else {
            tracing::warn!(%task, "claim answer without id or lease_token");
            return false;
        };
        let Some(script) = task["input"]["index"]
            .as_u64()
            .and_then(|i| self.scripts.get(usize::try_from(i).ok()?))
        else {
            tracing::warn!(%task, "task without a known script index");
            return false;
        };
        let attempts = task["attempts"].as_u64().unwrap_or(1);
        let resume = task["checkpoint"]["state"]["done_calls"]
            .as_u64()
            .and_then(|d| u32::try_from(d).ok())
            .unwrap_or(0);
        let salt = u64::from(script.index) << 8 | attempts.min(255);
        let dies_after = (Draws::new(self.seed ^ 0x4B49_4C4C, salt).unit() < self.killed_share)
            .then(|| (script.calls / 2).max(resume));
        let lost = CancellationToken::new();
        let beat = self.heartbeat(id, token, &lost);
        let work = self.calls(id, token, script, resume, dies_after, &lost);
        let died = tokio::select! {
            died = work => died,
            () = beat => false,
        };
        if died {
            self.injector.count(kind::AGENT_KILLED);
        }
        died
    }

    /// The task's calls from `resume` on, then its end; true when the agent died.
    async fn calls(
        &self,
        id: &str,
        token: &str,
        script: &TaskScript,
        resume: u32,
        dies_after: Option<u32>,
        lost: &CancellationToken,
    ) -> bool {
        for call in resume..script.calls {
            if dies_after == Some(call) {
                return true;
            }
            if lost.is_cancelled() {
                return false;
            }
            let answer = self.model_call(id, script, call).await;
            if let Err(why) = answer {
                self.tally.calls_failed.fetch_add(1, Ordering::Relaxed);
                let body =
                    json!({"lease_token": token, "error": {"message": why}, "retryable": true});
                if self.end(id, "fail", &body, token).await.is_ok() {
                    self.tally.failed.fetch_add(1, Ordering::Relaxed);
                }
                return false;
            }
            self.tally.calls_ok.fetch_add(1, Ordering::Relaxed);
            // Halfway through, the task acts through its tool; its trap shapes how.
            if call == script.calls / 2 {
                self.act(id, script).await;
            }
            let done = call + 1;
            let step = json!({"lease_token": token, "kind": "model_call", "summary": format!("call {done} of {}", script.calls), "progress": f64::from(done) / f64::from(script.calls)});
            match self
                .task_call(id, "steps", &step, &format!("{token}-step-{done}"))
                .await
            {
                Ok((StatusCode::OK, a)) if a["directive"] == "continue" => {}
                _ => return false,
            }
            let checkpoint = json!({"lease_token": token, "label": format!("after call {done}"), "state": {"done_calls": done}});
            match self
                .task_call(
                    id,
                    "checkpoints",
                    &checkpoint,
                    &format!("{token}-ckpt-{done}"),
                )
                .await
            {
                Ok((StatusCode::OK, _)) => {}
                _ => return false,
            }
            let think = self.think.mul_f64(
                0.5 + Draws::new(self.seed, u64::from(script.index) << 16 | u64::from(call)).unit(),
            );
            pause(&self.abort, think).await;
        }
        if dies_after == Some(script.calls) {
            return true;
        }
        let (verb, body) = if script.feasible() {
            (
                "complete",
                json!({"lease_token": token, "output": {"calls": script.calls}}),
            )
        } else {
            (
                "fail",
                json!({"lease_token": token, "error": {"message": "the goal cannot be met"}, "retryable": false}),
            )
        };
        if self.end(id, verb, &body, token).await.is_ok() {
            let counter = if verb == "complete" {
                &self.tally.completed
            } else {
                &self.tally.failed
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        false
    }

    /// The task's action through keel's tool gateway (`act`): an ordinary one; for a
    /// risky task an amount far above the usual; for a loop-prone task the same call
    /// over and over until keel refuses. A refused action is skipped, as a careful
    /// agent would; the task goes on.
    async fn act(&self, id: &str, script: &TaskScript) {
        let (amount, repeats) = match script.trap {
            Some(Trap::RiskyAction) => (RISKY_AMOUNT, 1),
            Some(Trap::LoopProne) => (USUAL_AMOUNT, LOOP_REPEATS),
            Some(Trap::Infeasible) | None => (USUAL_AMOUNT, 1),
        };
        for _ in 0..repeats {
            let body = json!({"task": id, "args": {"amount": amount, "order": script.index}});
            let sent = self
                .client
                .post(format!("{}/v1/tools/{ACT_TOOL}/invoke", self.base))
                .header("x-keel-agent", &self.agent)
                .timeout(self.call_timeout)
                .json(&body)
                .send()
                .await;
            match sent.map(|r| r.status()) {
                Ok(StatusCode::OK) => {
                    if amount == RISKY_AMOUNT {
                        self.tally.risky_done.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // Blocked by a guard (or no such tool on this keel): move on.
                Ok(_) | Err(_) => return,
            }
        }
    }

    /// `complete` or `fail`; `Ok` only when keel took it.
    async fn end(&self, id: &str, verb: &str, body: &Value, token: &str) -> Result<(), Stop> {
        match self
            .task_call(id, verb, body, &format!("{token}-{verb}"))
            .await?
        {
            (status, _) if status.is_success() => Ok(()),
            _ => Err(Stop::Refused),
        }
    }

    /// Heartbeats every third of the lease until the lease is lost (then cancels
    /// `lost` and returns) or the run aborts.
    async fn heartbeat(&self, id: &str, token: &str, lost: &CancellationToken) {
        let every = self.lease / 3;
        let body = json!({"lease_token": token});
        loop {
            pause(&self.abort, every).await;
            if self.abort.is_cancelled() {
                return;
            }
            match self
                .supervisor(
                    Method::POST,
                    &format!("/v1/tasks/{id}/heartbeat"),
                    Some(&body),
                    None,
                )
                .await
            {
                Ok((StatusCode::OK, _)) => {}
                Ok((StatusCode::CONFLICT | StatusCode::GONE | StatusCode::NOT_FOUND, _))
                | Err(_) => {
                    lost.cancel();
                    // Park: the work future notices `lost` and ends the select.
                    std::future::pending::<()>().await;
                }
                Ok(_) => {}
            }
        }
    }

    /// A POST to `/v1/tasks/{id}/{verb}` with an idempotency key.
    async fn task_call(
        &self,
        id: &str,
        verb: &str,
        body: &Value,
        key: &str,
    ) -> Result<(StatusCode, Value), Stop> {
        let (status, answer) = self
            .supervisor(
                Method::POST,
                &format!("/v1/tasks/{id}/{verb}"),
                Some(body),
                Some(key),
            )
            .await?;
        if status == StatusCode::CONFLICT {
            return Err(Stop::LeaseLost);
        }
        if !status.is_success() {
            tracing::warn!(%status, %answer, id, verb, "keel refused a worker call");
        }
        Ok((status, answer))
    }

    /// One supervisor call, retried while keel cannot be reached (it may be
    /// restarting) and, up to [`MAX_REFUSALS`] times, while it answers 5xx or 429.
    pub(crate) async fn supervisor(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        key: Option<&str>,
    ) -> Result<(StatusCode, Value), Stop> {
        let mut wait = Duration::from_millis(50);
        let mut refusals = 0u32;
        loop {
            let mut request = self
                .client
                .request(method.clone(), format!("{}{path}", self.base))
                .timeout(Duration::from_secs(10));
            if let Some(body) = body {
                request = request.json(body);
            }
            if let Some(key) = key {
                request = request.header("idempotency-key", key);
            }
            let sent = tokio::select! {
                () = self.abort.cancelled() => return Err(Stop::Abort),
                sent = request.send() => sent,
            };
            match sent {
                Ok(response) => {
                    let status = response.status();
                    let bytes = response.bytes().await.unwrap_or_default();
                    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                    // A server error or a 429 is worth another try with the same
                    // Idempotency-Key (a repeat never does the work twice), for a while.
                    let transient =
                        status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS;
                    refusals += u32::from(transient);
                    if !transient || refusals > MAX_REFUSALS {
                        return Ok((status, value));
                    }
                    tracing::debug!(%status, path, "keel refused for now; trying again");
                }
                Err(e) => tracing::trace!(error = %e, path, "keel unreachable; waiting"),
            }
            pause(&self.abort, wait).await;
            wait = (wait * 2).min(Duration::from_secs(1));
        }
    }

    /// Call `call` of the task through keel's gateway; `Err` says why it failed.
    async fn model_call(&self, id: &str, script: &TaskScript, call: u32) -> Result<(), String> {
        let stream = script.is_streamed(call);
        let mut body = json!({
            "model": self.route,
            "messages": [
                {"role": "system", "content": "You are one agent of a simulated fleet."},
                {"role": "user", "content": call_message(script.index, call)},
            ],
        });
        if stream {
            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
        }
        let mut wait = Duration::from_millis(200);
        loop {
            let request = self
                .client
                .post(format!("{}/v1/chat/completions", self.base))
                .header("x-keel-task", id)
                .header("x-keel-agent", &self.agent)
                .header("x-keel-step", format!("call-{call}"))
                .timeout(self.call_timeout)
                .json(&body);
            let sent = tokio::select! {
                () = self.abort.cancelled() => return Err("aborted".to_owned()),
                sent = request.send() => sent,
            };
            let response = match sent {
                Ok(r) => r,
                // keel is not there (restarting): wait for it, as an SDK would.
                Err(e) if e.is_connect() => {
                    pause(&self.abort, wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                    continue;
                }
                Err(e) => return Err(format!("model call failed: {e}")),
            };
            let status = response.status();
            let degraded = response
                .headers()
                .get("x-keel-degraded")
                .is_some_and(|v| v == "true");
            let text = response
                .bytes()
                .await
                .map_err(|e| format!("model answer cut: {e}"))?;
            if !status.is_success() {
                return Err(format!("model call answered {status}"));
            }
            if degraded {
                return Err("keel served its degraded reply".to_owned());
            }
            return if stream {
                check_stream(&text)
            } else {
                serde_json::from_slice::<Value>(&text)
                    .ok()
                    .filter(|v| v["choices"][0]["message"].is_object())
                    .map(|_| ())
                    .ok_or_else(|| "model answer is not a chat completion".to_owned())
            };
        }
    }
}

/// A streamed answer is whole when it ends with `[DONE]` and carries no error event.
fn check_stream(body: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(body);
    let mut done = false;
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data:") else {
            continue;
        };
        let data = data.trim();
        if data == "[DONE]" {
            done = true;
        } else if serde_json::from_str::<Value>(data).map_or(true, |v| v.get("error").is_some()) {
            return Err(format!("stream carried an error: {data}"));
        }
    }
    if done {
        Ok(())
    } else {
        Err("stream ended without [DONE]".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::check_stream;

    #[test]
    fn a_whole_stream_passes() {
        let body = b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n";
        assert!(check_stream(body).is_ok());
    }

    #[test]
    fn a_cut_stream_or_an_error_event_fails() {
        assert!(check_stream(b"data: {\"choices\":[]}\n\n").is_err());
        let body = b"data: {\"error\":{\"message\":\"upstream cut\"}}\n\ndata: [DONE]\n\n";
        assert!(check_stream(body).is_err());
    }
}
