//! `[breaker]` and a route's `breaker = { ... }` override: circuit breaker settings with
//! resilience4j's meaning for every field.
//!
//! A route's override only names the fields it changes; the rest come from `[breaker]`,
//! whose own missing fields come from [`DEFAULT_BREAKER`].

use std::time::Duration;

use keel_policy::breaker::{BreakerSettings, Window};
use serde::Deserialize;

use crate::duration;
use crate::error::{Invalid, KeyPath, Problems};

/// The largest count window, in calls.
const MAX_COUNT_WINDOW: u32 = 1_000_000;

/// The largest time window, in seconds: a day.
const MAX_TIME_WINDOW: u32 = 86_400;

/// The longest `open_for`: a day.
const MAX_OPEN_FOR: Duration = Duration::from_secs(86_400);

/// The breaker used when `[breaker]` is absent: count window of 100 calls, 20 calls before
/// rates count, opens at 50% failures, slow calls (60s) only open it when every call is slow,
/// stays open 30s, then lets 5 trial calls through.
pub const DEFAULT_BREAKER: BreakerSettings = BreakerSettings {
    window: Window::Count(100),
    min_calls: 20,
    failure_rate: 0.5,
    slow_call_rate: 1.0,
    slow_call: Duration::from_secs(60),
    open_for: Duration::from_secs(30),
    half_open_calls: 5,
};

/// `window = "count" | "time"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WindowKind {
    /// The last `window_size` calls.
    Count,
    /// The calls of the last `window_size` seconds.
    Time,
}

/// `[breaker]` or a route's `breaker = { ... }` as written. Every field is optional: a missing
/// one is inherited (see the module doc). Nothing here is trusted yet.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// `"count"` or `"time"`.
    #[serde(default)]
    pub window: Option<WindowKind>,
    /// Calls (count window) or seconds (time window); at least 1.
    #[serde(default)]
    pub window_size: Option<u32>,
    /// Calls in the window before rates are evaluated; at least 1.
    #[serde(default)]
    pub min_calls: Option<u32>,
    /// Failure rate in (0, 1] at which the breaker opens.
    #[serde(default)]
    pub failure_rate: Option<f64>,
    /// Slow-call rate in (0, 1] at which the breaker opens.
    #[serde(default)]
    pub slow_call_rate: Option<f64>,
    /// A call at least this long is slow.
    #[serde(default, deserialize_with = "duration::optional")]
    pub slow_call: Option<Duration>,
    /// How long the breaker stays open.
    #[serde(default, deserialize_with = "duration::optional")]
    pub open_for: Option<Duration>,
    /// Trial calls while half-open; at least 1.
    #[serde(default)]
    pub half_open_calls: Option<u32>,
}

impl BreakerConfig {
    /// Checks every rule; fields left out are taken from `parent`.
    pub fn validate(
        self,
        at: &KeyPath,
        parent: &BreakerSettings,
    ) -> Result<BreakerSettings, Vec<Invalid>> {
        let mut problems = Problems::default();
        let (parent_kind, parent_size) = match parent.window {
            Window::Count(n) => (WindowKind::Count, n),
            Window::Time(d) => (
                WindowKind::Time,
                u32::try_from(d.as_secs()).unwrap_or(u32::MAX),
            ),
        };
        let size = self.window_size.unwrap_or(parent_size);
        let window = match self.window.unwrap_or(parent_kind) {
            WindowKind::Count => Window::Count(size),
            WindowKind::Time => Window::Time(Duration::from_secs(u64::from(size))),
        };
        let counts = [
            ("window_size", size),
            ("min_calls", self.min_calls.unwrap_or(parent.min_calls)),
            (
                "half_open_calls",
                self.half_open_calls.unwrap_or(parent.half_open_calls),
            ),
        ];
        for (key, value) in counts {
            if value == 0 {
                problems.push(at.child(key).invalid("must be at least 1"));
            }
        }
        // The window keeps one entry per call (count) or per second (time), in memory.
        let (largest, unit) = match window {
            Window::Count(_) => (MAX_COUNT_WINDOW, "calls"),
            Window::Time(_) => (MAX_TIME_WINDOW, "seconds (a day)"),
        };
        if size > largest {
            problems.push(at.child("window_size").invalid(format!(
                "{size} is over the largest window, {largest} {unit}"
            )));
        }
        let failure_rate = self.failure_rate.unwrap_or(parent.failure_rate);
        let slow_call_rate = self.slow_call_rate.unwrap_or(parent.slow_call_rate);
        for (key, rate) in [
            ("failure_rate", failure_rate),
            ("slow_call_rate", slow_call_rate),
        ] {
            if !(rate > 0.0 && rate <= 1.0) {
                problems.push(at.child(key).invalid(format!("{rate} is outside (0, 1]")));
            }
        }
        let slow_call = self.slow_call.unwrap_or(parent.slow_call);
        let open_for = self.open_for.unwrap_or(parent.open_for);
        if slow_call < Duration::from_millis(1) {
            problems.push(at.child("slow_call").invalid(format!(
                "{} is shorter than 1ms: every call would be slow",
                crate::duration::show(slow_call)
            )));
        }
        if open_for.is_zero() || open_for > MAX_OPEN_FOR {
            problems.push(at.child("open_for").invalid(format!(
                "{} is outside (0s, {}]: an open circuit lets no call through for that long",
                crate::duration::show(open_for),
                crate::duration::show(MAX_OPEN_FOR)
            )));
        }
        problems.finish(at, || {
            Some(BreakerSettings {
                window,
                min_calls: self.min_calls.unwrap_or(parent.min_calls),
                failure_rate,
                slow_call_rate,
                slow_call,
                open_for,
                half_open_calls: self.half_open_calls.unwrap_or(parent.half_open_calls),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_the_parent() {
        let settings = BreakerConfig::default().validate(&KeyPath::root(), &DEFAULT_BREAKER);
        assert_eq!(settings, Ok(DEFAULT_BREAKER));
    }

    #[test]
    fn override_keeps_parent_window_kind_and_changes_size() {
        let parent = BreakerSettings {
            window: Window::Time(Duration::from_secs(60)),
            ..DEFAULT_BREAKER
        };
        let config = BreakerConfig {
            window_size: Some(10),
            ..BreakerConfig::default()
        };
        let settings = config.validate(&KeyPath::root(), &parent);
        assert_eq!(
            settings.map(|s| s.window),
            Ok(Window::Time(Duration::from_secs(10)))
        );
    }
}
