//! keel's developer tasks, run as `cargo xtask <command>` (the alias lives in `.cargo/config.toml`).
//!
//! - `cargo xtask test`: the whole CI gate, and all that `.ci/run` does. Installs what the test
//!   suites need ([`install`]), then fmt, clippy, rustdoc, doctests and nextest ([`test_cmd`]).
//! - `cargo xtask bench`: the benchmarks ([`bench_cmd`]); writes `bench/results.json`
//!   (DESIGN.md §8).
//!
//! This file only parses the command line and dispatches. xtask is a command-line program whose
//! job is to print progress and tables for people, hence the crate-wide print exception.
#![expect(
    clippy::print_stdout,
    reason = "xtask is a developer CLI whose job is printing progress, timings and tables"
)]

mod backoff_sim;
mod bench_cmd;
mod bench_gateway;
mod bench_pg;
mod bench_sim;
mod bench_store;
mod conversation;
mod gateway_overhead;
mod install;
mod process;
mod test_cmd;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::bench_cmd::{BenchArgs, BenchPart};
use crate::test_cmd::{Step, TestArgs};

const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  test   [--skip STEP]... [--only STEP]...
         install test tools, then run the CI gate in order:
         install, fmt, clippy, doc, doctest, nextest
  bench  [backoff] [gateway] [store] [sim] [postgres] [--seed N] [--duration SECS] [--events N]
         run the benchmarks (default: all) and write bench/results.json;
         --events: size of the store benchmark's recovery store (default 1000000)
  help   print this text";

/// A parsed command line.
#[derive(Debug, PartialEq)]
enum Cli {
    Test(TestArgs),
    Bench(BenchArgs),
    Help,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cli = match parse(&args) {
        Ok(cli) => cli,
        Err(err) => {
            println!("error: {err:#}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match cli {
        Cli::Help => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        Cli::Test(args) => test_cmd::run(&args),
        // The load generator and the simulated upstream run in this process:
        // measured in a debug build, they, not keel, would be the bottleneck.
        Cli::Bench(_) if cfg!(debug_assertions) => rerun_in_release(),
        Cli::Bench(args) => bench_cmd::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            println!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Parses the arguments after `cargo xtask`.
fn parse(args: &[String]) -> anyhow::Result<Cli> {
    let Some((command, rest)) = args.split_first() else {
        return Ok(Cli::Help);
    };
    match command.as_str() {
        "test" => parse_test(rest).map(Cli::Test),
        "bench" => parse_bench(rest).map(Cli::Bench),
        "help" | "-h" | "--help" => Ok(Cli::Help),
        other => bail!("unknown command `{other}`"),
    }
}

fn parse_test(args: &[String]) -> anyhow::Result<TestArgs> {
    let mut parsed = TestArgs::default();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let list = match arg.as_str() {
            "--skip" => &mut parsed.skip,
            "--only" => &mut parsed.only,
            other => bail!("unknown option `{other}` for `test`"),
        };
        let value = args
            .next()
            .with_context(|| format!("{arg} needs a step name"))?;
        for name in value.split(',') {
            list.push(Step::from_name(name)?);
        }
    }
    Ok(parsed)
}

/// Runs this same command again from an optimized build of xtask (profile `bench-harness`:
/// release without keel's LTO, see the workspace's Cargo.toml).
fn rerun_in_release() -> anyhow::Result<ExitCode> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args([
            "run",
            "--quiet",
            "--profile",
            "bench-harness",
            "--package",
            "xtask",
            "--",
        ])
        .args(std::env::args_os().skip(1))
        .status()
        .map_err(|e| anyhow::anyhow!("cannot rerun xtask in its optimized build: {e}"))?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}

fn parse_bench(args: &[String]) -> anyhow::Result<BenchArgs> {
    let mut parsed = BenchArgs::default();
    let mut parts = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seed" => {
                let value = args.next().context("--seed needs a number")?;
                parsed.seed = value.parse().with_context(|| format!("--seed {value}"))?;
            }
            "--duration" => {
                let value = args
                    .next()
                    .context("--duration needs a number of seconds")?;
                let secs: u64 = value
                    .parse()
                    .with_context(|| format!("--duration {value}"))?;
                if secs == 0 {
                    bail!("--duration must be at least 1 second");
                }
                parsed.duration = Duration::from_secs(secs);
            }
            "--events" => {
                let value = args.next().context("--events needs a number")?;
                let events: u64 = value.parse().with_context(|| format!("--events {value}"))?;
                if events < bench_store::EVENTS_PER_TASK {
                    bail!(
                        "--events must be at least {} (one task)",
                        bench_store::EVENTS_PER_TASK
                    );
                }
                parsed.store_events = events;
            }
            name => parts.push(BenchPart::from_name(name)?),
        }
    }
    if !parts.is_empty() {
        parsed.parts = parts;
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn no_arguments_prints_help() {
        assert_eq!(parse(&[]).unwrap(), Cli::Help);
    }

    #[test]
    fn test_accepts_repeated_and_comma_separated_steps() {
        let Cli::Test(parsed) = parse(&args("test --skip doc --only install,fmt")).unwrap() else {
            panic!("not a test command");
        };
        assert_eq!(parsed.skip, vec![Step::Doc]);
        assert_eq!(parsed.only, vec![Step::Install, Step::Fmt]);
    }

    #[test]
    fn test_rejects_unknown_step() {
        assert!(parse(&args("test --skip lint")).is_err());
    }

    #[test]
    fn bench_defaults_to_every_part() {
        let Cli::Bench(parsed) = parse(&args("bench")).unwrap() else {
            panic!("not a bench command");
        };
        assert_eq!(parsed, BenchArgs::default());
        assert_eq!(
            parsed.parts,
            vec![
                BenchPart::Backoff,
                BenchPart::Gateway,
                BenchPart::Store,
                BenchPart::Sim,
                BenchPart::Postgres
            ]
        );
        assert_eq!(parsed.store_events, 1_000_000);
    }

    #[test]
    fn bench_postgres_is_a_part_of_its_own() {
        let Cli::Bench(parsed) = parse(&args("bench postgres --duration 5")).unwrap() else {
            panic!("not a bench command");
        };
        assert_eq!(parsed.parts, vec![BenchPart::Postgres]);
        assert_eq!(parsed.duration, std::time::Duration::from_secs(5));
    }

    #[test]
    fn bench_store_takes_an_event_count() {
        let Cli::Bench(parsed) = parse(&args("bench store --events 200000")).unwrap() else {
            panic!("not a bench command");
        };
        assert_eq!(parsed.parts, vec![BenchPart::Store]);
        assert_eq!(parsed.store_events, 200_000);
    }

    #[test]
    fn bench_rejects_a_store_smaller_than_one_task() {
        assert!(parse(&args("bench store --events 9")).is_err());
        assert!(parse(&args("bench store --events lots")).is_err());
        assert!(parse(&args("bench store --events")).is_err());
    }

    #[test]
    fn bench_takes_parts_seed_and_duration() {
        let Cli::Bench(parsed) = parse(&args("bench backoff --seed 7 --duration 3")).unwrap()
        else {
            panic!("not a bench command");
        };
        assert_eq!(parsed.parts, vec![BenchPart::Backoff]);
        assert_eq!(parsed.seed, 7);
        assert_eq!(parsed.duration, Duration::from_secs(3));
    }

    #[test]
    fn bench_rejects_zero_duration() {
        assert!(parse(&args("bench --duration 0")).is_err());
    }

    #[test]
    fn unknown_command_is_an_error() {
        assert!(parse(&args("deploy")).is_err());
    }
}
