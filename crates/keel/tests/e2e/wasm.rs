//! Wasm tools end to end: the example refund tool (Rust built for `wasm32-wasip1`) under
//! keel's rules, and hand-written modules showing the sandbox, retries and the timeout.

use serde_json::{Value, json};

use crate::common::{Keel, sim};

/// The example tool `cargo xtask test` builds (`examples/tools/refund`).
fn refund_wasm() -> String {
    std::env::var("KEEL_TEST_REFUND_WASM").expect(
        "KEEL_TEST_REFUND_WASM is not set: run `cargo xtask test`, which builds examples/tools/refund for wasm32-wasip1",
    )
}

const REFUND: &str = r#"

[tools.refund]
wasm = "{wasm}"
side_effects = true
rules = ["args.amount <= 500", "args.currency in ['USD','EUR']"]
"#;

async fn invoke(keel: &Keel, tool: &str, body: Value, key: Option<&str>) -> (u16, Value) {
    let mut headers = vec![("x-keel-agent", "support")];
    headers.extend(key.map(|key| ("idempotency-key", key)));
    keel.post_json(&format!("/v1/tools/{tool}/invoke"), &headers, &body)
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_example_refund_tool_runs_as_wasm_under_keels_rules() {
    let models = sim().await;
    let keel = Keel::start(&REFUND.replace("{wasm}", &refund_wasm()), &models).await;

    let args = json!({"order": "A-17", "amount": 20.5, "currency": "EUR"});
    let (status, answer) = invoke(
        &keel,
        "refund",
        json!({"task": "t1", "args": args}),
        Some("refund-A-17"),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["result"]["refunded"], 20.5, "{answer}");
    assert_eq!(answer["result"]["order"], "A-17");
    let reference = answer["result"]["reference"].as_str().unwrap().to_owned();
    assert!(reference.starts_with("rf-"), "{answer}");

    // Repeated with its key: the first answer, and the module is not run again.
    let (status, again) = invoke(
        &keel,
        "refund",
        json!({"task": "t1", "args": args}),
        Some("refund-A-17"),
    )
    .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["result"]["reference"], reference.as_str());

    // The rules stand in front of a Wasm tool as of an HTTP one.
    for (args, rule) in [
        (
            json!({"order": "A-18", "amount": 900, "currency": "EUR"}),
            "args.amount <= 500",
        ),
        (
            json!({"order": "A-19", "amount": 10, "currency": "GBP"}),
            "args.currency in ['USD','EUR']",
        ),
    ] {
        let (status, answer) =
            invoke(&keel, "refund", json!({"task": "t1", "args": args}), None).await;
        assert_eq!(status, 403, "{answer}");
        assert_eq!(answer["rules"], json!([rule]), "{answer}");
    }

    // Args the tool itself refuses (exit 65): the reason it gave, and no breaker count.
    let (status, answer) = invoke(
        &keel,
        "refund",
        json!({"task": "t1", "args": {"order": " ", "amount": 5, "currency": "USD"}}),
        None,
    )
    .await;
    assert_eq!(status, 502, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("refused its args (exit code 65): order must name the order to refund"),
        "{message}"
    );

    let invoked = keel.events_of("tool_invoked");
    assert_eq!(invoked.len(), 2, "the replay ran nothing: {invoked:?}");
    assert_eq!(invoked[0]["outcome"], "ok");
    assert_eq!(invoked[0]["result"]["reference"], reference.as_str());
    assert_eq!(invoked[1]["outcome"], "error");
    assert_eq!(keel.events_of("action_blocked").len(), 2);
}

/// Writes `{"preopen": ERRNO, "environ": COUNT}`: the errno of asking for a preopened
/// directory at fd 3 (8, EBADF, when there is none) and how many environment variables
/// the module sees.
const PROBE: &str = r#"
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_prestat_get" (func $prestat (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "{\"preopen\":")
  (data (i32.const 120) ",\"environ\":")
  (data (i32.const 140) "}")
  (func $write (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func $number (param $v i32) (param $end i32)
    (local $p i32)
    (local.set $p (local.get $end))
    (loop $digit
      (local.set $p (i32.sub (local.get $p) (i32.const 1)))
      (i32.store8 (local.get $p) (i32.add (i32.const 48) (i32.rem_u (local.get $v) (i32.const 10))))
      (local.set $v (i32.div_u (local.get $v) (i32.const 10)))
      (br_if $digit (i32.ne (local.get $v) (i32.const 0))))
    (call $write (local.get $p) (i32.sub (local.get $end) (local.get $p))))
  (func (export "_start")
    (local $errno i32)
    (local.set $errno (call $prestat (i32.const 3) (i32.const 500)))
    (drop (call $environ (i32.const 600) (i32.const 604)))
    (call $write (i32.const 100) (i32.const 11))
    (call $number (local.get $errno) (i32.const 300))
    (call $write (i32.const 120) (i32.const 11))
    (call $number (i32.load (i32.const 600)) (i32.const 400))
    (call $write (i32.const 140) (i32.const 1))))
"#;

/// Says "database busy" on stderr and exits 75 (EX_TEMPFAIL): a failure worth a retry.
const BUSY: &str = r#"
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "database busy\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 100))
    (i32.store (i32.const 4) (i32.const 14))
    (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))
    (call $exit (i32.const 75))))
"#;

/// Never ends.
const SPIN: &str =
    r#"(module (memory (export "memory") 1) (func (export "_start") (loop $l (br $l))))"#;

const SANDBOX: &str = r#"

[tools.probe]
wasm = "probe.wat"

[tools.busy]
wasm = "busy.wat"
retry = { max_attempts = 3, base = "10ms", cap = "20ms" }

[tools.spin]
wasm = "spin.wat"
timeout = "300ms"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn wasm_tools_run_sandboxed_are_retried_on_tempfail_and_stopped_at_their_timeout() {
    let models = sim().await;
    let dir = tempfile::tempdir().unwrap();
    // Module paths are relative to the config file.
    for (file, text) in [("probe.wat", PROBE), ("busy.wat", BUSY), ("spin.wat", SPIN)] {
        std::fs::write(dir.path().join(file), text).unwrap();
    }
    let keel = Keel::start_in(dir, SANDBOX, &models).await;

    // No directory, no environment (keel's own has keys in it).
    let (status, answer) = invoke(&keel, "probe", json!({"args": {}}), None).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["result"],
        json!({"preopen": 8, "environ": 0}),
        "{answer}"
    );

    let (status, answer) = invoke(&keel, "busy", json!({"args": {}}), None).await;
    assert_eq!(status, 502, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("failed for now (exit code 75): database busy"),
        "{message}"
    );
    let busy = keel.events_of("tool_invoked");
    assert_eq!(busy[1]["tool"], "busy");
    assert_eq!(
        busy[1]["attempts"], 3,
        "EX_TEMPFAIL is retried: {}",
        busy[1]
    );

    let (status, answer) = invoke(&keel, "spin", json!({"args": {}}), None).await;
    assert_eq!(status, 504, "{answer}");
    assert_eq!(answer["error"]["code"], "tool_timeout", "{answer}");

    // The spinning module was stopped: keel still runs tools.
    let (status, answer) = invoke(&keel, "probe", json!({"args": {}}), None).await;
    assert_eq!(status, 200, "{answer}");
}
