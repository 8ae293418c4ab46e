//! Circuit breaker with resilience4j's semantics.
//!
//! The breaker stops sending calls to a target that is failing or slow, so the target can
//! recover and callers fail fast (or fall back) instead of waiting. It owns the state machine
//! only: the caller asks [`Breaker::try_acquire`] before a call, reports with
//! [`Breaker::record`] after it, and drains [`Breaker::take_transitions`] to emit events and
//! the `keel_breaker_state` gauge. It does no I/O and reads no clock; `now` is passed in.
//!
//! - **Closed**: calls flow; outcomes go into a sliding [`Window`]. Once the window holds at
//!   least `min_calls` calls (for a count window, at most its size), the breaker opens when
//!   the failure rate reaches `failure_rate` or the slow-call rate reaches `slow_call_rate`.
//!   A call lasting at least `slow_call` is slow; a slow failure counts as both.
//! - **Open**: calls are rejected for `open_for`; the first [`Breaker::try_acquire`] after that
//!   moves to half-open.
//! - **Half-open**: exactly `half_open_calls` trial calls are let through; once all are
//!   recorded, their rates decide: below both thresholds closes, otherwise opens again.
//!
//! Every transition starts a fresh window, and bumps a generation so that an outcome of a call
//! admitted in an earlier state (a late answer) does not count in the new one.
//!
//! ```
//! use std::time::Duration;
//! use keel_policy::breaker::{Breaker, BreakerSettings, BreakerState, Outcome, Window};
//!
//! let mut breaker = Breaker::new(BreakerSettings {
//!     window: Window::Count(10),
//!     min_calls: 4,
//!     failure_rate: 0.5,
//!     slow_call_rate: 1.0,
//!     slow_call: Duration::from_secs(30),
//!     open_for: Duration::from_secs(5),
//!     half_open_calls: 2,
//! });
//! let now = Duration::ZERO;
//! for _ in 0..4 {
//!     let permit = breaker.try_acquire(now).unwrap();
//!     breaker.record(permit, now, Outcome::failure(Duration::from_millis(10)));
//! }
//! assert_eq!(breaker.state(), BreakerState::Open);
//! assert_eq!(breaker.try_acquire(now).unwrap_err().retry_in, Duration::from_secs(5));
//! ```

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use self::window::{Counts, Sample, SlidingWindow};

#[cfg(feature = "tower")]
mod layer;
#[cfg(test)]
mod tests;
mod window;

#[cfg(feature = "tower")]
pub use layer::{
    BreakerError, BreakerFuture, BreakerHandle, BreakerLayer, BreakerService, Classify,
    ErrorsAsFailures,
};

/// Transitions kept for [`Breaker::take_transitions`]; older ones are dropped if nobody drains.
const MAX_PENDING_TRANSITIONS: usize = 64;

/// How the breaker's sliding window counts calls.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Window {
    /// The last `n` calls.
    Count(u32),
    /// The calls of the last `d` (aggregated in one-second buckets).
    Time(Duration),
}

/// Validated breaker settings (resilience4j's meaning for every field).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerSettings {
    /// The sliding window.
    pub window: Window,
    /// Calls needed in the window before rates are evaluated.
    pub min_calls: u32,
    /// Failure rate (0..=1) at or above which the breaker opens.
    pub failure_rate: f64,
    /// Slow-call rate (0..=1) at or above which the breaker opens.
    pub slow_call_rate: f64,
    /// A call at least this long is slow.
    pub slow_call: Duration,
    /// How long the breaker stays open before letting trial calls through.
    pub open_for: Duration,
    /// Trial calls permitted while half-open.
    pub half_open_calls: u32,
}

/// The breaker's state, as reported in events and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls flow and are measured.
    Closed,
    /// Calls are rejected until `open_for` has passed.
    Open,
    /// A limited number of trial calls decide between closed and open.
    HalfOpen,
}

impl BreakerState {
    /// `"closed"`, `"open"` or `"half_open"`, as in events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }

    /// The value of the `keel_breaker_state` gauge: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::HalfOpen => 1,
            Self::Open => 2,
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Leave to make one call; hand it back through [`Breaker::record`] or [`Breaker::release`].
///
/// A permit that is dropped instead leaks a half-open trial slot until the next transition,
/// so callers must return every permit (the gateway's layer does so even on cancellation).
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a permit must be returned with `record` or `release`"]
pub struct Permit {
    generation: u64,
    state: BreakerState,
}

impl Permit {
    /// The state the breaker was in when it issued this permit (closed or half-open).
    pub fn state(&self) -> BreakerState {
        self.state
    }
}

/// The breaker refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected {
    /// Time until the breaker lets a trial call through. Zero while half-open with every trial
    /// slot taken: the next slot frees as soon as the trials in flight are recorded.
    pub retry_in: Duration,
}

/// What happened to a permitted call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Whether the call succeeded, as the caller classifies it.
    pub success: bool,
    /// How long the call took; at least `slow_call` makes it slow.
    pub duration: Duration,
}

impl Outcome {
    /// A successful call that took `duration`.
    pub fn success(duration: Duration) -> Self {
        Self {
            success: true,
            duration,
        }
    }

    /// A failed call that took `duration`.
    pub fn failure(duration: Duration) -> Self {
        Self {
            success: false,
            duration,
        }
    }
}

/// A change of state, for events and metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transition {
    /// The state left.
    pub from: BreakerState,
    /// The state entered.
    pub to: BreakerState,
    /// When, on the breaker's clock.
    pub at: Duration,
    /// The failure rate (0..=1) evaluated for this transition; `None` for open → half-open.
    pub failure_rate: Option<f64>,
    /// The slow-call rate (0..=1) evaluated for this transition; `None` for open → half-open.
    pub slow_call_rate: Option<f64>,
}

/// A circuit breaker for one target; see the [module docs](self).
///
/// Not thread-safe by itself: the gateway keeps it behind a mutex and holds the lock only
/// around `try_acquire` and `record`, never across the call.
#[derive(Debug, Clone)]
pub struct Breaker {
    settings: BreakerSettings,
    state: State,
    /// Bumped at every transition; permits of an older generation are not counted.
    generation: u64,
    transitions: Vec<Transition>,
}

#[derive(Debug, Clone)]
enum State {
    Closed { window: SlidingWindow },
    Open { until: Duration },
    HalfOpen { issued: u32, trials: Counts },
}

// === impl Breaker ===

impl Breaker {
    /// A closed breaker with an empty window.
    ///
    /// Values that would make it inert are raised to the least meaningful one: a window of at
    /// least one call or second, `min_calls` and `half_open_calls` of at least 1. For a count
    /// window, `min_calls` above the window size is lowered to the size, as resilience4j does.
    pub fn new(settings: BreakerSettings) -> Self {
        let mut settings = settings;
        settings.min_calls = settings.min_calls.max(1);
        settings.half_open_calls = settings.half_open_calls.max(1);
        if let Window::Count(size) = settings.window {
            settings.window = Window::Count(size.max(1));
            settings.min_calls = settings.min_calls.min(size.max(1));
        }
        Self {
            state: State::Closed {
                window: SlidingWindow::new(settings.window),
            },
            settings,
            generation: 0,
            transitions: Vec::new(),
        }
    }

    /// The settings in effect (after the adjustments described in [`Breaker::new`]).
    pub fn settings(&self) -> &BreakerSettings {
        &self.settings
    }

    /// The current state. An open breaker whose `open_for` has passed still reports open until
    /// the next [`Breaker::try_acquire`] moves it to half-open.
    pub fn state(&self) -> BreakerState {
        match self.state {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// How long the breaker still refuses every call at `now`: `Some` while it is open and
    /// `open_for` has not passed, `None` when a call would be let through (or tried).
    pub fn open_remaining(&self, now: Duration) -> Option<Duration> {
        match self.state {
            State::Open { until } if now < until => Some(until - now),
            State::Open { .. } | State::Closed { .. } | State::HalfOpen { .. } => None,
        }
    }

    /// Whether [`Breaker::try_acquire`] at `now` would let a call through, without asking:
    /// closed, open with `open_for` passed, or half-open with a trial slot free.
    pub fn would_admit(&self, now: Duration) -> bool {
        match &self.state {
            State::Closed { .. } => true,
            State::Open { until } => now >= *until,
            State::HalfOpen { issued, .. } => *issued < self.settings.half_open_calls,
        }
    }

    /// Asks to make a call at `now`.
    ///
    /// Closed: always permitted. Open: rejected until `open_for` has passed, then the breaker
    /// turns half-open and this call is the first trial. Half-open: permitted while fewer than
    /// `half_open_calls` trials are out or recorded.
    pub fn try_acquire(&mut self, now: Duration) -> Result<Permit, Rejected> {
        if let State::Open { until } = self.state {
            if now < until {
                return Err(Rejected {
                    retry_in: until - now,
                });
            }
            self.transition(
                now,
                State::HalfOpen {
                    issued: 0,
                    trials: Counts::default(),
                },
                None,
            );
        }
        let state = self.state();
        let slots = self.settings.half_open_calls;
        match &mut self.state {
            State::Closed { .. } => {}
            State::HalfOpen { issued, .. } if *issued < slots => {
                *issued += 1;
            }
            State::HalfOpen { .. } | State::Open { .. } => {
                return Err(Rejected {
                    retry_in: Duration::ZERO,
                });
            }
        }
        Ok(Permit {
            generation: self.generation,
            state,
        })
    }

    /// Reports the outcome of a permitted call that ended at `now`.
    ///
    /// An outcome from a permit issued before the last transition is ignored: it describes a
    /// state that no longer holds.
    pub fn record(&mut self, permit: Permit, now: Duration, outcome: Outcome) {
        if permit.generation != self.generation {
            return;
        }
        let sample = Sample {
            failed: !outcome.success,
            slow: outcome.duration >= self.settings.slow_call,
        };
        let settings = self.settings;
        match &mut self.state {
            State::Closed { window } => {
                let counts = window.record(now, sample);
                if counts.calls < u64::from(settings.min_calls) {
                    return;
                }
                if let Some(rates) = counts.rates()
                    && settings.trips(rates)
                {
                    self.open(now, rates);
                }
            }
            State::HalfOpen { trials, .. } => {
                trials.add(sample);
                if trials.calls < u64::from(settings.half_open_calls) {
                    return;
                }
                let Some(rates) = trials.rates() else { return };
                if settings.trips(rates) {
                    self.open(now, rates);
                } else {
                    let window = SlidingWindow::new(settings.window);
                    self.transition(now, State::Closed { window }, Some(rates));
                }
            }
            // No permit is issued while open, so a current-generation permit cannot be here.
            State::Open { .. } => {}
        }
    }

    /// Returns a permit whose call was never made (cancelled before sending, say), freeing its
    /// half-open trial slot. The call counts neither as success nor as failure.
    pub fn release(&mut self, permit: Permit) {
        if permit.generation != self.generation {
            return;
        }
        if let State::HalfOpen { issued, .. } = &mut self.state {
            *issued = issued.saturating_sub(1);
        }
    }

    /// The transitions since the last call, oldest first (at most the latest 64 are kept).
    pub fn take_transitions(&mut self) -> Vec<Transition> {
        std::mem::take(&mut self.transitions)
    }

    fn open(&mut self, now: Duration, rates: (f64, f64)) {
        let until = now
            .checked_add(self.settings.open_for)
            .unwrap_or(Duration::MAX);
        self.transition(now, State::Open { until }, Some(rates));
    }

    fn transition(&mut self, now: Duration, to: State, rates: Option<(f64, f64)>) {
        let from = self.state();
        self.state = to;
        self.generation = self.generation.wrapping_add(1);
        if self.transitions.len() >= MAX_PENDING_TRANSITIONS {
            self.transitions.remove(0);
        }
        self.transitions.push(Transition {
            from,
            to: self.state(),
            at: now,
            failure_rate: rates.map(|(failure, _)| failure),
            slow_call_rate: rates.map(|(_, slow)| slow),
        });
    }
}

impl BreakerSettings {
    /// Whether `(failure rate, slow-call rate)` reaches either threshold.
    fn trips(&self, (failure, slow): (f64, f64)) -> bool {
        failure >= self.failure_rate || slow >= self.slow_call_rate
    }
}
