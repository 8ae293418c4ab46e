//! The server's mutable state: per-model counters, fault queues and the last request.
//!
//! Shared by the HTTP handlers and every [`SimHandle`](crate::SimHandle) clone. The hot path
//! takes a read lock on the model map (write only the first time a model is seen) and one
//! briefly held per-model mutex; no lock is held across an await. The `*` entry is kept apart
//! behind an "armed" flag so that requests do not touch its mutex while it is empty.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::HeaderValue;
use parking_lot::{Mutex, RwLock};

use crate::fault::Fault;

/// The model name whose script and sticky fault apply to every model.
pub const WILDCARD: &str = "*";

/// Scripted and sticky faults of one model (or of `*`).
#[derive(Debug, Default)]
struct Faults {
    script: VecDeque<Arc<Fault>>,
    always: Option<Arc<Fault>>,
}

impl Faults {
    fn take(&mut self) -> Option<Arc<Fault>> {
        self.script.pop_front().or_else(|| self.always.clone())
    }

    fn is_armed(&self) -> bool {
        !self.script.is_empty() || self.always.is_some()
    }
}

/// What one model has seen and what it will do next.
#[derive(Debug, Default)]
struct ModelState {
    calls: AtomicU64,
    inner: Mutex<ModelInner>,
}

#[derive(Debug, Default)]
struct ModelInner {
    faults: Faults,
    last_body: Option<Bytes>,
    last_authorization: Option<HeaderValue>,
}

/// The simulated account's request limit, per minute (answers past it are not refused).
pub(crate) const REQUESTS_PER_MINUTE: u64 = 10_000;

/// Where an answer leaves the simulated account's request limit.
pub(crate) struct RateLimit {
    /// Requests left in the window.
    pub(crate) remaining: u64,
    /// Until the window ends.
    pub(crate) reset_in: Duration,
    /// When it ends.
    pub(crate) reset_at: SystemTime,
}

/// State shared by the server and its handles.
#[derive(Default)]
pub(crate) struct Shared {
    models: RwLock<HashMap<String, Arc<ModelState>>>,
    wildcard: Mutex<Faults>,
    wildcard_armed: AtomicBool,
    next_id: AtomicU64,
    next_request: AtomicU64,
    /// The current minute (since the epoch) and the answers given in it.
    rate_window: Mutex<(u64, u64)>,
    injector: RwLock<Option<Arc<dyn Injector>>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("models", &self.models.read().len())
            .field("injector", &self.injector.read().is_some())
            .finish_non_exhaustive()
    }
}

/// Decides faults for requests no script or sticky fault covers: a fault *policy*
/// (rates, outage windows) rather than a queue. Installed with
/// [`SimHandle::set_injector`](crate::SimHandle::set_injector).
pub trait Injector: Send + Sync + 'static {
    /// The fault for one request to `model` whose parsed JSON body is `request`, or
    /// `None` to answer normally.
    fn fault_for(&self, model: &str, request: &serde_json::Value) -> Option<Fault>;
}

// === impl Shared ===

impl Shared {
    fn model(&self, model: &str) -> Arc<ModelState> {
        if let Some(state) = self.models.read().get(model) {
            return Arc::clone(state);
        }
        Arc::clone(self.models.write().entry(model.to_owned()).or_default())
    }

    /// Counts a request for `model`, remembers its body and `Authorization` header, and
    /// returns the fault it must suffer, if any: the model's own script, then its sticky
    /// fault, then the `*` script, then the `*` sticky fault.
    pub(crate) fn admit(
        &self,
        model: &str,
        body: Bytes,
        authorization: Option<HeaderValue>,
    ) -> Option<Arc<Fault>> {
        let state = self.model(model);
        state.calls.fetch_add(1, Ordering::Relaxed);
        let own = {
            let mut inner = state.inner.lock();
            inner.last_body = Some(body);
            inner.last_authorization = authorization;
            inner.faults.take()
        };
        if own.is_some() || !self.wildcard_armed.load(Ordering::Acquire) {
            return own;
        }
        let mut wildcard = self.wildcard.lock();
        let fault = wildcard.take();
        self.wildcard_armed
            .store(wildcard.is_armed(), Ordering::Release);
        fault
    }

    /// The installed injector's fault for a request, if any.
    pub(crate) fn inject(&self, model: &str, request: &serde_json::Value) -> Option<Arc<Fault>> {
        let injector = self.injector.read().clone()?;
        injector.fault_for(model, request).map(Arc::new)
    }

    /// Installs or removes the injector.
    pub(crate) fn set_injector(&self, injector: Option<Arc<dyn Injector>>) {
        *self.injector.write() = injector;
    }

    /// A fresh number for response and tool-call ids.
    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A fresh request id, as providers give every answer (`req_sim_N`).
    pub(crate) fn next_request_id(&self) -> String {
        format!(
            "req_sim_{}",
            self.next_request.fetch_add(1, Ordering::Relaxed) + 1
        )
    }

    /// Counts an answer against the simulated account's limit of [`REQUESTS_PER_MINUTE`]
    /// (a window per wall-clock minute, as a provider counts): what is left after it, and
    /// when the window ends.
    pub(crate) fn count_answer(&self, now: SystemTime) -> RateLimit {
        let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let minute = since.as_secs() / 60;
        let used = {
            let mut window = self.rate_window.lock();
            if window.0 != minute {
                *window = (minute, 0);
            }
            window.1 += 1;
            window.1
        };
        let ends = UNIX_EPOCH + Duration::from_secs((minute + 1) * 60);
        RateLimit {
            remaining: REQUESTS_PER_MINUTE.saturating_sub(used),
            reset_in: ends.duration_since(now).unwrap_or_default(),
            reset_at: ends,
        }
    }

    /// Appends `faults` to the script of `model` (or of every model, for `*`).
    pub(crate) fn script(&self, model: &str, faults: Vec<Fault>) {
        let faults = faults.into_iter().map(Arc::new);
        if model == WILDCARD {
            let mut wildcard = self.wildcard.lock();
            wildcard.script.extend(faults);
            self.wildcard_armed
                .store(wildcard.is_armed(), Ordering::Release);
        } else {
            self.model(model).inner.lock().faults.script.extend(faults);
        }
    }

    /// Sets or clears the sticky fault of `model` (or of every model, for `*`).
    pub(crate) fn set_always(&self, model: &str, fault: Option<Fault>) {
        let fault = fault.map(Arc::new);
        if model == WILDCARD {
            let mut wildcard = self.wildcard.lock();
            wildcard.always = fault;
            self.wildcard_armed
                .store(wildcard.is_armed(), Ordering::Release);
        } else {
            self.model(model).inner.lock().faults.always = fault;
        }
    }

    /// Requests received for `model`; for `*`, the total over all models.
    pub(crate) fn calls(&self, model: &str) -> u64 {
        let models = self.models.read();
        if model == WILDCARD {
            return models
                .values()
                .map(|state| state.calls.load(Ordering::Relaxed))
                .sum();
        }
        models
            .get(model)
            .map_or(0, |state| state.calls.load(Ordering::Relaxed))
    }

    /// Requests received per model, for models that received at least one.
    pub(crate) fn all_calls(&self) -> BTreeMap<String, u64> {
        self.models
            .read()
            .iter()
            .map(|(name, state)| (name.clone(), state.calls.load(Ordering::Relaxed)))
            .filter(|(_, calls)| *calls > 0)
            .collect()
    }

    /// The `Authorization` header of the last request for `model`.
    pub(crate) fn last_authorization(&self, model: &str) -> Option<String> {
        let state = self.models.read().get(model).cloned()?;
        let inner = state.inner.lock();
        inner
            .last_authorization
            .as_ref()
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    }

    /// The body of the last request for `model`, parsed.
    pub(crate) fn last_request(&self, model: &str) -> Option<serde_json::Value> {
        let state = self.models.read().get(model).cloned()?;
        let body = state.inner.lock().last_body.clone()?;
        serde_json::from_slice(&body).ok()
    }

    /// Forgets every model: scripts, sticky faults, counters and recorded requests.
    pub(crate) fn reset(&self) {
        self.models.write().clear();
        let mut wildcard = self.wildcard.lock();
        *wildcard = Faults::default();
        self.wildcard_armed.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_entry_wins_over_wildcard_and_script_over_always() {
        let shared = Shared::default();
        shared.script(WILDCARD, vec![Fault::status(500)]);
        shared.set_always("a", Some(Fault::status(503)));
        shared.script("a", vec![Fault::status(429)]);
        let take = |model: &str| {
            shared
                .admit(model, Bytes::new(), None)
                .and_then(|f| f.status)
        };
        assert_eq!(take("a"), Some(429));
        assert_eq!(take("a"), Some(503));
        assert_eq!(take("b"), Some(500));
        assert_eq!(take("b"), None);
        shared.set_always("a", None);
        assert_eq!(take("a"), None);
        assert_eq!(shared.calls("a"), 3);
        assert_eq!(shared.calls(WILDCARD), 5);
        shared.reset();
        assert_eq!(shared.calls("a"), 0);
        assert!(shared.all_calls().is_empty());
    }
}
