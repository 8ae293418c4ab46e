//! Durable tasks end to end: Python workers in separate processes, crashes of
//! workers and of keel itself, bad input, approvals, the DLQ and the CLI.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::common::{Keel, get, keel_cli, keel_cli_ok, post, python, read_events, sim};

const TASKS: &str = r#"
[server]
listen = "{listen}"
[store]
url = "sqlite://{dir}/keel.db"
[providers.sim]
kind = "openai"
base_url = "{sim}"
[routes.smart]
targets = [{ provider = "sim", model = "primary" }]
[agents.demo]
max_attempts = 3
[agents.short]
max_attempts = 2
max_steps = 5
"#;

fn config(listen: &str) -> String {
    TASKS.replace("{listen}", listen)
}

fn worker_script() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/worker.py").to_owned()
}

fn worker(url: &str, agent: &str, name: &str, extra: &[&str]) -> Child {
    Command::new(python())
        .arg(worker_script())
        .args([
            "--server", url, "--agent", agent, "--worker", name, "--lease", "2s",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn create(url: &str, agent: &str) -> String {
    let (status, task) = post(
        url,
        "/v1/tasks",
        json!({"agent": agent, "input": {"q": "x"}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{task}");
    task["id"].as_str().unwrap().to_owned()
}

async fn claim(url: &str, agent: &str) -> Value {
    let (status, task) = post(
        url,
        "/v1/tasks/claim",
        json!({"agent": agent, "worker": "rust", "lease": "30s"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{task}");
    task
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crashed_worker_s_task_resumes_from_its_checkpoint() {
    let sim = sim().await;
    let keel = Keel::start(&config("127.0.0.1:0"), &sim).await;
    // The first worker creates a task, saves one checkpoint, and is SIGKILLed.
    let mut first = worker(
        &keel.url,
        "demo",
        "w1",
        &["--create", "1", "--crash-after", "1"],
    );
    let status = first.wait().await.unwrap();
    assert!(!status.success(), "the worker should have crashed");
    let (_, page) = get(&keel.url, "/v1/tasks?agent=demo").await;
    let id = page["tasks"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(page["tasks"][0]["state"], "running");
    // The second worker gets the task once the lease (2s) expires, from checkpoint 1.
    let second = worker(&keel.url, "demo", "w2", &["--idle-exit", "4"]);
    let out = second.wait_with_output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("resuming at step 1"), "{stdout}");
    let (_, task) = get(&keel.url, &format!("/v1/tasks/{id}")).await;
    assert_eq!(task["state"], "succeeded", "{task}");
    assert_eq!(task["output"]["resumed_from"], 1);
    assert_eq!(task["attempts"], 2);
    // `keel tasks show` and `keel tasks events` tell the story.
    let show = keel_cli(&keel.url, &["tasks", "show", &id]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        show.status.success() && text.contains("succeeded"),
        "{text}"
    );
    let events = keel_cli(&keel.url, &["tasks", "events", &id]);
    let text = String::from_utf8_lossy(&events.stdout);
    for kind in [
        "task_created",
        "task_claimed",
        "checkpoint_saved",
        "lease_expired",
        "task_succeeded",
    ] {
        assert!(text.contains(kind), "missing {kind} in:\n{text}");
    }
    let metrics = keel.metrics().await;
    assert!(
        metrics.contains("keel_tasks_total{agent=\"demo\",outcome=\"succeeded\"} 1"),
        "{metrics}"
    );
    let ls = keel_cli(&keel.url, &["tasks", "ls", "--json"]);
    let listed: Value = serde_json::from_slice(&ls.stdout).unwrap();
    assert_eq!(listed["tasks"][0]["id"], id.as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_task_input_gets_clear_errors_and_changes_nothing() {
    let sim = sim().await;
    let keel = Keel::start(&config("127.0.0.1:0"), &sim).await;
    let url = &keel.url;
    let (status, err) = get(url, "/v1/tasks/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("nope"));
    let id = create(url, "demo").await;
    let task = claim(url, "demo").await;
    let token = task["lease_token"].as_str().unwrap().to_owned();
    let (_, before) = get(url, &format!("/v1/tasks/{id}")).await;
    let cases: Vec<(&str, Value, StatusCode)> = vec![
        (
            "complete",
            json!({"lease_token": "wrong", "output": 1}),
            StatusCode::CONFLICT,
        ),
        (
            "heartbeat",
            json!({"lease_token": "wrong"}),
            StatusCode::CONFLICT,
        ),
        ("complete", json!({"output": 1}), StatusCode::BAD_REQUEST),
        (
            "steps",
            json!({"lease_token": token, "progress": 7.0}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "checkpoints",
            json!({"lease_token": token, "state": "x".repeat(1_100_000)}),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
    ];
    for (action, body, want) in cases {
        let (status, err) = post(url, &format!("/v1/tasks/{id}/{action}"), body).await;
        assert_eq!(status, want, "{action}: {err}");
        assert!(err["error"]["message"].is_string(), "{err}");
    }
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/tasks/{id}/complete"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let (_, after) = get(url, &format!("/v1/tasks/{id}")).await;
    assert_eq!(before, after, "a refused call changed the task");
    // Complete after cancel is refused; the heartbeat tells the worker to stop.
    let (status, _) = post(
        url,
        &format!("/v1/tasks/{id}/cancel"),
        json!({"reason": "operator"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, hb) = post(
        url,
        &format!("/v1/tasks/{id}/heartbeat"),
        json!({"lease_token": token}),
    )
    .await;
    assert_eq!(
        (status, hb["directive"].as_str()),
        (StatusCode::OK, Some("cancel")),
        "{hb}"
    );
    let (status, err) = post(
        url,
        &format!("/v1/tasks/{id}/complete"),
        json!({"lease_token": token, "output": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{err}");
    let (_, task) = get(url, &format!("/v1/tasks/{id}")).await;
    assert_eq!(task["state"], "cancelled");
    assert!(
        !task.to_string().contains(&token),
        "the lease token must not be shown: {task}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_s_events_hold_the_lease_token_s_hash_not_the_token() {
    let sim = sim().await;
    let keel = Keel::start(&config("127.0.0.1:0"), &sim).await;
    let url = &keel.url;
    let id = create(url, "demo").await;
    let task = claim(url, "demo").await;
    let token = task["lease_token"].as_str().unwrap().to_owned();
    let events = reqwest::get(format!("{url}/v1/tasks/{id}/events"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !events.contains(&token),
        "the lease token is in the log:\n{events}"
    );
    let claimed: Value = events
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|e| e["kind"] == "task_claimed")
        .unwrap();
    assert_eq!(
        claimed["data"]["token_hash"],
        keel_supervisor::token_hash(&token),
        "{claimed}"
    );
    // Whoever reads the log cannot act as the holder with what it finds there.
    let hash = claimed["data"]["token_hash"].as_str().unwrap();
    let (status, err) = post(
        url,
        &format!("/v1/tasks/{id}/heartbeat"),
        json!({"lease_token": hash}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{err}");
    // The worker's token works, and `keel tasks events` shows no token either.
    let (status, hb) = post(
        url,
        &format!("/v1/tasks/{id}/heartbeat"),
        json!({"lease_token": token}),
    )
    .await;
    assert_eq!(
        (status, &hb["directive"]),
        (StatusCode::OK, &json!("continue")),
        "{hb}"
    );
    let cli = keel_cli(url, &["tasks", "events", &id, "--json"]);
    let text = String::from_utf8_lossy(&cli.stdout);
    assert!(
        cli.status.success() && text.contains("task_claimed"),
        "{text}"
    );
    assert!(!text.contains(&token), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotency_keys_return_the_first_answer_and_append_nothing() {
    let sim = sim().await;
    let keel = Keel::start(&config("127.0.0.1:0"), &sim).await;
    let url = &keel.url;
    let body = json!({"agent": "demo", "input": {}, "idempotency_key": "order-1"});
    let (s1, a) = post(url, "/v1/tasks", body.clone()).await;
    let (s2, b) = post(url, "/v1/tasks", body).await;
    assert_eq!((s1, s2), (StatusCode::CREATED, StatusCode::CREATED));
    assert_eq!(a["id"], b["id"]);
    let id = a["id"].as_str().unwrap().to_owned();
    let task = claim(url, "demo").await;
    let token = task["lease_token"].as_str().unwrap();
    let client = reqwest::Client::new();
    let mut answers = Vec::new();
    for _ in 0..2 {
        let r = client
            .post(format!("{url}/v1/tasks/{id}/checkpoints"))
            .header("idempotency-key", "ckpt-1")
            .json(&json!({"lease_token": token, "state": {"k": 1}}))
            .send()
            .await
            .unwrap();
        answers.push(r.json::<Value>().await.unwrap());
    }
    assert_eq!(answers[0], answers[1]);
    // The same key with another body is a mistake, said plainly, and changes nothing.
    let request = client
        .post(format!("{url}/v1/tasks/{id}/checkpoints"))
        .header("idempotency-key", "ckpt-1")
        .json(&json!({"lease_token": token, "state": {"k": 2}}));
    let err = openai_error(request, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(err["error"]["code"], "idempotency_key_reused", "{err}");
    assert_eq!(err["error"]["param"], "idempotency_key", "{err}");
    let other = json!({"agent": "demo", "input": {"other": true}, "idempotency_key": "order-1"});
    let request = client.post(format!("{url}/v1/tasks")).json(&other);
    let err = openai_error(request, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(err["error"]["code"], "idempotency_key_reused", "{err}");
    let checkpoints = keel
        .events()
        .iter()
        .filter(|(k, _)| k == "checkpoint_saved")
        .count();
    assert_eq!(checkpoints, 1, "a repeated call appended again");
    let (_, page) = get(url, "/v1/tasks").await;
    assert_eq!(page["tasks"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_attempts_goes_to_the_dlq_and_back() {
    let sim = sim().await;
    let keel = Keel::start(&config("127.0.0.1:0"), &sim).await;
    let url = &keel.url;
    let id = create(url, "short").await;
    for attempt in 1..=2 {
        let task = claim(url, "short").await;
        let token = task["lease_token"].as_str().unwrap();
        let (status, t) = post(url, &format!("/v1/tasks/{id}/fail"), json!({"lease_token": token, "error": {"msg": format!("boom {attempt}")}, "retryable": true})).await;
        assert_eq!(status, StatusCode::OK, "{t}");
    }
    let (_, task) = get(url, &format!("/v1/tasks/{id}")).await;
    assert_eq!(task["state"], "dead", "{task}");
    assert_eq!(task["last_error"]["msg"], "boom 2", "{task}");
    let ls = keel_cli(url, &["dlq", "ls"]);
    assert!(String::from_utf8_lossy(&ls.stdout).contains(&id));
    // A second dead task: the listing pages with the cursor it prints.
    let other = create(url, "short").await;
    for _ in 1..=2 {
        let task = claim(url, "short").await;
        let token = task["lease_token"].as_str().unwrap();
        let (status, t) = post(
            url,
            &format!("/v1/tasks/{other}/fail"),
            json!({"lease_token": token, "error": "boom", "retryable": true}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{t}");
    }
    let first = keel_cli(url, &["dlq", "ls", "--limit", "1"]);
    let first = String::from_utf8_lossy(&first.stdout).into_owned();
    assert!(first.contains(&id) && !first.contains(&other), "{first}");
    // The next page's command as printed: its cursor, and the --limit given.
    let more = first
        .lines()
        .find_map(|l| l.strip_prefix("(more: ")?.strip_suffix(')'))
        .unwrap_or_else(|| panic!("no cursor in:\n{first}"));
    assert!(
        more.starts_with("--cursor ") && more.ends_with(" --limit 1"),
        "{more}"
    );
    let mut next = vec!["dlq", "ls"];
    next.extend(more.split(' '));
    let second = keel_cli_ok(url, &next);
    let second = String::from_utf8_lossy(&second.stdout).into_owned();
    assert!(second.contains(&other) && !second.contains(&id), "{second}");
    // `keel tasks ls` puts the newest first; `--order asc` the oldest.
    for (order, top) in [(None, &other), (Some("asc"), &id)] {
        let mut args = vec!["tasks", "ls", "--state", "dead", "--limit", "1"];
        args.extend(order.map(|o| ["--order", o]).into_iter().flatten());
        let ls = keel_cli(url, &args);
        let text = String::from_utf8_lossy(&ls.stdout).into_owned();
        assert!(text.contains(top.as_str()), "{args:?}:\n{text}");
        // The next page's command, as printed, keeps the filter and the order.
        let more = text
            .lines()
            .find_map(|l| l.strip_prefix("(more: ")?.strip_suffix(')'))
            .unwrap_or_else(|| panic!("no next page in:\n{text}"));
        assert!(more.contains("--state dead"), "{more}");
        assert!(more.contains("--limit 1"), "{more}");
        let mut next = vec!["tasks", "ls"];
        next.extend(more.split(' '));
        let page = keel_cli(url, &next);
        let page = String::from_utf8_lossy(&page.stdout);
        let other_one = if top == &other { &id } else { &other };
        assert!(page.contains(other_one.as_str()), "{next:?}:\n{page}");
    }
    let zero = keel_cli(url, &["tasks", "ls", "--limit", "0"]);
    assert!(
        !zero.status.success() && String::from_utf8_lossy(&zero.stderr).contains("1..=1000"),
        "{}",
        String::from_utf8_lossy(&zero.stderr)
    );
    // `dlq show`: the task with its whole log.
    let shown = keel_cli_ok(url, &["dlq", "show", &id]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains("task_created") && text.contains("task_dead"),
        "{text}"
    );
    keel_cli_ok(
        url,
        &["dlq", "requeue", &id, "--note", "the input is fixed"],
    );
    let (_, task) = get(url, &format!("/v1/tasks/{id}")).await;
    assert_eq!(task["state"], "queued");
    // The note is kept in the task's log.
    let log = keel_cli(url, &["tasks", "events", &id, "--json"]);
    let log = String::from_utf8_lossy(&log.stdout);
    assert!(
        log.contains("requeued from the dead-letter queue: the input is fixed"),
        "{log}"
    );
    let shown = keel_cli(url, &["dlq", "show", &id]);
    assert!(!shown.status.success());
    assert!(
        String::from_utf8_lossy(&shown.stderr)
            .contains("is not in the dead-letter queue: it is queued"),
        "{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    let task = claim(url, "short").await;
    assert_eq!(task["attempts"], 1, "a DLQ requeue gives fresh attempts");
}

#[tokio::test(flavor = "multi_thread")]
async fn approvals_resume_or_end_a_task_and_time_out_to_their_default() {
    let sim = sim().await;
    let keel = Keel::start(&config("127.0.0.1:0"), &sim).await;
    let url = &keel.url;
    let id = create(url, "demo").await;
    let task = claim(url, "demo").await;
    let token = task["lease_token"].as_str().unwrap();
    let (status, a) = post(
        url,
        &format!("/v1/tasks/{id}/approvals"),
        json!({"lease_token": token, "reason": "refund 900 EUR", "context": {"amount": 900}}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{a}");
    let approval = a["pending_approval"].as_str().unwrap().to_owned();
    let ls = keel_cli(url, &["approvals", "ls"]);
    assert!(String::from_utf8_lossy(&ls.stdout).contains("refund 900 EUR"));
    keel_cli_ok(
        url,
        &["approvals", "approve", &approval, "--note", "checked"],
    );
    let (_, task) = get(url, &format!("/v1/tasks/{id}")).await;
    assert_eq!(task["state"], "queued");
    let decided = keel.events_of("approval_decided");
    assert_eq!(decided[0]["note"], "checked", "{decided:?}");
    // An approval nobody answers takes its default (deny) after its timeout.
    let task = claim(url, "demo").await;
    let token = task["lease_token"].as_str().unwrap();
    let (status, _) = post(
        url,
        &format!("/v1/tasks/{id}/approvals"),
        json!({"lease_token": token, "reason": "again", "timeout": "500ms"}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, task) = get(url, &format!("/v1/tasks/{id}")).await;
    assert_eq!(task["state"], "dead", "{task}");
}

#[tokio::test(flavor = "multi_thread")]
async fn deciding_an_approval_twice_is_a_conflict_that_says_how_it_was_decided() {
    let sim = sim().await;
    let keel = Keel::start(&config("127.0.0.1:0"), &sim).await;
    let url = &keel.url;
    let id = create(url, "demo").await;
    let (status, asked) = post(
        url,
        &format!("/v1/tasks/{id}/approvals"),
        json!({"reason": "refund 900 EUR"}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{asked}");
    let approval = asked["pending_approval"].as_str().unwrap().to_owned();
    keel_cli_ok(url, &["approvals", "deny", &approval, "--note", "too much"]);
    // Again, from the CLI and over HTTP: a 409 that says who decided what.
    let again = keel_cli(url, &["approvals", "approve", &approval]);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "approval {approval} of task {id} was already decided: denied by"
        )) && stderr.contains("(\"too much\")")
            && stderr.contains("HTTP 409"),
        "{stderr}"
    );
    let client = reqwest::Client::new();
    let request = client
        .post(format!("{url}/v1/approvals/{approval}"))
        .json(&json!({"decision": "approve"}));
    let body = openai_error(request, StatusCode::CONFLICT).await;
    assert_eq!(body["error"]["code"], "approval_already_decided", "{body}");
    assert!(body["error"].get("param").is_some(), "{body}");
    // An approval that never existed is still a 404.
    let request = client
        .post(format!("{url}/v1/approvals/apr_never"))
        .json(&json!({"decision": "approve"}));
    let body = openai_error(request, StatusCode::NOT_FOUND).await;
    assert_eq!(body["error"]["code"], "approval_not_found", "{body}");
    let (_, task) = get(url, &format!("/v1/tasks/{id}")).await;
    assert_eq!(
        task["state"], "dead",
        "the late approval changed the task: {task}"
    );
}

/// Polls `GET /v1/tasks/{id}` until the task is in `state` (at most `within`); the task.
async fn wait_for_state(url: &str, id: &str, state: &str, within: Duration) -> Value {
    let started = Instant::now();
    loop {
        let (status, task) = get(url, &format!("/v1/tasks/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{task}");
        if task["state"] == state {
            return task;
        }
        assert!(
            started.elapsed() < within,
            "task {id} is not {state} after {within:?}: {task}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tasks_nobody_works_on_end_dead_at_their_deadline() {
    let sim = sim().await;
    let keel = Keel::start(&config("127.0.0.1:0"), &sim).await;
    let url = &keel.url;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (status, task) = post(
            url,
            "/v1/tasks",
            json!({"agent": "demo", "input": {}, "deadline": "1s"}),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{task}");
        ids.push(task["id"].as_str().unwrap().to_owned());
    }
    // One stays queued (nobody claims it), the other waits for a person who never decides.
    let (status, asked) = post(
        url,
        &format!("/v1/tasks/{}/approvals", ids[1]),
        json!({"reason": "a person decides", "timeout": "1h"}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{asked}");
    for id in &ids {
        let task = wait_for_state(url, id, "dead", Duration::from_secs(10)).await;
        assert_eq!(task["last_error"], "task_timeout exceeded", "{task}");
    }
    let dead = keel.events_of("task_dead");
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert!(
        dead.iter().all(|d| d["reason"] == "task_timeout"),
        "{dead:?}"
    );
    let decided = keel.events_of("approval_decided");
    assert_eq!(decided[0]["by"], "deadline", "{decided:?}");
    let (_, approvals) = get(url, "/v1/approvals").await;
    assert_eq!(approvals["approvals"], json!([]), "{approvals}");
}

#[tokio::test(flavor = "multi_thread")]
async fn gateway_calls_of_a_task_land_in_its_log_and_the_chain_verifies() {
    let sim = sim().await;
    let keel = Keel::start(&config("127.0.0.1:0"), &sim).await;
    let url = &keel.url;
    let id = create(url, "demo").await;
    // The call names the task's agent: another agent may not write into its log.
    let out = crate::common::sdk(
        "chat",
        &format!("{url}/tasks/{id}/v1"),
        &["--header", "x-keel-agent=demo"],
    )
    .await;
    assert_eq!(out["ok"], true, "{out}");
    let text = reqwest::get(format!("{url}/v1/tasks/{id}/events"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let kinds: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(kinds, ["task_created", "llm_call"]);
    let verify = keel_cli_ok(url, &["audit", "verify"]);
    assert!(String::from_utf8_lossy(&verify.stdout).contains("intact"));
    // Edit one event in the database file: verification names that link.
    let db = rusqlite::Connection::open(keel.db_path()).unwrap();
    db.execute(
        "UPDATE events SET data = replace(data, 'smart', 'smurf') WHERE kind = 'llm_call'",
        [],
    )
    .unwrap();
    let seq: i64 = db
        .query_row("SELECT seq FROM events WHERE kind = 'llm_call'", [], |r| {
            r.get(0)
        })
        .unwrap();
    drop(db);
    let verify = keel_cli(url, &["audit", "verify"]);
    assert!(!verify.status.success());
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(
        stderr.contains(&format!("broken at event {seq}")),
        "{stderr}"
    );
}

/// Acknowledged calls from the workers' ack logs: checkpoints as (task, seq), completed tasks.
fn acknowledged(dir: &Path) -> (HashSet<(String, u64)>, HashSet<String>) {
    let mut checkpoints = HashSet::new();
    let mut completed = HashSet::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "acks") {
            continue;
        }
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let Ok(ack) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let path = ack["path"].as_str().unwrap_or_default();
            let task = path.split('/').nth(3).unwrap_or_default().to_owned();
            if ack["status"] != 200 {
                continue;
            }
            if path.ends_with("/checkpoints") {
                checkpoints.insert((task, ack["body"]["seq"].as_u64().unwrap()));
            } else if path.ends_with("/complete") {
                completed.insert(task);
            }
        }
    }
    (checkpoints, completed)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_tasks_survive_worker_and_keel_kill_9() {
    let sim = sim().await;
    // A fixed port, so workers find keel again after its restart.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut keel = Keel::start(&config(&listen), &sim).await;
    let url = keel.url.clone();
    let client = reqwest::Client::new();
    let mut creates = Vec::new();
    for i in 0..1000 {
        let client = client.clone();
        let url = url.clone();
        creates.push(tokio::spawn(async move {
            let r = client
                .post(format!("{url}/v1/tasks"))
                .json(&json!({"agent": "demo", "input": {"n": i}}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::CREATED);
        }));
    }
    for c in creates {
        c.await.unwrap();
    }
    let acks = tempfile::tempdir().unwrap();
    let ack = |n: &str| acks.path().join(format!("{n}.acks")).display().to_string();
    let mut workers = Vec::new();
    for n in 0..4 {
        let name = format!("w{n}");
        let log = ack(&name);
        // Worker 0 is SIGKILLed after 5 checkpoints, in the middle of a task.
        let crash: &[&str] = if n == 0 { &["--crash-after", "5"] } else { &[] };
        let mut args = vec!["--idle-exit", "5", "--ack-log", log.as_str()];
        args.extend_from_slice(crash);
        workers.push(worker(&url, "demo", &name, &args));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // keel itself is killed under load and restarted on the same store and port.
    let (_, done) = get(&url, "/v1/tasks?state=succeeded&limit=1000").await;
    let done_before_kill = done["tasks"].as_array().unwrap().len();
    assert!(
        (1..1000).contains(&done_before_kill),
        "not under load at the kill: {done_before_kill} done"
    );
    let pid = keel.child.id().unwrap();
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    keel.child.wait().await.unwrap();
    let dir = std::mem::replace(&mut keel.dir, tempfile::tempdir().unwrap());
    let keel = Keel::start_in(dir, &config(&listen), &sim).await;
    for w in workers {
        let _ = w.wait_with_output().await.unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_secs(170),
        "took too long: {:?}",
        started.elapsed()
    );
    // Every task ended, none twice, and every acknowledged call is in the log.
    let events = read_events(&keel.db_path());
    let mut succeeded: HashMap<String, usize> = HashMap::new();
    let mut checkpoints = HashSet::new();
    let db = rusqlite::Connection::open(keel.db_path()).unwrap();
    let mut stmt = db
        .prepare("SELECT task_id, kind, data FROM events WHERE task_id IS NOT NULL")
        .unwrap();
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })
        .unwrap();
    for row in rows {
        let (task, kind, data) = row.unwrap();
        let data: Value = serde_json::from_str(&data).unwrap();
        match kind.as_str() {
            "task_succeeded" => *succeeded.entry(task).or_default() += 1,
            "checkpoint_saved" => {
                checkpoints.insert((task, data["seq"].as_u64().unwrap()));
            }
            _ => {}
        }
    }
    assert!(events.len() > 5000, "{}", events.len());
    let (page_states, _) = (get(&keel.url, "/v1/tasks?limit=1000").await, ());
    let tasks = page_states.1["tasks"].as_array().unwrap().clone();
    assert_eq!(tasks.len(), 1000);
    let unfinished: Vec<_> = tasks
        .iter()
        .filter(|t| t["state"] != "succeeded")
        .map(|t| (t["id"].clone(), t["state"].clone()))
        .collect();
    assert!(unfinished.is_empty(), "tasks not succeeded: {unfinished:?}");
    assert_eq!(succeeded.len(), 1000);
    assert!(
        succeeded.values().all(|n| *n == 1),
        "a task completed twice"
    );
    let (acked_checkpoints, acked_completes) = acknowledged(acks.path());
    let lost: Vec<_> = acked_checkpoints.difference(&checkpoints).collect();
    assert!(
        lost.is_empty(),
        "acknowledged checkpoints missing: {lost:?}"
    );
    assert!(acked_completes.iter().all(|t| succeeded.contains_key(t)));
    // The crashed worker's task was resumed by another worker from its checkpoint.
    let resumed = tasks
        .iter()
        .filter(|t| t["output"]["resumed_from"].as_u64().unwrap_or(0) > 0)
        .count();
    assert!(resumed >= 1, "no task resumed from a checkpoint");
    keel_cli_ok(&keel.url, &["audit", "verify"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_calls_need_the_admin_token_when_one_is_configured() {
    let sim = sim().await;
    let config = config("127.0.0.1:0")
        .replace(
            "listen = \"127.0.0.1:0\"",
            "listen = \"127.0.0.1:0\"\nadmin_token_env = \"KEEL_TEST_ADMIN_TOKEN\"",
        )
        .replace("[store]\n", "[store]\nmax_checkpoint_bytes = 1000\n");
    let keel = Keel::start(&config, &sim).await;
    let url = &keel.url;
    // Workers need no admin token.
    let id = create(url, "demo").await;
    let (status, err) = get(url, "/v1/tasks").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("KEEL_ADMIN_TOKEN"),
        "{err}"
    );
    let (status, _) = post(url, &format!("/v1/tasks/{id}/cancel"), json!({})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let r = reqwest::Client::new()
        .get(format!("{url}/v1/tasks/{id}"))
        .bearer_auth("admin-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // The scheme's name is case-insensitive; a wrong token is called wrong, not missing.
    for (authorization, status) in [
        ("bearer admin-secret", StatusCode::OK),
        ("Bearer not-the-token", StatusCode::UNAUTHORIZED),
    ] {
        let r = reqwest::Client::new()
            .get(format!("{url}/v1/tasks/{id}"))
            .header("authorization", authorization)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{authorization}");
        if status == StatusCode::UNAUTHORIZED {
            let body: serde_json::Value = r.json().await.unwrap();
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("wrong admin token"),
                "{body}"
            );
        }
    }
    let denied = keel_cli(url, &["tasks", "ls"]);
    assert!(!denied.status.success());
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("admin token"),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    let allowed = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["tasks", "ls", "--server", url])
        .env("KEEL_ADMIN_TOKEN", "admin-secret")
        .output()
        .unwrap();
    assert!(
        allowed.status.success(),
        "{}",
        String::from_utf8_lossy(&allowed.stderr)
    );
    assert!(String::from_utf8_lossy(&allowed.stdout).contains(&id));
    // The configured checkpoint limit applies.
    let task = claim(url, "demo").await;
    let token = task["lease_token"].as_str().unwrap();
    let (status, err) = post(
        url,
        &format!("/v1/tasks/{id}/checkpoints"),
        json!({"lease_token": token, "state": "x".repeat(2000)}),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1000 bytes"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn creating_and_claiming_need_the_agent_key_when_keys_are_configured() {
    let sim = sim().await;
    let config = config("127.0.0.1:0").replace(
        "[agents.demo]\n",
        "[agents.demo]\nkeys_env = [\"KEEL_KEY_SUPPORT\"]\n",
    );
    let keel = Keel::start(&config, &sim).await;
    let url = &keel.url;
    let client = reqwest::Client::new();
    let body = json!({"agent": "demo", "input": {}});
    let r = client
        .post(format!("{url}/v1/tasks"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = client
        .post(format!("{url}/v1/tasks"))
        .bearer_auth("sk-agent-support")
        .json(&json!({"agent": "short", "input": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::FORBIDDEN,
        "a key creates tasks of its own agent only"
    );
    let (_, page) = get(url, "/v1/tasks").await;
    assert_eq!(
        page["tasks"].as_array().unwrap().len(),
        0,
        "a refused create created a task"
    );
    // The example worker sends its key, and runs the task through.
    let out = worker(
        url,
        "demo",
        "w1",
        &[
            "--create",
            "1",
            "--idle-exit",
            "1",
            "--key",
            "sk-agent-support",
        ],
    )
    .wait_with_output()
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("200 succeeded"), "{stdout}");
    let r = client
        .post(format!("{url}/v1/tasks/claim"))
        .json(&json!({"agent": "demo", "worker": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_task_api_answers_bad_requests_in_the_openai_shape_and_takes_bodies_up_to_the_limit() {
    let sim = sim().await;
    let keel = Keel::start("[agents.demo]\n", &sim).await;
    let client = reqwest::Client::new();
    for (query, param) in [("state=bogus", "state"), ("cursor=zzz", "cursor")] {
        let request = client.get(format!("{}/v1/tasks?{query}", keel.url));
        let body = openai_error(request, StatusCode::BAD_REQUEST).await;
        assert_eq!(body["error"]["param"], param, "{body}");
    }
    let request = client.get(format!("{}/v1/tasks?limit=abc", keel.url));
    let body = openai_error(request, StatusCode::BAD_REQUEST).await;
    assert!(
        body["error"]["message"].as_str().unwrap().contains("limit"),
        "{body}"
    );
    // A claim no task could accept is an error, not "nothing queued" (204).
    let (status, _) = post(
        &keel.url,
        "/v1/tasks",
        json!({"agent": "demo", "input": {}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    for claim in [
        json!({"agent": "demo", "worker": "", "lease": "30s"}),
        json!({"agent": "", "worker": "w", "lease": "30s"}),
    ] {
        let (status, body) = post(&keel.url, "/v1/tasks/claim", claim).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(body["error"]["param"].is_string(), "{body}");
    }
    // A path that takes POST only, asked with GET; and a gateway path asked with GET.
    for path in ["/v1/tasks/claim", "/v1/chat/completions"] {
        let request = client.get(format!("{}{path}", keel.url));
        let body = openai_error(request, StatusCode::METHOD_NOT_ALLOWED).await;
        assert_eq!(body["error"]["code"], "method_not_allowed", "{body}");
    }
    // 3 MB of input is under the default `server.max_body_bytes` (4 MiB): accepted, as a
    // model call of that size is. Just over 4 MiB is a 413 in the OpenAI shape (just over:
    // keel stops reading at the limit, and a client still writing a far larger body may see
    // the connection reset before it reads the answer).
    let input = "x".repeat(3_000_000);
    let (status, task) = post(
        &keel.url,
        "/v1/tasks",
        json!({"agent": "demo", "input": {"text": input}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{task}");
    let input = "x".repeat(4 * 1024 * 1024);
    let request = client
        .post(format!("{}/v1/tasks", keel.url))
        .json(&json!({"agent": "demo", "input": {"text": input}}));
    let body = openai_error(request, StatusCode::PAYLOAD_TOO_LARGE).await;
    assert_eq!(body["error"]["code"], "request_too_large", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limit of 4194304 bytes (server.max_body_bytes)"),
        "the message names the limit in force and its setting: {body}"
    );
}

/// Sends `request` and checks that the answer is `expected` with an OpenAI-shaped error body,
/// which it returns.
async fn openai_error(request: reqwest::RequestBuilder, expected: StatusCode) -> Value {
    let r = request.send().await.unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    assert_eq!(status, expected, "{text}");
    let body: Value = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("not JSON (HTTP {status}): {text:?}"));
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(body["error"]["type"].is_string(), "{body}");
    body
}
