//! A client's JSON request body, parsed only one level deep.
//!
//! The gateway reads `model` and `stream` and rewrites `model`; everything
//! else (messages, tools, `response_format`, unknown fields) passes through
//! as the exact text the client sent, never parsed into a tree. That keeps the
//! per-request cost flat in the size of a conversation.

use std::fmt;

use bytes::Bytes;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// The top-level members of a JSON object, in order, values as raw JSON text.
#[derive(Debug, Default)]
pub struct RawObject(pub Vec<(String, Box<RawValue>)>);

impl RawObject {
    /// Parses `bytes`; errors name what is wrong (`not valid JSON`, `must be a JSON object`).
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(bytes).map_err(|e| {
            format!(
                "request body is not valid UTF-8 (invalid byte at offset {})",
                e.valid_up_to()
            )
        })?;
        let trimmed = text.trim_start();
        if !trimmed.starts_with('{') {
            // Tell a non-object apart from broken JSON.
            return Err(match serde_json::from_str::<serde::de::IgnoredAny>(text) {
                Ok(_) => "request body must be a JSON object".to_owned(),
                Err(e) => format!("request body is not valid JSON: {e}"),
            });
        }
        serde_json::from_str(text).map_err(|e| format!("request body is not valid JSON: {e}"))
    }

    /// The raw value of member `key` (the last one, if the client repeated it).
    pub fn get(&self, key: &str) -> Option<&RawValue> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_ref())
    }

    /// A copy without member `key`.
    pub fn without_member(&self, key: &str) -> Self {
        Self(
            self.0
                .iter()
                .filter(|(k, _)| k != key)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    }

    /// The body as JSON with `model` set to `model` (added if absent).
    pub fn with_model(&self, model: &str) -> Bytes {
        let size: usize = self
            .0
            .iter()
            .map(|(k, v)| k.len() + v.get().len() + 4)
            .sum();
        let mut out = Vec::with_capacity(size + model.len() + 16);
        out.push(b'{');
        let mut wrote_model = false;
        for (k, v) in &self.0 {
            if k == "model" {
                if wrote_model {
                    continue;
                }
                wrote_model = true;
            }
            if out.len() > 1 {
                out.push(b',');
            }
            write_str(&mut out, k);
            out.push(b':');
            if k == "model" {
                write_str(&mut out, model);
            } else {
                out.extend_from_slice(v.get().as_bytes());
            }
        }
        if !wrote_model {
            if out.len() > 1 {
                out.push(b',');
            }
            write_str(&mut out, "model");
            out.push(b':');
            write_str(&mut out, model);
        }
        out.push(b'}');
        Bytes::from(out)
    }
}

/// What [`RawObject::ask_for_stream_usage`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamUsage {
    /// The client had asked for the usage itself: nothing changed.
    Asked,
    /// `include_usage` set inside the client's own `stream_options`.
    Merged,
    /// `stream_options` added: the member is wholly keel's.
    Added,
}

impl RawObject {
    /// Sets `stream_options.include_usage` to true, keeping other stream options; says
    /// whether it changed anything, and whether the member was the client's.
    pub fn ask_for_stream_usage(&mut self) -> StreamUsage {
        let own = self.get("stream_options");
        let changed = if own.is_some() {
            StreamUsage::Merged
        } else {
            StreamUsage::Added
        };
        let mut options = own
            .and_then(|raw| serde_json::from_str::<serde_json::Value>(raw.get()).ok())
            .filter(serde_json::Value::is_object)
            .unwrap_or_else(|| serde_json::json!({}));
        if options["include_usage"] == true {
            return StreamUsage::Asked;
        }
        options["include_usage"] = serde_json::Value::Bool(true);
        let Ok(raw) = RawValue::from_string(options.to_string()) else {
            return StreamUsage::Asked;
        };
        self.0.retain(|(k, _)| k != "stream_options");
        self.0.push(("stream_options".to_owned(), raw));
        changed
    }

    /// The body as JSON without member `key`.
    pub fn without(&self, key: &str) -> Bytes {
        let mut out = Vec::with_capacity(256);
        out.push(b'{');
        for (k, v) in self.0.iter().filter(|(k, _)| k != key) {
            if out.len() > 1 {
                out.push(b',');
            }
            write_str(&mut out, k);
            out.push(b':');
            out.extend_from_slice(v.get().as_bytes());
        }
        out.push(b'}');
        Bytes::from(out)
    }
}

/// Appends `s` as a JSON string.
fn write_str(out: &mut Vec<u8>, s: &str) {
    // Serializing a &str into a Vec cannot fail.
    if serde_json::to_writer(&mut *out, s).is_err() {
        out.extend_from_slice(b"\"\"");
    }
}

impl<'de> Deserialize<'de> for RawObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;

        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = RawObject;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawObject, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some((k, v)) = map.next_entry::<String, Box<RawValue>>()? {
                    members.push((k, v));
                }
                Ok(RawObject(members))
            }
        }

        deserializer.deserialize_map(ObjectVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_model_and_keeps_everything_else_verbatim() {
        let body = RawObject::parse(br#"{"model":"smart","messages":[{"role":"user","content":"hi \u00e9"}],"x":{"a":1.50}}"#).unwrap();
        let out = body.with_model("gpt-5");
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"model":"gpt-5","messages":[{"role":"user","content":"hi \u00e9"}],"x":{"a":1.50}}"#
        );
    }

    #[test]
    fn a_member_is_left_out_and_the_rest_kept_in_order() {
        let body = RawObject::parse(
            br#"{"model":"m","stream_options":{"include_usage":true},"stream":true}"#,
        )
        .unwrap();
        let without = body.without_member("stream_options");
        assert_eq!(
            &without.with_model("x")[..],
            br#"{"model":"x","stream":true}"#
        );
        assert!(body.get("stream_options").is_some());
    }

    #[test]
    fn adds_model_when_absent_and_keeps_one_when_repeated() {
        let body = RawObject::parse(br#"{"a":1}"#).unwrap();
        assert_eq!(&body.with_model("m")[..], br#"{"a":1,"model":"m"}"#);
        let body = RawObject::parse(br#"{"model":"x","model":"y"}"#).unwrap();
        assert_eq!(&body.with_model("m")[..], br#"{"model":"m"}"#);
        assert_eq!(body.get("model").unwrap().get(), r#""y""#);
    }

    #[test]
    fn explains_what_is_wrong() {
        assert!(
            RawObject::parse(b"[1]")
                .unwrap_err()
                .contains("JSON object")
        );
        assert!(
            RawObject::parse(b"{nope")
                .unwrap_err()
                .contains("not valid JSON")
        );
        assert!(
            RawObject::parse(b"{\"a\": \"\xff\"}")
                .unwrap_err()
                .contains("UTF-8")
        );
    }
}
