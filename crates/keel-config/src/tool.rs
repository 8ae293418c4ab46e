//! `[tools.NAME]`: tools agents call through keel's tool gateway, and the guards on them.
//!
//! Only the shape is checked here; CEL `rules` are compiled (and their errors reported) by
//! the tool gateway.

use std::path::PathBuf;

use serde::Deserialize;

use crate::error::{Invalid, KeyPath, Problems};
use crate::provider::check_http_url;

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
    /// CEL expressions over `args` that must all hold.
    #[serde(default)]
    pub rules: Vec<String>,
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
}

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

/// Where a tool runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolEndpoint {
    /// An HTTP endpoint (`http(s)://`, no trailing `/`).
    Http {
        /// The URL.
        url: String,
    },
    /// A Wasm module; a relative path is relative to the working directory.
    Wasm {
        /// The module file.
        path: PathBuf,
    },
}

/// A validated tool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolSettings {
    /// The table name, `NAME` in `[tools.NAME]`.
    pub name: String,
    /// Where it runs.
    pub endpoint: ToolEndpoint,
    /// The tool changes the world: never retried without an idempotency key.
    pub side_effects: bool,
    /// CEL rules (not yet compiled), none empty.
    pub rules: Vec<String>,
    /// The histogram guard, if configured.
    pub profile: Option<ProfileSettings>,
}

/// A validated histogram guard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileSettings {
    /// Numeric args to profile; never empty.
    pub args: Vec<String>,
    /// What happens to an outlier.
    pub action: ProfileAction,
}

impl ToolConfig {
    /// Checks that the tool has exactly one endpoint and well-formed guards.
    pub fn validate(self, name: &str, at: &KeyPath) -> Result<ToolSettings, Vec<Invalid>> {
        let mut problems = Problems::default();
        let endpoint = match (self.url, self.wasm) {
            (Some(url), None) => problems
                .one(check_http_url(&url, &at.child("url")))
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
            if rule.trim().is_empty() {
                problems.push(at.child("rules").index(i).invalid("rule is empty"));
            }
        }
        let profile = self.profile.map(|p| {
            if p.args.is_empty() {
                problems.push(
                    at.child("profile")
                        .child("args")
                        .invalid("must name at least one numeric arg"),
                );
            }
            ProfileSettings {
                args: p.args,
                action: p.action,
            }
        });
        problems.finish(at, || {
            Some(ToolSettings {
                name: name.to_owned(),
                endpoint: endpoint?,
                side_effects: self.side_effects,
                rules: self.rules,
                profile,
            })
        })
    }
}
