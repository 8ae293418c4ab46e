//! The simulated model server on its own, for measuring keel by hand:
//! `cargo run --release -p keel-sim --example serve -- 127.0.0.1:9100`.

#![expect(
    clippy::print_stdout,
    reason = "an example that prints where it listens"
)]

use std::net::SocketAddr;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9100".to_owned())
        .parse()?;
    let sim = keel_sim::SimServer::start(addr).await?;
    println!("sim listening on {}", sim.base_url());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
