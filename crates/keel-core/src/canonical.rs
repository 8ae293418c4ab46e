//! A JSON document read from its bytes without a `serde_json::Value`, and its canonical
//! text.
//!
//! The log hashes the canonical JSON text of each event's data: every object's keys
//! sorted by their UTF-8 bytes, printed compactly by serde_json (keel-store's
//! `canonical_json`). The gateway stores each model answer inside its `llm_call` event,
//! so every call used to read the answer into a `Value` (a `String` for each key and
//! string, a B-tree for each object), print it, and drop it. A [`Document`] borrows
//! every string that holds no escape from the bytes and keeps an object as one sorted
//! `Vec`; it prints with serde_json's own printers, so [`Document::canonical_text`] is
//! byte for byte what `canonical_json` gives for the `Value` of the same bytes, and reads
//! back as that `Value` (a property test holds both). An object key serde_json reserves for
//! itself ([`RESERVED_KEYS`]) is renamed, as the store renames it in any event's data.

use std::borrow::Cow;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::Number;

/// A JSON document, borrowing its unescaped strings from the text it was read from.
///
/// Objects are kept sorted by key (UTF-8 bytes); a key given twice keeps its last value,
/// as `serde_json::Value` (and the providers' parsers) read it.
#[derive(Debug, Clone, PartialEq)]
pub enum Document<'a> {
    /// `null`
    Null,
    /// `true` or `false`
    Bool(bool),
    /// A number, as serde_json reads it.
    Number(Number),
    /// A string.
    String(Cow<'a, str>),
    /// An array.
    Array(Vec<Document<'a>>),
    /// An object's members, sorted by key, each key once.
    Object(Vec<(Cow<'a, str>, Document<'a>)>),
}

impl<'a> Document<'a> {
    /// Reads `bytes`: one JSON value, with nothing but whitespace after it (the same
    /// checks and errors as `serde_json::from_slice::<Value>`). An object key serde_json
    /// reserves for itself ([`RESERVED_KEYS`]) is renamed ([`renamed_key`]).
    pub fn parse(bytes: &'a [u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The member `key` of an object; `None` for a missing member or a value that is no
    /// object.
    pub fn get(&self, key: &str) -> Option<&Document<'a>> {
        match self {
            Document::Object(members) => members
                .binary_search_by(|(k, _)| k.as_bytes().cmp(key.as_bytes()))
                .ok()
                .map(|i| &members[i].1),
            _ => None,
        }
    }

    /// The text of a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Document::String(s) => Some(s),
            _ => None,
        }
    }

    /// The elements of an array.
    pub fn as_array(&self) -> Option<&[Document<'a>]> {
        match self {
            Document::Array(elements) => Some(elements),
            _ => None,
        }
    }

    /// A number that is a non-negative integer within `u64`.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Document::Number(n) => n.as_u64(),
            _ => None,
        }
    }

    /// Whether this is `null`.
    pub fn is_null(&self) -> bool {
        matches!(self, Document::Null)
    }

    /// The canonical JSON text: sorted keys, compact, serde_json's number and string
    /// printing.
    pub fn canonical_text(&self) -> CanonicalText {
        // A document serializes infallibly to text, like a `Value`.
        CanonicalText(serde_json::to_string(self).unwrap_or_default())
    }
}

/// Whether the JSON `text` nests arrays and objects more than `limit` deep (`[]` and
/// `{"a":1}` are 1 deep, a scalar 0). Made for text already read as JSON: what is not JSON
/// gives no useful answer. A repeated key's earlier value counts, so a text may nest deeper
/// than what it reads as; canonical text (a [`CanonicalText`]) nests exactly as deep. A text with no more brackets than `limit` is only counted (most
/// are); another is scanned once, its strings skipped, no tree built.
pub fn nests_deeper_than(text: &[u8], limit: usize) -> bool {
    if text.iter().filter(|&&b| b == b'[' || b == b'{').count() <= limit {
        return false;
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &byte in text {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// The canonical JSON text of a [`Document`]; only a document makes one, so it is always
/// canonical.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalText(String);

impl CanonicalText {
    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Serialize for Document<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Document::Null => serializer.serialize_unit(),
            Document::Bool(b) => serializer.serialize_bool(*b),
            Document::Number(n) => n.serialize(serializer),
            Document::String(s) => serializer.serialize_str(s),
            Document::Array(elements) => {
                let mut seq = serializer.serialize_seq(Some(elements.len()))?;
                for element in elements {
                    seq.serialize_element(element)?;
                }
                seq.end()
            }
            Document::Object(members) => {
                let mut map = serializer.serialize_map(Some(members.len()))?;
                for (key, value) in members {
                    map.serialize_entry(key.as_ref(), value)?;
                }
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Document<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(DocumentVisitor)
    }
}

/// Object keys serde_json gives a meaning of its own when it reads a `Value` (the first with
/// the `raw_value` feature this workspace uses, the second with `arbitrary_precision`, which
/// it does not): an object whose first key is one reads as the JSON inside its string. A
/// stored text holding one would not read back as what was hashed (canonical order puts `$`
/// first), so keel stores such a key renamed ([`renamed_key`]), in a document as in the log.
pub const RESERVED_KEYS: [&str; 2] = [
    "$serde_json::private::RawValue",
    "$serde_json::private::Number",
];

/// The name a reserved key ([`RESERVED_KEYS`]) is kept under: `(renamed by keel) KEY`, with `_`
/// put in front while `taken` says another member of the object has that name.
pub fn renamed_key(reserved: &str, taken: impl Fn(&str) -> bool) -> String {
    let mut name = format!("(renamed by keel) {reserved}");
    while taken(&name) {
        name.insert(0, '_');
    }
    name
}

struct DocumentVisitor;

impl<'de> Visitor<'de> for DocumentVisitor {
    type Value = Document<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any valid JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Document<'de>, E> {
        Ok(Document::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Document<'de>, E> {
        Ok(Document::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Document<'de>, E> {
        Ok(Document::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Document<'de>, E> {
        // What `Value` does with a float: a number, or null where JSON has none.
        Ok(Number::from_f64(v).map_or(Document::Null, Document::Number))
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Document<'de>, E> {
        Ok(Document::String(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Document<'de>, E> {
        Ok(Document::String(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<Document<'de>, E> {
        Ok(Document::String(Cow::Owned(v)))
    }

    fn visit_unit<E>(self) -> Result<Document<'de>, E> {
        Ok(Document::Null)
    }

    fn visit_none<E>(self) -> Result<Document<'de>, E> {
        Ok(Document::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Document<'de>, D::Error> {
        Document::deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Document<'de>, A::Error> {
        let mut elements = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(element) = seq.next_element()? {
            elements.push(element);
        }
        Ok(Document::Array(elements))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Document<'de>, A::Error> {
        let mut members: Vec<(Cow<'de, str>, Document<'de>)> =
            Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
        while let Some(Key(key)) = map.next_key()? {
            members.push((key, map.next_value()?));
        }
        // A stable sort keeps a repeated key's values in the order given; folding each run
        // into its first element, the last value wins.
        members.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        members.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                std::mem::swap(&mut later.1, &mut kept.1);
            }
            same
        });
        if members
            .iter()
            .any(|(k, _)| RESERVED_KEYS.contains(&k.as_ref()))
        {
            for reserved in RESERVED_KEYS {
                if let Some(i) = members.iter().position(|(k, _)| k == reserved) {
                    let name = renamed_key(reserved, |n| members.iter().any(|(k, _)| k == n));
                    members[i].0 = Cow::Owned(name);
                }
            }
            members.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        }
        Ok(Document::Object(members))
    }
}

/// An object's key, borrowed from the text when it holds no escape (serde's own `Cow<str>`
/// always copies).
pub struct Key<'a>(pub Cow<'a, str>);

impl Key<'_> {
    /// The key's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    /// What the log's `canonical_json` gives for the `Value` of `text`.
    fn canonical_of_value(text: &[u8]) -> Result<String, String> {
        let mut value: Value = serde_json::from_slice(text).map_err(|e| e.to_string())?;
        value.sort_all_objects();
        Ok(serde_json::to_string(&value).unwrap())
    }

    fn canonical_of_document(text: &[u8]) -> Result<String, String> {
        Document::parse(text)
            .map(|d| d.canonical_text().as_str().to_owned())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn an_answer_prints_as_its_value_does() {
        let answer = br#"{"id":"chatcmpl-1","object":"chat.completion","created":1796590073,
            "model":"m","choices":[{"index":0,"message":{"role":"assistant",
            "content":"caf\u00e9 \"quoted\"\nline\ttab \/ \ud83d\ude00","refusal":null},
            "logprobs":null,"finish_reason":"stop"}],
            "usage":{"prompt_tokens":5,"completion_tokens":8,"total_tokens":13},
            "temperature":0.7,"big":18446744073709551616,"neg":-12,"exp":1E2,"zero":-0,"z":-0.0}"#;
        let document = canonical_of_document(answer).unwrap();
        assert_eq!(document, canonical_of_value(answer).unwrap());
        assert!(
            document.starts_with(r#"{"big":1.8446744073709552e+19,"choices":[{"finish_reason""#),
            "{document}"
        );
        assert!(document.contains(r#""content":"café \"quoted\"\nline\ttab / 😀""#));
    }

    #[test]
    fn a_repeated_key_keeps_its_last_value_as_a_value_does() {
        let text = br#"{"b":1,"a":{"x":1,"x":2},"b":[3],"a":{"y":0},"b":"last"}"#;
        let document = Document::parse(text).unwrap();
        assert_eq!(document.get("b").and_then(Document::as_str), Some("last"));
        assert_eq!(
            document.canonical_text().as_str(),
            canonical_of_value(text).unwrap()
        );
        assert_eq!(
            document.canonical_text().as_str(),
            r#"{"a":{"y":0},"b":"last"}"#
        );
    }

    #[test]
    fn what_a_value_refuses_a_document_refuses() {
        for text in [
            &b"{"[..],
            b"{\"a\":1}x",
            b"[1,]",
            b"1e400",
            b"\"\x01\"",
            b"\"\\ud800\"",
            b"",
            b"{\"a\" 1}",
        ] {
            let (document, value) = (canonical_of_document(text), canonical_of_value(text));
            assert!(
                document.is_err() && value.is_err(),
                "{text:?}: {document:?}"
            );
        }
        // The same nesting limit, at its edge, for arrays and objects.
        for depth in [126, 127, 128, 129, 200] {
            for (open, close) in [("[", "]"), ("{\"k\":", "}")] {
                let deep = format!("{}1{}", open.repeat(depth), close.repeat(depth));
                let (document, value) = (
                    canonical_of_document(deep.as_bytes()),
                    canonical_of_value(deep.as_bytes()),
                );
                assert_eq!(document.is_ok(), value.is_ok(), "{depth} {open}");
                assert_eq!(document.ok(), value.ok());
            }
        }
    }

    #[test]
    fn serde_jsons_reserved_keys_are_renamed_so_the_text_reads_back() {
        // As a `Value`, the first object reads as `[1,2]`; the others would be refused or
        // kept under a key that canonical order puts first, where it reads back differently.
        for key in RESERVED_KEYS {
            for text in [
                format!(r#"{{"{key}":"[1,2]"}}"#),
                format!(r#"{{"a":{{"{key}":"{{"}}}}"#),
                format!(r#"{{"z":1,"{key}":"1","(renamed by keel) {key}":2,"{key}":"last"}}"#),
            ] {
                let text = Document::parse(text.as_bytes()).unwrap().canonical_text();
                let read: Value = serde_json::from_str(text.as_str()).unwrap();
                assert_eq!(serde_json::to_string(&read).unwrap(), text.as_str());
                assert!(
                    !text.as_str().contains(&format!("\"{key}\"")),
                    "{}",
                    text.as_str()
                );
            }
        }
        let text = format!(
            r#"{{"z":1,"{0}":"1","(renamed by keel) {0}":2,"{0}":"last"}}"#,
            RESERVED_KEYS[0]
        );
        let document = Document::parse(text.as_bytes()).unwrap();
        let renamed = format!("(renamed by keel) {}", RESERVED_KEYS[0]);
        assert_eq!(
            document
                .get(&format!("_{renamed}"))
                .and_then(Document::as_str),
            Some("last")
        );
        assert_eq!(document.get(&renamed).and_then(Document::as_u64), Some(2));
        // A key that merely starts the same way is an ordinary key.
        let text = br#"{"$serde_json::private":1,"$x":2}"#;
        assert_eq!(canonical_of_document(text), canonical_of_value(text));
    }

    #[test]
    fn members_are_found_by_key() {
        let document =
            Document::parse(br#"{"usage":{"total_tokens":3},"model":"m","n":null}"#).unwrap();
        assert_eq!(document.get("model").and_then(Document::as_str), Some("m"));
        assert_eq!(
            document
                .get("usage")
                .and_then(|u| u.get("total_tokens"))
                .and_then(Document::as_u64),
            Some(3)
        );
        assert!(document.get("n").is_some_and(Document::is_null));
        assert!(document.get("missing").is_none());
        assert!(Document::parse(b"[1]").unwrap().get("model").is_none());
    }

    /// How deeply a tree nests: the reading [`nests_deeper_than`] must agree with.
    fn depth(value: &Value) -> usize {
        match value {
            Value::Array(elements) => 1 + elements.iter().map(depth).max().unwrap_or(0),
            Value::Object(members) => 1 + members.values().map(depth).max().unwrap_or(0),
            Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) => 0,
        }
    }

    #[test]
    fn nesting_is_counted_from_the_text_with_strings_skipped() {
        let cases: [(&[u8], usize); 6] = [
            (b"7", 0),
            (br#"{"a":1}"#, 1),
            (b"[[],[[1]],{}]", 3),
            (br#"{"[[[[":"{{{{","b":[{"c":"\"[["}]}"#, 3),
            (br#"["\\",[["]"]]]"#, 3),
            (br#"[{"k\"{":[]}]"#, 3),
        ];
        for (text, deep) in cases {
            let text_str = String::from_utf8_lossy(text);
            assert_eq!(
                depth(&serde_json::from_slice(text).unwrap()),
                deep,
                "{text_str}"
            );
            for limit in 0..5 {
                assert_eq!(
                    nests_deeper_than(text, limit),
                    deep > limit,
                    "{text_str} {limit}"
                );
            }
        }
    }

    /// Any JSON value (the floats finite, as JSON's are).
    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            any::<String>().prop_map(Value::String),
            "[a-c\"\\\\/\n\u{7f}é😀]{0,6}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec(
                    ("[a-d$\u{e9}\u{e000}\u{ffff}\u{10000}\"]{0,3}", inner),
                    0..6
                )
                .prop_map(|members| Value::Object(members.into_iter().collect())),
            ]
        })
    }

    /// `value` printed as a provider might: keys in any order, some repeated (an earlier
    /// value first), characters escaped as `\u` and four hex digits where `escape` says,
    /// spaces between tokens.
    fn messy(value: &Value, escape: &[bool], at: &mut usize, out: &mut String) {
        let flip = |at: &mut usize| {
            *at += 1;
            escape[*at % escape.len()]
        };
        match value {
            Value::String(s) => {
                out.push('"');
                for c in s.chars() {
                    if flip(at) || c == '"' || c == '\\' || c < ' ' {
                        let mut units = [0u16; 2];
                        for unit in c.encode_utf16(&mut units) {
                            out.push_str(&format!("\\u{unit:04x}"));
                        }
                    } else {
                        out.push(c);
                    }
                }
                out.push('"');
            }
            Value::Array(elements) => {
                out.push_str("[ ");
                for (i, e) in elements.iter().enumerate() {
                    if i > 0 {
                        out.push_str(" ,");
                    }
                    messy(e, escape, at, out);
                }
                out.push(']');
            }
            Value::Object(members) => {
                out.push('{');
                let mut members: Vec<_> = members.iter().collect();
                if flip(at) {
                    members.reverse();
                }
                let mut first = true;
                for (key, member) in members {
                    if !first {
                        out.push(',');
                    }
                    first = false;
                    if flip(at) {
                        // An earlier value of the same key, which the last one replaces.
                        messy(&Value::String(key.clone()), escape, at, out);
                        out.push_str(":[0],");
                    }
                    messy(&Value::String(key.clone()), escape, at, out);
                    out.push_str(" : ");
                    messy(member, escape, at, out);
                }
                out.push_str(" }");
            }
            other => out.push_str(&other.to_string()),
        }
    }

    proptest! {
        #[test]
        fn a_documents_text_is_the_canonical_json_of_its_value(
            value in json_value(),
            escape in prop::collection::vec(any::<bool>(), 1..16),
        ) {
            let plain = serde_json::to_string(&value).unwrap();
            let mut text = String::new();
            messy(&value, &escape, &mut 0, &mut text);
            for text in [plain.as_bytes(), text.as_bytes()] {
                let canonical = canonical_of_document(text);
                prop_assert_eq!(&canonical, &canonical_of_value(text));
                // What is stored reads back as itself: the hash chain's condition.
                let canonical = canonical.unwrap();
                prop_assert_eq!(canonical_of_value(canonical.as_bytes()), Ok(canonical.clone()));
                // The canonical text nests as deep as the tree; a text read into it at least as
                // deep (a repeated key's earlier value may nest deeper).
                let deep = depth(&value);
                for limit in [0, 1, 2, 3, deep.saturating_sub(1), deep] {
                    prop_assert_eq!(nests_deeper_than(canonical.as_bytes(), limit), deep > limit);
                    prop_assert!(nests_deeper_than(text, limit) || deep <= limit);
                }
            }
        }
    }
}
