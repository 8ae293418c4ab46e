//! A stream's way to the client: [`pump`] forwards the upstream's chunks until the
//! upstream ends, fails, goes silent or runs past the call's deadline, or the client leaves,
//! and says how it ended ([`Pumped`]); [`crate::finish`] records the call, settles its
//! attempt, and sends the last event.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::error::UpstreamError;
use crate::finish::sse_frame;
use crate::guard::loops::StreamedAnswer;
use crate::provider::ChunkStream;
use crate::stream_attempt::StreamEnd;
use crate::usage::Usage;
use crate::usage::estimate::{self, Generation};

/// How [`pump`] ended a stream.
pub(crate) struct Pumped {
    pub(crate) end: StreamEnd,
    pub(crate) usage: Option<Usage>,
    /// The text of the chunks read, for an estimate of the tokens when no usage came.
    pub(crate) generated: Generation,
    /// The error event that ends a failed stream: sent once the call is recorded, as
    /// `[DONE]` is, so a client that saw the end of its stream can find the call's records.
    pub(crate) last: Option<Bytes>,
    /// Why a failed stream failed, in words (`llm_call.error`).
    pub(crate) error: Option<String>,
}

/// What the chunks read so far said of the call's tokens.
#[derive(Clone, Copy, Default)]
struct Tally {
    /// The last usage a chunk reported.
    usage: Option<Usage>,
    generated: Generation,
}

impl Tally {
    /// Reads a chunk's data; whether it reported usage.
    fn read(&mut self, chunk: &[u8]) -> bool {
        let Ok(reading) = estimate::read(chunk) else {
            return false;
        };
        self.generated.add(&reading);
        if reading.usage.is_some() {
            self.usage = reading.usage;
        }
        reading.usage.is_some()
    }
}

/// Why [`deliver`] could not hand a frame on.
pub(crate) enum Undelivered {
    /// The client left.
    Gone,
    /// The client, still there, had not read what came before when the deadline passed.
    Late,
}

/// Sends `frame` to the client, waiting while it is behind until `deadline`.
pub(crate) async fn deliver(
    tx: &mpsc::Sender<Bytes>,
    frame: Bytes,
    deadline: Instant,
) -> Result<(), Undelivered> {
    match tokio::time::timeout_at(deadline, tx.send(frame)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Undelivered::Gone),
        Err(_) => Err(Undelivered::Late),
    }
}

/// Forwards chunks to the client until the upstream ends, fails, goes idle, or
/// the client leaves.
pub(crate) async fn pump(
    first: Bytes,
    mut rest: ChunkStream,
    tx: &mpsc::Sender<Bytes>,
    (idle, (deadline, deadline_name)): (Duration, (Instant, &str)),
    target: &str,
    (mut transcript, mut answer): (Option<&mut Vec<u8>>, Option<&mut StreamedAnswer>),
    hide_usage: bool,
) -> Pumped {
    let mut usage = Tally::default();
    usage.read(&first);
    // The transcript is the chunks' data, one per line: what the client received (with the
    // upstream's own error event, when one ended the stream).
    let mut keep = |chunk: &[u8]| {
        if let Some(t) = transcript.as_deref_mut() {
            t.extend_from_slice(chunk);
            t.push(b'\n');
        }
        if let Some(a) = answer.as_deref_mut() {
            a.add(chunk);
        }
    };
    let ended = |end: StreamEnd, tally: Tally, last: Option<Bytes>| Pumped {
        end,
        usage: tally.usage,
        generated: tally.generated,
        last,
        error: None,
    };
    // keel's own deadline passed while the client was behind: a failure of neither side's
    // health, told to the client like any other.
    let late = || {
        (
            format!(
                "the stream from {target} ended: the client had not read it when {deadline_name} passed"
            ),
            false,
        )
    };
    let mut failed = match deliver(tx, sse_frame(&first), deadline).await {
        Ok(()) => {
            keep(&first);
            None
        }
        Err(Undelivered::Gone) => return ended(StreamEnd::ClientGone, usage, None),
        Err(Undelivered::Late) => Some(late()),
    };
    while failed.is_none() {
        let wait_until = deadline.min(Instant::now() + idle);
        // A client that leaves while the upstream is silent cancels the call now, not at
        // the next chunk or the idle timeout.
        let next = tokio::select! {
            next = tokio::time::timeout_at(wait_until, rest.next()) => next,
            () = tx.closed() => return ended(StreamEnd::ClientGone, usage, None),
        };
        failed = Some(match next {
            Ok(Some(Ok(chunk))) => {
                if usage.read(&chunk) && hide_usage && is_usage_only(&chunk) {
                    continue;
                }
                // Kept once the client has it: a chunk it never got is not in the record.
                match deliver(tx, sse_frame(&chunk), deadline).await {
                    Ok(()) => {
                        keep(&chunk);
                        continue;
                    }
                    // Dropping `rest` closes the upstream connection: the client left.
                    Err(Undelivered::Gone) => return ended(StreamEnd::ClientGone, usage, None),
                    Err(Undelivered::Late) => late(),
                }
            }
            Ok(None) => return ended(StreamEnd::Done, usage, None),
            Ok(Some(Err(e))) => {
                let against_target = e.counts_against_target();
                let why = e.to_string();
                match e {
                    // The upstream's own error event goes to the client as it came: one
                    // error, its words, then the end; unless it refuses keel's credentials,
                    // whose words may quote the key (keel's own error event says so
                    // instead, below).
                    UpstreamError::Status {
                        body, status, hint, ..
                    } if !crate::error::refuses_credentials(status, hint) => {
                        keep(&body);
                        tracing::warn!(
                            target_id = target,
                            "the upstream reported an error inside its stream"
                        );
                        let end = StreamEnd::Failed { against_target };
                        return Pumped {
                            error: Some(format!("the upstream's error event: {why}")),
                            ..ended(end, usage, Some(sse_frame(&body)))
                        };
                    }
                    e => (upstream_failed(&e), against_target),
                }
            }
            // keel's own deadline ended a stream that was still coming: a long answer, not
            // a failing target.
            Err(_) if wait_until == deadline => (
                format!(
                    "the stream from {target} ended: it was still coming when {deadline_name} passed"
                ),
                false,
            ),
            Err(_) => (
                upstream_failed(&format!(
                    "stream from {target} was silent for longer than the idle timeout of {idle:?}"
                )),
                true,
            ),
        });
    }
    let (failure, against_target) = failed.unwrap_or_default();
    tracing::warn!(target_id = target, error = %failure, "stream failed after the first byte");
    let error = json!({"error": {
        "message": failure,
        "type": "api_error",
        "code": "stream_interrupted",
        "param": null,
    }});
    let last = sse_frame(error.to_string().as_bytes());
    Pumped {
        error: Some(failure),
        ..ended(StreamEnd::Failed { against_target }, usage, Some(last))
    }
}

/// The words of keel's error event for an upstream stream that failed with `failure`.
fn upstream_failed(failure: &dyn std::fmt::Display) -> String {
    format!("upstream stream failed after it started: {failure}")
}

/// A chunk that carries only `usage` (`"choices": []`), as OpenAI sends last when
/// `stream_options.include_usage` is set.
fn is_usage_only(chunk: &[u8]) -> bool {
    serde_json::from_slice::<Value>(chunk)
        .ok()
        .and_then(|v| {
            v.get("choices")
                .and_then(Value::as_array)
                .map(Vec::is_empty)
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use futures::StreamExt;
    use tokio::sync::mpsc;
    use tokio::time::Instant;

    use super::{Pumped, Undelivered, deliver, pump};
    use crate::error::UpstreamError;
    use crate::provider::ChunkStream;
    use crate::stream_attempt::StreamEnd;

    const CHUNK: &[u8] = br#"{"choices":[{"delta":{"content":"hi"}}]}"#;

    /// Pumps `rest` after a first chunk into a channel (of 16, as a stream's) that is never
    /// read, with `idle` and the call's deadline `deadline` from now.
    async fn pumped(rest: ChunkStream, idle: Duration, deadline: Duration) -> Pumped {
        let (tx, _rx) = mpsc::channel(16);
        pump_into(rest, &tx, idle, Instant::now() + deadline).await
    }

    /// [`pump`] of `CHUNK` then `rest` into `tx`, until `deadline` (the call's total).
    async fn pump_into(
        rest: ChunkStream,
        tx: &mpsc::Sender<Bytes>,
        idle: Duration,
        deadline: Instant,
    ) -> Pumped {
        pump(
            Bytes::from_static(CHUNK),
            rest,
            tx,
            (idle, (deadline, "the total deadline")),
            "sim/m",
            (None, None),
            false,
        )
        .await
    }

    fn against(pumped: &Pumped) -> Option<bool> {
        match pumped.end {
            StreamEnd::Failed { against_target } => Some(against_target),
            StreamEnd::Done | StreamEnd::ClientGone => None,
        }
    }

    #[tokio::test]
    async fn silence_counts_against_the_target_and_keel_s_deadline_does_not() {
        let short = Duration::from_millis(50);
        let long = Duration::from_secs(30);
        let silent = || futures::stream::pending().boxed();
        let idle = pumped(silent(), short, long).await;
        assert_eq!(against(&idle), Some(true));
        let over = pumped(silent(), long, short).await;
        assert_eq!(against(&over), Some(false));
        // Either way the client's last event is keel's error, held back until the call is
        // recorded.
        let last = over.last.unwrap();
        assert!(
            String::from_utf8_lossy(&last)
                .contains("it was still coming when the total deadline passed"),
            "{last:?}"
        );
    }

    #[tokio::test]
    async fn an_error_event_counts_as_its_error_would() {
        let event = |status: u16, body: &'static [u8]| {
            let error = UpstreamError::Status {
                target: "sim/m".into(),
                status: axum::http::StatusCode::from_u16(status).unwrap(),
                retry_after: None,
                body: Bytes::from_static(body),
                hint: keel_core::class::ErrorHint::from_body(body),
                passed: crate::provider::Passed::default(),
            };
            futures::stream::iter([Ok(Bytes::from_static(CHUNK)), Err(error)]).boxed()
        };
        let long = Duration::from_secs(30);
        let overloaded = pumped(event(503, br#"{"error":{"message":"busy"}}"#), long, long).await;
        assert_eq!(against(&overloaded), Some(true));
        assert_eq!(
            overloaded.last.unwrap(),
            Bytes::from_static(b"data: {\"error\":{\"message\":\"busy\"}}\n\n"),
            "the upstream's own event, as it came"
        );
        let filtered = br#"{"error":{"code":"content_filter","message":"filtered"}}"#;
        let filtered = pumped(event(400, filtered), long, long).await;
        assert_eq!(against(&filtered), Some(false));
    }

    /// The transcript holds what the client received: not the chunk it was too far behind
    /// to take when the deadline passed.
    #[tokio::test]
    async fn the_transcript_holds_only_what_the_client_got() {
        let endless = futures::stream::repeat_with(|| Ok(Bytes::from_static(CHUNK))).boxed();
        let (tx, _rx) = mpsc::channel(16);
        let mut transcript = Vec::new();
        let behind = pump(
            Bytes::from_static(CHUNK),
            endless,
            &tx,
            (
                Duration::from_secs(30),
                (
                    Instant::now() + Duration::from_millis(100),
                    "the total deadline",
                ),
            ),
            "sim/m",
            (Some(&mut transcript), None),
            false,
        )
        .await;
        assert_eq!(against(&behind), Some(false));
        // The first chunk and fifteen more fill the channel of sixteen the client never read.
        let lines = transcript.split(|b| *b == b'\n').filter(|l| !l.is_empty());
        assert_eq!(lines.count(), 16);
    }

    #[tokio::test]
    async fn a_client_behind_at_the_call_s_deadline_is_told_and_one_that_left_is_gone() {
        let endless = || futures::stream::repeat_with(|| Ok(Bytes::from_static(CHUNK))).boxed();
        let started = Instant::now();
        let behind = pumped(
            endless(),
            Duration::from_secs(30),
            Duration::from_millis(200),
        )
        .await;
        assert_eq!(against(&behind), Some(false));
        let last = behind.last.unwrap();
        assert!(
            String::from_utf8_lossy(&last)
                .contains("the client had not read it when the total deadline passed"),
            "{last:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        let (tx, rx) = mpsc::channel(16);
        drop(rx);
        let deadline = (
            Instant::now() + Duration::from_secs(30),
            "the total deadline",
        );
        let gone = pump(
            Bytes::from_static(CHUNK),
            endless(),
            &tx,
            (Duration::from_secs(30), deadline),
            "sim/m",
            (None, None),
            false,
        )
        .await;
        assert_eq!(gone.end, StreamEnd::ClientGone);
        assert!(gone.last.is_none());
    }

    /// A client behind: its channel (of one) is full with `unread`.
    async fn behind(unread: Bytes) -> (mpsc::Sender<Bytes>, mpsc::Receiver<Bytes>) {
        let (tx, rx) = mpsc::channel(1);
        tx.send(unread).await.unwrap();
        (tx, rx)
    }

    /// Every frame the client reads when it starts reading after `after`, until the
    /// channel closes.
    async fn read_after(after: Duration, mut rx: mpsc::Receiver<Bytes>) -> Vec<Bytes> {
        tokio::time::sleep(after).await;
        let mut frames = Vec::new();
        while let Some(frame) = rx.recv().await {
            frames.push(frame);
        }
        frames
    }

    // `finish` sends a stream's last event with `deliver`, until the later of the call's
    // deadline and `idle` from then.
    #[tokio::test]
    async fn the_last_event_waits_for_a_client_that_is_behind_until_the_deadline() {
        let chunk = Bytes::from_static(CHUNK);
        let done = || Bytes::from_static(b"data: [DONE]\n\n");
        // Behind, the client catches up before the deadline: it gets the
        // last event after what it was behind on.
        let (tx, rx) = behind(chunk.clone()).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        let (sent, read) = tokio::join!(
            async move { deliver(&tx, done(), deadline).await },
            read_after(Duration::from_millis(100), rx),
        );
        assert!(sent.is_ok());
        assert_eq!(read, [chunk.clone(), done()]);

        // Still behind when the deadline passes: it gets no last event, and keel waits no
        // longer than the deadline.
        let (tx, rx) = behind(chunk.clone()).await;
        let deadline = Instant::now() + Duration::from_millis(200);
        let sent = deliver(&tx, done(), deadline).await;
        assert!(matches!(sent, Err(Undelivered::Late)));
        assert!(Instant::now() >= deadline);
        assert!(Instant::now() < deadline + Duration::from_secs(5));
        drop(tx);
        assert_eq!(
            read_after(Duration::ZERO, rx).await,
            [chunk],
            "the last event never reached the client"
        );
    }

    #[tokio::test]
    async fn a_client_behind_that_catches_up_before_the_deadline_gets_the_whole_stream() {
        // More chunks than the channel holds, all there at once: the client is behind.
        let chunks = 40;
        let rest =
            futures::stream::iter((0..chunks).map(|_| Ok(Bytes::from_static(CHUNK)))).boxed();
        let (tx, rx) = mpsc::channel(16);
        let deadline = Instant::now() + Duration::from_secs(2);
        let pumping = async move { pump_into(rest, &tx, Duration::from_secs(30), deadline).await };
        let (pumped, read) = tokio::join!(pumping, read_after(Duration::from_millis(200), rx));
        assert_eq!(pumped.end, StreamEnd::Done);
        assert!(pumped.last.is_none());
        assert_eq!(read.len(), chunks + 1, "the first chunk and the rest");
    }

    #[tokio::test]
    async fn a_client_still_behind_at_the_deadline_fails_the_stream_but_not_its_target() {
        // The upstream sent its whole answer; the client never reads past what its channel
        // holds.
        let rest = futures::stream::iter((0..20).map(|_| Ok(Bytes::from_static(CHUNK)))).boxed();
        let (tx, rx) = mpsc::channel(16);
        let deadline = Instant::now() + Duration::from_millis(200);
        let pumped = pump_into(rest, &tx, Duration::from_secs(30), deadline).await;
        assert_eq!(against(&pumped), Some(false));
        assert!(Instant::now() >= deadline);
        assert!(Instant::now() < deadline + Duration::from_secs(5));
        drop(tx);
        let read = read_after(Duration::ZERO, rx).await;
        assert_eq!(read.len(), 16, "no more than the channel held");
    }
}
