//! `[telemetry]`: OpenTelemetry traces over OTLP, and the log format.
//!
//! ```toml
//! [telemetry]
//! otlp_endpoint = "http://127.0.0.1:4318"   # spans go to {otlp_endpoint}/v1/traces; unset: no traces
//! otlp_protocol = "http/protobuf"           # or "http/json"
//! service_name = "keel"
//! log_format = "text"                       # or "json": one JSON object per log line
//! ```

use serde::Deserialize;

use crate::error::{Invalid, KeyPath, Problems};
use crate::provider::check_http_url;

/// `[telemetry]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// The OTLP/HTTP endpoint's base URL (what `OTEL_EXPORTER_OTLP_ENDPOINT` would be).
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// How spans are encoded (default `http/protobuf`).
    #[serde(default)]
    pub otlp_protocol: Option<OtlpProtocol>,
    /// The `service.name` resource attribute (default `keel`).
    #[serde(default)]
    pub service_name: Option<String>,
    /// `text` (default) or `json`.
    #[serde(default)]
    pub log_format: Option<LogFormat>,
}

/// OTLP over HTTP: binary protobuf or JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum OtlpProtocol {
    /// `http/protobuf`.
    #[default]
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    /// `http/json`.
    #[serde(rename = "http/json")]
    HttpJson,
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// For people.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Validated `[telemetry]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetrySettings {
    /// Where spans go (`{endpoint}/v1/traces`); `None`: no traces.
    pub otlp_endpoint: Option<String>,
    /// Their encoding.
    pub otlp_protocol: OtlpProtocol,
    /// `service.name`.
    pub service_name: String,
    /// The log format.
    pub log_format: LogFormat,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            otlp_protocol: OtlpProtocol::default(),
            service_name: "keel".to_owned(),
            log_format: LogFormat::default(),
        }
    }
}

impl TelemetryConfig {
    /// Checks the endpoint and the service name.
    pub fn validate(self, at: &KeyPath) -> Result<TelemetrySettings, Vec<Invalid>> {
        let mut problems = Problems::default();
        let endpoint = match self.otlp_endpoint {
            Some(url) => problems
                .one(check_http_url(
                    &url,
                    &at.child("otlp_endpoint"),
                    "http://127.0.0.1:4318",
                ))
                .map(Some),
            None => Some(None),
        };
        let service_name = self.service_name.unwrap_or_else(|| "keel".to_owned());
        if service_name.trim().is_empty() {
            problems.push(at.child("service_name").invalid("must not be empty"));
        }
        problems.finish(at, || {
            Some(TelemetrySettings {
                otlp_endpoint: endpoint?,
                otlp_protocol: self.otlp_protocol.unwrap_or_default(),
                service_name,
                log_format: self.log_format.unwrap_or_default(),
            })
        })
    }
}
