//! Agent identity (keys) and per-agent token budgets.
//!
//! When any `[agents.*]` sets `keys_env`, every gateway request must carry one
//! of those keys as `Authorization: Bearer`; the key names the agent. With no
//! keys configured the gateway is open and `x-keel-agent` names the agent.

use std::collections::HashMap;
use std::time::Duration;

use keel_config::AgentSettings;
use parking_lot::Mutex;

use crate::error::ApiError;

/// Agent used when nothing names one.
pub const ANONYMOUS: &str = "anonymous";

/// Keys and budgets of every configured agent.
pub struct Agents {
    by_key: HashMap<String, String>,
    budgets: HashMap<String, Mutex<TokenWindow>>,
}

/// Tokens spent in the current fixed window.
struct TokenWindow {
    limit: u64,
    window: Duration,
    started: Duration,
    used: u64,
}

/// A budget check that failed: what to tell the client.
#[derive(Debug, Clone)]
pub struct OverBudget {
    /// The limit.
    pub limit: u64,
    /// Tokens used in the window.
    pub used: u64,
    /// Seconds until the window resets.
    pub retry_after: u64,
}

impl Agents {
    /// From validated settings.
    pub fn new<'a>(agents: impl IntoIterator<Item = &'a AgentSettings>) -> Self {
        let mut by_key = HashMap::new();
        let mut budgets = HashMap::new();
        for agent in agents {
            for key in &agent.keys {
                by_key.insert(key.expose().to_owned(), agent.name.clone());
            }
            if let Some(limit) = agent.budget.tokens_per_hour {
                budgets.insert(
                    agent.name.clone(),
                    Mutex::new(TokenWindow {
                        limit,
                        window: Duration::from_secs(3600),
                        started: Duration::ZERO,
                        used: 0,
                    }),
                );
            }
        }
        Self { by_key, budgets }
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
        if !self.auth_required() {
            return Ok(agent_header
                .filter(|a| !a.is_empty())
                .unwrap_or(ANONYMOUS)
                .to_owned());
        }
        let Some(value) = authorization else {
            return Err(ApiError::unauthorized(
                "missing agent key: send it as 'Authorization: Bearer <key>' (the OpenAI SDK's api_key)",
            ));
        };
        let key = value.strip_prefix("Bearer ").unwrap_or(value).trim();
        match self.by_key.get(key) {
            Some(agent) => Ok(agent.clone()),
            None => Err(ApiError::unauthorized("incorrect agent key provided")),
        }
    }

    /// Checks `agent`'s token budget at `now`; `Err` when the window is spent.
    pub fn check(&self, agent: &str, now: Duration) -> Result<Option<u64>, OverBudget> {
        let Some(window) = self.budgets.get(agent) else {
            return Ok(None);
        };
        let mut w = window.lock();
        w.roll(now);
        if w.used >= w.limit {
            let left = (w.started + w.window).saturating_sub(now);
            return Err(OverBudget {
                limit: w.limit,
                used: w.used,
                retry_after: left.as_secs().max(1),
            });
        }
        Ok(Some(w.limit - w.used))
    }

    /// Records tokens spent by `agent`; returns what is left, when a budget applies.
    pub fn spend(&self, agent: &str, tokens: u64, now: Duration) -> Option<u64> {
        let window = self.budgets.get(agent)?;
        let mut w = window.lock();
        w.roll(now);
        w.used = w.used.saturating_add(tokens);
        Some(w.limit.saturating_sub(w.used))
    }
}

impl TokenWindow {
    fn roll(&mut self, now: Duration) {
        if now >= self.started + self.window {
            let windows = (now - self.started).as_secs() / self.window.as_secs().max(1);
            self.started += self.window * u32::try_from(windows).unwrap_or(u32::MAX);
            self.used = 0;
        }
    }
}
