//! Provider kind `openai`: any OpenAI-compatible API (OpenAI, Azure OpenAI,
//! vLLM, Ollama, llama.cpp, OpenRouter, Together, Groq, ...).

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::BodyExt;
use keel_config::ProviderSettings;
use keel_core::class::ErrorHint;
use reqwest::header::{AUTHORIZATION, HeaderName};

use super::client::{self, Body, ClientSpec, HttpClient, SseParser, error_chain};
use super::{ChunkStream, Endpoint, Passed, Provider, ProviderReply, ProviderRequest};
use crate::error::UpstreamError;

/// An OpenAI-compatible upstream.
pub struct OpenAiProvider {
    client: HttpClient,
}

/// Where each endpoint is in the client's list of URLs.
fn url_of(endpoint: Endpoint) -> usize {
    match endpoint {
        Endpoint::ChatCompletions => 0,
        Endpoint::Embeddings => 1,
    }
}

impl OpenAiProvider {
    /// Builds the client: provider headers and the API key (as `Authorization: Bearer`,
    /// or as it is in `api_key_header`) are set once here, marked sensitive so they are
    /// never logged.
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
        let spec = ClientSpec {
            paths: &[
                Endpoint::ChatCompletions.path(),
                Endpoint::Embeddings.path(),
            ],
            key: match (&settings.api_key, &settings.api_key_header) {
                (None, _) => None,
                (Some(key), None) => Some((AUTHORIZATION, format!("Bearer {}", key.expose()))),
                // Azure OpenAI's `api-key`, or another API's own header: the key as it is.
                (Some(key), Some(header)) => Some((
                    HeaderName::from_bytes(header.as_bytes()).map_err(|_| {
                        format!(
                            "providers.{}.api_key_header: {header:?} is not a header name",
                            settings.name
                        )
                    })?,
                    key.expose().to_owned(),
                )),
            },
            fixed: &[],
        };
        let client = HttpClient::try_new(settings, connect, proxies, &spec)?;
        Ok(Self { client })
    }
}

#[async_trait]
impl Provider for OpenAiProvider {
    async fn send(&self, request: ProviderRequest) -> Result<ProviderReply, UpstreamError> {
        let target = request.target;
        let response = self
            .client
            .post(url_of(request.endpoint), request.body)
            .await
            .map_err(|detail| UpstreamError::connect(target.as_str(), detail))?;
        let passed = Passed::openai(response.headers());
        if !response.status().is_success() {
            let (status, retry_after, body) = client::failure(response).await;
            let hint = ErrorHint::from_body(&body);
            return Err(UpstreamError::Status {
                target,
                status,
                retry_after,
                body,
                hint,
                passed,
            });
        }
        if request.stream {
            // A server or proxy that ignores `stream: true` answers the whole completion as
            // JSON: the executor reads it as such and sends it on as a stream's chunks.
            let peeked = client::whole_json(response, &target)
                .await
                .map_err(|e| e.with_passed(passed.clone()))?;
            return match peeked {
                (true, body) => {
                    let body = client::read_all(body, &target, &passed).await?;
                    Ok(ProviderReply::Json(body, passed))
                }
                (false, body) => Ok(ProviderReply::Stream(sse_chunks(body, target), passed)),
            };
        }
        let body = client::read_all(response.into_body(), &target, &passed).await?;
        Ok(ProviderReply::Json(body, passed))
    }
}

/// Turns an SSE body into its `data` payloads; ends after `[DONE]`, or at a clean close
/// after a chunk that finished the answer (some OpenAI-compatible servers leave `[DONE]`
/// out). Errors on a cut, and on an error event (`{"error": ...}`, how OpenAI, vLLM and
/// OpenRouter report a failure inside a started stream): [`UpstreamError::Status`] with the
/// event as its body, so it is classified (and, before the first token, retried or fallen
/// back from) like the same error sent as an HTTP answer.
fn sse_chunks(body: Body, target: String) -> ChunkStream {
    let bytes = body.into_data_stream();
    // (body, parser, target, over, finished)
    let state = (bytes, SseParser::default(), target, false, false);
    futures::stream::unfold(
        state,
        |(mut bytes, mut parser, target, over, mut finished)| async move {
            if over {
                return None;
            }
            loop {
                if let Some(event) = parser.next_data() {
                    if event.as_ref() == b"[DONE]" {
                        return None;
                    }
                    if let Some(err) = error_event(&event, &target) {
                        return Some((Err(err), (bytes, parser, target, true, finished)));
                    }
                    finished = ends_finished(finished, &event);
                    return Some((Ok(event), (bytes, parser, target, false, finished)));
                }
                match bytes.next().await {
                    Some(Ok(chunk)) => {
                        if let Err(detail) = parser.push(&chunk) {
                            let err = UpstreamError::malformed(target.as_str(), detail);
                            return Some((Err(err), (bytes, parser, target, true, finished)));
                        }
                    }
                    Some(Err(e)) => {
                        let detail = format!("stream broke: {}", error_chain(e.as_ref()));
                        let err = UpstreamError::connect(target.as_str(), detail);
                        return Some((Err(err), (bytes, parser, target, true, finished)));
                    }
                    None if finished => return None,
                    None => {
                        let err = UpstreamError::malformed(
                            target.as_str(),
                            "stream ended without [DONE]",
                        );
                        return Some((Err(err), (bytes, parser, target, true, finished)));
                    }
                }
            }
        },
    )
    // Ended, it stays ended: an unfold polled again after its end panics.
    .fuse()
    .boxed()
}

/// The error `event` reports, when it is an error event (a JSON object with a non-null
/// `error`), as [`UpstreamError::error_object`] classifies it.
fn error_event(event: &Bytes, target: &str) -> Option<UpstreamError> {
    #[derive(serde::Deserialize)]
    struct Probe {
        error: Option<serde_json::Value>,
    }
    // Cheap test first: a chunk almost never holds the word.
    if !contains(event, b"\"error\"") {
        return None;
    }
    let error = serde_json::from_slice::<Probe>(event).ok()?.error?;
    Some(UpstreamError::error_object(target, event.clone(), &error))
}

/// Whether a stream that closes cleanly after `event` has completed, `finished` saying so of
/// the stream before it: when `event` finished the answer, or carried no delta after a chunk
/// that did (the usage chunk). A delta that finishes nothing means more was to come.
fn ends_finished(finished: bool, event: &[u8]) -> bool {
    finishes(event) || (finished && !contains(event, b"\"delta\""))
}

/// Whether a chunk finishes a choice: a `finish_reason` that is not null.
fn finishes(chunk: &[u8]) -> bool {
    const KEY: &[u8] = b"\"finish_reason\"";
    let mut rest = chunk;
    while let Some(at) = find(rest, KEY) {
        rest = &rest[at + KEY.len()..];
        let value = rest
            .iter()
            .position(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b':'))
            .map(|start| &rest[start..]);
        if value.is_some_and(|v| !v.starts_with(b"null")) {
            return true;
        }
    }
    false
}

/// Where `needle` first occurs in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}

#[cfg(test)]
mod tests {
    #[test]
    fn error_events_are_told_from_chunks_with_their_status() {
        use super::error_event;
        for (event, status) in [
            (
                &br#"{"error":{"message":"overloaded","type":"server_error"}}"#[..],
                Some(500),
            ),
            (
                br#"{"error":{"code":502,"message":"provider down"}}"#,
                Some(502),
            ),
            (br#"{ "error" : "plain words" }"#, Some(500)),
            (
                br#"{"error":{"code":"context_length_exceeded"}}"#,
                Some(400),
            ),
            (br#"{"error":null,"choices":[]}"#, None),
            (
                br#"{"choices":[{"delta":{"content":"an \"error\" in the text"}}]}"#,
                None,
            ),
            (br#"{"choices":[]}"#, None),
        ] {
            let found = error_event(&bytes::Bytes::from_static(event), "p/m");
            assert_eq!(
                found.and_then(|e| e.status()).map(|s| s.as_u16()),
                status,
                "{}",
                String::from_utf8_lossy(event)
            );
        }
    }

    #[test]
    fn a_chunk_finishes_when_a_finish_reason_is_not_null() {
        use super::finishes;
        assert!(finishes(
            br#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#
        ));
        assert!(finishes(br#"{"choices":[{"finish_reason" : "length"}]}"#));
        assert!(finishes(
            br#"{"choices":[{"finish_reason":null},{"finish_reason":"tool_calls"}]}"#
        ));
        assert!(!finishes(
            br#"{"choices":[{"delta":{"content":"hi"},"finish_reason":null}]}"#
        ));
        assert!(!finishes(br#"{"choices":[],"usage":{"total_tokens":3}}"#));
    }

    #[test]
    fn a_stream_ends_finished_only_when_nothing_was_left_to_say() {
        use super::ends_finished;
        let content = br#"{"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}"#;
        let finish = br#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#;
        let usage = br#"{"choices":[],"usage":{"total_tokens":3}}"#;
        let more_of_another =
            br#"{"choices":[{"index":1,"delta":{"content":"and"},"finish_reason":null}]}"#;
        let end = |events: &[&[u8]]| events.iter().fold(false, |f, e| ends_finished(f, e));
        assert!(end(&[content, finish]));
        assert!(end(&[content, finish, usage]));
        assert!(!end(&[content]));
        assert!(!end(&[content, usage]));
        // Choice 0 finished, choice 1 went on and was cut: not complete.
        assert!(!end(&[content, finish, more_of_another]));
    }

    use bytes::Bytes;
    use hyper_util::client::proxy::matcher::Matcher;

    use super::*;

    fn settings(base_url: &str, api_key: Option<&str>) -> ProviderSettings {
        ProviderSettings {
            name: "up".to_owned(),
            kind: keel_config::ProviderKind::OpenAi,
            base_url: base_url.to_owned(),
            api_key: api_key.map(|k| keel_config::Secret::new(k.to_owned())),
            api_key_header: None,
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
        assert!(direct.client.is_direct());
        let detail = connect_detail(&direct).await;
        assert!(!detail.contains("secret"), "{detail}");
        assert!(detail.contains("refused"), "{detail}");
        // Credentials in the URL go through reqwest, which strips the URL from its errors.
        let with_userinfo = provider("http://user:pw-secret@127.0.0.1:9/v1", None, &no_proxies());
        assert!(!with_userinfo.client.is_direct());
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
        assert!(direct.client.is_direct());
        let body = r#"{"model":"sim-model","messages":[{"role":"user","content":"hi"}]}"#;
        let Ok(ProviderReply::Json(answer, passed)) = direct.send(chat(body)).await else {
            panic!("no JSON answer");
        };
        let id = passed
            .request_id()
            .expect("the simulator names every answer");
        assert!(id.starts_with("req_sim_"), "{id:?}");
        // The account's limits and the provider's time pass on as OpenAI sent them.
        let mut headers = http::HeaderMap::new();
        passed.apply(&mut headers);
        assert_eq!(headers["x-ratelimit-limit-requests"], "10000");
        let remaining: u64 = headers["x-ratelimit-remaining-requests"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(remaining < 10_000, "{headers:?}");
        assert!(
            headers.contains_key("x-ratelimit-reset-requests"),
            "{headers:?}"
        );
        assert!(headers.contains_key("openai-processing-ms"), "{headers:?}");
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
    async fn a_key_header_carries_the_key_as_it_is_and_no_bearer_token_goes() {
        let sim = keel_sim::SimServer::start("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let azure = ProviderSettings {
            api_key_header: Some("api-key".to_owned()),
            ..settings(&sim.base_url(), Some("azure-key-1"))
        };
        let provider =
            OpenAiProvider::with_proxies(&azure, Duration::from_secs(2), &no_proxies()).unwrap();
        let headers = provider.client.headers();
        assert_eq!(headers["api-key"], "azure-key-1");
        assert!(headers["api-key"].is_sensitive());
        assert!(!headers.contains_key(AUTHORIZATION), "{headers:?}");
        let body = r#"{"model":"sim-model","messages":[{"role":"user","content":"hi"}]}"#;
        assert!(matches!(
            provider.send(chat(body)).await,
            Ok(ProviderReply::Json(..))
        ));
        // The simulator records `Authorization` first and `api-key` only without one: the
        // bare key here says that no bearer token was sent.
        assert_eq!(
            sim.last_authorization("sim-model").as_deref(),
            Some("azure-key-1")
        );
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
        assert!(!proxied.client.is_direct());
        let body = r#"{"model":"sim-model","messages":[{"role":"user","content":"hi"}]}"#;
        let reply = proxied.send(chat(body)).await;
        assert!(
            matches!(reply, Ok(ProviderReply::Json(..))),
            "no answer through the proxy"
        );
        assert_eq!(
            proxy.last_authorization("sim-model").as_deref(),
            Some("Bearer sk-proxied")
        );
        // A host the proxies do not cover goes direct.
        let elsewhere = provider("https://api.example.com/v1", None, &proxies);
        assert!(elsewhere.client.is_direct());
        proxy.shutdown().await;
    }
}
