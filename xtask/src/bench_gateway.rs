//! An HTTP/1.1 load generator for `POST /v1/chat/completions`, used by the gateway-overhead
//! benchmark to compare the simulated model server directly against the same server behind keel.
//!
//! Two shapes of load:
//! - [`fixed_rate`]: open loop. Requests are scheduled at a fixed rate and sent on schedule
//!   whatever the responses do; latency is measured from the *scheduled* send time, so a stall
//!   shows up as the queueing it causes instead of being hidden by a client that waits
//!   ("coordinated omission").
//! - [`saturate`]: closed loop. `C` connections each send the next request as soon as the last
//!   answered; this measures throughput.
//!
//! Only plain `http://` on loopback: this is a benchmark of keel, not of TLS. Every loop is
//! bounded in count and time and stops by itself. Latencies go into an HDR histogram in
//! microseconds; only 2xx answers with a fully read body count as successes.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, Uri, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until, timeout_at};

/// Connections the open-loop generator sends over. HTTP/1.1 has one request in flight per
/// connection, so this bounds concurrency when the server falls behind the schedule.
const OPEN_LOOP_CONNECTIONS: usize = 64;

/// The longest one request may take before it counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// After the schedule ends, how long queued requests may still take to finish.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// Histogram range: 1 µs to 60 s, 3 significant digits.
const HIST_MAX_US: u64 = 60_000_000;

/// What one load run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadResult {
    /// Requests sent (or, open loop, scheduled).
    pub sent: u64,
    /// Requests answered 2xx with the body fully read.
    pub ok: u64,
    /// Requests that failed: connection errors, timeouts, non-2xx answers.
    pub errors: u64,
    /// From the first send to the last answer.
    pub elapsed: Duration,
    /// Successful requests per second over `elapsed`.
    pub throughput: f64,
    /// Median latency of successful requests, in microseconds.
    pub p50_us: u64,
    /// 99th percentile latency of successful requests, in microseconds.
    pub p99_us: u64,
    /// Largest latency of a successful request, in microseconds.
    pub max_us: u64,
}

/// Sends `rate` requests per second for `duration`, open loop, to `url`
/// (`http://host:port/v1/chat/completions`), each with `body` as its JSON body.
pub async fn fixed_rate(
    url: &str,
    body: Bytes,
    rate: u32,
    duration: Duration,
) -> anyhow::Result<LoadResult> {
    if rate == 0 {
        bail!("rate must be at least 1 request per second");
    }
    let target = Arc::new(Target::parse(url, body)?);
    let total = (f64::from(rate) * duration.as_secs_f64()).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let start = Instant::now();
    let hard_deadline = start + duration + DRAIN_GRACE;

    let (schedule, queue) = mpsc::unbounded_channel::<Instant>();
    let queue = Arc::new(Mutex::new(queue));
    let mut workers = JoinSet::new();
    for _ in 0..OPEN_LOOP_CONNECTIONS {
        let target = Arc::clone(&target);
        let queue = Arc::clone(&queue);
        workers.spawn(open_loop_worker(target, queue, hard_deadline));
    }
    for i in 0..total {
        let at = start + interval.mul_f64(i as f64);
        sleep_until(at).await;
        if schedule.send(at).is_err() {
            break; // every worker is gone; join_all reports why
        }
    }
    drop(schedule);
    let stats = join_all(workers).await?;
    Ok(stats.finish(total, start))
}

/// Keeps `connections` connections busy for `duration`, closed loop, against `url`
/// (`http://host:port/v1/chat/completions`), each request with `body` as its JSON body.
pub async fn saturate(
    url: &str,
    body: Bytes,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<LoadResult> {
    if connections == 0 {
        bail!("saturation needs at least one connection");
    }
    let target = Arc::new(Target::parse(url, body)?);
    let start = Instant::now();
    let deadline = start + duration;
    let mut workers = JoinSet::new();
    for _ in 0..connections {
        workers.spawn(closed_loop_worker(Arc::clone(&target), deadline));
    }
    let stats = join_all(workers).await?;
    let sent = stats.ok + stats.errors;
    Ok(stats.finish(sent, start))
}

// === workers ===

async fn open_loop_worker(
    target: Arc<Target>,
    queue: Arc<Mutex<mpsc::UnboundedReceiver<Instant>>>,
    hard_deadline: Instant,
) -> anyhow::Result<Stats> {
    let mut stats = Stats::new()?;
    let mut conn = None;
    loop {
        // Holding the lock while waiting is fine: the waiting worker is next in line anyway.
        let Some(scheduled) = queue.lock().await.recv().await else {
            return Ok(stats);
        };
        let give_up = (scheduled + REQUEST_TIMEOUT).min(hard_deadline);
        match send_one(&target, &mut conn, give_up).await {
            Outcome::Ok => stats.record(scheduled.elapsed()),
            Outcome::Failed => stats.errors += 1,
        }
    }
}

async fn closed_loop_worker(target: Arc<Target>, deadline: Instant) -> anyhow::Result<Stats> {
    let mut stats = Stats::new()?;
    let mut conn = None;
    while Instant::now() < deadline {
        let sent_at = Instant::now();
        match send_one(&target, &mut conn, sent_at + REQUEST_TIMEOUT).await {
            Outcome::Ok => stats.record(sent_at.elapsed()),
            Outcome::Failed => {
                stats.errors += 1;
                // Don't spin on a refused connection.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    Ok(stats)
}

enum Outcome {
    Ok,
    Failed,
}

/// Sends one request over `conn`, (re)connecting when there is none; drops the connection on
/// any failure so the next request starts clean.
async fn send_one(target: &Target, conn: &mut Option<Conn>, give_up: Instant) -> Outcome {
    let result = timeout_at(give_up, async {
        let conn = match conn {
            Some(conn) => conn,
            None => conn.insert(Conn::open(target).await?),
        };
        conn.send(target).await
    })
    .await;
    match result {
        Ok(Ok(true)) => Outcome::Ok,
        Ok(Ok(false)) => Outcome::Failed, // non-2xx: the connection itself is fine
        Ok(Err(_)) | Err(_) => {
            *conn = None;
            Outcome::Failed
        }
    }
}

async fn join_all(mut workers: JoinSet<anyhow::Result<Stats>>) -> anyhow::Result<Stats> {
    let mut total = Stats::new()?;
    while let Some(joined) = workers.join_next().await {
        total.merge(joined.context("load worker panicked")??)?;
    }
    Ok(total)
}

// === impl Target ===

/// Where and what to send.
struct Target {
    /// `host:port` to connect to.
    authority: String,
    /// The request target, e.g. `/v1/chat/completions`.
    path: String,
    body: Bytes,
}

impl Target {
    fn parse(url: &str, body: Bytes) -> anyhow::Result<Target> {
        let uri: Uri = url.parse().with_context(|| format!("bad URL {url:?}"))?;
        if uri.scheme_str() != Some("http") {
            bail!("the load generator speaks plain http:// only, not {url:?}");
        }
        let host = uri.host().with_context(|| format!("no host in {url:?}"))?;
        let port = uri.port_u16().unwrap_or(80);
        let path = uri
            .path_and_query()
            .map_or("/", |path| path.as_str())
            .to_owned();
        Ok(Target {
            authority: format!("{host}:{port}"),
            path,
            body,
        })
    }

    fn request(&self) -> anyhow::Result<Request<Full<Bytes>>> {
        Request::post(self.path.as_str())
            .header(header::HOST, self.authority.as_str())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, "Bearer bench")
            .body(Full::new(self.body.clone()))
            .context("building the request")
    }
}

// === impl Conn ===

/// One HTTP/1.1 connection. Dropping it aborts the task that drives it.
struct Conn {
    sender: SendRequest<Full<Bytes>>,
    _driver: JoinSet<()>,
}

impl Conn {
    async fn open(target: &Target) -> anyhow::Result<Conn> {
        let stream = TcpStream::connect(target.authority.as_str()).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        let mut driver = JoinSet::new();
        driver.spawn(async move {
            // An error here surfaces on the next send; nothing to do with it here.
            let _ = connection.await;
        });
        Ok(Conn {
            sender,
            _driver: driver,
        })
    }

    /// Sends one request and reads the whole body; `Ok(false)` for a non-2xx answer.
    async fn send(&mut self, target: &Target) -> anyhow::Result<bool> {
        self.sender.ready().await?;
        let response = self.sender.send_request(target.request()?).await?;
        let ok = response.status().is_success();
        response.into_body().collect().await?;
        Ok(ok)
    }
}

// === impl Stats ===

/// Counts and a latency histogram, per worker, merged at the end.
struct Stats {
    ok: u64,
    errors: u64,
    latency_us: Histogram<u64>,
    last_done: Option<Instant>,
}

impl Stats {
    fn new() -> anyhow::Result<Stats> {
        Ok(Stats {
            ok: 0,
            errors: 0,
            latency_us: Histogram::new_with_bounds(1, HIST_MAX_US, 3)
                .context("creating the latency histogram")?,
            last_done: None,
        })
    }

    fn record(&mut self, latency: Duration) {
        self.ok += 1;
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_us.saturating_record(micros.max(1));
        self.last_done = Some(Instant::now());
    }

    fn merge(&mut self, other: Stats) -> anyhow::Result<()> {
        self.ok += other.ok;
        self.errors += other.errors;
        self.latency_us
            .add(&other.latency_us)
            .context("merging latency histograms")?;
        self.last_done = self.last_done.max(other.last_done);
        Ok(())
    }

    /// The result; requests that neither succeeded nor failed (dropped at the hard deadline)
    /// count as errors.
    fn finish(self, sent: u64, start: Instant) -> LoadResult {
        let elapsed = self.last_done.unwrap_or_else(Instant::now) - start;
        let errors = self.errors + sent.saturating_sub(self.ok + self.errors);
        let throughput = if elapsed.is_zero() {
            0.0
        } else {
            self.ok as f64 / elapsed.as_secs_f64()
        };
        LoadResult {
            sent,
            ok: self.ok,
            errors,
            elapsed,
            throughput,
            p50_us: self.latency_us.value_at_quantile(0.50),
            p99_us: self.latency_us.value_at_quantile(0.99),
            max_us: self.latency_us.max(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper::{Response, StatusCode};
    use tokio::net::TcpListener;

    use super::*;

    /// A tiny HTTP/1.1 server on loopback answering every request with `status`.
    async fn serve(status: StatusCode) -> (String, JoinSet<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                conns.spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| async move {
                        let _ = req.into_body().collect().await;
                        let mut response = Response::new(Full::new(Bytes::from_static(b"{}")));
                        *response.status_mut() = status;
                        Ok::<_, Infallible>(response)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (format!("http://{addr}/v1/chat/completions"), tasks)
    }

    fn body() -> Bytes {
        Bytes::from_static(br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#)
    }

    #[tokio::test]
    async fn fixed_rate_sends_the_scheduled_number_of_requests() {
        let (url, _server) = serve(StatusCode::OK).await;
        let result = fixed_rate(&url, body(), 200, Duration::from_millis(500))
            .await
            .unwrap();
        assert_eq!(result.sent, 100);
        assert_eq!(result.ok, 100);
        assert_eq!(result.errors, 0);
        assert!(result.p50_us > 0 && result.p50_us <= result.p99_us);
        assert!(result.p99_us <= result.max_us);
    }

    #[tokio::test]
    async fn saturate_keeps_connections_busy_until_the_deadline() {
        let (url, _server) = serve(StatusCode::OK).await;
        let result = saturate(&url, body(), 4, Duration::from_millis(300))
            .await
            .unwrap();
        assert!(result.ok > 10, "{result:?}");
        assert_eq!(result.errors, 0);
        assert!(result.throughput > 0.0);
    }

    #[tokio::test]
    async fn non_success_answers_count_as_errors() {
        let (url, _server) = serve(StatusCode::SERVICE_UNAVAILABLE).await;
        let result = fixed_rate(&url, body(), 100, Duration::from_millis(200))
            .await
            .unwrap();
        assert_eq!(result.ok, 0);
        assert_eq!(result.errors, result.sent);
    }

    #[tokio::test]
    async fn refused_connections_count_as_errors_and_stop_in_time() {
        // Bind then drop to get a port nobody listens on.
        let port = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
        let started = Instant::now();
        let result = saturate(&url, body(), 2, Duration::from_millis(100))
            .await
            .unwrap();
        assert_eq!(result.ok, 0);
        assert!(result.errors > 0);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn rejects_https_and_parses_path() {
        assert!(Target::parse("https://127.0.0.1/v1", body()).is_err());
        let target = Target::parse("http://127.0.0.1:9/v1/chat/completions", body()).unwrap();
        assert_eq!(target.authority, "127.0.0.1:9");
        assert_eq!(target.path, "/v1/chat/completions");
    }
}
