//! Exponential backoff with jitter (AWS Architecture Blog, "Exponential Backoff And Jitter").
//!
//! This module owns the *delay* before a retry: how long to wait, given how many retries came
//! before. It does not decide *whether* to retry (the error's class does) nor whether the
//! system can afford it (see [`crate::budget`]). Without jitter, clients that failed together
//! retry together and collide again; spreading the delays randomly is what turns contention
//! into progress. `xtask`'s backoff simulation reproduces the article's numbers with this code.
//!
//! ```
//! use std::time::Duration;
//! use keel_policy::backoff::{Backoff, Jitter};
//! use rand::SeedableRng;
//!
//! let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10), Jitter::Full);
//! let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
//! let first = backoff.delay(0, &mut rng);
//! assert!(first <= Duration::from_millis(200));
//! ```

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

#[cfg(test)]
mod tests;

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

impl Jitter {
    /// The lowercase name used in keel.toml (`"none"`, `"full"`, `"equal"`, `"decorrelated"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Full => "full",
            Self::Equal => "equal",
            Self::Decorrelated => "decorrelated",
        }
    }
}

/// Capped exponential backoff with a [`Jitter`] strategy.
///
/// Every delay is at most `cap`, whatever the retry number (`base·2^n` saturates instead of
/// overflowing). The only state is the previous delay, which [`Jitter::Decorrelated`] needs;
/// it restarts at `base` whenever [`Backoff::delay`] is asked for retry 0, so one `Backoff`
/// can serve several retry sequences one after another (not interleaved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    jitter: Jitter,
    /// The previous decorrelated delay; `base` before the first one.
    prev: Duration,
}

// === impl Backoff ===

impl Backoff {
    /// A backoff starting at `base`, never longer than `cap`.
    ///
    /// `base > cap` is accepted (every delay is then at most `cap`), but keel's config rejects it.
    pub fn new(base: Duration, cap: Duration, jitter: Jitter) -> Self {
        Self {
            base,
            cap,
            jitter,
            prev: base,
        }
    }

    /// The first retry's un-jittered delay.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The longest delay this backoff returns.
    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// The jitter strategy.
    pub fn jitter(&self) -> Jitter {
        self.jitter
    }

    /// Forgets the decorrelated history, as if no delay had been computed yet.
    pub fn reset(&mut self) {
        self.prev = self.base;
    }

    /// The delay before retry number `retry` (0 for the first retry), at most `cap`.
    ///
    /// With `v = min(cap, base·2^retry)`:
    /// - [`Jitter::None`] gives `v`;
    /// - [`Jitter::Full`] gives a uniform value in `[0, v]`;
    /// - [`Jitter::Equal`] gives `v/2` plus a uniform value in `[0, v/2]`;
    /// - [`Jitter::Decorrelated`] gives `min(cap, uniform in [base, previous·3])`, ignoring
    ///   `retry` except that retry 0 restarts the sequence from `previous = base`.
    pub fn delay<R: Rng + ?Sized>(&mut self, retry: u32, rng: &mut R) -> Duration {
        match self.jitter {
            Jitter::None => self.exponential(retry),
            Jitter::Full => between(rng, Duration::ZERO, self.exponential(retry)),
            Jitter::Equal => {
                let v = self.exponential(retry);
                let half = v / 2;
                // `v - half` rather than `half` so an odd nanosecond count can still reach `v`.
                half + between(rng, Duration::ZERO, v - half)
            }
            Jitter::Decorrelated => {
                if retry == 0 {
                    self.reset();
                }
                let high = self.prev.saturating_mul(3).max(self.base);
                let sleep = between(rng, self.base, high).min(self.cap);
                self.prev = sleep;
                sleep
            }
        }
    }

    /// `min(cap, base·2^retry)`, computed in `u128` nanoseconds so it saturates, never wraps.
    fn exponential(&self, retry: u32) -> Duration {
        let scaled = 1u128
            .checked_shl(retry)
            .and_then(|factor| self.base.as_nanos().checked_mul(factor));
        match scaled {
            Some(nanos) if nanos < self.cap.as_nanos() => from_nanos(nanos),
            _ => self.cap,
        }
    }
}

/// The delay to honour for a server's `Retry-After`: the server's wish, but never beyond `cap`.
pub fn retry_after_delay(retry_after: Duration, cap: Duration) -> Duration {
    retry_after.min(cap)
}

/// Uniform in `[low, high]` at nanosecond resolution; `high < low` yields `low`.
fn between<R: Rng + ?Sized>(rng: &mut R, low: Duration, high: Duration) -> Duration {
    if high <= low {
        return low;
    }
    from_nanos(rng.random_range(low.as_nanos()..=high.as_nanos()))
}

/// Inverse of `Duration::as_nanos`; every caller passes at most `Duration::MAX`'s count.
fn from_nanos(nanos: u128) -> Duration {
    const NANOS_PER_SEC: u128 = 1_000_000_000;
    match u64::try_from(nanos / NANOS_PER_SEC) {
        // The remainder is below 10^9, so it always fits a `u32`.
        Ok(secs) => Duration::new(secs, (nanos % NANOS_PER_SEC) as u32),
        Err(_) => Duration::MAX,
    }
}
