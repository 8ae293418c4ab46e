//! Provider kind `openai`: any OpenAI-compatible API (OpenAI, Azure OpenAI,
//! vLLM, Ollama, llama.cpp, OpenRouter, Together, Groq, ...).

use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use keel_config::ProviderSettings;
use keel_core::class::ErrorHint;
use reqwest::header::{
    AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER,
};

use super::{ChunkStream, Endpoint, Provider, ProviderReply, ProviderRequest};
use crate::error::UpstreamError;

/// An OpenAI-compatible upstream.
pub struct OpenAiProvider {
    client: reqwest::Client,
    /// Endpoint URLs with the provider's query parameters, parsed once.
    chat_url: reqwest::Url,
    embeddings_url: reqwest::Url,
}

impl OpenAiProvider {
    /// Builds the client: provider headers and the API key (as `Authorization:
    /// Bearer`) are set once here, marked sensitive so they are never logged.
    pub fn try_new(settings: &ProviderSettings, connect: Duration) -> Result<Self, String> {
        let mut headers = HeaderMap::new();
        if let Some(key) = &settings.api_key {
            let mut value =
                HeaderValue::from_str(&format!("Bearer {}", key.expose())).map_err(|_| {
                    format!(
                        "providers.{}: api key is not a valid header value",
                        settings.name
                    )
                })?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        for (name, value) in &settings.headers {
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                format!(
                    "providers.{}.headers: {name:?} is not a header name",
                    settings.name
                )
            })?;
            let mut value = HeaderValue::from_str(value).map_err(|_| {
                format!(
                    "providers.{}.headers.{name}: not a valid header value",
                    settings.name
                )
            })?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(connect)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            // keel's own policies decide retries; a provider's redirect is
            // reported, not followed with the key attached.
            .redirect(reqwest::redirect::Policy::none())
            .retry(reqwest::retry::never())
            .build()
            .map_err(|e| format!("providers.{}: cannot build HTTP client: {e}", settings.name))?;
        let url = |endpoint: Endpoint| {
            let text = format!("{}{}", settings.base_url, endpoint.path());
            reqwest::Url::parse_with_params(&text, &settings.query).map_err(|e| {
                format!(
                    "providers.{}.base_url: {text:?} is not a URL: {e}",
                    settings.name
                )
            })
        };
        Ok(Self {
            client,
            chat_url: url(Endpoint::ChatCompletions)?,
            embeddings_url: url(Endpoint::Embeddings)?,
        })
    }
}

#[async_trait]
impl Provider for OpenAiProvider {
    async fn send(&self, request: ProviderRequest) -> Result<ProviderReply, UpstreamError> {
        let url = match request.endpoint {
            Endpoint::ChatCompletions => self.chat_url.clone(),
            Endpoint::Embeddings => self.embeddings_url.clone(),
        };
        let target = request.target;
        let response = self
            .client
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .body(request.body)
            .send()
            .await
            .map_err(|e| UpstreamError::Connect {
                target: target.clone(),
                detail: transport_detail(e),
            })?;
        let status = response.status();
        if !status.is_success() {
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            let body = response.bytes().await.unwrap_or_default();
            let hint = ErrorHint::from_body(&body);
            return Err(UpstreamError::Status {
                target,
                status,
                retry_after,
                body,
                hint,
            });
        }
        if request.stream {
            return Ok(ProviderReply::Stream(sse_chunks(response, target)));
        }
        let body = response.bytes().await.map_err(|e| UpstreamError::Connect {
            target: target.clone(),
            detail: transport_detail(e),
        })?;
        Ok(ProviderReply::Json(body))
    }
}

/// `Retry-After` as seconds (HTTP dates are rare from model APIs and ignored).
fn parse_retry_after(value: &str) -> Option<Duration> {
    let secs: f64 = value.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

/// The client error without its URL: query parameters and `user:pass@` in a
/// provider's URL may hold keys, and this text reaches events and clients.
fn transport_detail(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut detail = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        source = s.source();
    }
    detail
}

/// Turns an SSE body into its `data` payloads; ends after `[DONE]`, errors on a cut.
fn sse_chunks(response: reqwest::Response, target: String) -> ChunkStream {
    let bytes = response.bytes_stream();
    let state = (bytes, SseParser::default(), target, false);
    futures::stream::unfold(state, |(mut bytes, mut parser, target, done)| async move {
        if done {
            return None;
        }
        loop {
            if let Some(event) = parser.next_data() {
                if event.as_ref() == b"[DONE]" {
                    return None;
                }
                return Some((Ok(event), (bytes, parser, target, false)));
            }
            match bytes.next().await {
                Some(Ok(chunk)) => parser.push(&chunk),
                Some(Err(e)) => {
                    let err = UpstreamError::Connect {
                        target: target.clone(),
                        detail: format!("stream broke: {}", transport_detail(e)),
                    };
                    return Some((Err(err), (bytes, parser, target, true)));
                }
                None => {
                    let err = UpstreamError::Malformed {
                        target: target.clone(),
                        detail: "stream ended without [DONE]".to_owned(),
                    };
                    return Some((Err(err), (bytes, parser, target, true)));
                }
            }
        }
    })
    .boxed()
}

/// Incremental parser of `text/event-stream`, keeping only `data` fields.
#[derive(Default)]
struct SseParser {
    buf: BytesMut,
}

impl SseParser {
    fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete event's data (multi-line data joined by `\n`), if any.
    fn next_data(&mut self) -> Option<Bytes> {
        loop {
            let (end, sep) = find_event_end(&self.buf)?;
            let block = self.buf.split_to(end + sep).freeze();
            let block = &block[..end];
            let mut data = BytesMut::new();
            for line in block.split(|b| *b == b'\n') {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if let Some(rest) = line.strip_prefix(b"data:") {
                    let rest = rest.strip_prefix(b" ").unwrap_or(rest);
                    if !data.is_empty() {
                        data.extend_from_slice(b"\n");
                    }
                    data.extend_from_slice(rest);
                }
            }
            // Comment-only or field-less blocks (keep-alives) carry no data.
            if !data.is_empty() {
                return Some(data.freeze());
            }
        }
    }
}

/// Position and length of the first blank-line separator.
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_parser_splits_across_chunks() {
        let mut p = SseParser::default();
        p.push(b"data: {\"a\"");
        assert!(p.next_data().is_none());
        p.push(b":1}\n\n: keep-alive\n\ndata: [DONE]\n\n");
        assert_eq!(p.next_data().unwrap().as_ref(), b"{\"a\":1}");
        assert_eq!(p.next_data().unwrap().as_ref(), b"[DONE]");
        assert!(p.next_data().is_none());
    }

    #[test]
    fn sse_parser_handles_crlf_and_multiline() {
        let mut p = SseParser::default();
        p.push(b"data: one\r\ndata: two\r\n\r\n");
        assert_eq!(p.next_data().unwrap().as_ref(), b"one\ntwo");
    }

    #[tokio::test]
    async fn transport_errors_do_not_carry_the_url() {
        // Nothing listens on port 9 of loopback: the connection is refused.
        let err = reqwest::Client::new()
            .get("http://user:pw-secret@127.0.0.1:9/v1/chat?key=query-secret")
            .send()
            .await
            .unwrap_err();
        let detail = transport_detail(err);
        assert!(!detail.contains("secret"), "{detail}");
        assert!(!detail.is_empty());
    }

    #[test]
    fn retry_after_seconds() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }
}
