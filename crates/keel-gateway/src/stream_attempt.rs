//! A streamed answer's attempt lasts as long as its stream.
//!
//! A JSON answer's attempt is over when its body has arrived: the executor records it in the
//! target's breaker and counts it there. A stream reaches the client once its first event
//! has arrived, and its health is known only at its end, so its attempt goes along with it
//! ([`StreamAttempt`]) and is settled when the stream ends (`StreamAttempt::settle`). That
//! is resilience4j's meaning of a call: the permit is held until the call completes, and a
//! call cancelled after it produced something counts as a success.

use std::sync::Arc;
use std::time::Duration;

use keel_policy::breaker::{Outcome, Permit, Transition};

use crate::metrics::Metrics;
use crate::route::Target;

/// How a stream that reached the client ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamEnd {
    /// The upstream finished it.
    Done,
    /// The client left first; the upstream was answering, as far as keel saw.
    ClientGone,
    /// It failed after its first byte: cut, silent past `idle`, past the call's or its
    /// task's deadline (the client behind, too), or ended by the upstream's error event.
    /// `against_target` when that says something about the target's health: a cut, a
    /// silence, and an error event keel would retry before the first byte (a retryable
    /// status: 408, 429, every 5xx but 501; or none); not a deadline of keel's (a
    /// long answer is not a failing target), a content filter's or another request error's
    /// event, or one refusing keel's credentials (a 401/403; one refusing keel's account, a
    /// spent quota, counts).
    Failed {
        /// Whether the breaker counts it as a failure.
        against_target: bool,
    },
}

impl StreamEnd {
    /// `keel_requests_total`'s and `llm_call`'s outcome.
    pub(crate) fn outcome(self) -> &'static str {
        match self {
            Self::Done => "ok",
            Self::ClientGone => "client_gone",
            Self::Failed { .. } => "stream_error",
        }
    }
}

/// A stream's attempt, settled when the stream ends (see the module's docs). Its breaker
/// permit, a half-open trial slot too, stays taken until then; the slow-call check measures
/// its time to the first event. Dropped unsettled (the call went away), it gives the permit
/// back.
#[must_use = "a stream's attempt is settled when the stream ends"]
pub struct StreamAttempt {
    target: Arc<Target>,
    permit: Option<Permit>,
    /// From the attempt's start to the stream's first event.
    took: Duration,
    /// When the route's `attempt` timeout, counted from the attempt's start, ends it.
    deadline: Option<tokio::time::Instant>,
}

impl StreamAttempt {
    /// The attempt on `target` holding `permit`, whose first event came `took` after it started.
    pub(crate) fn new(target: Arc<Target>, permit: Permit, took: Duration) -> Self {
        Self {
            target,
            permit: Some(permit),
            took,
            deadline: None,
        }
    }

    /// The attempt, ended by its `attempt` timeout at `deadline` at the latest.
    pub(crate) fn until(mut self, deadline: tokio::time::Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// When the attempt's own timeout ends it, if it has one.
    pub(crate) fn deadline(&self) -> Option<tokio::time::Instant> {
        self.deadline
    }

    /// The target that answered.
    pub fn target(&self) -> &Arc<Target> {
        &self.target
    }

    /// Records `end` at `now` in the target's breaker: a stream that finished, or whose
    /// client left, succeeded; a failure counts when it is against the target, else the
    /// permit is given back. Counts the attempt in `keel_attempts_total` (`ok`, or
    /// `stream_error` for a failure). `note` gets the breaker's transitions with its lock
    /// still held ([`crate::transitions`]); what it returns (the ticket to wait for) is
    /// returned.
    pub(crate) fn settle(
        mut self,
        end: StreamEnd,
        now: Duration,
        metrics: &Metrics,
        note: impl FnOnce(&str, Vec<Transition>) -> Option<u64>,
    ) -> Option<u64> {
        // Only `settle` and `drop` take the permit, and `settle` consumes the attempt.
        let permit = self.permit.take()?;
        let (success, outcome) = match end {
            StreamEnd::Done | StreamEnd::ClientGone => (Some(true), "ok"),
            StreamEnd::Failed { against_target } => {
                (against_target.then_some(false), "stream_error")
            }
        };
        let ticket = {
            let mut breaker = self.target.breaker.lock();
            match success {
                Some(success) => breaker.record(
                    permit,
                    now,
                    Outcome {
                        success,
                        duration: self.took,
                    },
                ),
                None => breaker.release(permit),
            }
            // Noted with the lock still held: the block's value is computed before it drops.
            note(&self.target.id, breaker.take_transitions())
        };
        self.target.count_attempt(metrics, outcome);
        ticket
    }
}

impl Drop for StreamAttempt {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.target.breaker.lock().release(permit);
        }
    }
}

#[cfg(test)]
mod tests {
    use async_trait::async_trait;
    use keel_policy::breaker::{Breaker, BreakerSettings, BreakerState, Window};
    use parking_lot::Mutex;

    use super::*;
    use crate::error::UpstreamError;
    use crate::metrics::AttemptLabels;
    use crate::provider::{Provider, ProviderReply, ProviderRequest};

    struct Unused;

    #[async_trait]
    impl Provider for Unused {
        async fn send(&self, _: ProviderRequest) -> Result<ProviderReply, UpstreamError> {
            unreachable!("these tests settle attempts, they send nothing")
        }
    }

    const SLOW: Duration = Duration::from_secs(10);
    const OPEN_FOR: Duration = Duration::from_secs(1);

    /// A target whose breaker opened at 0 (two failures, a count window of 2) and whose
    /// half-open trial slot (one) is taken at `OPEN_FOR`: the trial, as a stream's attempt
    /// whose first event came after `took`.
    fn half_open_trial(took: Duration) -> (Arc<Target>, Metrics, StreamAttempt) {
        let breaker = Breaker::new(BreakerSettings {
            window: Window::Count(2),
            min_calls: 2,
            failure_rate: 0.5,
            slow_call_rate: 0.5,
            slow_call: SLOW,
            open_for: OPEN_FOR,
            half_open_calls: 1,
        });
        let metrics = Metrics::new();
        let target = Arc::new(Target {
            id: "sim/m".to_owned(),
            model: "m".to_owned(),
            provider: Arc::new(Unused),
            breaker: Arc::new(Mutex::new(breaker)),
            attempts_ok: metrics
                .attempts
                .get_or_create(&AttemptLabels {
                    target: "sim/m".into(),
                    outcome: "ok".into(),
                })
                .clone(),
            refuses_stream_options: std::sync::atomic::AtomicBool::new(false),
        });
        for _ in 0..2 {
            let mut breaker = target.breaker.lock();
            let permit = breaker.try_acquire(Duration::ZERO).unwrap();
            let failed = Outcome {
                success: false,
                duration: Duration::from_millis(1),
            };
            breaker.record(permit, Duration::ZERO, failed);
        }
        let permit = target.breaker.lock().try_acquire(OPEN_FOR).unwrap();
        target.breaker.lock().take_transitions();
        let attempt = StreamAttempt::new(Arc::clone(&target), permit, took);
        (target, metrics, attempt)
    }

    fn attempts(metrics: &Metrics, outcome: &str) -> u64 {
        metrics
            .attempts
            .get_or_create(&AttemptLabels {
                target: "sim/m".into(),
                outcome: outcome.into(),
            })
            .get()
    }

    /// Settles `attempt` with `end`; the transitions it noted.
    fn settle(attempt: StreamAttempt, end: StreamEnd, metrics: &Metrics) -> Vec<Transition> {
        let mut noted = Vec::new();
        let ticket = attempt.settle(end, OPEN_FOR, metrics, |target, transitions| {
            assert_eq!(target, "sim/m");
            noted = transitions;
            Some(7)
        });
        assert_eq!(ticket, Some(7), "the ticket is the note's");
        noted
    }

    fn state(target: &Target) -> BreakerState {
        target.breaker.lock().state()
    }

    #[test]
    fn a_stream_holds_its_half_open_slot_until_it_ends() {
        let (target, metrics, attempt) = half_open_trial(Duration::from_millis(5));
        assert!(
            target.breaker.lock().try_acquire(OPEN_FOR).is_err(),
            "a second trial while the stream runs"
        );
        let noted = settle(attempt, StreamEnd::Done, &metrics);
        assert_eq!(state(&target), BreakerState::Closed);
        assert_eq!(noted.len(), 1, "{noted:?}");
        assert_eq!(noted[0].to, BreakerState::Closed);
        assert_eq!(attempts(&metrics, "ok"), 1);
    }

    #[test]
    fn a_failure_against_the_target_opens_the_breaker_again() {
        let (target, metrics, attempt) = half_open_trial(Duration::from_millis(5));
        let noted = settle(
            attempt,
            StreamEnd::Failed {
                against_target: true,
            },
            &metrics,
        );
        assert_eq!(state(&target), BreakerState::Open);
        assert_eq!(noted[0].to, BreakerState::Open);
        assert_eq!(attempts(&metrics, "stream_error"), 1);
        assert_eq!(attempts(&metrics, "ok"), 0);
    }

    #[test]
    fn a_failure_not_against_the_target_and_a_dropped_attempt_give_the_slot_back() {
        let (target, metrics, attempt) = half_open_trial(Duration::from_millis(5));
        let noted = settle(
            attempt,
            StreamEnd::Failed {
                against_target: false,
            },
            &metrics,
        );
        assert!(noted.is_empty(), "{noted:?}");
        assert_eq!(state(&target), BreakerState::HalfOpen);
        assert_eq!(attempts(&metrics, "stream_error"), 1);
        let permit = target.breaker.lock().try_acquire(OPEN_FOR);
        let Ok(permit) = permit else {
            panic!("the trial slot was not given back");
        };
        // The call goes away with its attempt unsettled.
        drop(StreamAttempt::new(
            Arc::clone(&target),
            permit,
            Duration::ZERO,
        ));
        assert!(target.breaker.lock().try_acquire(OPEN_FOR).is_ok());
        assert_eq!(
            attempts(&metrics, "ok") + attempts(&metrics, "stream_error"),
            1
        );
    }

    #[test]
    fn a_client_that_left_is_a_success_and_the_first_event_is_what_is_timed() {
        let (target, metrics, attempt) = half_open_trial(Duration::from_millis(5));
        settle(attempt, StreamEnd::ClientGone, &metrics);
        assert_eq!(state(&target), BreakerState::Closed);
        assert_eq!(attempts(&metrics, "ok"), 1);
        // A first event later than `slow_call` is a slow call: the trial fails.
        let (target, metrics, attempt) = half_open_trial(SLOW);
        settle(attempt, StreamEnd::Done, &metrics);
        assert_eq!(state(&target), BreakerState::Open);
        assert_eq!(attempts(&metrics, "ok"), 1);
    }
}
