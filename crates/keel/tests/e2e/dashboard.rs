//! The dashboard in a real headless Chromium: after a small `keel sim` fleet has run
//! through keel, `/ui` shows the same figures as the API, opens a task's timeline, and a
//! screenshot is saved as a test artifact.

use std::path::PathBuf;
use std::process::Stdio;

use serde_json::{Value, json};

use crate::common::{Keel, sim};

const FLEET: &str = r#"

[providers.sim]
kind = "openai"
base_url = "{sim}"

[routes.fleet]
targets = [{ provider = "sim", model = "primary" }]

[agents.fleet]
budget = { tokens_per_hour = 1000000 }
"#;

fn chromium() -> PathBuf {
    std::env::var_os("KEEL_TEST_CHROMIUM")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
}

/// Runs headless Chromium on `url` with `args` (`--dump-dom`, `--screenshot=...`).
async fn chromium_run(url: &str, args: &[String], profile: &std::path::Path) -> String {
    let out = tokio::process::Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} (cargo xtask test installs Debian's chromium): {e}",
                chromium().display()
            )
        });
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the element with `data-figure="name"` in `dom`.
fn figure(dom: &str, name: &str) -> String {
    let marker = format!("data-figure=\"{name}\"");
    let at = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no figure {name} in the page:\n{dom}"));
    let rest = &dom[at..];
    let start = rest.find('>').unwrap() + 1;
    let end = rest[start..].find('<').unwrap() + start;
    rest[start..end].trim().to_owned()
}

async fn get(keel: &Keel, path: &str) -> Value {
    reqwest::get(format!("{}{path}", keel.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Tasks in `state`, counted through the task list API page by page.
async fn count(keel: &Keel, state: &str) -> usize {
    let mut n = 0;
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v1/tasks?state={state}&limit=100");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let page = get(keel, &path).await;
        n += page["tasks"].as_array().unwrap().len();
        match page["next"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return n,
        }
    }
}

/// One metric sample's value from `/metrics`.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .map(|v| v.trim().parse::<f64>().unwrap())
        })
        .unwrap_or_else(|| panic!("no {series} in:\n{metrics}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_shows_what_the_api_says_after_a_small_sim() {
    let models = sim().await;
    let keel = Keel::start(FLEET, &models).await;

    // A small fleet through this keel.
    let report = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args([
            "sim", "--server", &keel.url, "--route", "fleet", "--agent", "fleet",
        ])
        .args([
            "--agents", "4", "--tasks", "24", "--think", "10ms", "--seed", "7",
        ])
        .arg("--report")
        .arg(report.path())
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "keel sim failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // One task in the DLQ and one waiting for a person, made by hand.
    let headers = [("x-keel-agent", "ops")];
    let ids = [
        keel.claimed_task("ops").await,
        keel.claimed_task("ops").await,
    ];
    let (dead, token) = &ids[0];
    let (status, body) = keel
        .post_json(
            &format!("/v1/tasks/{dead}/fail"),
            &headers,
            &json!({"lease_token": token, "error": "cannot parse the invoice", "retryable": false}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (waiting, token) = &ids[1];
    let (status, body) = keel
        .post_json(
            &format!("/v1/tasks/{waiting}/approvals"),
            &headers,
            &json!({"lease_token": token, "reason": "refund above 500 EUR"}),
        )
        .await;
    assert!(
        status == 200 || status == 201 || status == 202,
        "{status} {body}"
    );

    // The API's figures.
    let succeeded = count(&keel, "succeeded").await;
    assert!(succeeded > 0, "the fleet completed nothing");
    // The queue gauges follow the store on the supervisor's sweep (every 250 ms).
    let mut metrics = keel.metrics().await;
    for _ in 0..40 {
        let depths = (
            sample(&metrics, "keel_dlq_depth "),
            sample(&metrics, "keel_approvals_pending "),
        );
        if depths == (1.0, 1.0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        metrics = keel.metrics().await;
    }
    assert_eq!(sample(&metrics, "keel_dlq_depth "), 1.0, "{metrics}");
    assert_eq!(
        sample(&metrics, "keel_approvals_pending "),
        1.0,
        "{metrics}"
    );
    let fleet_tasks = sample(&metrics, "keel_task_steps_count{agent=\"fleet\"} ");
    let incidents = get(&keel, "/v1/incidents?state=open").await["incidents"]
        .as_array()
        .unwrap()
        .len();
    let dashboard = get(&keel, "/v1/dashboard").await;
    let series = dashboard["finished_per_minute"].as_array().unwrap();
    let total = |k: &str| series.iter().map(|b| b[k].as_u64().unwrap()).sum::<u64>();
    let finished = total("succeeded") + total("dead") + total("cancelled");
    let rate = format!(
        "{:.1}%",
        100.0 * total("succeeded") as f64 / finished as f64
    );

    // The page, rendered by Chromium with its scripts run, with the DLQ task's timeline open.
    let profile = tempfile::tempdir().unwrap();
    let url = format!("{}/ui#task={dead}", keel.url);
    let dom = chromium_run(&url, &["--dump-dom".to_owned()], profile.path()).await;
    assert!(
        dom.contains("data-ready=\"true\""),
        "the page never loaded its data:\n{dom}"
    );
    assert_eq!(figure(&dom, "state-succeeded"), succeeded.to_string());
    assert_eq!(figure(&dom, "state-dead"), "1");
    assert_eq!(figure(&dom, "state-awaiting_human"), "1");
    assert_eq!(figure(&dom, "dlq-depth"), "1");
    assert_eq!(figure(&dom, "approvals-pending"), "1");
    assert_eq!(figure(&dom, "incidents-open"), incidents.to_string());
    assert_eq!(figure(&dom, "success-rate"), rate);
    // keel started minutes ago: the success rate says it counts from then.
    assert!(
        dom.contains("succeeded of finished, since keel started ("),
        "the window of the success rate is not named:\n{dom}"
    );
    assert_eq!(figure(&dom, "breaker-sim/primary"), "closed");
    assert_eq!(
        figure(&dom, "agent-tasks-fleet"),
        (fleet_tasks as u64).to_string()
    );
    let used = 1.0
        - sample(
            &metrics,
            "keel_budget_remaining{agent=\"fleet\",unit=\"tokens\"} ",
        ) / 1_000_000.0;
    assert_eq!(
        figure(&dom, "budget-fleet-tokens"),
        format!("{:.0}%", 100.0 * used)
    );
    assert!(
        dom.contains(&format!("data-task=\"{dead}\"")),
        "the DLQ links its task"
    );
    assert!(
        dom.contains(&format!("data-task=\"{waiting}\"")),
        "the approval queue links its task"
    );
    assert!(
        dom.contains("task_dead") && dom.contains("task_created"),
        "the timeline of {dead} is open:\n{dom}"
    );

    // A screenshot for people: target/tmp/dashboard.png.
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let profile = tempfile::tempdir().unwrap();
    chromium_run(
        &format!("{}/ui", keel.url),
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1400,1700".to_owned(),
        ],
        profile.path(),
    )
    .await;
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );
}
