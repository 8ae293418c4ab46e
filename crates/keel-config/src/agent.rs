//! `[agents.NAME]`: who may call keel, with which keys, and the limits of their tasks.

use std::num::NonZeroU32;
use std::time::Duration;

use serde::Deserialize;

use crate::duration;
use crate::error::{Invalid, KeyPath, Problems};
use crate::route::{DEFAULT_MAX_ATTEMPTS, at_least_one};
use crate::secret::{self, Secret};

/// `[agents.NAME]` as written in keel.toml. Nothing here is trusted yet.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Environment variables that each hold one key of this agent.
    #[serde(default)]
    pub keys_env: Vec<String>,
    /// `budget = { ... }`.
    #[serde(default)]
    pub budget: BudgetConfig,
    /// `key_budget = { ... }`: the same limits again for each of the agent's keys alone.
    #[serde(default)]
    pub key_budget: Option<BudgetConfig>,
    /// Steps a task may take.
    #[serde(default)]
    pub max_steps: Option<u32>,
    /// Wall-clock limit of a task.
    #[serde(default, deserialize_with = "duration::optional")]
    pub task_timeout: Option<Duration>,
    /// Attempts of a task before it goes to the dead-letter queue.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// `loop_guard = true | false | { same_call, repeats, window, similarity }`: whether
    /// keel stops this agent's tasks that loop, and when (default on, default limits).
    #[serde(default)]
    pub loop_guard: LoopGuardConfig,
    /// Tokens one task may burn in a minute before the loop guard stops it (unset: no limit).
    #[serde(default)]
    pub task_tokens_per_minute: Option<u64>,
    /// Tools this agent's tasks need: a task is refused at creation while one of them
    /// is unavailable (its circuit breaker open).
    #[serde(default)]
    pub tools: Vec<String>,
    /// CEL expressions over `input` (the task's input) and `agent` that must all hold for
    /// a task to be created.
    #[serde(default)]
    pub preflight: Vec<String>,
    /// What to do with user content that looks like a prompt injection (default `flag`).
    #[serde(default)]
    pub screen_input: crate::InjectionAction,
}

/// `loop_guard` as written: on or off, or on with limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LoopGuardConfig {
    /// `true` (default limits) or `false` (off).
    Switch(bool),
    /// `{ ... }`: on, with these limits (each left out takes its default).
    Limits(LoopGuardTable),
}

impl Default for LoopGuardConfig {
    fn default() -> Self {
        Self::Switch(true)
    }
}

/// `loop_guard = { ... }` as written.
#[derive(Debug, Clone, Copy, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoopGuardTable {
    /// The same tool call (same args) this many times in a task is allowed; one more is a loop.
    pub same_call: Option<u64>,
    /// Near-identical answers among the last `window` that make a loop.
    pub repeats: Option<usize>,
    /// How many of a task's latest answers are compared.
    pub window: Option<usize>,
    /// Estimated Jaccard similarity (of word 3-shingles) at which two answers count as
    /// near-identical, in (0, 1].
    pub similarity: Option<f64>,
}

impl<'de> Deserialize<'de> for LoopGuardConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = LoopGuardConfig;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("true, false, or a table like { same_call = 5, repeats = 3, window = 6, similarity = 0.85 }")
            }
            fn visit_bool<E: serde::de::Error>(self, on: bool) -> Result<Self::Value, E> {
                Ok(LoopGuardConfig::Switch(on))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                LoopGuardTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(LoopGuardConfig::Limits)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// Default `loop_guard.same_call`.
pub const DEFAULT_LOOP_SAME_CALL: u64 = 5;
/// Default `loop_guard.repeats`.
pub const DEFAULT_LOOP_REPEATS: usize = 3;
/// Default `loop_guard.window`.
pub const DEFAULT_LOOP_WINDOW: usize = 6;
/// Default `loop_guard.similarity`.
pub const DEFAULT_LOOP_SIMILARITY: f64 = 0.85;

/// When the loop guard stops a task: validated `loop_guard` limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoopGuardSettings {
    /// Identical tool calls allowed in a task; the next one is a loop. At least 1.
    pub same_call: u64,
    /// Near-identical answers among the last `window` that make a loop; at least 2.
    pub repeats: usize,
    /// Latest answers compared; at least `repeats`.
    pub window: usize,
    /// Similarity at which answers are near-identical, in (0, 1].
    pub similarity: f64,
}

impl Default for LoopGuardSettings {
    fn default() -> Self {
        Self {
            same_call: DEFAULT_LOOP_SAME_CALL,
            repeats: DEFAULT_LOOP_REPEATS,
            window: DEFAULT_LOOP_WINDOW,
            similarity: DEFAULT_LOOP_SIMILARITY,
        }
    }
}

impl LoopGuardConfig {
    /// The limits, or `None` when the guard is off.
    fn validate(self, at: &KeyPath, problems: &mut Problems) -> Option<LoopGuardSettings> {
        let table = match self {
            Self::Switch(false) => return None,
            Self::Switch(true) => return Some(LoopGuardSettings::default()),
            Self::Limits(table) => table,
        };
        let d = LoopGuardSettings::default();
        let limits = LoopGuardSettings {
            same_call: table.same_call.unwrap_or(d.same_call),
            repeats: table.repeats.unwrap_or(d.repeats),
            window: table.window.unwrap_or(d.window),
            similarity: table.similarity.unwrap_or(d.similarity),
        };
        if limits.same_call == 0 {
            problems.push(at.child("same_call").invalid(
                "must be at least 1 (identical tool calls a task may make); use loop_guard = false to turn the guard off",
            ));
        }
        if limits.repeats < 2 {
            problems.push(
                at.child("repeats")
                    .invalid("must be at least 2: one answer alone does not repeat"),
            );
        }
        if limits.window < limits.repeats {
            problems.push(at.child("window").invalid(format!(
                "must be at least repeats ({}): the repeats are counted among the last window answers",
                limits.repeats
            )));
        }
        if !(limits.similarity > 0.0 && limits.similarity <= 1.0) {
            problems.push(at.child("similarity").invalid(format!(
                "must be in (0, 1], like 0.85; got {}",
                limits.similarity
            )));
        }
        Some(limits)
    }
}

fn default_max_attempts() -> u32 {
    DEFAULT_MAX_ATTEMPTS.get()
}

/// `budget = { ... }` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// Tokens (prompt + completion) per clock hour.
    #[serde(default)]
    pub tokens_per_hour: Option<u64>,
    /// Spend in US dollars per UTC day (priced by `[providers.*] prices`).
    #[serde(default)]
    pub usd_per_day: Option<f64>,
    /// Model requests per minute.
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// Share of a budget at which a warning alert is raised (default 0.8).
    #[serde(default)]
    pub warn_at: Option<f64>,
}

/// A validated agent.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentSettings {
    /// The table name, `NAME` in `[agents.NAME]`.
    pub name: String,
    /// Bearer keys that identify this agent; no two agents share a key.
    pub keys: Vec<Secret>,
    /// Spending limits; `None` fields are unlimited.
    pub budget: BudgetSettings,
    /// The environment variable each key came from, in the order of `keys`: the name a
    /// key goes by in messages and events (the key itself never appears).
    pub key_names: Vec<String>,
    /// Limits of each key on its own, on top of `budget`.
    pub key_budget: Option<BudgetSettings>,
    /// Steps a task may take (at least 1); `None` is unlimited.
    pub max_steps: Option<u32>,
    /// Wall-clock limit of a task (longer than 0); `None` is unlimited.
    pub task_timeout: Option<Duration>,
    /// Attempts of a task before it goes to the dead-letter queue (default 3).
    pub max_attempts: NonZeroU32,
    /// When keel stops this agent's tasks that loop (near-identical model answers, the
    /// same tool call over and over, token burn); `None`: never.
    pub loop_guard: Option<LoopGuardSettings>,
    /// Tokens one task may burn in any 60 s before the loop guard stops it; `None`: no limit.
    pub task_tokens_per_minute: Option<u64>,
    /// Tools this agent's tasks need (each a configured `[tools.NAME]`).
    pub tools: Vec<String>,
    /// CEL rules over `input` and `agent`, each compiled by the check.
    pub preflight: Vec<String>,
    /// What happens to user content (the newest user message of a chat call, a task's
    /// input) that looks like a prompt injection.
    pub screen_input: crate::InjectionAction,
}

/// Validated spending limits of an agent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetSettings {
    /// Tokens per hour, at least 1; `None` is unlimited.
    pub tokens_per_hour: Option<u64>,
    /// US dollars per day, finite and greater than 0; `None` is unlimited.
    pub usd_per_day: Option<f64>,
    /// Model requests per minute, at least 1; `None` is unlimited.
    pub requests_per_minute: Option<u32>,
    /// Share of a budget, in (0, 1], at which a warning alert is raised.
    pub warn_at: f64,
}

impl AgentConfig {
    /// Checks every rule and reads the keys from `env`.
    pub fn validate(
        self,
        name: &str,
        at: &KeyPath,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<AgentSettings, Vec<Invalid>> {
        let mut problems = Problems::default();
        let keys: Vec<Option<Secret>> = self
            .keys_env
            .iter()
            .enumerate()
            .map(|(i, var)| {
                problems.one(secret::from_env(var, &at.child("keys_env").index(i), env))
            })
            .collect();
        let budget = problems.take(self.budget.validate(&at.child("budget")));
        let key_budget = match self.key_budget {
            Some(_) if self.keys_env.is_empty() => {
                problems.push(at.child("key_budget").invalid(
                    "needs keys_env: a key budget limits each of the agent's keys, and it has none",
                ));
                None
            }
            Some(b) => problems.take(b.validate(&at.child("key_budget"))).map(Some),
            None => Some(None),
        };
        if self.max_steps == Some(0) {
            problems.push(
                at.child("max_steps")
                    .invalid("must be at least 1; leave it out for no limit"),
            );
        }
        if self.task_timeout.is_some_and(|t| t.is_zero()) {
            problems.push(
                at.child("task_timeout")
                    .invalid("must be longer than 0s; leave it out for no limit"),
            );
        }
        // The task API takes deadlines up to a year; a longer one is no limit anyway.
        if self
            .task_timeout
            .is_some_and(|t| t > Duration::from_secs(366 * 24 * 3600))
        {
            problems.push(
                at.child("task_timeout")
                    .invalid("must be at most 366d; leave it out for no limit"),
            );
        }
        let max_attempts = problems.one(at_least_one(self.max_attempts, &at.child("max_attempts")));
        let loop_guard = self
            .loop_guard
            .validate(&at.child("loop_guard"), &mut problems);
        if self.task_tokens_per_minute == Some(0) {
            problems.push(
                at.child("task_tokens_per_minute")
                    .invalid("must be at least 1; leave it out for no limit"),
            );
        }
        for (i, rule) in self.preflight.iter().enumerate() {
            if let Some(problem) = crate::tool::cel_problem(rule) {
                problems.push(at.child("preflight").index(i).invalid(problem));
            }
        }
        problems.finish(at, || {
            Some(AgentSettings {
                name: name.to_owned(),
                keys: keys.into_iter().collect::<Option<Vec<_>>>()?,
                budget: budget?,
                key_names: self.keys_env,
                key_budget: key_budget?,
                max_steps: self.max_steps,
                task_timeout: self.task_timeout,
                max_attempts: max_attempts?,
                loop_guard,
                task_tokens_per_minute: self.task_tokens_per_minute,
                tools: self.tools,
                preflight: self.preflight,
                screen_input: self.screen_input,
            })
        })
    }
}

impl Default for BudgetSettings {
    fn default() -> Self {
        Self {
            tokens_per_hour: None,
            usd_per_day: None,
            requests_per_minute: None,
            warn_at: DEFAULT_WARN_AT,
        }
    }
}

/// Share of a budget at which keel raises a warning alert when `warn_at` is not given.
pub const DEFAULT_WARN_AT: f64 = 0.8;

impl BudgetConfig {
    /// Checks that every limit given can be met by some spend.
    pub fn validate(self, at: &KeyPath) -> Result<BudgetSettings, Vec<Invalid>> {
        let mut problems = Problems::default();
        if self.tokens_per_hour == Some(0) {
            problems.push(
                at.child("tokens_per_hour")
                    .invalid("must be at least 1; leave it out for no limit"),
            );
        }
        if let Some(usd) = self.usd_per_day
            && !(usd.is_finite() && usd > 0.0)
        {
            problems.push(at.child("usd_per_day").invalid(format!(
                "{usd} is not a positive amount; leave it out for no limit"
            )));
        }
        if self.requests_per_minute == Some(0) {
            problems.push(
                at.child("requests_per_minute")
                    .invalid("must be at least 1; leave it out for no limit"),
            );
        }
        let warn_at = self.warn_at.unwrap_or(DEFAULT_WARN_AT);
        if !(warn_at > 0.0 && warn_at <= 1.0) {
            problems.push(
                at.child("warn_at")
                    .invalid(format!("{warn_at} is not a share in (0, 1]")),
            );
        }
        problems.finish(at, || {
            Some(BudgetSettings {
                tokens_per_hour: self.tokens_per_hour,
                usd_per_day: self.usd_per_day,
                requests_per_minute: self.requests_per_minute,
                warn_at,
            })
        })
    }
}
