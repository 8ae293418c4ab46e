//! The listener, the connections, and the handle that controls them.
//!
//! Connections are served by hyper's HTTP/1 connection directly (not a framework router),
//! because two faults need hyper's raw behaviour: a service error closes the connection with
//! no response, and a body error aborts a chunked response mid-stream. Every task runs on a
//! [`TaskTracker`] and stops on one [`CancellationToken`], cancelled by
//! [`SimHandle::shutdown`] or when the last handle is dropped.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::fault::Fault;
use crate::routes;
use crate::state::Shared;

/// Starts simulated model servers.
#[derive(Debug, Clone, Copy, Default)]
pub struct SimServer;

/// Controls a running simulated server. Clones share the server; it stops when
/// [`shutdown`](SimHandle::shutdown) is called or the last clone is dropped.
#[derive(Debug, Clone)]
pub struct SimHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    life: Arc<Lifetime>,
}

/// Cancels the server when the last handle goes away.
#[derive(Debug)]
struct Lifetime {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl Drop for Lifetime {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

// === impl SimServer ===

impl SimServer {
    /// Binds `addr` (use `127.0.0.1:0` for a free port) and serves on the current tokio
    /// runtime until the handle is dropped or [`SimHandle::shutdown`] is called.
    ///
    /// Fails only if the address cannot be bound.
    pub async fn start(addr: SocketAddr) -> std::io::Result<SimHandle> {
        let listener = TcpListener::bind(addr).await?;
        Self::start_on(listener).await
    }

    /// Serves on an already bound `listener`, like [`SimServer::start`].
    pub async fn start_on(listener: TcpListener) -> std::io::Result<SimHandle> {
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let life = Arc::new(Lifetime {
            token: CancellationToken::new(),
            tracker: TaskTracker::new(),
        });
        life.tracker.spawn(accept_loop(
            listener,
            Arc::clone(&shared),
            life.token.clone(),
            life.tracker.clone(),
        ));
        Ok(SimHandle { addr, shared, life })
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    token: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            () = token.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                tracker.spawn(serve_connection(stream, Arc::clone(&shared), token.clone()));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "keel-sim: accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>, token: CancellationToken) {
    // SSE chunks must leave as soon as they are written.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "keel-sim: set_nodelay failed");
    }
    let service = service_fn(move |req| routes::handle(Arc::clone(&shared), req));
    let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        result = connection => {
            // Errors here are mostly the faults doing their job (dropped, cut).
            if let Err(e) = result {
                tracing::trace!(error = %e, "keel-sim: connection ended with an error");
            }
        }
        () = token.cancelled() => {}
    }
}

// === impl SimHandle ===

impl SimHandle {
    /// Installs (or, with `None`, removes) a fault policy consulted for every model
    /// request that no scripted or sticky fault covers.
    pub fn set_injector(&self, injector: Option<Arc<dyn crate::Injector>>) {
        self.shared.set_injector(injector);
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The OpenAI base URL, `http://IP:PORT/v1` (a loopback IP when bound to an
    /// unspecified address such as `0.0.0.0`).
    pub fn base_url(&self) -> String {
        let mut addr = self.addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
            });
        }
        format!("http://{addr}/v1")
    }

    /// Queues `faults` for `model`: its next requests get them, in order, then normal
    /// behaviour. Appends to what is already queued. `"*"` queues for every model; a
    /// model's own script and sticky fault win over `"*"`.
    pub fn script(&self, model: &str, faults: Vec<Fault>) {
        self.shared.script(model, faults);
    }

    /// Sets a sticky fault (an outage) for `model` (or `"*"`), applied to every request
    /// that has no scripted fault, until cleared with `None`.
    pub fn set_always(&self, model: &str, fault: Option<Fault>) {
        self.shared.set_always(model, fault);
    }

    /// Requests received for `model` (chat and embeddings), faulted ones included;
    /// `"*"` gives the total over all models.
    pub fn calls(&self, model: &str) -> u64 {
        self.shared.calls(model)
    }

    /// The `Authorization` header of the last request for `model` (without one, its
    /// `api-key`, as Azure OpenAI takes a key; for Anthropic's `/v1/messages`, its
    /// `x-api-key`), if it had one.
    pub fn last_authorization(&self, model: &str) -> Option<String> {
        self.shared.last_authorization(model)
    }

    /// The JSON body of the last request for `model`.
    pub fn last_request(&self, model: &str) -> Option<serde_json::Value> {
        self.shared.last_request(model)
    }

    /// Clears scripts, sticky faults, counters and recorded requests.
    pub fn reset(&self) {
        self.shared.reset();
    }

    /// Stops accepting, closes every connection (stalled streams included) and waits for
    /// the server's tasks to end. Other clones of this handle stop working too.
    pub async fn shutdown(self) {
        let life = Arc::clone(&self.life);
        drop(self);
        life.token.cancel();
        life.tracker.close();
        life.tracker.wait().await;
    }
}
