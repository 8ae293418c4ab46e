//! Token usage as providers report it (`usage` in OpenAI answers and final stream chunks).

use serde::Deserialize;

/// Token counts from an OpenAI `usage` object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
pub struct Usage {
    /// Tokens of the prompt.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Tokens generated.
    #[serde(default)]
    pub completion_tokens: u64,
    /// Their sum, as the provider counted it.
    #[serde(default)]
    pub total_tokens: u64,
}

impl Usage {
    /// Prompt and completion tokens together (`total_tokens` when the provider gave it).
    pub fn total(&self) -> u64 {
        if self.total_tokens > 0 {
            self.total_tokens
        } else {
            self.prompt_tokens + self.completion_tokens
        }
    }
}

#[derive(serde::Deserialize)]
struct WithUsage {
    usage: Option<Usage>,
}

/// Reads `usage` from a JSON document, checking the whole document on the way
/// (other members are skipped without building a tree).
pub fn usage_of(body: &[u8]) -> Result<Option<Usage>, serde_json::Error> {
    serde_json::from_slice::<WithUsage>(body).map(|w| w.usage)
}

/// [`usage_of`] a document already parsed: the same answer for the same text.
pub fn usage_in(document: &serde_json::Value) -> Result<Option<Usage>, serde_json::Error> {
    if !document.is_object() {
        // What `usage_of` says of a document that is not an object.
        return WithUsage::deserialize(document).map(|w| w.usage);
    }
    Option::<Usage>::deserialize(&document["usage"])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_usage_and_rejects_broken_json() {
        let u = usage_of(br#"{"id":"x","choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3,"total_tokens":5}}"#).unwrap();
        assert_eq!(
            u,
            Some(Usage {
                prompt_tokens: 2,
                completion_tokens: 3,
                total_tokens: 5
            })
        );
        assert_eq!(usage_of(br#"{"id":"x"}"#).unwrap(), None);
        assert!(usage_of(br#"{"id": "x", "choices": ["#).is_err());
    }

    #[test]
    fn usage_in_a_tree_is_usage_of_its_text() {
        for text in [
            r#"{"id":"x","choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3,"total_tokens":5}}"#,
            r#"{"usage":{"prompt_tokens":7}}"#,
            r#"{"usage":null}"#,
            r#"{"id":"x"}"#,
            r#"{"usage":"many"}"#,
            r#"{"usage":{"prompt_tokens":-1}}"#,
            r#"[1, 2]"#,
            r#""text""#,
        ] {
            let tree: serde_json::Value = serde_json::from_str(text).unwrap();
            let (of_text, in_tree) = (usage_of(text.as_bytes()), usage_in(&tree));
            assert_eq!(of_text.is_ok(), in_tree.is_ok(), "{text}");
            assert_eq!(of_text.ok(), in_tree.ok(), "{text}");
        }
    }
}
