//! Breaker transitions reach the log in the order they happened.
//!
//! A transition happens inside one call (an attempt that takes a half-open trial slot, or
//! records the failure that opens the breaker), and calls finish in any order. So the
//! `breaker_*` events are not written with the call's own records. With the breaker's lock
//! still held, the call counts the transition in the metrics and queues it ([`TransitionLog::note`],
//! cheap: no event is built and nothing is logged under the lock); after the lock, it waits
//! until the queue has been stored up to its ticket ([`TransitionLog::stored`]). One task at
//! a time (on the gateway's task tracker, so shutdown waits for it) drains the queue in
//! order, builds the events, logs each transition and appends them. A call that goes away
//! meanwhile (its client left) only stops waiting: its transitions are appended all the same.

use std::collections::VecDeque;
use std::sync::Arc;

use keel_core::{EventKind, NewEvent};
use keel_policy::breaker::Transition;
use keel_store::EventStore;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::metrics::{Metrics, TargetLabel, TransitionLabels};

/// Transitions of one breaker, queued together.
struct Queued {
    ticket: u64,
    /// `provider/model`, or `tool/NAME`.
    target: String,
    transitions: Vec<Transition>,
    /// Members added to each event (the node's id, the route or the tool).
    extra: Value,
}

#[derive(Default)]
struct Queue {
    last_ticket: u64,
    pending: VecDeque<Queued>,
    /// Whether a task is draining the queue.
    draining: bool,
}

struct Shared {
    store: Arc<dyn EventStore>,
    queue: Mutex<Queue>,
    /// The newest ticket stored.
    stored: watch::Sender<u64>,
}

/// The queue of breaker transitions (see the module's docs).
pub(crate) struct TransitionLog {
    shared: Arc<Shared>,
    tasks: TaskTracker,
    metrics: Arc<Metrics>,
}

impl TransitionLog {
    pub(crate) fn new(
        store: Arc<dyn EventStore>,
        tasks: TaskTracker,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                store,
                queue: Mutex::default(),
                stored: watch::Sender::new(0),
            }),
            tasks,
            metrics,
        }
    }

    /// Counts `transitions` of the breaker of `target` in the metrics and queues them behind
    /// every transition queued before; the ticket to wait for, `None` when there are none
    /// (as for almost every call). Call it with the breaker's lock held, so that the queue's
    /// order (and the state gauge) is the breaker's.
    pub(crate) fn note(
        &self,
        target: &str,
        transitions: Vec<Transition>,
        extra: impl FnOnce() -> Value,
    ) -> Option<u64> {
        let last = transitions.last()?;
        let metrics = &self.metrics;
        metrics
            .breaker_state
            .get_or_create(&TargetLabel {
                target: target.into(),
            })
            .set(last.to.gauge());
        for t in &transitions {
            metrics
                .breaker_transitions
                .get_or_create(&TransitionLabels {
                    target: target.into(),
                    to: t.to.as_str().into(),
                })
                .inc();
        }
        let mut queue = self.shared.queue.lock();
        queue.last_ticket += 1;
        let ticket = queue.last_ticket;
        queue.pending.push_back(Queued {
            ticket,
            target: target.to_owned(),
            transitions,
            extra: extra(),
        });
        Some(ticket)
    }

    /// Waits until the transitions of `ticket` (and every one before) are stored, draining
    /// the queue on a task of its own unless one already does; at once without a ticket.
    pub(crate) async fn stored(&self, ticket: Option<u64>) {
        let Some(ticket) = ticket else { return };
        let mut stored = self.shared.stored.subscribe();
        self.drain();
        // The drain marks every ticket it took as stored, failed appends included (logged).
        let _ = stored.wait_for(|done| *done >= ticket).await;
    }
}

impl TransitionLog {
    /// Starts storing what is queued, on a task of its own, unless one already does: for a
    /// transition no call waits for (made as a call's client left), which would otherwise
    /// wait in the queue for the next call that makes one.
    pub(crate) fn drain(&self) {
        let start = {
            let mut queue = self.shared.queue.lock();
            !std::mem::replace(&mut queue.draining, true)
        };
        if start {
            self.tasks.spawn(Arc::clone(&self.shared).drain());
        }
    }
}

impl Shared {
    /// Appends what is queued, in order, until the queue is empty.
    async fn drain(self: Arc<Self>) {
        loop {
            let batch: Vec<Queued> = {
                let mut queue = self.queue.lock();
                if queue.pending.is_empty() {
                    queue.draining = false;
                    return;
                }
                queue.pending.drain(..).collect()
            };
            let last = batch.last().map_or(0, |q| q.ticket);
            let events: Vec<NewEvent> = batch.iter().flat_map(events_of).collect();
            // As a call record: with the calls' durability (`call_durability`).
            if let Err(e) = self.store.append_call(events, Vec::new(), None).await {
                tracing::error!(error = %e, "could not record breaker transitions");
            }
            self.stored.send_replace(last);
        }
    }
}

/// A log line and the `breaker_*` event of each of `queued`'s transitions. Transitions
/// belong to the target, not to the task that saw them.
fn events_of(queued: &Queued) -> Vec<NewEvent> {
    let target = queued.target.as_str();
    queued
        .transitions
        .iter()
        .map(|t| {
            tracing::warn!(target_id = %target, from = t.from.as_str(), to = t.to.as_str(), "circuit breaker transition");
            let kind = match t.to.as_str() {
                "open" => EventKind::BreakerOpened,
                "half_open" => EventKind::BreakerHalfOpened,
                _ => EventKind::BreakerClosed,
            };
            let mut data = json!({
                "target": target,
                "from": t.from.as_str(),
                "to": t.to.as_str(),
                "failure_rate": t.failure_rate,
                "slow_call_rate": t.slow_call_rate,
            });
            if let (Some(data), Some(extra)) = (data.as_object_mut(), queued.extra.as_object()) {
                data.extend(extra.clone());
            }
            NewEvent::new(kind, None, data)
        })
        .collect()
}
