//! `keel sim` end to end: a small fleet under the standard fault mix, policies on
//! and off on the same seed, and the report files it writes.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::common::{Keel, TWO_TARGETS, sim as sim_server};

/// Runs `keel sim` with `args` into `dir`; returns its report.json.
fn sim(dir: &Path, args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("sim")
        .args(args)
        .arg("--report")
        .arg(dir)
        .output()
        .expect("run keel sim");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "keel sim failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("| success over feasible tasks |"),
        "{stdout}"
    );
    let text = std::fs::read_to_string(dir.join("report.json")).expect("report.json");
    serde_json::from_str(&text).expect("report.json is JSON")
}

fn final_total(report: &Value) -> u64 {
    [
        "succeeded",
        "dead",
        "awaiting_human",
        "cancelled",
        "lost",
        "refused",
    ]
    .iter()
    .map(|k| report["final"][*k].as_u64().unwrap())
    .sum()
}

#[test]
fn policies_on_lose_nothing_and_beat_policies_off_on_the_same_seed() {
    let dir = tempfile::tempdir().unwrap();
    let (on_dir, off_dir) = (dir.path().join("on"), dir.path().join("off"));
    let common = ["--agents", "50", "--tasks", "500", "--seed", "42"];
    let (on, off) = std::thread::scope(|s| {
        let on = s.spawn(|| sim(&on_dir, &[&common[..], &["--policies", "on"]].concat()));
        let off = s.spawn(|| sim(&off_dir, &[&common[..], &["--policies", "off"]].concat()));
        (on.join().unwrap(), off.join().unwrap())
    });

    for report in [&on, &off] {
        assert_eq!(report["tasks"], 500);
        assert_eq!(
            final_total(report),
            500,
            "every task counted once: {report}"
        );
        assert_eq!(report["seed"], 42);
    }
    assert_eq!(on["feasible"], off["feasible"], "same seed, same scripts");
    assert_eq!(on["policies"], "on");
    assert_eq!(on["final"]["lost"], 0, "{on}");
    assert_eq!(on["drained"], true, "{on}");
    let on_rate = on["success_rate_feasible"].as_f64().unwrap();
    let off_rate = off["success_rate_feasible"].as_f64().unwrap();
    assert!(on_rate >= 0.99, "policies on: {on_rate}\n{on}");
    assert!(
        off_rate + 0.10 < on_rate,
        "policies off should be clearly worse: {off_rate} vs {on_rate}"
    );

    // The mix's faults happened, and keel's policies answered them.
    let faults = &on["faults_injected"];
    for kind in [
        "error_5xx",
        "rate_limited",
        "hang",
        "outage",
        "agent_killed",
        "keel_kill9",
    ] {
        assert!(
            faults[kind].as_u64().unwrap_or(0) > 0,
            "no {kind} injected: {faults}"
        );
    }
    assert!(on["retries"].as_u64().unwrap() > 0, "{on}");
    assert!(on["fallbacks"].as_u64().unwrap() > 0, "{on}");
    assert_eq!(off["retries"], 0, "policies off do not retry: {off}");
    assert_eq!(off["fallbacks"], 0, "policies off do not fall back: {off}");
    assert_eq!(
        off["breaker_trips"], 0,
        "policies off have no breaker: {off}"
    );
    assert_eq!(on["keel_process"], "child");
    assert!(on["keel_peak_rss_mb"].as_f64().unwrap() > 1.0);

    // The traps: guards stop risky actions and loops with policies on; nothing does off.
    let caught = &on["caught"];
    for guard in ["action_rule", "loop_limit"] {
        assert!(
            caught[guard].as_u64().unwrap_or(0) > 0,
            "no {guard} in {caught}"
        );
    }
    assert_eq!(on["risky_actions_done"], 0, "{on}");
    // Infeasible goals are refused at creation with policies on (the pre-flight check);
    // with policies off they start and end dead, having burnt their tokens.
    let infeasible = 500 - on["feasible"].as_u64().unwrap();
    assert!(infeasible > 0);
    assert_eq!(on["final"]["refused"], infeasible, "{on}");
    assert_eq!(caught["preflight"], infeasible, "{caught}");
    assert_eq!(off["final"]["refused"], 0, "{off}");
    assert_eq!(off["caught"], serde_json::json!({}), "{off}");
    assert!(off["risky_actions_done"].as_u64().unwrap() > 0, "{off}");

    // keel's own files of the run sit apart from the report.
    for file in ["keel.toml", "keel.log", "keel.db", ".keel-sim"] {
        assert!(on_dir.join("keel").join(file).exists(), "no keel/{file}");
    }

    // The report files a person and a script read.
    let md = std::fs::read_to_string(on_dir.join("report.md")).unwrap();
    assert!(md.contains("| lost | 0 |"), "{md}");
    let svg = std::fs::read_to_string(on_dir.join("report.svg")).unwrap();
    let doc = roxmltree::Document::parse(&svg).expect("report.svg is well-formed XML");
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "svg");
    assert_eq!(
        root.tag_name().namespace(),
        Some("http://www.w3.org/2000/svg")
    );
    let series: Vec<_> = doc
        .descendants()
        .filter(|n| n.has_tag_name("polyline"))
        .collect();
    assert_eq!(series.len(), 2, "success rate and p99 latency");
    for line in series {
        let points = line.attribute("points").unwrap().split_whitespace().count();
        assert!(points >= 5, "a series with {points} points");
    }
    let shaded = doc
        .descendants()
        .filter(|n| n.attribute("class") == Some("fault"))
        .count();
    assert!(shaded >= 2, "the outage and the kill are marked");
}

#[test]
fn a_folder_with_a_database_keel_sim_did_not_make_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let keel = dir.path().join("keel");
    std::fs::create_dir_all(&keel).unwrap();
    std::fs::write(keel.join("keel.db"), b"someone's data").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["sim", "--agents", "1", "--tasks", "1", "--report"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("keel sim did not create"), "{stderr}");
    assert_eq!(
        std::fs::read(keel.join("keel.db")).unwrap(),
        b"someone's data"
    );
}

#[test]
fn a_bad_fault_mix_is_refused_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let mix = dir.path().join("mix.toml");
    std::fs::write(&mix, "[calls]\nhang = 2.0\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["sim", "--faults"])
        .arg(&mix)
        .arg("--report")
        .arg(dir.path().join("r"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("mix.toml: calls.hang: 2 is not a share between 0 and 1"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_runs_against_a_keel_that_is_already_running() {
    let models = sim_server().await;
    let keel = Keel::start(TWO_TARGETS, &models).await;
    let dir = tempfile::tempdir().unwrap();
    let report_dir = dir.path().join("remote");
    let run = |report: std::path::PathBuf| {
        let url = keel.url.clone();
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_keel"))
                .args([
                    "sim",
                    "--server",
                    &url,
                    "--route",
                    "smart",
                    "--agent",
                    "remote-fleet",
                ])
                .args([
                    "--agents", "5", "--tasks", "20", "--think", "10ms", "--report",
                ])
                .arg(report)
                .output()
                .unwrap()
        })
    };
    let out = run(report_dir.clone()).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(report_dir.join("report.json")).unwrap())
            .unwrap();
    assert_eq!(report["keel_process"], "remote");
    assert_eq!(report["final"]["lost"], 0, "{report}");
    assert_eq!(final_total(&report), 20);
    // Every task of the run went through the running keel's gateway and store.
    assert!(report["model_calls"].as_u64().unwrap() >= 20, "{report}");
    let rows = keel.events_of("task_created");
    assert_eq!(rows.len(), 20);
    // No model-call faults are injected against a keel keel sim did not start.
    assert_eq!(report["faults_injected"].get("error_5xx"), None, "{report}");
    assert!(!report_dir.join("keel").exists(), "no keel of its own");

    // A second run on the same keel gets task ids of its own.
    let again = run(dir.path().join("again")).await.unwrap();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );
    assert_eq!(keel.events_of("task_created").len(), 40);

    // A mistake is said at once, before any task is made: a route keel does not have, a
    // keel that does not answer.
    let refused = |server: String, route: &'static str| {
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_keel"))
                .args(["sim", "--server", &server, "--route", route])
                .args(["--agents", "1", "--tasks", "2", "--report"])
                .arg(std::env::temp_dir().join("keel-sim-refused"))
                .output()
                .unwrap()
        })
    };
    let out = refused(keel.url.clone(), "smrt").await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("has no route \"smrt\" (its routes: fragile, hurried, patient, smart, stubborn); pass one with --route"),
        "{stderr}"
    );
    let nobody = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = refused(format!("http://{nobody}"), "smart").await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot reach keel at"), "{stderr}");
    assert_eq!(keel.events_of("task_created").len(), 40);
}

#[tokio::test(flavor = "multi_thread")]
async fn keel_demo_stays_up_until_ctrl_c_then_stops() {
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _};
    let dir = tempfile::tempdir().unwrap();
    // A port nobody listens on: bound, then let go.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["demo", "--agents", "5", "--tasks", "20", "--think", "10ms"])
        .args(["--listen", &addr, "--report"])
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    let up = tokio::time::timeout(std::time::Duration::from_secs(120), async {
        while !seen.contains("Press Ctrl-C to stop.") {
            if stdout.read_line(&mut seen).await.unwrap() == 0 {
                return false;
            }
        }
        true
    })
    .await;
    assert!(matches!(up, Ok(true)), "keel demo did not stay up:\n{seen}");
    assert!(seen.contains("| success over feasible tasks |"), "{seen}");
    let health = reqwest::get(format!("http://{addr}/healthz"))
        .await
        .unwrap();
    assert!(health.status().is_success());
    let pid = child.id().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(std::time::Duration::from_secs(15), child.wait())
        .await
        .expect("keel demo did not stop at Ctrl-C")
        .unwrap();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).await.unwrap();
    assert!(status.success(), "{status}\n{seen}{rest}");
    assert!(
        rest.contains("stopping keel (Ctrl-C again stops it at once)"),
        "{rest}"
    );
}
