//! Breaker transitions reach the log in the order they happened.
//!
//! A transition happens inside one call (an attempt that takes a half-open trial slot, or
//! records the failure that opens the breaker), and calls finish in any order. So the
//! `breaker_*` events are not written with the call's own records: they are queued while the
//! breaker's lock is still held, and then appended in queue order, one batch at a time, by
//! whichever call holds the turn. A call waits until its transitions are stored, so they are
//! in the log before its answer.

use std::collections::VecDeque;
use std::sync::Arc;

use keel_core::NewEvent;
use keel_store::EventStore;
use parking_lot::Mutex;

/// Breaker events waiting to be appended, in the order of their transitions.
pub(crate) struct TransitionLog {
    store: Arc<dyn EventStore>,
    queued: Mutex<VecDeque<Vec<NewEvent>>>,
    /// The turn to append: one call at a time empties the queue.
    turn: tokio::sync::Mutex<()>,
}

impl TransitionLog {
    pub(crate) fn new(store: Arc<dyn EventStore>) -> Self {
        Self {
            store,
            queued: Mutex::default(),
            turn: tokio::sync::Mutex::new(()),
        }
    }

    /// Queues `events` behind every transition queued before. Call it with the breaker's
    /// lock held, so that the queue's order is the breaker's; then [`TransitionLog::flush`].
    pub(crate) fn queue(&self, events: Vec<NewEvent>) {
        self.queued.lock().push_back(events);
    }

    /// Appends the queued events in order; returns once everything queued before it was
    /// called is stored (a store failure is logged, never hidden as success).
    pub(crate) async fn flush(&self) {
        let _turn = self.turn.lock().await;
        // One batch at a time: a call dropped mid-append (its client left) loses at most
        // the append under way, which the store's writer completes anyway once submitted.
        loop {
            let Some(events) = self.queued.lock().pop_front() else {
                return;
            };
            if let Err(e) = self.store.append(events).await {
                tracing::error!(error = %e, "could not record breaker transitions");
            }
        }
    }
}
