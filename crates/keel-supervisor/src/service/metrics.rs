//! The supervisor's Prometheus metrics (DESIGN §7): task outcomes, trajectory
//! length and confidence per agent, DLQ depth and pending approvals.

use std::sync::Arc;

use keel_core::{AgentLabels, LabelValue};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::task::Task;

/// Labels of `keel_tasks_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    /// Agent name.
    pub agent: LabelValue,
    /// The final state: `succeeded`, `dead`, `cancelled`.
    pub outcome: LabelValue,
}

/// A label set with only `agent`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgentLabel {
    /// Agent name.
    pub agent: LabelValue,
}

type Histograms = Family<AgentLabel, Histogram, fn() -> Histogram>;

fn steps_histogram() -> Histogram {
    // 1, 2, 4 .. 2048 steps.
    Histogram::new(exponential_buckets(1.0, 2.0, 12))
}

fn confidence_histogram() -> Histogram {
    // 0.1, 0.2 .. 1.0: a worker's confidence is in 0..=1.
    Histogram::new((1..=10).map(|i| f64::from(i) / 10.0))
}

/// Supervisor metrics, registered once.
#[derive(Clone)]
pub struct SupervisorMetrics {
    /// `keel_tasks_total{agent,outcome}`: tasks that reached a final state.
    pub tasks: Family<TaskLabels, Counter>,
    /// `keel_task_steps{agent}`: steps of each finished task (trajectory length).
    pub steps: Histograms,
    /// `keel_task_confidence{agent}`: the confidence reported with each completion.
    pub confidence: Histograms,
    /// `keel_backtracks_total{agent}`: `backtrack` directives given. The supervisor
    /// gives none yet (the self-healing issue adds them), so it stays empty.
    pub backtracks: Family<AgentLabel, Counter>,
    /// `keel_dlq_depth`: dead tasks waiting in the dead-letter queue.
    pub dlq_depth: Gauge,
    /// `keel_approvals_pending`: tasks waiting for a human.
    pub approvals_pending: Gauge,
    /// The agent names used as labels (bounded: any name a client sends can create a task).
    pub agents: Arc<AgentLabels>,
}

impl SupervisorMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            tasks: Family::default(),
            steps: Family::new_with_constructor(steps_histogram),
            confidence: Family::new_with_constructor(confidence_histogram),
            backtracks: Family::default(),
            dlq_depth: Gauge::default(),
            approvals_pending: Gauge::default(),
            agents: Arc::new(AgentLabels::default()),
        };
        registry.register(
            "keel_tasks",
            "Tasks that reached a final state, by agent and outcome",
            m.tasks.clone(),
        );
        registry.register(
            "keel_task_steps",
            "Steps per finished task (trajectory length), per agent",
            m.steps.clone(),
        );
        registry.register(
            "keel_task_confidence",
            "Confidence reported with task completions, per agent",
            m.confidence.clone(),
        );
        registry.register(
            "keel_backtracks",
            "Backtrack directives given, per agent",
            m.backtracks.clone(),
        );
        registry.register(
            "keel_dlq_depth",
            "Tasks in the dead-letter queue",
            m.dlq_depth.clone(),
        );
        registry.register(
            "keel_approvals_pending",
            "Tasks waiting for a human decision",
            m.approvals_pending.clone(),
        );
        m
    }

    /// Counts a task that just reached a final state.
    pub fn finished(&self, task: &Task) {
        let label = self.agents.of(&task.agent);
        self.tasks
            .get_or_create(&TaskLabels {
                agent: label.clone(),
                outcome: task.state.as_str().into(),
            })
            .inc();
        let agent = AgentLabel { agent: label };
        self.steps
            .get_or_create(&agent)
            .observe(f64::from(task.steps));
        if task.state.as_str() == "succeeded"
            && let Some(confidence) = task.confidence
        {
            self.confidence.get_or_create(&agent).observe(confidence);
        }
    }

    /// Sets the queue gauges from per-state counts.
    pub fn set_depths(&self, counts: &[(String, u64)]) {
        let of = |state: &str| {
            counts
                .iter()
                .find(|(s, _)| s == state)
                .map_or(0, |(_, n)| i64::try_from(*n).unwrap_or(i64::MAX))
        };
        self.dlq_depth.set(of("dead"));
        self.approvals_pending.set(of("awaiting_human"));
    }
}
