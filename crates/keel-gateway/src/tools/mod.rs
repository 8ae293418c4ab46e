//! The tool gateway: agents call their tools through keel (`POST /v1/tools/{name}/invoke`),
//! or ask keel whether an action they run themselves is allowed (`POST /v1/actions/check`).
//!
//! Before a call, every CEL rule of the tool must hold (over `args`, `agent`, `task`
//! and `history.calls`, this tool's earlier calls in the task); a rule that is false,
//! or cannot be evaluated, blocks the call with the rule as the reason (fail closed).
//! The call itself goes only to the tool's configured URL: keel follows no redirect,
//! so a tool cannot bounce keel to another host. A tool with side effects is retried
//! only when the call carries an idempotency key; every tool has a timeout and a
//! circuit breaker. Each call is a `tool_invoked` event, each block an
//! `action_blocked` event and `keel_guardrail_blocks_total{tool,rule}`.
//!
//! After the rules, the histogram guard (the `profile` module) compares each profiled numeric arg
//! with what the agent usually sends; an outlier is blocked or waits for a person.
//!
//! A tool is an HTTP endpoint (`url`) or a Wasm module keel runs itself in a sandbox
//! (`wasm`, see [`wasm`]); the policies around the call are the same for both.

mod http;
mod profile;
pub mod wasm;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use keel_config::{ToolEndpoint, ToolSettings};
use keel_policy::breaker::{Breaker, BreakerSettings};
use parking_lot::Mutex;
use serde_json::Value;

pub(crate) use http::routes;
pub(crate) use profile::decided;
pub use profile::{ApprovalQueue, LoopHandoff, Outlier, TaskFacts};

/// The value that stands in the log for a redacted arg.
pub const REDACTED: &str = "[redacted]";

/// Every configured tool, ready to check and call.
pub struct Tools {
    tools: BTreeMap<String, Tool>,
    /// Calls running now, by (task, tool): counted in `history.calls` so that calls
    /// made at once cannot all pass a `history.calls < N` rule.
    running: Arc<Mutex<HashMap<(String, String), u64>>>,
    /// The Wasm engine and its epoch clock, while any Wasm tool may run.
    _wasm: Option<wasm::WasmRuntime>,
}

/// One running call in [`Tools::running`]; counted out when dropped.
pub(crate) struct Running {
    key: (String, String),
    running: Arc<Mutex<HashMap<(String, String), u64>>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut running = self.running.lock();
        if let Some(n) = running.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                running.remove(&self.key);
            }
        }
    }
}

/// One tool: its settings, compiled rules, how it runs and its breaker.
pub(crate) struct Tool {
    pub(crate) settings: ToolSettings,
    rules: Vec<Rule>,
    pub(crate) runner: Runner,
    pub(crate) breaker: Mutex<Breaker>,
}

/// How a tool runs.
pub(crate) enum Runner {
    /// POSTed over HTTP to its URL, following no redirect.
    Http {
        url: reqwest::Url,
        client: reqwest::Client,
    },
    /// A WASI command module run in keel's sandbox.
    Wasm(Arc<wasm::WasmTool>),
}

/// A compiled CEL rule and its text.
struct Rule {
    text: String,
    program: cel::Program,
    /// Whether it reads `history` (then the task's log is counted first).
    needs_history: bool,
}

/// What a rule sees of one action.
#[derive(Debug, Clone, Copy)]
pub struct Action<'a> {
    /// The agent acting.
    pub agent: &'a str,
    /// Its task, if any.
    pub task: Option<&'a str>,
    /// The call's arguments (a JSON object).
    pub args: &'a Value,
    /// This tool's calls already in the task's log.
    pub calls_in_task: u64,
}

/// The rules' verdict on an action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every rule holds.
    Allow,
    /// These rules do not hold (each with why).
    Block(Vec<Broken>),
}

/// A rule that blocked an action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    /// The rule as configured.
    pub rule: String,
    /// Why it blocks: false, or the evaluation error.
    pub reason: String,
}

/// Why the tools could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ToolBuildError {
    /// A Wasm module that cannot be loaded (missing, invalid, not a WASI command).
    #[error("tools.{name}.wasm: {detail}")]
    Wasm {
        /// The tool.
        name: String,
        /// What is wrong.
        detail: String,
    },
    /// A bad URL or rule (config check catches these first).
    #[error("tools.{name}: {detail}")]
    Invalid {
        /// The tool.
        name: String,
        /// What is wrong.
        detail: String,
    },
}

// === impl Tools ===

impl Tools {
    /// Compiles every tool's rules and builds its client; `breaker` is `[breaker]`.
    pub fn build(
        tools: &BTreeMap<String, ToolSettings>,
        breaker: BreakerSettings,
    ) -> Result<Self, ToolBuildError> {
        let mut built = BTreeMap::new();
        // One engine for every Wasm tool, started only when there is one.
        let mut runtime: Option<wasm::WasmRuntime> = None;
        for (name, settings) in tools {
            let invalid = |detail: String| ToolBuildError::Invalid {
                name: name.clone(),
                detail,
            };
            let runner = match &settings.endpoint {
                ToolEndpoint::Http { url } => Runner::Http {
                    url: reqwest::Url::parse(url).map_err(|e| invalid(format!("url: {e}")))?,
                    client: reqwest::Client::builder()
                        // No server-side request forgery through a tool: keel calls the
                        // configured URL and nothing it redirects to.
                        .redirect(reqwest::redirect::Policy::none())
                        .retry(reqwest::retry::never())
                        .build()
                        .map_err(|e| invalid(format!("cannot build the HTTP client: {e}")))?,
                },
                ToolEndpoint::Wasm { path } => {
                    let wasm_error = |detail: String| ToolBuildError::Wasm {
                        name: name.clone(),
                        detail,
                    };
                    let runtime = match &mut runtime {
                        Some(runtime) => runtime,
                        None => runtime.insert(wasm::WasmRuntime::new().map_err(wasm_error)?),
                    };
                    Runner::Wasm(Arc::new(runtime.load(name, path).map_err(wasm_error)?))
                }
            };
            let mut rules = Vec::with_capacity(settings.rules.len());
            for text in &settings.rules {
                let program = cel::Program::compile(text)
                    .map_err(|e| invalid(format!("rule {text:?}: {e}")))?;
                let needs_history = program.references().has_variable("history");
                rules.push(Rule {
                    text: text.clone(),
                    program,
                    needs_history,
                });
            }
            built.insert(
                name.clone(),
                Tool {
                    settings: settings.clone(),
                    rules,
                    runner,
                    breaker: Mutex::new(Breaker::new(breaker)),
                },
            );
        }
        Ok(Self {
            tools: built,
            running: Arc::default(),
            _wasm: runtime,
        })
    }

    /// Loads every Wasm tool as [`Tools::build`] would, for `keel config check`: the
    /// tools whose module cannot run, each with why.
    pub fn wasm_problems(tools: &BTreeMap<String, ToolSettings>) -> Vec<(String, String)> {
        let modules: Vec<_> = tools
            .iter()
            .filter_map(|(name, t)| match &t.endpoint {
                ToolEndpoint::Wasm { path } => Some((name, path)),
                ToolEndpoint::Http { .. } => None,
            })
            .collect();
        if modules.is_empty() {
            return Vec::new();
        }
        let runtime = match wasm::WasmRuntime::new() {
            Ok(runtime) => runtime,
            Err(e) => return vec![(String::new(), e)],
        };
        modules
            .into_iter()
            .filter_map(|(name, path)| runtime.load(name, path).err().map(|e| (name.clone(), e)))
            .collect()
    }

    /// Counts a call of `tool` in `task` as running until the guard is dropped.
    pub(crate) fn start(&self, task: &str, tool: &str) -> Running {
        let key = (task.to_owned(), tool.to_owned());
        *self.running.lock().entry(key.clone()).or_default() += 1;
        Running {
            key,
            running: Arc::clone(&self.running),
        }
    }

    /// Calls of `tool` in `task` running now.
    pub(crate) fn running(&self, task: &str, tool: &str) -> u64 {
        self.running
            .lock()
            .get(&(task.to_owned(), tool.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// The tool called `name`.
    pub(crate) fn get(&self, name: &str) -> Option<&Tool> {
        self.tools.get(name)
    }

    /// Tool names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tools.keys().map(String::as_str)
    }
}

// === impl Tool ===

impl Tool {
    /// Whether any rule reads `history`.
    pub(crate) fn needs_history(&self) -> bool {
        self.rules.iter().any(|r| r.needs_history)
    }

    /// Runs every rule on `action`; a rule that errors blocks (fail closed).
    pub fn check(&self, action: &Action<'_>) -> Verdict {
        let mut context = cel::Context::default();
        let history = serde_json::json!({ "calls": action.calls_in_task });
        let vars: [(&str, Value); 4] = [
            ("args", action.args.clone()),
            ("agent", Value::from(action.agent)),
            ("task", action.task.map_or(Value::Null, Value::from)),
            ("history", history),
        ];
        for (name, value) in vars {
            if let Err(e) = context.add_variable(name, value) {
                return Verdict::Block(vec![Broken {
                    rule: String::new(),
                    reason: format!("cannot give the rules `{name}`: {e}"),
                }]);
            }
        }
        // A tool that redacts args must not have them echoed by an error message.
        let quiet = !self.settings.redact.is_empty();
        let broken: Vec<Broken> = self
            .rules
            .iter()
            .filter_map(|rule| {
                let reason = match holds(&rule.program, &context)? {
                    Unmet::Error(_) if quiet => format!(
                        "rule `{}` could not be evaluated (details withheld: the tool redacts args)",
                        rule.text
                    ),
                    unmet => unmet.reason("rule", &rule.text),
                };
                Some(Broken {
                    rule: rule.text.clone(),
                    reason,
                })
            })
            .collect();
        if broken.is_empty() {
            Verdict::Allow
        } else {
            Verdict::Block(broken)
        }
    }

    /// `value` with every member named in `redact`, at any depth, replaced by
    /// [`REDACTED`] (a tool that echoes its args must not leak them either).
    pub(crate) fn redact(&self, value: &Value) -> Value {
        let mut value = value.clone();
        if !self.settings.redact.is_empty() {
            redact_in(&mut value, &self.settings.redact);
        }
        value
    }

    /// Attempts a call may have: retries only without side effects, or with a key.
    pub(crate) fn attempts(&self, idempotency_key: bool) -> u32 {
        if self.settings.side_effects && !idempotency_key {
            1
        } else {
            self.settings.retry.max_attempts.get()
        }
    }

    /// The backoff of one call's retries (one per call: decorrelated jitter grows).
    pub(crate) fn backoff(&self) -> keel_policy::backoff::Backoff {
        let r = &self.settings.retry;
        keel_policy::backoff::Backoff::new(r.base, r.cap, r.jitter)
    }
}

/// Why a CEL rule does not let an action (or a task) through.
pub(crate) enum Unmet {
    /// It is false.
    False,
    /// It gave something else than true or false.
    NotBool,
    /// It could not be evaluated (a missing field, a type error).
    Error(String),
}

impl Unmet {
    /// The reason in words, for a `what` (`rule`, `preflight rule`) written `text`.
    pub(crate) fn reason(&self, what: &str, text: &str) -> String {
        match self {
            Self::False => format!("{what} `{text}` does not hold"),
            Self::NotBool => format!("{what} `{text}` gave no true or false"),
            Self::Error(e) => format!("{what} `{text}` could not be evaluated: {e}"),
        }
    }
}

/// Runs `program` in `context`: `None` when it is true, else why not (guards fail closed).
pub(crate) fn holds(program: &cel::Program, context: &cel::Context) -> Option<Unmet> {
    match program.execute(context) {
        Ok(cel::Value::Bool(true)) => None,
        Ok(cel::Value::Bool(false)) => Some(Unmet::False),
        Ok(_) => Some(Unmet::NotBool),
        Err(e) => Some(Unmet::Error(e.to_string())),
    }
}

/// The worst prompt-injection finding among the strings of `value`, if any reaches
/// the threshold.
pub(crate) fn injection_in(value: &Value) -> Option<crate::guard::injection::Finding> {
    let mut worst: Option<crate::guard::injection::Finding> = None;
    visit_strings(value, &mut |text| {
        let found = crate::guard::injection::scan(text);
        if found.is_injection() && worst.as_ref().is_none_or(|w| found.score > w.score) {
            worst = Some(found);
        }
    });
    worst
}

/// `value` with the suspicious spans of every string replaced.
pub(crate) fn strip_injection(value: &Value) -> Value {
    match value {
        Value::String(text) => Value::String(crate::guard::injection::strip(text)),
        Value::Array(items) => Value::Array(items.iter().map(strip_injection).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), strip_injection(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

fn visit_strings(value: &Value, f: &mut impl FnMut(&str)) {
    match value {
        Value::String(text) => f(text),
        Value::Array(items) => items.iter().for_each(|v| visit_strings(v, f)),
        Value::Object(map) => map.values().for_each(|v| visit_strings(v, f)),
        _ => {}
    }
}

fn redact_in(value: &mut Value, keys: &[String]) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if keys.iter().any(|k| k == key) {
                    *v = Value::from(REDACTED);
                } else {
                    redact_in(v, keys);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| redact_in(v, keys)),
        _ => {}
    }
}

#[cfg(test)]
mod tests;
