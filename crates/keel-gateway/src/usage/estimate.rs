//! Token estimates for a chat call whose provider reported no usage: a stream that ended
//! before its usage chunk (its client left, it failed, keel's deadline cut it, or its target
//! takes no `stream_options`), or an answer without `usage`. The provider bills such a call
//! all the same, so the agent's budgets are charged an estimate instead of nothing, and the
//! `llm_call` says `usage_estimated: true`.
//!
//! The estimate is OpenAI's rule of thumb, without a tokenizer (keel does not know every
//! provider's): about four characters of ASCII text to a token, and four other characters
//! (accented letters, CJK, emoji) to three; 3 tokens more per message and 3 for the reply, as
//! OpenAI counts a chat; 765 tokens per image (a 1024×1024 image at high detail; 85 at
//! `"detail": "low"`), and nothing for other media sent inline (a data URL is no text); tool
//! definitions a token per four characters of their JSON. The answer's text is counted from
//! every chunk read from the provider, delivered to the client or not: it was generated. It
//! may count high or low: it is a rule of thumb, not the provider's tokenizer.

use keel_core::canonical::Key;
use serde::Deserialize;
use serde::de::{IgnoredAny, MapAccess, SeqAccess};

use super::{Skim, Usage, skim};
use crate::body::RawObject;

/// Tokens counted for each message, and once for the reply.
const PER_MESSAGE: u64 = 3;
/// Tokens counted for each image of a prompt (a 1024×1024 image at high detail).
const PER_IMAGE: u64 = 765;
/// Tokens counted for an image at `"detail": "low"`.
const PER_LOW_IMAGE: u64 = 85;

/// Quarters of a token in `text`: one per ASCII character, three per other character. A
/// base64 data URL (`data:image/png;base64,...`: an image, audio or video sent inline) is no
/// text.
fn quarters(text: &str) -> u64 {
    let media = text.strip_prefix("data:").is_some_and(|rest| {
        rest.split_once(";base64,")
            .is_some_and(|(kind, _)| kind.len() < 200)
    });
    if media {
        return 0;
    }
    text.bytes()
        .map(|b| match b {
            0..0x80 => 1,
            // The first byte of a character of several bytes; continuation bytes add none.
            0xC0.. => 3,
            _ => 0,
        })
        .sum()
}

/// The text of a part of a message or an answer, in quarters of a token, and the tokens of
/// its images.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Text {
    quarters: u64,
    images: u64,
}

impl std::ops::AddAssign for Text {
    fn add_assign(&mut self, other: Text) {
        self.quarters = self.quarters.saturating_add(other.quarters);
        self.images = self.images.saturating_add(other.images);
    }
}

/// An `image_url` part's value: its tokens by its `detail`.
#[derive(Default)]
struct Image(u64);

impl<'de> Skim<'de> for Image {
    fn map<A: MapAccess<'de>>(mut map: A) -> Result<Image, A::Error> {
        let mut tokens = PER_IMAGE;
        while let Some(key) = map.next_key::<Key<'de>>()? {
            if key.as_str() == "detail" {
                if map.next_value::<super::Text>()?.0.as_deref() == Some("low") {
                    tokens = PER_LOW_IMAGE;
                }
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(Image(tokens))
    }

    fn text(_: &str) -> Image {
        Image(PER_IMAGE)
    }
}

skimmed!(Image);

impl<'de> Skim<'de> for Text {
    fn map<A: MapAccess<'de>>(mut map: A) -> Result<Text, A::Error> {
        let mut text = Text::default();
        while let Some(key) = map.next_key::<Key<'de>>()? {
            match key.as_str() {
                "image_url" => {
                    let image = map.next_value::<Image>()?;
                    text.images = text.images.saturating_add(image.0);
                }
                // The message's frame, ids, and data that is not text (base64 audio, files).
                "role" | "type" | "id" | "tool_call_id" | "index" | "data" | "file_data"
                | "file_id" | "format" | "detail" => {
                    map.next_value::<IgnoredAny>()?;
                }
                _ => text += map.next_value::<Text>()?,
            }
        }
        Ok(text)
    }

    fn seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Text, A::Error> {
        let mut text = Text::default();
        while let Some(element) = seq.next_element::<Text>()? {
            text += element;
        }
        Ok(text)
    }

    fn text(v: &str) -> Text {
        Text {
            quarters: quarters(v),
            images: 0,
        }
    }
}

skimmed!(Text);

/// A request's `messages`: how many, and their text.
#[derive(Default)]
struct Messages {
    count: u64,
    text: Text,
}

impl<'de> Skim<'de> for Messages {
    fn seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Messages, A::Error> {
        let mut messages = Messages::default();
        while let Some(message) = seq.next_element::<Text>()? {
            messages.count += 1;
            messages.text += message;
        }
        Ok(messages)
    }
}

skimmed!(Messages);

/// The estimated prompt tokens of a chat request.
pub fn prompt(body: &RawObject) -> u64 {
    let messages = body
        .get("messages")
        .and_then(|raw| serde_json::from_str::<Messages>(raw.get()).ok())
        .unwrap_or_default();
    let tools: u64 = ["tools", "functions"]
        .into_iter()
        .filter_map(|key| body.get(key))
        .map(|raw| quarters(raw.get()))
        .sum();
    messages
        .text
        .quarters
        .saturating_add(tools)
        .div_ceil(4)
        .saturating_add(messages.text.images)
        .saturating_add(PER_MESSAGE.saturating_mul(messages.count + 1))
}

/// One stream chunk or answer, read for its `usage` and the text its choices carry.
#[derive(Default)]
pub struct Reading {
    /// The chunk's `usage`, when it has one.
    pub usage: Option<Usage>,
    /// Its choices' text (`delta` or `message`), in quarters of a token.
    generated: u64,
}

impl<'de> Skim<'de> for Reading {
    const WHAT: &'static str = "a chunk";

    fn map<A: MapAccess<'de>>(mut map: A) -> Result<Reading, A::Error> {
        let mut reading = Reading::default();
        while let Some(key) = map.next_key::<Key<'de>>()? {
            match key.as_str() {
                "usage" => reading.usage = map.next_value()?,
                "choices" => reading.generated = map.next_value::<Generated>()?.0,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(reading)
    }
}

skimmed!(Reading);

/// The text of every choice's `delta` (a chunk) or `message` (an answer), in quarters.
#[derive(Default)]
struct Generated(u64);

impl<'de> Skim<'de> for Generated {
    fn seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Generated, A::Error> {
        let mut total = 0u64;
        while let Some(choice) = seq.next_element::<Choice>()? {
            total = total.saturating_add(choice.0);
        }
        Ok(Generated(total))
    }
}

skimmed!(Generated);

/// One choice's text.
#[derive(Default)]
struct Choice(u64);

impl<'de> Skim<'de> for Choice {
    fn map<A: MapAccess<'de>>(mut map: A) -> Result<Choice, A::Error> {
        let mut quarters = 0u64;
        while let Some(key) = map.next_key::<Key<'de>>()? {
            if matches!(key.as_str(), "delta" | "message") {
                quarters = quarters.saturating_add(map.next_value::<Text>()?.quarters);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(Choice(quarters))
    }
}

skimmed!(Choice);

/// Reads a stream chunk's data, or a whole answer.
pub fn read(chunk: &[u8]) -> Result<Reading, serde_json::Error> {
    serde_json::from_slice(chunk)
}

/// What was generated over the chunks of a stream (or in an answer), to estimate its
/// completion tokens from when the provider reports none.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Generation(u64);

impl Generation {
    /// Adds a chunk's text.
    pub fn add(&mut self, reading: &Reading) {
        self.0 = self.0.saturating_add(reading.generated);
    }

    /// The estimated usage of a call whose prompt was estimated at `prompt` tokens and which
    /// generated this.
    pub fn usage(self, prompt: u64) -> Usage {
        let completion = self.0.div_ceil(4);
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt.saturating_add(completion),
        }
    }
}

/// The estimated usage of a chat request's whole answer that reported none.
pub fn answer(request: &RawObject, answer: &[u8]) -> Usage {
    let mut generated = Generation::default();
    if let Ok(reading) = read(answer) {
        generated.add(&reading);
    }
    generated.usage(prompt(request))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: &str) -> RawObject {
        RawObject::parse(json.as_bytes()).unwrap()
    }

    #[test]
    fn ascii_counts_a_quarter_and_other_characters_three() {
        assert_eq!(quarters(""), 0);
        assert_eq!(quarters("abcd"), 4);
        // é (2 bytes), 漢 (3 bytes), 🙂 (4 bytes): three quarters each.
        assert_eq!(quarters("é漢🙂"), 9);
        assert_eq!(quarters("data:image/png;base64,iVBORw0KGgo="), 0);
        // Text that starts like one is text.
        assert_eq!(quarters("data: 1,2,3"), 11);
    }

    #[test]
    fn a_prompt_counts_its_text_messages_images_and_tools() {
        // 40 characters of text in two messages: 10 tokens, and 3 per message and the reply.
        let two = body(
            r#"{"model":"m","messages":[
                {"role":"system","content":"0123456789012345678901234567890123456789"},
                {"role":"user","content":""}]}"#,
        );
        assert_eq!(prompt(&two), 10 + 9);
        // Parts: text counted, an image by its fixed price, its URL (a data URL) not at all.
        let parts = body(
            r#"{"messages":[{"role":"user","content":[
                {"type":"text","text":"abcdefgh"},
                {"type":"image_url","image_url":{"url":"data:image/png;base64,AAAAAAAAAAAAAAAA","detail":"high"}}]}]}"#,
        );
        assert_eq!(prompt(&parts), 2 + 765 + 6);
        // At low detail an image costs less; inline media of other kinds (a data URL) nothing.
        let low = body(
            r#"{"messages":[{"role":"user","content":[
                {"type":"image_url","image_url":{"url":"https://example.com/cat.png","detail":"low"}},
                {"type":"video_url","video_url":{"url":"data:video/mp4;base64,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}}]}]}"#,
        );
        assert_eq!(prompt(&low), 85 + 6);
        // Tool calls' names and arguments are text; ids are not.
        let calls = body(
            r#"{"messages":[{"role":"assistant","content":null,"tool_calls":[
                {"id":"call_123456789","type":"function","function":{"name":"abcd","arguments":"{\"x\":1}"}}]},
                {"role":"tool","tool_call_id":"call_123456789","content":"abcd"}]}"#,
        );
        // "abcd" + `{"x":1}` (7) + "abcd": 15 quarters, 4 tokens; two messages and the reply.
        assert_eq!(prompt(&calls), 4 + 9);
        // Tools: a token per four characters of their JSON.
        let tools = body(r#"{"messages":[],"tools":[{"a":"bcdefghijk"}]}"#);
        assert_eq!(prompt(&tools), 5 + 3);
    }

    #[test]
    fn a_chunk_gives_its_usage_and_the_text_of_its_choices() {
        let chunk = read(
            br#"{"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":"abcdefgh"}},
                {"index":1,"delta":{"tool_calls":[{"index":0,"id":"call_1","function":{"arguments":"{}"}}]}}],
                "usage":null}"#,
        )
        .unwrap();
        assert_eq!(chunk.usage, None);
        assert_eq!(chunk.generated, 10);
        let last = read(br#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#)
            .unwrap();
        assert_eq!(last.usage.map(|u| u.total()), Some(12));
        assert_eq!(last.generated, 0);
        // A whole answer: its message's text.
        let answer = read(br#"{"choices":[{"message":{"role":"assistant","content":"abcdefgh","refusal":null}}]}"#)
            .unwrap();
        assert_eq!(answer.generated, 8);
        assert!(read(b"{\"choices\":[").is_err());
    }

    #[test]
    fn a_generation_rounds_its_tokens_up() {
        let mut generated = Generation::default();
        for chunk in [r#"{"choices":[{"delta":{"content":"abcde"}}]}"#; 3] {
            generated.add(&read(chunk.as_bytes()).unwrap());
        }
        assert_eq!(
            generated.usage(20),
            Usage {
                prompt_tokens: 20,
                completion_tokens: 4,
                total_tokens: 24
            }
        );
        assert_eq!(Generation::default().usage(0).total(), 0);
    }
}
