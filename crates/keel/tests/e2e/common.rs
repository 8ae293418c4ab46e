//! Shared harness for end-to-end tests: start the real `keel` binary on a free
//! port with a temp config against an in-process simulated model server, and
//! drive it with the real `openai` Python SDK.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use keel_sim::{SimHandle, SimServer};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The provider API key keel is given through its environment.
pub const PROVIDER_KEY: &str = "sk-provider-secret-0123456789";

/// A running keel process. Killed on drop.
pub struct Keel {
    pub child: Child,
    pub url: String,
    pub dir: tempfile::TempDir,
}

/// Runs `keel ARGS --server URL` (an admin command against the server at `url`).
pub fn keel_cli(url: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(args)
        .args(["--server", url])
        .output()
        .unwrap()
}

/// [`keel_cli`], which must succeed (else the test fails with the command's stderr).
pub fn keel_cli_ok(url: &str, args: &[&str]) -> std::process::Output {
    let out = keel_cli(url, args);
    assert!(
        out.status.success(),
        "keel {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Keel {
    /// Runs `keel ARGS` against this server.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        keel_cli(&self.url, args)
    }

    /// [`Keel::cli`], which must succeed ([`keel_cli_ok`]).
    pub fn cli_ok(&self, args: &[&str]) -> std::process::Output {
        keel_cli_ok(&self.url, args)
    }

    /// Writes `config` (with `{dir}` and `{sim}` substituted) and starts `keel serve`.
    pub async fn start(config: &str, sim: &SimHandle) -> Keel {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, config, sim).await
    }

    /// Like [`Keel::start`] but in an existing directory (to restart over the same store).
    ///
    /// A config with neither `[server]` nor `[store]` gets [`BASE`] in front: keel on a free
    /// loopback port, its SQLite store in the test's directory.
    pub async fn start_in(dir: tempfile::TempDir, config: &str, sim: &SimHandle) -> Keel {
        let config = if config.contains("[server]") || config.contains("[store]") {
            config.to_owned()
        } else {
            format!("{BASE}{config}")
        };
        let text = config
            .replace("{dir}", &dir.path().display().to_string())
            .replace("{sim}", &sim.base_url());
        let path = dir.path().join("keel.toml");
        std::fs::write(&path, text).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
            .args(["serve", "--config"])
            .arg(&path)
            .env("KEEL_TEST_PROVIDER_KEY", PROVIDER_KEY)
            .env("KEEL_KEY_SUPPORT", "sk-agent-support")
            .env("KEEL_KEY_SUPPORT_2", "sk-agent-support-2")
            .env("KEEL_TEST_ADMIN_TOKEN", "admin-secret")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let url = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(rest) = line.strip_prefix("keel listening on ") {
                    return rest.split_whitespace().next().unwrap().to_owned();
                }
            }
            panic!("keel exited before listening");
        })
        .await
        .expect("keel did not start listening within 30s");
        // Keep draining stdout so keel never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Keel { child, url, dir }
    }

    /// `http://127.0.0.1:PORT/v1`, the SDK's base_url.
    pub fn base_url(&self) -> String {
        format!("{}/v1", self.url)
    }

    /// The SQLite file keel writes.
    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("keel.db")
    }

    /// Kinds and data of all events, in order, read straight from the store file.
    pub fn events(&self) -> Vec<(String, serde_json::Value)> {
        read_events(&self.db_path())
    }

    /// POSTs `body` as JSON to `path` with `headers`: the status and the JSON answer
    /// (`Null` when the answer is not JSON).
    pub async fn post_json(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: &serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let mut request = reqwest::Client::new()
            .post(format!("{}{path}", self.url))
            .json(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (
            status,
            response.json().await.unwrap_or(serde_json::Value::Null),
        )
    }

    /// Creates a task of `agent` and claims it (as worker `w`, lease 30 s), through the
    /// worker protocol: the task's id and lease token.
    pub async fn claimed_task(&self, agent: &str) -> (String, String) {
        let headers = [("x-keel-agent", agent)];
        let body = serde_json::json!({"agent": agent, "input": {}});
        let (status, task) = self.post_json("/v1/tasks", &headers, &body).await;
        assert_eq!(status, 201, "{task}");
        let claim = serde_json::json!({"agent": agent, "worker": "w", "lease": "30s"});
        let (status, claimed) = self.post_json("/v1/tasks/claim", &headers, &claim).await;
        assert_eq!(status, 200, "{claimed}");
        assert_eq!(claimed["id"], task["id"], "{claimed}");
        (
            claimed["id"].as_str().unwrap().to_owned(),
            claimed["lease_token"].as_str().unwrap().to_owned(),
        )
    }

    /// `GET /metrics` as text.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Events of one kind.
    pub fn events_of(&self, kind: &str) -> Vec<serde_json::Value> {
        self.events()
            .into_iter()
            .filter(|(k, _)| k == kind)
            .map(|(_, d)| d)
            .collect()
    }
}

/// Reads every event from a keel SQLite store.
pub fn read_events(db: &Path) -> Vec<(String, serde_json::Value)> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut stmt = conn
        .prepare("SELECT kind, data FROM events ORDER BY seq")
        .unwrap();
    stmt.query_map([], |row| {
        let kind: String = row.get(0)?;
        let data: String = row.get(1)?;
        Ok((kind, serde_json::from_str(&data).unwrap()))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// What a test config without `[server]` and `[store]` starts with (see [`Keel::start_in`]).
pub const BASE: &str =
    "[server]\nlisten = \"127.0.0.1:0\"\n\n[store]\nurl = \"sqlite://{dir}/keel.db\"\n";

/// Starts the simulated model server on a free loopback port.
pub async fn sim() -> SimHandle {
    SimServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// The Python interpreter with `openai` installed (`cargo xtask test` makes it).
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("KEEL_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(
        venv.exists(),
        "no Python with the openai SDK: run `cargo xtask test` (it creates .venv) or set KEEL_TEST_PYTHON"
    );
    venv
}

/// Runs the SDK client script and returns what it printed (a JSON object).
pub async fn sdk(mode: &str, base_url: &str, extra: &[&str]) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/sdk_client.py");
    let out = Command::new(python())
        .arg(script)
        .arg(mode)
        .arg(base_url)
        .args(extra)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "sdk_client.py {mode} failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("bad JSON from sdk_client.py ({e}): {stdout}"))
}

/// A config with one route `smart` over two targets of the simulator, fast retries
/// and a breaker that opens after 4 failures out of at least 4 calls.
pub const TWO_TARGETS: &str = r#"
[server]
listen = "127.0.0.1:0"

[store]
url = "sqlite://{dir}/keel.db"

[providers.sim]
kind = "openai"
base_url = "{sim}"
api_key_env = "KEEL_TEST_PROVIDER_KEY"

[routes.smart]
targets = [
  { provider = "sim", model = "primary" },
  { provider = "sim", model = "secondary" },
]
retry = { max_attempts = 3, base = "10ms", cap = "100ms", jitter = "full" }
timeouts = { connect = "1s", first_token = "2s", idle = "1s", attempt = "5s", total = "20s" }

[routes.patient]
targets = [{ provider = "sim", model = "patient" }]
retry = { max_attempts = 2, base = "10ms", cap = "3s", jitter = "full", respect_retry_after = true }

[routes.fragile]
targets = [
  { provider = "sim", model = "fragile-a" },
  { provider = "sim", model = "fragile-b" },
]
degraded_reply = "I'm busy right now; please try again shortly."
retry = { max_attempts = 2, base = "10ms", cap = "50ms" }

[routes.hurried]
targets = [
  { provider = "sim", model = "hurried-a" },
  { provider = "sim", model = "hurried-b" },
]
retry = { max_attempts = 3, base = "10ms", cap = "10s", respect_retry_after = true }
timeouts = { connect = "1s", first_token = "2s", idle = "1s", attempt = "2s", total = "3s" }

[routes.stubborn]
targets = [{ provider = "sim", model = "stubborn" }]
retry = { max_attempts = 5, base = "700ms", cap = "700ms", jitter = "none", budget_min_per_sec = 100 }

[breaker]
window = "count"
window_size = 10
min_calls = 4
failure_rate = 0.5
open_for = "6s"
half_open_calls = 1
"#;

/// A round-robin TCP load balancer on a free loopback port in front of keel nodes: each
/// new connection goes to the next node that accepts one (a dead node is skipped), as
/// any load balancer with connect-failure failover would. Stops when dropped.
pub struct Balancer {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Balancer {
    /// Balances over `nodes` (their `http://HOST:PORT` URLs).
    pub async fn start(nodes: &[&str]) -> Balancer {
        let backends: Vec<String> = nodes
            .iter()
            .map(|u| u.trim_start_matches("http://").to_owned())
            .collect();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let mut next = 0usize;
            while let Ok((mut inbound, _)) = listener.accept().await {
                let backends = backends.clone();
                let first = next;
                next = next.wrapping_add(1);
                tokio::spawn(async move {
                    for i in 0..backends.len() {
                        let backend = &backends[(first + i) % backends.len()];
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(backend).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                            return;
                        }
                    }
                });
            }
        });
        Balancer { url, task }
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// POSTs `body` as JSON to `url` + `path`: the status and the JSON answer (`Null` when the
/// answer is not JSON).
pub async fn post(
    url: &str,
    path: &str,
    body: serde_json::Value,
) -> (reqwest::StatusCode, serde_json::Value) {
    post_as(url, None, path, body).await
}

/// [`post`] with `x-keel-agent: agent` when given.
pub async fn post_as(
    url: &str,
    agent: Option<&str>,
    path: &str,
    body: serde_json::Value,
) -> (reqwest::StatusCode, serde_json::Value) {
    let mut request = reqwest::Client::new()
        .post(format!("{url}{path}"))
        .json(&body);
    if let Some(agent) = agent {
        request = request.header("x-keel-agent", agent);
    }
    let r = request.send().await.unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

/// GETs `url` + `path`: the status and the JSON answer (`Null` when not JSON).
pub async fn get(url: &str, path: &str) -> (reqwest::StatusCode, serde_json::Value) {
    let r = reqwest::get(format!("{url}{path}")).await.unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}
