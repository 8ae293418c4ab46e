//! `[tools.NAME]`: tools agents call through keel's tool gateway, and the guards on them.
//!
//! Every CEL rule is compiled here, so `keel config check` names a bad rule by key and
//! line; the tool gateway compiles them again (cheaply) to run them.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::duration;
use crate::error::{Invalid, KeyPath, Problems};
use crate::provider::check_http_url;
use crate::route::{RetryConfig, RetrySettings};

/// How long one tool call may take when `timeout` is not given.
pub const DEFAULT_TOOL_TIMEOUT: Duration = Duration::from_secs(30);

/// `[tools.NAME]` as written in keel.toml. Nothing here is trusted yet.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolConfig {
    /// HTTP endpoint that is POSTed the args.
    #[serde(default)]
    pub url: Option<String>,
    /// Wasm module run in the sandbox.
    #[serde(default)]
    pub wasm: Option<PathBuf>,
    /// The tool changes the world: never retried without an idempotency key.
    #[serde(default)]
    pub side_effects: bool,
    /// How long one call may take, every attempt included (default 30s).
    #[serde(default, deserialize_with = "duration::optional")]
    pub timeout: Option<Duration>,
    /// `retry = { max_attempts, base, cap, jitter }`; only for a tool without side
    /// effects, or a call that carries an idempotency key.
    #[serde(default)]
    pub retry: Option<RetryConfig>,
    /// Arg names whose values never reach the log (replaced by `"[redacted]"`).
    #[serde(default)]
    pub redact: Vec<String>,
    /// CEL expressions over `args` that must all hold.
    #[serde(default)]
    pub rules: Vec<String>,
    /// What to do with a result that looks like a prompt injection (default `flag`).
    #[serde(default)]
    pub injection: InjectionAction,
    /// `profile = { ... }`: the histogram guard.
    #[serde(default)]
    pub profile: Option<ProfileConfig>,
}

/// `profile = { args = [...], action = "..." }` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    /// Numeric args whose values are profiled.
    pub args: Vec<String>,
    /// What happens to a call far outside the profile.
    #[serde(default)]
    pub action: ProfileAction,
    /// Values a profile must have seen before it judges (default 20).
    #[serde(default)]
    pub warmup: Option<u64>,
    /// The quantile of the usual values the threshold starts from (default 0.99).
    #[serde(default)]
    pub quantile: Option<f64>,
    /// The threshold is `quantile × factor` (default 3).
    #[serde(default)]
    pub factor: Option<f64>,
    /// How long a call sent for approval waits for a person (default 24h); then denied.
    #[serde(default, deserialize_with = "duration::optional")]
    pub timeout: Option<Duration>,
}

/// Default `profile.warmup`.
pub const DEFAULT_PROFILE_WARMUP: u64 = 20;
/// Default `profile.quantile`.
pub const DEFAULT_PROFILE_QUANTILE: f64 = 0.99;
/// Default `profile.factor`.
pub const DEFAULT_PROFILE_FACTOR: f64 = 3.0;
/// Default `profile.timeout`.
pub const DEFAULT_APPROVAL_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// What the histogram guard does with an outlier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProfileAction {
    /// Send the call to the approval queue.
    #[default]
    Approve,
    /// Refuse the call.
    Block,
}

/// What keel does with content that looks like a prompt injection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InjectionAction {
    /// Pass it on, marked in the log and the answer.
    #[default]
    Flag,
    /// Replace the suspicious spans before passing it on.
    Strip,
    /// Withhold it.
    Block,
    /// Do not screen.
    Off,
}

/// Where a tool runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolEndpoint {
    /// An HTTP endpoint (`http(s)://`, no trailing `/`).
    Http {
        /// The URL.
        url: String,
    },
    /// A WASI command module; [`crate::load`] makes a relative path relative to the
    /// config file's folder.
    Wasm {
        /// The module file.
        path: PathBuf,
    },
}

/// A validated tool.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSettings {
    /// The table name, `NAME` in `[tools.NAME]`.
    pub name: String,
    /// Where it runs.
    pub endpoint: ToolEndpoint,
    /// The tool changes the world: never retried without an idempotency key.
    pub side_effects: bool,
    /// How long one call may take, every attempt included.
    pub timeout: Duration,
    /// Retries of a call that may be retried; `max_attempts = 1` unless configured.
    pub retry: RetrySettings,
    /// Arg names whose values never reach the log.
    pub redact: Vec<String>,
    /// CEL rules, each compiled once by the check.
    pub rules: Vec<String>,
    /// What happens to a result that looks like a prompt injection.
    pub injection: InjectionAction,
    /// The histogram guard, if configured.
    pub profile: Option<ProfileSettings>,
}

/// A validated histogram guard.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileSettings {
    /// Numeric args to profile; never empty, none of them redacted.
    pub args: Vec<String>,
    /// What happens to an outlier.
    pub action: ProfileAction,
    /// Values seen before the profile judges.
    pub warmup: u64,
    /// The quantile the threshold starts from, in (0, 1].
    pub quantile: f64,
    /// The threshold is `quantile × factor`; at least 1.
    pub factor: f64,
    /// How long an approval waits for a person before it is denied.
    pub timeout: Duration,
}

/// What is wrong with a CEL rule, if anything: empty, or not an expression.
pub(crate) fn cel_problem(rule: &str) -> Option<String> {
    if rule.trim().is_empty() {
        return Some("rule is empty".to_owned());
    }
    let e = cel::Program::compile(rule).err()?.to_string();
    let first = e.lines().next().unwrap_or("syntax error").trim();
    Some(format!("not a CEL expression: {first}"))
}

impl ToolConfig {
    /// Checks that the tool has exactly one endpoint and well-formed guards.
    pub fn validate(self, name: &str, at: &KeyPath) -> Result<ToolSettings, Vec<Invalid>> {
        let mut problems = Problems::default();
        let endpoint = match (self.url, self.wasm) {
            (Some(url), None) => problems
                .one(check_http_url(
                    &url,
                    &at.child("url"),
                    "http://127.0.0.1:9001/refund",
                ))
                .map(|url| ToolEndpoint::Http { url }),
            (None, Some(path)) => Some(ToolEndpoint::Wasm { path }),
            (Some(_), Some(_)) => {
                problems.push(
                    at.child("wasm")
                        .invalid("give either url or wasm, not both"),
                );
                None
            }
            (None, None) => {
                problems.push(at.invalid("needs url = \"http://...\" or wasm = \"path.wasm\""));
                None
            }
        };
        for (i, rule) in self.rules.iter().enumerate() {
            if let Some(problem) = cel_problem(rule) {
                problems.push(at.child("rules").index(i).invalid(problem));
            }
        }
        if self.timeout.is_some_and(|t| t.is_zero()) {
            problems.push(at.child("timeout").invalid("must be longer than 0s"));
        }
        let retry = match self.retry {
            Some(retry) => problems.take(retry.validate(&at.child("retry"))),
            None => problems.take(
                RetryConfig {
                    max_attempts: 1,
                    ..RetryConfig::default()
                }
                .validate(&at.child("retry")),
            ),
        };
        let profile = self.profile.map(|p| {
            let at = at.child("profile");
            if p.args.is_empty() {
                problems.push(
                    at.child("args")
                        .invalid("must name at least one numeric arg"),
                );
            }
            for arg in p.args.iter().filter(|a| self.redact.contains(a)) {
                problems.push(at.child("args").invalid(format!(
                    "{arg:?} is also in redact: keel learns a profile from the values it logs, and a redacted value is never logged"
                )));
            }
            let quantile = p.quantile.unwrap_or(DEFAULT_PROFILE_QUANTILE);
            if !(quantile > 0.0 && quantile <= 1.0) {
                problems.push(
                    at.child("quantile")
                        .invalid(format!("must be in (0, 1], like 0.99; got {quantile}")),
                );
            }
            let factor = p.factor.unwrap_or(DEFAULT_PROFILE_FACTOR);
            if !(factor.is_finite() && factor >= 1.0) {
                problems.push(at.child("factor").invalid(format!(
                    "must be at least 1 (the threshold is quantile × factor); got {factor}"
                )));
            }
            if p.timeout.is_some_and(|t| t.is_zero()) {
                problems.push(at.child("timeout").invalid("must be longer than 0s"));
            }
            ProfileSettings {
                args: p.args,
                action: p.action,
                warmup: p.warmup.unwrap_or(DEFAULT_PROFILE_WARMUP),
                quantile,
                factor,
                timeout: p.timeout.unwrap_or(DEFAULT_APPROVAL_TIMEOUT),
            }
        });
        problems.finish(at, || {
            Some(ToolSettings {
                name: name.to_owned(),
                endpoint: endpoint?,
                side_effects: self.side_effects,
                timeout: self.timeout.unwrap_or(DEFAULT_TOOL_TIMEOUT),
                retry: retry?,
                redact: self.redact,
                rules: self.rules,
                injection: self.injection,
                profile,
            })
        })
    }
}
