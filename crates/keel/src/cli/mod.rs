//! Command-line structure (clap) and dispatch. No logic lives here beyond
//! choosing what to run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod admin;
mod remote;
mod sim;

use crate::{output, serve};

/// keel: a reliability supervisor for AI agents in production.
#[derive(Debug, Parser)]
#[command(name = "keel", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway, the task supervisor and the observer until Ctrl-C or SIGTERM.
    ///
    /// With no --config, an embedded default: SQLite under ./keel-data, listen 127.0.0.1:8420,
    /// and no routes (./keel.toml is not read: pass it with --config).
    Serve {
        /// Path to keel.toml.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Run a fleet of simulated agents through keel with faults injected, and report.
    ///
    /// Starts the simulated model server and keel (as a child process, so the mix's
    /// `kill -9` is real), runs the agents until every task has ended, and writes
    /// report.md, report.json and report.svg into --report.
    Sim {
        #[command(flatten)]
        fleet: FleetArgs,
        /// Run keel's policies (retry, fallback, breaker, task attempts) or a plain pass-through.
        #[arg(long, value_enum, default_value = "on")]
        policies: OnOff,
        /// Agents working at once.
        #[arg(long, default_value_t = 50)]
        agents: u32,
        /// Tasks to create.
        #[arg(long, default_value_t = 500)]
        tasks: u32,
        /// Where to write the report (and keel's config, log and database).
        #[arg(long, value_name = "DIR", default_value = "keel-sim-report")]
        report: PathBuf,
        /// Run the fleet against this already running keel instead of starting one (its
        /// own providers answer, so only the mix's agent deaths apply; $KEEL_AGENT_KEY
        /// and $KEEL_ADMIN_TOKEN are sent when set).
        #[arg(long, value_name = "URL")]
        server: Option<String>,
        /// With --server: the route the agents call.
        #[arg(long, default_value = "fleet", requires = "server")]
        route: String,
        /// With --server: the agent the tasks belong to (best one of its own: the fleet
        /// claims every queued task of it).
        #[arg(long, default_value = "fleet", requires = "server")]
        agent: String,
    },
    /// The first thing to run: keel, the simulated models and 200 agents under the
    /// standard fault mix for about a minute, then the report; keel stays up.
    Demo {
        #[command(flatten)]
        fleet: FleetArgs,
        /// Stop after the report instead of keeping keel up until Ctrl-C.
        #[arg(long)]
        exit: bool,
        /// Agents working at once.
        #[arg(long, default_value_t = 200)]
        agents: u32,
        /// Tasks to create.
        #[arg(long, default_value_t = 6000)]
        tasks: u32,
        /// Where to write the report (and keel's config and database).
        #[arg(long, value_name = "DIR", default_value = "keel-demo")]
        report: PathBuf,
        /// Where keel listens (the CLI's default --server is http://127.0.0.1:8420).
        #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:8420")]
        listen: std::net::SocketAddr,
    },
    /// Work with configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Inspect tasks and their event logs.
    Tasks {
        #[command(subcommand)]
        command: TasksCommand,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// The dead-letter queue: tasks that ran out of attempts.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// The human approval queue.
    Approvals {
        #[command(subcommand)]
        command: ApprovalsCommand,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Check the event log's hash chain.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// What happened to a task, or in an incident: the timeline, the event where it started
    /// to go wrong, and what keel and people did about it.
    Postmortem {
        /// A task id, or an incident id (`inc_N`, see `GET /v1/incidents`).
        #[arg(value_parser = clap::builder::NonEmptyStringValueParser::new())]
        id: String,
        /// Markdown for people, or the JSON of `GET /v1/postmortem/{id}`.
        #[arg(long, value_enum, default_value = "md")]
        format: Format,
        #[command(flatten)]
        server: ServerArgs,
    },
}

/// Tasks `keel tasks ls` lists by default: a screenful.
pub(crate) const TASKS_PAGE: u64 = 50;

/// Dead tasks `keel dlq ls` lists by default.
pub(crate) const DLQ_PAGE: u64 = keel_store::DEFAULT_PAGE as u64;

/// The most a listing's `--limit` takes: a page of the store's.
const MAX_LIMIT: u64 = keel_store::MAX_PAGE as u64;

/// The order of a listing, by creation time (the API's `order`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Order {
    // Variants without doc comments keep `--help` to one line: the flag's own help names
    // both.
    Desc,
    Asc,
}

impl Order {
    /// The API's value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Order::Desc => "desc",
            Order::Asc => "asc",
        }
    }

    /// This order as a value its listing must be told again, when its default is
    /// `default`; `None` when it is the default.
    pub(crate) fn unless(self, default: Order) -> Option<&'static str> {
        (self != default).then_some(self.as_str())
    }
}

/// How `keel postmortem` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// Markdown.
    Md,
    /// JSON.
    Json,
}

/// Options `keel sim` and `keel demo` share.
#[derive(Debug, clap::Args)]
struct FleetArgs {
    /// A fault mix (TOML); the built-in sim/faults/standard.toml when absent.
    #[arg(long, value_name = "FILE")]
    faults: Option<PathBuf>,
    /// Seed of the task scripts and of the fault schedule: same seed, same run.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Mean pause between an agent's model calls (its tool work), e.g. 200ms.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    think: std::time::Duration,
    /// How long to wait, once every task exists, for all of them to end.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    drain_timeout: std::time::Duration,
    /// Try your own keel.toml's policies: its first route (retry, timeouts, breaker,
    /// degraded reply) with the targets pointed at the simulated models, its `[breaker]`
    /// and its first agent's limits (with --policies on).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

/// `on` or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

impl FleetArgs {
    fn sim_args(self, agents: u32, tasks: u32, report: PathBuf, policies_on: bool) -> sim::SimArgs {
        sim::SimArgs {
            agents,
            tasks,
            faults: self.faults,
            policies_on,
            report,
            seed: self.seed,
            think: self.think,
            drain_timeout: self.drain_timeout,
            config: self.config,
        }
    }
}

/// How the CLI reaches a running keel.
#[derive(Debug, clap::Args)]
pub(crate) struct ServerArgs {
    /// keel's address, like http://127.0.0.1:8420 [default: the listen address of --config,
    /// else http://127.0.0.1:8420]
    #[arg(long, global = true, env = "KEEL_SERVER", value_name = "URL")]
    pub(crate) server: Option<String>,
    /// The keel.toml the server runs with: its `[server]` gives the address and the admin
    /// token (from its `admin_token_env`; $KEEL_ADMIN_TOKEN wins when set).
    #[arg(long, short = 'c', global = true, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Print JSON for scripts instead of tables.
    #[arg(long, global = true)]
    pub(crate) json: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum TasksCommand {
    /// List tasks, newest first.
    Ls {
        /// Only tasks in this state (queued, running, succeeded, dead, awaiting_human, cancelled).
        #[arg(long)]
        state: Option<String>,
        /// Only tasks of this agent.
        #[arg(long)]
        agent: Option<String>,
        /// At most this many (1 to 1000).
        #[arg(long, default_value_t = TASKS_PAGE, value_parser = clap::value_parser!(u64).range(1..=MAX_LIMIT))]
        limit: u64,
        /// Continue from a previous page (the `--cursor` a listing ends with, in the same order).
        #[arg(long)]
        cursor: Option<String>,
        /// desc: newest first; asc: oldest first.
        #[arg(long, value_enum, default_value_t = Order::Desc)]
        order: Order,
    },
    /// Show one task.
    Show {
        /// Task id.
        #[arg(value_parser = clap::builder::NonEmptyStringValueParser::new())]
        id: String,
    },
    /// Show a task's event log.
    Events {
        /// Task id.
        #[arg(value_parser = clap::builder::NonEmptyStringValueParser::new())]
        id: String,
    },
    /// Put a running or dead task back in the queue (a running one loses its lease: its
    /// worker gets 409 from then on).
    Requeue {
        /// Task id.
        #[arg(value_parser = clap::builder::NonEmptyStringValueParser::new())]
        id: String,
        /// Why (kept in the task's log).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Stop a task that has not ended (it ends cancelled; a worker holding it is told to
    /// stop on its next heartbeat or step).
    Cancel {
        /// Task id.
        #[arg(value_parser = clap::builder::NonEmptyStringValueParser::new())]
        id: String,
        /// Why (kept in the task's log).
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum DlqCommand {
    /// List dead tasks, the first created first.
    Ls {
        /// Only dead tasks of this agent.
        #[arg(long)]
        agent: Option<String>,
        /// At most this many (1 to 1000).
        #[arg(long, default_value_t = DLQ_PAGE, value_parser = clap::value_parser!(u64).range(1..=MAX_LIMIT))]
        limit: u64,
        /// Continue from a previous page (the `--cursor` a listing ends with, in the same order).
        #[arg(long)]
        cursor: Option<String>,
        /// asc: oldest first; desc: newest first.
        #[arg(long, value_enum, default_value_t = Order::Asc)]
        order: Order,
    },
    /// Show a dead task with its last error.
    Show {
        /// Task id.
        #[arg(value_parser = clap::builder::NonEmptyStringValueParser::new())]
        id: String,
    },
    /// Put a dead task back in the queue with fresh attempts.
    Requeue {
        /// Task id.
        #[arg(value_parser = clap::builder::NonEmptyStringValueParser::new())]
        id: String,
        /// Why (kept in the task's log).
        #[arg(long)]
        note: Option<String>,
    },
    /// Give up on a dead task (it ends cancelled).
    Discard {
        /// Task id.
        #[arg(value_parser = clap::builder::NonEmptyStringValueParser::new())]
        id: String,
        /// Why.
        #[arg(long)]
        note: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum ApprovalsCommand {
    /// List pending approvals.
    Ls,
    /// Approve: the task is queued again and resumes from its checkpoint.
    Approve {
        /// Approval id.
        #[arg(value_parser = clap::builder::NonEmptyStringValueParser::new())]
        id: String,
        /// A note for the log.
        #[arg(long)]
        note: Option<String>,
    },
    /// Deny: the task goes to the dead-letter queue.
    Deny {
        /// Approval id.
        #[arg(value_parser = clap::builder::NonEmptyStringValueParser::new())]
        id: String,
        /// A note for the log.
        #[arg(long)]
        note: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// Recompute the hash chain and name the first broken link.
    Verify,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a config and print precise errors (file, line, key).
    Check {
        /// Path to keel.toml (default: ./keel.toml).
        #[arg(value_name = "FILE", default_value = "keel.toml")]
        file: PathBuf,
    },
}

impl Cli {
    /// Runs the chosen command.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        match self.command {
            Command::Serve { config } => serve::run(config.as_deref()),
            Command::Sim {
                fleet,
                policies,
                agents,
                tasks,
                report,
                server,
                route,
                agent,
            } => {
                let remote = match server {
                    Some(url) => Some(sim::Remote {
                        url: remote::base_url(&url)?,
                        route,
                        agent,
                    }),
                    None => None,
                };
                sim::run_sim(
                    &fleet.sim_args(agents, tasks, report, policies == OnOff::On),
                    remote.as_ref(),
                )
            }
            Command::Demo {
                fleet,
                exit,
                agents,
                tasks,
                report,
                listen,
            } => sim::run_demo(&fleet.sim_args(agents, tasks, report, true), exit, listen),
            Command::Config {
                command: ConfigCommand::Check { file },
            } => Ok(check(&file)),
            Command::Tasks { command, server } => {
                remote::run(&server, |c| remote::tasks(c, command, server.json))
            }
            Command::Dlq { command, server } => {
                remote::run(&server, |c| remote::dlq(c, command, server.json))
            }
            Command::Approvals { command, server } => {
                remote::run(&server, |c| remote::approvals(c, command, server.json))
            }
            Command::Audit {
                command: AuditCommand::Verify,
                server,
            } => remote::run(&server, |c| remote::audit(c, server.json)),
            Command::Postmortem { id, format, server } => {
                let json = server.json || format == Format::Json;
                remote::run(&server, |c| remote::postmortem(c, id, json))
            }
        }
    }
}

fn check(file: &std::path::Path) -> ExitCode {
    match keel_config::load(file, &|name| std::env::var(name).ok()) {
        Ok(settings) => {
            let problems = crate::serve::build_problems(file, &settings);
            for problem in &problems {
                output::error(problem);
            }
            if !problems.is_empty() {
                return ExitCode::from(2);
            }
            // Wasm modules are compiled as `keel serve` would: a bad one fails here.
            let problems = keel_gateway::tools::Tools::wasm_problems(&settings.tools);
            if !problems.is_empty() {
                for (tool, detail) in problems {
                    let key = keel_config::KeyPath::root()
                        .child("tools")
                        .child(&tool)
                        .child("wasm");
                    output::error(&keel_config::error_at(file, &key, detail).to_string());
                }
                return ExitCode::from(2);
            }
            if let Some(warning) = crate::serve::exposure_warning(file, &settings) {
                output::warning(&warning);
            }
            let count =
                |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
            // A config that injects faults must not pass a check unnoticed.
            let chaos = if settings.chaos.enabled {
                format!(
                    "; chaos ENABLED: {}, {}",
                    count(settings.chaos.faults.len(), "fault rule"),
                    count(settings.chaos.outages.len(), "outage")
                )
            } else {
                String::new()
            };
            output::line(&format!(
                "{}: ok ({}, {}, {}, {}){chaos}",
                file.display(),
                count(settings.providers.len(), "provider"),
                count(settings.routes.len(), "route"),
                count(settings.agents.len(), "agent"),
                count(settings.tools.len(), "tool")
            ));
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                output::error(&e.to_string());
            }
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::{Cli, Command};

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn admin_commands_take_the_config_before_or_after_the_subcommand() {
        for args in [
            ["keel", "tasks", "--config", "k.toml", "ls"],
            ["keel", "tasks", "ls", "-c", "k.toml"],
        ] {
            let Command::Tasks { server, .. } = Cli::parse_from(args).command else {
                panic!("not tasks");
            };
            assert_eq!(server.config.unwrap().to_str(), Some("k.toml"));
            assert_eq!(server.server, None);
        }
    }
}
