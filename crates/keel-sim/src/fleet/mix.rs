//! Fault mixes: the TOML files under `sim/faults/` that say what goes wrong in a run.
//!
//! A mix has four parts, all optional: `[calls]` (per-request fault rates of model
//! calls, injected upstream in the simulated model server), `[[outages]]` (windows in
//! which one model answers 503 to everything), `[agents]` (how often an agent dies
//! mid-task) and `[keel]` (when keel itself is killed with `kill -9`).

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The standard mix, `sim/faults/standard.toml`, built into the binary.
pub const STANDARD: &str = include_str!("../../../../sim/faults/standard.toml");

/// What goes wrong in a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultMix {
    /// Per-request fault rates of model calls.
    #[serde(default)]
    pub calls: CallFaults,
    /// Full outages of one model.
    #[serde(default)]
    pub outages: Vec<Outage>,
    /// Agent deaths.
    #[serde(default)]
    pub agents: AgentFaults,
    /// Faults of keel itself.
    #[serde(default)]
    pub keel: KeelFaults,
}

/// Fault rates of model calls; each request draws once. Rates add up: their sum must
/// not exceed 1.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallFaults {
    /// Share answering 500, 502 or 503.
    #[serde(default)]
    pub error_5xx: f64,
    /// Share answering 429 with [`CallFaults::retry_after`].
    #[serde(default)]
    pub rate_limited: f64,
    /// The `Retry-After` of a 429 (whole seconds on the wire).
    #[serde(with = "humantime_serde", default)]
    pub retry_after: Option<Duration>,
    /// Share that hang far past any sane attempt timeout.
    #[serde(default)]
    pub hang: f64,
    /// Share of *streamed* calls cut after a few chunks.
    #[serde(default)]
    pub stream_cut: f64,
    /// Share whose connection is dropped before any byte of an answer.
    #[serde(default)]
    pub drop: f64,
    /// Share answering 200 with a body that is not JSON.
    #[serde(default)]
    pub malformed: f64,
    /// Share answering normally but slowly, after [`CallFaults::slow_latency`].
    #[serde(default)]
    pub slow: f64,
    /// The added latency of a slow call (default 2s).
    #[serde(with = "humantime_serde", default)]
    pub slow_latency: Option<Duration>,
}

impl CallFaults {
    /// The sum of every share.
    fn total(&self) -> f64 {
        self.error_5xx
            + self.rate_limited
            + self.hang
            + self.stream_cut
            + self.drop
            + self.malformed
            + self.slow
    }
}

/// A window in which every call to `target` answers 503.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outage {
    /// The simulated model that goes down (`large` or `small` in `keel sim`).
    pub target: String,
    /// When it starts, after the fleet starts.
    #[serde(with = "humantime_serde")]
    pub start: Duration,
    /// How long it lasts.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
}

/// Agent deaths.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFaults {
    /// Share of task claims after which the agent dies mid-task: it stops without a
    /// word, so only the lease's expiry tells keel.
    #[serde(default)]
    pub killed: f64,
}

/// Faults of keel itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeelFaults {
    /// When keel gets `kill -9` (restarted at once), after the fleet starts. Only when
    /// the simulation started keel as a child process.
    #[serde(with = "humantime_serde", default)]
    pub kill9_at: Option<Duration>,
}

/// A mix that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MixError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid TOML, or unknown or mistyped keys.
    #[error("{origin}: {message}")]
    Parse {
        /// The file (or `standard` for the built-in mix).
        origin: String,
        /// What the TOML parser says, with line and column.
        message: String,
    },
    /// A value out of range.
    #[error("{origin}: {key}: {message}")]
    Invalid {
        /// The file.
        origin: String,
        /// The key, e.g. `calls.hang`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

// === impl FaultMix ===

impl FaultMix {
    /// The built-in standard mix.
    pub fn standard() -> Result<Self, MixError> {
        Self::parse(STANDARD, "standard")
    }

    /// Reads and checks a mix file.
    pub fn load(path: &Path) -> Result<Self, MixError> {
        let text = std::fs::read_to_string(path).map_err(|source| MixError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and checks mix text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, MixError> {
        let mix: Self = toml::from_str(text).map_err(|e| MixError::Parse {
            origin: origin.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        mix.check(origin)?;
        Ok(mix)
    }

    fn check(&self, origin: &str) -> Result<(), MixError> {
        let invalid = |key: &str, message: String| MixError::Invalid {
            origin: origin.to_owned(),
            key: key.to_owned(),
            message,
        };
        let c = &self.calls;
        for (key, rate) in [
            ("calls.error_5xx", c.error_5xx),
            ("calls.rate_limited", c.rate_limited),
            ("calls.hang", c.hang),
            ("calls.stream_cut", c.stream_cut),
            ("calls.drop", c.drop),
            ("calls.malformed", c.malformed),
            ("calls.slow", c.slow),
            ("agents.killed", self.agents.killed),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(invalid(
                    key,
                    format!("{rate} is not a share between 0 and 1"),
                ));
            }
        }
        let sum = c.total();
        if sum > 1.0 {
            return Err(invalid(
                "calls",
                format!("the rates add up to {sum}, more than 1"),
            ));
        }
        for (i, outage) in self.outages.iter().enumerate() {
            if outage.target.trim().is_empty() {
                return Err(invalid(
                    &format!("outages[{i}].target"),
                    "must name a model".to_owned(),
                ));
            }
            if outage.start.checked_add(outage.duration).is_none() {
                return Err(invalid(
                    &format!("outages[{i}]"),
                    "start + duration is too far in the future".to_owned(),
                ));
            }
            if outage.duration.is_zero() {
                return Err(invalid(
                    &format!("outages[{i}].duration"),
                    "must be longer than zero".to_owned(),
                ));
            }
        }
        Ok(())
    }

    /// The outage of `model` in force `elapsed` after the start, if any.
    pub fn outage_at(&self, model: &str, elapsed: Duration) -> Option<&Outage> {
        self.outages.iter().find(|o| {
            o.target == model && elapsed >= o.start && elapsed < o.start.saturating_add(o.duration)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_standard_mix_parses_with_the_issue_s_rates() {
        let mix = FaultMix::standard().unwrap();
        assert_eq!(mix.calls.error_5xx, 0.05);
        assert_eq!(mix.calls.rate_limited, 0.02);
        assert_eq!(mix.calls.hang, 0.01);
        assert_eq!(mix.calls.stream_cut, 0.005);
        assert_eq!(mix.agents.killed, 0.01);
        assert_eq!(mix.outages.len(), 1);
        assert_eq!(mix.outages[0].target, "large");
        assert_eq!(mix.outages[0].duration, Duration::from_secs(20));
        assert!(mix.keel.kill9_at.is_some());
    }

    #[test]
    fn an_outage_covers_its_window_only() {
        let mix = FaultMix::standard().unwrap();
        let o = &mix.outages[0];
        assert!(mix.outage_at("large", o.start).is_some());
        assert!(mix.outage_at("large", o.start + o.duration).is_none());
        assert!(mix.outage_at("small", o.start).is_none());
    }

    #[test]
    fn a_rate_out_of_range_names_its_key() {
        let err = FaultMix::parse("[calls]\nhang = 1.5\n", "mix.toml").unwrap_err();
        assert_eq!(
            err.to_string(),
            "mix.toml: calls.hang: 1.5 is not a share between 0 and 1"
        );
    }

    #[test]
    fn rates_adding_up_past_one_are_refused() {
        let err = FaultMix::parse("[calls]\nhang = 0.6\nerror_5xx = 0.6\n", "m").unwrap_err();
        assert!(err.to_string().contains("add up to"), "{err}");
    }

    #[test]
    fn an_unknown_key_is_an_error_with_its_line() {
        let err = FaultMix::parse("[calls]\nhangs = 0.1\n", "m.toml").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("m.toml: "), "{text}");
        assert!(text.contains("hangs"), "{text}");
        assert!(text.contains("line 2"), "{text}");
    }

    #[test]
    fn an_empty_mix_injects_nothing() {
        let mix = FaultMix::parse("", "empty").unwrap();
        assert_eq!(mix, FaultMix::default());
    }
}
