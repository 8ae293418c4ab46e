//! Pure reliability primitives: no I/O, no runtime, time from an injected [`Clock`].
//!
//! The gateway wraps these state machines and does the I/O, events and metrics.

pub mod backoff;
pub mod breaker;
pub mod clock;

pub use clock::Clock;
