//! Where alerts go: webhooks (keel's JSON, or a Slack incoming-webhook message) and the log.
//! Critical alerts are sent at once; warnings wait for the digest; info is only recorded.

use std::time::Duration;

use keel_config::{Severity, Webhook, WebhookFormat};
use serde_json::{Value, json};

/// One notification: an alert firing or resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Note {
    /// `firing` or `resolved`.
    pub status: &'static str,
    /// The severity (of a resolution: the incident's).
    pub severity: Severity,
    /// The incident it belongs to.
    pub incident: String,
    /// The cause.
    pub key: String,
    /// One line.
    pub title: String,
    /// What happened.
    pub message: String,
    /// Facts.
    pub labels: serde_json::Map<String, Value>,
    /// RFC 3339 UTC.
    pub at: String,
}

impl Note {
    /// keel's JSON form.
    pub fn to_json(&self) -> Value {
        json!({
            "status": self.status,
            "severity": self.severity.as_str(),
            "incident": self.incident,
            "key": self.key,
            "title": self.title,
            "message": self.message,
            "labels": self.labels,
            "at": self.at,
        })
    }

    fn line(&self) -> String {
        let tag = match self.status {
            "resolved" => "RESOLVED".to_owned(),
            _ => self.severity.as_str().to_uppercase(),
        };
        format!(
            "*[{tag}]* {} ({}): {}",
            self.title, self.incident, self.message
        )
    }
}

/// What one POST carries: one note (critical, at once) or a digest.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// Sent at once.
    Now(Note),
    /// The warnings of one digest period.
    Digest(Vec<Note>),
}

/// The body of `delivery` for a webhook of `format`.
pub fn body(format: WebhookFormat, delivery: &Delivery) -> Value {
    match (format, delivery) {
        (WebhookFormat::Json, Delivery::Now(note)) => {
            let mut v = note.to_json();
            v["source"] = json!("keel");
            v
        }
        (WebhookFormat::Json, Delivery::Digest(notes)) => json!({
            "source": "keel",
            "digest": true,
            "alerts": notes.iter().map(Note::to_json).collect::<Vec<_>>(),
        }),
        (WebhookFormat::Slack, Delivery::Now(note)) => {
            json!({"text": format!("keel: {}", note.line())})
        }
        (WebhookFormat::Slack, Delivery::Digest(notes)) => {
            let lines: Vec<String> = notes.iter().map(Note::line).collect();
            json!({"text": format!("keel digest, {} alerts:\n{}", notes.len(), lines.join("\n"))})
        }
    }
}

/// Whether `hook` takes `delivery`: its least severity, for a digest its warnings.
pub fn wants(hook: &Webhook, delivery: &Delivery) -> bool {
    match delivery {
        Delivery::Now(note) => note.severity >= hook.min_severity,
        Delivery::Digest(_) => Severity::Warning >= hook.min_severity,
    }
}

/// POSTs `delivery` to every webhook that wants it, each with three tries.
pub async fn deliver(client: &reqwest::Client, hooks: &[Webhook], delivery: &Delivery) {
    for hook in hooks.iter().filter(|h| wants(h, delivery)) {
        let payload = body(hook.format, delivery);
        let mut wait = Duration::from_millis(200);
        for attempt in 1..=3 {
            match client.post(&hook.url).json(&payload).send().await {
                Ok(r) if r.status().is_success() => break,
                Ok(r) => {
                    tracing::warn!(url = %hook.url, status = %r.status(), attempt, "alert webhook refused the alert")
                }
                Err(e) => {
                    tracing::warn!(url = %hook.url, error = %e.without_url(), attempt, "alert webhook unreachable")
                }
            }
            if attempt < 3 {
                tokio::time::sleep(wait).await;
                wait *= 4;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(severity: Severity) -> Note {
        Note {
            status: "firing",
            severity,
            incident: "inc_1".into(),
            key: "breaker:sim/primary".into(),
            title: "circuit breaker open: sim/primary".into(),
            message: "failure rate 100%".into(),
            labels: serde_json::Map::new(),
            at: "2026-12-04T10:00:00.000Z".into(),
        }
    }

    #[test]
    fn payloads_for_json_and_slack() {
        let now = Delivery::Now(note(Severity::Critical));
        let v = body(WebhookFormat::Json, &now);
        assert_eq!(v["severity"], "critical");
        assert_eq!(v["incident"], "inc_1");
        assert_eq!(v["source"], "keel");
        let s = body(WebhookFormat::Slack, &now);
        assert_eq!(
            s["text"],
            "keel: *[CRITICAL]* circuit breaker open: sim/primary (inc_1): failure rate 100%"
        );
        let digest = Delivery::Digest(vec![note(Severity::Warning), note(Severity::Warning)]);
        assert_eq!(
            body(WebhookFormat::Json, &digest)["alerts"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        assert!(
            body(WebhookFormat::Slack, &digest)["text"]
                .as_str()
                .unwrap()
                .starts_with("keel digest, 2 alerts:\n*[WARNING]*")
        );
    }

    #[test]
    fn a_hook_gets_what_reaches_its_least_severity() {
        let hook = |min| Webhook {
            url: "http://x".into(),
            format: WebhookFormat::Json,
            min_severity: min,
        };
        let critical = Delivery::Now(note(Severity::Critical));
        let digest = Delivery::Digest(vec![note(Severity::Warning)]);
        assert!(wants(&hook(Severity::Critical), &critical));
        assert!(!wants(&hook(Severity::Critical), &digest));
        assert!(wants(&hook(Severity::Warning), &digest));
        assert!(wants(&hook(Severity::Info), &critical));
    }
}
