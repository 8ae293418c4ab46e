//! Durations in keel.toml: strings like `"250ms"`, `"30s"`, `"10m"` (humantime syntax).
//!
//! A serde helper rather than `humantime_serde` so that a bad value says what is wrong with
//! it and how to write it, not only "expected a duration".

use std::fmt;
use std::time::Duration;

use serde::Deserializer;
use serde::de::{Error, Visitor};

/// Deserializes a required duration string.
pub(crate) fn required<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    deserializer.deserialize_str(DurationVisitor)
}

/// Deserializes an optional duration string; use with `#[serde(default)]`.
pub(crate) fn optional<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    required(deserializer).map(Some)
}

/// Renders a duration the way it is written in keel.toml (`200ms`, `1m 30s`).
pub fn show(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

/// The longest duration any key takes (a retention of decades is still a duration keel can
/// add to a time); each key has its own, tighter, bounds where one makes sense.
const LONGEST: Duration = Duration::from_secs(100 * 31_557_600);

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(r#"a duration string like "250ms", "30s" or "10m""#)
    }

    fn visit_str<E: Error>(self, text: &str) -> Result<Duration, E> {
        let duration = humantime::parse_duration(text).map_err(|e| {
            E::custom(format!(
                r#"invalid duration {text:?}: {e}; write durations like "250ms", "30s" or "10m""#
            ))
        })?;
        if duration > LONGEST {
            return Err(E::custom(format!(
                "duration {text:?} is longer than any keel takes ({}); far past it, times overflow",
                show(LONGEST)
            )));
        }
        Ok(duration)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_durations_as_written() {
        assert_eq!(show(Duration::from_millis(200)), "200ms");
        assert_eq!(show(Duration::from_secs(90)), "1m 30s");
    }
}
