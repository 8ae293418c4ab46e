//! Token usage as providers report it (`usage` in OpenAI answers and final stream chunks).

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
}
