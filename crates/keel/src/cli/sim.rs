//! `keel sim` and `keel demo`: a fleet of simulated agents through a real keel,
//! with faults injected upstream (in the simulated model server) and in the fleet,
//! and the reliability report at the end.
//!
//! `keel sim` starts keel as a child process (`keel serve` with a generated config),
//! so the mix's `kill -9` of keel is real; `keel demo` runs keel in this process and
//! keeps it up after the report. Both read the figures from keel's store once the
//! run has drained; nothing the agents counted themselves goes into the report.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use keel_sim::SimServer;
use keel_sim::fleet::inject::kind;
use keel_sim::fleet::report::{CallFigures, Report, RunFacts, TaskOutcome, Window};
use keel_sim::fleet::{self, FaultMix, FleetInjector, FleetSettings, Progress, TaskScript};
use keel_store::{EventQuery, EventStore, SqliteStore, TaskStore};
use tokio::io::AsyncBufReadExt as _;
use tokio::process::{Child, Command};

use crate::{output, serve};

/// The route the fleet's agents call, and the keel agent their tasks belong to.
const ROUTE: &str = "fleet";
const AGENT: &str = "fleet";

/// The simulated models: the primary and the small "reflex" fallback.
const LARGE: &str = "large";
const SMALL: &str = "small";

/// How long the simulated models take to answer (±25%).
const LARGE_LATENCY: Duration = Duration::from_millis(40);
const SMALL_LATENCY: Duration = Duration::from_millis(15);

/// The agents' own lease and client timeout.
const LEASE: Duration = Duration::from_secs(3);
/// Above keel's `total` of 30 s with policies off, so a hung call ends on keel's side.
const CALL_TIMEOUT: Duration = Duration::from_secs(35);

/// What `keel sim` and `keel demo` were asked for.
#[derive(Debug, Clone)]
pub(crate) struct SimArgs {
    pub(crate) agents: u32,
    pub(crate) tasks: u32,
    pub(crate) faults: Option<PathBuf>,
    pub(crate) policies_on: bool,
    pub(crate) report: PathBuf,
    pub(crate) seed: u64,
    pub(crate) think: Duration,
    pub(crate) drain_timeout: Duration,
    /// A keel config whose policies (one route's, the agents' limits) the run uses.
    pub(crate) config: Option<PathBuf>,
}

/// A keel that is already running, for `keel sim --server`.
#[derive(Debug, Clone)]
pub(crate) struct Remote {
    /// Its base URL.
    pub(crate) url: String,
    /// The route the agents call.
    pub(crate) route: String,
    /// The agent the tasks belong to.
    pub(crate) agent: String,
}

/// `keel sim`.
pub(crate) fn run_sim(args: &SimArgs, remote: Option<&Remote>) -> anyhow::Result<ExitCode> {
    let runtime = runtime()?;
    runtime.block_on(async {
        init_log(&args.report)?;
        // Ctrl-C or SIGTERM drops the run, and with it the keel child (kill_on_drop).
        let run = async {
            match remote {
                Some(remote) => simulate_remote(args, remote).await,
                None => simulate(args).await,
            }
        };
        let report = tokio::select! {
            report = run => report?,
            () = serve::interrupted() => match remote {
                // Not this run's keel: it runs on, with the tasks made so far.
                Some(remote) => bail!("interrupted; the keel at {} keeps running", remote.url),
                None => bail!("interrupted; keel was stopped"),
            },
        };
        print_report(&report, &args.report);
        Ok(verdict(&report))
    })
}

/// Exit 1 when the run did not drain or lost tasks, so scripts and CI notice.
fn verdict(report: &Report) -> ExitCode {
    if !report.drained {
        output::error("the run did not drain before --drain-timeout: some tasks never ended");
        return ExitCode::FAILURE;
    }
    if report.final_states.lost > 0 {
        output::error(&format!(
            "{} acknowledged task(s) are in no final state",
            report.final_states.lost
        ));
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Warnings of the fleet (and, in `keel demo`, of keel itself) go to `DIR/sim.log`.
fn init_log(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join("sim.log");
    let file = std::fs::File::create(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // A second subscriber (tests calling this twice) is not an error worth failing on.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(Arc::new(file))
        .try_init();
    Ok(())
}

/// `keel demo`.
pub(crate) fn run_demo(
    args: &SimArgs,
    exit: bool,
    listen: std::net::SocketAddr,
) -> anyhow::Result<ExitCode> {
    let runtime = runtime()?;
    runtime.block_on(async {
        init_log(&args.report)?;
        // Listened for from here on, so a Ctrl-C while the report prints is not lost.
        let mut interrupts = serve::Interrupts::listen();
        // `_sim` keeps the simulated models up for as long as keel is.
        let (report, keel, _sim) = tokio::select! {
            run = simulate_in_process(args, listen) => run?,
            () = interrupts.next() => bail!("interrupted"),
        };
        print_report(&report, &args.report);
        let verdict = verdict(&report);
        if exit {
            keel.stop().await;
            return Ok(verdict);
        }
        output::line(&format!(
            "\nkeel is still up: open the dashboard at http://{addr}/ui, or try `curl http://{addr}/v1/incidents` or `keel tasks ls --server http://{addr}`.\nPress Ctrl-C to stop.",
            addr = keel.addr
        ));
        interrupts.next().await;
        output::line("stopping keel (Ctrl-C again stops it at once)");
        keel.stop_unless_interrupted(interrupts).await;
        Ok(verdict)
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn write_report(report: &Report, dir: &Path) -> anyhow::Result<()> {
    report
        .write(dir)
        .with_context(|| format!("cannot write the report into {}", dir.display()))
}

fn print_report(report: &Report, dir: &Path) {
    output::line("");
    output::line(&report.markdown());
    output::line(&format!(
        "report: {0}/report.md, {0}/report.json, {0}/report.svg",
        dir.display()
    ));
}

/// Everything a run needs before keel starts.
struct Prepared {
    /// The route the agents call.
    route: String,
    /// The agent the tasks belong to.
    agent: String,
    /// Prefix of the run's task ids.
    id_prefix: String,
    mix: FaultMix,
    mix_name: String,
    scripts: Arc<[TaskScript]>,
    /// The simulated models (`None` against a running keel, which calls its own).
    sim: Option<keel_sim::SimHandle>,
}

/// Where keel sim's own keel keeps its config and database.
struct Local {
    db: PathBuf,
    config: PathBuf,
}

/// The run's fault mix and its name, after checking the run's size.
fn load_mix(args: &SimArgs) -> anyhow::Result<(FaultMix, String)> {
    if args.agents == 0 || args.tasks == 0 {
        bail!("--agents and --tasks must be at least 1");
    }
    Ok(match &args.faults {
        Some(path) => (FaultMix::load(path)?, path.display().to_string()),
        None => (FaultMix::standard()?, "standard".to_owned()),
    })
}

async fn prepare(args: &SimArgs, listen: &str) -> anyhow::Result<(Prepared, Local)> {
    let (mix, mix_name) = load_mix(args)?;
    for outage in &mix.outages {
        if outage.target != LARGE && outage.target != SMALL {
            bail!(
                "{mix_name}: outages: target {:?} is not a simulated model (`{LARGE}` or `{SMALL}`)",
                outage.target
            );
        }
    }
    let data = keel_dir(&args.report)?;
    let db = data.join("keel.db");
    for suffix in ["", "-wal", "-shm"] {
        let old = PathBuf::from(format!("{}{suffix}", db.display()));
        if old.exists() {
            std::fs::remove_file(&old)
                .with_context(|| format!("cannot remove the last run's {}", old.display()))?;
        }
    }
    let sim = SimServer::start(([127, 0, 0, 1], 0).into())
        .await
        .context("cannot start the simulated model server")?;
    let config = data.join("keel.toml");
    let (text, route) = match (&args.config, args.policies_on) {
        (Some(user), true) => from_user_config(user, listen, &db, &sim.base_url())?,
        (Some(_), false) => {
            output::line("--policies off runs keel as a plain pass-through; --config is not used.");
            (
                config_text(listen, &db, &sim.base_url(), false),
                ROUTE.to_owned(),
            )
        }
        (None, on) => (
            config_text(listen, &db, &sim.base_url(), on),
            ROUTE.to_owned(),
        ),
    };
    std::fs::write(&config, text).with_context(|| format!("cannot write {}", config.display()))?;
    let scripts: Arc<[TaskScript]> = fleet::script::generate(args.seed, args.tasks).into();
    Ok((
        Prepared {
            route,
            agent: AGENT.to_owned(),
            id_prefix: "sim".to_owned(),
            mix,
            mix_name,
            scripts,
            sim: Some(sim),
        },
        Local { db, config },
    ))
}

/// The folder of the run's keel (config, log, database) under the report folder:
/// `DIR/keel/`, marked as keel sim's so that a later run may wipe it, and never a
/// folder with a database keel sim did not make.
fn keel_dir(report: &Path) -> anyhow::Result<PathBuf> {
    let dir = report.join("keel");
    let marker = dir.join(".keel-sim");
    if dir.join("keel.db").exists() && !marker.exists() {
        bail!(
            "{} holds a keel database keel sim did not create; choose another --report folder",
            dir.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(
        &marker,
        "keel sim's scratch keel: config, log and database of the last run\n",
    )
    .with_context(|| format!("cannot write {}", marker.display()))?;
    Ok(dir)
}

/// `keel sim`: keel as a child process.
async fn simulate(args: &SimArgs) -> anyhow::Result<Report> {
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let (prepared, local) = prepare(args, &listen).await?;
    let log = local.db.with_file_name("keel.log");
    // A fresh log per run, like the database.
    std::fs::write(&log, "").with_context(|| format!("cannot write {}", log.display()))?;
    let mut keel = ChildKeel::start(&local.config, &log).await?;
    let url = format!("http://{listen}");
    let (run, facts) = drive(args, &prepared, &url, Some(&mut keel)).await?;
    let usage = keel.usage();
    keel.stop().await;
    let store = SqliteStore::open(&local.db, keel_store::Durability::Fsync)
        .with_context(|| format!("cannot open {}", local.db.display()))?;
    let collected = from_store(&store, &prepared, &run).await?;
    let report = report_of(args, &prepared, run, facts, collected, usage, "child");
    write_report(&report, &args.report)?;
    Ok(report)
}

/// `keel sim --server`: against a keel that is already running. It calls its own
/// providers, so the mix's model-call faults and outages cannot be injected (its
/// `[chaos]` can) and keel is not killed; agent deaths still happen. The figures come
/// from its HTTP API.
async fn simulate_remote(args: &SimArgs, remote: &Remote) -> anyhow::Result<Report> {
    let (mix, mix_name) = load_mix(args)?;
    if !args.policies_on || args.config.is_some() {
        output::line(
            "--policies and --config change nothing with --server: the running keel keeps its own config.",
        );
    }
    output::line(&format!(
        "against the running keel at {}: only the mix's agent deaths apply (its model calls go to its own providers; use its [chaos] to inject faults there)",
        remote.url
    ));
    let client = reqwest::Client::new();
    preflight(&client, remote).await?;
    let before = breaker_trips(&client, &remote.url).await;
    let prepared = Prepared {
        route: remote.route.clone(),
        agent: remote.agent.clone(),
        // Each run its own ids: a running keel keeps earlier runs' tasks.
        id_prefix: format!("sim{:x}", now_ms()),
        mix,
        mix_name,
        scripts: fleet::script::generate(args.seed, args.tasks).into(),
        sim: None,
    };
    let (run, drive) = drive(args, &prepared, &remote.url, None).await?;
    let collected = from_api(&client, &remote.url, &prepared, &run).await?;
    let after = breaker_trips(&client, &remote.url).await;
    let collected = Collected {
        breaker_trips: after.saturating_sub(before),
        ..collected
    };
    let report = report_of(
        args,
        &prepared,
        run,
        drive,
        collected,
        Usage::default(),
        "remote",
    );
    write_report(&report, &args.report)?;
    Ok(report)
}

/// What a run against a running keel needs, checked before any task is made: keel answers,
/// knows the route, takes the agent's key (`$KEEL_AGENT_KEY`) and the admin token
/// (`$KEEL_ADMIN_TOKEN`) the run's reads need. Each mistake said at once, not as a run of
/// tasks that never complete.
async fn preflight(client: &reqwest::Client, remote: &Remote) -> anyhow::Result<()> {
    let url = &remote.url;
    let set = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let (agent_key, admin_token) = (set("KEEL_AGENT_KEY"), set("KEEL_ADMIN_TOKEN"));
    let send = |path: &str, token: Option<&String>| {
        let mut request = client
            .get(format!("{url}{path}"))
            .header("x-keel-agent", &remote.agent)
            .timeout(Duration::from_secs(10));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    let models = send("/v1/models", agent_key.as_ref())
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach keel at {url} (is keel serve running?): {e}"))?;
    match models.status() {
        reqwest::StatusCode::UNAUTHORIZED => anyhow::bail!(
            "keel at {url} refused {}: set KEEL_AGENT_KEY to a key of agent {:?}",
            if agent_key.is_some() {
                "the key in KEEL_AGENT_KEY (is it right?)"
            } else {
                "the run without an agent key"
            },
            remote.agent
        ),
        status if !status.is_success() => {
            anyhow::bail!("keel at {url} answered GET /v1/models with HTTP {status}: is it keel?")
        }
        _ => {}
    }
    let models: serde_json::Value = models
        .json()
        .await
        .with_context(|| format!("keel at {url}: its model list is not JSON"))?;
    let routes: Vec<&str> = models["data"]
        .as_array()
        .map(|data| data.iter().filter_map(|m| m["id"].as_str()).collect())
        .unwrap_or_default();
    if !routes.contains(&remote.route.as_str()) {
        anyhow::bail!(
            "keel at {url} has no route {:?} (its routes: {}); pass one with --route",
            remote.route,
            if routes.is_empty() {
                "none".to_owned()
            } else {
                routes.join(", ")
            }
        );
    }
    let tasks = send("/v1/tasks?limit=1", admin_token.as_ref())
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach keel at {url}: {e}"))?;
    if tasks.status() == reqwest::StatusCode::UNAUTHORIZED {
        anyhow::bail!(
            "keel at {url} needs its admin token to read the run's tasks: {}",
            if admin_token.is_some() {
                "the one in KEEL_ADMIN_TOKEN is not it"
            } else {
                "set KEEL_ADMIN_TOKEN"
            }
        );
    }
    Ok(())
}

/// `keel_breaker_transitions_total{to="open"}` summed over targets (0 if unreadable).
async fn breaker_trips(client: &reqwest::Client, url: &str) -> u64 {
    let Ok(response) = client.get(format!("{url}/metrics")).send().await else {
        return 0;
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("keel_breaker_transitions_total{") && l.contains("to=\"open\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The figures of a run read over keel's HTTP API: each task and its events.
async fn from_api(
    client: &reqwest::Client,
    url: &str,
    prepared: &Prepared,
    run: &fleet::FleetRun,
) -> anyhow::Result<Collected> {
    use futures::StreamExt as _;
    let admin = std::env::var("KEEL_ADMIN_TOKEN").ok();
    let get = |path: String| {
        let mut request = client.get(format!("{url}{path}"));
        if let Some(token) = &admin {
            request = request.bearer_auth(token);
        }
        request
    };
    let per_task = futures::stream::iter(run.created.iter().map(|created| {
        let get = &get;
        async move {
            let task = get(format!("/v1/tasks/{}", created.id))
                .send()
                .await
                .with_context(|| format!("reading task {}", created.id))?;
            if task.status() == reqwest::StatusCode::NOT_FOUND {
                return Ok::<_, anyhow::Error>((created, None, Vec::new()));
            }
            let task: serde_json::Value = task.error_for_status()?.json().await?;
            let events = get(format!("/v1/tasks/{}/events", created.id))
                .send()
                .await?
                .error_for_status()?
                .text()
                .await?;
            let events: Vec<keel_store::Event> = events
                .lines()
                .filter_map(|line| serde_json::from_str(line).ok())
                .collect();
            Ok((created, Some(task), events))
        }
    }))
    .buffered(16)
    .collect::<Vec<_>>()
    .await;
    let mut collected = Collected::default();
    for item in per_task {
        let (created, task, events) = item?;
        let feasible = feasible(prepared, created.index);
        let Some(task) = task else {
            collected.outcomes.push(TaskOutcome {
                feasible,
                state: None,
                created_ms: 0,
                first_claimed_ms: None,
                updated_ms: 0,
            });
            continue;
        };
        for event in &events {
            collected.event(event);
        }
        collected.outcomes.push(TaskOutcome {
            feasible,
            state: task["state"].as_str().map(str::to_owned),
            created_ms: task["created_at_ms"].as_i64().unwrap_or(0),
            first_claimed_ms: events
                .iter()
                .find(|e| e.kind == "task_claimed")
                .map(|e| e.at_ms),
            updated_ms: task["updated_at_ms"].as_i64().unwrap_or(0),
        });
    }
    collected.refused(prepared, run);
    Ok(collected)
}

/// `keel demo`: keel in this process, left running.
async fn simulate_in_process(
    args: &SimArgs,
    listen: std::net::SocketAddr,
) -> anyhow::Result<(Report, serve::Running, keel_sim::SimHandle)> {
    let (prepared, local) = prepare(args, &listen.to_string()).await?;
    if prepared.mix.keel.kill9_at.is_some() {
        output::line(
            "keel runs inside this process here, so the mix's kill -9 of keel is skipped (`keel sim` does it).",
        );
    }
    let settings =
        keel_config::load(&local.config, &|name| std::env::var(name).ok()).map_err(|errors| {
            anyhow::anyhow!(
                "{}",
                errors
                    .0
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })?;
    let running = serve::start(settings, false)
        .await
        .map_err(|e| e.context("choose another address with --listen"))?;
    let url = format!("http://{}", running.addr);
    let (run, facts) = drive(args, &prepared, &url, None).await?;
    let usage = own_usage();
    let collected = from_store(running.store.as_ref(), &prepared, &run).await?;
    let report = report_of(args, &prepared, run, facts, collected, usage, "in-process");
    write_report(&report, &args.report)?;
    let sim = prepared.sim.context("the simulated model server is gone")?;
    Ok((report, running, sim))
}

/// What the fleet driver and the fault schedule produced.
struct Drive {
    injector: Arc<FleetInjector>,
    windows: Vec<Window>,
    started_ms: i64,
}

/// Runs the fleet against keel at `url`; with a child keel, kills it on schedule.
async fn drive(
    args: &SimArgs,
    prepared: &Prepared,
    url: &str,
    child: Option<&mut ChildKeel>,
) -> anyhow::Result<(fleet::FleetRun, Drive)> {
    let latency = HashMap::from([
        (LARGE.to_owned(), LARGE_LATENCY),
        (SMALL.to_owned(), SMALL_LATENCY),
    ]);
    let injector = Arc::new(FleetInjector::new(args.seed, prepared.mix.clone(), latency));
    if let Some(sim) = &prepared.sim {
        sim.set_injector(Some(Arc::clone(&injector) as Arc<dyn keel_sim::Injector>));
    }
    let started_ms = now_ms();
    // Outages happen only where keel sim runs the models.
    let outages = if prepared.sim.is_some() {
        prepared.mix.outages.as_slice()
    } else {
        &[]
    };
    let mut windows: Vec<Window> = outages
        .iter()
        .map(|o| Window {
            label: format!("outage of {}", o.target),
            start_s: o.start.as_secs_f64(),
            end_s: o.start.saturating_add(o.duration).as_secs_f64(),
        })
        .collect();
    let settings = FleetSettings {
        keel_url: url.to_owned(),
        agents: args.agents,
        route: prepared.route.clone(),
        agent: prepared.agent.clone(),
        seed: args.seed,
        lease: LEASE,
        think: args.think,
        call_timeout: CALL_TIMEOUT,
        killed_share: prepared.mix.agents.killed,
        drain_timeout: args.drain_timeout,
        id_prefix: prepared.id_prefix.clone(),
        agent_key: std::env::var("KEEL_AGENT_KEY").ok(),
        admin_token: std::env::var("KEEL_ADMIN_TOKEN").ok(),
    };
    let bar = progress_bar(u64::from(args.tasks));
    // Without a terminal (CI logs, pipes) the bar is hidden: a line every 5 s instead.
    let plain = !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let began = std::time::Instant::now();
    let last_line = parking_lot::Mutex::new(began);
    let on_progress = |p: Progress| {
        let message = format!(
            "created {} · task attempts failed {} · model calls ok {} failed {}",
            p.created, p.failed, p.calls_ok, p.calls_failed
        );
        if plain {
            let mut last = last_line.lock();
            if last.elapsed() >= Duration::from_secs(5) {
                *last = std::time::Instant::now();
                output::line(&format!(
                    "[{:>4}s] completed {}/{} · {message}",
                    began.elapsed().as_secs(),
                    p.completed,
                    args.tasks
                ));
            }
        } else {
            bar.set_position(p.completed);
            bar.set_message(message);
        }
    };
    let fleet = fleet::run(
        &settings,
        Arc::clone(&prepared.scripts),
        Arc::clone(&injector),
        &on_progress,
    );
    let kill_at = prepared.mix.keel.kill9_at;
    let run = match child {
        Some(keel) => {
            tokio::pin!(fleet);
            // Kills keel on schedule, and stops the run if keel dies on its own.
            let watch = async {
                let mut kill_at = kill_at;
                let began = tokio::time::Instant::now();
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if let Some(at) = kill_at
                        && began.elapsed() >= at
                    {
                        kill_at = None;
                        let pid = keel.pid().map_or_else(|| "?".to_owned(), |p| p.to_string());
                        let line = format!("kill -9 keel (pid {pid}) and restart");
                        if plain {
                            output::line(&line);
                        } else {
                            bar.println(line);
                        }
                        if let Err(e) = keel.kill9_and_restart().await {
                            return e;
                        }
                        injector.count(kind::KEEL_KILL9);
                        windows.push(Window {
                            label: "kill -9 keel".to_owned(),
                            start_s: at.as_secs_f64(),
                            end_s: at.as_secs_f64(),
                        });
                        continue;
                    }
                    if let Some(status) = keel.exited() {
                        return anyhow::anyhow!(
                            "keel exited on its own ({status}); see {}",
                            keel.log.display()
                        );
                    }
                }
            };
            tokio::select! {
                run = &mut fleet => run?,
                failed = watch => return Err(failed),
            }
        }
        None => fleet.await?,
    };
    bar.finish_and_clear();
    if let Some(sim) = &prepared.sim {
        sim.set_injector(None);
    }
    Ok((
        run,
        Drive {
            injector,
            windows,
            started_ms,
        },
    ))
}

fn progress_bar(tasks: u64) -> ProgressBar {
    let bar = ProgressBar::new(tasks);
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} completed · {msg}",
    ) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// keel's resource use: peak RSS in MiB and CPU seconds.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    peak_rss_mb: f64,
    cpu_s: f64,
}

/// What a run's figures are made of, from the store or the API.
#[derive(Debug, Default)]
struct Collected {
    outcomes: Vec<TaskOutcome>,
    calls: CallFigures,
    breaker_trips: u64,
    /// Faults keel's own `[chaos]` injected, by fault (from `llm_call.chaos`).
    keel_chaos: BTreeMap<String, u64>,
    /// Actions blocked, by guard (from `action_blocked`).
    caught: BTreeMap<String, u64>,
    /// Risky actions a tool carried out (from `tool_invoked`).
    risky_done: u64,
}

impl Collected {
    /// The tasks keel refused at creation: outcomes in no other final state, and what
    /// the pre-flight check caught.
    fn refused(&mut self, prepared: &Prepared, run: &fleet::FleetRun) {
        for refused in &run.refused {
            self.outcomes.push(TaskOutcome {
                feasible: feasible(prepared, refused.index),
                state: Some("refused".to_owned()),
                created_ms: 0,
                first_claimed_ms: None,
                updated_ms: 0,
            });
            *self.caught.entry("preflight".to_owned()).or_default() += 1;
        }
    }

    /// Counts one event into the call figures.
    fn event(&mut self, event: &keel_store::Event) {
        match event.kind.as_str() {
            "llm_call" => {
                let data = &event.data;
                self.calls.calls += 1;
                self.calls.retries += data["attempts"].as_u64().unwrap_or(1).saturating_sub(1);
                if data["fallback"] == true {
                    self.calls.fallbacks += 1;
                }
                self.calls.tokens += data["usage"]["total_tokens"].as_u64().unwrap_or(0);
                for injected in data["chaos"].as_array().into_iter().flatten() {
                    if let Some(fault) = injected["fault"].as_str() {
                        *self
                            .keel_chaos
                            .entry(format!("keel_chaos_{fault}"))
                            .or_default() += 1;
                    }
                }
            }
            "degraded_reply" => self.calls.degraded += 1,
            "breaker_opened" => self.breaker_trips += 1,
            "action_blocked" => {
                for rule in event.data["rules"].as_array().into_iter().flatten() {
                    if let Some(rule) = rule.as_str() {
                        *self.caught.entry(guard_of(rule)).or_default() += 1;
                    }
                }
            }
            "tool_invoked" => {
                let amount = event.data["args"]["amount"].as_u64().unwrap_or(0);
                if amount >= fleet::RISKY_AMOUNT && event.data["outcome"] == "ok" {
                    self.risky_done += 1;
                }
            }
            _ => {}
        }
    }
}

/// Whether script `index` is feasible (an unknown index counts as feasible).
fn feasible(prepared: &Prepared, index: u32) -> bool {
    prepared
        .scripts
        .get(index as usize)
        .is_none_or(TaskScript::feasible)
}

/// Reads the run's figures from keel's store.
async fn from_store<S: EventStore + TaskStore + ?Sized>(
    store: &S,
    prepared: &Prepared,
    run: &fleet::FleetRun,
) -> anyhow::Result<Collected> {
    let mut collected = Collected::default();
    // When each task was first claimed: its time in the queue ends there.
    let mut first_claim: HashMap<String, i64> = HashMap::new();
    for_each_event(store, "task_claimed", |event| {
        if let Some(id) = &event.task_id {
            first_claim.entry(id.clone()).or_insert(event.at_ms);
        }
    })
    .await?;
    for created in &run.created {
        let row = store
            .task(&created.id)
            .await
            .with_context(|| format!("reading task {}", created.id))?;
        let feasible = feasible(prepared, created.index);
        collected.outcomes.push(match row {
            Some(row) => TaskOutcome {
                feasible,
                first_claimed_ms: first_claim.get(&row.id).copied(),
                state: Some(row.state),
                created_ms: row.created_at_ms,
                updated_ms: row.updated_at_ms,
            },
            None => TaskOutcome {
                feasible,
                state: None,
                created_ms: 0,
                first_claimed_ms: None,
                updated_ms: 0,
            },
        });
    }
    for kind in [
        "llm_call",
        "degraded_reply",
        "breaker_opened",
        "action_blocked",
        "tool_invoked",
    ] {
        for_each_event(store, kind, |event| collected.event(event)).await?;
    }
    collected.refused(prepared, run);
    Ok(collected)
}

/// The report of a run from what was collected.
fn report_of(
    args: &SimArgs,
    prepared: &Prepared,
    run: fleet::FleetRun,
    drive: Drive,
    collected: Collected,
    usage: Usage,
    keel_process: &str,
) -> Report {
    let mut faults_injected: BTreeMap<String, u64> = drive
        .injector
        .injected()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    faults_injected.extend(collected.keel_chaos);
    let facts = RunFacts {
        seed: args.seed,
        policies: if args.policies_on { "on" } else { "off" }.to_owned(),
        mix: prepared.mix_name.clone(),
        agents: args.agents,
        started_ms: drive.started_ms,
        wall_s: run.wall.as_secs_f64(),
        drained: run.drained,
        calls: collected.calls,
        breaker_trips: collected.breaker_trips,
        faults_injected,
        fault_windows: drive.windows,
        keel_peak_rss_mb: usage.peak_rss_mb,
        keel_cpu_s: usage.cpu_s,
        keel_process: keel_process.to_owned(),
        caught: collected.caught,
        risky_actions_done: collected.risky_done,
    };
    Report::build(facts, &collected.outcomes)
}

/// Calls `f` with every event of `kind`, oldest first.
async fn for_each_event<S: EventStore + ?Sized>(
    store: &S,
    kind: &str,
    mut f: impl FnMut(&keel_store::Event),
) -> anyhow::Result<()> {
    let mut after = None;
    loop {
        let page = store
            .events(EventQuery {
                kind: Some(kind.to_owned()),
                after_seq: after,
                limit: Some(5000),
                ..EventQuery::default()
            })
            .await
            .with_context(|| format!("reading {kind} events"))?;
        let Some(last) = page.last() else {
            return Ok(());
        };
        after = Some(last.seq);
        for event in &page {
            f(event);
        }
    }
}

/// The generated keel config: policies on (retries, fallback to the small model,
/// breaker, task attempts) or off (a plain pass-through).
fn config_text(listen: &str, db: &Path, sim_base_url: &str, policies_on: bool) -> String {
    let db = db.display().to_string().replace('\\', "/");
    let common = format!(
        r#"# Written by keel sim; policies {on_off}.
[server]
listen = "{listen}"

[store]
url = "sqlite://{db}"

[providers.sim]
kind = "openai"
base_url = "{sim_base_url}"
"#,
        on_off = if policies_on { "on" } else { "off" },
    );
    let policies = if policies_on {
        format!(
            r#"
[routes.{ROUTE}]
targets = [
  {{ provider = "sim", model = "{LARGE}" }},
  {{ provider = "sim", model = "{SMALL}" }},
]
retry = {{ max_attempts = 3, base = "100ms", cap = "2s", jitter = "full", respect_retry_after = true, budget_ratio = 0.5 }}
timeouts = {{ connect = "1s", first_token = "3s", idle = "2s", attempt = "3s", total = "20s" }}

[breaker]
window = "count"
window_size = 50
min_calls = 20
failure_rate = 0.5
slow_call_rate = 1.0
slow_call = "10s"
open_for = "5s"
half_open_calls = 3

[agents.{AGENT}]
max_attempts = 3
# A task that needs a capability no tool gives is refused when it is created.
preflight = ["input.needs.all(t, t == '{ACT}')"]
"#
        )
    } else {
        format!(
            r#"
[routes.{ROUTE}]
targets = [{{ provider = "sim", model = "{LARGE}" }}]
retry = {{ max_attempts = 1 }}
timeouts = {{ connect = "10s", first_token = "30s", idle = "30s", attempt = "30s", total = "30s" }}
# No breaker: a verdict needs a million calls in the window, far more than any run makes.
breaker = {{ window = "count", window_size = 1000000, min_calls = 1000000, failure_rate = 1.0, slow_call_rate = 1.0, slow_call = "30s", open_for = "1s", half_open_calls = 1 }}

[agents.{AGENT}]
max_attempts = 1
loop_guard = false
"#
        )
    };
    common + &policies + &tool_text(sim_base_url, policies_on)
}

/// The one tool the fleet's agents have: a task that needs another is infeasible.
const ACT: &str = fleet::ACT_TOOL;

/// The rule that stops a risky action, and the one that stops a loop of calls.
const RISK_RULE: &str = "args.amount <= 500";
const LOOP_RULE: &str = "history.calls < 4";

/// The guard a blocking rule stands for in the report's `caught`.
fn guard_of(rule: &str) -> String {
    match rule {
        RISK_RULE => "action_rule".to_owned(),
        LOOP_RULE => "loop_limit".to_owned(),
        "loop:same_call" => "loop_guard".to_owned(),
        "injection" => "injection".to_owned(),
        other => format!("rule {other}"),
    }
}

/// The `[tools.act]` section: the simulated tool the agents act through, with the
/// guards (policies on) or without (off).
fn tool_text(sim_base_url: &str, guarded: bool) -> String {
    let rules = if guarded {
        format!("rules = [\"{RISK_RULE}\", \"{LOOP_RULE}\"]\n")
    } else {
        String::new()
    };
    format!(
        "\n[tools.{tool}]\nurl = \"{sim_base_url}/tools/{tool}\"\n{rules}",
        tool = fleet::ACT_TOOL
    )
}

/// The run's config from a user's: its first route (its retry, timeouts, breaker,
/// degraded reply) with the targets pointed at the simulated models (`large` first,
/// `small` as the fallback when the route has more than one target), `[breaker]`, and
/// the first agent's limits for the fleet's agent. What cannot apply to a simulation
/// goes: other routes and providers, keys, budgets, tools, `[chaos]` (the fault mix
/// injects the faults), the admin token. Returns the text and the route's name.
fn from_user_config(
    user: &Path,
    listen: &str,
    db: &Path,
    sim_base_url: &str,
) -> anyhow::Result<(String, String)> {
    // Check it as keel would first, so problems are reported with file, line and key.
    // Secrets need not be set: keys and tokens do not reach the simulation. Each variable gets
    // a placeholder of its own, since two agent keys may not be the same.
    if let Err(errors) = keel_config::load(user, &|var| Some(format!("keel-sim-placeholder-{var}")))
    {
        let lines: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
        bail!("{}", lines.join("\n"));
    }
    let text =
        std::fs::read_to_string(user).with_context(|| format!("cannot read {}", user.display()))?;
    let doc: toml_edit::DocumentMut = text
        .parse()
        .with_context(|| format!("{} is not TOML", user.display()))?;
    let route_name = doc
        .get("routes")
        .and_then(toml_edit::Item::as_table_like)
        .and_then(|routes| routes.iter().next().map(|(name, _)| name.to_owned()))
        .with_context(|| format!("{} has no [routes.*] to simulate", user.display()))?;
    let mut route = doc["routes"][&route_name].clone();
    let targets = route
        .get("targets")
        .and_then(toml_edit::Item::as_array)
        .map_or(1, toml_edit::Array::len);
    let mut sim_targets = toml_edit::Array::new();
    for model in [LARGE, SMALL].into_iter().take(targets.clamp(1, 2)) {
        let mut target = toml_edit::InlineTable::new();
        target.insert("provider", "sim".into());
        target.insert("model", model.into());
        sim_targets.push(target);
    }
    route["targets"] = toml_edit::value(sim_targets);
    let limits = doc
        .get("agents")
        .and_then(toml_edit::Item::as_table_like)
        .and_then(|agents| agents.iter().next().map(|(_, a)| a.clone()));
    let mut agent = toml_edit::Table::new();
    for key in ["max_attempts", "max_steps", "task_timeout"] {
        if let Some(value) = limits.as_ref().and_then(|a| a.get(key)) {
            agent.insert(key, value.clone());
        }
    }
    let breaker = doc.get("breaker").cloned();
    let mut out = toml_edit::DocumentMut::new();
    let mut server = toml_edit::Table::new();
    server.insert("listen", toml_edit::value(listen));
    out.insert("server", toml_edit::Item::Table(server));
    let mut store = toml_edit::Table::new();
    store.insert(
        "url",
        toml_edit::value(format!("sqlite://{}", db.display())),
    );
    out.insert("store", toml_edit::Item::Table(store));
    let mut provider = toml_edit::Table::new();
    provider.insert("kind", toml_edit::value("openai"));
    provider.insert("base_url", toml_edit::value(sim_base_url));
    let mut providers = toml_edit::Table::new();
    providers.set_implicit(true);
    providers.insert("sim", toml_edit::Item::Table(provider));
    out.insert("providers", toml_edit::Item::Table(providers));
    let mut routes = toml_edit::Table::new();
    routes.set_implicit(true);
    routes.insert(&route_name, route);
    out.insert("routes", toml_edit::Item::Table(routes));
    if let Some(breaker) = breaker {
        out.insert("breaker", breaker);
    }
    let mut agents = toml_edit::Table::new();
    agents.set_implicit(true);
    agents.insert(AGENT, toml_edit::Item::Table(agent));
    out.insert("agents", toml_edit::Item::Table(agents));
    let text = format!(
        "# Written by keel sim from {}: route {route_name:?} with its targets on the simulated models.\n{out}{}",
        user.display(),
        tool_text(sim_base_url, true)
    );
    Ok((text, route_name))
}

/// A port free right now on loopback (keel binds it a moment later).
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(listener.local_addr().context("no local address")?.port())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// This process's peak RSS and CPU time (keel in-process shares it with the fleet).
fn own_usage() -> Usage {
    proc_usage("self")
}

/// Peak RSS (`VmHWM`) and user + system CPU of `/proc/<pid>`.
fn proc_usage(pid: &str) -> Usage {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let peak_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let ticks = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let field = |i: usize| {
                fields
                    .get(i)
                    .and_then(|f| f.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            // utime and stime are fields 14 and 15 of stat; 12 and 13 after the ')'.
            field(11) + field(12)
        })
        .unwrap_or(0.0);
    Usage {
        peak_rss_mb: peak_kib / 1024.0,
        // The kernel's USER_HZ is 100 on Linux.
        cpu_s: ticks / 100.0,
    }
}

/// A `keel serve` child process.
struct ChildKeel {
    child: Child,
    config: PathBuf,
    log: PathBuf,
    /// Usage of the instances already gone (killed).
    gone: Usage,
}

impl ChildKeel {
    async fn start(config: &Path, log: &Path) -> anyhow::Result<Self> {
        let child = spawn_keel(config, log).await?;
        Ok(Self {
            child,
            config: config.to_owned(),
            log: log.to_owned(),
            gone: Usage::default(),
        })
    }

    /// The child's pid; `None` once it has been reaped.
    fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Usage over every instance so far: the largest peak, the summed CPU.
    fn usage(&self) -> Usage {
        let now = self
            .pid()
            .map_or_else(Usage::default, |pid| proc_usage(&pid.to_string()));
        Usage {
            peak_rss_mb: now.peak_rss_mb.max(self.gone.peak_rss_mb),
            cpu_s: now.cpu_s + self.gone.cpu_s,
        }
    }

    /// The exit status, once the child has ended.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    async fn kill9_and_restart(&mut self) -> anyhow::Result<()> {
        self.gone = self.usage();
        self.child.start_kill().context("cannot kill keel")?;
        let _ = self.child.wait().await;
        self.child = spawn_keel(&self.config, &self.log).await?;
        Ok(())
    }

    /// SIGTERM, then wait for the graceful shutdown.
    async fn stop(mut self) {
        let Some(pid) = self.pid() else {
            return;
        };
        let term = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
        if !term.is_ok_and(|status| status.success()) {
            let _ = self.child.start_kill();
        }
        if tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
    }
}

/// Starts `keel serve --config CONFIG`, its stderr appended to `log`, and waits for
/// its `keel listening on` line.
async fn spawn_keel(config: &Path, log: &Path) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("cannot find the keel executable")?;
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let mut child = Command::new(exe)
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .context("cannot start keel serve")?;
    let stdout = child.stdout.take().context("keel has no stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.starts_with("keel listening on ") {
                return true;
            }
        }
        false
    })
    .await;
    if ready != Ok(true) {
        let _ = child.start_kill();
        bail!(
            "keel did not start (see {}); config: {}",
            log.display(),
            config.display()
        );
    }
    // Keep draining stdout so keel never blocks on a full pipe.
    let drain = async move { while let Ok(Some(_)) = lines.next_line().await {} };
    #[expect(
        clippy::disallowed_methods,
        reason = "a detached reader of the child's stdout; it ends with the child"
    )]
    tokio::spawn(drain);
    Ok(child)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_generated_configs_are_valid() {
        let dir = tempfile::tempdir().unwrap();
        for on in [true, false] {
            let path = dir.path().join(format!("keel-{on}.toml"));
            let text = config_text(
                "127.0.0.1:0",
                &dir.path().join("k.db"),
                "http://127.0.0.1:9/v1",
                on,
            );
            std::fs::write(&path, text).unwrap();
            let settings = keel_config::load(&path, &|_| None).unwrap_or_else(|e| {
                panic!(
                    "{}",
                    e.0.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("\n")
                )
            });
            let route = settings.routes.get(ROUTE).unwrap();
            assert_eq!(route.targets.len(), if on { 2 } else { 1 });
        }
    }

    #[test]
    fn a_user_config_keeps_its_policies_on_the_simulated_models() {
        let dir = tempfile::tempdir().unwrap();
        let user = dir.path().join("user.toml");
        std::fs::write(
            &user,
            r#"
[server]
admin_token_env = "NOT_SET_ANYWHERE"

[providers.openai]
kind = "openai"
base_url = "https://api.openai.com/v1"

[routes.smart]
targets = [
  { provider = "openai", model = "gpt-5" },
  { provider = "openai", model = "gpt-5-mini" },
  { provider = "openai", model = "gpt-4.1" },
]
degraded_reply = "busy"
retry = { max_attempts = 5, base = "50ms", cap = "1s", jitter = "equal" }

[routes.other]
targets = [{ provider = "openai", model = "x" }]

[breaker]
min_calls = 7

[agents.support]
keys_env = ["NOT_SET_EITHER", "NOR_THIS_ONE"]
max_attempts = 4

[agents.billing]
keys_env = ["NOT_SET_AT_ALL"]
"#,
        )
        .unwrap();
        let (text, route) = from_user_config(
            &user,
            "127.0.0.1:0",
            &dir.path().join("k.db"),
            "http://127.0.0.1:9/v1",
        )
        .unwrap();
        assert_eq!(route, "smart");
        let path = dir.path().join("sim.toml");
        std::fs::write(&path, &text).unwrap();
        let settings = keel_config::load(&path, &|_| None).unwrap_or_else(|e| {
            panic!(
                "{}\n{text}",
                e.0.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
        let smart = settings.routes.get("smart").unwrap();
        let targets: Vec<&str> = smart.targets.iter().map(|t| t.model.as_str()).collect();
        assert_eq!(targets, [LARGE, SMALL]);
        assert_eq!(smart.retry.max_attempts.get(), 5);
        assert_eq!(smart.degraded_reply.as_deref(), Some("busy"));
        assert!(!settings.routes.contains_key("other"));
        assert_eq!(settings.agents.get(AGENT).unwrap().max_attempts.get(), 4);
        assert!(settings.server.admin_token.is_none());
        assert!(text.contains("min_calls = 7"), "{text}");
    }

    #[test]
    fn proc_usage_reads_this_process() {
        let usage = proc_usage("self");
        assert!(usage.peak_rss_mb > 1.0, "{usage:?}");
    }
}
