//! A retry budget: retries may add at most a fixed fraction of load, over a sliding window.
//!
//! Why: per-request retry limits do not stop retry storms. When an upstream degrades, every
//! request fails and every request retries `max_attempts` times, so the upstream sees its load
//! multiplied exactly when it can least take it (and with retries at several layers, multiplied
//! again at each). A budget bounds retries by the *traffic*, not by the request: over the last
//! `ttl`, retries may not exceed `min_per_sec·ttl` (a floor, so a quiet route can still retry)
//! plus `retry_ratio` times the original calls. With a ratio of 0.2 a failing upstream sees at
//! most 1.2× its normal load instead of 3×.
//!
//! The shape is tower's `TpsBudget` (itself from Finagle): callers [`RetryBudget::deposit`] once
//! per original call and [`RetryBudget::withdraw`] before each retry. Unlike tower's, time is
//! passed in, so the budget is a pure state machine. This module decides whether a retry is
//! affordable; it does not compute delays (see [`crate::backoff`]) or classify errors.
//!
//! ```
//! use std::time::Duration;
//! use keel_policy::budget::RetryBudget;
//!
//! let mut budget = RetryBudget::new(Duration::from_secs(10), 0, 0.5);
//! let now = Duration::from_secs(1);
//! budget.deposit(now);
//! budget.deposit(now);
//! assert!(budget.withdraw(now)); // 2 calls × 0.5 = 1 retry
//! assert!(!budget.withdraw(now));
//! ```

use std::time::Duration;

#[cfg(test)]
mod tests;

/// Buckets per `ttl`: the window slides in steps of `ttl / BUCKETS`.
const BUCKETS: u64 = 10;
/// Deposits count in the current bucket and the `BUCKETS - 1` before it; withdrawals count in
/// one bucket more, so the ring holds `BUCKETS + 1` buckets (see [`RetryBudget::withdraw`]).
const SLOTS: usize = BUCKETS as usize + 1;
/// Fixed-point scale for the ratio: one retry is a million units, so the arithmetic is exact.
const UNIT: u128 = 1_000_000;

/// A sliding-window retry budget; see the [module docs](self) for why it exists.
///
/// Not thread-safe by itself: the gateway keeps one per route behind a mutex.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    /// Width of one bucket in nanoseconds (at least 1).
    width: u128,
    /// Retries the window allows with no traffic at all: `min_per_sec · ttl`.
    floor: u64,
    /// Retry units earned per deposit (`retry_ratio · UNIT`).
    ratio: u64,
    buckets: [Bucket; SLOTS],
    /// The latest bucket index seen, so a clock that steps back cannot resurrect old buckets.
    latest: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    index: u64,
    deposits: u64,
    withdrawals: u64,
}

// === impl RetryBudget ===

impl RetryBudget {
    /// A budget over a sliding window of `ttl` that allows, at any moment, at most
    /// `floor(min_per_sec · ttl_secs) + retry_ratio · deposits` retries in the last `ttl`.
    ///
    /// `retry_ratio` is retries per original call (0.2 = one retry per five calls; above 1 is
    /// allowed). A negative or NaN ratio counts as 0; the ratio is kept to six decimal places.
    /// A zero `ttl` makes deposits expire within nanoseconds and the floor zero: no retries.
    pub fn new(ttl: Duration, min_per_sec: u32, retry_ratio: f64) -> Self {
        let floor = (f64::from(min_per_sec) * ttl.as_secs_f64()).floor();
        let ratio = if retry_ratio.is_finite() && retry_ratio > 0.0 {
            (retry_ratio * UNIT as f64).round()
        } else {
            0.0
        };
        Self {
            width: (ttl.as_nanos() / u128::from(BUCKETS)).max(1),
            // `as` saturates on float-to-int conversion; both values are finite and non-negative.
            floor: floor as u64,
            ratio: ratio as u64,
            buckets: [Bucket::default(); SLOTS],
            latest: 0,
        }
    }

    /// Records one original (non-retry) call at `now`, earning `retry_ratio` retries for `ttl`.
    pub fn deposit(&mut self, now: Duration) {
        let bucket = self.bucket(now);
        bucket.deposits = bucket.deposits.saturating_add(1);
    }

    /// Asks to spend one retry at `now`; `true` means the retry may go ahead and is recorded.
    ///
    /// Guarantee: whenever this returns `true` at time `t`, the successful withdrawals in
    /// `(t − ttl, t]`, this one included, are at most `floor + retry_ratio ·` the deposits in
    /// `(t − ttl, t]`. Deposits are counted over the current bucket and the 9 before it (a span
    /// within the last `ttl`), withdrawals over one bucket more (a span covering the last
    /// `ttl`), which is what makes the bound hold for the exact window despite bucketing.
    pub fn withdraw(&mut self, now: Duration) -> bool {
        let current = self.index(now);
        let (deposits, withdrawals) = self.live_sums(current);
        let earned = u128::from(self.floor) * UNIT + u128::from(deposits) * u128::from(self.ratio);
        let needed = (u128::from(withdrawals) + 1) * UNIT;
        if earned < needed {
            return false;
        }
        let bucket = self.bucket(now);
        bucket.withdrawals = bucket.withdrawals.saturating_add(1);
        true
    }

    /// The bucket index for `now`, never earlier than one already seen.
    fn index(&mut self, now: Duration) -> u64 {
        let index = u64::try_from(now.as_nanos() / self.width).unwrap_or(u64::MAX);
        self.latest = self.latest.max(index);
        self.latest
    }

    /// The bucket for `now`, cleared first if its slot still holds an older bucket.
    fn bucket(&mut self, now: Duration) -> &mut Bucket {
        let index = self.index(now);
        let bucket = &mut self.buckets[slot(index)];
        if bucket.index != index {
            *bucket = Bucket {
                index,
                ..Bucket::default()
            };
        }
        bucket
    }

    /// Deposits in buckets `current-9..=current` and withdrawals in `current-10..=current`.
    fn live_sums(&self, current: u64) -> (u64, u64) {
        let mut deposits = 0u64;
        let mut withdrawals = 0u64;
        for bucket in &self.buckets {
            // `index` never moves back, so no bucket is newer than `current`; should one be,
            // it is skipped rather than allowed to underflow.
            let Some(age) = current.checked_sub(bucket.index) else {
                continue;
            };
            if age < BUCKETS {
                deposits = deposits.saturating_add(bucket.deposits);
            }
            if age <= BUCKETS {
                withdrawals = withdrawals.saturating_add(bucket.withdrawals);
            }
        }
        (deposits, withdrawals)
    }
}

impl Default for RetryBudget {
    /// tower's and keel's defaults: a 10 s window, 10 retries per second, 20 % of calls.
    fn default() -> Self {
        Self::new(Duration::from_secs(10), 10, 0.2)
    }
}

fn slot(index: u64) -> usize {
    // The remainder is below `SLOTS`, so it fits any `usize`.
    (index % SLOTS as u64) as usize
}
