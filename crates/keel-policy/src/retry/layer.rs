//! The retry policy as a tower layer: [`RetryLayer`] wraps a service in [`Retry`].
//!
//! See the [module docs](super) for why a retry needs a policy, an attempt limit and a budget.
//! This file is the mechanism: call, ask the policy, charge the budget, sleep, call again.
//! Sleeping uses `tokio::time::sleep` (so `tokio::time::pause()` drives it in tests); the
//! budget's time comes from the injected [`Clock`].

use std::fmt;
use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use tower::{Layer, Service, ServiceExt};

use super::RetryPolicy;
use crate::backoff::{Backoff, retry_after_delay};
use crate::budget::RetryBudget;
use crate::clock::Clock;

/// The boxed response future of [`Retry`].
pub type RetryFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'static>>;

// === impl RetryLayer ===

/// Retries calls the [`RetryPolicy`] deems retryable, with backoff, up to `max_attempts`,
/// while the shared [`RetryBudget`] allows.
///
/// Every service this layer builds shares one budget; share it wider (across routes, say) with
/// [`RetryLayer::with_shared_budget`]. When no retry is allowed, the last attempt's result is
/// returned unchanged: this layer adds no error of its own.
#[derive(Clone)]
pub struct RetryLayer<P, C> {
    policy: P,
    max_attempts: NonZeroU32,
    backoff: Backoff,
    budget: Arc<Mutex<RetryBudget>>,
    clock: C,
}

impl<P, C: Clock> RetryLayer<P, C> {
    /// At most `max_attempts` attempts per call (the first one included), waiting `backoff`
    /// between them, with a [`RetryBudget::default`] (10 s window, 10 retries/s floor, 20 % of
    /// calls) timed by `clock`.
    pub fn new(policy: P, max_attempts: NonZeroU32, backoff: Backoff, clock: C) -> Self {
        Self {
            policy,
            max_attempts,
            backoff,
            budget: Arc::new(Mutex::new(RetryBudget::default())),
            clock,
        }
    }

    /// The same layer with its own `budget` instead of the default one.
    pub fn with_budget(self, budget: RetryBudget) -> Self {
        self.with_shared_budget(Arc::new(Mutex::new(budget)))
    }

    /// The same layer charging a budget shared with other layers.
    pub fn with_shared_budget(mut self, budget: Arc<Mutex<RetryBudget>>) -> Self {
        self.budget = budget;
        self
    }

    /// The budget this layer's services deposit into and withdraw from.
    pub fn budget(&self) -> &Arc<Mutex<RetryBudget>> {
        &self.budget
    }
}

impl<P: fmt::Debug, C: fmt::Debug> fmt::Debug for RetryLayer<P, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayer")
            .field("policy", &self.policy)
            .field("max_attempts", &self.max_attempts)
            .field("backoff", &self.backoff)
            .field("budget", &self.budget)
            .field("clock", &self.clock)
            .finish()
    }
}

impl<S, P: Clone, C: Clone> Layer<S> for RetryLayer<P, C> {
    type Service = Retry<P, S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry {
            inner,
            shared: Arc::new(Shared {
                policy: self.policy.clone(),
                max_attempts: self.max_attempts,
                backoff: self.backoff.clone(),
                budget: Arc::clone(&self.budget),
                clock: self.clock.clone(),
            }),
        }
    }
}

// === impl Retry ===

/// The service built by [`RetryLayer`]: calls `S` again while the policy, the attempt limit
/// and the budget all allow. Requests must be `Clone`, since each attempt sends a copy.
pub struct Retry<P, S, C> {
    inner: S,
    shared: Arc<Shared<P, C>>,
}

/// What every call of one [`Retry`] service needs, shared instead of cloned per call.
#[derive(Debug)]
struct Shared<P, C> {
    policy: P,
    max_attempts: NonZeroU32,
    backoff: Backoff,
    budget: Arc<Mutex<RetryBudget>>,
    clock: C,
}

impl<P, S: Clone, C> Clone for Retry<P, S, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<P: fmt::Debug, S: fmt::Debug, C: fmt::Debug> fmt::Debug for Retry<P, S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("inner", &self.inner)
            .field("shared", &self.shared)
            .finish()
    }
}

impl<P, S, C, Req> Service<Req> for Retry<P, S, C>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    P: RetryPolicy<Req, S::Response, S::Error> + Send + Sync + 'static,
    C: Clock + 'static,
    Req: Clone + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = RetryFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        // The instance that was driven to readiness takes the first attempt; a clone stays.
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        Box::pin(run(Arc::clone(&self.shared), ready, req))
    }
}

/// One call: attempts until success, a non-retryable result, or no retry left.
/// `service` must be ready for the first attempt.
async fn run<P, S, C, Req>(
    shared: Arc<Shared<P, C>>,
    mut service: S,
    req: Req,
) -> Result<S::Response, S::Error>
where
    S: Service<Req>,
    P: RetryPolicy<Req, S::Response, S::Error>,
    C: Clock,
    Req: Clone,
{
    shared.budget.lock().deposit(shared.clock.now());
    // Per call, so decorrelated jitter's history belongs to this call's sequence only.
    let mut backoff = shared.backoff.clone();
    let mut attempt = 1;
    loop {
        // A block, so `result` is not held across the sleep: responses and errors need not
        // be `Send`.
        let delay = {
            let result = service.call(req.clone()).await;
            match shared.next_delay(&req, &result, attempt, &mut backoff) {
                Some(delay) => delay,
                None => return result,
            }
        };
        tokio::time::sleep(delay).await;
        attempt += 1;
        service.ready().await?;
    }
}

impl<P, C: Clock> Shared<P, C> {
    /// The wait before retrying after `attempt` (1-based) gave `result`, or `None` to stop.
    /// Charges the budget when it says yes.
    fn next_delay<Req, Res, E>(
        &self,
        req: &Req,
        result: &Result<Res, E>,
        attempt: u32,
        backoff: &mut Backoff,
    ) -> Option<Duration>
    where
        P: RetryPolicy<Req, Res, E>,
    {
        if attempt >= self.max_attempts.get() || !self.policy.retryable(req, result) {
            return None;
        }
        // Asked last, so a retry that would not happen anyway does not spend the budget.
        if !self.budget.lock().withdraw(self.clock.now()) {
            return None;
        }
        let delay = match self.policy.retry_after(result) {
            Some(after) => retry_after_delay(after, backoff.cap()),
            None => backoff.delay(attempt - 1, &mut rand::rng()),
        };
        Some(delay)
    }
}
