//! Output validation: an answer to a `response_format: {"type": "json_schema"}` request
//! is checked against the request's schema. A mismatch is sent back to the same target
//! once, with the validation error appended to the conversation (self-correction); a
//! second mismatch falls back to the next target.
//!
//! Schemas come from clients, so they are compiled without any remote resolution: a
//! `$ref` to a URL cannot make keel fetch it.

use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::body::RawObject;

/// The schema a request's answer must match.
pub struct OutputCheck {
    /// `json_schema.name`, for messages.
    name: String,
    validator: jsonschema::Validator,
}

impl OutputCheck {
    /// The check a request asks for, if any; `Err` when its schema is not a JSON Schema.
    pub fn from_request(body: &RawObject) -> Result<Option<Self>, String> {
        let Some(format) = body.get("response_format") else {
            return Ok(None);
        };
        let Ok(format) = serde_json::from_str::<Value>(format.get()) else {
            return Ok(None);
        };
        if format["type"] != "json_schema" {
            return Ok(None);
        }
        let Some(schema) = format["json_schema"].get("schema") else {
            return Ok(None);
        };
        let validator = jsonschema::validator_for(schema).map_err(|e| {
            format!("response_format.json_schema.schema is not a valid JSON Schema: {e}")
        })?;
        let name = format["json_schema"]["name"]
            .as_str()
            .unwrap_or("response")
            .to_owned();
        Ok(Some(Self { name, validator }))
    }

    /// `Ok` when the answer's message content is JSON that matches the schema (or
    /// there is no text content to check, as with tool calls); otherwise why not,
    /// with the content.
    ///
    /// An answer cut at the client's `max_tokens` (`finish_reason` `"length"`) or by a
    /// content filter (`"content_filter"`) is not checked: it is passed on as the provider
    /// gave it, as OpenAI does (the SDK's `parse()` raises its own error for it); asking
    /// again with the same limit would only be cut again. Any other finish (`"stop"`, none,
    /// or a server's own word for it, such as `"eos"`) is checked.
    pub fn check(&self, answer: &[u8]) -> Result<(), Mismatch> {
        let Ok(answer) = serde_json::from_slice::<Value>(answer) else {
            return Ok(());
        };
        let choice = &answer["choices"][0];
        if matches!(
            choice["finish_reason"].as_str(),
            Some("length" | "content_filter")
        ) {
            return Ok(());
        }
        let Some(content) = choice["message"]["content"].as_str() else {
            return Ok(());
        };
        let instance: Value = serde_json::from_str(content).map_err(|e| Mismatch {
            content: content.to_owned(),
            error: format!("the answer is not JSON: {e}"),
        })?;
        self.validator.validate(&instance).map_err(|e| {
            let at = e.instance_path().to_string();
            Mismatch {
                content: content.to_owned(),
                error: if at.is_empty() {
                    format!("{e}")
                } else {
                    format!("at {at}: {e}")
                },
            }
        })
    }

    /// The request for a second try: the conversation plus the wrong answer and what
    /// was wrong with it, for `model`.
    pub fn correction(&self, body: &RawObject, mismatch: &Mismatch, model: &str) -> Bytes {
        let mut messages: Vec<Box<RawValue>> = body
            .get("messages")
            .and_then(|raw| serde_json::from_str(raw.get()).ok())
            .unwrap_or_default();
        let extra = [
            json!({"role": "assistant", "content": mismatch.content}),
            json!({"role": "user", "content": format!(
                "Your answer does not match the JSON schema \"{}\": {}. Answer again with only JSON that matches the schema.",
                self.name, mismatch.error
            )}),
        ];
        for message in extra {
            if let Ok(raw) = RawValue::from_string(message.to_string()) {
                messages.push(raw);
            }
        }
        let mut corrected = RawObject(body.0.clone());
        let list = serde_json::to_string(&messages).unwrap_or_else(|_| "[]".to_owned());
        if let Ok(raw) = RawValue::from_string(list) {
            corrected.0.retain(|(k, _)| k != "messages");
            corrected.0.push(("messages".to_owned(), raw));
        }
        corrected.with_model(model)
    }
}

/// An answer that does not match.
#[derive(Debug, Clone)]
pub struct Mismatch {
    /// The message content as the model wrote it.
    pub content: String,
    /// What is wrong, for the model and the log.
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> RawObject {
        let body = json!({
            "model": "smart",
            "messages": [{"role": "user", "content": "give me a user"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "user", "schema": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                "required": ["name", "age"],
            }}},
        });
        RawObject::parse(body.to_string().as_bytes()).unwrap()
    }

    fn answer(content: &str) -> Vec<u8> {
        json!({"choices": [{"message": {"role": "assistant", "content": content}}]})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn a_matching_answer_passes_and_a_wrong_one_says_where() {
        let check = OutputCheck::from_request(&request()).unwrap().unwrap();
        assert!(
            check
                .check(&answer(r#"{"name": "Ada", "age": 36}"#))
                .is_ok()
        );
        let m = check
            .check(&answer(r#"{"name": "Ada", "age": "old"}"#))
            .unwrap_err();
        assert!(m.error.contains("/age"), "{}", m.error);
        let m = check.check(&answer("Sure! Here it is")).unwrap_err();
        assert!(m.error.starts_with("the answer is not JSON"), "{}", m.error);
    }

    #[test]
    fn only_an_answer_the_model_finished_is_checked() {
        let check = OutputCheck::from_request(&request()).unwrap().unwrap();
        let with = |reason: Value| {
            json!({"choices": [{"message": {"role": "assistant", "content": r#"{"name": "A"#}, "finish_reason": reason}]})
                .to_string()
                .into_bytes()
        };
        // Cut at the client's max_tokens, or by a filter: passed on as it came.
        assert!(check.check(&with(json!("length"))).is_ok());
        assert!(check.check(&with(json!("content_filter"))).is_ok());
        // Finished, in any words, or not saying: checked.
        assert!(check.check(&with(json!("stop"))).is_err());
        assert!(check.check(&with(json!("eos"))).is_err());
        assert!(check.check(&with(Value::Null)).is_err());
    }

    #[test]
    fn the_correction_appends_the_answer_and_the_error() {
        let body = request();
        let check = OutputCheck::from_request(&body).unwrap().unwrap();
        let m = check.check(&answer(r#"{"name": "Ada"}"#)).unwrap_err();
        let corrected: Value =
            serde_json::from_slice(&check.correction(&body, &m, "gpt-x")).unwrap();
        assert_eq!(corrected["model"], "gpt-x");
        let messages = corrected["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 3);
        assert_eq!(messages[1]["content"], r#"{"name": "Ada"}"#);
        let text = messages[2]["content"].as_str().unwrap();
        assert!(text.contains("\"user\"") && text.contains("age"), "{text}");
        assert!(corrected["response_format"].is_object());
    }

    #[test]
    fn requests_without_a_schema_or_with_a_bad_one() {
        let plain = RawObject::parse(br#"{"model": "m", "messages": []}"#).unwrap();
        assert!(OutputCheck::from_request(&plain).unwrap().is_none());
        let object =
            RawObject::parse(br#"{"model": "m", "response_format": {"type": "json_object"}}"#)
                .unwrap();
        assert!(OutputCheck::from_request(&object).unwrap().is_none());
        let bad = RawObject::parse(
            br#"{"model": "m", "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 12}}}}"#,
        )
        .unwrap();
        assert!(OutputCheck::from_request(&bad).is_err());
    }
}
