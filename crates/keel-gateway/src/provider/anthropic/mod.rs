//! Provider kind `anthropic`: Anthropic's Messages API (`POST {base_url}/messages`), for
//! clients that speak OpenAI's chat completions to keel.
//!
//! Everything Anthropic-specific happens here: the request is translated
//! (`request.rs`), the answer comes back as an OpenAI `chat.completion` (`response.rs`) or
//! as `chat.completion.chunk`s (`stream.rs`), and Anthropic's errors come back in the
//! OpenAI shape with what they say of their cause (context too long, model not found), so
//! keel's classification, usage accounting, budgets and recording work as for any
//! provider. A request the Messages API cannot express (an unsupported parameter, an
//! embeddings call) is refused before anything is sent: a 400 in the OpenAI shape naming
//! the parameter, classified fallback-only so a later target of the route may serve it.
//!
//! The key goes in `x-api-key`, with `anthropic-version: 2023-06-01`; the provider's own
//! `headers` (an `anthropic-beta`, another `anthropic-version`) and `query` are added.

mod request;
mod response;
#[cfg(test)]
mod sim_tests;
mod stream;
#[cfg(test)]
mod tests;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::StatusCode;
use http::header::{HeaderName, HeaderValue};
use keel_config::ProviderSettings;
use keel_core::class::ErrorHint;
use serde_json::json;

pub use self::request::DEFAULT_MAX_TOKENS;
use self::request::Refusal;
use super::client::{self, ClientSpec, HttpClient};
use super::{Endpoint, Passed, Provider, ProviderReply, ProviderRequest};
use crate::error::UpstreamError;

/// The Messages API version keel speaks (`anthropic-version`).
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// An Anthropic Messages API upstream.
pub struct AnthropicProvider {
    client: HttpClient,
}

impl AnthropicProvider {
    /// Builds the client: the API key (as `x-api-key`), `anthropic-version` and the
    /// provider's headers are set once here, marked sensitive so they are never logged.
    pub fn try_new(settings: &ProviderSettings, connect: Duration) -> Result<Self, String> {
        let proxies = hyper_util::client::proxy::matcher::Matcher::from_env();
        Self::with_proxies(settings, connect, &proxies)
    }

    /// [`AnthropicProvider::try_new`] with the proxies `proxies` names instead of the
    /// environment's.
    fn with_proxies(
        settings: &ProviderSettings,
        connect: Duration,
        proxies: &hyper_util::client::proxy::matcher::Matcher,
    ) -> Result<Self, String> {
        let spec = ClientSpec {
            paths: &["/messages"],
            key: settings.api_key.as_ref().map(|key| {
                (
                    HeaderName::from_static("x-api-key"),
                    key.expose().to_owned(),
                )
            }),
            fixed: &[(
                HeaderName::from_static("anthropic-version"),
                HeaderValue::from_static(ANTHROPIC_VERSION),
            )],
        };
        let client = HttpClient::try_new(settings, connect, proxies, &spec)?;
        Ok(Self { client })
    }
}

#[async_trait]
impl Provider for AnthropicProvider {
    async fn send(&self, request: ProviderRequest) -> Result<ProviderReply, UpstreamError> {
        let target = request.target;
        match request.endpoint {
            Endpoint::ChatCompletions => {}
            Endpoint::Embeddings => return Err(no_embeddings(&target)),
        }
        let translated = request::translate(&request.body).map_err(|r| refused(&target, r))?;
        let response = self
            .client
            .post(0, translated.body)
            .await
            .map_err(|detail| UpstreamError::connect(target.as_str(), detail))?;
        let now = crate::agents::wall_now();
        let passed = Passed::anthropic(response.headers(), std::time::UNIX_EPOCH + now);
        if !response.status().is_success() {
            let (status, retry_after, body) = client::failure(response).await;
            let (body, hint) = response::openai_error(&body);
            return Err(UpstreamError::Status {
                target,
                status,
                retry_after,
                body,
                hint,
                passed,
            });
        }
        let created = now.as_secs();
        let body = if request.stream {
            // A proxy that ignores `stream: true` answers the whole message as JSON: read as
            // such, and sent on as a stream's chunks by the executor.
            let (json, body) = client::whole_json(response, &target)
                .await
                .map_err(|e| e.with_passed(passed.clone()))?;
            if !json {
                let translator = stream::Translator::new(created, translated.include_usage);
                return Ok(ProviderReply::Stream(
                    stream::chunks(body, target, translator),
                    passed,
                ));
            }
            body
        } else {
            response.into_body()
        };
        let body = client::read_all(body, &target, &passed).await?;
        match response::chat_completion(&body, created) {
            Ok(completion) => Ok(ProviderReply::Json(completion, passed)),
            // An error sent as a 200 body: classified like the same error over HTTP.
            Err(_) if response::is_error_object(&body) => {
                Err(response::reported_error(target, &body, passed))
            }
            Err(detail) => Err(UpstreamError::malformed(target, detail).with_passed(passed)),
        }
    }
}

/// A 400 in the OpenAI shape for a request this target cannot serve as asked; nothing was
/// sent. Fallback-only: another target of the route may serve it, and when none can, the
/// client gets this answer.
fn unservable(target: &str, message: String, code: &str, param: &str) -> UpstreamError {
    let body = json!({"error": {
        "message": message,
        "type": "invalid_request_error",
        "code": code,
        "param": (!param.is_empty()).then_some(param),
    }});
    UpstreamError::Status {
        target: target.to_owned(),
        status: StatusCode::BAD_REQUEST,
        retry_after: None,
        body: Bytes::from(body.to_string()),
        hint: ErrorHint::Unsupported,
        passed: Passed::default(),
    }
}

fn refused(target: &str, refusal: Refusal) -> UpstreamError {
    let message = format!("{} (target {target})", refusal.message);
    unservable(target, message, "unsupported_parameter", &refusal.param)
}

fn no_embeddings(target: &str) -> UpstreamError {
    let message = format!(
        "target {target} is an Anthropic model, and Anthropic has no embeddings API; \
         route embeddings to an OpenAI-compatible target"
    );
    unservable(target, message, "unsupported_endpoint", "model")
}
