//! The whole of keel.toml: the raw top-level table and the validated [`Settings`], plus the
//! rules that span tables (targets name providers, agents do not share keys, routes that share
//! a target agree on its breaker).

use std::collections::BTreeMap;

use keel_policy::breaker::BreakerSettings;
use serde::Deserialize;

use crate::agent::{AgentConfig, AgentSettings};
use crate::alerts::{AlertsConfig, AlertsSettings};
use crate::breaker::{BreakerConfig, DEFAULT_BREAKER};
use crate::chaos::{ChaosConfig, ChaosSettings, Known};
use crate::error::{Invalid, KeyPath, Problems};
use crate::provider::{ProviderConfig, ProviderSettings};
use crate::route::{RouteConfig, RouteSettings};
use crate::secret::Secret;
use crate::server::{ServerConfig, ServerSettings, StoreConfig, StoreSettings};
use crate::telemetry::{TelemetryConfig, TelemetrySettings};
use crate::tool::{ToolConfig, ToolSettings};

/// keel.toml as written. Every table is optional. Nothing here is trusted yet.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeelConfig {
    /// `[server]`.
    #[serde(default)]
    pub server: ServerConfig,
    /// `[store]`.
    #[serde(default)]
    pub store: StoreConfig,
    /// `[providers.NAME]`.
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderConfig>,
    /// `[routes.NAME]`.
    #[serde(default)]
    pub routes: BTreeMap<String, RouteConfig>,
    /// `[breaker]`.
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// `[agents.NAME]`.
    #[serde(default)]
    pub agents: BTreeMap<String, AgentConfig>,
    /// `[tools.NAME]`.
    #[serde(default)]
    pub tools: BTreeMap<String, ToolConfig>,
    /// `[chaos]`.
    #[serde(default)]
    pub chaos: ChaosConfig,
    /// `[alerts]`.
    #[serde(default)]
    pub alerts: AlertsConfig,
    /// `[telemetry]`.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
}

/// A validated keel.toml: every field is usable without further checks.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// `[server]`.
    pub server: ServerSettings,
    /// `[store]`.
    pub store: StoreSettings,
    /// `[providers.NAME]`, by name.
    pub providers: BTreeMap<String, ProviderSettings>,
    /// `[routes.NAME]`, by name (what clients send as `model`). Every target's provider is a
    /// key of `providers`.
    pub routes: BTreeMap<String, RouteSettings>,
    /// `[breaker]`: the breaker of every target whose route does not override it.
    pub breaker: BreakerSettings,
    /// `[agents.NAME]`, by name.
    pub agents: BTreeMap<String, AgentSettings>,
    /// `[tools.NAME]`, by name.
    pub tools: BTreeMap<String, ToolSettings>,
    /// `[chaos]`: fault injection, off unless enabled.
    pub chaos: ChaosSettings,
    /// `[alerts]`: where alerts go, and the anomaly detector's settings.
    pub alerts: AlertsSettings,
    /// `[telemetry]`: OTLP traces and the log format.
    pub telemetry: TelemetrySettings,
}

impl Default for Settings {
    /// What `keel serve` runs with when given no config; see [`crate::embedded_default`].
    fn default() -> Self {
        Self {
            server: ServerSettings::default(),
            store: StoreSettings::default(),
            providers: BTreeMap::new(),
            routes: BTreeMap::new(),
            breaker: DEFAULT_BREAKER,
            agents: BTreeMap::new(),
            tools: BTreeMap::new(),
            chaos: ChaosSettings::default(),
            alerts: AlertsSettings::default(),
            telemetry: TelemetrySettings::default(),
        }
    }
}

impl KeelConfig {
    /// Checks every rule of every table, reading secrets through `env`, and returns every
    /// problem found, not only the first.
    pub fn validate(self, env: &dyn Fn(&str) -> Option<String>) -> Result<Settings, Vec<Invalid>> {
        let root = KeyPath::root();
        let mut problems = Problems::default();
        let server = problems.take(self.server.validate(&root.child("server"), env));
        let store = problems.take(self.store.validate(&root.child("store")));

        // Routes are checked against the provider names as written, so that a provider with
        // its own problem (say, a missing API key) does not also make every route using it fail.
        let provider_names: Vec<&str> = self.providers.keys().map(String::as_str).collect();
        // Chaos rules name routes and targets as written, checked before routes are consumed.
        let route_targets: BTreeMap<String, Vec<String>> = self
            .routes
            .iter()
            .map(|(name, route)| {
                let targets = route
                    .targets
                    .iter()
                    .map(|t| format!("{}/{}", t.provider, t.model))
                    .collect();
                (name.clone(), targets)
            })
            .collect();
        // With agent keys configured, only configured agents can call; otherwise any
        // `x-keel-agent` name can, so chaos rules may name any agent.
        let keyed = self.agents.values().any(|a| !a.keys_env.is_empty());
        let agent_names: Option<Vec<String>> = keyed.then(|| self.agents.keys().cloned().collect());
        let known = Known {
            routes: &route_targets,
            agents: agent_names
                .as_ref()
                .map(|names| names.iter().map(String::as_str).collect()),
        };
        check_names(
            [
                ("providers", self.providers.keys().collect()),
                ("routes", self.routes.keys().collect()),
                ("agents", self.agents.keys().collect()),
                ("tools", self.tools.keys().collect()),
            ],
            &root,
            &mut problems,
        );
        let chaos = problems.take(self.chaos.validate(&root.child("chaos"), &known));
        let alerts = problems.take(self.alerts.validate(&root.child("alerts")));
        let telemetry = problems.take(self.telemetry.validate(&root.child("telemetry")));
        let breaker = problems
            .take(
                self.breaker
                    .validate(&root.child("breaker"), &DEFAULT_BREAKER),
            )
            .unwrap_or(DEFAULT_BREAKER);
        let mut routes = BTreeMap::new();
        for (name, route) in self.routes {
            let at = root.child("routes").child(&name);
            if let Some(route) =
                problems.take(route.validate(&name, &at, &provider_names, &breaker))
            {
                routes.insert(name, route);
            }
        }
        check_shared_breakers(&routes, &mut problems);
        let mut providers = BTreeMap::new();
        for (name, provider) in self.providers {
            let at = root.child("providers").child(&name);
            if let Some(provider) = problems.take(provider.validate(&name, &at, env)) {
                providers.insert(name, provider);
            }
        }

        let key_vars: BTreeMap<String, Vec<String>> = self
            .agents
            .iter()
            .map(|(name, agent)| (name.clone(), agent.keys_env.clone()))
            .collect();
        // An agent's required tools must be configured tools.
        for (name, agent) in &self.agents {
            for (i, tool) in agent.tools.iter().enumerate() {
                if !self.tools.contains_key(tool) {
                    let known: Vec<&str> = self.tools.keys().map(String::as_str).collect();
                    problems.push(
                        root.child("agents")
                            .child(name)
                            .child("tools")
                            .index(i)
                            .invalid(format!(
                                "unknown tool {tool:?}; known: {}",
                                if known.is_empty() {
                                    "none".to_owned()
                                } else {
                                    known.join(", ")
                                }
                            )),
                    );
                }
            }
        }
        let mut agents = BTreeMap::new();
        for (name, agent) in self.agents {
            let at = root.child("agents").child(&name);
            if let Some(agent) = problems.take(agent.validate(&name, &at, env)) {
                agents.insert(name, agent);
            }
        }
        check_shared_keys(&agents, &key_vars, &mut problems);

        let mut tools = BTreeMap::new();
        for (name, tool) in self.tools {
            let at = root.child("tools").child(&name);
            if let Some(tool) = problems.take(tool.validate(&name, &at)) {
                tools.insert(name, tool);
            }
        }
        problems.finish(&root, || {
            Some(Settings {
                server: server?,
                store: store?,
                providers,
                routes,
                breaker,
                agents,
                tools,
                chaos: chaos?,
                alerts: alerts?,
                telemetry: telemetry?,
            })
        })
    }
}

/// A table name is what clients and rules refer to, so none may be empty; an agent's
/// name may not contain `/key/`, which keel uses to name the budget of one of its keys.
fn check_names(tables: [(&str, Vec<&String>); 4], root: &KeyPath, problems: &mut Problems) {
    for (table, names) in &tables {
        for name in names.iter().filter(|n| n.trim().is_empty()) {
            problems.push(root.child(table).child(name).invalid(format!(
                "a name cannot be empty: write [{table}.NAME] with a name to refer to it by"
            )));
        }
    }
    let agents = tables.iter().filter(|(table, _)| *table == "agents");
    for name in agents
        .flat_map(|(_, names)| names)
        .filter(|n| n.contains("/key/"))
    {
        problems.push(root.child("agents").child(name).invalid(
            "an agent's name cannot contain \"/key/\": keel names the budget of one of an agent's keys AGENT/key/KEY",
        ));
    }
}

/// A target has one circuit breaker, whichever routes reach it: routes that share a target
/// must give it the same breaker settings (their `breaker` overrides, or `[breaker]`).
fn check_shared_breakers(routes: &BTreeMap<String, RouteSettings>, problems: &mut Problems) {
    // Target id -> the first route (by name) that uses it, and its breaker.
    let mut first: BTreeMap<String, (&str, &BreakerSettings)> = BTreeMap::new();
    for (name, route) in routes {
        for (i, target) in route.targets.iter().enumerate() {
            let id = target.id();
            match first.get(&id) {
                None => {
                    first.insert(id, (name, &route.breaker));
                }
                Some((other, breaker)) if *other != name && **breaker != route.breaker => {
                    let at = KeyPath::root()
                        .child("routes")
                        .child(name)
                        .child("targets")
                        .index(i);
                    problems.push(at.invalid(format!(
                        "target {id} is also a target of route {other:?}, with other breaker \
                         settings; a target has one circuit breaker, so give the routes that \
                         share it the same `breaker` (or none), or reach the model through a \
                         provider of another name for a breaker of its own"
                    )));
                }
                Some(_) => {}
            }
        }
    }
}

/// A bearer key names one agent: two agents with the same key (even from different
/// variables) would make attribution and budgets ambiguous.
fn check_shared_keys(
    agents: &BTreeMap<String, AgentSettings>,
    key_vars: &BTreeMap<String, Vec<String>>,
    problems: &mut Problems,
) {
    let mut seen: Vec<(&Secret, &str, &str)> = Vec::new();
    for (name, agent) in agents {
        let vars = key_vars.get(name).map(Vec::as_slice).unwrap_or_default();
        for (i, (key, var)) in agent.keys.iter().zip(vars).enumerate() {
            if let Some((_, other, other_var)) = seen.iter().find(|(k, _, _)| *k == key) {
                let at = KeyPath::root()
                    .child("agents")
                    .child(name)
                    .child("keys_env")
                    .index(i);
                problems.push(at.invalid(format!(
                    "the key in {var} is also the key in {other_var} of agent {other:?}; \
                     each key must name one agent"
                )));
            } else {
                seen.push((key, name, var));
            }
        }
    }
}
