//! Agent identity (keys) and per-agent token budgets.
//!
//! Budgets count in fixed windows of wall-clock time (the `now` given is time since the
//! Unix epoch): tokens per clock hour, dollars per UTC day, requests per clock minute.
//!
//! One budget is shared by every keel node on one store. Each node checks and counts
//! requests against its own copy of the windows (no store round trip on the request path)
//! and, every second, [`Agents::merge`]s it with the copy in the store: it learns what the
//! other nodes spent, and, when it spent too, writes its own spend in the current window
//! under its node id. So a node's view of the others' spend is at most one sync old (also
//! for an agent whose calls it has not served lately), and the fleet can overrun
//! a budget by at most what the other nodes admit in that second. [`Agents::restore`]
//! brings the current windows back after a restart.
//!
//! When any `[agents.*]` sets `keys_env`, every gateway request must carry one
//! of those keys as `Authorization: Bearer`; the key names the agent. With no
//! keys configured the gateway is open and `x-keel-agent` names the agent.

use std::collections::HashMap;
use std::time::Duration;

use keel_config::{AgentSettings, Price, ProviderSettings};
use parking_lot::Mutex;

use crate::error::ApiError;
use crate::usage::Usage;

/// Time since the Unix epoch: the `now` of budgets (their windows follow the clock).
pub fn wall_now() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// Agent used when nothing names one.
pub const ANONYMOUS: &str = "anonymous";

/// Keys, budgets and model prices.
pub struct Agents {
    /// Key → (agent, the key's name: its environment variable).
    by_key: HashMap<String, (String, String)>,
    /// By budget id: the agent's name, or `AGENT/key/NAME` for one key's own budget.
    budgets: HashMap<String, Mutex<Budget>>,
    /// Each configured agent's loop-guard limits (`None`: its guard is off).
    loop_limits: HashMap<String, Option<keel_config::LoopGuardSettings>>,
    /// Tokens one task of the agent may burn per minute.
    burn_limits: HashMap<String, u64>,
    /// Agents whose user content is screened otherwise than `flag`.
    screening: HashMap<String, keel_config::InjectionAction>,
    /// `provider/model` → price, for `usd_per_day`.
    prices: HashMap<String, Price>,
}

/// One agent's budgets, each a fixed window.
struct Budget {
    windows: Vec<Window>,
    warn_at: f64,
    /// Used since the last [`Agents::to_sync`].
    dirty: bool,
}

/// One window as saved: which budget, when the window started (ms since the Unix
/// epoch), what was used in it, and whether its warning went out.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SavedWindow {
    /// `tokens`, `usd` or `requests`.
    pub unit: String,
    /// Window start, ms since the Unix epoch.
    pub started_ms: u64,
    /// Used in the window, by every node together.
    pub used: f64,
    /// Whether the warning of this window was raised.
    pub warned: bool,
    /// What each node used in the window, by node id (empty when saved by a keel that
    /// did not record nodes: then `used` is all there is).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub nodes: std::collections::BTreeMap<String, f64>,
}

/// What a budget counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Prompt + completion tokens per hour.
    Tokens,
    /// US dollars per day.
    Usd,
    /// Model requests per minute.
    Requests,
}

impl Unit {
    /// The name in events, metrics and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tokens => "tokens",
            Self::Usd => "usd",
            Self::Requests => "requests",
        }
    }

    fn per(self) -> &'static str {
        match self {
            Self::Tokens => "tokens per hour",
            Self::Usd => "US dollars per day",
            Self::Requests => "requests per minute",
        }
    }
}

/// Spend in the current window of one budget.
struct Window {
    unit: Unit,
    limit: f64,
    length: Duration,
    started: Duration,
    /// Used in the window: `mine` plus `others`.
    used: f64,
    /// Used by this node in the window.
    mine: f64,
    /// Used by the other nodes in the window, as of the last merge.
    others: f64,
    warned: bool,
}

/// A budget check that failed: what to tell the client.
#[derive(Debug, Clone)]
pub struct OverBudget {
    /// The key whose own budget is spent (`None`: the agent's budget).
    pub key: Option<String>,
    /// Which budget.
    pub unit: Unit,
    /// The limit.
    pub limit: f64,
    /// Used in the window.
    pub used: f64,
    /// Seconds until the window resets.
    pub retry_after: u64,
}

impl OverBudget {
    /// The message a client gets.
    pub fn message(&self, agent: &str) -> String {
        format!(
            "{} has used {} of its {} {}; retry after {}s",
            whose(agent, self.key.as_deref()),
            amount(self.unit, self.used),
            amount(self.unit, self.limit),
            self.unit.per(),
            self.retry_after
        )
    }
}

/// A budget that just crossed its warning share.
#[derive(Debug, Clone)]
pub struct Warning {
    /// The key whose own budget it is (`None`: the agent's budget).
    pub key: Option<String>,
    /// Which budget.
    pub unit: Unit,
    /// Used in the window.
    pub used: f64,
    /// The limit.
    pub limit: f64,
}

/// Whose budget it is, in words: `agent "a"` or `key KEY_ONE of agent "a"` (a key goes by
/// its variable's name, never by itself).
pub fn whose(agent: &str, key: Option<&str>) -> String {
    match key {
        Some(key) => format!("key {key} of agent {agent:?}"),
        None => format!("agent {agent:?}"),
    }
}

/// What is left of each budget after a spend, for the `keel_budget_remaining` gauge.
pub type Remaining = Vec<(Unit, f64)>;

fn amount(unit: Unit, value: f64) -> String {
    match unit {
        Unit::Usd => format!("${value:.2}"),
        Unit::Tokens | Unit::Requests => format!("{value:.0}"),
    }
}

impl Agents {
    /// From validated settings; `providers` give the prices.
    pub fn new<'a>(
        agents: impl IntoIterator<Item = &'a AgentSettings>,
        providers: impl IntoIterator<Item = &'a ProviderSettings>,
    ) -> Self {
        let mut by_key = HashMap::new();
        let mut budgets = HashMap::new();
        let mut loop_limits = HashMap::new();
        let mut burn_limits = HashMap::new();
        let mut screening = HashMap::new();
        for agent in agents {
            loop_limits.insert(agent.name.clone(), agent.loop_guard);
            if let Some(limit) = agent.task_tokens_per_minute {
                burn_limits.insert(agent.name.clone(), limit);
            }
            if agent.screen_input != keel_config::InjectionAction::Flag {
                screening.insert(agent.name.clone(), agent.screen_input);
            }
            for (key, name) in agent.keys.iter().zip(&agent.key_names) {
                by_key.insert(key.expose().to_owned(), (agent.name.clone(), name.clone()));
                if let Some(b) = &agent.key_budget
                    && let Some(budget) = Budget::of(b)
                {
                    budgets.insert(key_budget_id(&agent.name, name), Mutex::new(budget));
                }
            }
            if let Some(budget) = Budget::of(&agent.budget) {
                budgets.insert(agent.name.clone(), Mutex::new(budget));
            }
        }
        let prices = providers
            .into_iter()
            .flat_map(|p| {
                p.prices
                    .iter()
                    .map(move |(model, price)| (format!("{}/{model}", p.name), *price))
            })
            .collect();
        Self {
            by_key,
            budgets,
            loop_limits,
            burn_limits,
            screening,
            prices,
        }
    }
}

/// The budget id of one key's own budget.
fn key_budget_id(agent: &str, key: &str) -> String {
    format!("{agent}/key/{key}")
}

/// The key's name when `id` is a key's budget ([`key_budget_id`]), `None` for an agent's.
fn key_of_budget(id: &str) -> Option<&str> {
    id.rsplit_once("/key/").map(|(_, name)| name)
}

impl Budget {
    /// The windows `b` configures; `None` when it limits nothing.
    fn of(b: &keel_config::BudgetSettings) -> Option<Self> {
        let windows: Vec<Window> = [
            (Unit::Tokens, b.tokens_per_hour.map(|v| v as f64), 3600),
            (Unit::Usd, b.usd_per_day, 86_400),
            (Unit::Requests, b.requests_per_minute.map(f64::from), 60),
        ]
        .into_iter()
        .filter_map(|(unit, limit, secs)| {
            Some(Window {
                unit,
                limit: limit?,
                length: Duration::from_secs(secs),
                started: Duration::ZERO,
                used: 0.0,
                mine: 0.0,
                others: 0.0,
                warned: false,
            })
        })
        .collect();
        (!windows.is_empty()).then_some(Self {
            windows,
            warn_at: b.warn_at,
            dirty: false,
        })
    }
}

impl Agents {
    /// When keel stops `agent`'s looping tasks (`[agents.NAME] loop_guard`; an agent
    /// without a table gets the default limits); `None` when its guard is off.
    pub fn loop_guard(&self, agent: &str) -> Option<keel_config::LoopGuardSettings> {
        self.loop_limits
            .get(agent)
            .copied()
            .unwrap_or_else(|| Some(keel_config::LoopGuardSettings::default()))
    }

    /// Tokens one task of `agent` may burn per minute (`None`: no limit, or the guard is off).
    pub fn burn_limit(&self, agent: &str) -> Option<u64> {
        self.burn_limits
            .get(agent)
            .copied()
            .filter(|_| self.loop_guard(agent).is_some())
    }

    /// What happens to `agent`'s user content that looks like a prompt injection.
    pub fn screen_input(&self, agent: &str) -> keel_config::InjectionAction {
        self.screening
            .get(agent)
            .copied()
            .unwrap_or(keel_config::InjectionAction::Flag)
    }

    /// What is left of each agent's own budget (not its keys') at `now`, windows rolled
    /// over first: for the `keel_budget_remaining` gauge between calls (a window that turned
    /// over is full again, and another node's spend shows once merged).
    pub fn remaining(&self, now: Duration) -> Vec<(String, Remaining)> {
        self.budgets
            .iter()
            .filter(|(id, _)| key_of_budget(id).is_none())
            .map(|(agent, budget)| {
                let mut b = budget.lock();
                for w in &mut b.windows {
                    w.roll(now);
                }
                (agent.clone(), b.left())
            })
            .collect()
    }

    /// Agents that have budgets.
    pub fn budgeted(&self) -> impl Iterator<Item = &str> {
        self.budgets.keys().map(String::as_str)
    }

    /// The agents whose budgets were used since the last call (and marks them synced).
    pub fn to_sync(&self) -> Vec<String> {
        let mut used = Vec::new();
        for (agent, budget) in &self.budgets {
            let mut b = budget.lock();
            if std::mem::take(&mut b.dirty) {
                used.push(agent.clone());
            }
        }
        used
    }

    /// Marks `agent`'s budgets for the next [`Agents::to_sync`] again (a sync that failed).
    pub fn resync(&self, agent: &str) {
        if let Some(budget) = self.budgets.get(agent) {
            budget.lock().dirty = true;
        }
    }

    /// Merges this node's (`node`) spend of `agent`'s current windows at `now` with
    /// `stored`, the windows as the store holds them (every node's spend): afterwards this
    /// node counts the others' spend too. Returns the windows to store back.
    pub fn merge(
        &self,
        agent: &str,
        node: &str,
        stored: &[SavedWindow],
        now: Duration,
    ) -> Vec<SavedWindow> {
        let Some(budget) = self.budgets.get(agent) else {
            return Vec::new();
        };
        let mut b = budget.lock();
        let mut merged = Vec::with_capacity(b.windows.len());
        for w in &mut b.windows {
            w.roll(now);
            let started_ms = u64::try_from(w.started.as_millis()).unwrap_or(u64::MAX);
            let mut nodes = std::collections::BTreeMap::new();
            if let Some(s) = stored
                .iter()
                .find(|s| s.unit == w.unit.as_str() && s.started_ms == started_ms)
            {
                nodes.clone_from(&s.nodes);
                if nodes.is_empty() && s.used > 0.0 {
                    // Saved without nodes: all of it is someone else's.
                    nodes.insert(String::new(), s.used);
                }
                w.warned |= s.warned;
            }
            nodes.insert(node.to_owned(), w.mine);
            let total: f64 = nodes.values().sum();
            w.others = total - w.mine;
            w.used = total;
            merged.push(SavedWindow {
                unit: w.unit.as_str().to_owned(),
                started_ms,
                used: total,
                warned: w.warned,
                nodes,
            });
        }
        merged
    }

    /// Puts back the saved windows of `agent` that are still current at `now`; a window
    /// that has ended, or a budget no longer configured, is left as it is.
    pub fn restore(&self, agent: &str, saved: &[SavedWindow], now: Duration) {
        let Some(budget) = self.budgets.get(agent) else {
            return;
        };
        let mut b = budget.lock();
        for s in saved {
            let started = Duration::from_millis(s.started_ms);
            if let Some(w) = b
                .windows
                .iter_mut()
                .find(|w| w.unit.as_str() == s.unit && started <= now && now < started + w.length)
            {
                w.started = started;
                // What was spent before the restart counts as the others' spend.
                w.others = s.used;
                w.mine = 0.0;
                w.used = s.used;
                w.warned = s.warned;
            }
        }
    }

    /// Whether requests must carry an agent key.
    pub fn auth_required(&self) -> bool {
        !self.by_key.is_empty()
    }

    /// The agent a request belongs to, from its `Authorization` and `x-keel-agent` headers.
    pub fn identify(
        &self,
        authorization: Option<&str>,
        agent_header: Option<&str>,
    ) -> Result<String, ApiError> {
        self.identify_with_key(authorization, agent_header)
            .map(|(agent, _)| agent)
    }

    /// [`Agents::identify`], with the name (environment variable) of the key the request
    /// came with, when keys are configured: one lookup for both.
    pub fn identify_with_key(
        &self,
        authorization: Option<&str>,
        agent_header: Option<&str>,
    ) -> Result<(String, Option<String>), ApiError> {
        if !self.auth_required() {
            let agent = agent_header.filter(|a| !a.is_empty()).unwrap_or(ANONYMOUS);
            return Ok((agent.to_owned(), None));
        }
        let Some(value) = authorization else {
            return Err(ApiError::unauthorized(
                "missing agent key: send it as 'Authorization: Bearer <key>' (the OpenAI SDK's api_key)",
            ));
        };
        // `Bearer <key>` (any case), or the bare key as keel has always taken it.
        let bare = value.trim();
        let Some(key) = keel_core::bearer_token(value).or((!bare.contains(' ')).then_some(bare))
        else {
            return Err(ApiError::unauthorized(
                "the Authorization header is not 'Bearer <key>': send the agent key that way (the OpenAI SDK's api_key)",
            ));
        };
        match self.by_key.get(key) {
            Some((agent, name)) => Ok((agent.clone(), Some(name.clone()))),
            None => Err(ApiError::unauthorized("incorrect agent key provided")),
        }
    }

    /// The budgets a call of `agent` with `key` counts against: the agent's, and the key's own.
    fn budgets_of<'a>(
        &'a self,
        agent: &str,
        key: Option<&str>,
    ) -> impl Iterator<Item = (Option<&'a str>, &'a Mutex<Budget>)> + 'a {
        let agent_budget = self.budgets.get(agent).map(|b| (None, b));
        let key_budget = key.and_then(|k| {
            self.budgets
                .get_key_value(&key_budget_id(agent, k))
                .map(|(id, b)| (key_of_budget(id), b))
        });
        agent_budget.into_iter().chain(key_budget)
    }

    /// Admits one model request of `agent` (with `key`) at `now`: `Err` when its budget or
    /// the key's own budget is spent; otherwise the request is counted, with any warning it
    /// set off.
    pub fn check(
        &self,
        agent: &str,
        key: Option<&str>,
        now: Duration,
    ) -> Result<Vec<Warning>, OverBudget> {
        // Both budgets held (the agent's, then the key's: always in that order) from the
        // check to the count, so concurrent requests cannot all pass the last request left.
        let mut budgets: Vec<_> = self
            .budgets_of(agent, key)
            .map(|(key, budget)| (key, budget.lock()))
            .collect();
        for (key, b) in &mut budgets {
            for w in &mut b.windows {
                w.roll(now);
                if w.used >= w.limit {
                    let left = (w.started + w.length).saturating_sub(now);
                    return Err(OverBudget {
                        key: key.map(str::to_owned),
                        unit: w.unit,
                        limit: w.limit,
                        used: w.used,
                        // Rounded up: a client that waits this long finds the window new.
                        retry_after: u64::try_from(left.as_millis().div_ceil(1000))
                            .unwrap_or(u64::MAX)
                            .max(1),
                    });
                }
            }
        }
        let mut warnings = Vec::new();
        for (key, b) in &mut budgets {
            warnings.extend(b.add(Unit::Requests, 1.0, *key));
        }
        Ok(warnings)
    }

    /// Records what a call of `agent` (with `key`) to `target` spent; returns what is left
    /// of each of the agent's budgets and any warning the spend set off (the key's own too).
    pub fn spend(
        &self,
        agent: &str,
        key: Option<&str>,
        target: &str,
        usage: Usage,
        now: Duration,
    ) -> (Remaining, Vec<Warning>) {
        let total = usage.total();
        let usd = self.prices.get(target).map_or(0.0, |p| {
            (usage.prompt_tokens as f64 * p.input + usage.completion_tokens as f64 * p.output)
                / 1_000_000.0
        });
        let mut remaining = Vec::new();
        let mut warnings = Vec::new();
        for (key, budget) in self.budgets_of(agent, key) {
            let mut b = budget.lock();
            for w in &mut b.windows {
                w.roll(now);
            }
            warnings.extend(b.add(Unit::Tokens, total as f64, key));
            warnings.extend(b.add(Unit::Usd, usd, key));
            if key.is_none() {
                remaining = b.left();
            }
        }
        (remaining, warnings)
    }
}

impl Budget {
    /// What is left in each window (never below zero).
    fn left(&self) -> Remaining {
        self.windows
            .iter()
            .map(|w| (w.unit, (w.limit - w.used).max(0.0)))
            .collect()
    }

    /// Adds `amount` to the `unit` window; a warning when it crosses `warn_at` first.
    fn add(&mut self, unit: Unit, amount: f64, key: Option<&str>) -> Vec<Warning> {
        let warn_at = self.warn_at;
        self.dirty = true;
        let mut warnings = Vec::new();
        for w in self.windows.iter_mut().filter(|w| w.unit == unit) {
            w.used += amount;
            w.mine += amount;
            if !w.warned && w.used >= w.limit * warn_at {
                w.warned = true;
                warnings.push(Warning {
                    key: key.map(str::to_owned),
                    unit,
                    used: w.used,
                    limit: w.limit,
                });
            }
        }
        warnings
    }
}

impl Window {
    fn roll(&mut self, now: Duration) {
        if now >= self.started + self.length {
            let windows = (now - self.started).as_secs() / self.length.as_secs().max(1);
            self.started += self.length * u32::try_from(windows).unwrap_or(u32::MAX);
            self.used = 0.0;
            self.mine = 0.0;
            self.others = 0.0;
            self.warned = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use keel_config::{BudgetSettings, ProviderKind};

    use super::*;

    fn agents(budget: BudgetSettings) -> Agents {
        let agent = AgentSettings {
            name: "a".into(),
            keys: Vec::new(),
            budget,
            max_steps: None,
            task_timeout: None,
            max_attempts: std::num::NonZeroU32::MIN,
            key_names: Vec::new(),
            key_budget: None,
            loop_guard: Some(keel_config::LoopGuardSettings::default()),
            task_tokens_per_minute: None,
            tools: Vec::new(),
            preflight: Vec::new(),
            screen_input: keel_config::InjectionAction::Flag,
        };
        let provider = ProviderSettings {
            name: "p".into(),
            kind: ProviderKind::OpenAi,
            base_url: "http://x".into(),
            api_key: None,
            api_key_header: None,
            headers: Vec::new(),
            query: Vec::new(),
            prices: BTreeMap::from([(
                "m".to_owned(),
                Price {
                    input: 2.0,
                    output: 8.0,
                },
            )]),
        };
        Agents::new([&agent], [&provider])
    }

    fn usage(prompt: u64, completion: u64) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }

    fn tokens(limit: u64) -> BudgetSettings {
        BudgetSettings {
            tokens_per_hour: Some(limit),
            usd_per_day: None,
            requests_per_minute: None,
            warn_at: 1.0,
        }
    }

    #[test]
    fn each_key_has_its_own_budget_on_top_of_the_agent_s() {
        let agent = AgentSettings {
            name: "a".into(),
            keys: vec![
                keel_config::Secret::new("k1".into()),
                keel_config::Secret::new("k2".into()),
            ],
            key_names: vec!["KEY_ONE".into(), "KEY_TWO".into()],
            budget: tokens(1000),
            key_budget: Some(tokens(100)),
            max_steps: None,
            task_timeout: None,
            max_attempts: std::num::NonZeroU32::MIN,
            loop_guard: Some(keel_config::LoopGuardSettings::default()),
            task_tokens_per_minute: None,
            tools: Vec::new(),
            preflight: Vec::new(),
            screen_input: keel_config::InjectionAction::Flag,
        };
        let a = Agents::new([&agent], []);
        let (_, key) = a.identify_with_key(Some("Bearer k2"), None).unwrap();
        assert_eq!(key.as_deref(), Some("KEY_TWO"));
        assert!(a.identify_with_key(Some("Bearer nope"), None).is_err());
        // The scheme in any case, or the bare key; another scheme is refused.
        for header in ["bearer k2", "BEARER k2", "k2"] {
            let (_, key) = a.identify_with_key(Some(header), None).unwrap();
            assert_eq!(key.as_deref(), Some("KEY_TWO"), "{header}");
        }
        assert!(a.identify_with_key(Some("Basic k2"), None).is_err());
        let now = Duration::from_secs(7200);
        a.check("a", Some("KEY_ONE"), now).unwrap();
        let (remaining, _) = a.spend("a", Some("KEY_ONE"), "p/m", usage(60, 40), now);
        assert_eq!(
            remaining,
            vec![(Unit::Tokens, 900.0)],
            "the agent's budget is reported"
        );
        let over = a.check("a", Some("KEY_ONE"), now).unwrap_err();
        assert_eq!(over.key.as_deref(), Some("KEY_ONE"));
        assert!(
            over.message("a")
                .starts_with("key KEY_ONE of agent \"a\" has used 100 of its 100 tokens per hour"),
            "{}",
            over.message("a")
        );
        // The other key, and the agent as a whole, still have room.
        assert!(a.check("a", Some("KEY_TWO"), now).is_ok());
        assert!(a.check("a", None, now).is_ok());
    }

    #[test]
    fn nodes_share_one_budget_through_their_merges() {
        let hour = Duration::from_secs(3600);
        let now = Duration::from_secs(1_700_000_000 / 3600 * 3600 + 60);
        let (one, two) = (agents(tokens(1000)), agents(tokens(1000)));
        one.check("a", None, now).unwrap();
        one.spend("a", None, "p/m", usage(400, 200), now);
        let stored = one.merge("a", "n1", &[], now);
        assert_eq!(stored[0].used, 600.0);

        two.check("a", None, now).unwrap();
        two.spend("a", None, "p/m", usage(200, 100), now);
        let stored = two.merge("a", "n2", &stored, now);
        assert_eq!(stored[0].used, 900.0, "both nodes' spend");
        assert_eq!(stored[0].nodes.get("n1"), Some(&600.0));
        assert_eq!(stored[0].nodes.get("n2"), Some(&300.0));
        // Node two counts node one's spend now: 100 tokens left for the whole fleet.
        two.spend("a", None, "p/m", usage(100, 0), now);
        let over = two.check("a", None, now).unwrap_err();
        assert_eq!(over.used, 1000.0);
        // Node one learns it at its next merge; its own entry is not counted twice.
        let stored = one.merge("a", "n1", &stored, now);
        assert_eq!(stored[0].used, 900.0);
        assert!(one.check("a", None, now).is_ok());
        one.spend("a", None, "p/m", usage(100, 0), now);
        assert!(one.check("a", None, now).is_err());
        // Spend of an hour that has ended does not count in the next one.
        let next = one.merge("a", "n1", &stored, now + hour);
        assert_eq!(next[0].used, 0.0);
        assert!(one.check("a", None, now + hour).is_ok());
        // A window saved without nodes (an older keel) counts whole, as others' spend.
        let three = agents(tokens(1000));
        let legacy = [SavedWindow {
            unit: "tokens".into(),
            started_ms: stored[0].started_ms,
            used: 950.0,
            warned: true,
            nodes: std::collections::BTreeMap::new(),
        }];
        let merged = three.merge("a", "n3", &legacy, now);
        assert_eq!(merged[0].used, 950.0);
        assert!(merged[0].warned);
        three.spend("a", None, "p/m", usage(50, 0), now);
        assert!(three.check("a", None, now).is_err());
    }

    #[test]
    fn windows_are_restored_while_current_and_only_then() {
        let hour = Duration::from_secs(3600);
        let a = agents(tokens(1000));
        // 20 minutes into a clock hour.
        let now = Duration::from_secs(1_700_000_000 / 3600 * 3600 + 1200);
        a.check("a", None, now).unwrap();
        a.spend("a", None, "p/m", usage(600, 400), now);
        assert_eq!(a.to_sync(), ["a"]);
        assert!(a.to_sync().is_empty(), "nothing spent since");
        // A sync that failed is tried again next time.
        a.resync("a");
        assert_eq!(a.to_sync(), ["a"]);
        let saved = [("a", a.merge("a", "n1", &[], now))];
        let window = &saved[0].1[0];
        assert_eq!(
            window.started_ms % 3_600_000,
            0,
            "aligned to the clock hour"
        );
        assert_eq!(window.used, 1000.0);

        // A restarted keel in the same hour is still over budget...
        let b = agents(tokens(1000));
        let later = now + Duration::from_secs(60);
        b.restore("a", &saved[0].1, later);
        let over = b.check("a", None, later).unwrap_err();
        assert_eq!(over.retry_after, 2340);
        // ...and one started in the next hour is not.
        let c = agents(tokens(1000));
        c.restore("a", &saved[0].1, now + hour);
        assert!(c.check("a", None, now + hour).is_ok());
    }

    #[test]
    fn requests_per_minute_refuse_the_next_request_until_the_window_rolls() {
        let a = agents(BudgetSettings {
            requests_per_minute: Some(5),
            ..BudgetSettings::default()
        });
        let t = Duration::from_secs(10);
        let mut warned = 0;
        for _ in 0..5 {
            warned += a.check("a", None, t).unwrap().len();
        }
        assert_eq!(warned, 1, "one warning at 80% (the 4th request)");
        let over = a.check("a", None, t).unwrap_err();
        assert_eq!(over.unit, Unit::Requests);
        assert_eq!(over.retry_after, 50);
        assert_eq!(
            over.message("a"),
            "agent \"a\" has used 5 of its 5 requests per minute; retry after 50s"
        );
        assert!(a.check("a", None, Duration::from_secs(61)).is_ok());
        assert!(
            a.check("other", None, t).is_ok(),
            "agents without budgets are not limited"
        );
    }

    /// Requests that arrive together get no more of a per-minute budget than its limit.
    #[test]
    fn concurrent_requests_share_the_last_requests_of_a_budget() {
        for _ in 0..20 {
            let a = agents(BudgetSettings {
                requests_per_minute: Some(5),
                ..BudgetSettings::default()
            });
            let start = std::sync::Barrier::new(8);
            let admitted: usize = std::thread::scope(|scope| {
                let threads: Vec<_> = (0..8)
                    .map(|_| {
                        scope.spawn(|| {
                            start.wait();
                            (0..4)
                                .filter(|_| a.check("a", None, Duration::from_secs(10)).is_ok())
                                .count()
                        })
                    })
                    .collect();
                threads.into_iter().map(|t| t.join().unwrap()).sum()
            });
            assert_eq!(admitted, 5);
        }
    }

    #[test]
    fn dollars_are_priced_per_target_model_and_spent_from_usage() {
        let a = agents(BudgetSettings {
            usd_per_day: Some(1.0),
            ..BudgetSettings::default()
        });
        let t = Duration::from_secs(1);
        // 100k prompt tokens at $2/M + 50k completion at $8/M = $0.60.
        let (left, warnings) = a.spend("a", None, "p/m", usage(100_000, 50_000), t);
        assert_eq!(left.len(), 1);
        assert!((left[0].1 - 0.4).abs() < 1e-9, "{left:?}");
        assert!(warnings.is_empty());
        let (_, warnings) = a.spend("a", None, "p/m", usage(100_000, 50_000), t);
        assert_eq!(warnings.len(), 1, "crossing 80% warns once");
        assert_eq!(a.check("a", None, t).unwrap_err().unit, Unit::Usd);
        // A model without a price costs nothing.
        let b = agents(BudgetSettings {
            usd_per_day: Some(1.0),
            ..BudgetSettings::default()
        });
        b.spend("a", None, "p/unpriced", usage(10_000_000, 0), t);
        assert!(b.check("a", None, t).is_ok());
    }
}
