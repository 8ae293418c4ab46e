use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt, service_fn};

use super::*;
use crate::backoff::{Backoff, Jitter};
use crate::budget::RetryBudget;
use crate::clock::ManualClock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TestError {
    /// Transient: worth another attempt.
    Transient,
    /// A retry cannot fix it.
    Fatal,
    /// Overloaded; the server asks to come back after the given delay.
    Busy(Duration),
}

/// Retries `Transient` and `Busy`, honours `Busy`'s delay.
#[derive(Debug, Clone)]
struct Policy;

impl RetryPolicy<u32, u32, TestError> for Policy {
    fn retryable(&self, _req: &u32, result: &Result<u32, TestError>) -> bool {
        matches!(result, Err(TestError::Transient | TestError::Busy(_)))
    }

    fn retry_after(&self, result: &Result<u32, TestError>) -> Option<Duration> {
        match result {
            Err(TestError::Busy(after)) => Some(*after),
            _ => None,
        }
    }
}

type Script = Arc<Mutex<VecDeque<Result<u32, TestError>>>>;

/// A service answering from `script` in order (then `Transient` forever), logging requests.
fn scripted(
    script: Vec<Result<u32, TestError>>,
) -> (
    impl Service<u32, Response = u32, Error = TestError, Future: Send> + Clone + Send + 'static,
    Arc<Mutex<Vec<u32>>>,
) {
    let script: Script = Arc::new(Mutex::new(script.into()));
    let log = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&log);
    let service = service_fn(move |req: u32| {
        seen.lock().push(req);
        let answer = script
            .lock()
            .pop_front()
            .unwrap_or(Err(TestError::Transient));
        async move { answer }
    });
    (service, log)
}

const BASE: Duration = Duration::from_millis(100);
const CAP: Duration = Duration::from_secs(10);

/// Up to `attempts` attempts, un-jittered backoff 100 ms, 200 ms, ... capped at 10 s, and a
/// budget with a large floor so only the tests about the budget feel it.
fn layer(attempts: u32) -> RetryLayer<Policy, ManualClock> {
    let attempts = NonZeroU32::MIN.saturating_add(attempts.saturating_sub(1));
    RetryLayer::new(
        Policy,
        attempts,
        Backoff::new(BASE, CAP, Jitter::None),
        ManualClock::new(),
    )
    .with_budget(RetryBudget::new(Duration::from_secs(10), 100, 0.0))
}

#[tokio::test(start_paused = true)]
async fn retries_a_retryable_error_up_to_max_attempts() {
    let (inner, log) = scripted(vec![]);
    let start = Instant::now();

    let result = layer(3).layer(inner).oneshot(5).await;

    assert_eq!(result, Err(TestError::Transient));
    assert_eq!(
        *log.lock(),
        [5, 5, 5],
        "every attempt sends a copy of the request"
    );
    assert_eq!(
        start.elapsed(),
        BASE + BASE * 2,
        "backoff between the attempts"
    );
}

#[tokio::test(start_paused = true)]
async fn returns_the_first_success() {
    let (inner, log) = scripted(vec![Err(TestError::Transient), Ok(42)]);

    let result = layer(3).layer(inner).oneshot(1).await;

    assert_eq!(result, Ok(42));
    assert_eq!(log.lock().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn does_not_retry_a_non_retryable_error() {
    let (inner, log) = scripted(vec![Err(TestError::Fatal), Ok(1)]);
    let start = Instant::now();

    let result = layer(3).layer(inner).oneshot(1).await;

    assert_eq!(result, Err(TestError::Fatal));
    assert_eq!(log.lock().len(), 1);
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn honours_retry_after_up_to_the_cap() {
    let (inner, log) = scripted(vec![
        Err(TestError::Busy(Duration::from_secs(5))),
        Err(TestError::Busy(Duration::from_secs(60))),
        Ok(7),
    ]);
    let start = Instant::now();

    let result = layer(3).layer(inner).oneshot(1).await;

    assert_eq!(result, Ok(7));
    assert_eq!(log.lock().len(), 3);
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(5) + CAP,
        "60 s is cut to the 10 s cap"
    );
}

#[tokio::test(start_paused = true)]
async fn stops_retrying_when_the_budget_is_spent() {
    // No floor, half a retry earned per call: the budget, not max_attempts, is the limit.
    let budget = Arc::new(Mutex::new(RetryBudget::new(
        Duration::from_secs(10),
        0,
        0.5,
    )));
    let layer = layer(5).with_shared_budget(Arc::clone(&budget));
    let (inner, log) = scripted(vec![]);
    let mut service = layer.layer(inner);

    // First call: 0.5 retries earned, none affordable.
    assert_eq!(
        service.ready().await.unwrap().call(1).await,
        Err(TestError::Transient)
    );
    // Second call: 1 retry earned in total, so one retry.
    assert_eq!(
        service.ready().await.unwrap().call(2).await,
        Err(TestError::Transient)
    );
    // Third call: 1.5 earned, 1 spent: no retry again.
    assert_eq!(
        service.ready().await.unwrap().call(3).await,
        Err(TestError::Transient)
    );

    assert_eq!(*log.lock(), [1, 2, 2, 3]);
    assert!(
        !budget.lock().withdraw(Duration::ZERO),
        "the shared budget is spent"
    );
}

#[tokio::test(start_paused = true)]
async fn the_first_attempt_goes_to_the_service_that_was_made_ready() {
    // tower-test's mock panics when called without a successful poll_ready first, and its
    // clones start not ready: this checks both the first attempt and the retries.
    let (mock, mut requests) = tower_test::mock::pair::<u32, u32>();
    let policy = |_req: &u32, result: &Result<u32, tower::BoxError>| result.is_err();
    let layer = RetryLayer::new(
        policy,
        NonZeroU32::new(2).unwrap(),
        Backoff::new(BASE, CAP, Jitter::Full),
        ManualClock::new(),
    );
    let mut service = layer.layer(mock);

    let call = service.ready().await.unwrap().call(9);
    let upstream = async {
        requests
            .next_request()
            .await
            .unwrap()
            .1
            .send_error("transient");
        let (req, respond) = requests.next_request().await.unwrap();
        assert_eq!(req, 9);
        respond.send_response(90);
    };
    let (result, ()) = tokio::join!(call, upstream);
    assert_eq!(result.unwrap(), 90);
}
