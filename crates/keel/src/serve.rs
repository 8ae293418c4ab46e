//! `keel serve`: load and validate config, open the store, build the gateway,
//! serve until Ctrl-C or SIGTERM, then drain.
//!
//! Nothing listens until every part is built, so a bad config or an unusable
//! store never half-starts a server.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use keel_config::{Settings, StoreBackend};
use keel_gateway::Gateway;
use keel_store::{PgStore, SqliteStore, TaskStore};
use keel_supervisor::service::metrics::SupervisorMetrics;
use keel_supervisor::service::{AgentLimits, Supervisor, SupervisorSettings};
use tokio_util::task::TaskTracker;

use crate::output;

/// Runs the server; returns when it has shut down.
pub fn run(config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let settings = match config {
        Some(path) => match keel_config::load(path, &|name| std::env::var(name).ok()) {
            Ok(s) => s,
            Err(errors) => {
                for e in &errors.0 {
                    output::error(&e.to_string());
                }
                return Ok(ExitCode::from(2));
            }
        },
        None => keel_config::embedded_default(),
    };
    if let Some(file) = config {
        let problems = build_problems(file, &settings);
        for problem in &problems {
            output::error(problem);
        }
        if !problems.is_empty() {
            return Ok(ExitCode::from(2));
        }
    }
    init_tracing(settings.telemetry.log_format);
    // A log line, in the log's own format (one JSON object per line when asked).
    if let Some(warning) = config.and_then(|file| exposure_warning(file, &settings)) {
        tracing::warn!("{warning}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match runtime.block_on(serve(settings, config.is_none())) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        // A tool module that does not load is the config's problem: placed at its key.
        Err(e) => {
            let Some(file) = config else { return Err(e) };
            if let Some(tool) = e.downcast_ref::<keel_gateway::tools::ToolBuildError>() {
                output::error(&tool_problem(file, tool));
                return Ok(ExitCode::from(2));
            }
            // So is an address keel cannot listen on (taken, or not this machine's).
            if let Some(listen) = e.downcast_ref::<ListenError>() {
                let key = keel_config::KeyPath::root().child("server").child("listen");
                output::error(&keel_config::error_at(file, &key, listen).to_string());
                return Ok(ExitCode::from(2));
            }
            Err(e)
        }
    }
}

/// `server.listen` could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {reason}")]
pub(crate) struct ListenError {
    addr: std::net::SocketAddr,
    /// In the message, not a source: `{e:#}` would print it twice.
    reason: std::io::Error,
}

/// A tool that cannot be built, as `file:line: tools.NAME.KEY: ...`.
fn tool_problem(file: &Path, error: &keel_gateway::tools::ToolBuildError) -> String {
    use keel_gateway::tools::ToolBuildError;
    let tools = keel_config::KeyPath::root().child("tools");
    let (key, detail) = match error {
        ToolBuildError::Wasm { name, detail } => (tools.child(name).child("wasm"), detail),
        ToolBuildError::Invalid { name, detail } => (tools.child(name), detail),
    };
    keel_config::error_at(file, &key, detail).to_string()
}

/// What a config that passed validation leaves open, as `file:line: key: ...`, on an address
/// other machines can reach: with no admin token, the operator API answers anyone; with no
/// agent keys (admin token or not), the gateway spends keel's provider keys for anyone.
pub(crate) fn exposure_warning(file: &Path, settings: &Settings) -> Option<String> {
    let listen = settings.server.listen;
    let open_gateway = settings.agents.values().all(|a| a.keys.is_empty());
    let open_operator = settings.server.admin_token.is_none();
    if listen.ip().to_canonical().is_loopback() || !(open_gateway || open_operator) {
        return None;
    }
    let key = keel_config::KeyPath::root().child("server").child("listen");
    let problem = if open_operator {
        let (models, keys) = if open_gateway {
            (
                ", and, with no agent keys, call models with keel's provider keys",
                " and agent keys (keys_env)",
            )
        } else {
            ("", "")
        };
        format!(
            "{listen} is not a loopback address and no admin_token_env is set: anyone who reaches it can use the operator API (tasks, the DLQ, approvals){models}; set server.admin_token_env{keys}"
        )
    } else {
        format!(
            "{listen} is not a loopback address and no agent has keys: anyone who reaches it can call models with keel's provider keys; set keys_env on the agents"
        )
    };
    Some(keel_config::error_at(file, &key, problem).to_string())
}

/// What keel cannot run in a config that passed validation, each as
/// `file:line: key: ...`: a PostgreSQL URL it cannot use. `keel config check` and
/// `keel serve` both refuse these before opening the store.
pub(crate) fn build_problems(file: &Path, settings: &Settings) -> Vec<String> {
    store_url_problem(file, settings).into_iter().collect()
}

fn init_tracing(format: keel_config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        // One JSON object per line (`timestamp`, `level`, `fields.message`, `target`).
        keel_config::LogFormat::Json => logs.json().init(),
        // Colour codes only for a terminal, not in a log file.
        keel_config::LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

/// What is wrong with a `postgres://` `store.url`, as `file:line: store.url: ...`.
fn store_url_problem(file: &Path, settings: &Settings) -> Option<String> {
    let StoreBackend::Postgres { url } = &settings.store.backend else {
        return None;
    };
    let problem = keel_store::check_postgres_url(url).err()?;
    let key = keel_config::KeyPath::root().child("store").child("url");
    Some(keel_config::error_at(file, &key, problem).to_string())
}

/// Opens the configured store; `upcoming` counts the gateway's calls for its writer.
async fn open_store(
    settings: &Settings,
    upcoming: &keel_store::Upcoming,
) -> anyhow::Result<Arc<dyn TaskStore>> {
    let durability = |d| match d {
        keel_config::Durability::Fsync => keel_store::Durability::Fsync,
        keel_config::Durability::Relaxed => keel_store::Durability::Relaxed,
    };
    let options = keel_store::WriteOptions {
        durability: durability(settings.store.durability),
        call_durability: durability(settings.store.call_durability),
        commit_delay: settings.store.commit_delay,
        upcoming: upcoming.clone(),
    };
    match &settings.store.backend {
        StoreBackend::Sqlite { path } => {
            let store = SqliteStore::open(path, options)
                .with_context(|| format!("cannot open the SQLite store at {}", path.display()))?;
            Ok(Arc::new(store))
        }
        StoreBackend::Postgres { url } => {
            // Errors name the database without its password; keel does not start.
            let store = PgStore::open(url, options).await?;
            tracing::info!(store = %store.describe(), "using the PostgreSQL store");
            Ok(Arc::new(store))
        }
    }
}

fn supervisor_settings(settings: &Settings) -> SupervisorSettings {
    let agents = settings
        .agents
        .values()
        .map(|a| {
            let limits = AgentLimits {
                max_attempts: a.max_attempts.get(),
                max_steps: a.max_steps,
                task_timeout: a.task_timeout,
            };
            (a.name.clone(), limits)
        })
        .collect();
    SupervisorSettings {
        agents,
        max_checkpoint_bytes: settings.store.max_checkpoint_bytes,
        retention: settings.store.retention,
        keep_checkpoints: settings.store.keep_checkpoints,
        admin_token: settings
            .server
            .admin_token
            .as_ref()
            .map(|t| t.expose().to_owned()),
        agent_keys: settings
            .agents
            .values()
            .flat_map(|a| {
                a.keys
                    .iter()
                    .map(|k| (k.expose().to_owned(), a.name.clone()))
            })
            .collect(),
        ..SupervisorSettings::default()
    }
}

async fn serve(settings: Settings, embedded: bool) -> anyhow::Result<()> {
    let mut interrupts = Interrupts::listen();
    let mut keel = start(settings, embedded).await?;
    let failed = tokio::select! {
        () = interrupts.next() => {
            tracing::info!(
                "shutting down: finishing in-flight requests (each within its route's total \
                 deadline); Ctrl-C or SIGTERM again stops at once"
            );
            None
        }
        failure = keel.failed() => Some(failure),
    };
    keel.stop_unless_interrupted(interrupts).await;
    if let Some(failure) = failed {
        anyhow::bail!("server failed: {failure}");
    }
    tracing::info!("keel stopped");
    Ok(())
}

/// A keel serving in this process (`keel serve`, `keel demo`).
pub(crate) struct Running {
    /// The bound address.
    pub(crate) addr: std::net::SocketAddr,
    /// The store it writes to.
    pub(crate) store: Arc<dyn TaskStore>,
    stop: tokio_util::sync::CancellationToken,
    /// Background work, and the work requests leave running (streams).
    tasks: TaskTracker,
    /// Requests being answered: until their handlers return.
    requests: TaskTracker,
    /// The HTTP server, until its last connection closes.
    server: TaskTracker,
    /// Says why the server stopped serving, if it stops before [`Running::stop`].
    failure: tokio::sync::oneshot::Receiver<String>,
    /// Its budgets are saved once more when the calls in flight have finished.
    gateway: Arc<Gateway>,
}

impl Running {
    /// Resolves if the server stops serving on its own (it never does unless an
    /// accept loop error ends it); pending otherwise.
    pub(crate) async fn failed(&mut self) -> String {
        match (&mut self.failure).await {
            Ok(why) => why,
            Err(_) => std::future::pending().await,
        }
    }

    /// [`Running::stop`], called after an interrupt: another one, a second or more after
    /// `interrupts` gave the first, ends the process at once (exit status 1).
    pub(crate) async fn stop_unless_interrupted(self, mut interrupts: Interrupts) {
        let first = std::time::Instant::now();
        let again = async {
            loop {
                interrupts.next().await;
                if first.elapsed() >= SAME_INTERRUPT {
                    return;
                }
            }
        };
        tokio::select! {
            () = self.stop() => {}
            () = again => {
                // What was acknowledged is committed; the calls still running get no answer.
                // Exit now: unwinding would wait for running Wasm tools and the store's threads.
                tracing::warn!("interrupted again: stopping without waiting for in-flight requests");
                std::process::exit(1);
            }
        }
    }

    /// Stops accepting, finishes in-flight requests and background work, and returns.
    ///
    /// Each request is answered within its deadline and each stream ends by its own; what
    /// is left after that is sending answers already made. A client that stopped reading
    /// its answer without closing its connection gets [`FLUSH_GRACE`] more, then keel stops
    /// without it.
    pub(crate) async fn stop(self) {
        self.stop.cancel();
        self.requests.close();
        self.tasks.close();
        self.server.close();
        loop {
            self.requests.wait().await;
            self.tasks.wait().await;
            if tokio::time::timeout(FLUSH_GRACE, self.server.wait())
                .await
                .is_ok()
            {
                break;
            }
            // A request can still start on a connection that had not yet heard of the stop;
            // it is waited for like the others.
            if self.requests.is_empty() && self.tasks.is_empty() {
                tracing::warn!(
                    "a client had not read its answer {} s after the last call in flight \
                     ended; closing its connection",
                    FLUSH_GRACE.as_secs()
                );
                break;
            }
        }
        // The budgets were saved when the stop began; the calls that finished since spent too.
        self.gateway.save_budgets().await;
    }
}

/// A known path asked with a method it does not take: 405 in the OpenAI shape.
async fn method_not_allowed(
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> keel_core::ApiError {
    keel_core::ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!("{} does not take {method}", uri.path()),
    )
    .with_code("method_not_allowed")
}

/// Builds every part, binds `server.listen`, prints the `keel listening on` line and
/// serves in the background until [`Running::stop`].
pub(crate) async fn start(settings: Settings, embedded: bool) -> anyhow::Result<Running> {
    // The address first: one taken (another keel, perhaps on the same store) or not this
    // machine's stops keel before it opens, creates or migrates anything. Connections that
    // come meanwhile wait in the listen queue until keel serves them.
    let listener = tokio::net::TcpListener::bind(settings.server.listen)
        .await
        .map_err(|reason| ListenError {
            addr: settings.server.listen,
            reason,
        })?;
    // Tools next: a Wasm module that cannot run stops keel before it opens (or creates)
    // the store.
    let tools = keel_gateway::tools::Tools::build(&settings.tools, settings.breaker)?;
    let upcoming = keel_store::Upcoming::default();
    let store = open_store(&settings, &upcoming).await?;
    let tasks = TaskTracker::new();
    let mut metrics = keel_gateway::metrics::Metrics::new();
    let mut supervisor_metrics = SupervisorMetrics::register(metrics.registry_mut());
    // One set of agent labels for every family, the config's agents always among them.
    metrics.agents.know(settings.agents.keys().cloned());
    supervisor_metrics.agents = Arc::clone(&metrics.agents);
    // The observer sees every commit through the store's tap (alerts, anomaly baselines).
    let observe_metrics = keel_observe::ObserveMetrics::register(metrics.registry_mut());
    let (observe, mut observing) =
        keel_observe::Observe::new(settings.alerts.clone(), observe_metrics);
    // The incidents of the last run are back before keel answers `GET /v1/incidents`.
    observing.restore(store.as_ref()).await;
    store.set_tap(Arc::clone(&observe) as Arc<dyn keel_store::Tap>);
    // Each task that succeeds teaches the gateway's histogram profiles (off the
    // request path: the supervisor only queues the task's id).
    let (succeeded, mut to_learn) = tokio::sync::mpsc::unbounded_channel::<String>();
    let task_store = Arc::clone(&store);
    // The gateway (tools, breakers, preflight rules) is built after the supervisor (its
    // approval queue); the supervisor's pre-flight check reaches it through this cell.
    let gateway_cell: Arc<std::sync::OnceLock<std::sync::Weak<Gateway>>> = Arc::default();
    let supervisor = Arc::new(
        Supervisor::new(task_store, supervisor_settings(&settings))
            .with_metrics(supervisor_metrics)
            .with_preflight(Arc::new(GatewayPreflight(Arc::clone(&gateway_cell))))
            .on_succeeded(Arc::new(move |task| {
                let _ = succeeded.send(task.id.clone());
            })),
    );
    let gateway = Arc::new(
        Gateway::build(&settings, tools, store.clone(), tasks.clone(), metrics)?
            .with_approvals(Arc::new(SupervisorApprovals(Arc::clone(&supervisor))))
            .with_upcoming(upcoming),
    );
    let _ = gateway_cell.set(Arc::downgrade(&gateway));
    gateway
        .restore_budgets()
        .await
        .context("reading the budgets saved by the last run")?;

    // The exporter before the ready line: a telemetry endpoint it cannot use stops keel
    // before it says it is listening.
    let traces = keel_observe::trace::Traces::new(&settings.telemetry)
        .map_err(|e| anyhow::anyhow!("telemetry: {e}"))?;
    let addr = listener
        .local_addr()
        .context("listener has no local address")?;
    if embedded {
        if std::path::Path::new("keel.toml").is_file() {
            // `keel config check` reads ./keel.toml by default; serve does not.
            tracing::warn!(
                "./keel.toml is not read: with no --config, keel serves the embedded default (no routes); run `keel serve --config keel.toml`"
            );
        } else {
            tracing::info!(
                "no --config given: using the embedded default (no routes; see examples/keel.toml)"
            );
        }
    }
    let routes: Vec<&str> = gateway.route_names().collect();
    output::line(&format!(
        "keel listening on http://{addr} (routes: {})",
        if routes.is_empty() {
            "none".to_owned()
        } else {
            routes.join(", ")
        }
    ));
    let admin: keel_observe::AdminCheck = {
        let supervisor = Arc::clone(&supervisor);
        Arc::new(move |headers| keel_supervisor::service::http::admin(&supervisor, headers))
    };
    // The task and operator APIs keep the gateway's body rules (limit, timeout, errors in
    // the OpenAI shape).
    let body_rules = |api| {
        keel_gateway::with_body_rules(
            api,
            settings.server.max_body_bytes,
            settings.server.body_timeout,
        )
    };
    let tasks_api = body_rules(keel_supervisor::service::http::router(Arc::clone(
        &supervisor,
    )));
    let observe_api =
        body_rules(Arc::clone(&observe).router(admin, store.clone(), gateway.node().to_owned()));
    // Every request is tracked until its handler returns, so a stop knows when the last
    // answer has been made.
    let requests = TaskTracker::new();
    let app = keel_gateway::router(Arc::clone(&gateway))
        .merge(tasks_api)
        .merge(observe_api)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(tower::util::MapFutureLayer::new({
            let requests = requests.clone();
            move |answer| requests.track_future(answer)
        }));
    // Small JSON answers must not wait for Nagle's algorithm.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let stop = tokio_util::sync::CancellationToken::new();
    tasks.spawn(Arc::clone(&gateway).keep_budgets(stop.clone()));
    tasks.spawn(
        observing
            .with_traces(traces)
            .run(store.clone(), store.clone(), stop.clone()),
    );
    {
        // The gateway holds the supervisor (its approval queue), which holds the sender:
        // the loop ends with `stop`, not with the channel.
        let gateway = Arc::clone(&gateway);
        let stop = stop.clone();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    task = to_learn.recv() => match task {
                        Some(task) => gateway.learn_from_task(&task).await,
                        None => return,
                    },
                    () = stop.cancelled() => return,
                }
            }
        });
    }
    tasks.spawn(
        Arc::clone(&supervisor).sweep_forever(std::time::Duration::from_millis(250), stop.clone()),
    );
    let shutdown = stop.clone().cancelled_owned();
    let (failed, failure) = tokio::sync::oneshot::channel();
    let server = TaskTracker::new();
    server.spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "server failed");
            let _ = failed.send(e.to_string());
        }
    });
    Ok(Running {
        addr,
        store,
        stop,
        tasks,
        requests,
        server,
        failure,
        gateway,
    })
}

/// The supervisor's pre-flight check is the gateway's (tools, breakers, CEL rules).
struct GatewayPreflight(Arc<std::sync::OnceLock<std::sync::Weak<Gateway>>>);

impl keel_supervisor::service::Preflight for GatewayPreflight {
    fn check(&self, agent: &str, input: &serde_json::Value) -> Result<(), String> {
        match self.0.get().and_then(std::sync::Weak::upgrade) {
            Some(gateway) => gateway.preflight(agent, input),
            None => Ok(()),
        }
    }
}

impl SupervisorApprovals {
    /// Runs `command` (an approval request or a handoff) on `task`; the approval's id.
    async fn queue(
        &self,
        task: &str,
        command: &keel_supervisor::Command,
    ) -> Result<String, keel_core::ApiError> {
        let answer = self
            .0
            .run(
                task,
                command,
                None,
                None,
                |t, _| serde_json::json!({"approval": t.approval.as_ref().map(|a| a.id.clone())}),
            )
            .await?;
        answer.body["approval"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| keel_core::ApiError::internal("the approval was not recorded"))
    }
}

/// The gateway's approval queue is the supervisor's: a tool call that needs a person
/// puts its task in `awaiting_human`, as `POST /v1/tasks/{id}/approvals` does.
struct SupervisorApprovals(Arc<Supervisor>);

#[async_trait::async_trait]
impl keel_gateway::tools::ApprovalQueue for SupervisorApprovals {
    async fn request(
        &self,
        task: &str,
        reason: String,
        context: serde_json::Value,
        timeout: std::time::Duration,
    ) -> Result<String, keel_core::ApiError> {
        // keel itself asks, on behalf of whoever holds the task's lease.
        let command = keel_supervisor::Command::RequestApproval {
            asker: keel_supervisor::Asker::Keel,
            approval_id: format!("apr_{}", uuid::Uuid::now_v7().simple()),
            reason,
            context,
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            default: keel_supervisor::task::ApprovalDefault::Deny,
        };
        self.queue(task, &command).await
    }

    async fn handoff(
        &self,
        task: &str,
        reason: String,
        context: serde_json::Value,
        timeout: std::time::Duration,
    ) -> Result<String, keel_core::ApiError> {
        let command = keel_supervisor::Command::Handoff {
            approval_id: format!("apr_{}", uuid::Uuid::now_v7().simple()),
            reason,
            context,
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        };
        self.queue(task, &command).await
    }

    async fn task_facts(
        &self,
        task: &str,
    ) -> Result<Option<keel_gateway::tools::TaskFacts>, keel_core::ApiError> {
        let row = self.0.store().task(task).await.map_err(|e| {
            keel_core::ApiError::unavailable(format!("cannot read task {task}: {e}"))
        })?;
        // A task that succeeded met its deadline: its later calls (say, a worker's last
        // summary) are not refused for it. One that died of it (the timer ends a task at its
        // deadline), or otherwise, keeps it.
        Ok(row.map(|r| {
            let loop_handoff = keel_gateway::tools::LoopHandoff::of_task(&r.state, &r.snapshot);
            keel_gateway::tools::TaskFacts {
                deadline_ms: (r.state != "succeeded")
                    .then(|| r.snapshot["deadline_ms"].as_i64())
                    .flatten(),
                agent: r.agent,
                loop_handoff,
            }
        }))
    }
}

/// Ctrl-C or SIGTERM. The handlers are installed when this is called, not when the
/// future is first polled: a signal that arrives in between (say, right after the
/// `keel listening on` line) still stops keel cleanly.
pub(crate) fn interrupted() -> impl std::future::Future<Output = ()> {
    let mut interrupts = Interrupts::listen();
    async move { interrupts.next().await }
}

/// The Ctrl-C and SIGTERM signals, listened for from [`Interrupts::listen`] on, each
/// received once by [`Interrupts::next`].
pub(crate) struct Interrupts {
    int: Option<tokio::signal::unix::Signal>,
    term: Option<tokio::signal::unix::Signal>,
}

impl Interrupts {
    pub(crate) fn listen() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind: SignalKind, name: &str| {
            signal(kind)
                .map_err(|e| tracing::error!(error = %e, "cannot listen for {name}"))
                .ok()
        };
        Self {
            int: listen(SignalKind::interrupt(), "Ctrl-C"),
            term: listen(SignalKind::terminate(), "SIGTERM"),
        }
    }

    /// The next Ctrl-C or SIGTERM.
    pub(crate) async fn next(&mut self) {
        tokio::select! {
            () = received(self.int.as_mut()) => {},
            () = received(self.term.as_mut()) => {},
        }
    }
}

/// How long a stop waits, after the last call in flight ended, for clients to read what
/// they were sent.
const FLUSH_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// How long after the first interrupt another one is taken as the same (a process runner
/// that forwards Ctrl-C to a process group keel is in delivers it twice).
const SAME_INTERRUPT: std::time::Duration = std::time::Duration::from_secs(1);

/// Waits for `signal`; forever when it could not be listened for.
async fn received(signal: Option<&mut tokio::signal::unix::Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}
