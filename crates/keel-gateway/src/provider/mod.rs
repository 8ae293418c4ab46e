//! The provider seam: how the gateway talks to one kind of upstream API.
//!
//! The gateway speaks the OpenAI wire format on both sides. A provider takes an
//! OpenAI-shaped request body whose `model` is already the target's model and
//! returns an OpenAI-shaped answer: a JSON body, or a stream of SSE `data`
//! payloads (without the final `[DONE]`). A provider with another wire format
//! (Anthropic's Messages API) translates inside its own module; nothing else in
//! the gateway changes. Providers do not retry, time out or record: the route
//! executor does that around them.

pub mod anthropic;
mod client;
pub mod openai;
mod passed;

pub use passed::Passed;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

use crate::error::UpstreamError;

/// Which OpenAI endpoint a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /chat/completions`.
    ChatCompletions,
    /// `POST /embeddings`.
    Embeddings,
}

impl Endpoint {
    /// Path relative to the provider's `base_url`.
    pub fn path(self) -> &'static str {
        match self {
            Self::ChatCompletions => "/chat/completions",
            Self::Embeddings => "/embeddings",
        }
    }
}

/// One request to one target.
#[derive(Debug, Clone)]
pub struct ProviderRequest {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// OpenAI-shaped JSON body with `model` set to the target's model.
    pub body: Bytes,
    /// Whether the body asks for `stream: true`.
    pub stream: bool,
    /// `provider/model`, for error messages.
    pub target: String,
}

/// A stream of SSE `data` payloads, each one OpenAI chunk (JSON), `[DONE]` excluded.
///
/// The stream ends cleanly only after the upstream sent `[DONE]` (or closed cleanly right
/// after a chunk that finished the answer); an upstream that stops early yields an error, so
/// truncation is never silent. An error the upstream reports inside the stream is an
/// [`UpstreamError::Status`] whose body is its error event.
pub type ChunkStream = BoxStream<'static, Result<Bytes, UpstreamError>>;

/// A successful answer from a provider.
pub enum ProviderReply {
    /// A complete JSON body, and the answer's headers to pass on.
    Json(Bytes, Passed),
    /// A stream of chunks, and the answer's headers to pass on.
    Stream(ChunkStream, Passed),
}

/// One kind of upstream API.
#[async_trait]
pub trait Provider: Send + Sync {
    /// Sends one attempt. Must not retry. Errors carry the target, never secrets.
    async fn send(&self, request: ProviderRequest) -> Result<ProviderReply, UpstreamError>;
}
