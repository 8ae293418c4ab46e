//! keel's retry and circuit breaker around a Rust agent's own model client, as tower layers.
//!
//! ```sh
//! cargo run -p keel-policy --features tower --example tower_layers
//! ```
//!
//! The "model" here is a function that fails the way a provider does: overloaded now and
//! then, and down for a while. Each request goes through `RetryLayer` (backoff with full
//! jitter, a retry budget) and, inside it, `BreakerLayer` (every attempt asks the breaker and
//! is recorded by it). The output shows the retries, the breaker opening when the model goes
//! down, calls refused at once while it is open, and the trial calls that close it again.
#![expect(clippy::print_stdout, reason = "an example that shows what happens")]

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use keel_policy::{
    Backoff, Breaker, BreakerError, BreakerLayer, BreakerSettings, Jitter, RetryLayer, SystemClock,
    Window,
};
use tower::{ServiceBuilder, ServiceExt, service_fn};

#[derive(Debug)]
enum ModelError {
    /// A 503: worth a retry.
    Overloaded,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let clock = SystemClock::new();
    let breaker = BreakerLayer::new(
        Breaker::new(BreakerSettings {
            window: Window::Count(10),
            min_calls: 4,
            failure_rate: 0.5,
            slow_call_rate: 1.0,
            slow_call: Duration::from_secs(10),
            open_for: Duration::from_millis(300),
            half_open_calls: 2,
        }),
        clock,
    )
    .on_transition(|t| println!("    breaker: {:?} -> {:?}", t.from, t.to));
    // Retry what a retry can fix; an open circuit is the moment to fall back instead.
    let retry = RetryLayer::new(
        |_: &u32, result: &Result<String, BreakerError<ModelError>>| {
            matches!(result, Err(BreakerError::Inner(ModelError::Overloaded)))
        },
        NonZeroU32::MIN.saturating_add(2), // 3 attempts in all
        Backoff::new(
            Duration::from_millis(20),
            Duration::from_millis(200),
            Jitter::Full,
        ),
        clock,
    );

    // Overloaded on every third call; down for requests 4 to 7.
    let calls = Arc::new(AtomicU32::new(0));
    let seen = Arc::clone(&calls);
    let model = service_fn(move |request: u32| {
        let call = seen.fetch_add(1, Ordering::SeqCst);
        async move {
            if (4..8).contains(&request) || call % 3 == 1 {
                Err(ModelError::Overloaded)
            } else {
                Ok(format!("answer {request}"))
            }
        }
    });
    let client = ServiceBuilder::new()
        .layer(retry)
        .layer(breaker)
        .service(model);

    for request in 0..12u32 {
        let before = calls.load(Ordering::SeqCst);
        let result = client.clone().oneshot(request).await;
        let attempts = calls.load(Ordering::SeqCst) - before;
        match result {
            Ok(answer) => println!("request {request:>2}: {answer} ({attempts} model calls)"),
            Err(BreakerError::Open(rejected)) => println!(
                "request {request:>2}: refused by the open breaker, next trial in {:?} ({attempts} model calls)",
                rejected.retry_in
            ),
            Err(BreakerError::Inner(e)) => {
                println!("request {request:>2}: failed: {e:?} ({attempts} model calls)");
            }
        }
        if request == 9 {
            println!("    (waiting out open_for)");
            tokio::time::sleep(Duration::from_millis(350)).await;
        }
    }
}
