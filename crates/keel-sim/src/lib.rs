//! A simulated OpenAI-compatible (and Anthropic Messages) model server with scriptable
//! fault injection.
//!
//! keel's tests and benchmarks talk to it over real loopback HTTP, as to an outside
//! provider: it depends on no keel crate. Without faults it answers deterministically:
//!
//! - `POST /v1/chat/completions`: `"sim reply to: <last user message>"`, a tool call of the
//!   first offered tool (arguments built from its schema's required properties) when the
//!   last message is the user's, `"sim saw tool result: ..."` after a tool message, a JSON
//!   object for `response_format` `json_object` / `json_schema`; `stream: true` answers in
//!   OpenAI's SSE shape, with a usage chunk when `stream_options.include_usage` is set.
//! - `POST /v1/messages`: Anthropic's Messages API with the same answers (a `tool_use`
//!   block, `"sim saw tool result: ..."` after a `tool_result`), streamed as Anthropic's
//!   events (`message_start`, `content_block_*`, `ping`, `message_delta`, `message_stop`).
//!   It requires `anthropic-version` and `max_tokens`, refuses unknown fields and a
//!   `tool_use` left without its `tool_result` as Anthropic does, honours `stop_sequences`
//!   and cuts a text at `max_tokens` words; faults come in Anthropic's error shape (529
//!   `overloaded_error`, ...), and [`SimHandle::last_authorization`] gives its `x-api-key`.
//! - `POST /v1/embeddings`: unit vectors of 8 floats hashed from each input.
//! - `GET /v1/models`: the models seen, plus `sim-model`.
//! - `POST /tools/{name}` (or `/v1/tools/{name}`): a simulated HTTP tool answering
//!   `{"tool", "ok": true, "received": <the body>}`; its faults and calls are those of the
//!   model `tool:{name}`, and a fault's `redirect` answers `302` to that location.
//!
//! Faults ([`Fault`]) are queued per model with [`SimHandle::script`] or made sticky with
//! [`SimHandle::set_always`]; the same control surface is served over HTTP for other
//! processes: `POST /_sim/script {"model", "faults": [..]}`,
//! `POST /_sim/always {"model", "fault": {..} | null}`, `GET /_sim/calls` →
//! `{"calls": {"model": n}}`, `POST /_sim/reset`. The model `"*"` matches every model; a
//! model's own entry wins.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use keel_sim::{Fault, SimServer};
//! let sim = SimServer::start("127.0.0.1:0".parse().unwrap()).await?;
//! sim.script("gpt-x", vec![Fault::status(503).with_retry_after("1")]);
//! // ... point a client at sim.base_url(): its first call gets 503, the next succeeds.
//! assert_eq!(sim.calls("gpt-x"), 0);
//! sim.shutdown().await;
//! # Ok(()) }
//! ```

mod chat;
mod embeddings;
mod fault;
pub mod fleet;
mod messages;
mod routes;
mod server;
mod state;

pub use fault::{DEFAULT_STALL, Fault};
pub use server::{SimHandle, SimServer};
pub use state::{Injector, WILDCARD};

#[cfg(test)]
mod anthropic_tests;
#[cfg(test)]
mod tests;
