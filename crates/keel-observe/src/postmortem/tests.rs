//! The postmortem's rules on logs shaped like the ones keel writes.

use keel_store::{Event, TaskRow};
use serde_json::{Value, json};

use super::{describe, of_task, root_cause};

/// A task's log: `(seconds since the start, kind, data)` each.
fn log(entries: &[(i64, &str, Value)]) -> Vec<Event> {
    entries
        .iter()
        .enumerate()
        .map(|(i, (secs, kind, data))| Event {
            seq: i as u64 + 1,
            task_id: Some("t1".into()),
            at: format!("2026-12-06T10:{:02}:{:02}.000Z", secs / 60, secs % 60),
            at_ms: 1_796_551_200_000 + secs * 1_000,
            kind: (*kind).into(),
            data: data.clone(),
            prev_hash: "p".repeat(64),
            hash: "h".repeat(64),
            layout: 2,
            data_hash: None,
            pruned: false,
        })
        .collect()
}

fn row(state: &str, attempts: u64) -> TaskRow {
    serde_json::from_value(json!({
        "id": "t1", "agent": "support", "state": state, "version": 9,
        "snapshot": {"attempts": attempts}, "created_at_ms": 1_796_551_200_000_i64,
        "updated_at_ms": 1_796_551_260_000_i64,
    }))
    .unwrap()
}

fn ok_call() -> Value {
    json!({"route": "smart", "target": "openai/gpt-5", "outcome": "ok", "attempts": 1, "latency_ms": 420, "fallback": false})
}

/// A worker that dies twice in a row after an outage: the outage is the cause, not the
/// last lost lease.
fn dead_task() -> Vec<Event> {
    log(&[
        (0, "task_created", json!({"agent": "support"})),
        (1, "task_claimed", json!({"worker": "w1", "attempt": 1})),
        (2, "llm_call", ok_call()),
        (
            3,
            "step_recorded",
            json!({"step": 1, "kind": "plan", "summary": "looked it up"}),
        ),
        (
            4,
            "llm_attempt_failed",
            json!({"target": "openai/gpt-5", "attempt": 1, "reason": "status", "error": "HTTP 503"}),
        ),
        (
            4,
            "retry_scheduled",
            json!({"target": "openai/gpt-5", "attempt": 2, "delay_ms": 200, "after": "status"}),
        ),
        (
            5,
            "llm_attempt_failed",
            json!({"target": "openai/gpt-5", "attempt": 2, "reason": "status", "error": "HTTP 503"}),
        ),
        (
            5,
            "fallback_used",
            json!({"from": "openai/gpt-5", "to": "local/llama"}),
        ),
        (
            6,
            "llm_call",
            json!({"route": "smart", "target": "none", "outcome": "degraded", "attempts": 2, "latency_ms": 900}),
        ),
        (40, "lease_expired", json!({"worker": "w1", "attempt": 1})),
        (41, "task_claimed", json!({"worker": "w2", "attempt": 2})),
        (80, "lease_expired", json!({"worker": "w2", "attempt": 2})),
        (
            80,
            "task_dead",
            json!({"reason": "lease_expired", "attempts": 2, "error": null}),
        ),
    ])
}

#[test]
fn the_root_cause_is_the_first_trouble_after_the_last_progress() {
    let events = dead_task();
    let cause = root_cause(&events).unwrap();
    assert_eq!(
        events[cause].seq, 5,
        "the first failed attempt after step 1"
    );
    let report = of_task(&row("dead", 2), &events);
    let line = report.root_cause.unwrap();
    assert_eq!(line.kind, "llm_attempt_failed");
    assert_eq!(
        line.what,
        "attempt 1 on openai/gpt-5 failed (status): HTTP 503"
    );
    assert_eq!(line.offset_ms, 4_000);
    assert_eq!(
        report.title,
        "task t1 of agent \"support\": dead after 2 attempts"
    );
    assert_eq!(report.duration_ms, Some(80_000));
    assert_eq!(report.ended_at.as_deref(), Some("2026-12-06T10:01:20.000Z"));
}

#[test]
fn a_later_recovery_moves_the_root_cause_past_the_trouble_it_got_over() {
    // The outage was got over (an answered call, then a step); the task then looped.
    let events = log(&[
        (0, "task_created", json!({})),
        (1, "llm_attempt_failed", json!({"reason": "connect"})),
        (2, "llm_call", ok_call()),
        (
            3,
            "step_recorded",
            json!({"step": 1, "kind": "act", "summary": "x"}),
        ),
        (4, "loop_detected", json!({"kind": "repeats"})),
        (4, "task_handed_off", json!({"reason": "loop"})),
    ]);
    assert_eq!(root_cause(&events), Some(4));
}

#[test]
fn a_task_that_went_well_has_no_root_cause_and_one_that_weathered_trouble_still_names_it() {
    let clean = log(&[
        (0, "task_created", json!({})),
        (1, "task_claimed", json!({"worker": "w", "attempt": 1})),
        (2, "llm_call", ok_call()),
        (3, "task_succeeded", json!({})),
    ]);
    let report = of_task(&row("succeeded", 1), &clean);
    assert_eq!(report.root_cause, None);
    assert!(report.remediations.is_empty());
    assert!(report.to_markdown().contains("Nothing went wrong."));
    // A retried call that then succeeded: the failed attempt is still the story's start.
    let weathered = log(&[
        (0, "task_created", json!({})),
        (1, "llm_attempt_failed", json!({"reason": "status"})),
        (1, "retry_scheduled", json!({"attempt": 2})),
        (2, "llm_call", ok_call()),
        (3, "task_succeeded", json!({})),
    ]);
    assert_eq!(root_cause(&weathered), Some(1));
}

#[test]
fn remediations_are_counted_by_kind_in_order_of_first_use() {
    let report = of_task(&row("dead", 2), &dead_task());
    let got: Vec<(&str, u64)> = report
        .remediations
        .iter()
        .map(|r| (r.kind.as_str(), r.count))
        .collect();
    // The first claim is no remediation; the second (after a lost lease) is.
    assert_eq!(
        got,
        [
            ("retry_scheduled", 1),
            ("fallback_used", 1),
            ("task_claimed", 1)
        ]
    );
    assert_eq!(report.remediations[2].first_at, "2026-12-06T10:00:41.000Z");
}

#[test]
fn the_markdown_marks_the_root_cause_and_folds_routine_runs() {
    let mut entries = vec![(0, "task_created", json!({}))];
    for i in 1..=5 {
        entries.push((i, "llm_call", ok_call()));
    }
    entries.push((
        6,
        "llm_attempt_failed",
        json!({"target": "a/b", "attempt": 1, "reason": "attempt", "error": "timed out"}),
    ));
    entries.push((
        7,
        "task_failed",
        json!({"retryable": false, "error": {"message": "gave up"}}),
    ));
    let events = log(&entries);
    let md = of_task(&row("dead", 1), &events).to_markdown();
    assert!(
        md.starts_with("# Postmortem: task t1 of agent \"support\": dead after 1 attempt\n"),
        "{md}"
    );
    assert!(md.contains("- +1.0s to +5.0s: 5 routine events"), "{md}");
    assert!(
        md.contains("- +6.0s `llm_attempt_failed` attempt 1 on a/b failed (attempt): timed out **(root cause)**"),
        "{md}"
    );
    assert!(
        md.contains("`task_failed` failed (not retryable): {\"message\":\"gave up\"}"),
        "{md}"
    );
    assert!(
        md.contains("## Root cause\n\nAt +6.0s (`llm_attempt_failed`, seq 7)"),
        "{md}"
    );
}

#[test]
fn a_postmortem_reads_back_from_its_json() {
    let report = of_task(&row("dead", 2), &dead_task());
    let text = serde_json::to_string(&report).unwrap();
    let back: super::Postmortem = serde_json::from_str(&text).unwrap();
    assert_eq!(back, report);
}

#[test]
fn a_model_call_no_target_answered_names_none() {
    let failed = json!({"route": "smart", "target": "none", "outcome": "unavailable", "attempts": 3, "latency_ms": 900, "fallback": false});
    let degraded = json!({"route": "smart", "target": "degraded", "outcome": "degraded", "attempts": 1, "latency_ms": 5, "fallback": false});
    assert_eq!(
        super::describe("llm_call", &failed),
        "model call on route \"smart\": unavailable after 3 attempts in 900 ms"
    );
    assert_eq!(
        super::describe("llm_call", &degraded),
        "model call on route \"smart\": degraded after 1 attempt in 5 ms"
    );
    assert_eq!(
        super::describe("llm_call", &ok_call()),
        "model call on route \"smart\" via openai/gpt-5: ok after 1 attempt in 420 ms"
    );
}

#[test]
fn a_retry_keel_did_not_make_is_no_remediation() {
    let skipped =
        json!({"route": "smart", "target": "openai/gpt-5", "skipped": "retry budget exhausted"});
    let events = log(&[
        (0, "task_created", json!({})),
        (
            1,
            "llm_attempt_failed",
            json!({"target": "openai/gpt-5", "attempt": 1, "reason": "status", "error": "HTTP 503"}),
        ),
        (1, "retry_scheduled", skipped.clone()),
        (
            1,
            "fallback_used",
            json!({"from": "openai/gpt-5", "to": "local/llama"}),
        ),
        (2, "llm_call", ok_call()),
        (3, "task_succeeded", json!({})),
    ]);
    let report = of_task(&row("succeeded", 1), &events);
    let kinds: Vec<&str> = report
        .remediations
        .iter()
        .map(|r| r.kind.as_str())
        .collect();
    assert_eq!(kinds, ["fallback_used"]);
    assert_eq!(
        describe("retry_scheduled", &skipped),
        "no retry on openai/gpt-5: retry budget exhausted"
    );
}

/// A worker's error or reason is shown on one line, with no control character printed.
#[test]
fn a_value_is_shown_on_one_line_without_control_characters() {
    assert_eq!(
        super::compact(&serde_json::json!("wire money\nAPPROVED BY CFO \u{1b}[2K")),
        "wire money\\nAPPROVED BY CFO \\u{1b}[2K"
    );
    let long = "é".repeat(300);
    assert_eq!(
        super::compact(&serde_json::json!(long)),
        format!("{}...", "é".repeat(200))
    );
}
