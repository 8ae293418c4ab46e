//! The anomaly detector: one [`Baseline`] per signal and agent or route.
//!
//! | signal | per | value judged | bad when | floor |
//! | --- | --- | --- | --- | --- |
//! | trajectory length | agent | steps of each succeeded task | longer | 0.5 steps, 10% |
//! | confidence | agent | confidence reported with each completion | lower | 0.05 |
//! | error rate | route | share of calls not answered, per period (≥ 5 calls) | higher | 0.02 |
//! | latency | route | mean latency of answered calls, per period | higher | 5 ms, 20% |
//! | token spend | agent | tokens per period (periods with calls) | higher | 100 tokens, 25% |
//!
//! Each is judged as [`keel_policy::baseline`] says (median of the newest values, z
//! against an exponentially weighted mean and deviation, hysteresis); a raised anomaly is
//! a `warning` alert, and its clearing resolves the incident.

use std::collections::HashMap;

use keel_config::{AnomalySettings, Severity};
use keel_policy::baseline::{Baseline, BaselineSettings, Change, Direction, Floor, Judgement};
use serde_json::{Map, Value, json};

use crate::incident::Alert;

/// Calls a route needs in a period for its error rate and latency to be judged.
pub const MIN_CALLS: u64 = 5;

/// A signal the detector judges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Trajectory,
    Confidence,
    Errors,
    Latency,
    Tokens,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Trajectory => "trajectory",
            Self::Confidence => "confidence",
            Self::Errors => "errors",
            Self::Latency => "latency",
            Self::Tokens => "tokens",
        }
    }

    /// `agent` or `route`.
    fn scope(self) -> &'static str {
        match self {
            Self::Errors | Self::Latency => "route",
            Self::Trajectory | Self::Confidence | Self::Tokens => "agent",
        }
    }

    fn direction(self) -> Direction {
        match self {
            Self::Confidence => Direction::Down,
            _ => Direction::Up,
        }
    }

    fn floor(self) -> Floor {
        let (absolute, relative) = match self {
            Self::Trajectory => (0.5, 0.1),
            Self::Confidence => (0.05, 0.0),
            Self::Errors => (0.02, 0.0),
            Self::Latency => (5.0, 0.2),
            Self::Tokens => (100.0, 0.25),
        };
        Floor { absolute, relative }
    }

    fn describe(self, who: &str, j: &Judgement) -> String {
        let (now, usual) = (j.recent, j.mean);
        match self {
            Self::Trajectory => format!(
                "agent {who:?}'s tasks take {now:.1} steps (median of the latest), usually {usual:.1} (z = {:.1})",
                j.z
            ),
            Self::Confidence => format!(
                "agent {who:?} reports confidence {now:.2} (median of the latest completions), usually {usual:.2} (z = {:.1})",
                j.z
            ),
            Self::Errors => format!(
                "route {who:?} fails {:.1}% of calls, usually {:.1}% (z = {:.1})",
                100.0 * now,
                100.0 * usual,
                j.z
            ),
            Self::Latency => format!(
                "route {who:?} answers in {now:.0} ms on average, usually {usual:.0} ms (z = {:.1})",
                j.z
            ),
            Self::Tokens => format!(
                "agent {who:?} spends {now:.0} tokens per period, usually {usual:.0} (z = {:.1})",
                j.z
            ),
        }
    }
}

/// What the detector found: an alert to raise, or an incident to resolve.
#[derive(Debug, Clone, PartialEq)]
pub enum Found {
    /// A signal became anomalous.
    Raise(Alert),
    /// A signal is usual again: resolve the incident of this key, saying why.
    Resolve(String, String),
}

#[derive(Default)]
struct Period {
    calls: u64,
    failed: u64,
    latency_ms: u64,
    answered: u64,
}

/// How a model call ended, for the route's error rate and latency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Answered (`outcome: ok`).
    Answered,
    /// Failed, degraded or refused: the route did not answer.
    Failed,
    /// The client left before the end (`outcome: client_gone`): counted in neither.
    ClientLeft,
}

impl Ended {
    /// Answered or failed.
    pub fn of(answered: bool) -> Ended {
        if answered {
            Ended::Answered
        } else {
            Ended::Failed
        }
    }
}

/// Every baseline, and the period being counted.
pub struct Detector {
    settings: AnomalySettings,
    baselines: HashMap<(Kind, String), Baseline>,
    routes: HashMap<String, Period>,
    tokens: HashMap<String, u64>,
}

impl Detector {
    /// No baselines yet.
    pub fn new(settings: AnomalySettings) -> Self {
        Self {
            settings,
            baselines: HashMap::new(),
            routes: HashMap::new(),
            tokens: HashMap::new(),
        }
    }

    fn judge(&mut self, kind: Kind, who: &str, value: f64, found: &mut Vec<Found>) {
        let s = self.settings;
        let baseline = self
            .baselines
            .entry((kind, who.to_owned()))
            .or_insert_with(|| {
                Baseline::new(BaselineSettings {
                    warmup: s.warmup,
                    sigmas: s.sigmas,
                    recent: match kind {
                        // Periods are aggregates already: three in a row make a trend.
                        Kind::Errors | Kind::Latency | Kind::Tokens => s.recent.min(3),
                        Kind::Trajectory | Kind::Confidence => s.recent,
                    },
                    direction: kind.direction(),
                    floor: kind.floor(),
                })
            });
        let j = baseline.observe(value);
        let key = format!("anomaly:{}:{who}", kind.name());
        match j.change {
            Change::Same => {}
            Change::Raised => {
                let mut labels = Map::new();
                labels.insert(kind.scope().to_owned(), json!(who));
                labels.insert("signal".to_owned(), json!(kind.name()));
                labels.insert("value".to_owned(), json!(j.recent));
                labels.insert("baseline".to_owned(), json!(j.mean));
                labels.insert("sd".to_owned(), json!(j.sd));
                labels.insert("z".to_owned(), json!(j.z));
                found.push(Found::Raise(Alert {
                    key,
                    severity: Severity::Warning,
                    title: format!("{} anomaly: {} {who}", kind.name(), kind.scope()),
                    message: kind.describe(who, &j),
                    labels,
                    task: None,
                    condition: true,
                    recorded: false,
                }));
            }
            Change::Cleared => found.push(Found::Resolve(
                key,
                format!("usual again: {}", kind.describe(who, &j)),
            )),
        }
    }

    /// A succeeded task of `agent` took `steps`, with `confidence` if reported.
    pub fn task(&mut self, agent: &str, steps: u64, confidence: Option<f64>) -> Vec<Found> {
        let mut found = Vec::new();
        self.judge(Kind::Trajectory, agent, steps as f64, &mut found);
        if let Some(c) = confidence.filter(|c| c.is_finite()) {
            self.judge(Kind::Confidence, agent, c, &mut found);
        }
        found
    }

    /// A call on `route` by `agent` ended.
    pub fn call(&mut self, route: &str, agent: &str, ended: Ended, latency_ms: u64, tokens: u64) {
        *self.tokens.entry(agent.to_owned()).or_default() += tokens;
        // A client that left says nothing of the route's errors or its speed.
        if ended == Ended::ClientLeft {
            return;
        }
        let p = self.routes.entry(route.to_owned()).or_default();
        p.calls += 1;
        if ended == Ended::Answered {
            p.answered += 1;
            p.latency_ms += latency_ms;
        } else {
            p.failed += 1;
        }
    }

    /// Ends a period: judges each route's error rate and latency and each agent's spend.
    pub fn tick(&mut self) -> Vec<Found> {
        let mut found = Vec::new();
        let routes = std::mem::take(&mut self.routes);
        for (route, p) in routes {
            if p.calls < MIN_CALLS {
                continue;
            }
            self.judge(
                Kind::Errors,
                &route,
                p.failed as f64 / p.calls as f64,
                &mut found,
            );
            if p.answered > 0 {
                let mean = p.latency_ms as f64 / p.answered as f64;
                self.judge(Kind::Latency, &route, mean, &mut found);
            }
        }
        let tokens = std::mem::take(&mut self.tokens);
        for (agent, n) in tokens {
            if n > 0 {
                self.judge(Kind::Tokens, &agent, n as f64, &mut found);
            }
        }
        found
    }

    /// The baselines, for `GET /v1/incidents` (`baselines`): what is usual now.
    pub fn summary(&self) -> Value {
        let mut out: Vec<Value> = self
            .baselines
            .iter()
            .map(|((kind, who), b)| {
                json!({"signal": kind.name(), kind.scope(): who, "anomalous": b.anomalous()})
            })
            .collect();
        out.sort_by_key(|v| v.to_string());
        Value::Array(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_whose_trajectories_double_raises_then_resolves() {
        let mut d = Detector::new(AnomalySettings::default());
        for i in 0..30 {
            assert!(d.task("support", 4 + i % 3, Some(0.9)).is_empty());
        }
        let mut raised = Vec::new();
        for i in 0..6 {
            raised.extend(d.task("support", 2 * (4 + i % 3), Some(0.9)));
        }
        assert_eq!(raised.len(), 1, "{raised:?}");
        let Found::Raise(alert) = &raised[0] else {
            panic!("{raised:?}")
        };
        assert_eq!(alert.key, "anomaly:trajectory:support");
        assert_eq!(alert.severity, Severity::Warning);
        assert!(alert.message.contains("usually 5.0"), "{}", alert.message);
        // Another agent is apart.
        assert!(d.task("billing", 10, None).is_empty());
        let mut resolved = Vec::new();
        for i in 0..6 {
            resolved.extend(d.task("support", 4 + i % 3, Some(0.9)));
        }
        assert!(
            matches!(&resolved[..], [Found::Resolve(key, _)] if key == "anomaly:trajectory:support"),
            "{resolved:?}"
        );
    }

    #[test]
    fn clients_that_leave_are_not_the_route_s_errors() {
        let mut d = Detector::new(AnomalySettings::default());
        for period in 0..30 {
            for _ in 0..20 {
                d.call("smart", "a", Ended::Answered, 100, 10);
            }
            assert!(d.tick().is_empty(), "period {period}");
        }
        let mut found = Vec::new();
        for _ in 0..3 {
            for i in 0..20 {
                let ended = if i % 2 == 0 {
                    Ended::ClientLeft
                } else {
                    Ended::Answered
                };
                d.call("smart", "a", ended, 100, 10);
            }
            found.extend(d.tick());
        }
        assert!(
            !found.iter().any(|f| matches!(f, Found::Raise(_))),
            "{found:?}"
        );
    }

    #[test]
    fn a_route_that_starts_failing_raises_per_period() {
        let mut d = Detector::new(AnomalySettings::default());
        for period in 0..30 {
            for i in 0..20 {
                // About 1 in 20 fails, as usual.
                d.call(
                    "smart",
                    "a",
                    Ended::of(!(i == 0 && period % 2 == 0)),
                    100,
                    10,
                );
            }
            assert!(d.tick().is_empty(), "period {period}");
        }
        let mut found = Vec::new();
        for _ in 0..3 {
            for i in 0..20 {
                d.call("smart", "a", Ended::of(i % 2 == 0), 100, 10);
            }
            found.extend(d.tick());
        }
        assert!(
            found
                .iter()
                .any(|f| matches!(f, Found::Raise(a) if a.key == "anomaly:errors:smart")),
            "{found:?}"
        );
    }
}
