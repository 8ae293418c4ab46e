//! End-to-end tests: the real `keel` binary, the simulated model server over
//! loopback, and the real `openai` Python SDK as the client.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::disallowed_methods,
    reason = "test harness: a failed setup step should fail the test loudly"
)]

mod anthropic;
mod chaos;
mod cli;
mod common;
mod crash;
mod dashboard;
mod deploy;
mod edges;
mod http;
mod loops;
mod observe;
mod output;
mod postgres;
mod screening;
mod sdk;
mod sim;
mod tasks;
mod tools;
mod traces;
mod wasm;
