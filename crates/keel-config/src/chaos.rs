//! `[chaos]`: fault injection into keel's own calls to providers, for game days.
//!
//! Off unless `enabled = true`. While off, the section is still validated (so a game-day
//! config can be checked ahead of time) but nothing is injected and the `x-keel-chaos`
//! request header is ignored. This module owns the shape of the section and its rules; the
//! gateway decides per attempt whether a fault fires and injects it.
//!
//! ```toml
//! [chaos]
//! enabled = true
//! seed = 42                         # same seed, same faults for the same calls
//!
//! [[chaos.faults]]
//! match = { route = "smart", target = "openai/gpt-5" }   # route, target, agent, task; all optional
//! rate = 0.05                       # probability per provider attempt
//! kind = "status"                   # status | latency | hang | drop | stream_cut | malformed
//! status = 503
//! retry_after = "2s"
//!
//! [[chaos.outages]]
//! target = "openai/gpt-5"           # or route = "smart"
//! start = "30s"                     # after keel starts, or a UTC time "2026-11-23T10:00:00Z"
//! duration = "20s"
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::duration::{self, show};
use crate::error::{Invalid, KeyPath, Problems};

// === raw config ===

/// `[chaos]` as written in keel.toml. Nothing here is trusted yet.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChaosConfig {
    /// Whether anything is injected at all (default false).
    #[serde(default)]
    pub enabled: bool,
    /// Seed of the per-attempt decisions; absent: a random seed per start of keel.
    #[serde(default)]
    pub seed: Option<u64>,
    /// `[[chaos.faults]]`: probabilistic faults.
    #[serde(default)]
    pub faults: Vec<FaultRuleConfig>,
    /// `[[chaos.outages]]`: scheduled full outages.
    #[serde(default)]
    pub outages: Vec<OutageConfig>,
}

/// The name of a fault, as written in `kind = "..."`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// The upstream answers an HTTP error status.
    Status,
    /// Added delay before the real call.
    Latency,
    /// No answer until keel's own deadline fires.
    Hang,
    /// The connection fails before the first byte.
    Drop,
    /// The answer is cut after some chunks.
    StreamCut,
    /// A 200 whose body is not valid JSON.
    Malformed,
}

impl FaultKind {
    /// The name used in config, the header, events and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::Latency => "latency",
            Self::Hang => "hang",
            Self::Drop => "drop",
            Self::StreamCut => "stream_cut",
            Self::Malformed => "malformed",
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[[chaos.faults]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultRuleConfig {
    /// `match = { route, target, agent, task }`: which attempts the rule applies to.
    #[serde(default, rename = "match")]
    pub scope: ScopeConfig,
    /// Probability in [0, 1] that a matching attempt gets the fault.
    pub rate: f64,
    /// `status | latency | hang | drop | stream_cut | malformed`.
    #[serde(default)]
    pub kind: Option<FaultKind>,
    /// `kind = "status"`: the HTTP status, 400..=599.
    #[serde(default)]
    pub status: Option<u16>,
    /// `kind = "status"`: a `Retry-After` to send with it.
    #[serde(default, deserialize_with = "duration::optional")]
    pub retry_after: Option<Duration>,
    /// `kind = "latency"`: `"200ms"`, or `{ min = "50ms", max = "500ms" }` (uniform).
    #[serde(default)]
    pub latency: Option<Latency>,
    /// `kind = "stream_cut"`: chunks passed through before the cut (0: before the first).
    #[serde(default)]
    pub after_chunks: Option<u32>,
}

/// `match = { ... }` as written; an absent key matches anything.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeConfig {
    /// A route name.
    #[serde(default)]
    pub route: Option<String>,
    /// A target, `provider/model`.
    #[serde(default)]
    pub target: Option<String>,
    /// An agent name.
    #[serde(default)]
    pub agent: Option<String>,
    /// A task id.
    #[serde(default)]
    pub task: Option<String>,
}

/// `[[chaos.outages]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutageConfig {
    /// The route whose every attempt fails.
    #[serde(default)]
    pub route: Option<String>,
    /// The target (`provider/model`) whose every attempt fails.
    #[serde(default)]
    pub target: Option<String>,
    /// A duration after keel starts (`"30s"`) or a UTC time (`"2026-11-23T10:00:00Z"`).
    pub start: String,
    /// How long the outage lasts.
    #[serde(deserialize_with = "duration::required")]
    pub duration: Duration,
    /// How the outage fails attempts: `drop` (default), `status` or `hang`.
    #[serde(default)]
    pub kind: Option<FaultKind>,
    /// `kind = "status"`: the HTTP status, 400..=599.
    #[serde(default)]
    pub status: Option<u16>,
    /// `kind = "status"`: a `Retry-After` to send with it.
    #[serde(default, deserialize_with = "duration::optional")]
    pub retry_after: Option<Duration>,
    /// `kind = "latency"`: `"200ms"`, or `{ min = "50ms", max = "500ms" }` (uniform).
    #[serde(default)]
    pub latency: Option<Latency>,
    /// `kind = "stream_cut"`: chunks passed through before the cut (0: before the first).
    #[serde(default)]
    pub after_chunks: Option<u32>,
}

/// A fault's kind parameters, gathered from a rule or an outage for one validation.
struct FaultParams {
    status: Option<u16>,
    retry_after: Option<Duration>,
    latency: Option<Latency>,
    after_chunks: Option<u32>,
}

// === validated settings ===

/// A validated `[chaos]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChaosSettings {
    /// Whether anything is injected (and `x-keel-chaos` honoured).
    pub enabled: bool,
    /// The decision seed; `None` means a random one per start.
    pub seed: Option<u64>,
    /// Probabilistic rules, in file order; the first that fires wins.
    pub faults: Vec<FaultRule>,
    /// Scheduled outages.
    pub outages: Vec<Outage>,
}

/// One validated `[[chaos.faults]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultRule {
    /// Which attempts it applies to.
    pub scope: Scope,
    /// Probability per matching attempt, in [0, 1].
    pub rate: f64,
    /// What happens when it fires.
    pub fault: Fault,
}

/// Which attempts a rule applies to: every `Some` must equal the attempt's value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// Route name, a key of [`crate::Settings::routes`].
    pub route: Option<String>,
    /// Target `provider/model`, a target of some route (of `route`, when both are set).
    pub target: Option<String>,
    /// Agent name.
    pub agent: Option<String>,
    /// Task id.
    pub task: Option<String>,
}

/// A fault with its parameters; values cannot be invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer `status` (400..=599) without calling the upstream, with `Retry-After` when set.
    Status {
        /// HTTP status.
        status: u16,
        /// `Retry-After` sent with it.
        retry_after: Option<Duration>,
    },
    /// Wait, then make the real call.
    Latency(Latency),
    /// Never answer: the attempt's own deadline ends it.
    Hang,
    /// A transport error before the first byte, without calling the upstream.
    Drop,
    /// Make the real call and cut its answer after `after_chunks` chunks.
    StreamCut {
        /// Chunks passed through before the cut.
        after_chunks: u32,
    },
    /// A 200 whose body is not valid JSON, without calling the upstream.
    Malformed,
}

impl Fault {
    /// The fault's name.
    pub fn kind(&self) -> FaultKind {
        match self {
            Self::Status { .. } => FaultKind::Status,
            Self::Latency(_) => FaultKind::Latency,
            Self::Hang => FaultKind::Hang,
            Self::Drop => FaultKind::Drop,
            Self::StreamCut { .. } => FaultKind::StreamCut,
            Self::Malformed => FaultKind::Malformed,
        }
    }
}

/// Added latency: fixed, or uniform between `min` and `max` (`min <= max`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Latency {
    /// Always this long.
    Fixed(Duration),
    /// Uniformly distributed in `[min, max]`.
    Uniform {
        /// Shortest delay.
        min: Duration,
        /// Longest delay.
        max: Duration,
    },
}

impl<'de> Deserialize<'de> for Latency {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(LatencyVisitor)
    }
}

/// `{ min = "...", max = "..." }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LatencyRange {
    #[serde(deserialize_with = "duration::required")]
    min: Duration,
    #[serde(deserialize_with = "duration::required")]
    max: Duration,
}

struct LatencyVisitor;

impl<'de> Visitor<'de> for LatencyVisitor {
    type Value = Latency;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(r#"a duration like "200ms" or a range like { min = "50ms", max = "500ms" }"#)
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Latency, E> {
        humantime::parse_duration(text)
            .map(Latency::Fixed)
            .map_err(|e| {
                E::custom(format!(
                    r#"invalid duration {text:?}: {e}; write durations like "250ms", "30s" or "10m""#
                ))
            })
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Latency, A::Error> {
        let range = LatencyRange::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
        Ok(Latency::Uniform {
            min: range.min,
            max: range.max,
        })
    }
}

/// A scheduled outage: every matching attempt in the window gets `fault`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outage {
    /// What is down.
    pub scope: OutageScope,
    /// When it starts.
    pub start: OutageStart,
    /// How long it lasts; longer than zero.
    pub duration: Duration,
    /// How attempts fail: [`Fault::Drop`], [`Fault::Status`] or [`Fault::Hang`].
    pub fault: Fault,
}

/// What an outage takes down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutageScope {
    /// Every attempt made for this route.
    Route(String),
    /// Every attempt at this target (`provider/model`), whatever the route.
    Target(String),
}

/// When an outage starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutageStart {
    /// This long after keel started.
    AfterStart(Duration),
    /// At this wall-clock time.
    At(SystemTime),
}

// === validation ===

/// What a `[chaos]` section is checked against: the routes (with their targets as
/// `provider/model`) and the agent names as written.
pub(crate) struct Known<'a> {
    /// Route name → its targets, `provider/model`.
    pub(crate) routes: &'a BTreeMap<String, Vec<String>>,
    /// Agent names that may appear; `None` when any name may (no agent keys configured).
    pub(crate) agents: Option<Vec<&'a str>>,
}

impl ChaosConfig {
    /// Checks every rule and outage against the routes and agents in `known`.
    pub(crate) fn validate(
        self,
        at: &KeyPath,
        known: &Known<'_>,
    ) -> Result<ChaosSettings, Vec<Invalid>> {
        let mut problems = Problems::default();
        let mut faults = Vec::with_capacity(self.faults.len());
        for (i, rule) in self.faults.into_iter().enumerate() {
            if let Some(rule) = problems.take(rule.validate(&at.child("faults").index(i), known)) {
                faults.push(rule);
            }
        }
        let mut outages = Vec::with_capacity(self.outages.len());
        for (i, outage) in self.outages.into_iter().enumerate() {
            if let Some(outage) =
                problems.take(outage.validate(&at.child("outages").index(i), known))
            {
                outages.push(outage);
            }
        }
        problems.finish(at, || {
            Some(ChaosSettings {
                enabled: self.enabled,
                seed: self.seed,
                faults,
                outages,
            })
        })
    }
}

impl FaultRuleConfig {
    fn validate(self, at: &KeyPath, known: &Known<'_>) -> Result<FaultRule, Vec<Invalid>> {
        let mut problems = Problems::default();
        if !(0.0..=1.0).contains(&self.rate) {
            problems.push(
                at.child("rate")
                    .invalid(format!("{} is outside [0, 1]", self.rate)),
            );
        }
        let scope = problems.take(self.scope.validate(&at.child("match"), known));
        let params = FaultParams {
            status: self.status,
            retry_after: self.retry_after,
            latency: self.latency,
            after_chunks: self.after_chunks,
        };
        let fault = match self.kind {
            Some(kind) => problems.take(params.validate(kind, at)),
            None => {
                problems.push(
                    at.child("kind")
                        .invalid(format!("missing; one of {}", quoted(&ALL_KINDS))),
                );
                None
            }
        };
        problems.finish(at, || {
            Some(FaultRule {
                scope: scope?,
                rate: self.rate,
                fault: fault?,
            })
        })
    }
}

const ALL_KINDS: [FaultKind; 6] = [
    FaultKind::Status,
    FaultKind::Latency,
    FaultKind::Hang,
    FaultKind::Drop,
    FaultKind::StreamCut,
    FaultKind::Malformed,
];

/// The kinds an outage may use: each fails every attempt.
const OUTAGE_KINDS: [FaultKind; 3] = [FaultKind::Drop, FaultKind::Status, FaultKind::Hang];

fn quoted(kinds: &[FaultKind]) -> String {
    kinds
        .iter()
        .map(|k| format!("{:?}", k.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

impl FaultParams {
    /// Checks that `kind` has the parameters it needs and no parameter of another kind.
    fn validate(self, kind: FaultKind, at: &KeyPath) -> Result<Fault, Vec<Invalid>> {
        let mut problems = Problems::default();
        let given = [
            ("status", self.status.is_some(), FaultKind::Status),
            ("retry_after", self.retry_after.is_some(), FaultKind::Status),
            ("latency", self.latency.is_some(), FaultKind::Latency),
            (
                "after_chunks",
                self.after_chunks.is_some(),
                FaultKind::StreamCut,
            ),
        ];
        for (key, present, owner) in given {
            if present && owner != kind {
                problems.push(at.child(key).invalid(format!(
                    "only applies to kind = {:?}, not {:?}",
                    owner.as_str(),
                    kind.as_str()
                )));
            }
        }
        let missing = |key: &str, example: &str| {
            at.child(key).invalid(format!(
                "kind = {:?} needs {key}, like {example}",
                kind.as_str()
            ))
        };
        let fault = match kind {
            FaultKind::Status => match self.status {
                Some(status) if (400..=599).contains(&status) => Some(Fault::Status {
                    status,
                    retry_after: self.retry_after,
                }),
                Some(status) => {
                    problems.push(at.child("status").invalid(format!(
                        "{status} is not an HTTP error status; use 400..=599"
                    )));
                    None
                }
                None => {
                    problems.push(missing("status", "status = 503"));
                    None
                }
            },
            FaultKind::Latency => match self.latency {
                Some(latency) => problems
                    .one(check_latency(latency, &at.child("latency")))
                    .map(Fault::Latency),
                None => {
                    problems.push(missing("latency", "latency = \"200ms\""));
                    None
                }
            },
            FaultKind::Hang => Some(Fault::Hang),
            FaultKind::Drop => Some(Fault::Drop),
            FaultKind::StreamCut => match self.after_chunks {
                Some(after_chunks) => Some(Fault::StreamCut { after_chunks }),
                None => {
                    problems.push(missing("after_chunks", "after_chunks = 3"));
                    None
                }
            },
            FaultKind::Malformed => Some(Fault::Malformed),
        };
        problems.finish(at, || fault)
    }
}

fn check_latency(latency: Latency, at: &KeyPath) -> Result<Latency, Invalid> {
    match latency {
        Latency::Fixed(d) if d.is_zero() => Err(at.invalid("must be longer than 0s")),
        Latency::Uniform { min, max } if min > max => {
            Err(at
                .child("min")
                .invalid(format!("{} is longer than max {}", show(min), show(max))))
        }
        Latency::Uniform { max, .. } if max.is_zero() => {
            Err(at.child("max").invalid("must be longer than 0s"))
        }
        ok @ (Latency::Fixed(_) | Latency::Uniform { .. }) => Ok(ok),
    }
}

impl ScopeConfig {
    fn validate(self, at: &KeyPath, known: &Known<'_>) -> Result<Scope, Vec<Invalid>> {
        let mut problems = Problems::default();
        let empty = [
            ("route", &self.route),
            ("target", &self.target),
            ("agent", &self.agent),
            ("task", &self.task),
        ];
        for (key, value) in empty {
            if value.as_deref() == Some("") {
                problems.push(
                    at.child(key)
                        .invalid("must not be empty; leave it out to match any"),
                );
            }
        }
        if let Some(route) = self.route.as_deref().filter(|r| !r.is_empty()) {
            problems.one(check_route(route, &at.child("route"), known));
        }
        if let Some(target) = self.target.as_deref().filter(|t| !t.is_empty()) {
            let in_route = self
                .route
                .as_deref()
                .filter(|r| known.routes.contains_key(*r));
            problems.one(check_target(target, in_route, &at.child("target"), known));
        }
        if let (Some(agent), Some(agents)) = (self.agent.as_deref(), &known.agents)
            && !agent.is_empty()
            && !agents.contains(&agent)
        {
            problems.push(at.child("agent").invalid(format!(
                "unknown agent {agent:?}; known: {}",
                agents.join(", ")
            )));
        }
        problems.finish(at, || {
            Some(Scope {
                route: self.route,
                target: self.target,
                agent: self.agent,
                task: self.task,
            })
        })
    }
}

fn check_route(route: &str, at: &KeyPath, known: &Known<'_>) -> Result<(), Invalid> {
    if known.routes.contains_key(route) {
        return Ok(());
    }
    let names: Vec<&str> = known.routes.keys().map(String::as_str).collect();
    let known = if names.is_empty() {
        "no routes are configured".to_owned()
    } else {
        format!("known: {}", names.join(", "))
    };
    Err(at.invalid(format!("unknown route {route:?}; {known}")))
}

/// A target must be `provider/model` of some route, or of `route` when one is named.
fn check_target(
    target: &str,
    route: Option<&str>,
    at: &KeyPath,
    known: &Known<'_>,
) -> Result<(), Invalid> {
    if let Some(route) = route {
        let targets = known
            .routes
            .get(route)
            .map(Vec::as_slice)
            .unwrap_or_default();
        if targets.iter().any(|t| t == target) {
            return Ok(());
        }
        return Err(at.invalid(format!(
            "{target:?} is not a target of route {route:?}; its targets: {}",
            targets.join(", ")
        )));
    }
    let mut all: Vec<&str> = known
        .routes
        .values()
        .flatten()
        .map(String::as_str)
        .collect();
    all.sort_unstable();
    all.dedup();
    if all.contains(&target) {
        return Ok(());
    }
    let known = if all.is_empty() {
        "no routes are configured".to_owned()
    } else {
        format!("known: {}", all.join(", "))
    };
    Err(at.invalid(format!(
        "unknown target {target:?}; write it as provider/model of a route's target; {known}"
    )))
}

impl OutageConfig {
    fn validate(self, at: &KeyPath, known: &Known<'_>) -> Result<Outage, Vec<Invalid>> {
        let mut problems = Problems::default();
        let scope = match (self.route, self.target) {
            (Some(route), None) => problems
                .one(check_route(&route, &at.child("route"), known))
                .map(|()| OutageScope::Route(route)),
            (None, Some(target)) => problems
                .one(check_target(&target, None, &at.child("target"), known))
                .map(|()| OutageScope::Target(target)),
            (Some(_), Some(_)) => {
                problems.push(
                    at.child("target")
                        .invalid("give either route or target, not both"),
                );
                None
            }
            (None, None) => {
                problems.push(at.invalid(
                    "needs route = \"NAME\" or target = \"provider/model\": what is down",
                ));
                None
            }
        };
        let start = problems.one(parse_start(&self.start, &at.child("start")));
        if self.duration.is_zero() {
            problems.push(at.child("duration").invalid("must be longer than 0s"));
        }
        let kind = self.kind.unwrap_or(FaultKind::Drop);
        let params = FaultParams {
            status: self.status,
            retry_after: self.retry_after,
            latency: self.latency,
            after_chunks: self.after_chunks,
        };
        let fault = if OUTAGE_KINDS.contains(&kind) {
            problems.take(params.validate(kind, at))
        } else {
            problems.push(at.child("kind").invalid(format!(
                "an outage fails every attempt; use one of {}, or a [[chaos.faults]] rule with rate = 1.0 for {:?}",
                quoted(&OUTAGE_KINDS),
                kind.as_str()
            )));
            None
        };
        problems.finish(at, || {
            Some(Outage {
                scope: scope?,
                start: start?,
                duration: self.duration,
                fault: fault?,
            })
        })
    }
}

/// `"30s"` (after keel starts) or `"2026-11-23T10:00:00Z"` (UTC).
fn parse_start(text: &str, at: &KeyPath) -> Result<OutageStart, Invalid> {
    if let Ok(after) = humantime::parse_duration(text) {
        return Ok(OutageStart::AfterStart(after));
    }
    humantime::parse_rfc3339_weak(text)
        .map(OutageStart::At)
        .map_err(|_| {
            at.invalid(format!(
                "{text:?} is neither a duration after keel starts (\"30s\") nor a UTC time \
                 (\"2026-11-23T10:00:00Z\")"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_reads_durations_and_utc_times() {
        let at = KeyPath::root();
        assert_eq!(
            parse_start("30s", &at),
            Ok(OutageStart::AfterStart(Duration::from_secs(30)))
        );
        let Ok(OutageStart::At(t)) = parse_start("1970-01-01T00:01:00Z", &at) else {
            panic!("a UTC time");
        };
        assert_eq!(t, SystemTime::UNIX_EPOCH + Duration::from_secs(60));
        assert!(parse_start("tomorrow", &at).is_err());
    }
}
