//! `[routes.NAME]`: what a client's `"model": "NAME"` means — an ordered chain of targets,
//! with the retry, timeout and breaker policy that applies to each attempt.

use std::num::NonZeroU32;
use std::time::Duration;

use keel_policy::backoff::Jitter;
use keel_policy::breaker::BreakerSettings;
use serde::Deserialize;

use crate::breaker::BreakerConfig;
use crate::duration::{self, show};
use crate::error::{Invalid, KeyPath, Problems};

/// Default attempts: per target for a route's retry, per task for an agent.
pub(crate) const DEFAULT_MAX_ATTEMPTS: NonZeroU32 = match NonZeroU32::new(3) {
    Some(n) => n,
    None => NonZeroU32::MIN,
};

// === route ===

/// `[routes.NAME]` as written in keel.toml. Nothing here is trusted yet.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Targets in fallback order.
    #[serde(default)]
    pub targets: Vec<TargetConfig>,
    /// Static reply served when every target is unavailable.
    #[serde(default)]
    pub degraded_reply: Option<String>,
    /// `retry = { ... }`.
    #[serde(default)]
    pub retry: RetryConfig,
    /// `timeouts = { ... }`.
    #[serde(default)]
    pub timeouts: TimeoutConfig,
    /// `breaker = { ... }`: overrides of `[breaker]` for this route's targets.
    #[serde(default)]
    pub breaker: Option<BreakerConfig>,
    /// Check answers to `response_format: json_schema` requests against the schema,
    /// asking once more with the error before falling back (default true).
    #[serde(default = "defaults::yes")]
    pub validate_output: bool,
}

/// `{ provider = "...", model = "..." }` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// A key of `[providers]`.
    pub provider: String,
    /// The model name sent to that provider.
    pub model: String,
}

/// A validated route.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteSettings {
    /// The table name, `NAME` in `[routes.NAME]`: what clients send as `model`.
    pub name: String,
    /// Targets in fallback order; never empty.
    pub targets: Vec<TargetSettings>,
    /// Served (with `x-keel-degraded: true`) when every target is open or failed; `None`
    /// answers 503 instead.
    pub degraded_reply: Option<String>,
    /// Retry policy for each target.
    pub retry: RetrySettings,
    /// Timeouts of each attempt and of the whole call.
    pub timeouts: TimeoutSettings,
    /// The breaker for this route's targets: `[breaker]` with the route's overrides applied.
    pub breaker: BreakerSettings,
    /// Whether `json_schema` answers are checked and corrected.
    pub validate_output: bool,
}

/// A validated target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSettings {
    /// A provider that exists in [`crate::Settings::providers`].
    pub provider: String,
    /// The model name sent to that provider.
    pub model: String,
}

impl TargetSettings {
    /// `PROVIDER/MODEL`: how keel names the target (breakers, metrics, `x-keel-target`).
    pub fn id(&self) -> String {
        format!("{}/{}", self.provider, self.model)
    }
}

impl RouteConfig {
    /// Checks every rule; `providers` are the names in `[providers]` (sorted), `breaker` the
    /// validated `[breaker]` the route's override inherits from.
    pub fn validate(
        self,
        name: &str,
        at: &KeyPath,
        providers: &[&str],
        breaker: &BreakerSettings,
    ) -> Result<RouteSettings, Vec<Invalid>> {
        let mut problems = Problems::default();
        if self.targets.is_empty() {
            problems.push(at.child("targets").invalid(
                "must list at least one target, like { provider = \"openai\", model = \"gpt-5\" }",
            ));
        }
        for (i, target) in self.targets.iter().enumerate() {
            if target.model.trim().is_empty() {
                problems.push(at.child("targets").index(i).child("model").invalid(
                    "must name the provider's model, like \"gpt-5\" (it is sent upstream as `model`)",
                ));
            }
            if !providers.contains(&target.provider.as_str()) {
                let known = if providers.is_empty() {
                    "no providers are configured".to_owned()
                } else {
                    format!("known: {}", providers.join(", "))
                };
                problems.push(
                    at.child("targets")
                        .index(i)
                        .child("provider")
                        .invalid(format!("unknown provider {:?}; {known}", target.provider)),
                );
            }
        }
        if self
            .degraded_reply
            .as_deref()
            .is_some_and(|reply| reply.trim().is_empty())
        {
            problems.push(at.child("degraded_reply").invalid(
                "is empty: clients would get a blank answer; write the text to serve, or leave degraded_reply out for a 503",
            ));
        }
        let retry = problems.take(self.retry.validate(&at.child("retry")));
        let timeouts = problems.take(self.timeouts.validate(&at.child("timeouts")));
        let breaker = match self.breaker {
            Some(config) => problems.take(config.validate(&at.child("breaker"), breaker)),
            None => Some(*breaker),
        };
        problems.finish(at, || {
            Some(RouteSettings {
                name: name.to_owned(),
                targets: self
                    .targets
                    .into_iter()
                    .map(|t| TargetSettings {
                        provider: t.provider,
                        model: t.model,
                    })
                    .collect(),
                degraded_reply: self.degraded_reply,
                retry: retry?,
                timeouts: timeouts?,
                breaker: breaker?,
                validate_output: self.validate_output,
            })
        })
    }
}

// === retry ===

/// `retry = { ... }` as written in keel.toml. Nothing here is trusted yet.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts per target, the first included.
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    /// First backoff step (`None`: not written, 200ms).
    #[serde(default, deserialize_with = "duration::optional")]
    pub base: Option<Duration>,
    /// Largest backoff, and the most a `Retry-After` is honoured for (`None`: not written,
    /// 10s).
    #[serde(default, deserialize_with = "duration::optional")]
    pub cap: Option<Duration>,
    /// `"none" | "full" | "equal" | "decorrelated"`.
    #[serde(default)]
    pub jitter: Jitter,
    /// Honour the provider's `Retry-After` (up to `cap`).
    #[serde(default = "defaults::yes")]
    pub respect_retry_after: bool,
    /// Retries allowed as a fraction of calls.
    #[serde(default = "defaults::budget_ratio")]
    pub budget_ratio: f64,
    /// Retries per second always allowed, whatever the ratio.
    #[serde(default = "defaults::budget_min_per_sec")]
    pub budget_min_per_sec: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: defaults::max_attempts(),
            base: None,
            cap: None,
            jitter: Jitter::default(),
            respect_retry_after: true,
            budget_ratio: defaults::budget_ratio(),
            budget_min_per_sec: defaults::budget_min_per_sec(),
        }
    }
}

/// Validated retry policy of a route.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetrySettings {
    /// Attempts per target including the first (default 3).
    pub max_attempts: NonZeroU32,
    /// First backoff step (default 200ms); never larger than `cap`.
    pub base: Duration,
    /// Largest backoff (default 10s).
    pub cap: Duration,
    /// How delays are randomised (default full).
    pub jitter: Jitter,
    /// Honour `Retry-After` up to `cap` (default true).
    pub respect_retry_after: bool,
    /// Retries allowed as a fraction of calls, in [0, 1] (default 0.2).
    pub budget_ratio: f64,
    /// Retries per second always allowed (default 10).
    pub budget_min_per_sec: u32,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            max_attempts: defaults::MAX_ATTEMPTS,
            base: defaults::base(),
            cap: defaults::cap(),
            jitter: Jitter::default(),
            respect_retry_after: true,
            budget_ratio: defaults::budget_ratio(),
            budget_min_per_sec: defaults::budget_min_per_sec(),
        }
    }
}

impl RetryConfig {
    /// Checks every rule and returns settings the retry layer can use without checks.
    pub fn validate(self, at: &KeyPath) -> Result<RetrySettings, Vec<Invalid>> {
        let mut problems = Problems::default();
        let max_attempts = problems.one(at_least_one(self.max_attempts, &at.child("max_attempts")));
        let base = self.base.unwrap_or_else(defaults::base);
        let cap = self.cap.unwrap_or_else(defaults::cap);
        if base > cap {
            // Said of the one written (`base` when both are), with the other's default named.
            let problem = match self.base {
                Some(_) => at.child("base").invalid(format!(
                    "{} is larger than cap {}{}",
                    show(base),
                    show(cap),
                    if self.cap.is_none() {
                        " (cap not set here: its default; set cap too)"
                    } else {
                        ""
                    }
                )),
                None => at.child("cap").invalid(format!(
                    "{} is smaller than base {} (base not set here: its default; set base too)",
                    show(cap),
                    show(base)
                )),
            };
            problems.push(problem);
        }
        if !(0.0..=1.0).contains(&self.budget_ratio) {
            problems.push(
                at.child("budget_ratio")
                    .invalid(format!("{} is outside [0, 1]", self.budget_ratio)),
            );
        }
        if self.max_attempts > MAX_ATTEMPTS {
            problems.push(at.child("max_attempts").invalid(format!(
                "{} is over {MAX_ATTEMPTS}, the most attempts keel makes on one target",
                self.max_attempts
            )));
        }
        if cap > MAX_BACKOFF {
            problems.push(at.child("cap").invalid(format!(
                "{} is longer than {}, the longest keel waits between attempts",
                show(cap),
                show(MAX_BACKOFF)
            )));
        }
        problems.finish(at, || {
            Some(RetrySettings {
                max_attempts: max_attempts?,
                base,
                cap,
                jitter: self.jitter,
                respect_retry_after: self.respect_retry_after,
                budget_ratio: self.budget_ratio,
                budget_min_per_sec: self.budget_min_per_sec,
            })
        })
    }
}

/// The most attempts a route makes on one target.
pub const MAX_ATTEMPTS: u32 = 100;

/// The longest wait between two attempts (`cap`).
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// A count that must be at least 1.
pub(crate) fn at_least_one(value: u32, at: &KeyPath) -> Result<NonZeroU32, Invalid> {
    NonZeroU32::new(value).ok_or_else(|| at.invalid("must be at least 1"))
}

// === timeouts ===

/// The longest any of a route's timeouts may be.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// `timeouts = { ... }` as written in keel.toml. Nothing here is trusted yet. A timeout left
/// out takes its default, shortened to fit the ones that hold it (`timeouts = { total = "30s" }`
/// gives attempts of 30s, not the 60s default that would not fit).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutConfig {
    /// TCP + TLS connect.
    #[serde(default, deserialize_with = "duration::optional")]
    pub connect: Option<Duration>,
    /// Request sent to the first streamed token (content, a tool call or a finish).
    #[serde(default, deserialize_with = "duration::optional")]
    pub first_token: Option<Duration>,
    /// Longest silence between streamed chunks.
    #[serde(default, deserialize_with = "duration::optional")]
    pub idle: Option<Duration>,
    /// One attempt, start to end (a stream's attempt ends with the stream).
    #[serde(default, deserialize_with = "duration::optional")]
    pub attempt: Option<Duration>,
    /// The whole call: every attempt, backoff and fallback.
    #[serde(default, deserialize_with = "duration::optional")]
    pub total: Option<Duration>,
}

/// Validated timeouts of a route: all longer than zero, and
/// `connect <= attempt`, `first_token <= attempt`, `attempt <= total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeoutSettings {
    /// TCP + TLS connect (default 2s).
    pub connect: Duration,
    /// Request sent to the first streamed token (content, a tool call or a finish); default
    /// 20s.
    pub first_token: Duration,
    /// Longest silence between streamed chunks (default 15s).
    pub idle: Duration,
    /// One attempt (default 60s).
    pub attempt: Duration,
    /// The whole call including retries and fallbacks (default 120s).
    pub total: Duration,
    /// `attempt` when written: a stream's attempt lasts as long as the stream, so it bounds
    /// the whole stream too. Unwritten, a stream runs to `total` (the 60s default is for an
    /// attempt's answer, not for a long stream).
    pub stream_attempt: Option<Duration>,
}

impl Default for TimeoutSettings {
    fn default() -> Self {
        Self {
            connect: defaults::connect(),
            first_token: defaults::first_token(),
            idle: defaults::idle(),
            attempt: defaults::attempt(),
            total: defaults::total(),
            stream_attempt: None,
        }
    }
}

impl TimeoutConfig {
    /// Checks that every timeout is positive and that they nest.
    pub fn validate(self, at: &KeyPath) -> Result<TimeoutSettings, Vec<Invalid>> {
        let mut problems = Problems::default();
        // Defaults fit inside what holds them; only timeouts written down can conflict.
        let total = self.total.unwrap_or_else(defaults::total);
        let attempt = self
            .attempt
            .unwrap_or_else(|| defaults::attempt().min(total));
        let fit = |value: Option<Duration>, default: Duration| {
            value.unwrap_or_else(|| default.min(attempt))
        };
        let settings = TimeoutSettings {
            connect: fit(self.connect, defaults::connect()),
            first_token: fit(self.first_token, defaults::first_token()),
            idle: self.idle.unwrap_or_else(defaults::idle),
            attempt,
            total,
            stream_attempt: self.attempt,
        };
        let written = [
            ("connect", self.connect),
            ("first_token", self.first_token),
            ("idle", self.idle),
            ("attempt", self.attempt),
            ("total", self.total),
        ];
        for (key, value) in written {
            if value.is_some_and(|v| v.is_zero()) {
                problems.push(at.child(key).invalid("must be longer than 0s"));
            }
            if let Some(v) = value.filter(|v| *v > MAX_TIMEOUT) {
                problems.push(at.child(key).invalid(format!(
                    "{} is longer than {}, the longest a model call may take",
                    show(v),
                    show(MAX_TIMEOUT)
                )));
            }
        }
        let s = &settings;
        let nested = [
            ("connect", s.connect, "attempt", s.attempt),
            ("first_token", s.first_token, "attempt", s.attempt),
            ("attempt", s.attempt, "total", s.total),
        ];
        for (key, value, outer, limit) in nested {
            if value > limit {
                let unset = match outer {
                    "total" if self.total.is_none() => {
                        " (not set here: its default; set total too)".to_owned()
                    }
                    "attempt" if self.attempt.is_none() => format!(
                        " (not set here: its default, fitted inside what holds it; set {outer} too)"
                    ),
                    _ => String::new(),
                };
                problems.push(at.child(key).invalid(format!(
                    "{} is longer than {outer} {}{unset}",
                    show(value),
                    show(limit)
                )));
            }
        }
        problems.finish(at, || Some(settings))
    }
}

// === defaults ===

mod defaults {
    use std::num::NonZeroU32;
    use std::time::Duration;

    pub(super) const MAX_ATTEMPTS: NonZeroU32 = super::DEFAULT_MAX_ATTEMPTS;

    pub(super) fn max_attempts() -> u32 {
        MAX_ATTEMPTS.get()
    }
    pub(super) fn base() -> Duration {
        Duration::from_millis(200)
    }
    pub(super) fn cap() -> Duration {
        Duration::from_secs(10)
    }
    pub(super) fn yes() -> bool {
        true
    }
    pub(super) fn budget_ratio() -> f64 {
        0.2
    }
    pub(super) fn budget_min_per_sec() -> u32 {
        10
    }
    pub(super) fn connect() -> Duration {
        Duration::from_secs(2)
    }
    pub(super) fn first_token() -> Duration {
        Duration::from_secs(20)
    }
    pub(super) fn idle() -> Duration {
        Duration::from_secs(15)
    }
    pub(super) fn attempt() -> Duration {
        Duration::from_secs(60)
    }
    pub(super) fn total() -> Duration {
        Duration::from_secs(120)
    }
}
