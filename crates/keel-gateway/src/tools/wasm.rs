//! Wasm tools: `[tools.NAME] wasm = "tools/refund.wasm"`.
//!
//! A Wasm tool is a WASI (preview 1) command module, the kind `cargo build --target
//! wasm32-wasip1` makes of a `main`: keel writes the call as JSON to its standard input
//! (`{"args": {...}, "task": ..., "agent": ..., "idempotency_key": ...}`, what an HTTP
//! tool is POSTed) and reads its answer, JSON, from its standard output. Each call runs
//! in a fresh instance, so nothing carries over from one call to the next, inside a
//! sandbox: no files (no directory is opened to it), no network, no environment
//! variables, at most [`MEMORY_LIMIT`] of memory, and the tool's `timeout` enforced by
//! wasmtime's epoch interruption (a module that spins is stopped, not waited for).
//!
//! The exit code says how the call went: 0 is success; 75 (`EX_TEMPFAIL` in
//! `sysexits.h`) is a temporary failure that keel may retry as it would an HTTP 503;
//! 64 and 65 (`EX_USAGE`, `EX_DATAERR`) mean the args were wrong, the caller's fault,
//! not counted against the tool's circuit breaker; any other exit or a trap is the
//! tool's failure. What the module wrote to standard error goes into the error message.

use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use wasmtime::{Engine, InstancePre, Linker, Module, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p1::{self, WasiP1Ctx};
use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};

/// The most linear memory one call of a Wasm tool may use.
pub const MEMORY_LIMIT: usize = 128 * 1024 * 1024;

/// How often the epoch advances: the resolution of a Wasm tool's timeout.
const TICK: Duration = Duration::from_millis(10);

/// Exit code of a temporary failure (`EX_TEMPFAIL`): the call may be retried.
pub const EXIT_TEMPFAIL: i32 = 75;
/// Exit codes that blame the args (`EX_USAGE`, `EX_DATAERR`).
pub const EXIT_BAD_ARGS: [i32; 2] = [64, 65];

/// The engine every Wasm tool of one keel shares, with the clock that interrupts
/// modules running past their deadline.
pub(crate) struct WasmRuntime {
    engine: Engine,
    linker: Linker<Sandbox>,
    /// Keeps the epoch ticker running; the ticker stops once this is dropped.
    _alive: Arc<()>,
}

/// What one call's store holds: its WASI context and its memory limits.
struct Sandbox {
    wasi: WasiP1Ctx,
    limits: StoreLimits,
}

/// A compiled Wasm tool, ready to instantiate.
pub(crate) struct WasmTool {
    engine: Engine,
    pre: InstancePre<Sandbox>,
    name: String,
}

/// How one run of a Wasm tool ended.
#[derive(Debug)]
pub(crate) enum Ran {
    /// The module exited with this code, having written `stdout` and `stderr`.
    Exited {
        /// 0 for a normal return from `_start`.
        code: i32,
        /// What it wrote to standard output.
        stdout: Bytes,
        /// What it wrote to standard error.
        stderr: Bytes,
        /// Whether standard output reached its limit (the module was cut off).
        stdout_full: bool,
    },
    /// Stopped at its deadline.
    TimedOut,
    /// The module trapped (a Rust panic, `unreachable`, out of bounds, out of memory).
    Trapped {
        /// wasmtime's account of the trap.
        message: String,
        /// What it wrote to standard error before.
        stderr: Bytes,
    },
}

impl WasmRuntime {
    /// An engine with epoch interruption, and a thread advancing its epoch every
    /// [`TICK`] for as long as the runtime lives.
    pub(crate) fn new() -> Result<Self, String> {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        let engine =
            Engine::new(&config).map_err(|e| format!("cannot start the Wasm engine: {e}"))?;
        let mut linker: Linker<Sandbox> = Linker::new(&engine);
        p1::add_to_linker_sync(&mut linker, |s: &mut Sandbox| &mut s.wasi)
            .map_err(|e| format!("cannot set up WASI: {e}"))?;
        let alive = Arc::new(());
        let ticking = Arc::downgrade(&alive);
        let ticker = engine.clone();
        std::thread::Builder::new()
            .name("keel-wasm-epoch".to_owned())
            .spawn(move || tick(&ticker, &ticking))
            .map_err(|e| format!("cannot start the Wasm epoch thread: {e}"))?;
        Ok(Self {
            engine,
            linker,
            _alive: alive,
        })
    }

    /// Compiles the module at `path` (binary `.wasm` or text `.wat`) and checks that it
    /// is a WASI command keel can run.
    pub(crate) fn load(&self, name: &str, path: &Path) -> Result<WasmTool, String> {
        let bytes = std::fs::read(path)
            .map_err(|e| format!("cannot read the module {}: {e}", path.display()))?;
        let module = Module::new(&self.engine, &bytes).map_err(|e| {
            format!(
                "{} is not a valid Wasm module: {}",
                path.display(),
                first_line(&e)
            )
        })?;
        if module.get_export("_start").is_none() {
            return Err(format!(
                "{} has no _start export: keel runs WASI command modules (a program with a main, built with e.g. cargo build --target wasm32-wasip1)",
                path.display()
            ));
        }
        let pre = self.linker.instantiate_pre(&module).map_err(|e| {
            format!(
                "{} needs imports keel does not give (a Wasm tool may import only WASI preview 1, wasi_snapshot_preview1): {}",
                path.display(),
                first_line(&e)
            )
        })?;
        Ok(WasmTool {
            engine: self.engine.clone(),
            pre,
            name: name.to_owned(),
        })
    }
}

/// Advances the engine's epoch until the runtime is dropped.
fn tick(engine: &Engine, alive: &Weak<()>) {
    while alive.strong_count() > 0 {
        std::thread::sleep(TICK);
        engine.increment_epoch();
    }
}

fn first_line(e: &wasmtime::Error) -> String {
    format!("{e:#}").lines().next().unwrap_or("").to_owned()
}

impl WasmTool {
    /// Runs the module once with `input` on standard input, stopping it after `timeout`;
    /// `max_answer` bounds its standard output. Blocking: call it off the async threads.
    pub(crate) fn run(&self, input: Vec<u8>, timeout: Duration, max_answer: usize) -> Ran {
        let stdout = MemoryOutputPipe::new(max_answer);
        let stderr = MemoryOutputPipe::new(STDERR_LIMIT);
        let wasi = WasiCtxBuilder::new()
            .stdin(MemoryInputPipe::new(input))
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .args(&[self.name.as_str()])
            .build_p1();
        let limits = StoreLimitsBuilder::new()
            .memory_size(MEMORY_LIMIT)
            .instances(1)
            .build();
        let mut store = Store::new(&self.engine, Sandbox { wasi, limits });
        store.limiter(|s| &mut s.limits);
        let ticks = timeout.as_nanos().div_ceil(TICK.as_nanos()).max(1);
        store.set_epoch_deadline(u64::try_from(ticks).unwrap_or(u64::MAX));
        store.epoch_deadline_trap();
        let outcome = self
            .pre
            .instantiate(&mut store)
            .and_then(|instance| instance.get_typed_func::<(), ()>(&mut store, "_start"))
            .and_then(|start| start.call(&mut store, ()));
        let code = match outcome {
            Ok(()) => 0,
            Err(e) => {
                if let Some(exit) = e.downcast_ref::<wasmtime_wasi::I32Exit>() {
                    exit.0
                } else if e.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::Interrupt) {
                    return Ran::TimedOut;
                } else {
                    return Ran::Trapped {
                        message: trap_message(&e),
                        stderr: stderr.contents(),
                    };
                }
            }
        };
        let out = stdout.contents();
        Ran::Exited {
            code,
            stdout_full: out.len() >= max_answer,
            stdout: out,
            stderr: stderr.contents(),
        }
    }
}

/// The most of a Wasm tool's standard error keel keeps.
const STDERR_LIMIT: usize = 64 * 1024;

/// A trap in one line: its kind, and the innermost message.
fn trap_message(e: &wasmtime::Error) -> String {
    let mut message = match e.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => trap.to_string(),
        None => e.root_cause().to_string(),
    };
    if let Some(line) = message.lines().next() {
        message = line.to_owned();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A WASI command that writes its standard input back wrapped as `{"echo": INPUT}`.
    const ECHO: &str = r#"
    (module
      (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 2)
      (data (i32.const 16) "{\"echo\":")
      (data (i32.const 32) "}")
      (func $write (param $ptr i32) (param $len i32)
        (i32.store (i32.const 0) (local.get $ptr))
        (i32.store (i32.const 4) (local.get $len))
        (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))
      (func (export "_start")
        (local $n i32)
        (call $write (i32.const 16) (i32.const 8))
        (block $done
          (loop $more
            (i32.store (i32.const 40) (i32.const 1024))
            (i32.store (i32.const 44) (i32.const 60000))
            (drop (call $fd_read (i32.const 0) (i32.const 40) (i32.const 1) (i32.const 48)))
            (local.set $n (i32.load (i32.const 48)))
            (br_if $done (i32.eqz (local.get $n)))
            (call $write (i32.const 1024) (local.get $n))
            (br $more)))
        (call $write (i32.const 32) (i32.const 1))))
    "#;

    fn tool(wat: &str) -> WasmTool {
        let runtime = WasmRuntime::new().expect("engine");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tool.wat");
        std::fs::write(&path, wat).expect("write");
        let tool = runtime.load("t", &path).expect("load");
        // The ticker stops with the runtime; a tool outliving it in a test would never
        // time out, so the runtime is leaked for the test's length.
        std::mem::forget(runtime);
        tool
    }

    #[test]
    fn a_command_gets_its_input_and_answers_on_stdout() {
        let ran = tool(ECHO).run(
            br#"{"args":{"n":1}}"#.to_vec(),
            Duration::from_secs(5),
            1024,
        );
        let Ran::Exited { code, stdout, .. } = ran else {
            panic!("expected an exit, got {ran:?}")
        };
        assert_eq!(code, 0);
        assert_eq!(&stdout[..], br#"{"echo":{"args":{"n":1}}}"#);
    }

    #[test]
    fn a_module_that_spins_is_stopped_at_its_deadline() {
        let spin = r#"(module (memory 1) (func (export "_start") (loop $l (br $l))))"#;
        let ran = tool(spin).run(Vec::new(), Duration::from_millis(50), 1024);
        assert!(matches!(ran, Ran::TimedOut), "{ran:?}");
    }

    #[test]
    fn memory_beyond_the_limit_is_refused() {
        // memory.grow answers -1 when the limiter refuses; the module exits with that.
        let grow = r#"
        (module
          (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
          (memory (export "memory") 1)
          (func (export "_start")
            (call $exit (i32.add (i32.const 10) (memory.grow (i32.const 4096))))))"#;
        let ran = tool(grow).run(Vec::new(), Duration::from_secs(5), 1024);
        assert!(
            matches!(ran, Ran::Exited { code: 9, .. }),
            "growing by 256 MiB must fail (-1 + 10 = 9): {ran:?}"
        );
    }

    #[test]
    fn modules_that_are_not_commands_are_refused_with_the_reason() {
        let runtime = WasmRuntime::new().expect("engine");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("lib.wat");
        std::fs::write(&path, r#"(module (func (export "run")))"#).expect("write");
        let Err(e) = runtime.load("t", &path) else {
            panic!("a module without _start loaded")
        };
        assert!(e.contains("no _start export"), "{e}");
        std::fs::write(
            &path,
            r#"(module (import "env" "socket" (func)) (func (export "_start")))"#,
        )
        .expect("write");
        let Err(e) = runtime.load("t", &path) else {
            panic!("a module with foreign imports loaded")
        };
        assert!(e.contains("imports keel does not give"), "{e}");
        assert!(
            runtime.load("t", &dir.path().join("missing.wasm")).is_err(),
            "a missing file loaded"
        );
    }
}
