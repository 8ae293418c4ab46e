//! What of a model call's request and response the log keeps, content-addressed.
//!
//! A chat request's messages are stored one blob per message, linked into a
//! chain of *conversation nodes* (`{"prev": node, "message": hash}`), so the
//! conversation prefix an agent resends with every call is stored once: call
//! n adds only its new messages and their nodes. The `llm_call` event names
//! the last node (`request.conversation`), the other request members
//! (`request.params`) and the answer (`response`), each by SHA-256.
//!
//! Messages are hashed as the exact text the client sent; SDKs serialize the
//! same message the same way, so resent messages deduplicate.

use bytes::Bytes;
use keel_store::Payload;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::body::RawObject;

/// A request's payloads and the summary the `llm_call` event carries.
#[derive(Debug, Default)]
pub struct Recorded {
    /// `{"conversation", "messages", "params"}` for the event.
    pub summary: Value,
    /// Blobs to store with the event, each hashed once.
    pub blobs: Vec<Payload>,
}

/// Splits a request body into content-addressed payloads.
pub fn request(body: &RawObject) -> Recorded {
    let mut blobs = Vec::new();
    let mut conversation: Option<String> = None;
    let mut count = 0usize;
    let messages = body
        .get("messages")
        .and_then(|raw| serde_json::from_str::<Vec<&RawValue>>(raw.get()).ok())
        .unwrap_or_default();
    for message in messages {
        let message = Payload::new(Bytes::copy_from_slice(message.get().as_bytes()));
        let message_hash = message.hash();
        // `{"prev": .., "message": ..}` in this order, written directly: both
        // members are hex hashes (or null), nothing to escape. The text is hashed,
        // so it never changes.
        let mut node = String::with_capacity(160);
        match &conversation {
            Some(prev) => {
                node.push_str(r#"{"prev":""#);
                node.push_str(prev);
                node.push_str(r#"","message":""#);
            }
            None => node.push_str(r#"{"prev":null,"message":""#),
        }
        node.push_str(message_hash);
        node.push_str(r#""}"#);
        let node = Payload::new(Bytes::from(node));
        conversation = Some(node.hash().to_owned());
        blobs.push(message);
        blobs.push(node);
        count += 1;
    }
    let params = Payload::new(body.without("messages"));
    let params_hash = params.hash().to_owned();
    blobs.push(params);
    // In key order: the map is built in one pass.
    let summary = Map::from_iter([
        ("conversation".to_owned(), conversation.into()),
        ("messages".to_owned(), count.into()),
        ("params".to_owned(), params_hash.into()),
    ]);
    Recorded {
        summary: Value::Object(summary),
        blobs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_store::blob_hash;
    use serde_json::json;

    fn body(n: usize) -> RawObject {
        let messages: Vec<Value> = (0..n)
            .map(|i| json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": format!("turn {i}")}))
            .collect();
        let text = json!({"model": "smart", "temperature": 0.2, "messages": messages}).to_string();
        RawObject::parse(text.as_bytes()).unwrap()
    }

    #[test]
    fn nodes_are_the_json_text_of_prev_and_message() {
        let recorded = request(&body(2));
        let first_message = recorded.blobs[0].hash().to_owned();
        let first_node = recorded.blobs[1].bytes();
        // The stored text, byte for byte: `prev` first, as every node keel ever wrote.
        let expected = format!(r#"{{"prev":null,"message":"{first_message}"}}"#);
        assert_eq!(first_node.as_ref(), expected.as_bytes());
        let second_message = recorded.blobs[2].hash().to_owned();
        let expected = format!(
            r#"{{"prev":"{}","message":"{second_message}"}}"#,
            blob_hash(first_node)
        );
        assert_eq!(recorded.blobs[3].bytes().as_ref(), expected.as_bytes());
    }

    #[test]
    fn a_resent_prefix_yields_the_same_blobs() {
        let first = request(&body(3));
        let second = request(&body(5));
        // Every blob of the shorter conversation is among the longer one's.
        for blob in &first.blobs {
            assert!(second.blobs.contains(blob));
        }
        assert_eq!(second.summary["messages"], 5);
        assert_eq!(first.summary["params"], second.summary["params"]);
        assert_ne!(
            first.summary["conversation"],
            second.summary["conversation"]
        );
    }

    #[test]
    fn the_chain_leads_back_to_every_message() {
        let rec = request(&body(2));
        let by_hash: std::collections::HashMap<String, &Bytes> = rec
            .blobs
            .iter()
            .map(|b| (b.hash().to_owned(), b.bytes()))
            .collect();
        let mut node = rec.summary["conversation"].as_str().map(str::to_owned);
        let mut contents = Vec::new();
        while let Some(h) = node {
            let n: Value = serde_json::from_slice(by_hash[&h]).unwrap();
            let message: Value =
                serde_json::from_slice(by_hash[n["message"].as_str().unwrap()]).unwrap();
            contents.push(message["content"].as_str().unwrap().to_owned());
            node = n["prev"].as_str().map(str::to_owned);
        }
        assert_eq!(contents, ["turn 1", "turn 0"]);
    }
}
