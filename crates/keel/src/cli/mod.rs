//! Command-line structure (clap) and dispatch. No logic lives here beyond
//! choosing what to run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod admin;
mod remote;

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
    /// Run the gateway (and, as they land, supervisor and observe) until Ctrl-C.
    ///
    /// With no --config, an embedded default: SQLite under ./keel-data, listen 127.0.0.1:8420.
    Serve {
        /// Path to keel.toml.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
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
}

/// How the CLI reaches a running keel.
#[derive(Debug, clap::Args)]
pub(crate) struct ServerArgs {
    /// keel's address.
    #[arg(
        long,
        global = true,
        env = "KEEL_SERVER",
        default_value = "http://127.0.0.1:8420"
    )]
    pub(crate) server: String,
    /// Print JSON for scripts instead of tables.
    #[arg(long, global = true)]
    pub(crate) json: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum TasksCommand {
    /// List tasks, newest last.
    Ls {
        /// Only tasks in this state (queued, running, succeeded, dead, awaiting_human, cancelled).
        #[arg(long)]
        state: Option<String>,
        /// Only tasks of this agent.
        #[arg(long)]
        agent: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Continue from a previous page.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Show one task.
    Show {
        /// Task id.
        id: String,
    },
    /// Show a task's event log.
    Events {
        /// Task id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum DlqCommand {
    /// List dead tasks.
    Ls,
    /// Show a dead task with its last error.
    Show {
        /// Task id.
        id: String,
    },
    /// Put a dead task back in the queue with fresh attempts.
    Requeue {
        /// Task id.
        id: String,
    },
    /// Give up on a dead task (it ends cancelled).
    Discard {
        /// Task id.
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
        id: String,
        /// A note for the log.
        #[arg(long)]
        note: Option<String>,
    },
    /// Deny: the task goes to the dead-letter queue.
    Deny {
        /// Approval id.
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
        }
    }
}

fn check(file: &std::path::Path) -> ExitCode {
    match keel_config::load(file, &|name| std::env::var(name).ok()) {
        Ok(settings) => {
            // A config that injects faults must not pass a check unnoticed.
            let chaos = if settings.chaos.enabled {
                format!(
                    "; chaos ENABLED: {} fault rules, {} outages",
                    settings.chaos.faults.len(),
                    settings.chaos.outages.len()
                )
            } else {
                String::new()
            };
            output::line(&format!(
                "{}: ok ({} providers, {} routes, {} agents){chaos}",
                file.display(),
                settings.providers.len(),
                settings.routes.len(),
                settings.agents.len()
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
