//! The circuit breakers of every node, read from the shared log.
//!
//! Breakers are per node: each node judges its own calls to a target (a node that cannot
//! reach a provider should stop calling it even when the others can), and sharing a
//! breaker would put a store round trip on every call. Their transitions are events
//! (`breaker_opened`, `breaker_half_opened`, `breaker_closed`, with the node's id), so the
//! dashboard of any node lists the latest state of each (node, target) from the log.
//! [`Breakers::refresh`] reads only the events after the last ones it saw.

use std::collections::BTreeMap;

use keel_store::{EventQuery, EventStore, StoreError};
use parking_lot::Mutex;
use serde::Serialize;

/// The kinds of a breaker's transitions.
const KINDS: [&str; 3] = ["breaker_opened", "breaker_half_opened", "breaker_closed"];

/// Events read per kind and refresh.
const PAGE: usize = 1000;

/// The latest transition of one node's breaker of one target.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Seen {
    /// The node's id (empty for events of a keel that did not record it).
    pub node: String,
    /// The target (`provider/model` or `tool/NAME`).
    pub target: String,
    /// `open`, `half_open` or `closed`.
    pub state: String,
    /// When the transition was recorded, Unix ms.
    pub at_ms: i64,
    seq: u64,
}

/// What the log said so far.
#[derive(Debug, Default)]
pub struct Breakers {
    after: [u64; 3],
    latest: BTreeMap<(String, String), Seen>,
}

impl Breakers {
    /// Reads the transitions committed since the last refresh (by any node) and returns
    /// the latest state of every (node, target) seen, by node and target.
    pub async fn refresh(
        shared: &Mutex<Breakers>,
        store: &dyn EventStore,
    ) -> Result<Vec<Seen>, StoreError> {
        let after = shared.lock().after;
        let mut read = Vec::with_capacity(KINDS.len());
        for (i, kind) in KINDS.iter().enumerate() {
            let events = store
                .events(EventQuery {
                    kind: Some((*kind).to_owned()),
                    after_seq: Some(after[i]),
                    limit: Some(PAGE),
                    ..EventQuery::default()
                })
                .await?;
            read.push((i, events));
        }
        let mut b = shared.lock();
        for (i, events) in read {
            for e in events {
                b.after[i] = b.after[i].max(e.seq);
                let text = |key: &str| e.data[key].as_str().unwrap_or_default().to_owned();
                let seen = Seen {
                    node: text("node"),
                    target: text("target"),
                    state: text("to"),
                    at_ms: e.at_ms,
                    seq: e.seq,
                };
                let key = (seen.node.clone(), seen.target.clone());
                if b.latest.get(&key).is_none_or(|s| s.seq < seen.seq) {
                    b.latest.insert(key, seen);
                }
            }
        }
        Ok(b.latest.values().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_core::{EventKind, NewEvent};
    use serde_json::json;

    fn transition(kind: EventKind, node: &str, target: &str, to: &str) -> NewEvent {
        NewEvent::new(
            kind,
            None,
            json!({"node": node, "target": target, "to": to}),
        )
    }

    fn states(seen: &[Seen]) -> Vec<(&str, &str)> {
        seen.iter()
            .map(|s| (s.node.as_str(), s.state.as_str()))
            .collect()
    }

    #[tokio::test]
    async fn the_latest_transition_of_each_node_s_breaker_wins() {
        let dir = tempfile::tempdir().unwrap();
        let store = keel_store::SqliteStore::open(
            &dir.path().join("k.db"),
            keel_store::Durability::Relaxed,
        )
        .unwrap();
        let shared = Mutex::new(Breakers::default());
        store
            .append(vec![
                transition(EventKind::BreakerOpened, "n1", "sim/a", "open"),
                transition(EventKind::BreakerOpened, "n2", "sim/a", "open"),
            ])
            .await
            .unwrap();
        let seen = Breakers::refresh(&shared, &store).await.unwrap();
        assert_eq!(states(&seen), [("n1", "open"), ("n2", "open")]);
        store
            .append(vec![
                transition(EventKind::BreakerHalfOpened, "n1", "sim/a", "half_open"),
                transition(EventKind::BreakerClosed, "n1", "sim/a", "closed"),
            ])
            .await
            .unwrap();
        let seen = Breakers::refresh(&shared, &store).await.unwrap();
        assert_eq!(states(&seen), [("n1", "closed"), ("n2", "open")]);
        // Nothing new: the same answer, from the cursor on.
        assert_eq!(Breakers::refresh(&shared, &store).await.unwrap(), seen);
    }
}
