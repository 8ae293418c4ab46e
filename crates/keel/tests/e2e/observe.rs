//! The observer end to end: a breaker opening is a critical alert that reaches a webhook at
//! once and an incident that resolves when the breaker closes; an agent whose trajectories
//! suddenly double in length raises a warning (in the digest) that clears when they return.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::common::{Keel, sim};

/// A webhook receiver on loopback: every JSON body POSTed to it, in order.
async fn webhook() -> (String, mpsc::UnboundedReceiver<Value>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/{hook}",
        axum::routing::post(
            move |axum::extract::Path(hook): axum::extract::Path<String>,
                  axum::Json(mut body): axum::Json<Value>| {
                let tx = tx.clone();
                async move {
                    body["_hook"] = json!(hook);
                    let _ = tx.send(body);
                    "ok"
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, rx)
}

/// The next body within `within`.
async fn next(rx: &mut mpsc::UnboundedReceiver<Value>, within: Duration, what: &str) -> Value {
    tokio::time::timeout(within, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no webhook call within {within:?}: {what}"))
        .unwrap()
}

async fn incidents(keel: &Keel, state: &str) -> Vec<Value> {
    let answer: Value = reqwest::get(format!("{}/v1/incidents?state={state}", keel.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    answer["incidents"].as_array().unwrap().clone()
}

const BREAKER: &str = r#"

[providers.sim]
kind = "openai"
base_url = "{sim}"

[routes.smart]
targets = [{ provider = "sim", model = "primary" }]
retry = { max_attempts = 1 }

[breaker]
window_size = 4
min_calls = 2
failure_rate = 0.5
open_for = "1s"
half_open_calls = 1

[alerts]
webhooks = [
  { url = "{hook}/json", min_severity = "critical" },
  { url = "{hook}/slack", format = "slack", min_severity = "critical" },
]
"#;

async fn ask(keel: &Keel) -> u16 {
    keel.post_json(
        "/v1/chat/completions",
        &[("x-keel-agent", "support")],
        &json!({"model": "smart", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
    .0
}

#[tokio::test(flavor = "multi_thread")]
async fn a_breaker_opening_is_a_critical_alert_at_once_and_resolves_when_it_closes() {
    let models = sim().await;
    let (hook, mut received) = webhook().await;
    let keel = Keel::start(&BREAKER.replace("{hook}", &hook), &models).await;
    models.set_always("primary", Some(keel_sim::Fault::status(500)));
    for _ in 0..2 {
        let status = ask(&keel).await;
        assert!(status >= 500, "the provider fails: {status}");
    }
    // The second failure opened the breaker: both webhooks hear of it within a second.
    let mut got = [
        next(&mut received, Duration::from_secs(1), "the critical alert").await,
        next(&mut received, Duration::from_secs(1), "the critical alert").await,
    ];
    got.sort_by_key(|b| b["_hook"].to_string());
    let (json_body, slack) = (&got[0], &got[1]);
    assert_eq!(json_body["status"], "firing", "{json_body}");
    assert_eq!(json_body["severity"], "critical");
    assert_eq!(json_body["key"], "breaker:sim/primary");
    assert_eq!(json_body["labels"]["target"], "sim/primary");
    let incident = json_body["incident"].as_str().unwrap().to_owned();
    let text = slack["text"].as_str().unwrap();
    assert!(
        text.starts_with("keel: *[CRITICAL]* circuit breaker open: sim/primary"),
        "{text}"
    );

    let open = incidents(&keel, "open").await;
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(open[0]["id"], incident.as_str());
    assert_eq!(open[0]["severity"], "critical");
    assert_eq!(open[0]["timeline"][0]["status"], "firing");
    assert!(
        keel.metrics()
            .await
            .contains("keel_alerts_total{severity=\"critical\"} 1")
    );
    let recorded = keel.events_of("alert_raised");
    assert!(
        recorded
            .iter()
            .any(|e| e["source"] == "observe" && e["severity"] == "critical"),
        "{recorded:?}"
    );

    // The provider recovers; after open_for the trial call closes the breaker, and the
    // resolution is sent at once too.
    models.set_always("primary", None);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(ask(&keel).await, 200);
    let resolved = next(&mut received, Duration::from_secs(1), "the resolution").await;
    assert_eq!(resolved["status"], "resolved", "{resolved}");
    assert_eq!(resolved["incident"], incident.as_str());
    assert!(incidents(&keel, "open").await.is_empty());
    let done = incidents(&keel, "resolved").await;
    assert_eq!(done[0]["id"], incident.as_str());
    assert_eq!(done[0]["state"], "resolved");
    assert_eq!(done[0]["timeline"].as_array().unwrap().len(), 2);
}

const TRAJECTORIES: &str = r#"

[alerts]
digest_every = "1s"
anomaly = { warmup = 10 }
webhooks = [{ url = "{hook}/json" }]
"#;

/// Runs one task of agent `researcher` through the worker protocol with `steps` steps.
async fn run_task(keel: &Keel, steps: usize) {
    let headers = [("x-keel-agent", "researcher")];
    let (id, token) = keel.claimed_task("researcher").await;
    for i in 0..steps {
        let (status, step) = keel
            .post_json(
                &format!("/v1/tasks/{id}/steps"),
                &headers,
                &json!({"lease_token": token, "kind": "search", "summary": format!("step {i}")}),
            )
            .await;
        assert_eq!(status, 200, "{step}");
    }
    let (status, done) = keel
        .post_json(
            &format!("/v1/tasks/{id}/complete"),
            &headers,
            &json!({"lease_token": token, "output": "done", "confidence": 0.9}),
        )
        .await;
    assert_eq!(status, 200, "{done}");
}

/// Waits for the digest holding an alert with `status` for `key`.
async fn digest_with(rx: &mut mpsc::UnboundedReceiver<Value>, status: &str, key: &str) -> Value {
    loop {
        let body = next(rx, Duration::from_secs(5), key).await;
        let alerts = body["alerts"].as_array().cloned().unwrap_or_default();
        if let Some(a) = alerts
            .into_iter()
            .find(|a| a["key"] == key && a["status"] == status)
        {
            assert_eq!(body["digest"], true, "{body}");
            return a;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn trajectories_that_double_raise_a_warning_that_clears_when_they_return() {
    let models = sim().await;
    let (hook, mut received) = webhook().await;
    let keel = Keel::start(&TRAJECTORIES.replace("{hook}", &hook), &models).await;
    let usual = [4, 5, 6, 5];
    for i in 0..16 {
        run_task(&keel, usual[i % 4]).await;
    }
    assert!(incidents(&keel, "all").await.is_empty());
    for i in 0..5 {
        run_task(&keel, 2 * usual[i % 4]).await;
    }
    let key = "anomaly:trajectory:researcher";
    let warning = digest_with(&mut received, "firing", key).await;
    assert_eq!(warning["severity"], "warning");
    assert!(
        warning["message"]
            .as_str()
            .unwrap()
            .contains("agent \"researcher\"'s tasks take"),
        "{warning}"
    );
    let open = incidents(&keel, "open").await;
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(open[0]["key"], key);
    assert_eq!(open[0]["severity"], "warning");

    for i in 0..6 {
        run_task(&keel, usual[i % 4]).await;
    }
    let cleared = digest_with(&mut received, "resolved", key).await;
    assert!(
        cleared["message"]
            .as_str()
            .unwrap()
            .starts_with("usual again"),
        "{cleared}"
    );
    assert!(incidents(&keel, "open").await.is_empty());
    let metrics = keel.metrics().await;
    for line in [
        "keel_alerts_total{severity=\"warning\"} 1",
        "keel_incidents_open{severity=\"warning\"} 0",
        "keel_task_steps_count{agent=\"researcher\"} 27",
        // 22 usual tasks (4 to 6 steps) and two of the doubled ones (8) within 8 steps.
        "keel_task_steps_bucket{le=\"8.0\",agent=\"researcher\"} 24",
        "keel_task_confidence_bucket{le=\"0.9\",agent=\"researcher\"} 27",
    ] {
        assert!(metrics.contains(line), "missing {line} in:\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn incidents_survive_a_restart_and_breaker_incidents_resolve_with_it() {
    let models = sim().await;
    let (hook, mut received) = webhook().await;
    let config = BREAKER.replace("{hook}", &hook);
    let keel = Keel::start(&config, &models).await;
    models.set_always("primary", Some(keel_sim::Fault::status(500)));
    for _ in 0..2 {
        assert!(ask(&keel).await >= 500);
    }
    next(&mut received, Duration::from_secs(1), "the critical alert").await;
    let (dead, token) = keel.claimed_task("ops").await;
    let (status, body) = keel
        .post_json(
            &format!("/v1/tasks/{dead}/fail"),
            &[("x-keel-agent", "ops")],
            &json!({"lease_token": token, "error": "bad input", "retryable": false}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let mut before = Vec::new();
    for _ in 0..50 {
        before = incidents(&keel, "open").await;
        if before.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(before.len(), 2, "{before:?}");
    let id_of = |list: &[Value], key: &str| {
        list.iter()
            .find(|i| i["key"] == key)
            .map(|i| i["id"].as_str().unwrap().to_owned())
            .unwrap_or_else(|| panic!("no {key} in {list:?}"))
    };
    let dlq = id_of(&before, "dlq:ops");
    let breaker = id_of(&before, "breaker:sim/primary");

    // kill -9, then the same store again.
    let Keel { mut child, dir, .. } = keel;
    child.kill().await.unwrap();
    models.set_always("primary", None);
    let keel = Keel::start_in(dir, &config, &models).await;
    // The DLQ incident is back at once; the breaker's is resolved as the observer starts.
    let mut open = incidents(&keel, "open").await;
    assert!(open.iter().any(|i| i["id"] == dlq.as_str()), "{open:?}");
    for _ in 0..50 {
        if open.len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        open = incidents(&keel, "open").await;
    }
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(open[0]["id"], dlq.as_str(), "the DLQ incident keeps its id");
    assert_eq!(open[0]["timeline"].as_array().unwrap().len(), 1);
    // Its timeline still names the dead task, so its postmortem lists it.
    assert_eq!(open[0]["timeline"][0]["task"], dead.as_str(), "{open:?}");
    let resolved = incidents(&keel, "resolved").await;
    let gone = resolved
        .iter()
        .find(|i| i["id"] == breaker.as_str())
        .unwrap_or_else(|| panic!("{resolved:?}"));
    let last = gone["timeline"].as_array().unwrap().last().unwrap().clone();
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .starts_with("keel restarted"),
        "{last}"
    );
}

/// `keel postmortem ARGS --server URL`: (exit code, stdout, stderr).
fn postmortem(keel: &Keel, args: &[&str]) -> (Option<i32>, String, String) {
    let out = keel.cli(&[&["postmortem"], args].concat());
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postmortem_tells_a_dead_tasks_story_and_its_incidents() {
    let sim = sim().await;
    let keel = Keel::start(crate::common::TWO_TARGETS, &sim).await;
    let post = |path: String, body: Value| {
        let url = keel.url.clone();
        async move { crate::common::post(&url, &path, body).await }
    };
    let (_, task) = post(
        "/v1/tasks".into(),
        json!({"agent": "billing", "input": {"q": "refund"}}),
    )
    .await;
    let id = task["id"].as_str().unwrap().to_owned();
    let (_, claimed) = post(
        "/v1/tasks/claim".into(),
        json!({"agent": "billing", "worker": "w1", "lease": "30s"}),
    )
    .await;
    let token = claimed["lease_token"].as_str().unwrap().to_owned();
    let (_, _) = post(
        format!("/v1/tasks/{id}/steps"),
        json!({"lease_token": token, "kind": "plan", "summary": "read the order"}),
    )
    .await;
    // Both targets are down: retries, a fallback, and still no answer.
    sim.set_always("primary", Some(keel_sim::Fault::status(503)));
    sim.set_always("secondary", Some(keel_sim::Fault::status(503)));
    let r = reqwest::Client::new()
        .post(format!("{}/tasks/{id}/v1/chat/completions", keel.url))
        .header("x-keel-agent", "billing")
        .json(&json!({"model": "smart", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let (status, failed) = post(
        format!("/v1/tasks/{id}/fail"),
        json!({"lease_token": token, "error": "no model answered", "retryable": false}),
    )
    .await;
    assert_eq!(status, 200, "{failed}");

    let (code, md, stderr) = postmortem(&keel, &[&id]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        md.starts_with(&format!(
            "# Postmortem: task {id} of agent \"billing\": dead after 1 attempt\n"
        )),
        "{md}"
    );
    // The trouble began with the first failed attempt after the step (had the fallback
    // answered, that would have been progress, and the task's own failure the cause).
    assert!(
        md.contains("`llm_attempt_failed`, seq ")
            && md.contains("attempt 1 on sim/primary failed (status)"),
        "{md}"
    );
    assert!(
        md.contains("- keel retried a failed model call (`retry_scheduled`): "),
        "{md}"
    );
    assert!(
        md.contains("- keel fell back to the next target (`fallback_used`): 1 time"),
        "{md}"
    );
    assert!(
        md.contains("`task_failed` failed (not retryable): no model answered"),
        "{md}"
    );
    assert!(
        md.contains("`task_dead` dead (not_retryable) after 1 attempt\n"),
        "{md}"
    );

    let (code, json_text, stderr) = postmortem(&keel, &[&id, "--format", "json"]);
    assert_eq!(code, Some(0), "{stderr}");
    let report: Value = serde_json::from_str(&json_text).unwrap();
    assert_eq!(report["outcome"], "dead");
    assert_eq!(
        report["root_cause"]["kind"], "llm_attempt_failed",
        "{report}"
    );
    let kinds: Vec<&str> = report["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"task_created"), "{kinds:?}");
    // The end, then at most the alert the observer raised about it.
    let dead = kinds.iter().position(|k| *k == "task_dead").unwrap();
    assert!(
        kinds[dead + 1..].iter().all(|k| *k == "alert_raised"),
        "{kinds:?}"
    );

    // The dead task opened a `dlq:billing` incident; its postmortem names the task.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let incident = loop {
        let found = incidents(&keel, "all")
            .await
            .into_iter()
            .find(|i| i["key"] == "dlq:billing");
        if let Some(found) = found {
            break found;
        }
        assert!(std::time::Instant::now() < deadline, "no dlq incident");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (code, md, stderr) = postmortem(&keel, &[incident["id"].as_str().unwrap()]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        md.contains("## Affected tasks\n\n") && md.contains(&format!("- {id}\n")),
        "{md}"
    );
    // An operator deals with the task: the incident still names it.
    keel.cli_ok(&["dlq", "requeue", &id]);
    let (code, md, stderr) = postmortem(&keel, &[incident["id"].as_str().unwrap()]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(md.contains(&format!("- {id}\n")), "{md}");

    let (code, _, stderr) = postmortem(&keel, &["no-such-task"]);
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("no task, incident or x-keel-task label \"no-such-task\""),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_incident_of_another_part_s_alert_survives_a_restart() {
    let models = sim().await;
    let config = r#"
[providers.sim]
kind = "openai"
base_url = "{sim}"

[routes.smart]
targets = [{ provider = "sim", model = "primary" }]

[agents.support]
budget = { requests_per_minute = 2 }
"#;
    let keel = Keel::start(config, &models).await;
    // The gateway's budget warning (an alert it records itself) opens an incident.
    for _ in 0..3 {
        ask(&keel).await;
    }
    let mut budget = None;
    for _ in 0..50 {
        budget = incidents(&keel, "open").await.into_iter().find(|i| {
            i["key"]
                .as_str()
                .unwrap_or("")
                .starts_with("budget:support")
        });
        if budget.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let budget = budget.expect("no budget incident");

    let Keel { mut child, dir, .. } = keel;
    child.kill().await.unwrap();
    let keel = Keel::start_in(dir, config, &models).await;
    let open = incidents(&keel, "open").await;
    let back = open
        .iter()
        .find(|i| i["key"] == budget["key"])
        .unwrap_or_else(|| panic!("the budget incident is gone after a restart: {open:?}"));
    assert_eq!(back["id"], budget["id"], "{back}");
}
