//! Exponential backoff with jitter (AWS Architecture Blog, "Exponential Backoff And Jitter").

use serde::{Deserialize, Serialize};

/// How randomness spreads retry delays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Jitter {
    /// `min(cap, base·2^n)`, no randomness.
    None,
    /// `random(0, min(cap, base·2^n))`.
    #[default]
    Full,
    /// `v/2 + random(0, v/2)` with `v = min(cap, base·2^n)`.
    Equal,
    /// `min(cap, random(base, previous·3))`.
    Decorrelated,
}
