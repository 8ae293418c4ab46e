//! Nested deadlines: attempt ⊂ call ⊂ step ⊂ task, and the tightest one wins.
//!
//! Deadlines here are absolute points on the breaker/budget clock (a [`Duration`] since the
//! [`Clock`](crate::Clock)'s origin), so they compose by taking the earliest. This module only
//! does that arithmetic; enforcing a deadline (timing out a future) is the caller's job.

use std::time::Duration;

/// An absolute deadline on a [`Clock`](crate::Clock)'s timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline {
    at: Duration,
}

// === impl Deadline ===

impl Deadline {
    /// The deadline at clock time `at`.
    pub fn at(at: Duration) -> Self {
        Self { at }
    }

    /// The deadline `timeout` after `now` (saturating at the end of time).
    pub fn after(now: Duration, timeout: Duration) -> Self {
        Self {
            at: now.checked_add(timeout).unwrap_or(Duration::MAX),
        }
    }

    /// The clock time at which the deadline passes.
    pub fn instant(self) -> Duration {
        self.at
    }

    /// Time left at `now`; zero once passed.
    pub fn remaining(self, now: Duration) -> Duration {
        self.at.saturating_sub(now)
    }

    /// Whether the deadline has passed at `now` (reaching it counts as passed).
    pub fn is_expired(self, now: Duration) -> bool {
        now >= self.at
    }

    /// The earliest of some optional deadlines; `None` when none is set.
    pub fn earliest(deadlines: impl IntoIterator<Item = Option<Deadline>>) -> Option<Deadline> {
        deadlines.into_iter().flatten().min()
    }
}

/// Time left at `now` until the earliest of the absolute `deadlines` (zero if it has passed);
/// `None` when no deadline is set.
pub fn tightest(now: Duration, deadlines: &[Option<Duration>]) -> Option<Duration> {
    Deadline::earliest(deadlines.iter().map(|d| d.map(Deadline::at))).map(|d| d.remaining(now))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn tightest_picks_the_earliest_deadline() {
        let now = secs(10);
        let deadlines = [Some(secs(70)), None, Some(secs(15)), Some(secs(40))];
        assert_eq!(tightest(now, &deadlines), Some(secs(5)));
    }

    #[test]
    fn tightest_without_deadlines_is_none() {
        assert_eq!(tightest(secs(1), &[]), None);
        assert_eq!(tightest(secs(1), &[None, None]), None);
    }

    #[test]
    fn passed_deadline_leaves_zero_not_underflow() {
        assert_eq!(
            tightest(secs(100), &[Some(secs(40)), Some(secs(500))]),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn deadline_after_saturates_and_expires_at_its_instant() {
        assert_eq!(
            Deadline::after(secs(5), Duration::MAX).instant(),
            Duration::MAX
        );
        let deadline = Deadline::after(secs(5), secs(3));
        assert_eq!(deadline.remaining(secs(6)), secs(2));
        assert!(!deadline.is_expired(secs(7)));
        assert!(deadline.is_expired(secs(8)));
    }

    #[test]
    fn earliest_ignores_unset_deadlines() {
        let attempt = Some(Deadline::after(secs(0), secs(60)));
        let call = Some(Deadline::after(secs(0), secs(120)));
        assert_eq!(Deadline::earliest([None, call, attempt]), attempt);
    }
}
