//! Pure reliability primitives: no I/O, no runtime, time from an injected [`Clock`].
//!
//! - [`backoff`]: how long to wait before a retry (exponential, capped, with jitter);
//! - [`budget`]: whether the system can afford a retry at all (retry storms);
//! - [`breaker`]: whether to call a target at all (circuit breaker);
//! - [`deadline`]: how much time is left when several deadlines nest;
//! - [`clock`]: where `now` comes from.
//!
//! Every state machine takes `now` as a [`std::time::Duration`] since the clock's origin and
//! returns decisions; the gateway wraps them, does the I/O, and emits events and metrics.

pub mod backoff;
pub mod breaker;
pub mod budget;
pub mod clock;
pub mod deadline;

pub use backoff::{Backoff, Jitter};
pub use breaker::{
    Breaker, BreakerSettings, BreakerState, Outcome, Permit, Rejected, Transition, Window,
};
pub use budget::RetryBudget;
pub use clock::{Clock, ManualClock, SystemClock};
pub use deadline::{Deadline, tightest};
