//! Provider kind `openai`: any OpenAI-compatible API (OpenAI, Azure OpenAI,
//! vLLM, Ollama, llama.cpp, OpenRouter, Together, Groq, ...).

use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use keel_config::ProviderSettings;
use keel_core::class::ErrorHint;

use super::{ChunkStream, Endpoint, Provider, ProviderReply, ProviderRequest};
use crate::error::UpstreamError;

/// The HTTP client: hyper's pooled client over rustls (HTTP/1.1 and HTTP/2), without
/// redirects or retries of its own: keel's policies decide those.
type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// An OpenAI-compatible upstream.
pub struct OpenAiProvider {
    client: HttpClient,
    /// Headers every request carries: the provider's and `Authorization` (marked
    /// sensitive, so they are never logged).
    headers: HeaderMap,
    /// Endpoint URIs with the provider's query parameters, parsed once.
    chat_uri: Uri,
    embeddings_uri: Uri,
}

impl OpenAiProvider {
    /// Builds the client: provider headers and the API key (as `Authorization:
    /// Bearer`) are set once here, marked sensitive so they are never logged.
    pub fn try_new(settings: &ProviderSettings, connect: Duration) -> Result<Self, String> {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
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
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(connect));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(TokioTimer::new())
            .build(https);
        let uri = |endpoint: Endpoint| {
            let text = format!("{}{}", settings.base_url, endpoint.path());
            let url = url::Url::parse_with_params(&text, &settings.query).map_err(|e| {
                format!(
                    "providers.{}.base_url: {text:?} is not a URL: {e}",
                    settings.name
                )
            })?;
            Uri::try_from(url.as_str()).map_err(|e| {
                format!(
                    "providers.{}.base_url: {text:?} is not a URI: {e}",
                    settings.name
                )
            })
        };
        Ok(Self {
            client,
            headers,
            chat_uri: uri(Endpoint::ChatCompletions)?,
            embeddings_uri: uri(Endpoint::Embeddings)?,
        })
    }
}

#[async_trait]
impl Provider for OpenAiProvider {
    async fn send(&self, request: ProviderRequest) -> Result<ProviderReply, UpstreamError> {
        let uri = match request.endpoint {
            Endpoint::ChatCompletions => self.chat_uri.clone(),
            Endpoint::Embeddings => self.embeddings_uri.clone(),
        };
        let target = request.target;
        let mut http_request = Request::new(Full::new(request.body));
        *http_request.method_mut() = Method::POST;
        *http_request.uri_mut() = uri;
        http_request.headers_mut().clone_from(&self.headers);
        let response =
            self.client
                .request(http_request)
                .await
                .map_err(|e| UpstreamError::Connect {
                    target: target.clone(),
                    detail: transport_detail(&e),
                })?;
        let status = response.status();
        if !status.is_success() {
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            let body = response
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
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
            return Ok(ProviderReply::Stream(sse_chunks(
                response.into_body(),
                target,
            )));
        }
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| UpstreamError::Connect {
                target: target.clone(),
                detail: transport_detail(&e),
            })?
            .to_bytes();
        Ok(ProviderReply::Json(body))
    }
}

/// `Retry-After` as seconds (HTTP dates are rare from model APIs and ignored).
fn parse_retry_after(value: &str) -> Option<Duration> {
    let secs: f64 = value.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

/// The client error and its causes. hyper's errors never carry the URL (query
/// parameters and `user:pass@` in a provider's URL may hold keys, and this text
/// reaches events and clients).
fn transport_detail(e: &(dyn std::error::Error + 'static)) -> String {
    let mut detail = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        source = s.source();
    }
    detail
}

/// Turns an SSE body into its `data` payloads; ends after `[DONE]`, errors on a cut.
fn sse_chunks(body: hyper::body::Incoming, target: String) -> ChunkStream {
    let bytes = body.into_data_stream();
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
                        detail: format!("stream broke: {}", transport_detail(&e)),
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
        let settings = ProviderSettings {
            name: "p".to_owned(),
            kind: keel_config::ProviderKind::OpenAi,
            base_url: "http://user:pw-secret@127.0.0.1:9/v1".to_owned(),
            api_key: None,
            headers: Vec::new(),
            query: vec![("key".to_owned(), "query-secret".to_owned())],
        };
        let provider = OpenAiProvider::try_new(&settings, Duration::from_secs(1)).unwrap();
        let err = provider
            .send(ProviderRequest {
                endpoint: Endpoint::ChatCompletions,
                target: "p/m".to_owned(),
                body: Bytes::from_static(b"{}"),
                stream: false,
            })
            .await
            .err()
            .unwrap();
        let UpstreamError::Connect { detail, .. } = err else {
            panic!("not a connect error: {err:?}");
        };
        assert!(!detail.contains("secret"), "{detail}");
        assert!(detail.contains("onnect"), "{detail}");
    }

    #[test]
    fn retry_after_seconds() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }
}
