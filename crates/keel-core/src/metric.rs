//! Label values for keel's Prometheus metrics.

use std::fmt::{self, Write};

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

/// A metric label value, written escaped as the Prometheus and OpenMetrics text formats
/// require (`\\`, `\"` and a newline as `\\n`).
///
/// `prometheus-client` writes a `String` label value as it is, and some of keel's come from
/// outside: an agent name a client sent, a CEL rule from the config
/// (`args.currency == "USD"`). Unescaped, one such value makes the whole scrape unreadable.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct LabelValue(String);

impl LabelValue {
    /// The value as given (unescaped).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<String> for LabelValue {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for LabelValue {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

impl From<&String> for LabelValue {
    fn from(value: &String) -> Self {
        Self(value.clone())
    }
}

impl fmt::Display for LabelValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl EncodeLabelValue for LabelValue {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        let mut rest = self.0.as_str();
        while let Some(at) = rest.find(['\\', '"', '\n']) {
            encoder.write_str(&rest[..at])?;
            encoder.write_str(match rest.as_bytes()[at] {
                b'\\' => "\\\\",
                b'"' => "\\\"",
                _ => "\\n",
            })?;
            rest = &rest[at + 1..];
        }
        encoder.write_str(rest)
    }
}

/// Label values chosen outside keel's config (an agent name a client sent), bounded: the
/// first [`AgentLabels::LIMIT`] distinct values are kept as they came, any later one is
/// [`AgentLabels::OTHER`], so clients that name an agent per user cannot grow `/metrics`
/// (and Prometheus's series) without end.
#[derive(Debug, Default)]
pub struct AgentLabels {
    names: parking_lot::Mutex<Names>,
}

#[derive(Debug, Default)]
struct Names {
    /// The agents of keel's config: always labels of their own.
    known: std::collections::HashSet<String>,
    /// Other names, up to the limit.
    seen: std::collections::HashSet<String>,
}

impl AgentLabels {
    /// Distinct values kept before the rest are counted together.
    pub const LIMIT: usize = 100;
    /// The value every agent past the limit is counted under.
    pub const OTHER: &'static str = "other";

    /// Names that are always labels of their own (the agents keel's config names), outside
    /// the limit.
    pub fn know(&self, agents: impl IntoIterator<Item = String>) {
        self.names.lock().known.extend(agents);
    }

    /// The label for `agent`.
    pub fn of(&self, agent: &str) -> LabelValue {
        let mut names = self.names.lock();
        if names.known.contains(agent) || names.seen.contains(agent) {
            return agent.into();
        }
        if names.seen.len() < Self::LIMIT {
            names.seen.insert(agent.to_owned());
            return agent.into();
        }
        Self::OTHER.into()
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::EncodeLabelSet;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::registry::Registry;

    use super::LabelValue;

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct Labels {
        rule: LabelValue,
    }

    #[test]
    fn quotes_backslashes_and_newlines_are_escaped() {
        let mut registry = Registry::default();
        let family = Family::<Labels, Counter>::default();
        registry.register("blocks", "Blocks", family.clone());
        family
            .get_or_create(&Labels {
                rule: "args.currency == \"USD\" \\ x\ny é".into(),
            })
            .inc();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(r#"blocks_total{rule="args.currency == \"USD\" \\ x\ny é"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn agent_labels_past_the_limit_are_counted_together() {
        let labels = super::AgentLabels::default();
        for i in 0..super::AgentLabels::LIMIT {
            assert_eq!(
                labels.of(&format!("agent-{i}")).as_str(),
                format!("agent-{i}")
            );
        }
        assert_eq!(labels.of("one-too-many").as_str(), "other");
        assert_eq!(labels.of("another").as_str(), "other");
        // Those seen first keep their own, and the config's agents always do.
        assert_eq!(labels.of("agent-0").as_str(), "agent-0");
        labels.know(["support".to_owned()]);
        assert_eq!(labels.of("support").as_str(), "support");
    }
}
