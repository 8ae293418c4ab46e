//! Time as an injected dependency.
//!
//! Every state machine in this crate takes `now` as a [`Duration`] since an arbitrary
//! origin instead of reading the system time, so tests drive time explicitly. This module
//! owns the [`Clock`] trait and its two implementations: [`SystemClock`] for production and
//! [`ManualClock`] for tests and simulations. It does not sleep or schedule anything.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A monotonic clock: `now()` is the time elapsed since an arbitrary fixed origin.
pub trait Clock: Send + Sync {
    /// Monotonic time since the clock's origin; never goes backwards.
    fn now(&self) -> Duration;
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now(&self) -> Duration {
        (**self).now()
    }
}

impl<C: Clock + ?Sized> Clock for &C {
    fn now(&self) -> Duration {
        (**self).now()
    }
}

// === impl SystemClock ===

/// The process's monotonic clock; its origin is the moment it was constructed.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    // This is the one place in keel-policy that reads `Instant`: production needs a real
    // monotonic source, and everything else receives time through `Clock` so it stays testable.
    origin: Instant,
}

impl SystemClock {
    /// A clock whose `now()` starts at zero at this call.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

// === impl ManualClock ===

/// A clock that moves only when told to; clones share the same time.
///
/// Time is stored as whole nanoseconds in a `u64` (about 584 years); moves past that saturate.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    nanos: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock standing at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// A clock standing at `now`.
    pub fn at(now: Duration) -> Self {
        let clock = Self::new();
        clock.set(now);
        clock
    }

    /// Moves every clone of this clock forward by `by` (saturating).
    pub fn advance(&self, by: Duration) {
        let by = to_nanos(by);
        // `fetch_update` with a closure that always returns `Some` cannot fail.
        let _ = self
            .nanos
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some(n.saturating_add(by))
            });
    }

    /// Sets every clone of this clock to `now` (saturating). Setting an earlier time is
    /// allowed so tests can model a misbehaving clock; the state machines tolerate it.
    pub fn set(&self, now: Duration) {
        self.nanos.store(to_nanos(now), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::SeqCst))
    }
}

fn to_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_clones_share_time() {
        let clock = ManualClock::new();
        let other = clock.clone();
        clock.advance(Duration::from_millis(1500));
        assert_eq!(other.now(), Duration::from_millis(1500));
        other.set(Duration::from_secs(7));
        assert_eq!(clock.now(), Duration::from_secs(7));
    }

    #[test]
    fn manual_clock_saturates_instead_of_wrapping() {
        let clock = ManualClock::at(Duration::MAX);
        clock.advance(Duration::from_secs(1));
        assert_eq!(clock.now(), Duration::from_nanos(u64::MAX));
    }

    #[test]
    fn system_clock_starts_near_zero_and_is_monotonic() {
        let clock = SystemClock::new();
        let a = clock.now();
        let b = clock.now();
        assert!(a < Duration::from_secs(1));
        assert!(b >= a);
    }

    #[test]
    fn clock_is_usable_through_arc_and_reference() {
        let clock = Arc::new(ManualClock::at(Duration::from_secs(3)));
        let dynamic: Arc<dyn Clock> = clock.clone();
        assert_eq!(dynamic.now(), Duration::from_secs(3));
        fn read(clock: impl Clock) -> Duration {
            clock.now()
        }
        assert_eq!(read(&*clock), Duration::from_secs(3));
    }
}
