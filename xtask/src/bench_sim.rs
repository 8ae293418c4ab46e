//! The fleet benchmark: `keel sim --agents 1000 --tasks 10000` on the standard fault mix,
//! policies on and then off on the same seed, with the release binary.
//!
//! It reports the success rate over feasible tasks (policies on, beside policies off),
//! lost tasks, the run's wall time, and keel's peak RSS and CPU time, all read from the
//! runs' `report.json`.

use std::path::Path;

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::bench_cmd::BenchResult;
use crate::process::run_passthrough;

/// Agents and tasks of the benchmark run (the figures).
pub const AGENTS: u32 = 1000;
pub const TASKS: u32 = 10_000;

/// Runs both policies and returns the `fleet/...` entries.
pub fn run(root: &Path, seed: u64) -> anyhow::Result<Vec<BenchResult>> {
    let keel = crate::gateway_overhead::build_keel(root)?;
    let out = root.join("bench").join("out").join("sim");
    let mut reports = Vec::new();
    for policies in ["on", "off"] {
        let dir = out.join(format!("policies-{policies}"));
        println!(
            "    keel sim --agents {AGENTS} --tasks {TASKS} --policies {policies} --seed {seed}"
        );
        let ok = run_passthrough(
            std::process::Command::new(&keel)
                .args([
                    "sim",
                    "--agents",
                    &AGENTS.to_string(),
                    "--tasks",
                    &TASKS.to_string(),
                ])
                .args([
                    "--policies",
                    policies,
                    "--seed",
                    &seed.to_string(),
                    "--report",
                ])
                .arg(&dir),
        )?;
        if !ok {
            bail!("keel sim --policies {policies} failed");
        }
        let text = std::fs::read_to_string(dir.join("report.json"))
            .with_context(|| format!("reading {}", dir.join("report.json").display()))?;
        let report: Value = serde_json::from_str(&text).context("parsing report.json")?;
        reports.push(report);
    }
    let (on, off) = (&reports[0], &reports[1]);
    let num = |r: &Value, key: &str| r[key].as_f64().unwrap_or(f64::NAN);
    let command = format!("cargo xtask bench sim --seed {seed}");
    let name = format!("fleet/{AGENTS}_agents_{TASKS}_tasks");
    println!(
        "    success over feasible: policies on {:.3}%, off {:.3}%; lost on {}, off {}; wall on {:.1}s, off {:.1}s; keel on: peak RSS {:.1} MiB, CPU {:.1}s",
        num(on, "success_rate_feasible") * 100.0,
        num(off, "success_rate_feasible") * 100.0,
        on["final"]["lost"],
        off["final"]["lost"],
        num(on, "wall_s"),
        num(off, "wall_s"),
        num(on, "keel_peak_rss_mb"),
        num(on, "keel_cpu_s"),
    );
    Ok(vec![
        BenchResult::new(
            name.clone(),
            "success_rate_feasible",
            num(on, "success_rate_feasible"),
            "ratio",
            Some(num(off, "success_rate_feasible")),
            &command,
        ),
        BenchResult::new(
            name.clone(),
            "lost",
            on["final"]["lost"].as_f64().unwrap_or(f64::NAN),
            "tasks",
            off["final"]["lost"].as_f64(),
            &command,
        ),
        BenchResult::new(
            name.clone(),
            "wall_time",
            num(on, "wall_s"),
            "s",
            Some(num(off, "wall_s")),
            &command,
        ),
        BenchResult::new(
            name.clone(),
            "keel_peak_rss",
            num(on, "keel_peak_rss_mb"),
            "MiB",
            None,
            &command,
        ),
        BenchResult::new(name, "keel_cpu", num(on, "keel_cpu_s"), "s", None, &command),
    ])
}
