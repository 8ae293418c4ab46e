//! Pure reliability primitives: no I/O, no runtime, time from an injected [`Clock`].
//!
//! - [`backoff`]: how long to wait before a retry (exponential, capped, with jitter);
//! - [`budget`]: whether the system can afford a retry at all (retry storms);
//! - [`retry`]: whether a failed call is worth retrying ([`RetryPolicy`], the caller's call);
//! - [`breaker`]: whether to call a target at all (circuit breaker);
//! - [`deadline`]: how much time is left when several deadlines nest;
//! - [`profile`]: whether a tool argument is far outside its usual values (histogram guard);
//! - [`baseline`]: whether a signal (error rate, trajectory length) is far from its usual (anomaly baseline);
//! - [`clock`]: where `now` comes from.
//!
//! Every state machine takes `now` as a [`std::time::Duration`] since the clock's origin and
//! returns decisions; the gateway wraps them, does the I/O, and emits events and metrics.
//!
//! With the `tower` feature, Rust agents get the same policies as tower layers over their own
//! services: `BreakerLayer` (skip a failing target, record every outcome) and `RetryLayer`
//! (retry with backoff, `Retry-After` and a shared budget). The state machines stay pure;
//! the layers add the locking, the sleeping and the timing.
#![cfg_attr(
    feature = "tower",
    doc = r#"
```
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use keel_policy::{
    Backoff, Breaker, BreakerError, BreakerLayer, BreakerSettings, BreakerState, Jitter,
    RetryLayer, SystemClock, Window,
};
use tower::{ServiceBuilder, ServiceExt, service_fn};

#[derive(Debug, PartialEq)]
enum ModelError {
    /// Transient (a 503, say): worth a retry.
    Overloaded,
    /// A retry cannot fix it.
    BadRequest,
}

/// The decision is the caller's: retry an overloaded model, never a bad request, and never an
/// open circuit (that is the moment to fall back to another model instead).
fn retryable(_prompt: &String, result: &Result<String, BreakerError<ModelError>>) -> bool {
    matches!(result, Err(BreakerError::Inner(ModelError::Overloaded)))
}

# #[tokio::main(flavor = "current_thread")]
# async fn main() -> Result<(), BreakerError<ModelError>> {
let clock = SystemClock::new();
let breaker = BreakerLayer::new(
    Breaker::new(BreakerSettings {
        window: Window::Count(100),
        min_calls: 20,
        failure_rate: 0.5,
        slow_call_rate: 1.0,
        slow_call: Duration::from_secs(30),
        open_for: Duration::from_secs(30),
        half_open_calls: 5,
    }),
    clock,
)
.on_transition(|t| tracing_or_metrics(t.from, t.to));
let circuit = breaker.handle();
let retry = RetryLayer::new(
    retryable,
    NonZeroU32::new(3).expect("3 is not zero"),
    Backoff::new(Duration::from_millis(10), Duration::from_secs(1), Jitter::Full),
    clock,
);

// A model that is overloaded on its first call and answers afterwards.
let calls = Arc::new(AtomicU32::new(0));
let model = service_fn(move |prompt: String| {
    let call = calls.fetch_add(1, Ordering::SeqCst);
    async move {
        match call {
            0 => Err(ModelError::Overloaded),
            _ if prompt.is_empty() => Err(ModelError::BadRequest),
            _ => Ok(format!("echo: {prompt}")),
        }
    }
});

// Retry outside the breaker: every attempt asks the breaker, and is recorded by it.
let client = ServiceBuilder::new().layer(retry).layer(breaker).service(model);
let answer = client.clone().oneshot("hello".to_string()).await?;
assert_eq!(answer, "echo: hello");

let refused = client.oneshot(String::new()).await.unwrap_err();
assert_eq!(refused.into_inner(), Some(ModelError::BadRequest));
assert_eq!(circuit.state(), BreakerState::Closed);
# Ok(())
# }
# fn tracing_or_metrics(_from: BreakerState, _to: BreakerState) {}
```
"#
)]

pub mod backoff;
pub mod baseline;
pub mod breaker;
pub mod budget;
pub mod clock;
pub mod deadline;
pub mod profile;
pub mod retry;

pub use backoff::{Backoff, Jitter};
pub use breaker::{
    Breaker, BreakerSettings, BreakerState, Outcome, Permit, Rejected, Transition, Window,
};
pub use budget::RetryBudget;
pub use clock::{Clock, ManualClock, SystemClock};
pub use deadline::{Deadline, tightest};
pub use profile::{Judgement, Profile, ProfileRule};
pub use retry::RetryPolicy;
#[cfg(feature = "tower")]
pub use {
    breaker::{
        BreakerError, BreakerHandle, BreakerLayer, BreakerService, Classify, ErrorsAsFailures,
    },
    retry::{Retry, RetryLayer},
};
