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

/// What a 200 body holds besides `usage`, to tell an answer from something else sent with
/// status 200 (an error object, an empty answer).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Shape {
    /// A non-null top-level `error`: its value.
    pub error: Option<serde_json::Value>,
    /// How many `choices` (`None`: no array).
    pub choices: Option<usize>,
    /// A non-null `data` (embeddings).
    pub data: bool,
}

impl Shape {
    /// The shape of a parsed document.
    pub fn of_tree(document: &serde_json::Value) -> Shape {
        let present = |key: &str| document.get(key).is_some_and(|v| !v.is_null());
        Shape {
            error: document.get("error").filter(|v| !v.is_null()).cloned(),
            choices: document
                .get("choices")
                .and_then(serde_json::Value::as_array)
                .map(Vec::len),
            data: present("data"),
        }
    }

    /// What makes a body of this shape no answer of `endpoint`, in words (`None`: it is one).
    pub fn not_an_answer(&self, endpoint: crate::provider::Endpoint) -> Option<&'static str> {
        use crate::provider::Endpoint;
        if self.error.is_some() {
            return Some("that is an error object");
        }
        match endpoint {
            Endpoint::ChatCompletions if self.choices.is_none_or(|n| n == 0) => {
                Some("without choices")
            }
            Endpoint::Embeddings if !self.data => Some("without data"),
            Endpoint::ChatCompletions | Endpoint::Embeddings => None,
        }
    }
}

/// `usage` and the [`Shape`] of an answer's text, checking the whole document on the way
/// (nothing else is kept).
pub fn read_answer(body: &[u8]) -> Result<(Option<Usage>, Shape), serde_json::Error> {
    #[derive(serde::Deserialize)]
    struct Probe {
        usage: Option<Usage>,
        error: Option<serde_json::Value>,
        choices: Option<Length>,
        data: Option<serde::de::IgnoredAny>,
    }
    let probe: Probe = serde_json::from_slice(body)?;
    let shape = Shape {
        error: probe.error,
        choices: probe.choices.and_then(|length| length.0),
        data: probe.data.is_some(),
    };
    Ok((probe.usage, shape))
}

/// Any JSON value, read without keeping it: an array's length, `None` for anything else.
struct Length(Option<usize>);

impl<'de> serde::Deserialize<'de> for Length {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
        struct Counting;
        impl<'de> Visitor<'de> for Counting {
            type Value = Length;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Length, A::Error> {
                let mut n = 0;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(Length(Some(n)))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Length, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Length(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Length, E> {
                Ok(Length(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Length, E> {
                Ok(Length(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Length, E> {
                Ok(Length(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Length, E> {
                Ok(Length(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Length, E> {
                Ok(Length(None))
            }
            fn visit_unit<E>(self) -> Result<Length, E> {
                Ok(Length(None))
            }
        }
        deserializer.deserialize_any(Counting)
    }
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
    fn the_shape_of_a_text_is_the_shape_of_its_tree() {
        use crate::provider::Endpoint::{ChatCompletions, Embeddings};
        for (text, chat, embeddings) in [
            (
                r#"{"choices":[{"index":0}],"usage":null}"#,
                None,
                Some("without data"),
            ),
            (
                r#"{"data":[[0.1]],"usage":{"prompt_tokens":1}}"#,
                Some("without choices"),
                None,
            ),
            (
                r#"{"error":{"message":"bad"}}"#,
                Some("that is an error object"),
                Some("that is an error object"),
            ),
            (
                r#"{"error":null,"choices":[1]}"#,
                None,
                Some("without data"),
            ),
            (
                r#"{"choices":[]}"#,
                Some("without choices"),
                Some("without data"),
            ),
            (
                r#"{"choices":{"0":1}}"#,
                Some("without choices"),
                Some("without data"),
            ),
            (
                r#"{"choices":"many","data":[]}"#,
                Some("without choices"),
                None,
            ),
        ] {
            let tree: serde_json::Value = serde_json::from_str(text).unwrap();
            let (usage, shape) = read_answer(text.as_bytes()).unwrap();
            assert_eq!(shape, Shape::of_tree(&tree), "{text}");
            assert_eq!(
                shape.error.is_some(),
                text.contains(r#""error":{"#),
                "{text}"
            );
            assert_eq!(usage, usage_in(&tree).unwrap(), "{text}");
            assert_eq!(shape.not_an_answer(ChatCompletions), chat, "{text}");
            assert_eq!(shape.not_an_answer(Embeddings), embeddings, "{text}");
        }
        assert!(read_answer(br#"{"choices":[1,"#).is_err());
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
