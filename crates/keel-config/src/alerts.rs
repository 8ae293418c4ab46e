//! `[alerts]`: where keel's alerts go, and how its anomaly detector judges.
//!
//! ```toml
//! [alerts]
//! digest_every = "5m"   # warnings are batched into one digest this often
//! log = true            # every alert is also a log line
//! webhooks = [
//!   { url = "https://hooks.slack.com/services/T/B/X", format = "slack", min_severity = "critical" },
//!   { url = "http://127.0.0.1:9093/keel", format = "json" },
//! ]
//! anomaly = { warmup = 20, sigmas = 3.0, recent = 5 }
//! ```

use std::time::Duration;

use serde::Deserialize;

use crate::duration;
use crate::error::{Invalid, KeyPath, Problems};
use crate::provider::check_http_url;

/// How often warnings are sent as a digest when `digest_every` is not given.
pub const DEFAULT_DIGEST_EVERY: Duration = Duration::from_secs(300);

/// `[alerts]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// How often the warnings of the period go out as one digest (default 5m).
    #[serde(default, deserialize_with = "duration::optional")]
    pub digest_every: Option<Duration>,
    /// Whether every alert is also a log line (default true).
    #[serde(default)]
    pub log: Option<bool>,
    /// Webhooks alerts are POSTed to.
    #[serde(default)]
    pub webhooks: Vec<WebhookConfig>,
    /// `anomaly = { ... }`: the detector's settings.
    #[serde(default)]
    pub anomaly: Option<AnomalyConfig>,
}

/// One webhook as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where alerts are POSTed.
    pub url: String,
    /// `json` (keel's payload, default) or `slack` (an incoming-webhook `text` message).
    #[serde(default)]
    pub format: WebhookFormat,
    /// The least severity sent (default `warning`).
    #[serde(default)]
    pub min_severity: Option<Severity>,
}

/// `anomaly = { ... }` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnomalyConfig {
    /// Values a baseline learns before it judges (default 20).
    #[serde(default)]
    pub warmup: Option<u64>,
    /// How many standard deviations from the baseline is an anomaly (default 3).
    #[serde(default)]
    pub sigmas: Option<f64>,
    /// How many of the newest values are averaged and judged together (default 5).
    #[serde(default)]
    pub recent: Option<usize>,
    /// The length of one period for rates (error rate, latency, token spend; default 10s).
    #[serde(default, deserialize_with = "duration::optional")]
    pub period: Option<Duration>,
}

/// How a webhook's payload looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    /// keel's JSON alert.
    #[default]
    Json,
    /// A Slack incoming-webhook message (`{"text": ...}`).
    Slack,
}

/// How bad an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Recorded for trends.
    Info,
    /// Batched into the digest.
    Warning,
    /// Sent at once.
    Critical,
}

impl Severity {
    /// The name in events, metrics and payloads.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }
}

/// A validated webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    /// Where alerts are POSTed.
    pub url: String,
    /// The payload's shape.
    pub format: WebhookFormat,
    /// The least severity sent.
    pub min_severity: Severity,
}

/// The anomaly detector's validated settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AnomalySettings {
    /// Values a baseline learns before it judges; at least 2.
    pub warmup: u64,
    /// Standard deviations from the baseline that make an anomaly; above 0.
    pub sigmas: f64,
    /// Newest values averaged and judged together; at least 1.
    pub recent: usize,
    /// One period of the rate signals; above 0.
    pub period: Duration,
}

impl Default for AnomalySettings {
    fn default() -> Self {
        Self {
            warmup: 20,
            sigmas: 3.0,
            recent: 5,
            period: Duration::from_secs(10),
        }
    }
}

/// Validated `[alerts]`.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertsSettings {
    /// How often warnings go out as a digest.
    pub digest_every: Duration,
    /// Whether every alert is also a log line.
    pub log: bool,
    /// Where alerts are POSTed.
    pub webhooks: Vec<Webhook>,
    /// The anomaly detector's settings.
    pub anomaly: AnomalySettings,
}

impl Default for AlertsSettings {
    fn default() -> Self {
        Self {
            digest_every: DEFAULT_DIGEST_EVERY,
            log: true,
            webhooks: Vec::new(),
            anomaly: AnomalySettings::default(),
        }
    }
}

impl AlertsConfig {
    /// Checks the webhooks' URLs and the detector's numbers.
    pub fn validate(self, at: &KeyPath) -> Result<AlertsSettings, Vec<Invalid>> {
        let mut problems = Problems::default();
        let digest_every = self.digest_every.unwrap_or(DEFAULT_DIGEST_EVERY);
        if digest_every < Duration::from_secs(1) {
            problems.push(at.child("digest_every").invalid(format!(
                "{} is shorter than 1s: a digest is sent this often",
                crate::duration::show(digest_every)
            )));
        }
        let webhooks: Vec<Option<Webhook>> = self
            .webhooks
            .into_iter()
            .enumerate()
            .map(|(i, w)| {
                let url = problems.one(check_http_url(
                    &w.url,
                    &at.child("webhooks").index(i).child("url"),
                    "https://hooks.example.com/keel/alerts",
                ))?;
                Some(Webhook {
                    url,
                    format: w.format,
                    min_severity: w.min_severity.unwrap_or(Severity::Warning),
                })
            })
            .collect();
        let d = AnomalySettings::default();
        let anomaly = match self.anomaly {
            None => d,
            Some(a) => {
                let at = at.child("anomaly");
                let s = AnomalySettings {
                    warmup: a.warmup.unwrap_or(d.warmup),
                    sigmas: a.sigmas.unwrap_or(d.sigmas),
                    recent: a.recent.unwrap_or(d.recent),
                    period: a.period.unwrap_or(d.period),
                };
                if s.warmup < 2 {
                    problems.push(at.child("warmup").invalid(
                        "must be at least 2: a baseline needs two values to have a spread",
                    ));
                }
                if !(s.sigmas.is_finite() && s.sigmas > 0.0) {
                    problems.push(
                        at.child("sigmas")
                            .invalid(format!("must be above 0, like 3.0; got {}", s.sigmas)),
                    );
                }
                if s.recent == 0 {
                    problems.push(at.child("recent").invalid("must be at least 1"));
                }
                if s.period.is_zero() {
                    problems.push(at.child("period").invalid("must be longer than 0s"));
                }
                s
            }
        };
        problems.finish(at, || {
            Some(AlertsSettings {
                digest_every,
                log: self.log.unwrap_or(true),
                webhooks: webhooks.into_iter().collect::<Option<Vec<_>>>()?,
                anomaly,
            })
        })
    }
}
