//! The HTTP client every provider kind reaches its upstream with, and the wire pieces
//! they share: reading a failed answer, `Retry-After`, and `text/event-stream` parsing.
//!
//! A provider kind decides its URLs (paths under `base_url`), how its key is sent and the
//! headers it always sends; this module builds the client (hyper's pooled client over
//! rustls, or reqwest for proxies and credentials in the URL) and posts JSON. It knows
//! nothing of any wire format's bodies.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use keel_config::ProviderSettings;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};

use crate::error::UpstreamError;

pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A response body, whichever client read it.
pub(super) type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// How long an idle pooled connection to a provider is kept.
const POOL_IDLE: Duration = Duration::from_secs(90);

/// What a provider kind tells [`HttpClient::try_new`] beside the provider's settings.
pub(super) struct ClientSpec<'a> {
    /// Paths appended to `base_url`, one URL each; [`HttpClient::post`] takes an index here.
    pub paths: &'a [&'static str],
    /// The header the API key goes in and the value it takes (`Authorization`, `Bearer
    /// {key}`), when the provider has a key.
    pub key: Option<(HeaderName, String)>,
    /// Headers this provider kind always sends (the provider's own `headers` win).
    pub fixed: &'a [(HeaderName, HeaderValue)],
}

/// One provider's HTTP client: where it posts and with which headers.
pub(super) struct HttpClient {
    transport: Transport,
    /// Sent with every request: the content type, the API key, the kind's fixed headers and
    /// the provider's own headers, each marked sensitive so it is never logged.
    headers: HeaderMap,
}

/// The HTTP client a provider is reached with, with its URLs (query parameters included)
/// parsed once in the form that client takes.
enum Transport {
    /// hyper's pooled HTTP/1.1 and HTTP/2 client over rustls: the common case. It costs
    /// a fraction of reqwest's work per request, which parses and prints the URL several
    /// times over for its redirect and proxy layers even when neither has work to do.
    Direct {
        client: Box<Client<Bounded, Full<Bytes>>>,
        urls: Vec<http::Uri>,
    },
    /// reqwest, for what the direct client does not do: a proxy from `HTTPS_PROXY`,
    /// `HTTP_PROXY` or `ALL_PROXY` (minus `NO_PROXY`) for this provider, and credentials
    /// written into the `base_url` (`https://user:password@host`, sent as Basic auth).
    Reqwest {
        client: reqwest::Client,
        urls: Vec<reqwest::Url>,
    },
}

/// The direct client's connector, with `timeouts.connect` over the whole connection: the TCP
/// connect and the TLS handshake (hyper's own connect timeout covers the TCP connect only, so
/// a server that accepts and then says nothing would hold the attempt until `attempt`).
#[derive(Clone)]
struct Bounded {
    inner: hyper_rustls::HttpsConnector<HttpConnector>,
    limit: Duration,
}

impl tower::Service<http::Uri> for Bounded {
    type Response = hyper_rustls::MaybeHttpsStream<hyper_util::rt::TokioIo<tokio::net::TcpStream>>;
    type Error = tower::BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let limit = self.limit;
        // Boxed once per new connection; pooled connections skip this.
        Box::pin(async move {
            match tokio::time::timeout(limit, connecting).await {
                Ok(connected) => connected,
                Err(_) => Err(format!(
                    "no connection within the connect timeout of {limit:?} (TCP and TLS)"
                )
                .into()),
            }
        })
    }
}

// === impl HttpClient ===

impl HttpClient {
    /// The headers every request carries.
    #[cfg(test)]
    pub(super) fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// Builds the client for `settings` with the connect timeout `connect`, through the
    /// proxies `proxies` names. Errors name the provider's key at fault.
    pub(super) fn try_new(
        settings: &ProviderSettings,
        connect: Duration,
        proxies: &Matcher,
        spec: &ClientSpec<'_>,
    ) -> Result<Self, String> {
        let headers = headers(settings, spec)?;
        let invalid = |url: &str, e: &dyn std::fmt::Display| {
            format!(
                "providers.{}.base_url: {url:?} is not a URL: {e}",
                settings.name
            )
        };
        let to_uri = |url: &reqwest::Url| {
            url.as_str()
                .parse::<http::Uri>()
                .map_err(|e| invalid(url.as_str(), &e))
        };
        let mut urls = Vec::with_capacity(spec.paths.len());
        for path in spec.paths {
            let text = format!("{}{path}", settings.base_url);
            let mut url = reqwest::Url::parse(&text).map_err(|e| invalid(&text, &e))?;
            // Only when there are some: `parse_with_params` ends every URL with a bare `?`.
            if !settings.query.is_empty() {
                url.query_pairs_mut().extend_pairs(&settings.query);
            }
            urls.push(url);
        }
        let Some(first) = urls.first() else {
            return Err(format!("providers.{}: no endpoint to reach", settings.name));
        };
        // Every path is on the base URL's host, so one proxy (or none) serves them all.
        let proxy = proxies.intercept(&to_uri(first)?);
        let userinfo = !first.username().is_empty() || first.password().is_some();
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
            // Per address tried (a host with several), beside the bound on the whole
            // connection below.
            http.set_connect_timeout(Some(connect));
            http.set_nodelay(true);
            // `https://` URLs pass through to the TLS layer.
            http.enforce_http(false);
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_webpki_roots()
                .https_or_http()
                .enable_all_versions()
                .wrap_connector(http);
            let https = Bounded {
                inner: https,
                limit: connect,
            };
            // No redirects and no retries: the direct client does neither, and keel's own
            // policies decide retries.
            let client = Client::builder(TokioExecutor::new())
                .pool_idle_timeout(POOL_IDLE)
                .pool_timer(TokioTimer::new())
                .build(https);
            Transport::Direct {
                client: Box::new(client),
                urls: urls.iter().map(to_uri).collect::<Result<_, _>>()?,
            }
        };
        Ok(Self { transport, headers })
    }

    /// Posts `body` to URL number `url` (an index into [`ClientSpec::paths`]); `Err` is a
    /// transport failure, described without the URL.
    pub(super) async fn post(
        &self,
        url: usize,
        body: Bytes,
    ) -> Result<http::Response<Body>, String> {
        match &self.transport {
            Transport::Direct { client, urls } => {
                let uri = urls.get(url).ok_or("no such endpoint")?;
                let mut request = http::Request::new(Full::new(body));
                *request.method_mut() = http::Method::POST;
                *request.uri_mut() = uri.clone();
                *request.headers_mut() = self.headers.clone();
                let response = client.request(request).await.map_err(|e| error_chain(&e))?;
                Ok(response.map(|b| b.map_err(BoxError::from).boxed()))
            }
            Transport::Reqwest { client, urls } => {
                let url = urls.get(url).ok_or("no such endpoint")?;
                let response = client
                    .post(url.clone())
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

    /// Whether requests go through hyper's client directly (no proxy, no URL credentials).
    #[cfg(test)]
    pub(super) fn is_direct(&self) -> bool {
        matches!(self.transport, Transport::Direct { .. })
    }

    /// The URLs requests go to, as text.
    #[cfg(test)]
    fn urls(&self) -> Vec<String> {
        match &self.transport {
            Transport::Direct { urls, .. } => urls.iter().map(ToString::to_string).collect(),
            Transport::Reqwest { urls, .. } => urls.iter().map(ToString::to_string).collect(),
        }
    }
}

/// The headers every request of a provider carries, each marked sensitive.
fn headers(settings: &ProviderSettings, spec: &ClientSpec<'_>) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some((name, value)) = &spec.key {
        let mut value = HeaderValue::from_str(value).map_err(|_| {
            format!(
                "providers.{}: api key is not a valid header value",
                settings.name
            )
        })?;
        value.set_sensitive(true);
        headers.insert(name.clone(), value);
    }
    for (name, value) in spec.fixed {
        headers.insert(name.clone(), value.clone());
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
    Ok(headers)
}

/// The most of an error answer's body keel reads: a provider's error object is well under a
/// kilobyte; a proxy's error page may not be, and a server that keeps sending must not grow
/// keel's memory.
pub(super) const ERROR_BODY_LIMIT: usize = 256 * 1024;

/// A non-success answer, read: its status, the `Retry-After` it asked for, and its body
/// (empty when it could not be read; its first [`ERROR_BODY_LIMIT`] bytes when longer).
pub(super) async fn failure(
    response: http::Response<Body>,
) -> (http::StatusCode, Option<Duration>, Bytes) {
    let status = response.status();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let mut body = response.into_body();
    let mut read = BytesMut::new();
    while read.len() < ERROR_BODY_LIMIT {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    read.extend_from_slice(&data);
                }
            }
            Some(Err(_)) => return (status, retry_after, Bytes::new()),
            None => break,
        }
    }
    read.truncate(ERROR_BODY_LIMIT);
    (status, retry_after, read.freeze())
}

/// Whether a successful answer to a stream request is a whole JSON document instead (a
/// server or proxy that ignores `stream: true`), and its body, whole again: told by its first
/// byte that is not whitespace (`{`), not by its `content-type`, which some servers set to
/// `application/json` over SSE frames (or leave out). An answer that says it is
/// `text/event-stream` is not looked into; one that ends before saying anything is left to
/// the stream's reading, and one that breaks off is a transport failure.
pub(super) async fn whole_json(
    response: http::Response<Body>,
    target: &str,
) -> Result<(bool, Body), UpstreamError> {
    use futures::StreamExt;
    use http_body_util::{BodyStream, StreamBody};
    let says_sse = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("text/event-stream"));
    let mut body = response.into_body();
    if says_sse {
        return Ok((false, body));
    }
    let mut head = BytesMut::new();
    let first = loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    head.extend_from_slice(&data);
                    if let Some(b) = head.iter().find(|b| !b.is_ascii_whitespace()) {
                        break Some(*b);
                    }
                }
            }
            Some(Err(e)) => {
                return Err(UpstreamError::connect(target, error_chain(e.as_ref())));
            }
            None => break None,
        }
    };
    let head = http_body::Frame::data(head.freeze());
    let whole = StreamBody::new(futures::stream::iter([Ok(head)]).chain(BodyStream::new(body)));
    Ok((first == Some(b'{'), BodyExt::boxed(whole)))
}

/// Reads a JSON answer's whole body; a body that breaks off is a transport failure named by
/// the answer's headers (`passed`), which came before it.
pub(super) async fn read_all(
    body: Body,
    target: &str,
    passed: &super::Passed,
) -> Result<Bytes, UpstreamError> {
    Ok(body
        .collect()
        .await
        .map_err(|e| {
            UpstreamError::connect(target, error_chain(e.as_ref())).with_passed(passed.clone())
        })?
        .to_bytes())
}

/// `Retry-After` as seconds, or as an HTTP date (the wait until then; none for a date
/// already past). A value too large for a `Duration` is as good as "very long": the retry
/// policy caps it.
pub(super) fn parse_retry_after(value: &str) -> Option<Duration> {
    retry_after_at(value, std::time::SystemTime::now())
}

/// [`parse_retry_after`] at `now`.
fn retry_after_at(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    let Ok(secs) = value.parse::<f64>() else {
        let at = httpdate::parse_http_date(value).ok()?;
        return Some(at.duration_since(now).unwrap_or(Duration::ZERO));
    };
    if secs.is_nan() || secs < 0.0 {
        return None;
    }
    Some(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
}

/// An error and its sources, `: `-joined. Callers strip URLs first (query parameters and
/// `user:pass@` in a provider's URL may hold keys, and this text reaches events and
/// clients); the direct client's errors never carry one.
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut detail = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        source = s.source();
    }
    detail
}

/// The most an event of a stream may hold before it ends (its data and the line being read):
/// far above any provider's chunk, and a bound on what a server that never ends an event
/// can make keel keep.
pub(super) const MAX_SSE_EVENT: usize = 8 * 1024 * 1024;

/// Incremental parser of `text/event-stream` (the WHATWG rules: lines end with `\r\n`, `\n`
/// or `\r`; a blank line ends an event; `:` starts a comment; a leading BOM is skipped),
/// keeping only `data` fields (the wire formats keel speaks repeat the event's name inside
/// its data). Each byte is looked at once, however the stream is cut into reads.
#[derive(Default)]
pub(super) struct SseParser {
    /// What came and is not read yet: the start of a line at most, between calls.
    buf: BytesMut,
    /// How much of `buf` is known to hold no line end.
    scanned: usize,
    /// The event being read: each of its data lines followed by `\n`.
    data: BytesMut,
    /// The last line ended with a `\r` that ended what had come: a `\n` next is its end too.
    after_cr: bool,
    /// Whether the stream's first bytes (where a BOM may be) have been read.
    started: bool,
}

/// The UTF-8 byte order mark a stream may start with.
const BOM: &[u8] = b"\xEF\xBB\xBF";

impl SseParser {
    /// Adds bytes as they arrived; an error when the event being read has grown past
    /// [`MAX_SSE_EVENT`] with no end in sight.
    pub(super) fn push(&mut self, chunk: &[u8]) -> Result<(), String> {
        self.buf.extend_from_slice(chunk);
        // What came may hold many whole events (one large read): only the event still open
        // counts, the part of it already read (`data`) and a line that has not ended.
        let open_line = !self.buf[self.scanned..]
            .iter()
            .any(|b| *b == b'\n' || *b == b'\r');
        let open = self.data.len() + if open_line { self.buf.len() } else { 0 };
        if open > MAX_SSE_EVENT {
            return Err(format!(
                "an event of the stream grew past {} MiB without ending",
                MAX_SSE_EVENT / (1024 * 1024)
            ));
        }
        Ok(())
    }

    /// The next complete event's data (multi-line data joined by `\n`), if any. Events
    /// with no data, or only empty data (keep-alives), are skipped.
    pub(super) fn next_data(&mut self) -> Option<Bytes> {
        use bytes::Buf;
        if !self.started {
            if self.buf.len() < BOM.len() && BOM.starts_with(&self.buf) {
                return None;
            }
            if self.buf.starts_with(BOM) {
                self.buf.advance(BOM.len());
            }
            self.started = true;
        }
        loop {
            if self.after_cr && !self.buf.is_empty() {
                if self.buf[0] == b'\n' {
                    self.buf.advance(1);
                }
                self.after_cr = false;
            }
            let Some(found) = self.buf[self.scanned..]
                .iter()
                .position(|b| *b == b'\n' || *b == b'\r')
            else {
                self.scanned = self.buf.len();
                return None;
            };
            let end = self.scanned + found;
            self.scanned = 0;
            let ending = match (self.buf[end], self.buf.get(end + 1)) {
                (b'\r', Some(b'\n')) => 2,
                (b'\r', None) => {
                    self.after_cr = true;
                    1
                }
                _ => 1,
            };
            let line = &self.buf[..end];
            if line.is_empty() {
                self.buf.advance(ending);
                // The event's end: its data without the last line's `\n`.
                let mut data = self.data.split();
                data.truncate(data.len().saturating_sub(1));
                if !data.is_empty() {
                    return Some(data.freeze());
                }
                continue;
            }
            let (field, value) = match line.iter().position(|b| *b == b':') {
                Some(colon) => {
                    let value = &line[colon + 1..];
                    (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
                }
                // A field alone (`data`): its value is empty.
                None => (line, &b""[..]),
            };
            // A comment's field is empty (the line starts with `:`).
            if field == b"data" {
                self.data.extend_from_slice(value);
                self.data.extend_from_slice(b"\n");
            }
            self.buf.advance(end + ending);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_parser_splits_across_chunks() {
        let mut p = SseParser::default();
        p.push(b"data: {\"a\"").unwrap();
        assert!(p.next_data().is_none());
        p.push(b":1}\n\n: keep-alive\n\ndata: [DONE]\n\n").unwrap();
        assert_eq!(p.next_data().unwrap().as_ref(), b"{\"a\":1}");
        assert_eq!(p.next_data().unwrap().as_ref(), b"[DONE]");
        assert!(p.next_data().is_none());
    }

    #[test]
    fn an_event_is_sent_on_as_the_data_it_came_with() {
        // One line, as nearly every provider sends: byte for byte as before.
        assert_eq!(
            &crate::finish::sse_frame(b"{\"a\":1}")[..],
            b"data: {\"a\":1}\n\n"
        );
        // Several lines (valid SSE, joined with `\n` by the parser): a `data:` line each, so
        // the client's parser joins them back into the same JSON.
        let joined = b"{\"a\":\n1}";
        let frame = crate::finish::sse_frame(joined);
        assert_eq!(&frame[..], b"data: {\"a\":\ndata: 1}\n\n");
        let mut p = SseParser::default();
        p.push(&frame).unwrap();
        assert_eq!(&p.next_data().unwrap()[..], joined);
    }

    #[test]
    fn sse_parser_handles_crlf_multiline_and_event_names() {
        let mut p = SseParser::default();
        p.push(b"data: one\r\ndata: two\r\n\r\nevent: ping\ndata: {\"type\":\"ping\"}\n\n")
            .unwrap();
        assert_eq!(p.next_data().unwrap().as_ref(), b"one\ntwo");
        assert_eq!(p.next_data().unwrap().as_ref(), b"{\"type\":\"ping\"}");
    }

    /// Every line ending the SSE standard allows, cut at every byte: the same events.
    #[test]
    fn sse_parser_reads_every_line_ending_however_the_stream_is_cut() {
        let streams: [&[u8]; 4] = [
            b"\xEF\xBB\xBFdata: {\"a\":1}\n\n: ping\n\ndata:x\ndata\ndata: y\n\ndata: [DONE]\n\n",
            b"data: {\"a\":1}\r\n\r\n: ping\r\n\r\ndata:x\r\ndata\r\ndata: y\r\n\r\ndata: [DONE]\r\n\r\n",
            b"data: {\"a\":1}\r\r: ping\r\rdata:x\rdata\rdata: y\r\rdata: [DONE]\r\r",
            b"data: {\"a\":1}\n\r\n: ping\r\rdata:x\r\ndata\ndata: y\r\n\ndata: [DONE]\r\n\r",
        ];
        let want: Vec<&[u8]> = vec![b"{\"a\":1}", b"x\n\ny", b"[DONE]"];
        for stream in streams {
            for cut in 0..=stream.len() {
                let mut p = SseParser::default();
                let mut got = Vec::new();
                for piece in [&stream[..cut], &stream[cut..]] {
                    p.push(piece).unwrap();
                    while let Some(data) = p.next_data() {
                        got.push(data);
                    }
                }
                assert_eq!(
                    got,
                    want,
                    "{:?} cut at {cut}",
                    String::from_utf8_lossy(stream)
                );
            }
            // One byte at a time.
            let mut p = SseParser::default();
            let mut got = Vec::new();
            for byte in stream {
                p.push(&[*byte]).unwrap();
                while let Some(data) = p.next_data() {
                    got.push(data);
                }
            }
            assert_eq!(
                got,
                want,
                "{:?} byte by byte",
                String::from_utf8_lossy(stream)
            );
        }
    }

    /// An event that never ends stops growing at its bound; one just under it is read.
    #[test]
    fn sse_parser_bounds_an_event_that_never_ends() {
        let mut p = SseParser::default();
        let piece = vec![b'x'; 64 * 1024];
        p.push(b"data: ").unwrap();
        let mut pushed = 6;
        let err = loop {
            match p.push(&piece) {
                Ok(()) => {
                    assert!(p.next_data().is_none());
                    pushed += piece.len();
                }
                Err(e) => break e,
            }
        };
        assert!(pushed <= MAX_SSE_EVENT, "{pushed}");
        assert!(err.contains("8 MiB"), "{err}");
        // Many data lines with no blank line count too.
        let mut p = SseParser::default();
        let line = [b"data: ".as_slice(), &piece, b"\n"].concat();
        let failed = (0..200).any(|_| {
            let pushed = p.push(&line);
            assert!(p.next_data().is_none());
            pushed.is_err()
        });
        assert!(failed);
        // One read of many whole events, more than the bound in all, is read.
        let mut p = SseParser::default();
        let event = [b"data: ".as_slice(), &piece, b"\n\n"].concat();
        p.push(&event.repeat(MAX_SSE_EVENT / event.len() + 2))
            .unwrap();
        let mut read = 0;
        while p.next_data().is_some() {
            read += 1;
        }
        assert_eq!(read, MAX_SSE_EVENT / event.len() + 2);
        let mut p = SseParser::default();
        let big = vec![b'y'; MAX_SSE_EVENT - 64];
        p.push(&[b"data: ".as_slice(), &big, b"\n\n"].concat())
            .unwrap();
        assert_eq!(p.next_data().unwrap().len(), big.len());
    }

    #[test]
    fn retry_after_seconds() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after("NaN"), None);
        // Too large for a Duration: "very long", which the retry policy caps, not a panic.
        assert_eq!(
            parse_retry_after("99999999999999999999"),
            Some(Duration::MAX)
        );
        assert_eq!(parse_retry_after("1e300"), Some(Duration::MAX));
    }

    #[test]
    fn retry_after_as_an_http_date_is_the_wait_until_then() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        assert_eq!(
            retry_after_at("Wed, 21 Oct 2015 07:28:03 GMT", now),
            Some(Duration::from_secs(3))
        );
        // Already past: retry at once, as for `Retry-After: 0`.
        assert_eq!(
            retry_after_at("Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after_at("Wed, 32 Oct 2015 07:28:00 GMT", now), None);
    }

    #[test]
    fn a_url_has_a_query_only_when_the_provider_sets_one() {
        let spec = ClientSpec {
            paths: &["/chat/completions"],
            key: None,
            fixed: &[],
        };
        let urls = |query: Vec<(String, String)>| {
            let settings = ProviderSettings {
                name: "p".to_owned(),
                kind: keel_config::ProviderKind::OpenAi,
                base_url: "http://127.0.0.1:9/v1".to_owned(),
                api_key: None,
                api_key_header: None,
                headers: Vec::new(),
                query,
                prices: std::collections::BTreeMap::new(),
            };
            let proxies = hyper_util::client::proxy::matcher::Matcher::builder().build();
            HttpClient::try_new(&settings, Duration::from_secs(1), &proxies, &spec)
                .unwrap()
                .urls()
        };
        assert_eq!(urls(Vec::new()), ["http://127.0.0.1:9/v1/chat/completions"]);
        let azure = vec![("api-version".to_owned(), "2024-10-21".to_owned())];
        assert_eq!(
            urls(azure),
            ["http://127.0.0.1:9/v1/chat/completions?api-version=2024-10-21"]
        );
    }

    /// An error answer's body is read up to its limit, and no further: a server that keeps
    /// sending (here, an endless body) cannot hold the attempt or grow keel's memory.
    #[tokio::test]
    async fn an_error_body_is_read_up_to_its_limit() {
        let chunk = Bytes::from(vec![b'x'; 16 * 1024]);
        let endless = futures::stream::repeat_with(move || {
            Ok::<_, BoxError>(http_body::Frame::data(chunk.clone()))
        });
        let mut response =
            http::Response::new(BodyExt::boxed(http_body_util::StreamBody::new(endless)));
        *response.status_mut() = http::StatusCode::BAD_GATEWAY;
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("3"));
        let (status, retry_after, body) = failure(response).await;
        assert_eq!(status, http::StatusCode::BAD_GATEWAY);
        assert_eq!(retry_after, Some(Duration::from_secs(3)));
        assert_eq!(body.len(), ERROR_BODY_LIMIT);
        // A short body is read whole.
        let mut response = http::Response::new(BodyExt::boxed(
            Full::new(Bytes::from_static(br#"{"error":{"message":"overloaded"}}"#))
                .map_err(|never| match never {}),
        ));
        *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
        let (_, retry_after, body) = failure(response).await;
        assert_eq!(retry_after, None);
        assert_eq!(body, r#"{"error":{"message":"overloaded"}}"#);
    }

    #[tokio::test]
    async fn a_whole_json_answer_is_told_from_sse_by_its_first_byte_and_kept_whole() {
        let answer = |content_type: &str, pieces: &[&'static [u8]]| {
            let frames = pieces
                .iter()
                .map(|p| Ok::<_, BoxError>(http_body::Frame::data(Bytes::from_static(p))))
                .collect::<Vec<_>>();
            let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
            let mut response = http::Response::new(BodyExt::boxed(body));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_str(content_type).unwrap());
            response
        };
        let whole = |body: Body| async move { body.collect().await.unwrap().to_bytes() };
        // JSON, in pieces, after a blank first piece: read as JSON, every byte kept.
        let (json, body) = whole_json(
            answer(
                "application/json; charset=utf-8",
                &[b"\n ", b"{\"choices\"", b": []}"],
            ),
            "p/m",
        )
        .await
        .unwrap();
        assert!(json);
        assert_eq!(whole(body).await, "\n {\"choices\": []}");
        // SSE frames under a JSON content type (some servers send them so): a stream.
        let (json, body) = whole_json(
            answer("Application/JSON", &[b"data: {}\n\n", b"data: [DONE]\n\n"]),
            "p/m",
        )
        .await
        .unwrap();
        assert!(!json);
        assert_eq!(whole(body).await, "data: {}\n\ndata: [DONE]\n\n");
        // The stream's own type is not looked into; text said to be plain is.
        let (json, _) = whole_json(answer("text/event-stream", &[b"{}"]), "p/m")
            .await
            .unwrap();
        assert!(!json);
        let (json, _) = whole_json(answer("text/plain", &[b"{}"]), "p/m")
            .await
            .unwrap();
        assert!(json);
    }

    #[tokio::test]
    async fn a_server_that_accepts_and_never_shakes_hands_is_a_connect_failure() {
        // A TCP connect that succeeds, and a TLS handshake that never comes.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let tasks = tokio_util::task::TaskTracker::new();
        let held = tasks.spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                open.push(socket);
            }
        });
        let settings = ProviderSettings {
            name: "p".to_owned(),
            kind: keel_config::ProviderKind::OpenAi,
            base_url: format!("https://127.0.0.1:{port}/v1"),
            api_key: None,
            api_key_header: None,
            headers: Vec::new(),
            query: Vec::new(),
            prices: std::collections::BTreeMap::new(),
        };
        let spec = ClientSpec {
            paths: &["/chat/completions"],
            key: None,
            fixed: &[],
        };
        let proxies = hyper_util::client::proxy::matcher::Matcher::builder().build();
        let client =
            HttpClient::try_new(&settings, Duration::from_millis(200), &proxies, &spec).unwrap();
        // Without a bound on the handshake the post would wait for ever (the attempt's
        // deadline is the caller's); the outer minute only keeps a broken build from hanging.
        let posted = tokio::time::timeout(
            Duration::from_secs(60),
            client.post(0, Bytes::from_static(b"{}")),
        )
        .await
        .expect("the handshake was not bounded by the connect timeout");
        let error = posted.err().unwrap_or_default();
        assert!(error.contains("connect timeout"), "{error}");
        held.abort();
    }

    #[test]
    fn the_provider_s_headers_win_over_the_kind_s_and_all_are_sensitive() {
        let settings = ProviderSettings {
            name: "p".to_owned(),
            kind: keel_config::ProviderKind::Anthropic,
            base_url: "http://127.0.0.1:9/v1".to_owned(),
            api_key: None,
            api_key_header: None,
            headers: vec![("anthropic-version".to_owned(), "2099-01-01".to_owned())],
            query: Vec::new(),
            prices: std::collections::BTreeMap::new(),
        };
        let spec = ClientSpec {
            paths: &["/messages"],
            key: Some((HeaderName::from_static("x-api-key"), "sk-1".to_owned())),
            fixed: &[(
                HeaderName::from_static("anthropic-version"),
                HeaderValue::from_static("2023-06-01"),
            )],
        };
        let headers = headers(&settings, &spec).unwrap();
        assert_eq!(headers["anthropic-version"], "2099-01-01");
        assert_eq!(headers["x-api-key"], "sk-1");
        assert!(headers["x-api-key"].is_sensitive());
        assert_eq!(headers[CONTENT_TYPE], "application/json");
    }
}
