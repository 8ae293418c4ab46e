//! Provider kind `openai`: any OpenAI-compatible API (OpenAI, Azure OpenAI,
//! vLLM, Ollama, llama.cpp, OpenRouter, Together, Groq, ...).

use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use http_body_util::BodyExt;
use keel_config::ProviderSettings;
use keel_core::class::ErrorHint;
use reqwest::header::AUTHORIZATION;

use super::client::{self, Body, ClientSpec, HttpClient, SseParser, error_chain};
use super::{ChunkStream, Endpoint, Provider, ProviderReply, ProviderRequest};
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
        let spec = ClientSpec {
            paths: &[
                Endpoint::ChatCompletions.path(),
                Endpoint::Embeddings.path(),
            ],
            key: settings
                .api_key
                .as_ref()
                .map(|key| (AUTHORIZATION, format!("Bearer {}", key.expose()))),
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
            .map_err(|detail| UpstreamError::Connect {
                target: target.clone(),
                detail,
            })?;
        if !response.status().is_success() {
            let (status, retry_after, body) = client::failure(response).await;
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
        let body = client::read_all(response.into_body(), &target).await?;
        Ok(ProviderReply::Json(body))
    }
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

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use hyper_util::client::proxy::matcher::Matcher;

    use super::*;

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
        assert!(!proxied.client.is_direct());
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
        assert!(elsewhere.client.is_direct());
        proxy.shutdown().await;
    }
}
