//! Command-line structure (clap) and dispatch. No logic lives here beyond
//! choosing what to run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
        }
    }
}

fn check(file: &std::path::Path) -> ExitCode {
    match keel_config::load(file, &|name| std::env::var(name).ok()) {
        Ok(settings) => {
            output::line(&format!(
                "{}: ok ({} providers, {} routes, {} agents)",
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
