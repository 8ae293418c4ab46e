//! keel's OpenAI-compatible gateway.
//!
//! A client's `model` names a *route*; a route is an ordered chain of *targets*
//! (provider + model). [`Gateway::build`] turns validated settings into live
//! routes, providers, breakers and budgets; [`router`] serves them over HTTP.
//! The policies themselves are pure state machines from `keel-policy`; this
//! crate does the I/O around them ([`route`]) and records events and metrics.

pub mod agents;
pub mod body;
mod body_deadline;
pub mod chaos;
pub mod error;
mod finish;
pub mod guard;
mod http;
mod looping;
pub mod metrics;
pub mod output;
pub mod payload;
pub mod provider;
mod pump;
pub mod route;
pub mod stream_attempt;
pub mod tools;
mod transitions;
pub mod usage;

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use keel_config::{ProviderKind, Settings};
use keel_policy::Clock;
use keel_policy::breaker::Breaker;
use keel_policy::clock::SystemClock;
use keel_store::EventStore;
use parking_lot::Mutex;
use tokio_util::task::TaskTracker;

pub use http::{router, with_body_rules};

/// The store key of an agent's saved budget windows.
fn budget_key(agent: &str) -> String {
    format!("budget/{agent}")
}

use crate::agents::Agents;
use crate::chaos::Chaos;
use crate::metrics::{Metrics, TargetLabel};
use crate::provider::Provider;
use crate::provider::anthropic::AnthropicProvider;
use crate::provider::openai::OpenAiProvider;
use crate::route::{Route, Target};

/// Everything the gateway needs at run time, built once from settings.
pub struct Gateway {
    routes: BTreeMap<String, Route>,
    agents: Agents,
    metrics: Arc<Metrics>,
    store: Arc<dyn EventStore>,
    clock: Arc<dyn Clock>,
    tasks: TaskTracker,
    max_body_bytes: usize,
    /// `server.body_timeout`: how long a request body may take to arrive.
    body_timeout: std::time::Duration,
    record_payloads: bool,
    chaos: Option<Chaos>,
    tools: tools::Tools,
    approvals: Option<Arc<dyn tools::ApprovalQueue>>,
    loops: guard::loops::LoopGuard,
    /// Per agent: the tools its tasks need and its compiled `preflight` rules.
    preflights: HashMap<String, Preflight>,
    /// Task → its owning agent and deadline as the supervisor said, and when it said so.
    owners: Mutex<HashMap<String, (tools::TaskFacts, std::time::Instant)>>,
    /// This node's id (see [`Gateway::node`]).
    node: String,
    /// Counts the calls in progress for the store's writer ([`Gateway::with_upcoming`]).
    upcoming: keel_store::Upcoming,
    /// Where model targets' breaker transitions are appended, in order.
    transitions: transitions::TransitionLog,
}

/// Owners remembered at once; the cache starts afresh beyond this.
const MAX_OWNERS: usize = 100_000;

/// How long what the supervisor said of a task is trusted: its agent never changes, but an
/// operator's requeue may give it a new deadline.
const TASK_FACTS_FRESH: std::time::Duration = std::time::Duration::from_secs(1);

/// What a task of one agent needs before it may be created.
struct Preflight {
    tools: Vec<String>,
    rules: Vec<(String, cel::Program)>,
}

/// Why the gateway could not be built from settings.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A provider's client could not be constructed.
    #[error("{0}")]
    Provider(String),
    /// An agent's `preflight` rule that does not compile (config check catches it first).
    #[error("{0}")]
    Preflight(String),
    /// A tool that cannot be built.
    #[error(transparent)]
    Tool(#[from] tools::ToolBuildError),
}

impl Gateway {
    /// Builds routes, provider clients, breakers and budgets from `settings`.
    ///
    /// Targets with the same `provider/model` share one breaker across routes; its
    /// settings are those of the first route (in name order) that uses the target.
    /// `tasks` tracks background work (stream pumps) so shutdown can wait for it.
    /// `metrics` is served at `/metrics`, with whatever else was registered in it.
    /// `tools` is `[tools.*]` already built ([`tools::Tools::build`]), so that a tool that
    /// cannot run stops keel before anything else starts.
    pub fn build(
        settings: &Settings,
        tools: tools::Tools,
        store: Arc<dyn EventStore>,
        tasks: TaskTracker,
        metrics: Metrics,
    ) -> Result<Self, BuildError> {
        let metrics = Arc::new(metrics);
        // The connect timeout is a setting of a provider's client, so each route's own
        // timeout gets a client of its own (routes with the same timeout share one). One
        // breaker per target, whichever routes reach it: the config refuses routes that
        // share a target with different breaker settings, so the first route's are every
        // route's.
        let mut providers: HashMap<(String, std::time::Duration), Arc<dyn Provider>> =
            HashMap::new();
        let mut breakers: HashMap<String, Arc<Mutex<Breaker>>> = HashMap::new();
        let mut routes = BTreeMap::new();
        for (name, r) in &settings.routes {
            let mut chain = Vec::with_capacity(r.targets.len());
            for t in &r.targets {
                let id = t.id();
                let provider = match providers.entry((t.provider.clone(), r.timeouts.connect)) {
                    Entry::Occupied(built) => built.into_mut(),
                    Entry::Vacant(slot) => {
                        let Some(p) = settings.providers.get(&t.provider) else {
                            return Err(BuildError::Provider(format!(
                                "routes.{name}.targets: unknown provider {:?}",
                                t.provider
                            )));
                        };
                        let client: Arc<dyn Provider> = match p.kind {
                            ProviderKind::OpenAi => Arc::new(
                                OpenAiProvider::try_new(p, r.timeouts.connect)
                                    .map_err(BuildError::Provider)?,
                            ),
                            ProviderKind::Anthropic => Arc::new(
                                AnthropicProvider::try_new(p, r.timeouts.connect)
                                    .map_err(BuildError::Provider)?,
                            ),
                        };
                        slot.insert(client)
                    }
                };
                let breaker = breakers.entry(id.clone()).or_insert_with(|| {
                    metrics
                        .breaker_state
                        .get_or_create(&TargetLabel {
                            target: id.clone().into(),
                        })
                        .set(0);
                    Arc::new(Mutex::new(Breaker::new(r.breaker)))
                });
                chain.push(Arc::new(Target {
                    id: id.clone(),
                    model: t.model.clone(),
                    provider: Arc::clone(provider),
                    breaker: Arc::clone(breaker),
                    attempts_ok: metrics
                        .attempts
                        .get_or_create(&metrics::AttemptLabels {
                            target: id.clone().into(),
                            outcome: "ok".into(),
                        })
                        .clone(),
                    refuses_stream_options: std::sync::atomic::AtomicBool::new(false),
                }));
            }
            routes.insert(name.clone(), Route::new(r, chain, &metrics));
        }
        let chaos = Chaos::new(&settings.chaos);
        if let Some(chaos) = &chaos {
            tracing::warn!(
                seed = chaos.seed(),
                rules = settings.chaos.faults.len(),
                outages = settings.chaos.outages.len(),
                "chaos is enabled: keel injects faults into its calls to providers and honours x-keel-chaos"
            );
        }
        for agent in settings.agents.values() {
            let b = &agent.budget;
            let limits = [
                ("tokens", b.tokens_per_hour.map(|n| n as f64)),
                ("usd", b.usd_per_day),
                ("requests", b.requests_per_minute.map(f64::from)),
            ];
            for (unit, limit) in limits {
                if let Some(limit) = limit {
                    metrics
                        .budget_limit
                        .get_or_create(&metrics::BudgetLabels {
                            agent: agent.name.clone().into(),
                            unit: unit.into(),
                        })
                        .set(limit);
                }
            }
        }
        let mut preflights = HashMap::new();
        for agent in settings.agents.values() {
            if agent.tools.is_empty() && agent.preflight.is_empty() {
                continue;
            }
            let mut rules = Vec::with_capacity(agent.preflight.len());
            for text in &agent.preflight {
                let program = cel::Program::compile(text).map_err(|e| {
                    BuildError::Preflight(format!("agents.{}.preflight: {text:?}: {e}", agent.name))
                })?;
                rules.push((text.clone(), program));
            }
            preflights.insert(
                agent.name.clone(),
                Preflight {
                    tools: agent.tools.clone(),
                    rules,
                },
            );
        }
        Ok(Self {
            tools,
            routes,
            agents: Agents::new(settings.agents.values(), settings.providers.values()),
            transitions: transitions::TransitionLog::new(
                Arc::clone(&store),
                tasks.clone(),
                Arc::clone(&metrics),
            ),
            metrics,
            store,
            clock: Arc::new(SystemClock::new()),
            tasks,
            max_body_bytes: settings.server.max_body_bytes,
            body_timeout: settings.server.body_timeout,
            record_payloads: settings.store.record_payloads,
            chaos,
            approvals: None,
            loops: guard::loops::LoopGuard::default(),
            preflights,
            owners: Mutex::default(),
            node: uuid::Uuid::new_v4().simple().to_string()[..12].to_owned(),
            upcoming: keel_store::Upcoming::default(),
        })
    }

    /// Counts every call in progress in `upcoming`, the counter the store was opened with
    /// ([`keel_store::WriteOptions::upcoming`]): a busy store writer then stops waiting for
    /// more writes once every call has queued its events.
    pub fn with_upcoming(mut self, upcoming: keel_store::Upcoming) -> Self {
        self.upcoming = upcoming;
        self
    }

    /// Where tool calls that need a person's approval wait (keel's supervisor); without
    /// one, such calls are blocked.
    pub fn with_approvals(mut self, queue: Arc<dyn tools::ApprovalQueue>) -> Self {
        self.approvals = Some(queue);
        self
    }

    /// Puts back the budget windows a previous run saved (`budget/AGENT` in the store)
    /// that are still current, so a restart does not hand agents a fresh budget.
    pub async fn restore_budgets(&self) -> Result<(), keel_store::StoreError> {
        let agents: Vec<String> = self.agents.budgeted().map(str::to_owned).collect();
        for agent in agents {
            let Some(saved) = self.store.load_state(&budget_key(&agent)).await? else {
                continue;
            };
            match serde_json::from_slice::<Vec<agents::SavedWindow>>(&saved.value) {
                Ok(windows) => self.agents.restore(&agent, &windows, agents::wall_now()),
                Err(e) => {
                    tracing::warn!(agent, error = %e, "unreadable saved budget; starting it afresh")
                }
            }
        }
        Ok(())
    }

    /// Shares budgets with the other nodes: reads the store's copy of every budget and
    /// merges it into this node's windows, so its view of the others' spend is at most one
    /// sync old even for an agent whose calls it has not served lately (otherwise its first
    /// calls after a quiet spell would be checked against an old view, and admitted over a
    /// budget the others already spent). A budget used since the last sync is also written
    /// back (compare-and-set, retried when another node wrote in between).
    pub async fn save_budgets(&self) {
        let used = self.agents.to_sync();
        let agents: Vec<String> = self.agents.budgeted().map(str::to_owned).collect();
        for agent in agents {
            let write = used.contains(&agent);
            if !self.share_budget(&agent, write).await && write {
                // Tried again at the next sync, even if the agent spends nothing more.
                self.agents.resync(&agent);
            }
        }
        // The gauge follows the windows between calls too: from the start, after a window
        // turns over, and with the other nodes' spend merged in.
        for (agent, left) in self.agents.remaining(agents::wall_now()) {
            self.metrics.set_budget_remaining(&agent, &left);
        }
    }

    /// One budget's sync (see [`Gateway::save_budgets`]): merges the store's copy into this
    /// node's windows and, when `write`, stores the merged windows. Whether it succeeded.
    async fn share_budget(&self, agent: &str, write: bool) -> bool {
        let key = budget_key(agent);
        for _ in 0..8 {
            let saved = match self.store.load_state(&key).await {
                Ok(saved) => saved,
                Err(e) => {
                    tracing::warn!(agent, error = %e, "cannot share the budget");
                    return false;
                }
            };
            let stored = match saved
                .as_ref()
                .map(|s| serde_json::from_slice::<Vec<agents::SavedWindow>>(&s.value))
                .transpose()
            {
                Ok(stored) => stored.unwrap_or_default(),
                // Written over with this node's view; only read, it would wipe the others'.
                Err(_) if write => Vec::new(),
                Err(e) => {
                    tracing::warn!(agent, error = %e, "unreadable shared budget");
                    return false;
                }
            };
            let merged = self
                .agents
                .merge(agent, &self.node, &stored, agents::wall_now());
            if !write {
                return true;
            }
            let bytes = serde_json::to_vec(&merged).unwrap_or_default();
            match self
                .store
                .save_call_state(&key, bytes, saved.map(|s| s.version))
                .await
            {
                Ok(Some(_)) => return true,
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(agent, error = %e, "cannot share the budget");
                    return false;
                }
            }
        }
        false
    }

    /// This node's id: random per process, it names the node's share of budgets and its
    /// breaker events.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Shares budgets every second (see [`Gateway::save_budgets`]) until `stop`, then once more.
    pub async fn keep_budgets(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.save_budgets().await,
                () = stop.cancelled() => {
                    self.save_budgets().await;
                    return;
                }
            }
        }
    }

    /// The task's log, in order: for the rules that count its calls, the approvals in it,
    /// and the profiles a success teaches.
    pub(crate) async fn task_log(
        &self,
        task: &str,
    ) -> Result<Vec<keel_store::Event>, keel_store::StoreError> {
        // By task only: a task's log is short, while a query that also names the kind
        // may be planned on the kind index and walk every task's calls.
        self.store
            .events(keel_store::EventQuery {
                task_id: Some(task.to_owned()),
                ..keel_store::EventQuery::default()
            })
            .await
    }

    /// What the supervisor says of `task`, checked against the calling `agent`: `Err` (403)
    /// when it is a task of another agent (an agent cannot spend from, hand off or fill the
    /// log of another agent's task). A task id the supervisor does not know is the caller's
    /// own label and passes, as `None`.
    pub(crate) async fn check_owner(
        &self,
        task: &str,
        agent: &str,
    ) -> Result<Option<tools::TaskFacts>, error::ApiError> {
        let Some(queue) = &self.approvals else {
            return Ok(None);
        };
        let known = self
            .owners
            .lock()
            .get(task)
            .filter(|(_, read)| read.elapsed() < TASK_FACTS_FRESH)
            .map(|(facts, _)| facts.clone());
        let facts = match known {
            Some(facts) => facts,
            None => match queue.task_facts(task).await? {
                Some(facts) => {
                    let mut owners = self.owners.lock();
                    if owners.len() >= MAX_OWNERS {
                        owners.clear();
                    }
                    owners.insert(task.to_owned(), (facts.clone(), std::time::Instant::now()));
                    facts
                }
                None => return Ok(None),
            },
        };
        if facts.agent != agent {
            return Err(error::ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                "permission_error",
                format!(
                    "task {task:?} belongs to agent {:?}, not {agent:?}",
                    facts.agent
                ),
            )
            .with_param("task")
            .with_code("task_of_another_agent"));
        }
        Ok(Some(facts))
    }

    /// The pre-flight check of a new task of `agent`: its input does not read as a prompt
    /// injection (when the agent's `screen_input` is `block`), every tool the agent needs is
    /// available (its breaker not open), and every `preflight` rule holds on `input`.
    pub fn preflight(&self, agent: &str, input: &serde_json::Value) -> Result<(), String> {
        if self.agents.screen_input(agent) == keel_config::InjectionAction::Block
            && let Some(found) = tools::injection_in(input)
        {
            return Err(format!(
                "the task's input looks like a prompt injection (score {:.2}: {})",
                found.score,
                found.matched.join(", ")
            ));
        }
        let Some(p) = self.preflights.get(agent) else {
            return Ok(());
        };
        let now = self.clock.now();
        for name in &p.tools {
            let Some(tool) = self.tools.get(name) else {
                return Err(format!(
                    "agent {agent:?} needs tool {name:?}, which is not configured"
                ));
            };
            if let Some(left) = tool.breaker.lock().open_remaining(now) {
                return Err(format!(
                    "agent {agent:?} needs tool {name:?}, which is unavailable: its circuit breaker is open (for {}s more)",
                    left.as_secs().max(1)
                ));
            }
        }
        if p.rules.is_empty() {
            return Ok(());
        }
        let mut context = cel::Context::default();
        context
            .add_variable("input", input.clone())
            .map_err(|e| format!("cannot give the preflight rules `input`: {e}"))?;
        context
            .add_variable("agent", agent)
            .map_err(|e| format!("cannot give the preflight rules `agent`: {e}"))?;
        match p
            .rules
            .iter()
            .find_map(|(text, program)| Some((text, tools::holds(program, &context)?)))
        {
            Some((text, unmet)) => Err(unmet.reason("preflight rule", text)),
            None => Ok(()),
        }
    }

    /// Route names, in order.
    pub fn route_names(&self) -> impl Iterator<Item = &str> {
        self.routes.keys().map(String::as_str)
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The live `[chaos]`, when enabled.
    pub fn chaos(&self) -> Option<&Chaos> {
        self.chaos.as_ref()
    }
}

/// A gateway built from `config` (keel.toml text) on a new SQLite store in `dir`, and the
/// store, for the crate's in-process tests.
#[cfg(test)]
pub(crate) fn test_gateway(
    config: &str,
    dir: &tempfile::TempDir,
) -> (Arc<Gateway>, Arc<keel_store::SqliteStore>) {
    test_gateway_with(config, dir, keel_store::Durability::Relaxed.into())
}

/// [`test_gateway`] on a store opened with `options`.
#[cfg(test)]
pub(crate) fn test_gateway_with(
    config: &str,
    dir: &tempfile::TempDir,
    options: keel_store::WriteOptions,
) -> (Arc<Gateway>, Arc<keel_store::SqliteStore>) {
    let settings = keel_config::parse(config, "keel.toml", &|_| None).unwrap();
    let tools = tools::Tools::build(&settings.tools, settings.breaker).unwrap();
    let store =
        Arc::new(keel_store::SqliteStore::open(&dir.path().join("keel.db"), options).unwrap());
    let gateway = Gateway::build(
        &settings,
        tools,
        Arc::clone(&store) as Arc<dyn EventStore>,
        tokio_util::task::TaskTracker::new(),
        metrics::Metrics::new(),
    )
    .unwrap();
    (Arc::new(gateway), store)
}

#[cfg(test)]
mod tests {
    use keel_store::{Durability, EventStore, WriteOptions};

    /// A node's share of the budgets sums up model calls, and is saved every second under
    /// load: with `relaxed` calls it is saved without a disk sync, like the calls' own
    /// records, so the store's writer does not hold up the calls queued behind it for a
    /// sync every second. Other state (and, with `fsync` calls, the share) is synced.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn budget_shares_are_saved_with_the_calls_durability() {
        let config = "[providers.sim]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\n\
                      [routes.bench]\ntargets = [{ provider = \"sim\", model = \"m\" }]\n\
                      [agents.support]\nbudget = { tokens_per_hour = 1000 }\n";
        let spent = crate::usage::Usage {
            prompt_tokens: 30,
            completion_tokens: 12,
            total_tokens: 42,
        };
        for (calls, synced) in [(Durability::Relaxed, 0), (Durability::Fsync, 1)] {
            let dir = tempfile::tempdir().unwrap();
            let options = WriteOptions {
                call_durability: calls,
                ..WriteOptions::from(Durability::Fsync)
            };
            let (gw, store) = super::test_gateway_with(config, &dir, options);
            let before = (store.commits(), store.synced_commits());
            gw.agents
                .spend("support", None, "sim/m", spent, crate::agents::wall_now());
            gw.save_budgets().await;
            let share = store.load_state("budget/support").await.unwrap();
            let share = String::from_utf8(share.expect("the share was saved").value).unwrap();
            assert!(share.contains("42"), "{share}");
            assert_eq!(
                (store.commits(), store.synced_commits()),
                (before.0 + 1, before.1 + synced),
                "calls {calls:?}"
            );
        }
    }
}
