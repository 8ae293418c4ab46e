//! The floor under keel's cost per call: a proxy that forwards `POST /v1/chat/completions`
//! to a model server with the parts keel is built on (axum's router, hyper's pooled client,
//! mimalloc) and nothing else: no parsing, retries, breaker, budgets, metrics or records.
//! `bench/ab.sh` runs it beside keel, so the difference is what keel's own work costs
//! (DEVELOPERS.md, "Where the gateway's CPU goes"):
//!
//! ```sh
//! cargo build --release -p keel-sim --example floor_proxy
//! bench/ab.sh target/release/examples/floor_proxy keel.toml target/release/keel keel.toml
//! ```
//!
//! It takes keel's arguments (`serve --config FILE`) and reads two settings of that file:
//! `listen` and the first `base_url` (a provider of kind `openai`); `GET /readyz` answers 200.

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
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

/// The quoted value of the first line `key = "..."` of a TOML file's text.
fn setting<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        let (name, value) = line.split_once('=')?;
        (name.trim() == key).then(|| value.trim().trim_matches('"'))
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ["serve", "--config", config] = args.iter().map(String::as_str).collect::<Vec<_>>()[..]
    else {
        return Err("usage: floor_proxy serve --config FILE (keel's arguments)".into());
    };
    let text = std::fs::read_to_string(config).map_err(|e| format!("{config}: {e}"))?;
    let listen = setting(&text, "listen").unwrap_or("127.0.0.1:8420");
    let base = setting(&text, "base_url").ok_or_else(|| format!("{config}: no base_url"))?;
    let upstream = Upstream {
        client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        url: format!("{}/chat/completions", base.trim_end_matches('/')),
    };
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/readyz", get(|| async { StatusCode::OK }))
        .with_state(upstream);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    axum::serve(listener, app).await?;
    Ok(())
}
