use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tower::{Layer, Service, ServiceExt, service_fn};

use super::*;
use crate::breaker::{BreakerSettings, Window};
use crate::clock::ManualClock;
use BreakerState::{Closed, HalfOpen, Open};

const OPEN_FOR: Duration = Duration::from_secs(10);

/// Opens once 2 calls are in the window with at least half failed; one trial when half-open.
fn breaker() -> Breaker {
    Breaker::new(BreakerSettings {
        window: Window::Count(4),
        min_calls: 2,
        failure_rate: 0.5,
        slow_call_rate: 0.5,
        slow_call: Duration::from_secs(1),
        open_for: OPEN_FOR,
        half_open_calls: 1,
    })
}

/// A service that counts its calls and fails every one.
fn failing(
    calls: Arc<AtomicUsize>,
) -> impl Service<u32, Response = u32, Error = &'static str, Future: Send + 'static> + Clone {
    service_fn(move |_req: u32| {
        calls.fetch_add(1, Ordering::SeqCst);
        async { Err::<u32, _>("boom") }
    })
}

/// The next request the mock received; fails the test instead of hanging if none comes.
async fn next_request(
    requests: &mut tower_test::mock::Handle<u32, u32>,
) -> (u32, tower_test::mock::SendResponse<u32>) {
    tokio::time::timeout(Duration::from_secs(1), requests.next_request())
        .await
        .expect("the inner service was not called")
        .expect("the mock is gone")
}

fn transitions(handle: &BreakerHandle) -> Vec<(BreakerState, BreakerState)> {
    handle
        .take_transitions()
        .into_iter()
        .map(|t| (t.from, t.to))
        .collect()
}

#[tokio::test]
async fn opens_after_failures_and_rejects_without_calling_inner() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = BreakerLayer::new(breaker(), ManualClock::new());
    let handle = layer.handle();
    let mut service = layer.layer(failing(Arc::clone(&calls)));

    for _ in 0..2 {
        let err = service.ready().await.unwrap().call(1).await.unwrap_err();
        assert!(matches!(err, BreakerError::Inner("boom")));
    }
    assert_eq!(handle.state(), Open);

    let err = service.ready().await.unwrap().call(1).await.unwrap_err();
    assert!(err.is_open());
    let BreakerError::Open(rejected) = err else {
        unreachable!()
    };
    assert_eq!(rejected.retry_in, OPEN_FOR);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the open breaker must not call the inner service"
    );
    assert_eq!(transitions(&handle), [(Closed, Open)]);
}

#[tokio::test]
async fn counts_only_what_the_classifier_calls_a_failure() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = BreakerLayer::new(breaker(), ManualClock::new())
        .classify(|result: &Result<u32, &str>| matches!(result, Err(e) if *e != "boom"));
    let handle = layer.handle();
    let mut service = layer.layer(failing(Arc::clone(&calls)));

    for _ in 0..4 {
        let _ = service.ready().await.unwrap().call(1).await;
    }
    assert_eq!(handle.state(), Closed);
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn measures_call_duration_with_the_injected_clock() {
    let clock = ManualClock::new();
    let slow_clock = clock.clone();
    // Succeeds, but the (manual) clock says every call took 2 s, above `slow_call`.
    let inner = service_fn(move |req: u32| {
        let clock = slow_clock.clone();
        async move {
            clock.advance(Duration::from_secs(2));
            Ok::<u32, &str>(req)
        }
    });
    let layer = BreakerLayer::new(breaker(), clock);
    let handle = layer.handle();
    let mut service = layer.layer(inner);

    for req in 0..2 {
        assert_eq!(service.ready().await.unwrap().call(req).await.unwrap(), req);
    }
    assert_eq!(
        handle.state(),
        Open,
        "two slow calls reach the slow-call rate"
    );
}

#[tokio::test(start_paused = true)]
async fn half_opens_after_open_for_and_closes_on_a_successful_trial() {
    let clock = ManualClock::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let hook_seen = Arc::clone(&seen);
    let layer = BreakerLayer::new(breaker(), clock.clone())
        .on_transition(move |t: &Transition| hook_seen.lock().push((t.from, t.to, t.at)));
    let handle = layer.handle();
    let (mock, mut requests) = tower_test::mock::pair::<u32, u32>();
    let mut service = layer.layer(mock);

    for _ in 0..2 {
        let call = service.ready().await.unwrap().call(1);
        next_request(&mut requests).await.1.send_error("boom");
        assert!(call.await.unwrap_err().into_inner().is_some());
    }
    assert!(
        service
            .ready()
            .await
            .unwrap()
            .call(1)
            .await
            .unwrap_err()
            .is_open()
    );

    clock.advance(OPEN_FOR);
    let call = service.ready().await.unwrap().call(7);
    let (req, respond) = next_request(&mut requests).await;
    assert_eq!(req, 7, "the first call after open_for is the trial");
    assert_eq!(handle.state(), HalfOpen);
    respond.send_response(70);
    assert_eq!(call.await.unwrap(), 70);

    assert_eq!(handle.state(), Closed);
    assert_eq!(
        *seen.lock(),
        [
            (Closed, Open, Duration::ZERO),
            (Open, HalfOpen, OPEN_FOR),
            (HalfOpen, Closed, OPEN_FOR),
        ]
    );
    assert!(
        handle.take_transitions().is_empty(),
        "the hook drains transitions"
    );
}

#[tokio::test(start_paused = true)]
async fn dropped_response_future_releases_its_half_open_slot() {
    let clock = ManualClock::new();
    let layer = BreakerLayer::new(breaker(), clock.clone());
    let handle = layer.handle();
    let (mock, mut requests) = tower_test::mock::pair::<u32, u32>();
    let mut service = layer.layer(mock);
    for _ in 0..2 {
        let call = service.ready().await.unwrap().call(1);
        next_request(&mut requests).await.1.send_error("boom");
        let _ = call.await;
    }
    clock.advance(OPEN_FOR);

    // The only trial slot is taken by a call that never answers...
    let trial = service.ready().await.unwrap().call(1);
    let _unanswered = next_request(&mut requests).await;
    let err = service.ready().await.unwrap().call(2).await.unwrap_err();
    let BreakerError::Open(rejected) = err else {
        panic!("expected the breaker to reject")
    };
    assert_eq!(rejected.retry_in, Duration::ZERO);

    // ...until its future is dropped (a client gone, a timeout), which frees the slot.
    drop(trial);
    let call = service.ready().await.unwrap().call(3);
    let (req, respond) = next_request(&mut requests).await;
    assert_eq!(req, 3);
    respond.send_response(30);
    assert_eq!(call.await.unwrap(), 30);
    assert_eq!(handle.state(), Closed);
}
