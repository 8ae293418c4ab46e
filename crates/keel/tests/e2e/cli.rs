//! The command line: `keel config check` and what `keel serve` does with a bad config.

use std::path::PathBuf;
use std::process::Command;

fn keel() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keel"))
}

/// A temporary directory holding `keel.toml` with `text`, and the file's path; the file is
/// gone when the directory is dropped.
fn config_file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

#[test]
fn config_check_names_file_line_and_key() {
    let (_dir, path) = config_file(
        "[providers.openai]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:1/v1\"\n\n[routes.smart]\ntargets = [{ provider = \"opnai\", model = \"m\" }]\nretry = { base = \"20s\", cap = \"10s\" }\n",
    );
    let out = keel()
        .args(["config", "check"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("keel.toml:6: routes.smart.targets[0].provider"),
        "{stderr}"
    );
    assert!(stderr.contains("opnai"), "{stderr}");
    assert!(
        stderr.contains("keel.toml:7: routes.smart.retry.base"),
        "{stderr}"
    );
}

#[test]
fn a_malformed_postgres_url_is_named_by_file_line_and_key_by_check_and_serve() {
    let (_dir, path) = config_file(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[store]\nurl = \"postgres://keel:hunter2@[::1/keel\"\n",
    );
    for args in [&["config", "check"][..], &["serve", "--config"][..]] {
        let out = keel().args(args).arg(&path).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("keel.toml:5: store.url: not a valid PostgreSQL URL"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("hunter2"), "{stderr}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
    }
}

#[test]
fn config_check_accepts_the_postgres_example() {
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/keel-postgres.toml"
    );
    let out = keel().args(["config", "check", example]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn config_check_accepts_the_example() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/keel.toml");
    let text = std::fs::read_to_string(example).unwrap();
    // Every env var the example names gets a dummy value.
    let mut cmd = keel();
    for (i, _) in text.match_indices("_env") {
        let rest = &text[i..];
        let Some(start) = rest.find('"') else {
            continue;
        };
        let rest = &rest[start + 1..];
        for name in rest.split('"').step_by(2).take_while(|n| {
            n.chars()
                .all(|c| c.is_ascii_uppercase() || c == '_' || c.is_ascii_digit())
                && !n.is_empty()
        }) {
            cmd.env(name, "dummy-value");
        }
    }
    let out = cmd.args(["config", "check", example]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
}

#[test]
fn serve_with_a_bad_config_exits_without_listening() {
    let (_dir, path) = config_file("[server]\nlisten = \"127.0.0.1:0\"\nlisen = 1\n");
    let out = keel()
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("keel.toml:3"), "{stderr}");
    assert!(stderr.contains("lisen"), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
}

/// An address keel cannot listen on (here, one another process holds) is the config's
/// problem: named at its line, before any store is created or migrated.
#[test]
fn serve_on_an_address_in_use_names_server_listen_and_creates_no_store() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.toml");
    std::fs::write(
        &path,
        format!("[server]\nlisten = \"{addr}\"\n\n[store]\nurl = \"sqlite://data/keel.db\"\n"),
    )
    .unwrap();
    let out = keel()
        .current_dir(dir.path())
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "keel.toml:2: server.listen: cannot listen on {addr}"
        )),
        "{stderr}"
    );
    assert!(!dir.path().join("data").exists(), "a store was created");
    drop(held);
}

#[test]
fn a_wasm_tool_that_cannot_run_is_named_by_config_check_and_serve() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("lib.wat"),
        r#"(module (func (export "run")))"#,
    )
    .unwrap();
    let path = dir.path().join("keel.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[tools.gone]\nwasm = \"missing.wasm\"\n\n[tools.lib]\nwasm = \"lib.wat\"\n",
    )
    .unwrap();
    let out = keel()
        .args(["config", "check"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("keel.toml:5: tools.gone.wasm: cannot read the module"),
        "{stderr}"
    );
    assert!(
        stderr.contains("keel.toml:8: tools.lib.wasm:") && stderr.contains("no _start export"),
        "{stderr}"
    );

    // The config names no store: the default one (./keel-data) goes in the test's directory.
    let out = keel()
        .current_dir(dir.path())
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("keel.toml:5: tools.gone.wasm: cannot read the module"),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
    // Nothing was started: not even the default store was created.
    assert!(!dir.path().join("keel-data").exists());
}

#[test]
fn json_logs_are_one_object_per_line_and_carry_no_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[store]\nurl = \"sqlite://{}/keel.db\"\n\n[agents.support]\nkeys_env = [\"KEEL_KEY_SUPPORT\"]\n\n[telemetry]\nlog_format = \"json\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let mut child = keel()
        .args(["serve", "--config"])
        .arg(&path)
        .env("KEEL_KEY_SUPPORT", "sk-agent-very-secret")
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the listening line, then stop keel (SIGTERM: a clean stop logs too).
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert!(line.contains("keel listening on"), "{line}");
    let pid = child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "keel logged nothing");
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{l}");
    }
    assert!(
        lines.iter().any(|l| l.contains("keel stopped")),
        "the clean stop is logged: {stderr}"
    );
    assert!(
        !stderr.contains("sk-agent-very-secret"),
        "a key reached the log"
    );
}

#[test]
fn an_anthropic_provider_is_accepted_by_config_check() {
    let (dir, path) = config_file(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[providers.claude]\nkind = \"anthropic\"\nbase_url = \"https://api.anthropic.com/v1\"\napi_key_env = \"KEEL_TEST_ANTHROPIC_KEY\"\nheaders = { \"anthropic-beta\" = \"some-feature\" }\n\n[routes.smart]\ntargets = [{ provider = \"claude\", model = \"claude-sonnet-4-5\" }]\n",
    );
    let out = keel()
        .current_dir(dir.path())
        .env("KEEL_TEST_ANTHROPIC_KEY", "sk-ant-secret")
        .args(["config", "check"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .trim_end()
            .ends_with("keel.toml: ok (1 provider, 1 route, 0 agents, 0 tools)"),
        "{stdout}"
    );
    // Its key is required like any provider's.
    let out = keel()
        .current_dir(dir.path())
        .env_remove("KEEL_TEST_ANTHROPIC_KEY")
        .args(["config", "check"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("keel.toml:7: providers.claude.api_key_env"),
        "{stderr}"
    );
}

#[tokio::test]
async fn admin_commands_find_the_server_and_its_token_through_its_config() {
    // A fixed port: the CLI reads it from the config (a `:0` there could not be found).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = format!(
        "[server]\nlisten = \"0.0.0.0:{port}\"\nadmin_token_env = \"KEEL_TEST_ADMIN_TOKEN\"\n\n[store]\nurl = \"sqlite://{{dir}}/keel.db\"\n"
    );
    let sim = crate::common::sim().await;
    let running = crate::common::Keel::start(&config, &sim).await;
    let (status, task) = crate::common::post(
        &running.url,
        "/v1/tasks",
        serde_json::json!({"agent": "demo", "input": {}}),
    )
    .await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{task}");
    let id = task["id"].as_str().unwrap();
    let cli = |args: &[&str]| {
        let out = keel()
            .args(args)
            .env_remove("KEEL_SERVER")
            .env_remove("KEEL_ADMIN_TOKEN")
            .env("KEEL_TEST_ADMIN_TOKEN", "admin-secret")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let config_path = running.dir.path().join("keel.toml");
    let config_path = config_path.to_str().unwrap();
    // The address (0.0.0.0 reached on loopback) and the token both come from the config.
    let (code, stdout, stderr) = cli(&["tasks", "ls", "--config", config_path]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains(id), "{stdout}");
    // Without the config, the default address (127.0.0.1:8420) is not this keel's.
    let (_, stdout, _) = cli(&["tasks", "ls"]);
    assert!(!stdout.contains(id), "{stdout}");
    // IP:PORT alone is plain HTTP; the token still comes from --config.
    let server = format!("127.0.0.1:{port}");
    let (code, stdout, stderr) =
        cli(&["tasks", "show", id, "--server", &server, "-c", config_path]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains(id), "{stdout}");
    // $KEEL_ADMIN_TOKEN wins: the variable the config names need not be set then.
    let out = keel()
        .args(["tasks", "ls", "--config", config_path])
        .env_remove("KEEL_SERVER")
        .env_remove("KEEL_TEST_ADMIN_TOKEN")
        .env("KEEL_ADMIN_TOKEN", "admin-secret")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(id));
    // A config the CLI cannot use is named by file, line and key.
    let out = keel()
        .args(["tasks", "ls", "--config", config_path])
        .env_remove("KEEL_TEST_ADMIN_TOKEN")
        .env_remove("KEEL_ADMIN_TOKEN")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("keel.toml:3: server.admin_token_env: "),
        "{stderr}"
    );
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    // `keel ... | head -1`: the reader is gone before keel writes its line.
    let (dir, path) = config_file("[server]\nlisten = \"127.0.0.1:8420\"\n");
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = keel()
        .args(["config", "check"])
        .arg(&path)
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    drop(dir);
}

/// A config that opens keel to other machines with no admin token passes its check, with a
/// warning that says what is open and what to set.
#[test]
fn config_check_warns_of_a_public_address_without_an_admin_token() {
    let (_dir, path) = config_file("[server]\nlisten = \"0.0.0.0:8420\"\n");
    let out = keel()
        .args(["config", "check"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("warning: ")
            && stderr.contains("keel.toml:2: server.listen: 0.0.0.0:8420 is not a loopback address and no admin_token_env is set")
            && stderr.contains("with no agent keys"),
        "{stderr}"
    );
    // An admin token guards the operator API, not the models: without agent keys, anyone
    // who reaches keel can still spend its provider keys.
    let guarded = "[server]\nlisten = \"0.0.0.0:8420\"\nadmin_token_env = \"KEEL_TEST_ADMIN\"\n";
    let (_dir, path) = config_file(guarded);
    let out = keel()
        .args(["config", "check"])
        .arg(&path)
        .env("KEEL_TEST_ADMIN", "admin-secret")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("keel.toml:2: server.listen: 0.0.0.0:8420 is not a loopback address and no agent has keys: anyone who reaches it can call models with keel's provider keys")
            && !stderr.contains("admin_token_env is set"),
        "{stderr}"
    );
    // With agent keys too, nothing is open.
    let (_dir, path) = config_file(&format!(
        "{guarded}[agents.a]\nkeys_env = [\"KEEL_TEST_AGENT_KEY\"]\n"
    ));
    let out = keel()
        .args(["config", "check"])
        .arg(&path)
        .env("KEEL_TEST_ADMIN", "admin-secret")
        .env("KEEL_TEST_AGENT_KEY", "sk-agent")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for loopback in ["127.0.0.1:8420", "[::1]:8420", "[::ffff:127.0.0.1]:8420"] {
        let (_dir, path) = config_file(&format!("[server]\nlisten = \"{loopback}\"\n"));
        let out = keel()
            .args(["config", "check"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.stderr.is_empty(),
            "{loopback}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `keel tasks requeue` and `keel tasks cancel` call the operator API an operator would
/// otherwise reach with curl.
#[tokio::test]
async fn tasks_are_requeued_and_cancelled_from_the_cli() {
    let sim = crate::common::sim().await;
    let running = crate::common::Keel::start(crate::common::TWO_TARGETS, &sim).await;
    // A running task: requeued, it loses its lease.
    let (id, _lease) = running.claimed_task("demo").await;
    let text = |out: std::process::Output| String::from_utf8_lossy(&out.stdout).into_owned();
    // The SDKs' base URL names the same keel.
    let out = keel()
        .args(["tasks", "requeue", &id, "--reason", "stuck\nworker"])
        .args(["--server", &format!("{}/v1", running.url)])
        .env_remove("KEEL_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text(out).trim(), format!("{id} is now queued"));
    let out = running.cli_ok(&["tasks", "cancel", &id, "--reason", "not needed"]);
    assert_eq!(text(out).trim(), format!("{id} is now cancelled"));
    let log = text(running.cli_ok(&["tasks", "events", &id, "--json"]));
    assert!(log.contains("\"task_requeued\""), "{log}");
    assert!(log.contains("\"task_cancelled\""), "{log}");
    // An ended task cannot be cancelled again: the API's refusal, and a failing exit.
    let out = running.cli(&["tasks", "cancel", &id]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cancelled"), "{stderr}");
}
