//! Token usage as providers report it (`usage` in OpenAI answers and final stream chunks).

use keel_core::canonical::Key;
use keel_core::{CanonicalText, Document};
use serde::Deserialize;
use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};

/// Reads a [`Skim`] type from any JSON value as its `Deserialize`.
macro_rules! skimmed {
    ($name:ident) => {
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                skim(d)
            }
        }
    };
}

pub mod estimate;

/// Token counts from an OpenAI `usage` object. A count may also be written as a float
/// without a fraction (`12.0`), and `null` reads as 0 (a count the provider did not make),
/// as the OpenAI SDKs take them; a negative or fractional count is not a count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct Usage {
    /// Tokens of the prompt.
    #[serde(default, deserialize_with = "count")]
    pub prompt_tokens: u64,
    /// Tokens generated.
    #[serde(default, deserialize_with = "count")]
    pub completion_tokens: u64,
    /// Their sum, as the provider counted it.
    #[serde(default, deserialize_with = "count")]
    pub total_tokens: u64,
}

/// One token count of a [`Usage`].
fn count<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    struct Count;
    impl Visitor<'_> for Count {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a token count")
        }
        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<u64, E> {
            Ok(n)
        }
        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<u64, E> {
            u64::try_from(n).map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(n), &self))
        }
        fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<u64, E> {
            // Exactly an integer in u64's range: `as` cannot round or saturate it.
            if n.fract() == 0.0 && (0.0..1.8e19).contains(&n) {
                #[expect(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "checked just above: a whole number in range"
                )]
                Ok(n as u64)
            } else {
                Err(E::invalid_value(serde::de::Unexpected::Float(n), &self))
            }
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<u64, E> {
            Ok(0)
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<u64, E> {
            Ok(0)
        }
    }
    deserializer.deserialize_any(Count)
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
/// (other members are skipped without building a tree): what [`usage_in`] must give for the
/// same text.
#[cfg(test)]
fn usage_of(body: &[u8]) -> Result<Option<Usage>, serde_json::Error> {
    serde_json::from_slice::<WithUsage>(body).map(|w| w.usage)
}

/// What a 200 body holds besides `usage`, to tell an answer from something else sent with
/// status 200 (an error object, an empty answer), and what the `llm_call` event says of it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Shape {
    /// A non-null top-level `error`: its value.
    pub error: Option<serde_json::Value>,
    /// How many `choices` (`None`: no array).
    pub choices: Option<usize>,
    /// A non-null `data` (embeddings).
    pub data: bool,
    /// The answer's `model`, when a string: the model version that answered.
    pub model: Option<String>,
    /// Each choice's `finish_reason` that is a string, in order.
    pub finish_reasons: Vec<String>,
}

/// A JSON document as [`Shape`] reads it: a tree (`serde_json::Value`) or a [`Document`].
trait Node: Sized {
    fn member(&self, key: &str) -> Option<&Self>;
    fn text(&self) -> Option<&str>;
    fn elements(&self) -> Option<&[Self]>;
    fn null(&self) -> bool;
}

impl Node for serde_json::Value {
    fn member(&self, key: &str) -> Option<&Self> {
        self.get(key)
    }
    fn text(&self) -> Option<&str> {
        self.as_str()
    }
    fn elements(&self) -> Option<&[Self]> {
        self.as_array().map(Vec::as_slice)
    }
    fn null(&self) -> bool {
        self.is_null()
    }
}

impl<'a> Node for Document<'a> {
    fn member(&self, key: &str) -> Option<&Self> {
        self.get(key)
    }
    fn text(&self) -> Option<&str> {
        self.as_str()
    }
    fn elements(&self) -> Option<&[Self]> {
        self.as_array()
    }
    fn null(&self) -> bool {
        self.is_null()
    }
}

impl Shape {
    /// The shape of a parsed document.
    pub fn of_tree(document: &serde_json::Value) -> Shape {
        Shape {
            error: document.get("error").filter(|v| !v.is_null()).cloned(),
            ..Shape::of(document)
        }
    }

    /// The shape of a document read without a tree, when it holds no error object (whose
    /// value is kept as a tree).
    fn of_document(document: &Document<'_>) -> Option<Shape> {
        let error = document.get("error").is_some_and(|e| !e.is_null());
        (!error).then(|| Shape::of(document))
    }

    /// Everything of the shape but `error`.
    fn of<N: Node>(document: &N) -> Shape {
        let choices = document.member("choices").and_then(N::elements);
        Shape {
            error: None,
            choices: choices.map(<[N]>::len),
            data: document.member("data").is_some_and(|d| !d.null()),
            model: document
                .member("model")
                .and_then(N::text)
                .map(str::to_owned),
            finish_reasons: choices
                .into_iter()
                .flatten()
                .filter_map(|c| c.member("finish_reason")?.text().map(str::to_owned))
                .collect(),
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
/// (nothing else is kept). An object is read member by member: a repeated `usage`, `error`,
/// `choices` or `data` is refused, a repeated `model` read as its last value; anything else
/// is read by the same rules as a struct of those four members.
pub fn read_answer(body: &[u8]) -> Result<(Option<Usage>, Shape), serde_json::Error> {
    #[derive(serde::Deserialize)]
    struct Probe {
        usage: Option<Usage>,
        error: Option<serde_json::Value>,
        choices: Option<Choices>,
        data: Option<serde::de::IgnoredAny>,
    }
    match serde_json::from_slice::<Answer>(body)? {
        Answer::Object(usage, shape) => Ok((usage, shape)),
        Answer::Other => {
            let probe: Probe = serde_json::from_slice(body)?;
            let choices = probe.choices.unwrap_or_default();
            let shape = Shape {
                error: probe.error,
                choices: choices.count,
                data: probe.data.is_some(),
                model: None,
                finish_reasons: choices.finish_reasons,
            };
            Ok((probe.usage, shape))
        }
    }
}

/// How deeply an answer kept inside its `llm_call` may nest. Inside the event it is one level
/// deeper, and serde_json reads back at most 127 levels: an answer nested deeper would make its
/// event, and every read of the log that takes it, fail. Such an answer is kept as a blob.
pub const INLINE_DEPTH: usize = 100;

/// How a recorded JSON body is kept with its `llm_call`.
#[derive(Debug, Clone, PartialEq)]
pub enum Kept {
    /// In the event, as its canonical text.
    Text(CanonicalText),
    /// As a blob the event names by hash: nested deeper than [`INLINE_DEPTH`].
    Blob,
}

impl Kept {
    /// How `document`, read from `text`, is kept.
    pub fn of(document: &Document<'_>, text: &[u8]) -> Kept {
        // The text read nests at least as deep as the answer (a repeated key's earlier value
        // counts), its canonical text exactly as deep: most answers pass the first look.
        if !keel_core::canonical::nests_deeper_than(text, INLINE_DEPTH) {
            return Kept::Text(document.canonical_text());
        }
        let canonical = document.canonical_text();
        if keel_core::canonical::nests_deeper_than(canonical.as_str().as_bytes(), INLINE_DEPTH) {
            Kept::Blob
        } else {
            Kept::Text(canonical)
        }
    }
}

/// `usage`, the [`Shape`] and how an answer whose payload is recorded is kept ([`Kept`]),
/// from one reading of its text into a [`Document`] (no tree). An answer with an error
/// object, a `usage` that is not an object of counts, or that is no object at all, is read
/// again as a tree by [`usage_in`] and [`Shape::of_tree`], so it is judged as before.
pub fn read_recorded(body: &[u8]) -> Result<(Option<Usage>, Shape, Kept), serde_json::Error> {
    let document = Document::parse(body)?;
    let text = Kept::of(&document, body);
    if let (Some(usage), Some(shape)) =
        (usage_of_document(&document), Shape::of_document(&document))
    {
        return Ok((usage, shape, text));
    }
    let tree: serde_json::Value = serde_json::from_slice(body)?;
    Ok((usage_in(&tree)?, Shape::of_tree(&tree), text))
}

/// What [`usage_in`] reads from an object whose `usage` is missing, null or an object of
/// counts (`None`: anything else, left to `usage_in`).
fn usage_of_document(document: &Document<'_>) -> Option<Option<Usage>> {
    let Document::Object(_) = document else {
        return None;
    };
    match document.get("usage") {
        None | Some(Document::Null) => Some(None),
        Some(usage @ Document::Object(_)) => {
            let count = |key: &str| usage.get(key).map_or(Some(0), Document::as_u64);
            Some(Some(Usage {
                prompt_tokens: count("prompt_tokens")?,
                completion_tokens: count("completion_tokens")?,
                total_tokens: count("total_tokens")?,
            }))
        }
        Some(_) => None,
    }
}

/// A value read from any JSON value by kind: a kind left to the default is read and skipped,
/// giving `Default`, so each reading below states only what it keeps.
trait Skim<'de>: Default {
    /// What the value is, for serde's messages.
    const WHAT: &'static str = "any JSON value";

    /// An object.
    fn map<A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Self::default())
    }

    /// An array.
    fn seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Self::default())
    }

    /// A string.
    fn text(_: &str) -> Self {
        Self::default()
    }
}

/// The visitor of a [`Skim`].
struct Skimming<T>(std::marker::PhantomData<T>);

impl<'de, T: Skim<'de>> Visitor<'de> for Skimming<T> {
    type Value = T;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(T::WHAT)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::map(map)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<T, A::Error> {
        T::seq(seq)
    }
    fn visit_str<E>(self, v: &str) -> Result<T, E> {
        Ok(T::text(v))
    }
    fn visit_bool<E>(self, _: bool) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_i64<E>(self, _: i64) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_u64<E>(self, _: u64) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_f64<E>(self, _: f64) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_unit<E>(self) -> Result<T, E> {
        Ok(T::default())
    }
}

/// Reads a [`Skim`] from any JSON value.
fn skim<'de, T: Skim<'de>, D: serde::Deserializer<'de>>(d: D) -> Result<T, D::Error> {
    d.deserialize_any(Skimming(std::marker::PhantomData))
}

/// An answer read by [`read_answer`]: an object's usage and shape, or anything else.
#[derive(Default)]
enum Answer {
    Object(Option<Usage>, Shape),
    #[default]
    Other,
}

impl<'de> Skim<'de> for Answer {
    const WHAT: &'static str = "an answer";

    fn map<A: MapAccess<'de>>(mut map: A) -> Result<Answer, A::Error> {
        use serde::de::Error;
        let mut usage: Option<Option<Usage>> = None;
        let mut error: Option<Option<serde_json::Value>> = None;
        let mut choices: Option<Option<Choices>> = None;
        let mut data: Option<Option<IgnoredAny>> = None;
        let mut model = None;
        while let Some(key) = map.next_key::<Key<'de>>()? {
            match key.as_str() {
                "usage" if usage.is_some() => return Err(A::Error::duplicate_field("usage")),
                "usage" => usage = Some(map.next_value()?),
                "error" if error.is_some() => return Err(A::Error::duplicate_field("error")),
                "error" => error = Some(map.next_value()?),
                "choices" if choices.is_some() => {
                    return Err(A::Error::duplicate_field("choices"));
                }
                "choices" => choices = Some(map.next_value()?),
                "data" if data.is_some() => return Err(A::Error::duplicate_field("data")),
                "data" => data = Some(map.next_value()?),
                "model" => model = map.next_value::<Text>()?.0,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let choices = choices.flatten().unwrap_or_default();
        let shape = Shape {
            error: error.flatten(),
            choices: choices.count,
            data: data.flatten().is_some(),
            model,
            finish_reasons: choices.finish_reasons,
        };
        Ok(Answer::Object(usage.flatten(), shape))
    }
}

skimmed!(Answer);

/// `choices`, read without keeping it: an array's length (`None` for anything else) and
/// its elements' `finish_reason`s that are strings.
#[derive(Default)]
struct Choices {
    count: Option<usize>,
    finish_reasons: Vec<String>,
}

impl<'de> Skim<'de> for Choices {
    fn seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Choices, A::Error> {
        let (mut count, mut finish_reasons) = (0, Vec::new());
        while let Some(choice) = seq.next_element::<Choice>()? {
            count += 1;
            finish_reasons.extend(choice.0);
        }
        Ok(Choices {
            count: Some(count),
            finish_reasons,
        })
    }
}

skimmed!(Choices);

/// One element of `choices`: its `finish_reason` when it is an object whose last
/// `finish_reason` is a string.
#[derive(Default)]
struct Choice(Option<String>);

impl<'de> Skim<'de> for Choice {
    fn map<A: MapAccess<'de>>(mut map: A) -> Result<Choice, A::Error> {
        let mut reason = None;
        while let Some(key) = map.next_key::<Key<'de>>()? {
            if key.as_str() == "finish_reason" {
                reason = map.next_value::<Text>()?.0;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(Choice(reason))
    }
}

skimmed!(Choice);

/// Any JSON value, kept only when it is a string.
#[derive(Default)]
struct Text(Option<String>);

impl Skim<'_> for Text {
    fn text(v: &str) -> Text {
        Text(Some(v.to_owned()))
    }
}

skimmed!(Text);

/// `usage` of a document already parsed: what reading it from the document's text gives
/// (a test holds the two readings to one answer).
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
            (
                r#"{"model":"m-1","choices":[{"finish_reason":"stop"},{"index":1},7,{"finish_reason":null},{"finish_reason":"length","finish_reason":"tool_calls"}],"usage":{"total_tokens":4}}"#,
                None,
                Some("without data"),
            ),
            (
                r#"{"model":{"name":"m"},"choices":[{"finish_reason":["stop"]}]}"#,
                None,
                Some("without data"),
            ),
            (
                r#"{"model":"first","model":"last","data":[{}]}"#,
                Some("without choices"),
                None,
            ),
        ] {
            let tree: serde_json::Value = serde_json::from_str(text).unwrap();
            let (usage, shape) = read_answer(text.as_bytes()).unwrap();
            assert_eq!(shape, Shape::of_tree(&tree), "{text}");
            let (recorded_usage, recorded_shape, canonical) =
                read_recorded(text.as_bytes()).unwrap();
            assert_eq!((recorded_usage, &recorded_shape), (usage, &shape), "{text}");
            assert_eq!(
                canonical,
                Kept::Text(
                    keel_core::Document::parse(text.as_bytes())
                        .unwrap()
                        .canonical_text()
                )
            );
            let Kept::Text(canonical) = canonical else {
                unreachable!()
            };
            assert_eq!(
                canonical.as_str(),
                keel_store::chain::canonical_json(&tree),
                "{text}"
            );
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
    fn an_answers_model_and_finish_reasons_are_read_with_its_shape() {
        let text = br#"{"id":"c","model":"gpt-x-2026","choices":[{"index":0,"finish_reason":"length"},{"index":1,"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
        let (usage, shape) = read_answer(text).unwrap();
        assert_eq!(shape.model.as_deref(), Some("gpt-x-2026"));
        assert_eq!(shape.finish_reasons, ["length", "stop"]);
        assert_eq!(shape.choices, Some(2));
        assert_eq!(usage.map(|u| u.total()), Some(7));
        let (recorded_usage, recorded_shape, _) = read_recorded(text).unwrap();
        assert_eq!((recorded_usage, recorded_shape), (usage, shape));
    }

    #[test]
    fn an_answer_nested_too_deep_for_its_event_is_kept_as_a_blob() {
        let nested = |depth: usize| {
            format!(
                r#"{{"model":"m","choices":[{{"finish_reason":"stop"}}],"x":{}1{}}}"#,
                "[".repeat(depth - 1),
                "]".repeat(depth - 1)
            )
        };
        let (usage, shape, kept) = read_recorded(nested(INLINE_DEPTH).as_bytes()).unwrap();
        assert!(matches!(kept, Kept::Text(_)));
        assert_eq!((usage, shape.model.as_deref()), (None, Some("m")));
        let (_, shape, kept) = read_recorded(nested(INLINE_DEPTH + 1).as_bytes()).unwrap();
        assert_eq!(kept, Kept::Blob);
        assert_eq!(shape.finish_reasons, ["stop"]);
        // Kept in its event, the deepest answer still reads back.
        let Kept::Text(text) = read_recorded(nested(INLINE_DEPTH).as_bytes()).unwrap().2 else {
            unreachable!()
        };
        let event = format!(r#"{{"data":{{"response":{}}}}}"#, text.as_str());
        assert!(serde_json::from_str::<serde_json::Value>(&event).is_ok());
    }

    #[test]
    fn a_recorded_answer_is_judged_as_its_tree() {
        // Usage and error objects of every odd kind take the tree's reading, errors included.
        for text in [
            r#"{"choices":[{}],"usage":{"prompt_tokens":2.5}}"#,
            r#"{"choices":[{}],"usage":{"prompt_tokens":-1}}"#,
            r#"{"choices":[{}],"usage":{"prompt_tokens":null}}"#,
            r#"{"choices":[{}],"usage":[1,2,3]}"#,
            r#"{"choices":[{}],"usage":"many"}"#,
            r#"{"choices":[{}],"usage":{"prompt_tokens":1,"extra":{"a":1}}}"#,
            r#"{"choices":[{}],"usage":{"prompt_tokens":1},"usage":{"total_tokens":9}}"#,
            r#"{"error":{"message":"overloaded","code":529},"choices":[]}"#,
            r#"{"error":null,"choices":[{"finish_reason":"stop"}]}"#,
            r#"[1, 2]"#,
            r#""text""#,
            r#"null"#,
        ] {
            let tree: serde_json::Value = serde_json::from_str(text).unwrap();
            let of_tree = usage_in(&tree).map(|usage| (usage, Shape::of_tree(&tree)));
            let recorded = read_recorded(text.as_bytes()).map(|(usage, shape, kept)| {
                let Kept::Text(canonical) = kept else {
                    panic!("{text} is kept in its event")
                };
                assert_eq!(
                    canonical.as_str(),
                    keel_store::chain::canonical_json(&tree),
                    "{text}"
                );
                (usage, shape)
            });
            match (&of_tree, &recorded) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{text}"),
                (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "{text}"),
                _ => panic!("{text}: the tree read {of_tree:?}, the record {recorded:?}"),
            }
        }
        assert!(read_recorded(br#"{"choices":[1,"#).is_err());
    }

    #[test]
    fn a_count_may_be_null_or_a_whole_float_but_not_a_fraction_or_negative() {
        let every_reading = |text: &str| {
            let tree: serde_json::Value = serde_json::from_str(text).unwrap();
            [
                usage_of(text.as_bytes()).map_err(|e| e.to_string()),
                usage_in(&tree).map_err(|e| e.to_string()),
                read_answer(text.as_bytes())
                    .map(|(usage, _)| usage)
                    .map_err(|e| e.to_string()),
                read_recorded(text.as_bytes())
                    .map(|(usage, ..)| usage)
                    .map_err(|e| e.to_string()),
            ]
        };
        let counted = Some(Usage {
            prompt_tokens: 12,
            completion_tokens: 0,
            total_tokens: 12,
        });
        let text = r#"{"choices":[{}],"usage":{"prompt_tokens":12.0,"completion_tokens":null,"total_tokens":12}}"#;
        for reading in every_reading(text) {
            assert_eq!(reading, Ok(counted), "{text}");
        }
        for text in [
            r#"{"choices":[{}],"usage":{"prompt_tokens":2.5}}"#,
            r#"{"choices":[{}],"usage":{"prompt_tokens":-1}}"#,
            r#"{"choices":[{}],"usage":{"prompt_tokens":"12"}}"#,
        ] {
            for reading in every_reading(text) {
                assert!(reading.is_err(), "{text}: {reading:?}");
            }
        }
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
