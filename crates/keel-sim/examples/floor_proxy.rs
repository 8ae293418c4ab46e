//! The floor under keel's cost per call: a proxy that forwards `POST /v1/chat/completions`
//! to a model server with the parts keel is built on (axum's router, hyper's pooled client,
//! jemalloc) and nothing else: no parsing, retries, breaker, budgets, metrics or records.
//! `bench/ab.sh` runs it beside keel, so the difference is what keel's own work costs
//! (DEVELOPERS.md, "Where the gateway's CPU goes"):
//!
//! ```sh
//! cargo build --release -p keel-sim --example floor_proxy
//! bench/ab.sh target/release/examples/floor_proxy keel.toml target/release/keel keel.toml
//! ```
//!
//! It takes keel's arguments (`serve --config FILE`) and reads two settings of that file:
//! `[server] listen` (default `127.0.0.1:8420`) and the `base_url` of the provider that the
//! first target of route `bench` names (the route `bench/ab.sh` loads; set `ROUTE` for
//! another); `GET /readyz` answers 200. The request's `model` goes to the provider unchanged.

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Clone)]
struct Upstream {
    client: Client<HttpConnector, Full<Bytes>>,
    url: String,
}

async fn chat(State(up): State<Upstream>, request: Request) -> Response {
    let failed = |status: StatusCode, e: &dyn std::fmt::Display| {
        (status, format!("floor_proxy: {e}")).into_response()
    };
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => return failed(StatusCode::BAD_REQUEST, &e),
    };
    let forward = axum::http::Request::post(up.url.as_str())
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body));
    let forward = match forward {
        Ok(forward) => forward,
        Err(e) => return failed(StatusCode::INTERNAL_SERVER_ERROR, &e),
    };
    let answer = match up.client.request(forward).await {
        Ok(answer) => answer,
        Err(e) => return failed(StatusCode::BAD_GATEWAY, &e),
    };
    let status = answer.status();
    match answer.into_body().collect().await {
        Ok(body) => Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_bytes()))
            .unwrap_or_else(|e| failed(StatusCode::INTERNAL_SERVER_ERROR, &e)),
        Err(e) => failed(StatusCode::BAD_GATEWAY, &e),
    }
}

/// `[server] listen` and the `base_url` of the provider that route `route`'s first target
/// names, from a keel config's text.
fn settings(text: &str, route: &str) -> Result<(String, String), String> {
    let config: toml::Table = text.parse().map_err(|e| format!("not TOML: {e}"))?;
    let listen = config
        .get("server")
        .and_then(|server| server.get("listen"))
        .and_then(toml::Value::as_str)
        .unwrap_or("127.0.0.1:8420");
    let provider = config
        .get("routes")
        .and_then(|routes| routes.get(route))
        .and_then(|r| r.get("targets"))
        .and_then(toml::Value::as_array)
        .and_then(|targets| targets.first())
        .and_then(|target| target.get("provider"))
        .and_then(toml::Value::as_str)
        .ok_or_else(|| format!("no [routes.{route}] with a target naming a provider"))?;
    let provider_table = config
        .get("providers")
        .and_then(|providers| providers.get(provider))
        .ok_or_else(|| format!("no [providers.{provider}]"))?;
    let kind = provider_table.get("kind").and_then(toml::Value::as_str);
    if kind != Some("openai") {
        return Err(format!(
            "[providers.{provider}] is not of kind \"openai\" (this proxy speaks chat completions only)"
        ));
    }
    let base = provider_table
        .get("base_url")
        .and_then(toml::Value::as_str)
        .ok_or_else(|| format!("[providers.{provider}] has no base_url"))?;
    Ok((listen.to_owned(), base.to_owned()))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ["serve", "--config", config] = args.iter().map(String::as_str).collect::<Vec<_>>()[..]
    else {
        return Err("usage: floor_proxy serve --config FILE (keel's arguments)".into());
    };
    let route = std::env::var("ROUTE").unwrap_or_else(|_| "bench".to_owned());
    let text = std::fs::read_to_string(config).map_err(|e| format!("{config}: {e}"))?;
    let (listen, base) = settings(&text, &route).map_err(|e| format!("{config}: {e}"))?;
    let upstream = Upstream {
        client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        url: format!("{}/chat/completions", base.trim_end_matches('/')),
    };
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/readyz", get(|| async { StatusCode::OK }))
        .with_state(upstream);
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    axum::serve(listener, app).await?;
    Ok(())
}
