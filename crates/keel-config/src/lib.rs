//! keel.toml: raw serde structs, loading, and validation into typed [`Settings`].
//!
//! Each table has a raw `XConfig` (`#[serde(deny_unknown_fields)]`, durations as humantime
//! strings, defaults filled in) and a `validate()` that turns it into `XSettings` whose fields
//! cannot be invalid. Validation collects every problem it finds; each becomes a
//! [`ConfigError`] naming file, line and key:
//!
//! ```text
//! keel.toml:23: routes.smart.retry.base: 20s is larger than cap 10s
//! ```
//!
//! Parsing is a pure function of the text and an environment lookup (for `*_env` keys), so
//! tests never touch the process environment. This crate does not open listeners, stores or
//! connections, and does not compile tool rules.
//!
//! ```
//! let text = r#"
//! [providers.openai]
//! kind = "openai"
//! base_url = "https://api.openai.com/v1"
//! api_key_env = "OPENAI_API_KEY"
//!
//! [routes.smart]
//! targets = [{ provider = "openai", model = "gpt-5" }]
//! "#;
//! let env = |name: &str| (name == "OPENAI_API_KEY").then(|| "sk-test".to_owned());
//! let settings = keel_config::parse(text, "keel.toml", &env)?;
//! assert_eq!(settings.routes["smart"].targets[0].model, "gpt-5");
//! # Ok::<(), keel_config::ConfigErrors>(())
//! ```

mod agent;
mod alerts;
mod breaker;
mod chaos;
mod duration;
mod error;
mod locate;
mod provider;
mod route;
mod secret;
mod server;
mod settings;
mod telemetry;
mod tool;

use std::path::Path;

pub use agent::{
    AgentConfig, AgentSettings, BudgetConfig, BudgetSettings, DEFAULT_LOOP_REPEATS,
    DEFAULT_LOOP_SAME_CALL, DEFAULT_LOOP_SIMILARITY, DEFAULT_LOOP_WINDOW, DEFAULT_WARN_AT,
    LoopGuardConfig, LoopGuardSettings, LoopGuardTable,
};
pub use alerts::{
    AlertsConfig, AlertsSettings, AnomalyConfig, AnomalySettings, DEFAULT_DIGEST_EVERY, Severity,
    Webhook, WebhookConfig, WebhookFormat,
};
pub use breaker::{BreakerConfig, DEFAULT_BREAKER, WindowKind};
pub use chaos::{
    ChaosConfig, ChaosSettings, Fault, FaultKind, FaultRule, FaultRuleConfig, Latency, Outage,
    OutageConfig, OutageScope, OutageStart, Scope, ScopeConfig,
};
pub use duration::show as show_duration;
pub use error::{ConfigError, ConfigErrors, Invalid, KeyPath, Segment};
pub use provider::{Price, ProviderConfig, ProviderKind, ProviderSettings};
pub use route::{
    RetryConfig, RetrySettings, RouteConfig, RouteSettings, TargetConfig, TargetSettings,
    TimeoutConfig, TimeoutSettings,
};
pub use secret::Secret;
pub use server::{
    DEFAULT_BODY_TIMEOUT, DEFAULT_LISTEN, DEFAULT_LISTEN_ADDR, DEFAULT_MAX_BODY_BYTES,
    DEFAULT_STORE_URL, Durability, MAX_BODY_TIMEOUT, MAX_COMMIT_DELAY, ServerConfig,
    ServerSettings, StoreBackend, StoreConfig, StoreSettings,
};
pub use settings::{KeelConfig, Settings};
pub use telemetry::{LogFormat, OtlpProtocol, TelemetryConfig, TelemetrySettings};
pub use tool::{
    DEFAULT_APPROVAL_TIMEOUT, DEFAULT_PROFILE_FACTOR, DEFAULT_PROFILE_QUANTILE,
    DEFAULT_PROFILE_WARMUP, DEFAULT_TOOL_TIMEOUT, InjectionAction, ProfileAction, ProfileConfig,
    ProfileSettings, ToolConfig, ToolEndpoint, ToolSettings,
};

use crate::locate::Locator;

/// Reads and validates the config file at `path`; `*_env` keys are looked up with `env`.
///
/// Errors name the file as given in `path`; an unreadable file is one error without a line.
pub fn load(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Settings, ConfigErrors> {
    let (file, text) = read(path)?;
    let mut settings = parse(&text, &file, env)?;
    // A module path is relative to the config file, as a user reading the file expects.
    let dir = path.parent().unwrap_or(Path::new(""));
    for tool in settings.tools.values_mut() {
        if let ToolEndpoint::Wasm { path } = &mut tool.endpoint
            && path.is_relative()
        {
            *path = dir.join(&*path);
        }
    }
    Ok(settings)
}

/// The file's name as given in `path` (what errors name) and its text; an unreadable file
/// is one error without a line.
fn read(path: &Path) -> Result<(String, String), ConfigErrors> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => Ok((file, text)),
        Err(e) => Err(ConfigError {
            file,
            line: None,
            key: String::new(),
            message: format!("cannot read the config file: {e}"),
        }
        .into()),
    }
}

/// Reads only `[server]` of the config file at `path`: what a CLI command needs to reach the
/// server it configures (its listen address and admin token), without the provider keys and
/// other secrets the rest of the file names. Errors are placed like those of [`load`].
pub fn load_server(
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ServerSettings, ConfigErrors> {
    /// The file with every table but `[server]` ignored.
    #[derive(serde::Deserialize)]
    struct ServerOnly {
        #[serde(default)]
        server: ServerConfig,
    }
    let (file, text) = read(path)?;
    let locator = Locator::new(&text);
    let only: ServerOnly = toml::from_str(&text)
        .map_err(|e| ConfigErrors::from(locator.place_toml_error(&file, &e)))?;
    only.server
        .validate(&KeyPath::root().child("server"), env)
        .map_err(|problems| {
            ConfigErrors(
                problems
                    .into_iter()
                    .map(|invalid| locator.place(&file, invalid))
                    .collect(),
            )
        })
}

/// A problem with `key` of the config file at `path` found after [`load`] (a Wasm module
/// that does not compile, say), placed at the key's line like the errors of `load`.
pub fn error_at(path: &Path, key: &KeyPath, message: impl std::fmt::Display) -> ConfigError {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    Locator::new(&text).place(&path.display().to_string(), key.invalid(message))
}

/// Parses and validates config `text`, naming `file` in errors; `*_env` keys are looked up
/// with `env`. Pure: no file or process-environment access.
///
/// A TOML syntax error or a serde error (unknown key, wrong type, bad duration) stops at the
/// first; validation errors are all reported, in file order.
pub fn parse(
    text: &str,
    file: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Settings, ConfigErrors> {
    let locator = Locator::new(text);
    let config: KeelConfig =
        toml::from_str(text).map_err(|e| ConfigErrors::from(locator.place_toml_error(file, &e)))?;
    config.validate(env).map_err(|problems| {
        let mut errors: Vec<ConfigError> = problems
            .into_iter()
            .map(|invalid| locator.place(file, invalid))
            .collect();
        // Stable: problems on one line keep the order validation found them in.
        errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
        ConfigErrors(errors)
    })
}

/// The settings of `keel serve` without `--config`: listen on [`DEFAULT_LISTEN`], SQLite at
/// `keel-data/keel.db` with fsync durability, [`DEFAULT_BREAKER`], no admin token, no
/// providers, routes, agents or tools. The same as parsing an empty file.
pub fn embedded_default() -> Settings {
    Settings::default()
}

#[cfg(test)]
mod tests;
