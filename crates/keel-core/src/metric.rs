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
}
