//! The body deadline of every API: a request's whole body must arrive within `[server]
//! body_timeout` of its headers, or the request is refused with a 408 `request_timeout`.
//!
//! A model call reads its body itself ([`crate::http`]'s `read_body`); the tool, task and
//! operator APIs read theirs through axum's extractors, so their bodies are wrapped here
//! ([`refuse_late_bodies`]). A deadline on the whole body, not on the silences in it, is
//! what keeps a client that sends a byte now and then from holding a request (and its
//! buffer) open without end.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::{Frame, SizeHint};

use crate::error::ApiError;

/// The 408 of a request whose body did not arrive within `timeout`.
pub(crate) fn late(timeout: Duration) -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "invalid_request_error",
        format!(
            "the request body did not arrive within {} (server.body_timeout)",
            keel_config::show_duration(timeout)
        ),
    )
    .with_code("request_timeout")
}

/// Middleware: gives the request's body until `timeout` after now (its headers have come)
/// to arrive whole; a handler that was still reading it then is answered with [`late`],
/// whatever it made of the cut body.
pub(crate) async fn refuse_late_bodies(
    State(timeout): State<Duration>,
    request: Request,
    next: Next,
) -> Response {
    // Nothing to wait for (a GET, an empty body): no timer.
    if http_body::Body::is_end_stream(request.body()) {
        return next.run(request).await;
    }
    let passed = Arc::new(AtomicBool::new(false));
    let request = request.map(|inner| {
        Body::new(Deadline {
            inner,
            timer: Box::pin(tokio::time::sleep(timeout)),
            passed: Arc::clone(&passed),
        })
    });
    let response = next.run(request).await;
    if passed.load(Ordering::Relaxed) {
        return late(timeout).into_response();
    }
    response
}

/// A request body that fails once its deadline passes.
struct Deadline {
    inner: Body,
    timer: Pin<Box<tokio::time::Sleep>>,
    /// Set when the deadline cut the body off.
    passed: Arc<AtomicBool>,
}

/// The error a body read gets once the deadline has passed.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within server.body_timeout")]
struct Passed;

impl http_body::Body for Deadline {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if this.timer.as_mut().poll(cx).is_ready() {
            this.passed.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(axum::Error::new(Passed))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
