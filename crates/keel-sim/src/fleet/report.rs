//! The reliability report of a run: `report.json` (every figure), `report.md` (the
//! table a person reads) and `report.svg` (success rate and p99 task latency over
//! time, fault windows shaded).
//!
//! The figures come from keel's store, read after the run, not from the agents'
//! own counting: a task is *lost* when keel acknowledged it but the store holds it
//! in no final state (or not at all) after the drain.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Every figure of a run, with the timeline (`report.json`; the README lists the keys).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The run's seed.
    pub seed: u64,
    /// `on` or `off`.
    pub policies: String,
    /// The fault mix (a file path, or `standard`).
    pub mix: String,
    /// Agents.
    pub agents: u32,
    /// Tasks created.
    pub tasks: u32,
    /// Tasks whose script is feasible.
    pub feasible: u32,
    /// Tasks by final state.
    #[serde(rename = "final")]
    pub final_states: Final,
    /// Succeeded feasible tasks over feasible tasks.
    pub success_rate_feasible: f64,
    /// Task latency of succeeded tasks, creation to success (queueing included).
    pub task_latency_ms: Percentiles,
    /// The part of it after the first claim (without the wait in the queue).
    pub task_run_ms: Percentiles,
    /// Model calls clients made through keel (`llm_call` events).
    pub model_calls: u64,
    /// `model_calls` over tasks.
    pub model_calls_per_task: f64,
    /// Attempts beyond the first, over all calls.
    pub retries: u64,
    /// Calls answered by a fallback target.
    pub fallbacks: u64,
    /// Times a breaker opened.
    pub breaker_trips: u64,
    /// Calls answered with the degraded reply.
    pub degraded_replies: u64,
    /// Tokens the providers reported.
    pub tokens: u64,
    /// Actions guards blocked, by guard (`action_rule`, `loop_limit`, ...).
    pub caught: BTreeMap<String, u64>,
    /// Risky actions the tool carried out: nothing stopped them.
    pub risky_actions_done: u64,
    /// Faults injected, by kind.
    pub faults_injected: BTreeMap<String, u64>,
    /// Whether every task reached a final state before the drain deadline.
    pub drained: bool,
    /// The run's wall time.
    pub wall_s: f64,
    /// keel's peak resident memory (the largest of its processes).
    pub keel_peak_rss_mb: f64,
    /// keel's CPU time, user + system, over its processes.
    pub keel_cpu_s: f64,
    /// `child` (`keel sim`: keel's own processes), `in-process` (`keel demo`: the
    /// figures cover the whole process, agents and simulated models included) or `remote`
    /// (`keel sim --server`: not measured, the figures are 0).
    pub keel_process: String,
    /// Success rate and p99 latency by when tasks ended.
    pub timeline: Vec<Bucket>,
    /// Fault windows to shade (a zero-length window is an instant, e.g. a kill).
    pub fault_windows: Vec<Window>,
}

/// Tasks by final state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Final {
    /// Succeeded.
    pub succeeded: u64,
    /// Dead (in the DLQ).
    pub dead: u64,
    /// Waiting for a human.
    pub awaiting_human: u64,
    /// Cancelled.
    pub cancelled: u64,
    /// Acknowledged but in no final state after the drain.
    pub lost: u64,
    /// Refused by keel's pre-flight check when they were created: never started.
    #[serde(default)]
    pub refused: u64,
}

/// p50 and p99.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
}

/// Tasks that ended within one slice of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    /// Slice start, seconds after the run started.
    pub start_s: f64,
    /// Slice end.
    pub end_s: f64,
    /// Feasible tasks that ended in the slice.
    pub ended: u64,
    /// Of those, the share that succeeded (`None` when none ended).
    pub success_rate: Option<f64>,
    /// p99 latency of the tasks that succeeded in the slice.
    pub p99_latency_ms: Option<f64>,
}

/// A span of the run in which a fault was in force.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Window {
    /// What it was, e.g. `outage of large`.
    pub label: String,
    /// Start, seconds after the run started.
    pub start_s: f64,
    /// End (equal to the start for an instant).
    pub end_s: f64,
}

/// One task as the store has it after the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskOutcome {
    /// Whether its script is feasible.
    pub feasible: bool,
    /// The state in the store; `None` when the store does not have it.
    pub state: Option<String>,
    /// Created, ms since the epoch.
    pub created_ms: i64,
    /// First claimed, ms since the epoch (`None`: never claimed).
    pub first_claimed_ms: Option<i64>,
    /// Last changed, ms since the epoch.
    pub updated_ms: i64,
}

/// Model-call figures from the `llm_call` events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallFigures {
    /// Calls.
    pub calls: u64,
    /// Attempts beyond the first.
    pub retries: u64,
    /// Calls a fallback target answered.
    pub fallbacks: u64,
    /// Calls answered with the degraded reply.
    pub degraded: u64,
    /// Tokens.
    pub tokens: u64,
}

/// What [`Report::build`] needs besides the tasks.
#[derive(Debug, Clone)]
pub struct RunFacts {
    /// Seed.
    pub seed: u64,
    /// `on` / `off`.
    pub policies: String,
    /// Mix name.
    pub mix: String,
    /// Agents.
    pub agents: u32,
    /// When the run started, ms since the epoch.
    pub started_ms: i64,
    /// Wall time in seconds.
    pub wall_s: f64,
    /// Drained in time.
    pub drained: bool,
    /// Call figures.
    pub calls: CallFigures,
    /// `breaker_opened` events.
    pub breaker_trips: u64,
    /// Injected faults by kind.
    pub faults_injected: BTreeMap<String, u64>,
    /// Fault windows.
    pub fault_windows: Vec<Window>,
    /// keel's peak RSS in MiB.
    pub keel_peak_rss_mb: f64,
    /// keel's CPU seconds.
    pub keel_cpu_s: f64,
    /// `child` or `in-process`.
    pub keel_process: String,
    /// Actions guards blocked, by guard.
    pub caught: BTreeMap<String, u64>,
    /// Risky actions carried out.
    pub risky_actions_done: u64,
}

/// Slices of the timeline.
const BUCKETS: usize = 30;

// === impl Report ===

impl Report {
    /// The report of a run whose tasks ended as `tasks` says.
    pub fn build(facts: RunFacts, tasks: &[TaskOutcome]) -> Self {
        let mut final_states = Final::default();
        let mut succeeded_feasible = 0u64;
        let mut latencies = Vec::new();
        let mut runs = Vec::new();
        for t in tasks {
            match t.state.as_deref() {
                Some("succeeded") => final_states.succeeded += 1,
                Some("dead") => final_states.dead += 1,
                Some("awaiting_human") => final_states.awaiting_human += 1,
                Some("cancelled") => final_states.cancelled += 1,
                Some("refused") => final_states.refused += 1,
                _ => {
                    final_states.lost += 1;
                    continue;
                }
            }
            if t.state.as_deref() != Some("succeeded") {
                continue;
            }
            if t.feasible {
                succeeded_feasible += 1;
            }
            // Latency of successes only: failures that end fast would flatter a bad run.
            latencies.push((t.updated_ms - t.created_ms).max(0) as f64);
            if let Some(claimed) = t.first_claimed_ms {
                runs.push((t.updated_ms - claimed).max(0) as f64);
            }
        }
        let feasible = tasks.iter().filter(|t| t.feasible).count() as u64;
        let n = tasks.len() as u64;
        let timeline = timeline(&facts, tasks);
        Self {
            seed: facts.seed,
            policies: facts.policies,
            mix: facts.mix,
            agents: facts.agents,
            tasks: u32::try_from(n).unwrap_or(u32::MAX),
            feasible: u32::try_from(feasible).unwrap_or(u32::MAX),
            final_states,
            success_rate_feasible: ratio(succeeded_feasible, feasible),
            task_latency_ms: percentiles(&mut latencies),
            task_run_ms: percentiles(&mut runs),
            model_calls: facts.calls.calls,
            model_calls_per_task: ratio(facts.calls.calls, n),
            retries: facts.calls.retries,
            fallbacks: facts.calls.fallbacks,
            breaker_trips: facts.breaker_trips,
            degraded_replies: facts.calls.degraded,
            tokens: facts.calls.tokens,
            caught: facts.caught,
            risky_actions_done: facts.risky_actions_done,
            faults_injected: facts.faults_injected,
            drained: facts.drained,
            wall_s: facts.wall_s,
            keel_peak_rss_mb: facts.keel_peak_rss_mb,
            keel_cpu_s: facts.keel_cpu_s,
            keel_process: facts.keel_process,
            timeline,
            fault_windows: facts.fault_windows,
        }
    }

    /// Writes `report.json`, `report.md` and `report.svg` into `dir` (created if needed).
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(dir.join("report.json"), json + "\n")?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        std::fs::write(dir.join("report.svg"), self.svg())?;
        Ok(())
    }

    /// The table a person reads.
    pub fn markdown(&self) -> String {
        let f = &self.final_states;
        let faults = if self.faults_injected.is_empty() {
            "none".to_owned()
        } else {
            self.faults_injected
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# keel sim: policies {}, {} agents, {} tasks (seed {})\n",
            self.policies, self.agents, self.tasks, self.seed
        );
        let rows: Vec<(&str, String)> = vec![
            (
                "success over feasible tasks",
                format!(
                    "{:.2}% ({} feasible)",
                    self.success_rate_feasible * 100.0,
                    self.feasible
                ),
            ),
            ("succeeded", f.succeeded.to_string()),
            ("dead (DLQ)", f.dead.to_string()),
            ("awaiting human", f.awaiting_human.to_string()),
            ("cancelled", f.cancelled.to_string()),
            ("lost", f.lost.to_string()),
            ("refused at creation (pre-flight)", f.refused.to_string()),
            (
                "task latency of successes p50 / p99",
                format!(
                    "{:.0} ms / {:.0} ms",
                    self.task_latency_ms.p50, self.task_latency_ms.p99
                ),
            ),
            (
                "of which after the first claim, p50 / p99",
                format!(
                    "{:.0} ms / {:.0} ms",
                    self.task_run_ms.p50, self.task_run_ms.p99
                ),
            ),
            (
                "model calls (per task)",
                format!("{} ({:.2})", self.model_calls, self.model_calls_per_task),
            ),
            ("retries", self.retries.to_string()),
            ("fallbacks", self.fallbacks.to_string()),
            ("breaker trips", self.breaker_trips.to_string()),
            ("degraded replies", self.degraded_replies.to_string()),
            ("tokens", self.tokens.to_string()),
            (
                "caught by guards",
                if self.caught.is_empty() {
                    "none".to_owned()
                } else {
                    self.caught
                        .iter()
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            ),
            (
                "risky actions carried out",
                self.risky_actions_done.to_string(),
            ),
            ("faults injected", faults),
            ("fault mix", self.mix.clone()),
            (
                "wall time",
                format!(
                    "{:.1} s{}",
                    self.wall_s,
                    if self.drained {
                        ""
                    } else {
                        " (drain timed out)"
                    }
                ),
            ),
            (
                if self.keel_process == "in-process" {
                    "peak RSS / CPU (keel, agents and models: one process)"
                } else {
                    "keel peak RSS / CPU"
                },
                if self.keel_process == "remote" {
                    "not measured (keel is not a process of this run)".to_owned()
                } else {
                    format!(
                        "{:.1} MiB / {:.1} s",
                        self.keel_peak_rss_mb, self.keel_cpu_s
                    )
                },
            ),
        ];
        let _ = writeln!(out, "| figure | value |\n| --- | --- |");
        for (k, v) in rows {
            let _ = writeln!(out, "| {k} | {v} |");
        }
        out
    }

    /// Success rate and p99 latency over time, fault windows shaded.
    pub fn svg(&self) -> String {
        const W: f64 = 800.0;
        const PANEL: f64 = 180.0;
        const LEFT: f64 = 70.0;
        const RIGHT: f64 = 20.0;
        const TOP: f64 = 40.0;
        const GAP: f64 = 50.0;
        // The run's span; a window scheduled past the run's end is cut there.
        let span = self.timeline.last().map_or(1.0, |b| b.end_s).max(1.0);
        let x = |s: f64| LEFT + (s / span) * (W - LEFT - RIGHT);
        let h = TOP + 2.0 * PANEL + GAP + 40.0;
        let mut out = String::new();
        let _ = writeln!(
            out,
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="sans-serif" font-size="12">"##
        );
        let _ = writeln!(out, r##"<rect width="{W}" height="{h}" fill="#ffffff"/>"##);
        let _ = writeln!(
            out,
            r##"<text x="{LEFT}" y="20" font-size="14">keel sim, policies {}: success rate and p99 task latency over time (s)</text>"##,
            xml_escape(&self.policies)
        );
        let max_p99 = self
            .timeline
            .iter()
            .filter_map(|b| b.p99_latency_ms)
            .fold(1.0, f64::max);
        let panels = [
            ("success rate (%)", TOP, 100.0),
            ("p99 task latency (ms)", TOP + PANEL + GAP, max_p99),
        ];
        for (i, (title, top, max)) in panels.iter().enumerate() {
            let bottom = top + PANEL;
            for (n, w) in self.fault_windows.iter().enumerate() {
                if w.start_s > span {
                    continue;
                }
                let (x0, x1) = (x(w.start_s), x(w.end_s.min(span)));
                if x1 - x0 < 1.0 {
                    let _ = writeln!(
                        out,
                        r##"<line class="fault" x1="{x0:.1}" y1="{top}" x2="{x0:.1}" y2="{bottom}" stroke="#d62728" stroke-dasharray="4 3"><title>{}</title></line>"##,
                        xml_escape(&w.label)
                    );
                } else {
                    let _ = writeln!(
                        out,
                        r##"<rect class="fault" x="{x0:.1}" y="{top}" width="{:.1}" height="{PANEL}" fill="#d62728" fill-opacity="0.12"><title>{}</title></rect>"##,
                        x1 - x0,
                        xml_escape(&w.label)
                    );
                }
                if i == 0 {
                    let _ = writeln!(
                        out,
                        r##"<text x="{:.1}" y="{:.1}" font-size="10" fill="#d62728">{}</text>"##,
                        x0 + 2.0,
                        // One line per window: labels of nearby windows do not overlap.
                        top + 24.0 + 12.0 * n as f64,
                        xml_escape(&w.label)
                    );
                }
            }
            let _ = writeln!(
                out,
                r##"<rect x="{LEFT}" y="{top}" width="{:.1}" height="{PANEL}" fill="none" stroke="#333333"/>"##,
                W - LEFT - RIGHT
            );
            let _ = writeln!(
                out,
                r##"<text x="{LEFT}" y="{:.1}">{title}</text><text x="{:.1}" y="{:.1}" text-anchor="end">{:.0}</text><text x="{:.1}" y="{bottom}" text-anchor="end">0</text>"##,
                top - 6.0,
                LEFT - 4.0,
                bottom - PANEL / 1.05 + 4.0,
                max,
                LEFT - 4.0
            );
            // 5% headroom keeps a line at the maximum off the frame.
            let y = |v: f64| bottom - (v / max).clamp(0.0, 1.0) * PANEL / 1.05;
            let points: Vec<String> = self
                .timeline
                .iter()
                .filter_map(|b| {
                    let v = if i == 0 {
                        b.success_rate.map(|r| r * 100.0)
                    } else {
                        b.p99_latency_ms
                    }?;
                    Some(format!("{:.1},{:.1}", x((b.start_s + b.end_s) / 2.0), y(v)))
                })
                .collect();
            let colour = if i == 0 { "#1f77b4" } else { "#ff7f0e" };
            let _ = writeln!(
                out,
                r##"<polyline class="series" fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"##,
                points.join(" ")
            );
        }
        let axis = TOP + 2.0 * PANEL + GAP + 18.0;
        for k in 0..=5 {
            let s = span * f64::from(k) / 5.0;
            let _ = writeln!(
                out,
                r##"<text x="{:.1}" y="{axis}" text-anchor="middle">{s:.0}</text>"##,
                x(s)
            );
        }
        out.push_str("</svg>\n");
        out
    }
}

fn timeline(facts: &RunFacts, tasks: &[TaskOutcome]) -> Vec<Bucket> {
    let span_ms = (facts.wall_s * 1000.0).max(1.0);
    let width = span_ms / BUCKETS as f64;
    let mut slices: Vec<(u64, u64, Vec<f64>)> = vec![(0, 0, Vec::new()); BUCKETS];
    for t in tasks.iter().filter(|t| t.feasible) {
        let Some(state) = t.state.as_deref() else {
            continue;
        };
        if !matches!(state, "succeeded" | "dead" | "awaiting_human" | "cancelled") {
            continue;
        }
        let at = (t.updated_ms - facts.started_ms).max(0) as f64;
        let i = ((at / width) as usize).min(BUCKETS - 1);
        let slice = &mut slices[i];
        slice.0 += 1;
        if state == "succeeded" {
            slice.1 += 1;
            slice.2.push((t.updated_ms - t.created_ms).max(0) as f64);
        }
    }
    slices
        .into_iter()
        .enumerate()
        .map(|(i, (ended, ok, mut lat))| Bucket {
            start_s: i as f64 * width / 1000.0,
            end_s: (i + 1) as f64 * width / 1000.0,
            ended,
            success_rate: (ended > 0).then(|| ratio(ok, ended)),
            p99_latency_ms: (!lat.is_empty()).then(|| percentiles(&mut lat).p99),
        })
        .collect()
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// Nearest-rank p50 and p99.
fn percentiles(values: &mut [f64]) -> Percentiles {
    if values.is_empty() {
        return Percentiles::default();
    }
    values.sort_by(f64::total_cmp);
    let rank =
        |q: f64| values[((q * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1];
    Percentiles {
        p50: rank(0.50),
        p99: rank(0.99),
    }
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> RunFacts {
        RunFacts {
            seed: 1,
            policies: "on".to_owned(),
            mix: "standard".to_owned(),
            agents: 2,
            started_ms: 1_000_000,
            wall_s: 10.0,
            drained: true,
            calls: CallFigures {
                calls: 10,
                retries: 2,
                fallbacks: 1,
                degraded: 0,
                tokens: 500,
            },
            breaker_trips: 1,
            faults_injected: BTreeMap::from([("outage".to_owned(), 3)]),
            fault_windows: vec![
                Window {
                    label: "outage of large".to_owned(),
                    start_s: 2.0,
                    end_s: 5.0,
                },
                Window {
                    label: "kill -9 keel".to_owned(),
                    start_s: 6.0,
                    end_s: 6.0,
                },
            ],
            keel_peak_rss_mb: 40.0,
            keel_cpu_s: 3.0,
            keel_process: "child".to_owned(),
            caught: BTreeMap::from([("loop_limit".to_owned(), 2)]),
            risky_actions_done: 0,
        }
    }

    fn task(feasible: bool, state: Option<&str>, end_s: f64) -> TaskOutcome {
        TaskOutcome {
            feasible,
            state: state.map(str::to_owned),
            created_ms: 1_000_000,
            first_claimed_ms: Some(1_000_500),
            updated_ms: 1_000_000 + (end_s * 1000.0) as i64,
        }
    }

    #[test]
    fn tasks_are_counted_by_final_state_and_unknown_ones_are_lost() {
        let tasks = [
            task(true, Some("succeeded"), 1.0),
            task(true, Some("succeeded"), 3.0),
            task(true, Some("dead"), 4.0),
            task(false, Some("dead"), 4.0),
            task(true, Some("running"), 9.0),
            task(true, None, 0.0),
            task(false, Some("refused"), 0.0),
        ];
        let r = Report::build(facts(), &tasks);
        assert_eq!(
            r.final_states,
            Final {
                succeeded: 2,
                dead: 2,
                awaiting_human: 0,
                cancelled: 0,
                lost: 2,
                refused: 1,
            }
        );
        assert_eq!(r.feasible, 5);
        assert!((r.success_rate_feasible - 0.4).abs() < 1e-9);
        // Of the two successes (1 s and 3 s); the dead ones are left out.
        assert_eq!(r.task_latency_ms.p50, 1000.0);
        assert_eq!(r.task_latency_ms.p99, 3000.0);
        assert_eq!(r.task_run_ms.p50, 500.0, "half a second in the queue");
        assert!((r.model_calls_per_task - 10.0 / 7.0).abs() < 1e-9);
        let ended: u64 = r.timeline.iter().map(|b| b.ended).sum();
        assert_eq!(ended, 3, "feasible tasks in a final state");
    }

    #[test]
    fn the_json_has_the_design_s_keys() {
        let r = Report::build(facts(), &[task(true, Some("succeeded"), 1.0)]);
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        for key in [
            "seed",
            "policies",
            "agents",
            "tasks",
            "feasible",
            "final",
            "success_rate_feasible",
            "task_latency_ms",
            "model_calls",
            "retries",
            "fallbacks",
            "breaker_trips",
            "degraded_replies",
            "tokens",
            "caught",
            "faults_injected",
            "wall_s",
            "keel_peak_rss_mb",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        for key in ["succeeded", "dead", "awaiting_human", "cancelled", "lost"] {
            assert!(v["final"].get(key).is_some(), "missing final.{key}");
        }
        let back: Report = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn the_markdown_table_names_every_final_state() {
        let md = Report::build(facts(), &[task(true, Some("succeeded"), 1.0)]).markdown();
        for row in [
            "| succeeded | 1 |",
            "| lost | 0 |",
            "| dead (DLQ) | 0 |",
            "| success over feasible tasks | 100.00% (1 feasible) |",
        ] {
            assert!(md.contains(row), "{row} not in\n{md}");
        }
    }

    #[test]
    fn resources_of_a_keel_run_elsewhere_are_not_made_up() {
        let md = Report::build(facts(), &[]).markdown();
        assert!(
            md.contains("| keel peak RSS / CPU | 40.0 MiB / 3.0 s |"),
            "{md}"
        );
        let mut remote = facts();
        remote.keel_process = "remote".to_owned();
        let md = Report::build(remote, &[]).markdown();
        assert!(md.contains("| keel peak RSS / CPU | not measured"), "{md}");
        assert!(!md.contains("0.0 MiB"), "{md}");
    }

    #[test]
    fn the_plot_shades_windows_and_draws_both_series() {
        let tasks: Vec<_> = (0..50)
            .map(|i| task(true, Some("succeeded"), f64::from(i) / 5.0))
            .collect();
        let svg = Report::build(facts(), &tasks).svg();
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert_eq!(svg.matches("class=\"series\"").count(), 2);
        assert_eq!(
            svg.matches("<rect class=\"fault\"").count(),
            2,
            "outage in both panels"
        );
        assert_eq!(
            svg.matches("<line class=\"fault\"").count(),
            2,
            "kill in both panels"
        );
        assert!(svg.trim_end().ends_with("</svg>"));
    }
}
