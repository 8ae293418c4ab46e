//! The shipped Prometheus rules and Grafana dashboard: the rules pass `promtool check
//! rules` and their unit tests (`promtool test rules`), and both name only metrics keel
//! exposes.

use std::path::{Path, PathBuf};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn promtool(args: &[&str]) -> String {
    let promtool = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".to_owned());
    let out = std::process::Command::new(&promtool)
        .args(args)
        .current_dir(deploy().join("prometheus"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {promtool} (cargo xtask test installs it): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// Every metric family keel registers (DESIGN §7 and keel's own), by exposed name.
const FAMILIES: &[&str] = &[
    "keel_requests_total",
    "keel_request_duration_seconds",
    "keel_attempts_total",
    "keel_retries_total",
    "keel_fallbacks_total",
    "keel_degraded_total",
    "keel_stream_errors_total",
    "keel_breaker_state",
    "keel_breaker_transitions_total",
    "keel_self_corrections_total",
    "keel_guardrail_blocks_total",
    "gen_ai_client_token_usage",
    "keel_budget_remaining",
    "keel_budget_limit",
    "keel_loops_detected_total",
    "keel_chaos_injected_total",
    "keel_tasks_total",
    "keel_task_steps",
    "keel_task_confidence",
    "keel_backtracks_total",
    "keel_dlq_depth",
    "keel_approvals_pending",
    "keel_alerts_total",
    "keel_incidents_open",
];

/// Metric names in `text` (PromQL), histogram suffixes taken off.
fn metrics_in(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (i, _) in text
        .match_indices("keel_")
        .chain(text.match_indices("gen_ai_client"))
    {
        let before = text[..i].chars().last();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name)
            .to_owned();
        names.push(family);
    }
    names
}

#[test]
fn the_prometheus_rules_pass_promtool_and_their_unit_tests() {
    let checked = promtool(&["check", "rules", "alerts.yml"]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", "alerts.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
    let rules = std::fs::read_to_string(deploy().join("prometheus/alerts.yml")).unwrap();
    for alert in [
        "KeelBreakerOpen",
        "KeelErrorBudgetBurn",
        "KeelDLQGrowing",
        "KeelBudgetNearExhaustion",
        "KeelTrajectoryLengthAnomaly",
    ] {
        assert!(
            rules.contains(&format!("alert: {alert}")),
            "{alert} is missing"
        );
    }
    for name in metrics_in(&rules) {
        assert!(
            FAMILIES.contains(&name.as_str()),
            "alerts.yml names {name}, which keel does not expose"
        );
    }
}

#[test]
fn the_grafana_dashboard_is_valid_and_names_only_keel_metrics() {
    let text = std::fs::read_to_string(deploy().join("grafana/keel.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(dashboard["uid"], "keel-fleet");
    let panels = dashboard["panels"].as_array().unwrap();
    let mut exprs = 0;
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let targets = panel["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("{panel}"));
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().unwrap();
            exprs += 1;
            for name in metrics_in(expr) {
                assert!(
                    FAMILIES.contains(&name.as_str()),
                    "panel {} names {name}, which keel does not expose",
                    panel["title"]
                );
            }
        }
    }
    assert!(exprs >= 20, "{exprs} queries");
}
