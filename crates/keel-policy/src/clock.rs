//! Time as an injected dependency.
use std::time::Duration;

/// A monotonic clock: `now()` is the time elapsed since an arbitrary fixed origin.
pub trait Clock: Send + Sync {
    /// Monotonic time since the clock's origin.
    fn now(&self) -> Duration;
}
