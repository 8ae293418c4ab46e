//! End-to-end tests: the real `keel` binary, the simulated model server over
//! loopback, and the real `openai` Python SDK as the client.

mod cli;
mod common;
mod crash;
mod http;
mod sdk;
