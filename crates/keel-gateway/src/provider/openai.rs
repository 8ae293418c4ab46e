//! Provider kind `openai`: any OpenAI-compatible API (OpenAI, Azure OpenAI,
//! vLLM, Ollama, llama.cpp, OpenRouter, Together, Groq, ...).

use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use keel_config::ProviderSettings;
use keel_core::class::ErrorHint;
use reqwest::header::{
    AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER,
};

use super::{ChunkStream, Endpoint, Provider, ProviderReply, ProviderRequest};
use crate::error::UpstreamError;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A response body, whichever client read it.
type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// How long an idle pooled connection to a provider is kept.
const POOL_IDLE: Duration = Duration::from_secs(90);

/// An OpenAI-compatible upstream.
pub struct OpenAiProvider {
    transport: Transport,
    /// Sent with every request: the content type, the API key (as `Authorization: Bearer`)
    /// and the provider's own headers, each marked sensitive so it is never logged.
    headers: HeaderMap,
}

/// The endpoints' URLs with the provider's query parameters, parsed once, in the form
/// the transport's client takes.
struct Urls<U> {
    chat: U,
    embeddings: U,
}

impl<U> Urls<U> {
    fn of(&self, endpoint: Endpoint) -> &U {
        match endpoint {
            Endpoint::ChatCompletions => &self.chat,
            Endpoint::Embeddings => &self.embeddings,
        }
    }

    fn try_map<V, E>(self, f: impl Fn(U) -> Result<V, E>) -> Result<Urls<V>, E> {
        Ok(Urls {
            chat: f(self.chat)?,
            embeddings: f(self.embeddings)?,
        })
    }
}

/// The HTTP client a provider is reached with.
enum Transport {
    /// hyper's pooled HTTP/1.1 and HTTP/2 client over rustls: the common case. It costs
    /// a fraction of reqwest's work per request, which parses and prints the URL several
    /// times over for its redirect and proxy layers even when neither has work to do.
    Direct {
        client: Box<Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>>,
        urls: Urls<http::Uri>,
    },
    /// reqwest, for what the direct client does not do: a proxy from `HTTPS_PROXY`,
    /// `HTTP_PROXY` or `ALL_PROXY` (minus `NO_PROXY`) for this provider, and credentials
    /// written into the `base_url` (`https://user:password@host`, sent as Basic auth).
    Reqwest {
        client: reqwest::Client,
        urls: Urls<reqwest::Url>,
    },
}

impl OpenAiProvider {
    /// Builds the client: provider headers and the API key (as `Authorization:
    /// Bearer`) are set once here, marked sensitive so they are never logged.
    pub fn try_new(settings: &ProviderSettings, connect: Duration) -> Result<Self, String> {
        let proxies = hyper_util::client::proxy::matcher::Matcher::from_env();
        Self::with_proxies(settings, connect, &proxies)
    }

    /// [`OpenAiProvider::try_new`] with the proxies `proxies` names instead of the
    /// environment's.
    fn with_proxies(
        settings: &ProviderSettings,
        connect: Duration,
        proxies: &hyper_util::client::proxy::matcher::Matcher,
    ) -> Result<Self, String> {
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
        let invalid = |url: &str, e: &dyn std::fmt::Display| {
            format!(
                "providers.{}.base_url: {url:?} is not a URL: {e}",
                settings.name
            )
        };
        let url = |endpoint: Endpoint| {
            let text = format!("{}{}", settings.base_url, endpoint.path());
            reqwest::Url::parse_with_params(&text, &settings.query).map_err(|e| invalid(&text, &e))
        };
        let to_uri = |url: reqwest::Url| {
            url.as_str()
                .parse::<http::Uri>()
                .map_err(|e| invalid(url.as_str(), &e))
        };
        let urls = Urls {
            chat: url(Endpoint::ChatCompletions)?,
            embeddings: url(Endpoint::Embeddings)?,
        };
        // Both endpoints are on the base URL's host, so one proxy (or none) serves both.
        let proxy = proxies.intercept(&to_uri(urls.chat.clone())?);
        let userinfo = !urls.chat.username().is_empty() || urls.chat.password().is_some();
        let cannot_build = |e: &dyn std::fmt::Display| {
            format!("providers.{}: cannot build HTTP client: {e}", settings.name)
        };
        let transport = if proxy.is_some() || userinfo {
            let mut builder = reqwest::Client::builder().no_proxy();
            if let Some(proxy) = proxy {
                let mut via =
                    reqwest::Proxy::all(proxy.uri().to_string()).map_err(|e| cannot_build(&e))?;
                if let Some(auth) = proxy.basic_auth() {
                    via = via.custom_http_auth(auth.clone());
                }
                builder = builder.proxy(via);
            }
            let client = builder
                .connect_timeout(connect)
                .tcp_nodelay(true)
                .pool_idle_timeout(POOL_IDLE)
                // keel's own policies decide retries; a provider's redirect is
                // reported, not followed with the key attached.
                .redirect(reqwest::redirect::Policy::none())
                .retry(reqwest::retry::never())
                .build()
                .map_err(|e| cannot_build(&e))?;
            Transport::Reqwest { client, urls }
        } else {
            let mut http = HttpConnector::new();
            http.set_connect_timeout(Some(connect));
            http.set_nodelay(true);
            // `https://` URLs pass through to the TLS layer.
            http.enforce_http(false);
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_webpki_roots()
                .https_or_http()
                .enable_all_versions()
                .wrap_connector(http);
            // No redirects and no retries: the direct client does neither, and keel's own
            // policies decide retries.
            let client = Client::builder(TokioExecutor::new())
                .pool_idle_timeout(POOL_IDLE)
                .pool_timer(TokioTimer::new())
                .build(https);
            Transport::Direct {
                client: Box::new(client),
                urls: urls.try_map(to_uri)?,
            }
        };
        Ok(Self { transport, headers })
    }

    /// Posts `body` to `endpoint`; `Err` is a transport failure, described without the URL.
    async fn post(&self, endpoint: Endpoint, body: Bytes) -> Result<http::Response<Body>, String> {
        match &self.transport {
            Transport::Direct { client, urls } => {
                let mut request = http::Request::new(Full::new(body));
                *request.method_mut() = http::Method::POST;
                *request.uri_mut() = urls.of(endpoint).clone();
                *request.headers_mut() = self.headers.clone();
                let response = client.request(request).await.map_err(|e| error_chain(&e))?;
                Ok(response.map(|b| b.map_err(BoxError::from).boxed()))
            }
            Transport::Reqwest { client, urls } => {
                let response = client
                    .post(urls.of(endpoint).clone())
                    .headers(self.headers.clone())
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| error_chain(&e.without_url()))?;
                // A body error read later must not carry the URL either.
                Ok(http::Response::from(response)
                    .map(|b| b.map_err(|e| BoxError::from(e.without_url())).boxed()))
            }
        }
    }
}

#[async_trait]
impl Provider for OpenAiProvider {
    async fn send(&self, request: ProviderRequest) -> Result<ProviderReply, UpstreamError> {
        let target = request.target;
        let response = self
            .post(request.endpoint, request.body)
            .await
            .map_err(|detail| UpstreamError::Connect {
                target: target.clone(),
                detail,
            })?;
        let status = response.status();
        if !status.is_success() {
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            let body = match response.into_body().collect().await {
                Ok(body) => body.to_bytes(),
                Err(_) => Bytes::new(),
            };
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
                detail: error_chain(e.as_ref()),
            })?
            .to_bytes();
        Ok(ProviderReply::Json(body))
    }
}

/// `Retry-After` as seconds (HTTP dates are rare from model APIs and ignored). A value
/// too large for a `Duration` is as good as "very long": the retry policy caps it.
fn parse_retry_after(value: &str) -> Option<Duration> {
    let secs: f64 = value.trim().parse().ok()?;
    if secs.is_nan() || secs < 0.0 {
        return None;
    }
    Some(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
}

/// An error and its sources, `: `-joined. Callers strip URLs first (query parameters and
/// `user:pass@` in a provider's URL may hold keys, and this text reaches events and
/// clients); the direct client's errors never carry one.
fn error_chain(e: &dyn std::error::Error) -> String {
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
fn sse_chunks(body: Body, target: String) -> ChunkStream {
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
                        detail: format!("stream broke: {}", error_chain(e.as_ref())),
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
    use hyper_util::client::proxy::matcher::Matcher;

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

    fn settings(base_url: &str, api_key: Option<&str>) -> ProviderSettings {
        ProviderSettings {
            name: "up".to_owned(),
            kind: keel_config::ProviderKind::OpenAi,
            base_url: base_url.to_owned(),
            api_key: api_key.map(|k| keel_config::Secret::new(k.to_owned())),
            headers: vec![("x-team".to_owned(), "blue".to_owned())],
            query: vec![("key".to_owned(), "query-secret".to_owned())],
            prices: std::collections::BTreeMap::new(),
        }
    }

    fn no_proxies() -> Matcher {
        Matcher::builder().build()
    }

    /// A provider at `base_url` with `api_key`, the `x-team` header and a secret query
    /// parameter, reached through `proxies`.
    fn provider(base_url: &str, api_key: Option<&str>, proxies: &Matcher) -> OpenAiProvider {
        OpenAiProvider::with_proxies(
            &settings(base_url, api_key),
            Duration::from_secs(2),
            proxies,
        )
        .unwrap()
    }

    fn chat(body: &str) -> ProviderRequest {
        ProviderRequest {
            endpoint: Endpoint::ChatCompletions,
            body: Bytes::from(body.to_owned()),
            stream: false,
            target: "up/sim-model".to_owned(),
        }
    }

    async fn connect_detail(provider: &OpenAiProvider) -> String {
        match provider.send(chat("{}")).await {
            Err(UpstreamError::Connect { detail, .. }) => detail,
            Err(other) => panic!("not a connect error: {other:?}"),
            Ok(_) => panic!("nothing listens there, yet it answered"),
        }
    }

    #[tokio::test]
    async fn transport_errors_do_not_carry_the_url() {
        // Nothing listens on port 9 of loopback: the connection is refused.
        let direct = provider("http://127.0.0.1:9/v1", Some("sk-secret"), &no_proxies());
        assert!(matches!(direct.transport, Transport::Direct { .. }));
        let detail = connect_detail(&direct).await;
        assert!(!detail.contains("secret"), "{detail}");
        assert!(detail.contains("refused"), "{detail}");
        // Credentials in the URL go through reqwest, which strips the URL from its errors.
        let with_userinfo = provider("http://user:pw-secret@127.0.0.1:9/v1", None, &no_proxies());
        assert!(matches!(with_userinfo.transport, Transport::Reqwest { .. }));
        let detail = connect_detail(&with_userinfo).await;
        assert!(!detail.contains("secret"), "{detail}");
        assert!(!detail.is_empty());
    }

    #[tokio::test]
    async fn the_direct_client_sends_the_key_headers_and_query_and_reads_the_answer() {
        let sim = keel_sim::SimServer::start("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let direct = provider(&sim.base_url(), Some("sk-direct"), &no_proxies());
        assert!(matches!(direct.transport, Transport::Direct { .. }));
        let body = r#"{"model":"sim-model","messages":[{"role":"user","content":"hi"}]}"#;
        let Ok(ProviderReply::Json(answer)) = direct.send(chat(body)).await else {
            panic!("no JSON answer");
        };
        let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
        assert_eq!(answer["object"], "chat.completion", "{answer}");
        assert_eq!(
            sim.last_authorization("sim-model").as_deref(),
            Some("Bearer sk-direct")
        );
        // An upstream error status comes back as such, with its body.
        sim.set_always("sim-model", Some(keel_sim::Fault::status(503)));
        match direct.send(chat(body)).await {
            Err(UpstreamError::Status { status, body, .. }) => {
                assert_eq!(status.as_u16(), 503);
                assert!(!body.is_empty());
            }
            Err(other) => panic!("not a status error: {other:?}"),
            Ok(_) => panic!("the 503 was not reported"),
        }
        sim.shutdown().await;
    }

    #[tokio::test]
    async fn a_provider_behind_a_proxy_is_reached_through_it() {
        // The simulated server stands in for an HTTP proxy: a request for a host that does
        // not resolve reaches it in absolute form, and it answers by the path.
        let proxy = keel_sim::SimServer::start("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let proxies = Matcher::builder()
            .http(format!("http://{}", proxy.addr()))
            .build();
        let proxied = provider("http://model-api.invalid/v1", Some("sk-proxied"), &proxies);
        assert!(matches!(proxied.transport, Transport::Reqwest { .. }));
        let body = r#"{"model":"sim-model","messages":[{"role":"user","content":"hi"}]}"#;
        let reply = proxied.send(chat(body)).await;
        assert!(
            matches!(reply, Ok(ProviderReply::Json(_))),
            "no answer through the proxy"
        );
        assert_eq!(
            proxy.last_authorization("sim-model").as_deref(),
            Some("Bearer sk-proxied")
        );
        // A host the proxies do not cover goes direct.
        let elsewhere = provider("https://api.example.com/v1", None, &proxies);
        assert!(matches!(elsewhere.transport, Transport::Direct { .. }));
        proxy.shutdown().await;
    }

    #[test]
    fn retry_after_seconds() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after("NaN"), None);
        // Too large for a Duration: "very long", which the retry policy caps, not a panic.
        assert_eq!(
            parse_retry_after("99999999999999999999"),
            Some(Duration::MAX)
        );
        assert_eq!(parse_retry_after("1e300"), Some(Duration::MAX));
    }
}
