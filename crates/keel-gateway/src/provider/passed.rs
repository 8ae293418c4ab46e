//! The headers of a provider's answer that reach the client, under OpenAI's names.
//!
//! - The answer's id, as `x-request-id`: what the OpenAI SDKs show as `_request_id`, and
//!   what a provider's support asks for (OpenAI's `x-request-id`, Anthropic's `request-id`).
//! - keel's account's rate limits at the answering provider, as `x-ratelimit-*`: OpenAI's
//!   (and those of the OpenAI-compatible servers that copy them: Groq, vLLM behind a
//!   limiter, ...) unchanged; Anthropic's `anthropic-ratelimit-{requests,tokens}-*` under
//!   OpenAI's names, its reset times as the time left (`"12s"`), as OpenAI gives them.
//! - OpenAI's `openai-processing-ms`, the provider's own time for the answer.
//!
//! Only values that read as text and are at most 256 bytes are passed on (any
//! OpenAI-compatible server may send anything), and at most 16 headers.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue};

/// The longest value passed on, in bytes.
const MAX_VALUE: usize = 256;
/// The most headers passed on from one answer.
const MAX_HEADERS: usize = 16;

/// Anthropic's rate-limit headers and OpenAI's names for them.
const ANTHROPIC_LIMITS: [(&str, &str); 6] = [
    (
        "anthropic-ratelimit-requests-limit",
        "x-ratelimit-limit-requests",
    ),
    (
        "anthropic-ratelimit-requests-remaining",
        "x-ratelimit-remaining-requests",
    ),
    (
        "anthropic-ratelimit-requests-reset",
        "x-ratelimit-reset-requests",
    ),
    (
        "anthropic-ratelimit-tokens-limit",
        "x-ratelimit-limit-tokens",
    ),
    (
        "anthropic-ratelimit-tokens-remaining",
        "x-ratelimit-remaining-tokens",
    ),
    (
        "anthropic-ratelimit-tokens-reset",
        "x-ratelimit-reset-tokens",
    ),
];

/// Headers of one answer to pass on to the client, under the names they go out with.
#[derive(Debug, Default, Clone)]
pub struct Passed(Vec<(HeaderName, HeaderValue)>);

const REQUEST_ID: &str = "x-request-id";

impl Passed {
    /// From an OpenAI-compatible answer: `x-request-id`, `x-ratelimit-*` and
    /// `openai-processing-ms` as they are.
    pub fn openai(headers: &HeaderMap) -> Self {
        let mut passed = Self::default();
        // The id first: no number of other headers crowds it out.
        if let Some(id) = headers.get(REQUEST_ID).and_then(usable) {
            passed.push(HeaderName::from_static(REQUEST_ID), id);
        }
        for (name, value) in headers {
            let text = name.as_str();
            if (text.starts_with("x-ratelimit-") || text == "openai-processing-ms")
                && let Some(value) = usable(value)
            {
                passed.push(name.clone(), value);
            }
        }
        passed
    }

    /// From an Anthropic answer at wall-clock `now`: `request-id` and the rate limits, under
    /// OpenAI's names.
    pub fn anthropic(headers: &HeaderMap, now: SystemTime) -> Self {
        let mut passed = Self::default();
        if let Some(id) = headers.get("request-id").and_then(usable) {
            passed.push(HeaderName::from_static(REQUEST_ID), id);
        }
        for (theirs, ours) in ANTHROPIC_LIMITS {
            let Some(value) = headers.get(theirs).and_then(usable) else {
                continue;
            };
            let value = if theirs.ends_with("-reset") {
                // An RFC 3339 time; OpenAI gives the time left. A time keel cannot read is
                // left out rather than passed on in a shape no OpenAI client expects.
                let Some(left) = value
                    .to_str()
                    .ok()
                    .and_then(|at| humantime::parse_rfc3339_weak(at).ok())
                    .map(|at| at.duration_since(now).unwrap_or(Duration::ZERO))
                else {
                    continue;
                };
                match HeaderValue::from_str(&time_left(left)) {
                    Ok(value) => value,
                    Err(_) => continue,
                }
            } else {
                value
            };
            passed.push(HeaderName::from_static(ours), value);
        }
        passed
    }

    /// The answer's id, for the call's record.
    pub fn request_id(&self) -> Option<&str> {
        self.0
            .iter()
            .find(|(name, _)| name == REQUEST_ID)
            .and_then(|(_, value)| value.to_str().ok())
    }

    /// Adds the headers to `headers` (a client's answer).
    pub fn apply(self, headers: &mut HeaderMap) {
        for (name, value) in self.0 {
            headers.insert(name, value);
        }
    }

    fn push(&mut self, name: HeaderName, value: HeaderValue) {
        if self.0.len() < MAX_HEADERS {
            self.0.push((name, value));
        }
    }
}

/// `value` when it reads as text and is not absurdly long.
fn usable(value: &HeaderValue) -> Option<HeaderValue> {
    (value.len() <= MAX_VALUE && value.to_str().is_ok()).then(|| value.clone())
}

/// A duration as OpenAI prints a rate limit's reset, rounded up so that a client waiting
/// for it never asks too early: `"250ms"` under a second, else whole seconds in Go's format
/// (`"12s"`, `"6m0s"`, `"1h2m3s"`); `"0s"` for a reset already past.
fn time_left(left: Duration) -> String {
    if left.is_zero() {
        return "0s".to_owned();
    }
    let ms = left.as_nanos().div_ceil(1_000_000);
    if ms < 1_000 {
        return format!("{ms}ms");
    }
    let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn applied(passed: Passed) -> Vec<(String, String)> {
        let mut out = HeaderMap::new();
        passed.apply(&mut out);
        let mut pairs: Vec<(String, String)> = out
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        pairs.sort();
        pairs
    }

    #[test]
    fn openai_limits_id_and_processing_time_pass_as_they_are() {
        let passed = Passed::openai(&headers(&[
            ("x-request-id", "req_123"),
            ("x-ratelimit-limit-requests", "10000"),
            ("x-ratelimit-remaining-tokens", "1999870"),
            ("x-ratelimit-reset-requests", "6ms"),
            ("openai-processing-ms", "412"),
            ("openai-organization", "org-keel"),
            ("set-cookie", "__cf_bm=x"),
        ]));
        assert_eq!(passed.request_id(), Some("req_123"));
        assert_eq!(
            applied(passed),
            [
                ("openai-processing-ms", "412"),
                ("x-ratelimit-limit-requests", "10000"),
                ("x-ratelimit-remaining-tokens", "1999870"),
                ("x-ratelimit-reset-requests", "6ms"),
                ("x-request-id", "req_123"),
            ]
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
        );
    }

    #[test]
    fn values_that_are_not_text_or_too_long_stay_behind() {
        let mut map = headers(&[("x-ratelimit-limit-requests", &"9".repeat(257))]);
        map.insert(
            "x-request-id",
            HeaderValue::from_bytes(b"req_\xff").unwrap(),
        );
        map.insert(
            "x-ratelimit-remaining-requests",
            HeaderValue::from_static("12"),
        );
        let passed = Passed::openai(&map);
        assert_eq!(passed.request_id(), None);
        assert_eq!(
            applied(passed),
            [("x-ratelimit-remaining-requests".to_owned(), "12".to_owned())]
        );
    }

    #[test]
    fn at_most_sixteen_headers_pass_the_id_among_them() {
        let names: Vec<String> = (0..40).map(|i| format!("x-ratelimit-extra-{i}")).collect();
        let mut map = headers(&[("x-request-id", "req_1")]);
        for name in &names {
            map.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("1"),
            );
        }
        let passed = Passed::openai(&map);
        assert_eq!(passed.request_id(), Some("req_1"));
        assert_eq!(applied(passed).len(), MAX_HEADERS);
    }

    #[test]
    fn anthropic_limits_take_openai_names_and_resets_become_time_left() {
        let now = humantime::parse_rfc3339("2026-12-06T12:00:00Z").unwrap();
        let passed = Passed::anthropic(
            &headers(&[
                ("request-id", "req_011CS"),
                ("anthropic-ratelimit-requests-limit", "4000"),
                ("anthropic-ratelimit-requests-remaining", "3999"),
                ("anthropic-ratelimit-requests-reset", "2026-12-06T12:00:12Z"),
                ("anthropic-ratelimit-tokens-limit", "400000"),
                ("anthropic-ratelimit-tokens-remaining", "399000"),
                ("anthropic-ratelimit-tokens-reset", "2026-12-06T12:06:00Z"),
                ("anthropic-organization-id", "org"),
            ]),
            now,
        );
        assert_eq!(passed.request_id(), Some("req_011CS"));
        assert_eq!(
            applied(passed),
            [
                ("x-ratelimit-limit-requests", "4000"),
                ("x-ratelimit-limit-tokens", "400000"),
                ("x-ratelimit-remaining-requests", "3999"),
                ("x-ratelimit-remaining-tokens", "399000"),
                ("x-ratelimit-reset-requests", "12s"),
                ("x-ratelimit-reset-tokens", "6m0s"),
                ("x-request-id", "req_011CS"),
            ]
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
        );
    }

    #[test]
    fn an_anthropic_reset_in_the_past_or_unreadable() {
        let now = humantime::parse_rfc3339("2026-12-06T12:00:00Z").unwrap();
        let passed = Passed::anthropic(
            &headers(&[
                ("anthropic-ratelimit-requests-reset", "2026-12-06T11:59:59Z"),
                ("anthropic-ratelimit-tokens-reset", "soon"),
            ]),
            now,
        );
        assert_eq!(
            applied(passed),
            [("x-ratelimit-reset-requests".to_owned(), "0s".to_owned())]
        );
    }

    #[test]
    fn time_left_reads_as_openai_prints_it() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_micros(5_200), "6ms"),
            (Duration::from_millis(999), "999ms"),
            (Duration::from_micros(999_500), "1s"),
            (Duration::from_secs(1), "1s"),
            (Duration::from_millis(1_900), "2s"),
            (Duration::from_secs(59), "59s"),
            (Duration::from_millis(59_001), "1m0s"),
            (Duration::from_secs(3_723), "1h2m3s"),
        ];
        for (left, text) in cases {
            assert_eq!(time_left(left), text, "{left:?}");
        }
    }
}
