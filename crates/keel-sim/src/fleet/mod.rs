//! The fleet driver behind `keel sim` and `keel demo`: N simulated agents working
//! generated tasks through a real keel over loopback HTTP.
//!
//! This module knows keel only by its HTTP API (the worker protocol and the
//! OpenAI-compatible gateway). Starting keel, killing it, and reading its store for
//! the report are the caller's business; [`run`] creates the tasks, runs the agents
//! until every task has reached a final state (or the drain deadline passes), and
//! says which task ids keel acknowledged.
//!
//! - [`script`]: task scripts from a seed.
//! - [`mix`]: fault mixes (`sim/faults/*.toml`).
//! - [`inject`]: the mix as a fault policy of the simulated model server.
//! - [`report`]: the figures of a run and their `report.md`, `report.json` and plot.

mod agent;
pub mod inject;
pub mod mix;
pub mod report;
pub mod script;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use agent::{ACT_TOOL, LOOP_REPEATS, MISSING_TOOL, RISKY_AMOUNT, Tally, USUAL_AMOUNT};
pub use inject::FleetInjector;
pub use mix::FaultMix;
pub use script::{TaskScript, Trap};

/// How a run is driven.
#[derive(Debug, Clone)]
pub struct FleetSettings {
    /// keel's base URL, e.g. `http://127.0.0.1:8420`.
    pub keel_url: String,
    /// Agents working at once.
    pub agents: u32,
    /// The route agents send as `model`.
    pub route: String,
    /// The keel agent name the tasks belong to.
    pub agent: String,
    /// Seed of the task scripts and of the agents' deaths and think times.
    pub seed: u64,
    /// Lease each claim asks for; agents heartbeat every third of it.
    pub lease: Duration,
    /// Mean pause between an agent's model calls (its "tool work"), ±50%.
    pub think: Duration,
    /// The agents' own client timeout for one model call.
    pub call_timeout: Duration,
    /// Share of claims after which the agent dies mid-task.
    pub killed_share: f64,
    /// How long to wait, once every task is created, for all of them to end.
    pub drain_timeout: Duration,
    /// Task ids are `<id_prefix>-<index>`; a keel that keeps earlier runs needs a
    /// prefix of its own per run.
    pub id_prefix: String,
    /// The agent's key, sent as `Authorization: Bearer` on worker and model calls
    /// (when the keel has `[agents.*] keys_env`).
    pub agent_key: Option<String>,
    /// The admin token, for listing tasks (when the keel has `admin_token_env`).
    pub admin_token: Option<String>,
}

/// A task keel acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    /// keel's task id.
    pub id: String,
    /// The script index.
    pub index: u32,
}

/// A task keel refused when it was created (its pre-flight check).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The script index.
    pub index: u32,
    /// keel's reason.
    pub reason: String,
}

/// What creating one task came to.
enum Made {
    Created(Created),
    Refused(Refused),
}

/// What the driver saw.
#[derive(Debug)]
pub struct FleetRun {
    /// Tasks keel acknowledged, in script order.
    pub created: Vec<Created>,
    /// Tasks keel refused at creation (pre-flight), in script order.
    pub refused: Vec<Refused>,
    /// Whether every task reached a final state before the drain deadline.
    pub drained: bool,
    /// From the first create to the end of the drain.
    pub wall: Duration,
}

/// A snapshot for a progress display.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Tasks created so far.
    pub created: u64,
    /// Tasks the agents completed.
    pub completed: u64,
    /// Tasks the agents failed (each failure of a retried task counts).
    pub failed: u64,
    /// Model calls answered well / not.
    pub calls_ok: u64,
    /// Model calls that failed.
    pub calls_failed: u64,
}

/// Errors that stop a run.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// keel refused to create a task.
    #[error("keel refused to create task {index}: {status} {body}")]
    Create {
        /// Script index.
        index: u32,
        /// HTTP status.
        status: u16,
        /// keel's answer.
        body: String,
    },
    /// keel did not answer a create for too long.
    #[error("keel did not take task {index} for {waited:?}: it is not answering")]
    Unreachable {
        /// Script index.
        index: u32,
        /// How long the driver tried.
        waited: Duration,
    },
    /// A key or token that cannot be an HTTP header.
    #[error("the agent key or admin token is not a valid header value")]
    BadKey,
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// Creates a task for every script, runs `settings.agents` agents until all tasks end
/// (or the drain deadline passes), and reports progress to `on_progress` twice a
/// second. Faults of the model server come from `injector`, which must be installed
/// in the simulated server keel routes to.
pub async fn run(
    settings: &FleetSettings,
    scripts: Arc<[TaskScript]>,
    injector: Arc<FleetInjector>,
    on_progress: &(dyn Fn(Progress) + Sync),
) -> Result<FleetRun, FleetError> {
    let started = Instant::now();
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(key) = settings
        .agent_key
        .as_ref()
        .or(settings.admin_token.as_ref())
    {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
            .map_err(|_| FleetError::BadKey)?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let client = reqwest::Client::builder()
        .default_headers(headers)
        .pool_max_idle_per_host(usize::try_from(settings.agents).unwrap_or(usize::MAX) + 16)
        .tcp_nodelay(true)
        .build()?;
    let crew = Arc::new(agent::Crew {
        client: client.clone(),
        base: settings.keel_url.trim_end_matches('/').to_owned(),
        route: settings.route.clone(),
        agent: settings.agent.clone(),
        lease: settings.lease,
        think: settings.think,
        call_timeout: settings.call_timeout,
        seed: settings.seed,
        killed_share: settings.killed_share,
        scripts: Arc::clone(&scripts),
        injector,
        id_prefix: settings.id_prefix.clone(),
        admin_token: settings.admin_token.clone(),
        drained: CancellationToken::new(),
        abort: CancellationToken::new(),
        tally: Tally::default(),
    });
    let agents = TaskTracker::new();
    for n in 0..settings.agents {
        agents.spawn(agent::run(Arc::clone(&crew), n));
    }
    agents.close();
    let created_count = std::sync::atomic::AtomicU64::new(0);
    let progress = || Progress {
        created: created_count.load(Ordering::Relaxed),
        completed: crew.tally.completed.load(Ordering::Relaxed),
        failed: crew.tally.failed.load(Ordering::Relaxed),
        calls_ok: crew.tally.calls_ok.load(Ordering::Relaxed),
        calls_failed: crew.tally.calls_failed.load(Ordering::Relaxed),
    };
    let create = async {
        let results: Vec<Result<Made, FleetError>> =
            futures::stream::iter(scripts.iter().map(|s| {
                let crew = &crew;
                let count = &created_count;
                async move {
                    let created = create_task(crew, s).await;
                    count.fetch_add(1, Ordering::Relaxed);
                    created
                }
            }))
            .buffered(16)
            .collect()
            .await;
        let (mut created, mut refused) = (Vec::new(), Vec::new());
        for made in results {
            match made? {
                Made::Created(c) => created.push(c),
                Made::Refused(r) => refused.push(r),
            }
        }
        Ok::<_, FleetError>((created, refused))
    };
    let deadline_after = settings.drain_timeout;
    let main = async {
        let (created, refused) = create.await?;
        let ours: HashSet<String> = created.iter().map(|c| c.id.clone()).collect();
        let deadline = Instant::now() + deadline_after;
        loop {
            // The cheap check first; then every created task must be seen in a
            // final state (final states are for good), so a task moving between
            // queued and running between two reads cannot end the drain early.
            if open_tasks(&crew, &ours).await == Some(0) && all_final(&crew, &ours).await {
                return Ok((created, refused, true));
            }
            if Instant::now() >= deadline {
                return Ok((created, refused, false));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    tokio::pin!(main);
    let outcome: Result<(Vec<Created>, Vec<Refused>, bool), FleetError> = loop {
        tokio::select! {
            outcome = &mut main => break outcome,
            () = tokio::time::sleep(Duration::from_millis(500)) => on_progress(progress()),
        }
    };
    let (created, refused, drained) = match outcome {
        Ok(o) => o,
        Err(e) => {
            crew.abort.cancel();
            agents.wait().await;
            return Err(e);
        }
    };
    crew.drained.cancel();
    if !drained {
        crew.abort.cancel();
    }
    agents.wait().await;
    on_progress(progress());
    Ok(FleetRun {
        created,
        refused,
        drained,
        wall: started.elapsed(),
    })
}

/// How long creating one task may take, keel unreachable or refusing included (a
/// restart takes well under a second).
const CREATE_PATIENCE: Duration = Duration::from_secs(60);

/// Creates the task of `script` (retried while keel cannot be reached). Its input names
/// what it needs: `act`, and for an infeasible task [`agent::MISSING_TOOL`] too. A refusal
/// by keel's pre-flight check (422 `preflight_failed`) is an outcome, not an error.
async fn create_task(crew: &agent::Crew, script: &TaskScript) -> Result<Made, FleetError> {
    let index = script.index;
    let id = format!("{}-{index:06}", crew.id_prefix);
    let needs: Vec<&str> = if script.feasible() {
        vec![ACT_TOOL]
    } else {
        vec![ACT_TOOL, agent::MISSING_TOOL]
    };
    let body = json!({"agent": crew.agent, "id": id, "input": {"index": index, "needs": needs}});
    let key = format!("create-{}-{}-{index}", crew.id_prefix, crew.seed);
    let call = crew.supervisor(reqwest::Method::POST, "/v1/tasks", Some(&body), Some(&key));
    let unreachable = FleetError::Unreachable {
        index,
        waited: CREATE_PATIENCE,
    };
    match tokio::time::timeout(CREATE_PATIENCE, call).await {
        Ok(Ok((status, answer))) if status.is_success() => {
            let id = answer["id"].as_str().unwrap_or(&id).to_owned();
            Ok(Made::Created(Created { id, index }))
        }
        Ok(Ok((status, answer)))
            if status == reqwest::StatusCode::UNPROCESSABLE_ENTITY
                && answer["error"]["code"] == "preflight_failed" =>
        {
            Ok(Made::Refused(Refused {
                index,
                reason: answer["error"]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            }))
        }
        Ok(Ok((status, answer))) => Err(FleetError::Create {
            index,
            status: status.as_u16(),
            body: answer.to_string(),
        }),
        // Aborted, or keel did not answer in time.
        Ok(Err(_)) | Err(_) => Err(unreachable),
    }
}

/// Whether keel holds every task in `ours` in a final state (tasks of the same agent
/// from other runs are ignored).
async fn all_final(crew: &agent::Crew, ours: &HashSet<String>) -> bool {
    let Some(tasks) = list(crew, None, PAGE).await else {
        return false;
    };
    let mut seen = 0;
    for task in &tasks {
        if !task["id"].as_str().is_some_and(|id| ours.contains(id)) {
            continue;
        }
        if !FINAL.contains(&task["state"].as_str().unwrap_or_default()) {
            return false;
        }
        seen += 1;
    }
    seen == ours.len()
}

/// Whether any of `ours` is still queued or running (`Some(0)`: none), or `None`
/// when keel cannot tell. One task per state is asked for first; the whole list
/// only when that one is another run's.
async fn open_tasks(crew: &agent::Crew, ours: &HashSet<String>) -> Option<usize> {
    let is_ours = |t: &Value| t["id"].as_str().is_some_and(|id| ours.contains(id));
    let mut open = 0;
    for state in ["queued", "running"] {
        let first = list(crew, Some(state), 1).await?;
        open += match first.first() {
            None => 0,
            Some(task) if is_ours(task) => 1,
            Some(_) => list(crew, Some(state), PAGE)
                .await?
                .iter()
                .filter(|t| is_ours(t))
                .count(),
        };
    }
    Some(open)
}

/// Every task of the run's agent (in `state`, if given), page by page.
/// With `limit` below [`PAGE`], only the first `limit`.
async fn list(crew: &agent::Crew, state: Option<&str>, limit: usize) -> Option<Vec<Value>> {
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{}/v1/tasks?agent={}&limit={limit}", crew.base, crew.agent);
        if let Some(state) = state {
            url.push_str("&state=");
            url.push_str(state);
        }
        if let Some(c) = &cursor {
            url.push_str("&cursor=");
            url.push_str(c);
        }
        let mut request = crew.client.get(url).timeout(Duration::from_secs(10));
        if let Some(token) = &crew.admin_token {
            request = request.bearer_auth(token);
        }
        let page: Value = request.send().await.ok()?.json().await.ok()?;
        let tasks = page["tasks"].as_array()?;
        all.extend(tasks.iter().cloned());
        match page["next"].as_str() {
            Some(next) if !tasks.is_empty() && limit >= PAGE => cursor = Some(next.to_owned()),
            _ => return Some(all),
        }
    }
}

/// Task states a task never leaves.
const FINAL: [&str; 4] = ["succeeded", "dead", "awaiting_human", "cancelled"];

/// Tasks per page when listing (keel's largest page).
const PAGE: usize = 1000;
