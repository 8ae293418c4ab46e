//! The breaker's sliding windows: the last `n` outcomes, or the outcomes of the last `d`.
//!
//! Only aggregates are kept (calls, failures, slow calls), as resilience4j does; no outcome
//! is stored beyond what eviction needs. Rates and thresholds live in the parent module.

use std::collections::VecDeque;
use std::time::Duration;

use super::Window;

/// Call counts over some set of recorded outcomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Counts {
    pub(super) calls: u64,
    pub(super) failed: u64,
    pub(super) slow: u64,
}

impl Counts {
    pub(super) fn add(&mut self, sample: Sample) {
        self.calls += 1;
        self.failed += u64::from(sample.failed);
        self.slow += u64::from(sample.slow);
    }

    fn remove(&mut self, other: Counts) {
        self.calls = self.calls.saturating_sub(other.calls);
        self.failed = self.failed.saturating_sub(other.failed);
        self.slow = self.slow.saturating_sub(other.slow);
    }

    /// `(failure rate, slow-call rate)`, both in `0..=1`; `None` when nothing was recorded.
    pub(super) fn rates(&self) -> Option<(f64, f64)> {
        if self.calls == 0 {
            return None;
        }
        let calls = self.calls as f64;
        Some((self.failed as f64 / calls, self.slow as f64 / calls))
    }
}

/// One classified outcome: a slow call may also be a failure and then counts as both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Sample {
    pub(super) failed: bool,
    pub(super) slow: bool,
}

impl From<Sample> for Counts {
    fn from(sample: Sample) -> Self {
        let mut counts = Counts::default();
        counts.add(sample);
        counts
    }
}

/// A sliding window of outcomes, fresh at every breaker transition.
#[derive(Debug, Clone)]
pub(super) enum SlidingWindow {
    /// The last `size` outcomes, oldest first.
    Count {
        size: usize,
        samples: VecDeque<Sample>,
        totals: Counts,
    },
    /// Per-second buckets (oldest first) of the last `seconds` whole seconds.
    Time {
        seconds: u64,
        buckets: VecDeque<(u64, Counts)>,
        totals: Counts,
    },
}

impl SlidingWindow {
    /// An empty window; sizes of zero count as one.
    pub(super) fn new(window: Window) -> Self {
        match window {
            Window::Count(size) => Self::Count {
                size: usize::try_from(size.max(1)).unwrap_or(usize::MAX),
                samples: VecDeque::new(),
                totals: Counts::default(),
            },
            Window::Time(span) => Self::Time {
                // A partial second still needs its own bucket: 1.5 s spans two.
                seconds: (span.as_secs() + u64::from(span.subsec_nanos() > 0)).max(1),
                buckets: VecDeque::new(),
                totals: Counts::default(),
            },
        }
    }

    /// Adds an outcome recorded at `now`, evicts what fell out, and returns the totals.
    pub(super) fn record(&mut self, now: Duration, sample: Sample) -> Counts {
        match self {
            Self::Count {
                size,
                samples,
                totals,
            } => {
                if samples.len() >= *size
                    && let Some(oldest) = samples.pop_front()
                {
                    totals.remove(oldest.into());
                }
                samples.push_back(sample);
                totals.add(sample);
                *totals
            }
            Self::Time {
                seconds,
                buckets,
                totals,
            } => {
                // A clock that steps back lands in the newest bucket instead of reordering.
                let newest = buckets.back().map_or(0, |(second, _)| *second);
                let second = now.as_secs().max(newest);
                while let Some((oldest, counts)) = buckets.front().copied() {
                    if oldest.saturating_add(*seconds) > second {
                        break;
                    }
                    totals.remove(counts);
                    buckets.pop_front();
                }
                match buckets.back_mut() {
                    Some((newest, counts)) if *newest == second => counts.add(sample),
                    _ => buckets.push_back((second, sample.into())),
                }
                totals.add(sample);
                *totals
            }
        }
    }
}
