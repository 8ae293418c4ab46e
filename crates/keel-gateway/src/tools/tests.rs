use std::num::NonZeroU32;
use std::time::Duration;

use keel_config::{RetrySettings, ToolEndpoint, ToolSettings};
use serde_json::json;

use super::*;

fn tool(rules: &[&str]) -> Tools {
    let settings = ToolSettings {
        name: "refund".into(),
        endpoint: ToolEndpoint::Http {
            url: "http://127.0.0.1:9/refund".into(),
        },
        side_effects: true,
        timeout: Duration::from_secs(1),
        retry: RetrySettings {
            max_attempts: NonZeroU32::new(3).unwrap(),
            ..RetrySettings::default()
        },
        redact: vec!["card".into()],
        rules: rules.iter().map(|r| (*r).to_owned()).collect(),
        injection: keel_config::InjectionAction::Flag,
        profile: None,
    };
    Tools::build(
        &BTreeMap::from([("refund".to_owned(), settings)]),
        keel_config::DEFAULT_BREAKER,
    )
    .unwrap()
}

fn verdict(tools: &Tools, args: Value, calls: u64) -> Verdict {
    tools.get("refund").unwrap().check(&Action {
        agent: "support",
        task: Some("t1"),
        args: &args,
        calls_in_task: calls,
    })
}

#[test]
fn rules_over_args_allow_and_block_with_the_rule_as_reason() {
    let tools = tool(&["args.amount <= 500", "args.currency in ['USD', 'EUR']"]);
    assert_eq!(
        verdict(&tools, json!({"amount": 120, "currency": "EUR"}), 0),
        Verdict::Allow
    );
    let Verdict::Block(broken) = verdict(&tools, json!({"amount": 900, "currency": "EUR"}), 0)
    else {
        panic!("not blocked")
    };
    assert_eq!(broken.len(), 1);
    assert_eq!(broken[0].rule, "args.amount <= 500");
    assert_eq!(broken[0].reason, "rule `args.amount <= 500` does not hold");
    let Verdict::Block(both) = verdict(&tools, json!({"amount": 900, "currency": "GBP"}), 0) else {
        panic!("not blocked")
    };
    assert_eq!(both.len(), 2);
}

#[test]
fn agent_task_and_history_are_there_for_rules() {
    let tools = tool(&["agent == 'support'", "task == 't1'", "history.calls < 3"]);
    assert_eq!(verdict(&tools, json!({}), 2), Verdict::Allow);
    let Verdict::Block(broken) = verdict(&tools, json!({}), 3) else {
        panic!("not blocked")
    };
    assert_eq!(broken[0].rule, "history.calls < 3");
    assert!(tools.get("refund").unwrap().needs_history());
    assert!(
        !tool(&["args.amount < 3"])
            .get("refund")
            .unwrap()
            .needs_history()
    );
}

#[test]
fn a_rule_that_cannot_be_evaluated_blocks() {
    let tools = tool(&["args.amount <= 500"]);
    let Verdict::Block(broken) = verdict(&tools, json!({"currency": "EUR"}), 0) else {
        panic!("a missing arg must not pass")
    };
    assert!(
        broken[0].reason.contains("could not be evaluated"),
        "{broken:?}"
    );
    let tools = tool(&["args.amount"]);
    let Verdict::Block(broken) = verdict(&tools, json!({"amount": 5}), 0) else {
        panic!("a non-boolean rule must not pass")
    };
    assert!(broken[0].reason.contains("no true or false"), "{broken:?}");
}

#[test]
fn side_effects_are_retried_only_with_a_key_and_redaction_hides_args() {
    let tools = tool(&[]);
    let t = tools.get("refund").unwrap();
    assert_eq!(t.attempts(false), 1);
    assert_eq!(t.attempts(true), 3);
    assert_eq!(
        t.redact(&json!({"card": "4111", "amount": 5})),
        json!({"card": REDACTED, "amount": 5})
    );
    assert_eq!(
        t.redact(&json!({"received": {"args": {"card": "4111"}}, "list": [{"card": 1}]})),
        json!({"received": {"args": {"card": REDACTED}}, "list": [{"card": REDACTED}]})
    );
}
