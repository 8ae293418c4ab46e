//! keel on PostgreSQL: several `keel serve` nodes sharing one database (a real server,
//! started for the test by `keel_store::testing::PgServer`).

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{Keel, sim};
use keel_store::testing::PgServer;

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
[store]
url = "{pg}"
[providers.sim]
kind = "openai"
base_url = "{sim}"
[routes.smart]
targets = [{ provider = "sim", model = "primary" }]
[agents.demo]
max_attempts = 3
"#;

fn pg_server() -> PgServer {
    PgServer::start().unwrap_or_else(|e| panic!("cannot start PostgreSQL for the test: {e}"))
}

async fn post(url: &str, path: &str, body: Value) -> (StatusCode, Value) {
    let r = reqwest::Client::new()
        .post(format!("{url}{path}"))
        .header("x-keel-agent", "demo")
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn get(url: &str, path: &str) -> (StatusCode, Value) {
    let r = reqwest::get(format!("{url}{path}")).await.unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_on_one_postgres_share_tasks_claims_and_one_verifiable_log() {
    let server = pg_server();
    let pg = server.create_database("keel").await.unwrap();
    let sim = sim().await;
    let config = CONFIG.replace("{pg}", &pg);
    let (mut a, b) = tokio::join!(Keel::start(&config, &sim), Keel::start(&config, &sim));

    // Created on node A, claimed through node B; the second claim (on A) finds nothing.
    let (status, task) = post(
        &a.url,
        "/v1/tasks",
        json!({"agent": "demo", "input": {"q": 1}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{task}");
    let id = task["id"].as_str().unwrap().to_owned();
    let claim = json!({"agent": "demo", "worker": "w-b", "lease": "30s"});
    let (status, claimed) = post(&b.url, "/v1/tasks/claim", claim.clone()).await;
    assert_eq!(status, StatusCode::OK, "{claimed}");
    assert_eq!(claimed["id"], id.as_str());
    let token = claimed["lease_token"].as_str().unwrap().to_owned();
    let (status, again) = post(&a.url, "/v1/tasks/claim", claim).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{again}");

    // A model call of the task through node A, the heartbeat and completion through B.
    let (status, answer) = post(
        &a.url,
        &format!("/tasks/{id}/v1/chat/completions"),
        json!({"model": "smart", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (status, beat) = post(
        &b.url,
        &format!("/v1/tasks/{id}/heartbeat"),
        json!({"lease_token": token}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{beat}");
    let (status, done) = post(
        &b.url,
        &format!("/v1/tasks/{id}/complete"),
        json!({"lease_token": token, "output": {"a": 2}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{done}");
    let (_, seen_by_a) = get(&a.url, &format!("/v1/tasks/{id}")).await;
    assert_eq!(seen_by_a["state"], "succeeded", "{seen_by_a}");

    // Both nodes read the one log: the task's events, in order, whichever node wrote them.
    let events = |url: String| {
        let path = format!("{url}/v1/tasks/{id}/events");
        async move {
            reqwest::get(path)
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .collect::<Vec<_>>()
        }
    };
    let from_a = events(a.url.clone()).await;
    let from_b = events(b.url.clone()).await;
    assert_eq!(from_a, from_b);
    let kinds: Vec<&str> = from_a.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"task_created"), "{kinds:?}");
    assert!(kinds.contains(&"llm_call"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"task_succeeded"), "{kinds:?}");
    let (status, verify) = get(&b.url, "/v1/audit/verify").await;
    assert_eq!(status, StatusCode::OK, "{verify}");
    assert_eq!(verify["intact"], true, "{verify}");

    // Node A dies with kill -9: B goes on, and a new node sees everything acknowledged.
    a.child.start_kill().unwrap();
    a.child.wait().await.unwrap();
    let (status, second) = post(&b.url, "/v1/tasks", json!({"agent": "demo", "input": {}})).await;
    assert_eq!(status, StatusCode::CREATED, "{second}");
    let c = Keel::start(&config, &sim).await;
    let (_, task) = get(&c.url, &format!("/v1/tasks/{id}")).await;
    assert_eq!(task["state"], "succeeded", "{task}");
    let (_, listed) = get(&c.url, "/v1/tasks?agent=demo").await;
    assert_eq!(
        listed["tasks"].as_array().map(Vec::len),
        Some(2),
        "{listed}"
    );
    drop(b);
    drop(c);
}

#[tokio::test]
async fn keel_serve_refuses_to_start_when_postgres_is_unreachable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("keel.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[store]\nurl = \"postgres://keel:hunter2@127.0.0.1:{port}/keel\"\n"
        ),
    )
    .unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_keel"))
            .args(["serve", "--config"])
            .arg(&config)
            .output(),
    )
    .await
    .expect("keel serve did not give up within 30 s")
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stderr.contains(&format!(
            "cannot reach the PostgreSQL store postgres://keel@127.0.0.1:{port}/keel"
        )) && stderr.contains("Connection refused"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("hunter2") && !stdout.contains("hunter2"),
        "{stderr}"
    );
    assert!(!stdout.contains("keel listening on"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_s_budget_holds_across_nodes_together() {
    let server = pg_server();
    let pg = server.create_database("keel").await.unwrap();
    let sim = sim().await;
    let config = CONFIG.replace("{pg}", &pg).replace(
        "max_attempts = 3",
        "max_attempts = 3\nbudget = { requests_per_minute = 10 }",
    );
    let (a, b) = tokio::join!(Keel::start(&config, &sim), Keel::start(&config, &sim));
    // The budget counts per clock minute: start early in one, so the test stays in it.
    let second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        % 60;
    if second > 35 {
        tokio::time::sleep(Duration::from_secs(61 - second)).await;
    }
    let call = json!({"model": "smart", "messages": [{"role": "user", "content": "hi"}]});
    let (mut admitted, mut refused_in_a_row) = (0, 0);
    for n in 0..40 {
        let node = if n % 2 == 0 { &a.url } else { &b.url };
        let (status, answer) = post(node, "/v1/chat/completions", call.clone()).await;
        match status {
            StatusCode::OK => {
                admitted += 1;
                refused_in_a_row = 0;
            }
            StatusCode::TOO_MANY_REQUESTS => {
                refused_in_a_row += 1;
                if refused_in_a_row == 4 {
                    break;
                }
            }
            other => panic!("{other}: {answer}"),
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(refused_in_a_row, 4, "both nodes end up refusing");
    // Each node alone would admit 10 (20 in all); together they admit the 10, plus at
    // most what one node admits before the next sync (each second) tells it the other's.
    assert!(
        (10..=13).contains(&admitted),
        "{admitted} requests admitted for a budget of 10 per minute"
    );
}
