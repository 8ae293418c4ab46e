//! An example Wasm tool for keel: issues a refund.
//!
//! Build it and point a tool at it:
//!
//! ```text
//! rustup target add wasm32-wasip1
//! cargo build --release -p keel-example-refund --target wasm32-wasip1
//! # keel.toml
//! [tools.refund]
//! wasm = "../target/wasm32-wasip1/release/keel-example-refund.wasm"
//! side_effects = true
//! rules = ["args.amount <= 500", "args.currency in ['USD','EUR']"]
//! ```
//!
//! keel writes the call to standard input as JSON,
//! `{"args": {"order": "A-17", "amount": 20.5, "currency": "EUR"}, "task": ..., "agent": ..., "idempotency_key": ...}`,
//! and reads the answer from standard output. Args that make no sense end the program
//! with exit code 65 (`EX_DATAERR`) and the reason on standard error: keel reports the
//! call as the caller's mistake, not the tool's failure. The program runs in keel's
//! sandbox: it has no files, no network and no environment, only its input.

use std::io::{Read as _, Write as _};
use std::process::ExitCode;

use serde::Deserialize;
use serde_json::json;

/// What keel sends.
#[derive(Deserialize)]
struct Call {
    args: Refund,
    #[serde(default)]
    idempotency_key: Option<String>,
}

/// The refund asked for.
#[derive(Deserialize)]
struct Refund {
    order: String,
    amount: f64,
    currency: String,
}

/// Exit code for input that makes no sense (`EX_DATAERR` in `sysexits.h`).
const EX_DATAERR: u8 = 65;

fn main() -> ExitCode {
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        return refuse(&format!("cannot read the call: {e}"));
    }
    let call: Call = match serde_json::from_str(&input) {
        Ok(call) => call,
        Err(e) => return refuse(&format!("bad refund args: {e}")),
    };
    let refund = call.args;
    if !(refund.amount > 0.0 && refund.amount.is_finite()) {
        return refuse(&format!(
            "amount must be a positive number, got {}",
            refund.amount
        ));
    }
    if refund.order.trim().is_empty() {
        return refuse("order must name the order to refund");
    }
    // The same call (same key) always gets the same reference, so a retried refund is
    // recognisable downstream.
    let reference = format!(
        "rf-{:08x}",
        fnv1a(&format!(
            "{}|{}|{}|{}",
            refund.order,
            refund.amount,
            refund.currency,
            call.idempotency_key.as_deref().unwrap_or("")
        ))
    );
    let answer = json!({
        "refunded": refund.amount,
        "currency": refund.currency,
        "order": refund.order,
        "reference": reference,
    });
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{answer}").is_err() {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Says why on standard error and exits with [`EX_DATAERR`].
fn refuse(why: &str) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "{why}");
    ExitCode::from(EX_DATAERR)
}

/// 32-bit FNV-1a: a stable short hash for the reference.
fn fnv1a(text: &str) -> u32 {
    text.bytes().fold(0x811c_9dc5, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    })
}
