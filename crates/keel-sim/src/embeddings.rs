//! The deterministic answer to `POST /v1/embeddings`.
//!
//! Each input (a string, or a list of token ids) maps to a unit vector derived from a
//! hash of its bytes, so the same text always embeds the same way, across runs and
//! processes. `encoding_format: "base64"` and `dimensions` are honoured as OpenAI does.

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;

use crate::chat::words;

/// Vector length when the request does not ask for `dimensions`.
pub(crate) const DEFAULT_DIMENSIONS: usize = 8;

/// The largest `dimensions` the sim accepts.
const MAX_DIMENSIONS: usize = 4096;

#[derive(Serialize)]
struct List<'a> {
    object: &'static str,
    data: Vec<Embedding>,
    model: &'a str,
    usage: Usage,
}

#[derive(Serialize)]
struct Embedding {
    object: &'static str,
    index: usize,
    embedding: Vector,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Vector {
    Floats(Vec<f32>),
    Base64(String),
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: u64,
    total_tokens: u64,
}

/// The `list` body for an embeddings request, or a message for a 400.
pub(crate) fn answer(request: &Value, model: &str) -> Result<Bytes, String> {
    let inputs = inputs(request.get("input"))?;
    let dimensions = match request.get("dimensions") {
        None | Some(Value::Null) => DEFAULT_DIMENSIONS,
        Some(value) => value
            .as_u64()
            .and_then(|d| usize::try_from(d).ok())
            .filter(|d| (1..=MAX_DIMENSIONS).contains(d))
            .ok_or_else(|| format!("'dimensions' must be between 1 and {MAX_DIMENSIONS}"))?,
    };
    let base64 = request.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let mut prompt_tokens = 0;
    let data = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            prompt_tokens += input.tokens;
            let floats = vector(&input.bytes, dimensions);
            let embedding = if base64 {
                let raw: Vec<u8> = floats.iter().flat_map(|f| f.to_le_bytes()).collect();
                Vector::Base64(encode_base64(&raw))
            } else {
                Vector::Floats(floats)
            };
            Embedding {
                object: "embedding",
                index,
                embedding,
            }
        })
        .collect();
    let body = List {
        object: "list",
        data,
        model,
        usage: Usage {
            prompt_tokens,
            total_tokens: prompt_tokens,
        },
    };
    serde_json::to_vec(&body)
        .map(Bytes::from)
        .map_err(|e| e.to_string())
}

/// One input: the bytes its vector is derived from, and its token count.
struct Input {
    bytes: Vec<u8>,
    tokens: u64,
}

fn inputs(input: Option<&Value>) -> Result<Vec<Input>, String> {
    const SHAPE: &str = "'input' must be a string, an array of strings, \
                         an array of token ids, or an array of token-id arrays";
    let text = |s: &str| Input {
        bytes: s.as_bytes().to_vec(),
        tokens: words(s),
    };
    let token_ids = |ids: &[Value]| -> Result<Input, String> {
        let mut bytes = Vec::with_capacity(ids.len() * 8);
        for id in ids {
            bytes.extend_from_slice(&id.as_u64().ok_or(SHAPE)?.to_le_bytes());
        }
        let tokens = u64::try_from(ids.len()).unwrap_or(u64::MAX).max(1);
        Ok(Input { bytes, tokens })
    };
    match input {
        Some(Value::String(s)) => Ok(vec![text(s)]),
        Some(Value::Array(items)) if items.is_empty() => Err(SHAPE.to_owned()),
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => {
            Ok(vec![token_ids(items)?])
        }
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(text(s)),
                Value::Array(ids) => token_ids(ids),
                _ => Err(SHAPE.to_owned()),
            })
            .collect(),
        _ => Err(SHAPE.to_owned()),
    }
}

/// A unit vector of `dimensions` floats from FNV-1a of `bytes`, stretched by splitmix64.
pub(crate) fn vector(bytes: &[u8], dimensions: usize) -> Vec<f32> {
    let mut state = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    // The top 24 bits as a fraction in [-1, 1): exact in f32.
    let raw: Vec<f32> = (0..dimensions)
        .map(|_| {
            let unit = (next() >> 40) as f32 / (1u32 << 24) as f32;
            unit * 2.0 - 1.0
        })
        .collect();
    let norm = raw.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        raw.into_iter().map(|x| x / norm).collect()
    } else {
        raw
    }
}

fn encode_base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let b = [
            group[0],
            group.get(1).copied().unwrap_or(0),
            group.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= group.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn vectors_are_deterministic_unit_length_and_differ_by_text() {
        let a = vector(b"hello", 8);
        assert_eq!(a, vector(b"hello", 8));
        assert_ne!(a, vector(b"world", 8));
        let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }

    #[test]
    fn base64_matches_known_values() {
        assert_eq!(encode_base64(b""), "");
        assert_eq!(encode_base64(b"f"), "Zg==");
        assert_eq!(encode_base64(b"fo"), "Zm8=");
        assert_eq!(encode_base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn accepts_every_input_shape_and_rejects_others() {
        for input in [
            json!("a b"),
            json!(["a", "b"]),
            json!([1, 2, 3]),
            json!([[1, 2], [3]]),
        ] {
            assert!(answer(&json!({"input": input}), "m").is_ok(), "{input}");
        }
        for input in [json!(null), json!([]), json!({}), json!([true])] {
            assert!(answer(&json!({"input": input}), "m").is_err(), "{input}");
        }
        let body: Value =
            serde_json::from_slice(&answer(&json!({"input": "x", "dimensions": 3}), "m").unwrap())
                .unwrap();
        assert_eq!(body["data"][0]["embedding"].as_array().unwrap().len(), 3);
    }
}
