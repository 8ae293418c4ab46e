//! The circuit breaker as a tower layer: [`BreakerLayer`] wraps a service in [`BreakerService`].
//!
//! The [`Breaker`] state machine decides; this layer does the plumbing around each call. It
//! asks for a permit before calling the inner service and fails fast with
//! [`BreakerError::Open`] while the breaker is open, so a failing target gets room to recover
//! and the caller can fall back at once instead of waiting on a timeout. After the call it
//! records the outcome and its duration, measured with the injected [`Clock`] so tests control
//! what counts as slow. Which results are failures is the caller's decision ([`Classify`]):
//! a 404 from a healthy upstream should not open its circuit.
//!
//! A permit is held by a guard for the whole life of the response future: if the future is
//! dropped before it finishes (the client went away, a timeout fired), the permit is released,
//! so a half-open breaker never loses a trial slot to a cancelled call and stays stuck.
//!
//! Transitions are the caller's to report: register [`BreakerLayer::on_transition`], or drain
//! them from a [`BreakerHandle`] (not both: the callback drains them as they happen).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use tower::{Layer, Service};

use super::{Breaker, BreakerState, Outcome, Permit, Rejected, Transition};
use crate::clock::Clock;

#[cfg(test)]
mod tests;

/// The boxed response future of [`BreakerService`].
pub type BreakerFuture<T, E> =
    Pin<Box<dyn Future<Output = Result<T, BreakerError<E>>> + Send + 'static>>;

/// A callback that receives every breaker transition, for events and metrics.
type TransitionHook = Arc<dyn Fn(&Transition) + Send + Sync>;

/// Decides whether the result of a call counts as a failure for the breaker.
///
/// Implemented by [`ErrorsAsFailures`] (every `Err` fails) and by any
/// `Fn(&Result<T, E>) -> bool` closure returning `true` for failures.
pub trait Classify<T, E> {
    /// `true` if `result` should count as a failed call.
    fn is_failure(&self, result: &Result<T, E>) -> bool;
}

/// The default [`Classify`]: every `Err` is a failure, every `Ok` a success.
#[derive(Debug, Clone, Copy, Default)]
pub struct ErrorsAsFailures;

impl<T, E> Classify<T, E> for ErrorsAsFailures {
    fn is_failure(&self, result: &Result<T, E>) -> bool {
        result.is_err()
    }
}

impl<T, E, F> Classify<T, E> for F
where
    F: Fn(&Result<T, E>) -> bool,
{
    fn is_failure(&self, result: &Result<T, E>) -> bool {
        self(result)
    }
}

/// The error of a [`BreakerService`]: either the breaker refused the call, or the inner
/// service failed.
#[derive(Debug, thiserror::Error)]
pub enum BreakerError<E> {
    /// The breaker is open (or half-open with every trial slot taken); the inner service was
    /// not called. `retry_in` is the time until it lets a trial call through.
    #[error("circuit breaker is open, next trial in {:?}", .0.retry_in)]
    Open(Rejected),
    /// The inner service's own error, unchanged.
    #[error(transparent)]
    Inner(E),
}

impl<E> BreakerError<E> {
    /// `true` if the breaker refused the call without calling the inner service.
    pub fn is_open(&self) -> bool {
        matches!(self, Self::Open(_))
    }

    /// The inner service's error, or `None` if the breaker refused the call.
    pub fn into_inner(self) -> Option<E> {
        match self {
            Self::Open(_) => None,
            Self::Inner(e) => Some(e),
        }
    }
}

// === impl BreakerLayer ===

/// Skips calls while the breaker is open and records the outcome of every call it lets through.
///
/// Every service this layer builds shares one [`Breaker`] (one per target: build one layer per
/// target). `C` supplies the time; `K` classifies results (see [`Classify`]).
#[derive(Clone)]
pub struct BreakerLayer<C, K = ErrorsAsFailures> {
    breaker: Arc<Mutex<Breaker>>,
    clock: C,
    classify: K,
    on_transition: Option<TransitionHook>,
}

impl<C: Clock + Clone> BreakerLayer<C> {
    /// A layer around `breaker`, timing calls with `clock`, counting every `Err` as a failure.
    pub fn new(breaker: Breaker, clock: C) -> Self {
        Self::from_shared(Arc::new(Mutex::new(breaker)), clock)
    }

    /// A layer around a breaker that is shared with other code (or other layers).
    pub fn from_shared(breaker: Arc<Mutex<Breaker>>, clock: C) -> Self {
        Self {
            breaker,
            clock,
            classify: ErrorsAsFailures,
            on_transition: None,
        }
    }
}

impl<C, K> BreakerLayer<C, K> {
    /// The same layer with `classify` deciding which results are failures.
    pub fn classify<K2>(self, classify: K2) -> BreakerLayer<C, K2> {
        BreakerLayer {
            breaker: self.breaker,
            clock: self.clock,
            classify,
            on_transition: self.on_transition,
        }
    }

    /// Calls `hook` with every transition, right after the call that caused it, outside the
    /// breaker's lock. Transitions are then drained as they happen, so a [`BreakerHandle`]'s
    /// [`take_transitions`](BreakerHandle::take_transitions) sees none. Under concurrency two
    /// hooks may run at once, and not necessarily in transition order: use
    /// [`Transition::at`] to order them.
    pub fn on_transition(mut self, hook: impl Fn(&Transition) + Send + Sync + 'static) -> Self {
        self.on_transition = Some(Arc::new(hook));
        self
    }

    /// A handle on the shared breaker, to read its state or drain its transitions.
    pub fn handle(&self) -> BreakerHandle {
        BreakerHandle {
            breaker: Arc::clone(&self.breaker),
        }
    }
}

impl<C: fmt::Debug, K: fmt::Debug> fmt::Debug for BreakerLayer<C, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerLayer")
            .field("breaker", &self.breaker)
            .field("clock", &self.clock)
            .field("classify", &self.classify)
            .field("on_transition", &self.on_transition.is_some())
            .finish()
    }
}

impl<S, C: Clone, K: Clone> Layer<S> for BreakerLayer<C, K> {
    type Service = BreakerService<S, C, K>;

    fn layer(&self, inner: S) -> Self::Service {
        BreakerService {
            inner,
            breaker: Arc::clone(&self.breaker),
            clock: self.clock.clone(),
            classify: self.classify.clone(),
            on_transition: self.on_transition.clone(),
        }
    }
}

// === impl BreakerHandle ===

/// A view of a layer's breaker, for the code that reports its state.
#[derive(Debug, Clone)]
pub struct BreakerHandle {
    breaker: Arc<Mutex<Breaker>>,
}

impl BreakerHandle {
    /// The breaker's current state (see [`Breaker::state`]).
    pub fn state(&self) -> BreakerState {
        self.breaker.lock().state()
    }

    /// The transitions since the last drain, oldest first (see [`Breaker::take_transitions`]).
    pub fn take_transitions(&self) -> Vec<Transition> {
        self.breaker.lock().take_transitions()
    }

    /// The shared breaker itself. Hold its lock only briefly, never across an `.await`.
    pub fn breaker(&self) -> &Arc<Mutex<Breaker>> {
        &self.breaker
    }
}

// === impl BreakerService ===

/// The service built by [`BreakerLayer`]: calls `S` only when the shared breaker permits.
#[derive(Clone)]
pub struct BreakerService<S, C, K = ErrorsAsFailures> {
    inner: S,
    breaker: Arc<Mutex<Breaker>>,
    clock: C,
    classify: K,
    on_transition: Option<TransitionHook>,
}

impl<S: fmt::Debug, C: fmt::Debug, K: fmt::Debug> fmt::Debug for BreakerService<S, C, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerService")
            .field("inner", &self.inner)
            .field("breaker", &self.breaker)
            .field("clock", &self.clock)
            .field("classify", &self.classify)
            .finish_non_exhaustive()
    }
}

impl<S, C, K, Req> Service<Req> for BreakerService<S, C, K>
where
    S: Service<Req>,
    S::Future: Send + 'static,
    C: Clock + Clone + 'static,
    K: Classify<S::Response, S::Error> + Clone + Send + 'static,
{
    type Response = S::Response;
    type Error = BreakerError<S::Error>;
    type Future = BreakerFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(BreakerError::Inner)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let started = self.clock.now();
        let acquired = self.breaker.lock().try_acquire(started);
        notify(&self.breaker, self.on_transition.as_ref());
        let permit = match acquired {
            Ok(permit) => permit,
            // An async block rather than `future::ready`, which would hold the output and so
            // require responses and errors to be `Send`.
            Err(open) => return Box::pin(async move { Err(BreakerError::Open(open)) }),
        };
        // Armed before the inner call so that even a panicking or dropped call gives it back.
        let mut guard = PermitGuard {
            breaker: Arc::clone(&self.breaker),
            permit: Some(permit),
        };
        let call = self.inner.call(req);
        let clock = self.clock.clone();
        let classify = self.classify.clone();
        let on_transition = self.on_transition.clone();
        Box::pin(async move {
            let result = call.await;
            let ended = clock.now();
            let duration = ended.saturating_sub(started);
            let outcome = if classify.is_failure(&result) {
                Outcome::failure(duration)
            } else {
                Outcome::success(duration)
            };
            guard.record(ended, outcome);
            notify(&guard.breaker, on_transition.as_ref());
            result.map_err(BreakerError::Inner)
        })
    }
}

/// Hands pending transitions to the hook, if there is one; the lock is released first.
fn notify(breaker: &Mutex<Breaker>, hook: Option<&TransitionHook>) {
    let Some(hook) = hook else { return };
    let transitions = breaker.lock().take_transitions();
    for transition in &transitions {
        hook(transition);
    }
}

// === impl PermitGuard ===

/// Owns a permit until it is recorded; releases it if dropped first (cancellation).
struct PermitGuard {
    breaker: Arc<Mutex<Breaker>>,
    permit: Option<Permit>,
}

impl PermitGuard {
    fn record(&mut self, now: Duration, outcome: Outcome) {
        if let Some(permit) = self.permit.take() {
            self.breaker.lock().record(permit, now, outcome);
        }
    }
}

impl Drop for PermitGuard {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.breaker.lock().release(permit);
        }
    }
}
