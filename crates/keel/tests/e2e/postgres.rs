//! keel on PostgreSQL: several `keel serve` nodes sharing one database (a real server,
//! started for the test by `keel_store::testing::PgServer`).

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{Keel, get, post, post_as, sim};
use keel_store::testing::PgServer;

/// What every node of these tests has: the shared database (`{pg}`) and the simulator.
const NODE: &str = r#"
[server]
listen = "127.0.0.1:0"
[store]
url = "{pg}"
[providers.sim]
kind = "openai"
base_url = "{sim}"
"#;

/// Most tests' route and agent.
const DEMO: &str = r#"
[routes.smart]
targets = [{ provider = "sim", model = "primary" }]
[agents.demo]
max_attempts = 3
"#;

/// A node's config on database `pg` with `routes` (routes and agents).
fn config(pg: &str, routes: &str) -> String {
    format!("{NODE}{routes}").replace("{pg}", pg)
}

fn pg_server() -> PgServer {
    PgServer::start().unwrap_or_else(|e| panic!("cannot start PostgreSQL for the test: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_on_one_postgres_share_tasks_claims_and_one_verifiable_log() {
    let server = pg_server();
    let pg = server.create_database("keel").await.unwrap();
    let sim = sim().await;
    let config = config(&pg, DEMO);
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
    let (status, answer) = post_as(
        &a.url,
        Some("demo"),
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

/// Two nodes on one PostgreSQL whose agent `demo` may make `requests` calls per clock
/// minute, returned no later than `latest_second` into a minute (waiting for the next one if
/// need be), so that a test's calls stay in one window. Keep the server and the simulator.
async fn two_nodes_with_a_budget_per_minute(
    requests: u32,
    latest_second: u64,
) -> (PgServer, keel_sim::SimHandle, Keel, Keel) {
    let server = pg_server();
    let pg = server.create_database("keel").await.unwrap();
    let sim = sim().await;
    let config = config(&pg, DEMO).replace(
        "max_attempts = 3",
        &format!("max_attempts = 3\nbudget = {{ requests_per_minute = {requests} }}"),
    );
    let (a, b) = tokio::join!(Keel::start(&config, &sim), Keel::start(&config, &sim));
    let second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        % 60;
    if second > latest_second {
        tokio::time::sleep(Duration::from_secs(61 - second)).await;
    }
    (server, sim, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_s_budget_holds_across_nodes_together() {
    let (_server, _sim, a, b) = two_nodes_with_a_budget_per_minute(10, 35).await;
    let call = json!({"model": "smart", "messages": [{"role": "user", "content": "hi"}]});
    let (mut admitted, mut refused_in_a_row) = (0, 0);
    for n in 0..40 {
        let node = if n % 2 == 0 { &a.url } else { &b.url };
        let (status, answer) =
            post_as(node, Some("demo"), "/v1/chat/completions", call.clone()).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_served_none_of_an_agent_s_calls_still_sees_its_budget_spent() {
    let (_server, _sim, a, b) = two_nodes_with_a_budget_per_minute(5, 40).await;
    let call = json!({"model": "smart", "messages": [{"role": "user", "content": "hi"}]});
    // Node B serves the agent's whole budget; node A serves none of it.
    for n in 0..5 {
        let (status, answer) =
            post_as(&b.url, Some("demo"), "/v1/chat/completions", call.clone()).await;
        assert_eq!(status, StatusCode::OK, "call {n} through B: {answer}");
    }
    // After two syncs (one a second), A knows: its first call for the agent is refused.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (status, answer) = post_as(&a.url, Some("demo"), "/v1/chat/completions", call).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("5 of its 5 requests per minute")),
        "{answer}"
    );
}

const FLEET: &str = r#"
[routes.fleet]
targets = [{ provider = "sim", model = "primary" }]
[agents.fleet]
max_attempts = 5
budget = { tokens_per_hour = 100000000 }
"#;

/// The fleet agent's token budget left, as node `url` sees it (`keel_budget_remaining`).
async fn tokens_left(url: &str) -> f64 {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| {
            l.starts_with("keel_budget_remaining{")
                && l.contains("agent=\"fleet\"")
                && l.contains("unit=\"tokens\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no keel_budget_remaining for fleet/tokens in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_over_three_nodes_loses_nothing_when_one_is_killed() {
    // The fleet's budget is per clock hour: its spend is compared at the end, so the run
    // (about 15 s) must not cross the hour's turn, when the window starts over.
    let second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        % 3600;
    if second > 3600 - 60 {
        tokio::time::sleep(Duration::from_secs(3601 - second)).await;
    }
    let server = pg_server();
    let pg = server.create_database("keel").await.unwrap();
    let sim = sim().await;
    let config = config(&pg, FLEET);
    let (a, mut b, c) = tokio::join!(
        Keel::start(&config, &sim),
        Keel::start(&config, &sim),
        Keel::start(&config, &sim)
    );
    let balancer = crate::common::Balancer::start(&[&a.url, &b.url, &c.url]).await;

    // The fleet (with the standard mix's agent deaths) works through the balancer.
    let report = tempfile::tempdir().unwrap();
    let fleet = tokio::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args([
            "sim",
            "--server",
            &balancer.url,
            "--route",
            "fleet",
            "--agent",
            "fleet",
        ])
        .args([
            "--agents", "12", "--tasks", "120", "--think", "20ms", "--seed", "11",
        ])
        .arg("--report")
        .arg(report.path())
        .env("RUST_LOG", "warn")
        .output();
    let fleet = tokio::spawn(fleet);
    // Once the fleet is well under way, node B dies with kill -9.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (_, page) = get(&a.url, "/v1/tasks?agent=fleet&state=succeeded&limit=1000").await;
        if page["tasks"].as_array().map_or(0, Vec::len) >= 20 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the fleet made no progress"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.child.start_kill().unwrap();
    b.child.wait().await.unwrap();
    let out = fleet.await.unwrap().unwrap();
    assert!(
        out.status.success(),
        "keel sim failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value =
        serde_json::from_slice(&std::fs::read(report.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(report["drained"], true, "every task ended: {report}");
    assert_eq!(report["final"]["lost"], 0, "{report}");
    let finals = &report["final"];
    let ended: u64 = [
        "succeeded",
        "dead",
        "awaiting_human",
        "cancelled",
        "refused",
    ]
    .iter()
    .map(|k| finals[k].as_u64().unwrap_or(0))
    .sum();
    assert_eq!(ended, 120, "{finals}");

    // No task completed twice: at most one task_succeeded in each task's log.
    let (_, page) = get(&c.url, "/v1/tasks?agent=fleet&limit=1000").await;
    let tasks = page["tasks"].as_array().unwrap();
    assert!(tasks.len() >= 100, "{}", tasks.len());
    for task in tasks {
        let id = task["id"].as_str().unwrap();
        let log = reqwest::get(format!("{}/v1/tasks/{id}/events", c.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let succeeded = log
            .lines()
            .filter(|l| l.contains("\"task_succeeded\""))
            .count();
        assert!(succeeded <= 1, "task {id} succeeded {succeeded} times");
        assert_eq!(
            succeeded == 1,
            task["state"] == "succeeded",
            "task {id}: {task}"
        );
    }
    let (_, verify) = get(&a.url, "/v1/audit/verify").await;
    assert_eq!(verify["intact"], true, "{verify}");

    // The token budget counts the whole fleet's spend, whichever node served it: after
    // two syncs, one more call through node A reports what is left of the one budget.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (status, answer) = post_as(
        &a.url,
        Some("fleet"),
        "/v1/chat/completions",
        json!({"model": "fleet", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let last = answer["usage"]["total_tokens"].as_f64().unwrap();
    let used = 100_000_000.0 - tokens_left(&a.url).await;
    let fleet_tokens = report["tokens"].as_f64().unwrap();
    // Node B's spend of its last second before the kill may never have been shared.
    assert!(
        used <= fleet_tokens + last + 0.5 && used >= 0.85 * fleet_tokens + last,
        "node A counts {used} tokens; the fleet spent {fleet_tokens} (+{last})"
    );
    drop(balancer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_recover_from_a_postgres_restart_without_losing_what_they_acknowledged() {
    let server = pg_server();
    let pg = server.create_database("keel").await.unwrap();
    let sim = sim().await;
    let config = config(&pg, DEMO);
    let (a, b) = tokio::join!(Keel::start(&config, &sim), Keel::start(&config, &sim));
    let nodes = [a.url.clone(), b.url.clone()];

    // Tasks are created through both nodes, one after the other, while PostgreSQL is
    // stopped and started again; a 201 is keel's word that the task is stored.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let creating = {
        let stop = std::sync::Arc::clone(&stop);
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let (mut acknowledged, mut refused, mut unavailable, mut n) =
                (Vec::new(), 0u32, 0u32, 0usize);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let node = &nodes[n % 2];
                n += 1;
                let sent = client
                    .post(format!("{node}/v1/tasks"))
                    .json(&json!({"agent": "demo", "input": {"n": n}}))
                    .timeout(Duration::from_secs(20))
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status() == StatusCode::CREATED => {
                        let task: Value = r.json().await.unwrap();
                        acknowledged.push(task["id"].as_str().unwrap().to_owned());
                    }
                    Ok(r) => {
                        let status = r.status();
                        assert!(status.is_server_error(), "{status}");
                        refused += 1;
                        // While the server is down: a 503 that says so, for the client to retry.
                        let body: Value = r.json().await.unwrap();
                        if status == StatusCode::SERVICE_UNAVAILABLE {
                            assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
                            assert!(
                                body["error"]["message"].as_str().is_some_and(
                                    |m| m.starts_with("cannot reach the PostgreSQL store")
                                ),
                                "{body}"
                            );
                            unavailable += 1;
                        }
                    }
                    Err(e) => panic!("keel did not answer: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (acknowledged, refused, unavailable)
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    server.stop().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.restart().unwrap();
    // Both nodes come back by themselves (the writer reconnects with backoff).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for url in [&a.url, &b.url] {
        loop {
            let (status, _) = post(url, "/v1/tasks", json!({"agent": "demo", "input": {}})).await;
            if status == StatusCode::CREATED {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{url} did not recover: {status}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acknowledged, refused, unavailable) = creating.await.unwrap();
    assert!(refused > 0, "the outage was never seen");
    assert!(unavailable > 0, "no 503 among the {refused} refusals");
    assert!(acknowledged.len() > 20, "{}", acknowledged.len());
    for id in &acknowledged {
        let (status, task) = get(&b.url, &format!("/v1/tasks/{id}")).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "acknowledged task {id} is gone: {task}"
        );
    }
    let (_, verify) = get(&a.url, "/v1/audit/verify").await;
    assert_eq!(verify["intact"], true, "{verify}");
    let (status, ready) = get(&a.url, "/readyz").await;
    assert_eq!(status, StatusCode::OK, "{ready}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_opened_on_one_node_shows_on_every_node_s_dashboard() {
    let server = pg_server();
    let pg = server.create_database("keel").await.unwrap();
    let models = sim().await;
    let config = config(&pg, DEMO).replace(
        "[agents.demo]",
        "[breaker]\nwindow_size = 4\nmin_calls = 2\nfailure_rate = 0.5\nopen_for = \"60s\"\n\n[agents.demo]",
    ) + "\n";
    let config = config.replace(
        "targets = [{ provider = \"sim\", model = \"primary\" }]",
        "targets = [{ provider = \"sim\", model = \"primary\" }]\nretry = { max_attempts = 1 }",
    );
    let (a, b) = tokio::join!(Keel::start(&config, &models), Keel::start(&config, &models));
    let (_, dash_a) = get(&a.url, "/v1/dashboard").await;
    let (_, dash_b) = get(&b.url, "/v1/dashboard").await;
    let (node_a, node_b) = (
        dash_a["node"].as_str().unwrap(),
        dash_b["node"].as_str().unwrap(),
    );
    assert_ne!(node_a, node_b);
    assert_eq!(dash_b["breakers"], json!([]));

    // Node A's calls fail twice: its breaker opens; node B made no call, its own stays closed.
    models.set_always("primary", Some(keel_sim::Fault::status(500)));
    let call = json!({"model": "smart", "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..2 {
        let (status, _) = post_as(&a.url, Some("demo"), "/v1/chat/completions", call.clone()).await;
        assert!(status.is_server_error(), "{status}");
    }
    let (_, dash_b) = get(&b.url, "/v1/dashboard").await;
    let breakers = dash_b["breakers"].as_array().unwrap();
    assert_eq!(breakers.len(), 1, "{dash_b}");
    assert_eq!(breakers[0]["node"], node_a);
    assert_eq!(breakers[0]["target"], "sim/primary");
    assert_eq!(breakers[0]["state"], "open");
    let metrics = |url: String| async move {
        reqwest::get(format!("{url}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let open = "keel_breaker_state{target=\"sim/primary\"} 2";
    assert!(
        metrics(a.url.clone()).await.contains(open),
        "node A's breaker is open"
    );
    assert!(
        !metrics(b.url.clone()).await.contains(open),
        "node B's own breaker is not open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_expire_and_approvals_are_decided_whichever_node_is_asked() {
    let server = pg_server();
    let pg = server.create_database("keel").await.unwrap();
    let sim = sim().await;
    let config = config(&pg, DEMO);
    let (a, b) = tokio::join!(Keel::start(&config, &sim), Keel::start(&config, &sim));
    let (status, task) = post(&a.url, "/v1/tasks", json!({"agent": "demo", "input": {}})).await;
    assert_eq!(status, StatusCode::CREATED, "{task}");
    let id = task["id"].as_str().unwrap().to_owned();

    // Claimed through B with a short lease and abandoned: the lease expires and the task is
    // queued again (by whichever node's sweeper gets there), then claimed through A.
    let claim =
        |worker: &str, lease: &str| json!({"agent": "demo", "worker": worker, "lease": lease});
    let (status, first) = post(&b.url, "/v1/tasks/claim", claim("w-b", "1s")).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let second = loop {
        let (status, claimed) = post(&a.url, "/v1/tasks/claim", claim("w-a", "30s")).await;
        if status == StatusCode::OK {
            break claimed;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(second["id"], id.as_str());
    assert_ne!(second["lease_token"], first["lease_token"]);
    // The expired token no longer works on any node; the new one works on both.
    let (status, _) = post(
        &a.url,
        &format!("/v1/tasks/{id}/heartbeat"),
        json!({"lease_token": first["lease_token"]}),
    )
    .await;
    assert!(status.is_client_error(), "{status}");
    let token = second["lease_token"].as_str().unwrap().to_owned();
    let (status, beat) = post(
        &b.url,
        &format!("/v1/tasks/{id}/heartbeat"),
        json!({"lease_token": token}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{beat}");

    // An approval asked through A is listed and decided through B.
    let (status, asked) = post(
        &a.url,
        &format!("/v1/tasks/{id}/approvals"),
        json!({"lease_token": token, "reason": "refund 900 EUR"}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{asked}");
    let approval = asked["pending_approval"].as_str().unwrap().to_owned();
    let (_, listed) = get(&b.url, "/v1/approvals").await;
    assert_eq!(listed["approvals"][0]["id"], approval.as_str(), "{listed}");
    let (status, decided) = post(
        &b.url,
        &format!("/v1/approvals/{approval}"),
        json!({"decision": "approve", "note": "checked"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{decided}");
    let (_, task) = get(&a.url, &format!("/v1/tasks/{id}")).await;
    assert_eq!(task["state"], "queued", "{task}");
}
