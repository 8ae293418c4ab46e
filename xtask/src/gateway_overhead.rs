//! The gateway-overhead benchmark: what keel adds in front of a model server.
//!
//! It starts the simulated model server in-process on loopback, builds and starts the release
//! `keel serve` with a temporary config whose one route, `bench`, targets that server, and then
//! drives the same load at the server directly and through keel ([`crate::bench_gateway`]):
//! open loop at [`FIXED_RATE`] requests/s, then closed loop with [`SATURATE_CONNECTIONS`]
//! connections. It reports the p50/p99 latency keel adds, the throughput ratio, and keel's peak
//! resident memory (`VmHWM`). It measures four setups of keel's store ([`SETUPS`]), each
//! against its own direct rounds: `call_durability = "relaxed"` (the default: a response waits
//! for the commit's write of the call's records, which survives `kill -9` of keel, and the disk
//! sync follows in the background) and `"fsync"` (a response also waits for the group commit's
//! fsync), each with payload recording on (the default: the request's messages and the answer
//! are stored with the `llm_call` event) and off (the events only).
//! Everything runs on loopback and stops by itself.
//!
//! The load generator, the simulated server and keel share the machine's cores, so the figures
//! compare the two paths with each other, not with a dedicated load-test rig.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout_at};

use crate::bench_cmd::BenchResult;
use crate::bench_gateway::{LoadResult, fixed_rate, saturate};
use crate::process::{cargo_command, run_passthrough, strip_ansi};

/// Requests per second of the open-loop phase.
const FIXED_RATE: u32 = 2000;

/// Connections of the closed-loop phase.
const SATURATE_CONNECTIONS: usize = 64;

/// How long keel may take to print its `listening on` line.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// The route the temporary config defines, and the model it sends to the simulated server.
const ROUTE: &str = "bench";
const SIM_MODEL: &str = "sim-model";

/// One configuration of keel's store that the benchmark measures.
#[derive(Debug, Clone, Copy)]
struct Setup {
    /// `[store] call_durability`.
    call_durability: &'static str,
    /// `[store] record_payloads`.
    record_payloads: bool,
}

/// The setups measured. The first is keel's default and gets the plain entry names; the
/// others are suffixed with what differs ([`case_name`]).
const SETUPS: [Setup; 4] = [
    Setup {
        call_durability: "relaxed",
        record_payloads: true,
    },
    Setup {
        call_durability: "fsync",
        record_payloads: true,
    },
    Setup {
        call_durability: "relaxed",
        record_payloads: false,
    },
    Setup {
        call_durability: "fsync",
        record_payloads: false,
    },
];

impl Setup {
    /// How the setup is named in entries: empty for the default, else `_calls_fsync`,
    /// `_events_only` or both.
    fn suffix(self) -> String {
        let mut suffix = String::new();
        if self.call_durability != SETUPS[0].call_durability {
            suffix.push_str("_calls_");
            suffix.push_str(self.call_durability);
        }
        if !self.record_payloads {
            suffix.push_str("_events_only");
        }
        suffix
    }

    /// Whether this is keel's default store configuration (the first of [`SETUPS`]).
    fn is_default(self) -> bool {
        self.suffix().is_empty()
    }

    /// How the setup is announced in the output.
    fn describe(self) -> String {
        let payloads = if self.record_payloads {
            "payloads recorded"
        } else {
            "events only (record_payloads = false)"
        };
        format!("call_durability = \"{}\", {payloads}", self.call_durability)
    }
}

/// Builds release keel, measures, and returns the `gateway_overhead/...` entries.
pub fn run(root: &Path, duration: Duration) -> anyhow::Result<Vec<BenchResult>> {
    let keel = build_keel(root)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let mut entries = Vec::new();
    let mut verdicts = Vec::new();
    for setup in SETUPS {
        let (measured, verdict) = runtime.block_on(measure(&keel, duration, setup))?;
        entries.extend(measured);
        verdicts.push(verdict);
    }
    println!(
        "==> the gateway's targets (keel adds under {} ms at p99 at {FIXED_RATE} req/s; keeps at least {:.0}% of direct's throughput with {SATURATE_CONNECTIONS} connections), this run:",
        TARGET_ADDED_P99_US / 1000.0,
        TARGET_SATURATION_SHARE * 100.0
    );
    for verdict in &verdicts {
        println!("    {}", verdict.line());
    }
    Ok(entries)
}

/// The gateway's targets on this machine: the p99 latency keel adds at [`FIXED_RATE`]
/// stays under this many microseconds...
const TARGET_ADDED_P99_US: f64 = 1000.0;

/// ...and its throughput at saturation is at least this share of direct's.
const TARGET_SATURATION_SHARE: f64 = 0.25;

/// One setup's figures against the targets.
#[derive(Debug, Clone)]
struct Verdict {
    setup: Setup,
    /// p99 through keel minus p99 direct at [`FIXED_RATE`].
    added_p99_us: f64,
    /// Throughput through keel over direct's at saturation.
    saturation_share: f64,
}

impl Verdict {
    fn p99_met(&self) -> bool {
        self.added_p99_us < TARGET_ADDED_P99_US
    }

    fn saturation_met(&self) -> bool {
        self.saturation_share >= TARGET_SATURATION_SHARE
    }

    /// `call_durability = "relaxed", payloads recorded (keel's defaults): p99 added 0.62 ms
    /// (met), saturation 23.50% of direct (NOT met)`.
    fn line(&self) -> String {
        let met = |ok: bool| if ok { "met" } else { "NOT met" };
        let defaults = if self.setup.is_default() {
            " (keel's defaults)"
        } else {
            ""
        };
        format!(
            "{}{defaults}: p99 added {:.2} ms ({}), saturation {:.2}% of direct ({})",
            self.setup.describe(),
            self.added_p99_us / 1000.0,
            met(self.p99_met()),
            self.saturation_share * 100.0,
            met(self.saturation_met())
        )
    }
}

/// The entry name of `case` in `setup`: plain for the default, else suffixed ([`Setup::suffix`]).
fn case_name(case: &str, setup: Setup) -> String {
    format!("gateway_overhead/{case}{}", setup.suffix())
}

/// `cargo build --release -p keel`; returns the binary's path.
pub fn build_keel(root: &Path) -> anyhow::Result<PathBuf> {
    println!("    building release keel");
    let built = run_passthrough(cargo_command(root).args(["build", "--release", "-p", "keel"]))?;
    if !built {
        bail!("cargo build --release -p keel failed");
    }
    let metadata = cargo_command(root)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("running cargo metadata")?;
    if !metadata.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&metadata.stderr)
        );
    }
    let metadata: serde_json::Value =
        serde_json::from_slice(&metadata.stdout).context("parsing cargo metadata")?;
    let target_dir = metadata["target_directory"]
        .as_str()
        .context("cargo metadata has no target_directory")?;
    Ok(Path::new(target_dir).join("release").join("keel"))
}

/// Alternating rounds of direct and keel in each load phase.
const ROUNDS: u32 = 3;

/// The rounds of one path as one result: counts and time summed, throughput over
/// the summed time, p50 and p99 the median of the rounds', max the largest.
fn combine(rounds: &[LoadResult]) -> LoadResult {
    let median = |f: fn(&LoadResult) -> u64| {
        let mut v: Vec<u64> = rounds.iter().map(f).collect();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    let ok: u64 = rounds.iter().map(|r| r.ok).sum();
    let elapsed: Duration = rounds.iter().map(|r| r.elapsed).sum();
    LoadResult {
        sent: rounds.iter().map(|r| r.sent).sum(),
        ok,
        errors: rounds.iter().map(|r| r.errors).sum(),
        elapsed,
        throughput: if elapsed.is_zero() {
            0.0
        } else {
            ok as f64 / elapsed.as_secs_f64()
        },
        p50_us: median(|r| r.p50_us),
        p99_us: median(|r| r.p99_us),
        max_us: rounds.iter().map(|r| r.max_us).max().unwrap_or(0),
    }
}

/// Calls in the conversation whose storage cost is measured.
const CONVERSATION_CALLS: usize = 50;

async fn measure(
    keel_bin: &Path,
    duration: Duration,
    setup: Setup,
) -> anyhow::Result<(Vec<BenchResult>, Verdict)> {
    let sim = start_sim().await?;
    let dir = tempfile::tempdir().context("creating a temp dir")?;
    let config = write_config(dir.path(), &sim.base_url, setup)?;
    let mut keel = KeelProcess::start(keel_bin, &config).await?;
    println!(
        "    {}: sim at {}, keel at {}",
        setup.describe(),
        sim.base_url,
        keel.base_url
    );

    let direct = Endpoint {
        url: chat_completions_url(&sim.base_url),
        body: request_body(SIM_MODEL),
    };
    let through = Endpoint {
        url: chat_completions_url(&keel.base_url),
        body: request_body(ROUTE),
    };
    let warm_up = Duration::from_secs(1);
    for path in [&direct, &through] {
        saturate(&path.url, path.body.clone(), 8, warm_up).await?;
    }
    // The machine is shared and its speed drifts: each phase alternates direct and keel
    // in ROUNDS short rounds, so both paths see the same conditions.
    let round = duration / ROUNDS;
    println!(
        "    open loop, {FIXED_RATE} req/s for {}s each, in {ROUNDS} alternating rounds",
        duration.as_secs()
    );
    let (mut direct_fixed, mut keel_fixed) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        direct_fixed.push(fixed_rate(&direct.url, direct.body.clone(), FIXED_RATE, round).await?);
        keel_fixed.push(fixed_rate(&through.url, through.body.clone(), FIXED_RATE, round).await?);
    }
    println!(
        "    closed loop, {SATURATE_CONNECTIONS} connections for {}s each, in {ROUNDS} alternating rounds",
        duration.as_secs()
    );
    let (mut direct_sat, mut keel_sat) = (Vec::new(), Vec::new());
    // CPU seconds spent during the saturation rounds: this process (load generator and
    // simulated server) in both, keel in keel's rounds; and the machine's idle share, which
    // says whether the rounds were bound by the two cores or by waiting.
    let (mut here_cpu, mut here_cpu_through, mut keel_cpu) = (0.0, 0.0, 0.0);
    let (mut direct_machine, mut keel_machine) = (MachineCpu::default(), MachineCpu::default());
    for _ in 0..ROUNDS {
        let before = cpu_seconds("self")?;
        let machine = MachineCpu::now()?;
        direct_sat.push(
            saturate(
                &direct.url,
                direct.body.clone(),
                SATURATE_CONNECTIONS,
                round,
            )
            .await?,
        );
        here_cpu += cpu_seconds("self")? - before;
        direct_machine.add(MachineCpu::now()?.since(machine));
        let before = keel.cpu_seconds()?;
        let here_before = cpu_seconds("self")?;
        let machine = MachineCpu::now()?;
        keel_sat.push(
            saturate(
                &through.url,
                through.body.clone(),
                SATURATE_CONNECTIONS,
                round,
            )
            .await?,
        );
        keel_cpu += keel.cpu_seconds()? - before;
        here_cpu_through += cpu_seconds("self")? - here_before;
        keel_machine.add(MachineCpu::now()?.since(machine));
    }
    let per_request = |cpu: f64, rounds: &[LoadResult]| {
        let ok: u64 = rounds.iter().map(|r| r.ok).sum();
        if ok == 0 { 0.0 } else { cpu * 1e6 / ok as f64 }
    };
    let keel_cpu_us = per_request(keel_cpu, &keel_sat);
    let direct_cpu_us = per_request(here_cpu, &direct_sat);
    let through_cpu_us = per_request(here_cpu_through, &keel_sat);
    let (direct_fixed, keel_fixed) = (combine(&direct_fixed), combine(&keel_fixed));
    let (direct_sat, keel_sat) = (combine(&direct_sat), combine(&keel_sat));
    let peak_rss_mib = keel.peak_rss_kib()? as f64 / 1024.0;
    let conversation = crate::conversation::measure(
        &keel.base_url,
        ROUTE,
        &dir.path().join("keel.db"),
        "bench-conversation",
        CONVERSATION_CALLS,
    )
    .await?;
    keel.stop().await;
    drop(sim);

    let fixed_name = case_name(&format!("fixed_rate_{FIXED_RATE}rps"), setup);
    let sat_name = case_name(&format!("saturate_{SATURATE_CONNECTIONS}conn"), setup);
    print_table(&[
        (fixed_name.as_str(), &direct_fixed, &keel_fixed),
        (sat_name.as_str(), &direct_sat, &keel_sat),
    ]);
    println!(
        "    CPU per request at saturation: keel {keel_cpu_us:.0} us; load generator and simulated server together, direct rounds {direct_cpu_us:.0} us ({:.2}x)",
        keel_cpu_us / direct_cpu_us.max(f64::MIN_POSITIVE)
    );
    println!(
        "    load generator and simulated server per request at saturation: {direct_cpu_us:.0} us direct, {through_cpu_us:.0} us through keel; machine idle: {:.0}% direct, {:.0}% through keel",
        direct_machine.idle_percent(),
        keel_machine.idle_percent()
    );
    println!("    keel peak RSS (VmHWM): {peak_rss_mib:.1} MiB");
    let sent_per_call = conversation.sent as f64 / conversation.calls as f64;
    let stored_per_call = conversation.stored as f64 / conversation.calls as f64;
    println!(
        "    {}-call conversation: {sent_per_call:.0} bytes sent per call, {stored_per_call:.0} bytes stored per call (events, and payloads when recorded)",
        conversation.calls
    );

    let verdict = Verdict {
        setup,
        added_p99_us: keel_fixed.p99_us as f64 - direct_fixed.p99_us as f64,
        saturation_share: if direct_sat.throughput > 0.0 {
            keel_sat.throughput / direct_sat.throughput
        } else {
            0.0
        },
    };
    println!("    against the targets: {}", verdict.line());

    let command = format!(
        "cargo xtask bench gateway --duration {}",
        duration.as_secs()
    );
    let mut entries = latency_entries(&fixed_name, &direct_fixed, &keel_fixed, &command);
    entries.extend(latency_entries(&sat_name, &direct_sat, &keel_sat, &command));
    entries.push(BenchResult::new(
        sat_name.clone(),
        "throughput",
        keel_sat.throughput,
        "req/s",
        Some(direct_sat.throughput),
        &command,
    ));
    // The machine's speed drifts from run to run and cancels out of this ratio: keel's CPU
    // per request over what the same machine spends per request on the direct path.
    entries.push(BenchResult::new(
        sat_name.clone(),
        "keel_cpu_per_request",
        keel_cpu_us,
        "us",
        Some(direct_cpu_us),
        &command,
    ));
    // Together with keel's, what the rest of the machine spends per request through keel
    // decides the throughput when the cores are the limit; the idle share says whether
    // they were.
    entries.push(BenchResult::new(
        sat_name.clone(),
        "load_cpu_per_request",
        through_cpu_us,
        "us",
        Some(direct_cpu_us),
        &command,
    ));
    entries.push(BenchResult::new(
        sat_name,
        "machine_idle",
        keel_machine.idle_percent(),
        "percent",
        Some(direct_machine.idle_percent()),
        &command,
    ));
    entries.push(BenchResult::new(
        case_name(&format!("conversation_{CONVERSATION_CALLS}_calls"), setup),
        "bytes_stored_per_call",
        stored_per_call,
        "bytes",
        Some(sent_per_call),
        &command,
    ));
    entries.push(BenchResult::new(
        case_name("keel_memory", setup),
        "peak_rss",
        peak_rss_mib,
        "MiB",
        None,
        &command,
    ));
    Ok((entries, verdict))
}

/// Where one path of the comparison sends, and what.
struct Endpoint {
    url: String,
    body: Bytes,
}

/// p50/p99 through keel against direct, the latency keel adds, and errors.
fn latency_entries(
    name: &str,
    direct: &LoadResult,
    keel: &LoadResult,
    command: &str,
) -> Vec<BenchResult> {
    let (d50, d99) = (direct.p50_us as f64, direct.p99_us as f64);
    let (k50, k99) = (keel.p50_us as f64, keel.p99_us as f64);
    vec![
        BenchResult::new(name, "p50_latency", k50, "us", Some(d50), command),
        BenchResult::new(name, "p99_latency", k99, "us", Some(d99), command),
        BenchResult::new(name, "added_p50_latency", k50 - d50, "us", None, command),
        BenchResult::new(name, "added_p99_latency", k99 - d99, "us", None, command),
        BenchResult::new(
            name,
            "errors",
            keel.errors as f64,
            "requests",
            Some(direct.errors as f64),
            command,
        ),
    ]
}

fn print_table(rows: &[(&str, &LoadResult, &LoadResult)]) {
    println!(
        "    {:<44} {:<6} {:>9} {:>9} {:>9} {:>11} {:>7}",
        "case", "path", "p50 us", "p99 us", "max us", "req/s", "errors"
    );
    for (name, direct, keel) in rows {
        for (path, result) in [("direct", direct), ("keel", keel)] {
            println!(
                "    {:<44} {:<6} {:>9} {:>9} {:>9} {:>11.0} {:>7}",
                name,
                path,
                result.p50_us,
                result.p99_us,
                result.max_us,
                result.throughput,
                result.errors
            );
        }
    }
}

// === the simulated model server ===

/// The running simulated model server; dropping it stops an in-process one.
struct Sim {
    /// OpenAI-style base URL (with or without the trailing `/v1`).
    base_url: String,
    _handle: Option<Box<dyn std::any::Any + Send>>,
}

/// Starts the simulated model server on `127.0.0.1:0`.
///
/// `KEEL_BENCH_SIM_URL` points the benchmark at an already running OpenAI-compatible server.
async fn start_sim() -> anyhow::Result<Sim> {
    if let Ok(base_url) = std::env::var("KEEL_BENCH_SIM_URL") {
        return Ok(Sim {
            base_url,
            _handle: None,
        });
    }
    let addr: std::net::SocketAddr = "127.0.0.1:0".parse()?;
    let handle = keel_sim::SimServer::start(addr)
        .await
        .context("starting the simulated model server")?;
    Ok(Sim {
        base_url: handle.base_url(),
        _handle: Some(Box::new(handle)),
    })
}

/// `POST` target for chat completions under an OpenAI-style base URL.
fn chat_completions_url(base_url: &str) -> String {
    let base = base_url.trim_end_matches('/');
    if base.ends_with("/v1") {
        format!("{base}/chat/completions")
    } else {
        format!("{base}/v1/chat/completions")
    }
}

fn request_body(model: &str) -> Bytes {
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "Say hello in one word."}],
        "max_tokens": 8,
    });
    Bytes::from(body.to_string())
}

// === keel ===

/// A temp `keel.toml` for `setup`: listen on a free port, SQLite in `dir`, one route to the
/// simulator.
fn write_config(dir: &Path, sim_base_url: &str, setup: Setup) -> anyhow::Result<PathBuf> {
    let db = dir.join("keel.db");
    let text = format!(
        "[server]\n\
         listen = \"127.0.0.1:0\"\n\
         \n\
         [store]\n\
         url = {store}\n\
         call_durability = \"{durability}\"\n\
         record_payloads = {record}\n\
         \n\
         [providers.sim]\n\
         kind = \"openai\"\n\
         base_url = {sim}\n\
         \n\
         [routes.{ROUTE}]\n\
         targets = [{{ provider = \"sim\", model = \"{SIM_MODEL}\" }}]\n\
         retry = {{ max_attempts = 3, base = \"200ms\", cap = \"10s\", jitter = \"full\" }}\n\
         \n\
         # Unauthenticated calls belong to the agent \"anonymous\": a budget makes\n\
         # every call pay for the budget check and the spend accounting.\n\
         [agents.anonymous]\n\
         budget = {{ tokens_per_hour = 1000000000000 }}\n",
        store = toml_string(&format!("sqlite://{}", db.display())),
        durability = setup.call_durability,
        record = setup.record_payloads,
        sim = toml_string(sim_base_url),
    );
    let path = dir.join("keel.toml");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// `value` as a TOML basic string.
fn toml_string(value: &str) -> String {
    let escaped = value.replace('\\', "\\\\").replace('"', "\\\"");
    format!("\"{escaped}\"")
}

/// A running `keel serve`, killed when dropped.
pub(crate) struct KeelProcess {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub(crate) base_url: String,
    /// Drains keel's stdout and stderr so a chatty keel never blocks on a full pipe.
    _drain: JoinSet<()>,
}

impl KeelProcess {
    /// Starts `bin serve --config config` and waits for its `listening on` line.
    pub(crate) async fn start(bin: &Path, config: &Path) -> anyhow::Result<KeelProcess> {
        let mut child = Command::new(bin)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let (lines, mut output) = mpsc::unbounded_channel();
        let mut drain = JoinSet::new();
        if let Some(stdout) = child.stdout.take() {
            drain.spawn(forward_lines(stdout, lines.clone()));
        }
        if let Some(stderr) = child.stderr.take() {
            drain.spawn(forward_lines(stderr, lines));
        }
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let mut recent = VecDeque::new();
        loop {
            match timeout_at(deadline, output.recv()).await {
                Ok(Some(line)) => {
                    if let Some(addr) = listening_addr(&line) {
                        return Ok(KeelProcess {
                            child,
                            base_url: format!("http://{addr}"),
                            _drain: drain,
                        });
                    }
                    if recent.len() == 20 {
                        recent.pop_front();
                    }
                    recent.push_back(line);
                }
                Ok(None) => {
                    let status = child.wait().await.context("waiting for keel")?;
                    let recent = Vec::from(recent).join("\n");
                    bail!("keel exited ({status}) before listening; its output:\n{recent}");
                }
                Err(_) => {
                    let recent = Vec::from(recent).join("\n");
                    bail!(
                        "keel printed no `listening on` line within {STARTUP_TIMEOUT:?}; its output:\n{recent}"
                    );
                }
            }
        }
    }

    /// CPU seconds keel has used so far (user and system).
    fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let pid = self.child.id().context("keel has already exited")?;
        cpu_seconds(&pid.to_string())
    }

    /// keel's peak resident set size so far, from `VmHWM` in `/proc/<pid>/status`.
    fn peak_rss_kib(&self) -> anyhow::Result<u64> {
        let pid = self.child.id().context("keel has already exited")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .context("reading keel's /proc status")?;
        parse_vm_hwm_kib(&status).context("no VmHWM in keel's /proc status")
    }

    /// Kills keel and waits for it.
    pub(crate) async fn stop(&mut self) {
        // A benchmark's keel has nothing worth a graceful shutdown.
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

async fn forward_lines(from: impl AsyncRead + Unpin, to: mpsc::UnboundedSender<String>) {
    let mut lines = BufReader::new(from).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        // Once keel is up nobody listens; keep draining anyway.
        let _ = to.send(line);
    }
}

/// The address in keel's `listening on http://127.0.0.1:PORT` line.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    let line = strip_ansi(line);
    let rest = line.split("listening on http://").nth(1)?;
    let addr: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']'))
        .collect();
    addr.parse().ok()
}

/// CPU seconds (user and system) process `pid` (a number, or `self`) has used so far, from
/// `/proc/<pid>/stat`.
fn cpu_seconds(pid: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    parse_cpu_seconds(&stat).with_context(|| format!("no CPU times in /proc/{pid}/stat"))
}

/// utime + stime of a `/proc/<pid>/stat` line, in seconds. The fields after the command
/// name (which may hold spaces, hence the last `)`) are counted from `state`, field 3;
/// utime and stime are fields 14 and 15, in clock ticks of 1/100 s (`USER_HZ`, fixed at
/// 100 for user space on Linux).
fn parse_cpu_seconds(stat: &str) -> Option<f64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// The whole machine's CPU time, busy and idle, in clock ticks, from the `cpu` line of
/// `/proc/stat`.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct MachineCpu {
    busy: u64,
    idle: u64,
}

impl MachineCpu {
    fn now() -> anyhow::Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        Self::parse(&stat).context("no cpu line in /proc/stat")
    }

    /// user, nice, system, idle, iowait, irq, softirq, steal (guest time is already in user).
    fn parse(stat: &str) -> Option<Self> {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let ticks: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|t| t.parse().ok())
            .collect::<Option<_>>()?;
        let [user, nice, system, idle, iowait, irq, softirq, steal] = ticks[..] else {
            return None;
        };
        Some(Self {
            busy: user + nice + system + irq + softirq + steal,
            idle: idle + iowait,
        })
    }

    fn since(self, earlier: Self) -> Self {
        Self {
            busy: self.busy.saturating_sub(earlier.busy),
            idle: self.idle.saturating_sub(earlier.idle),
        }
    }

    fn add(&mut self, other: Self) {
        self.busy += other.busy;
        self.idle += other.idle;
    }

    fn idle_percent(self) -> f64 {
        let total = self.busy + self.idle;
        if total == 0 {
            0.0
        } else {
            100.0 * self.idle as f64 / total as f64
        }
    }
}

fn parse_vm_hwm_kib(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
    line.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_seconds_from_a_proc_stat_line() {
        // A command name with spaces and a `)` of its own; utime 250, stime 75 ticks.
        let stat = "4242 (keel (x) y) S 1 4242 4242 0 -1 4194304 100 0 0 0 250 75 0 0 20 0 9 0 1 0";
        assert_eq!(parse_cpu_seconds(stat), Some(3.25));
        assert_eq!(parse_cpu_seconds("4242 (keel) S 1"), None);
        // This very process has a stat line.
        assert!(cpu_seconds("self").is_ok());
    }

    #[test]
    fn reads_the_machines_busy_and_idle_ticks_from_proc_stat() {
        let stat = "cpu  100 5 50 800 20 3 2 10 0 0\ncpu0 50 2 25 400 10 1 1 5 0 0\nintr 1\n";
        let before = MachineCpu::parse(stat).unwrap();
        assert_eq!(
            before,
            MachineCpu {
                busy: 170,
                idle: 820
            }
        );
        let later = MachineCpu::parse("cpu  160 5 70 900 20 3 2 10 0 0\n").unwrap();
        let spent = later.since(before);
        assert_eq!(
            spent,
            MachineCpu {
                busy: 80,
                idle: 100
            }
        );
        assert!((spent.idle_percent() - 100.0 * 100.0 / 180.0).abs() < 1e-9);
        assert_eq!(MachineCpu::default().idle_percent(), 0.0);
        assert_eq!(MachineCpu::parse("cpu0 1 2 3\n"), None);
        assert!(MachineCpu::now().is_ok());
    }

    #[test]
    fn finds_the_address_in_keels_listening_line() {
        let addr = "127.0.0.1:38411".parse().ok();
        assert_eq!(
            listening_addr("keel listening on http://127.0.0.1:38411"),
            addr
        );
        assert_eq!(
            listening_addr(
                "2026-01-01T00:00:00Z  INFO keel: listening on http://127.0.0.1:38411/ (gateway)"
            ),
            addr
        );
        assert_eq!(
            listening_addr("\u{1b}[32mINFO\u{1b}[0m listening on http://127.0.0.1:38411, ready"),
            addr
        );
        assert_eq!(listening_addr("starting keel"), None);
    }

    #[test]
    fn chat_url_accepts_base_urls_with_and_without_v1() {
        assert_eq!(
            chat_completions_url("http://127.0.0.1:9/v1/"),
            "http://127.0.0.1:9/v1/chat/completions"
        );
        assert_eq!(
            chat_completions_url("http://127.0.0.1:9"),
            "http://127.0.0.1:9/v1/chat/completions"
        );
    }

    #[test]
    fn reads_vm_hwm_in_kib() {
        let status = "Name:\tkeel\nVmPeak:\t  999 kB\nVmHWM:\t   20480 kB\nVmRSS:\t 100 kB\n";
        assert_eq!(parse_vm_hwm_kib(status), Some(20480));
        assert_eq!(parse_vm_hwm_kib("Name:\tkeel\n"), None);
    }

    #[test]
    fn config_is_valid_toml_with_one_route_to_the_simulator() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(dir.path(), "http://127.0.0.1:9/v1", SETUPS[3]).unwrap();
        let text = std::fs::read_to_string(path).unwrap();
        let doc: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(doc["server"]["listen"].as_str(), Some("127.0.0.1:0"));
        assert_eq!(
            doc["providers"]["sim"]["base_url"].as_str(),
            Some("http://127.0.0.1:9/v1")
        );
        assert_eq!(
            doc["routes"]["bench"]["targets"][0]["model"].as_str(),
            Some("sim-model")
        );
        let store = doc["store"]["url"].as_str().unwrap();
        assert!(store.starts_with("sqlite:///") && store.ends_with("/keel.db"));
        // Tasks keep the default durability; the setup sets the calls'.
        assert_eq!(doc["store"].get("durability"), None);
        assert_eq!(doc["store"]["call_durability"].as_str(), Some("fsync"));
        assert_eq!(doc["store"]["record_payloads"].as_bool(), Some(false));
    }

    #[test]
    fn the_default_setup_keeps_the_plain_names_and_the_others_say_what_differs() {
        let names: Vec<String> = SETUPS
            .iter()
            .map(|&setup| case_name("saturate_64conn", setup))
            .collect();
        assert_eq!(
            names,
            [
                "gateway_overhead/saturate_64conn",
                "gateway_overhead/saturate_64conn_calls_fsync",
                "gateway_overhead/saturate_64conn_events_only",
                "gateway_overhead/saturate_64conn_calls_fsync_events_only",
            ]
        );
    }

    #[test]
    fn the_verdict_holds_each_figure_to_its_target() {
        let verdict = |added_p99_us, saturation_share| Verdict {
            setup: SETUPS[0],
            added_p99_us,
            saturation_share,
        };
        // "Under 1 ms" is strict, "at least 25%" is not.
        assert!(verdict(999.0, 0.25).p99_met());
        assert!(!verdict(1000.0, 0.25).p99_met());
        assert!(verdict(999.0, 0.25).saturation_met());
        assert!(!verdict(999.0, 0.2499).saturation_met());
        assert_eq!(
            verdict(620.0, 0.235).line(),
            "call_durability = \"relaxed\", payloads recorded (keel's defaults): p99 added 0.62 ms (met), saturation 23.50% of direct (NOT met)"
        );
        let events_only = Verdict {
            setup: SETUPS[2],
            added_p99_us: 1170.0,
            saturation_share: 0.258,
        };
        assert_eq!(
            events_only.line(),
            "call_durability = \"relaxed\", events only (record_payloads = false): p99 added 1.17 ms (NOT met), saturation 25.80% of direct (met)"
        );
    }

    /// A stand-in for the keel binary: a shell script with `body`.
    fn fake_keel(dir: &Path, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let path = dir.join("keel");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[tokio::test]
    async fn keel_process_reads_the_port_from_its_output_and_reports_memory() {
        let dir = tempfile::tempdir().unwrap();
        let bin = fake_keel(
            dir.path(),
            "echo starting >&2; echo \"$1 $2\" >&2; echo 'INFO listening on http://127.0.0.1:4321'; exec sleep 30",
        );
        let mut keel = KeelProcess::start(&bin, Path::new("keel.toml"))
            .await
            .unwrap();
        assert_eq!(keel.base_url, "http://127.0.0.1:4321");
        assert!(keel.peak_rss_kib().unwrap() > 0);
        keel.stop().await;
    }

    #[tokio::test]
    async fn keel_exiting_before_listening_is_an_error_with_its_output() {
        let dir = tempfile::tempdir().unwrap();
        let bin = fake_keel(dir.path(), "echo 'keel.toml:3: store.url: bad' >&2; exit 2");
        let Err(err) = KeelProcess::start(&bin, Path::new("keel.toml")).await else {
            panic!("a keel that exits must not start");
        };
        let message = format!("{err:#}");
        assert!(message.contains("store.url: bad"), "{message}");
    }
}
