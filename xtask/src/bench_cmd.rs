//! `cargo xtask bench`: runs the benchmarks, prints their tables, and writes
//! `bench/results.json` (DESIGN.md §8): an array of `{name, metric, value, unit, baseline,
//! ratio, command}`, where `ratio = value / baseline`.
//!
//! Parts, each selectable by name: `backoff` (retry backoff under contention, beside the figures
//! of the AWS Architecture Blog article "Exponential Backoff And Jitter"), `gateway` (the
//! latency, throughput and memory keel adds in front of a simulated model server, see
//! [`crate::gateway_overhead`]) and `store` (durable appends beside the disk's fsync rate, and
//! reopening a large store, see [`crate::bench_store`]) and `sim` (a fleet of 1,000 agents under
//! the standard fault mix, see [`crate::bench_sim`]) and `postgres` (event appends and
//! claim-and-complete with 1 and 3 nodes on one PostgreSQL, see [`crate::bench_pg`]). A run replaces the entries of the parts it ran and keeps the
//! others, so `cargo xtask bench backoff` does not erase the gateway figures.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::backoff_sim::{self, ContentionRow};
use crate::bench_store::{self, StoreBenchConfig};
use crate::gateway_overhead;
use crate::process::workspace_root;

/// Clients contending in the backoff simulation, as in the article.
const BACKOFF_CLIENTS: usize = 100;

/// One part of the benchmark suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchPart {
    /// Backoff with jitter under contention, against the article's figures.
    Backoff,
    /// keel's overhead over a direct call to the simulated model server.
    Gateway,
    /// The event store: durable append throughput and latency, and recovery time.
    Store,
    /// A fleet of 1,000 simulated agents under the standard fault mix, policies on and off.
    Sim,
    /// Event appends and claim-and-complete with 1 and 3 nodes on one PostgreSQL.
    Postgres,
}

impl BenchPart {
    /// The part's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            BenchPart::Backoff => "backoff",
            BenchPart::Gateway => "gateway",
            BenchPart::Store => "store",
            BenchPart::Sim => "sim",
            BenchPart::Postgres => "postgres",
        }
    }

    /// The part called `name`.
    pub fn from_name(name: &str) -> anyhow::Result<BenchPart> {
        match name {
            "backoff" => Ok(BenchPart::Backoff),
            "gateway" => Ok(BenchPart::Gateway),
            "store" => Ok(BenchPart::Store),
            "sim" => Ok(BenchPart::Sim),
            "postgres" => Ok(BenchPart::Postgres),
            other => {
                bail!(
                    "unknown benchmark `{other}` (benchmarks: backoff, gateway, store, sim, postgres)"
                )
            }
        }
    }

    /// The prefix of every result name this part writes.
    fn prefix(self) -> &'static str {
        match self {
            BenchPart::Backoff => "backoff_contention/",
            BenchPart::Gateway => "gateway_overhead/",
            BenchPart::Store => "store/",
            BenchPart::Sim => "fleet/",
            BenchPart::Postgres => "postgres/",
        }
    }
}

/// Options of `cargo xtask bench`.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchArgs {
    /// Which parts to run, in this order.
    pub parts: Vec<BenchPart>,
    /// Seed of the backoff simulation.
    pub seed: u64,
    /// How long each gateway load phase lasts.
    pub duration: Duration,
    /// Events in the store benchmark's recovery store.
    pub store_events: u64,
}

impl Default for BenchArgs {
    fn default() -> Self {
        BenchArgs {
            parts: vec![
                BenchPart::Backoff,
                BenchPart::Gateway,
                BenchPart::Store,
                BenchPart::Sim,
                BenchPart::Postgres,
            ],
            seed: 42,
            duration: Duration::from_secs(10),
            store_events: bench_store::DEFAULT_EVENTS,
        }
    }
}

/// One entry of `bench/results.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchResult {
    /// `<benchmark>/<case>`, e.g. `backoff_contention/full`.
    pub name: String,
    /// What was measured, e.g. `calls`, `p99_latency`.
    pub metric: String,
    /// keel's figure.
    pub value: f64,
    /// Unit of `value` and `baseline`.
    pub unit: String,
    /// What `value` is compared with (the article, a direct call), when there is one.
    pub baseline: Option<f64>,
    /// `value / baseline`, when there is a non-zero baseline.
    pub ratio: Option<f64>,
    /// The command that reproduces this figure.
    pub command: String,
}

impl BenchResult {
    /// An entry with `ratio` computed from `value` and `baseline`.
    pub fn new(
        name: impl Into<String>,
        metric: &str,
        value: f64,
        unit: &str,
        baseline: Option<f64>,
        command: &str,
    ) -> BenchResult {
        let ratio = baseline.filter(|b| *b != 0.0).map(|b| value / b);
        BenchResult {
            name: name.into(),
            metric: metric.to_owned(),
            value,
            unit: unit.to_owned(),
            baseline,
            ratio,
            command: command.to_owned(),
        }
    }
}

/// Runs the selected parts and writes `bench/results.json`; non-zero exit if a part failed
/// (the parts that succeeded are still written).
pub fn run(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let root = workspace_root();
    let mut results = Vec::new();
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for &part in &args.parts {
        println!("==> bench {}", part.name());
        let outcome = match part {
            BenchPart::Backoff => Ok(backoff(args.seed)),
            BenchPart::Gateway => gateway_overhead::run(&root, args.duration),
            BenchPart::Store => bench_store::run(&root, &StoreBenchConfig::new(args.store_events)),
            BenchPart::Sim => crate::bench_sim::run(&root, args.seed),
            BenchPart::Postgres => crate::bench_pg::run(&root, args.duration),
        };
        match outcome {
            Ok(entries) => {
                results.extend(entries);
                done.push(part);
            }
            Err(err) => {
                println!("    bench {} FAILED: {err:#}", part.name());
                failed.push(part);
            }
        }
    }
    let path = results_path(&root);
    write_results(&path, &done, results)?;
    println!("==> wrote {}", path.display());
    if failed.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        let names: Vec<_> = failed.iter().map(|p| p.name()).collect();
        println!("==> failed: {}", names.join(", "));
        Ok(ExitCode::FAILURE)
    }
}

// === backoff contention ===

fn backoff(seed: u64) -> Vec<BenchResult> {
    let rows = backoff_sim::run(BACKOFF_CLIENTS, seed);
    if rows.is_empty() {
        println!("    the backoff simulation returned no rows");
    } else {
        print_backoff_table(&rows);
    }
    backoff_results(&rows, &format!("cargo xtask bench backoff --seed {seed}"))
}

fn print_backoff_table(rows: &[ContentionRow]) {
    println!(
        "    {} clients contending; keel beside the article's figures",
        BACKOFF_CLIENTS
    );
    println!(
        "    {:<14} {:>10} {:>10} {:>7}   {:>10} {:>10} {:>7}",
        "mode", "calls", "article", "ratio", "time", "article", "ratio"
    );
    for row in rows {
        println!(
            "    {:<14} {:>10} {:>10} {:>7}   {:>10} {:>10} {:>7}",
            row.mode,
            row.calls,
            row.article_calls,
            fmt_ratio(row.calls, row.article_calls),
            row.time,
            row.article_time,
            fmt_ratio(row.time, row.article_time),
        );
    }
}

fn fmt_ratio(value: u64, baseline: u64) -> String {
    if baseline == 0 {
        "-".to_owned()
    } else {
        format!("{:.2}", value as f64 / baseline as f64)
    }
}

fn backoff_results(rows: &[ContentionRow], command: &str) -> Vec<BenchResult> {
    rows.iter()
        .flat_map(|row| {
            let name = format!("backoff_contention/{}", row.mode);
            [
                BenchResult::new(
                    name.clone(),
                    "calls",
                    row.calls as f64,
                    "calls",
                    Some(row.article_calls as f64),
                    command,
                ),
                BenchResult::new(
                    name,
                    "time",
                    row.time as f64,
                    "sim_ms",
                    Some(row.article_time as f64),
                    command,
                ),
            ]
        })
        .collect()
}

// === bench/results.json ===

fn results_path(root: &Path) -> PathBuf {
    root.join("bench").join("results.json")
}

/// Writes `fresh` to `path`, keeping earlier entries of the parts not in `done`.
fn write_results(path: &Path, done: &[BenchPart], fresh: Vec<BenchResult>) -> anyhow::Result<()> {
    let mut all = read_results(path)?;
    all.retain(|entry| {
        !done
            .iter()
            .any(|part| entry.name.starts_with(part.prefix()))
    });
    all.extend(fresh);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut text = serde_json::to_string_pretty(&all).context("serializing results")?;
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn read_results(path: &Path) -> anyhow::Result<Vec<BenchResult>> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(err) => Err(err).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_is_value_over_baseline_and_absent_without_one() {
        let entry = BenchResult::new("a/b", "calls", 50.0, "calls", Some(200.0), "cmd");
        assert_eq!(entry.ratio, Some(0.25));
        assert_eq!(
            BenchResult::new("a/b", "x", 1.0, "u", None, "c").ratio,
            None
        );
        assert_eq!(
            BenchResult::new("a/b", "x", 1.0, "u", Some(0.0), "c").ratio,
            None
        );
    }

    #[test]
    fn backoff_rows_become_calls_and_time_entries() {
        let rows = [ContentionRow {
            mode: "full",
            calls: 2000,
            time: 300,
            article_calls: 2500,
            article_time: 250,
        }];
        let entries = backoff_results(&rows, "cargo xtask bench backoff --seed 1");
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].name, "backoff_contention/full");
        assert_eq!(entries[0].metric, "calls");
        assert_eq!(entries[0].baseline, Some(2500.0));
        assert_eq!(entries[0].ratio, Some(0.8));
        assert_eq!(entries[1].metric, "time");
        assert_eq!(entries[1].ratio, Some(1.2));
    }

    #[test]
    fn results_file_has_the_design_shape() {
        let entry = BenchResult::new("a/b", "calls", 1.0, "calls", None, "cmd");
        // The order of the keys as written to the file (a parsed `Value` sorts them).
        let text = serde_json::to_string_pretty(&[entry]).unwrap();
        let mut keys: Vec<(usize, &str)> = text
            .match_indices(r#"": "#)
            .map(|(end, _)| {
                let start = text[..end].rfind('"').unwrap() + 1;
                (start, &text[start..end])
            })
            .collect();
        keys.sort_unstable();
        let keys: Vec<&str> = keys.into_iter().map(|(_, key)| key).collect();
        assert_eq!(
            keys,
            [
                "name", "metric", "value", "unit", "baseline", "ratio", "command"
            ]
        );
    }

    #[test]
    fn a_part_replaces_only_its_own_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bench").join("results.json");
        let old = vec![
            BenchResult::new("backoff_contention/full", "calls", 1.0, "calls", None, "c"),
            BenchResult::new("gateway_overhead/x", "p50", 1.0, "us", None, "c"),
        ];
        write_results(&path, &[], old).unwrap();
        let fresh = vec![BenchResult::new(
            "backoff_contention/equal",
            "calls",
            2.0,
            "calls",
            None,
            "c",
        )];
        write_results(&path, &[BenchPart::Backoff], fresh).unwrap();
        let names: Vec<_> = read_results(&path)
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["gateway_overhead/x", "backoff_contention/equal"]);
    }
}
