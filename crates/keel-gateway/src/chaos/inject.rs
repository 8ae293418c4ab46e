//! Making one provider attempt fail the way a real upstream would.
//!
//! [`send`] stands in for [`Provider::send`] for an attempt that got a fault, and answers
//! with exactly what a provider returns for the real failure, so that retry, breaker,
//! fallback and deadlines react as they would in an incident:
//!
//! | fault | upstream called | what the attempt sees |
//! | --- | --- | --- |
//! | `status` | no | [`UpstreamError::Status`] with an OpenAI error body and `Retry-After` |
//! | `latency` | after the delay | the real answer, late (the attempt's deadlines still apply) |
//! | `hang` | no | nothing, until the attempt's `attempt` / `first_token` deadline fires |
//! | `drop` | no | [`UpstreamError::Connect`] before the first byte |
//! | `stream_cut` | yes | a stream that breaks after N chunks; a JSON body cut while read |
//! | `malformed` | no | a 200 whose body is not valid JSON (a stream: one chunk that is not) |
//!
//! The `tripped` flag tells the executor whether a failure came from the fault (to mark
//! `llm_attempt_failed` as `injected`) or from the real upstream behind it: it is set while
//! the fault is the reason the attempt is not answered (a latency's wait included) and
//! cleared when the real call takes over.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use futures::StreamExt;
use keel_config::{Fault, Latency};
use keel_core::class::ErrorHint;
use serde_json::json;

use crate::error::UpstreamError;
use crate::provider::{Passed, Provider, ProviderReply, ProviderRequest};

/// A chat completion cut off mid-document: what a 200 with a truncated body looks like.
const MALFORMED: &[u8] =
    br#"{"id":"chatcmpl-keel-chaos","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"the answ"#;

/// One attempt under `fault`; see the module docs.
pub(crate) async fn send(
    fault: Fault,
    provider: &dyn Provider,
    request: ProviderRequest,
    tripped: &Arc<AtomicBool>,
) -> Result<ProviderReply, UpstreamError> {
    let target = request.target.clone();
    match fault {
        Fault::Status {
            status,
            retry_after,
        } => {
            tripped.store(true, Ordering::Relaxed);
            Err(status_error(target, status, retry_after))
        }
        Fault::Latency(latency) => {
            let delay = match latency {
                Latency::Fixed(d) => d,
                // Resolved by the decision; the shortest delay if one ever is not.
                Latency::Uniform { min, .. } => min,
            };
            tripped.store(true, Ordering::Relaxed);
            tokio::time::sleep(delay).await;
            tripped.store(false, Ordering::Relaxed);
            provider.send(request).await
        }
        Fault::Hang => {
            tripped.store(true, Ordering::Relaxed);
            futures::future::pending::<Result<ProviderReply, UpstreamError>>().await
        }
        Fault::Drop => {
            tripped.store(true, Ordering::Relaxed);
            Err(UpstreamError::connect(
                target,
                "connection reset before the first byte (injected by keel chaos)",
            ))
        }
        Fault::StreamCut { after_chunks } => {
            match provider.send(request).await? {
                ProviderReply::Stream(stream, id) => Ok(ProviderReply::Stream(
                    cut(stream, after_chunks, target, tripped),
                    id,
                )),
                // Not a stream: the body is cut while it is read, a transport error, named
                // by the provider's answer it cut (as a real cut would be).
                ProviderReply::Json(_, passed) => {
                    tripped.store(true, Ordering::Relaxed);
                    Err(UpstreamError::connect(
                        target,
                        "connection closed while reading the body (injected by keel chaos)",
                    )
                    .with_passed(passed))
                }
            }
        }
        Fault::Malformed => {
            tripped.store(true, Ordering::Relaxed);
            if request.stream {
                let chunk = Ok(Bytes::from_static(MALFORMED));
                return Ok(ProviderReply::Stream(
                    futures::stream::iter([chunk]).boxed(),
                    Passed::default(),
                ));
            }
            Ok(ProviderReply::Json(
                Bytes::from_static(MALFORMED),
                Passed::default(),
            ))
        }
    }
}

/// The error a provider returns for an HTTP error status, with an OpenAI-shaped body.
fn status_error(
    target: String,
    status: u16,
    retry_after: Option<std::time::Duration>,
) -> UpstreamError {
    let status =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::SERVICE_UNAVAILABLE);
    let kind = match status.as_u16() {
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    };
    let body = json!({"error": {
        "message": format!("injected by keel chaos: HTTP {}", status.as_u16()),
        "type": kind,
        "code": "keel_chaos",
        "param": null,
    }});
    let body = Bytes::from(body.to_string());
    let hint = ErrorHint::from_body(&body);
    UpstreamError::Status {
        target,
        status,
        retry_after,
        body,
        hint,
        passed: Passed::default(),
    }
}

/// `stream` with its first `after` chunks, then the error of a connection that broke.
fn cut(
    stream: crate::provider::ChunkStream,
    after: u32,
    target: String,
    tripped: &Arc<AtomicBool>,
) -> crate::provider::ChunkStream {
    let tripped = Arc::clone(tripped);
    let broken = futures::stream::once(async move {
        tripped.store(true, Ordering::Relaxed);
        Err(UpstreamError::connect(
            target,
            format!("stream broke after {after} chunks (injected by keel chaos)"),
        ))
    });
    stream
        .take(usize::try_from(after).unwrap_or(usize::MAX))
        .chain(broken)
        .boxed()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use async_trait::async_trait;
    use keel_core::ErrorClass;
    use parking_lot::Mutex;

    use super::*;
    use crate::provider::Endpoint;

    /// A provider that counts calls and answers a fixed stream or body.
    #[derive(Default)]
    struct Upstream {
        calls: Mutex<u32>,
    }

    #[async_trait]
    impl Provider for Upstream {
        async fn send(&self, request: ProviderRequest) -> Result<ProviderReply, UpstreamError> {
            *self.calls.lock() += 1;
            if request.stream {
                let chunks = (0..5).map(|i| Ok(Bytes::from(format!("{{\"n\":{i}}}"))));
                return Ok(ProviderReply::Stream(
                    futures::stream::iter(chunks).boxed(),
                    Passed::default(),
                ));
            }
            let mut headers = axum::http::HeaderMap::new();
            headers.insert("x-request-id", "req_real".parse().unwrap());
            Ok(ProviderReply::Json(
                Bytes::from_static(b"{\"ok\":true}"),
                Passed::openai(&headers),
            ))
        }
    }

    fn request(stream: bool) -> ProviderRequest {
        ProviderRequest {
            endpoint: Endpoint::ChatCompletions,
            body: Bytes::from_static(b"{}"),
            stream,
            target: "sim/m".into(),
        }
    }

    async fn run(fault: Fault, stream: bool) -> (Result<ProviderReply, UpstreamError>, u32, bool) {
        let upstream = Upstream::default();
        let tripped = Arc::new(AtomicBool::new(false));
        let result = send(fault, &upstream, request(stream), &tripped).await;
        let calls = *upstream.calls.lock();
        (result, calls, tripped.load(Ordering::Relaxed))
    }

    #[tokio::test]
    async fn status_looks_like_the_upstream_error_and_skips_the_call() {
        let fault = Fault::Status {
            status: 429,
            retry_after: Some(Duration::from_secs(2)),
        };
        let (result, calls, tripped) = run(fault, false).await;
        let Err(e @ UpstreamError::Status { .. }) = result else {
            panic!("a status error");
        };
        assert_eq!(e.class(), ErrorClass::Retryable);
        let UpstreamError::Status {
            status,
            retry_after,
            body,
            ..
        } = e
        else {
            unreachable!()
        };
        assert_eq!(status.as_u16(), 429);
        assert_eq!(retry_after, Some(Duration::from_secs(2)));
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["type"], "rate_limit_error");
        assert_eq!((calls, tripped), (0, true));
        let fatal = Fault::Status {
            status: 400,
            retry_after: None,
        };
        let (result, _, _) = run(fatal, false).await;
        assert_eq!(result.err().map(|e| e.class()), Some(ErrorClass::Fatal));
    }

    #[tokio::test]
    async fn drop_is_a_connect_error_without_a_call() {
        let (result, calls, tripped) = run(Fault::Drop, true).await;
        assert!(matches!(result, Err(UpstreamError::Connect { .. })));
        assert_eq!((calls, tripped), (0, true));
    }

    #[tokio::test]
    async fn latency_waits_then_calls_and_hang_never_answers() {
        let started = tokio::time::Instant::now();
        let fault = Fault::Latency(Latency::Fixed(Duration::from_millis(50)));
        let (result, calls, tripped) = run(fault, false).await;
        assert!(matches!(result, Ok(ProviderReply::Json(..))));
        assert_eq!((calls, tripped), (1, false), "the real call answered");
        assert!(started.elapsed() >= Duration::from_millis(50));
        let hang = tokio::time::timeout(Duration::from_millis(200), run(Fault::Hang, false)).await;
        assert!(hang.is_err(), "a hang answers nothing");
    }

    #[tokio::test]
    async fn stream_cut_passes_n_chunks_then_breaks() {
        let (result, calls, _) = run(Fault::StreamCut { after_chunks: 2 }, true).await;
        let Ok(ProviderReply::Stream(stream, _)) = result else {
            panic!("a stream");
        };
        let items: Vec<_> = stream.collect().await;
        assert_eq!(items.len(), 3);
        assert!(items[0].is_ok() && items[1].is_ok());
        assert!(matches!(items[2], Err(UpstreamError::Connect { .. })));
        assert_eq!(calls, 1);
        let (result, calls, tripped) = run(Fault::StreamCut { after_chunks: 2 }, false).await;
        let Err(cut @ UpstreamError::Connect { .. }) = result else {
            panic!("a cut body");
        };
        // The provider had answered: the cut is named by its answer, as a real cut is.
        assert_eq!(cut.request_id(), Some("req_real"));
        assert_eq!((calls, tripped), (1, true));
    }

    #[tokio::test]
    async fn malformed_is_a_200_that_is_not_json() {
        let (result, calls, tripped) = run(Fault::Malformed, false).await;
        let Ok(ProviderReply::Json(body, _)) = result else {
            panic!("a body");
        };
        assert!(serde_json::from_slice::<serde_json::Value>(&body).is_err());
        assert_eq!((calls, tripped), (0, true));
    }
}
