//! `[chaos]`: what a valid section becomes, and one rendered error per rule.

use std::time::{Duration, SystemTime};

use super::{errors, settings};
use crate::{ChaosSettings, Fault, FaultRule, Latency, Outage, OutageScope, OutageStart, Scope};

/// A provider and two routes on lines 1-11, so chaos tests can start at line 13.
const BASE: &str = "[providers.openai]
kind = \"openai\"
base_url = \"https://api.openai.com/v1\"

[routes.smart]
targets = [
  { provider = \"openai\", model = \"gpt-5\" },
  { provider = \"openai\", model = \"gpt-5-mini\" },
]
[routes.fast]
targets = [{ provider = \"openai\", model = \"gpt-5-mini\" }]
";

fn with_base(chaos: &str) -> String {
    format!("{BASE}\n{chaos}")
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn chaos_is_off_and_empty_by_default() {
    assert_eq!(settings(BASE).chaos, ChaosSettings::default());
    assert!(!ChaosSettings::default().enabled);
}

#[test]
fn a_full_section_parses_to_rules_and_outages() {
    let text = with_base(
        "[chaos]
enabled = true
seed = 42

[[chaos.faults]]
match = { route = \"smart\", target = \"openai/gpt-5\", agent = \"support\", task = \"t-1\" }
rate = 0.05
kind = \"status\"
status = 503
retry_after = \"2s\"

[[chaos.faults]]
rate = 1
kind = \"latency\"
latency = { min = \"50ms\", max = \"500ms\" }

[[chaos.faults]]
rate = 0.5
kind = \"latency\"
latency = \"200ms\"

[[chaos.faults]]
match = { target = \"openai/gpt-5-mini\" }
rate = 0.01
kind = \"stream_cut\"
after_chunks = 3

[[chaos.faults]]
rate = 0.01
kind = \"hang\"

[[chaos.faults]]
rate = 0.01
kind = \"malformed\"

[[chaos.outages]]
target = \"openai/gpt-5\"
start = \"30s\"
duration = \"20s\"

[[chaos.outages]]
route = \"fast\"
start = \"2026-11-23T10:00:00Z\"
duration = \"1m\"
kind = \"status\"
status = 503
",
    );
    let chaos = settings(&text).chaos;
    assert!(chaos.enabled);
    assert_eq!(chaos.seed, Some(42));
    assert_eq!(
        chaos.faults[0],
        FaultRule {
            scope: Scope {
                route: Some("smart".into()),
                target: Some("openai/gpt-5".into()),
                agent: Some("support".into()),
                task: Some("t-1".into()),
            },
            rate: 0.05,
            fault: Fault::Status {
                status: 503,
                retry_after: Some(Duration::from_secs(2)),
            },
        }
    );
    assert_eq!(chaos.faults[1].scope, Scope::default());
    assert_eq!(chaos.faults[1].rate, 1.0);
    assert_eq!(
        chaos.faults[1].fault,
        Fault::Latency(Latency::Uniform {
            min: ms(50),
            max: ms(500)
        })
    );
    assert_eq!(
        chaos.faults[2].fault,
        Fault::Latency(Latency::Fixed(ms(200)))
    );
    assert_eq!(chaos.faults[3].fault, Fault::StreamCut { after_chunks: 3 });
    assert_eq!(chaos.faults[4].fault, Fault::Hang);
    assert_eq!(chaos.faults[5].fault, Fault::Malformed);
    assert_eq!(
        chaos.outages[0],
        Outage {
            scope: OutageScope::Target("openai/gpt-5".into()),
            start: OutageStart::AfterStart(Duration::from_secs(30)),
            duration: Duration::from_secs(20),
            fault: Fault::Drop,
        }
    );
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_428_000);
    assert_eq!(chaos.outages[1].scope, OutageScope::Route("fast".into()));
    assert_eq!(chaos.outages[1].start, OutageStart::At(at));
    assert_eq!(
        chaos.outages[1].fault,
        Fault::Status {
            status: 503,
            retry_after: None
        }
    );
}

#[test]
fn a_disabled_section_is_still_validated() {
    let text =
        with_base("[chaos]\nenabled = false\n[[chaos.faults]]\nrate = 2.0\nkind = \"drop\"\n");
    assert_eq!(
        errors(&text),
        "keel.toml:16: chaos.faults[0].rate: 2 is outside [0, 1]"
    );
}

/// One broken rule per row: the `[[chaos.faults]]` body, then the exact error (lines
/// counted from the top of `BASE`; the rule body starts at line 14).
#[test]
fn every_fault_rule_is_checked_with_file_line_and_key() {
    let table: &[(&str, &str)] = &[
        (
            "rate = 1.5\nkind = \"drop\"",
            "keel.toml:14: chaos.faults[0].rate: 1.5 is outside [0, 1]",
        ),
        (
            "rate = -0.1\nkind = \"drop\"",
            "keel.toml:14: chaos.faults[0].rate: -0.1 is outside [0, 1]",
        ),
        (
            "rate = 0.1\nkind = \"explode\"",
            "keel.toml:15: chaos.faults[0].kind: unknown variant `explode`, expected one of \
             `status`, `latency`, `hang`, `drop`, `stream_cut`, `malformed`",
        ),
        (
            "rate = 0.1",
            "keel.toml:13: chaos.faults[0].kind: missing; one of \"status\", \"latency\", \
             \"hang\", \"drop\", \"stream_cut\", \"malformed\"",
        ),
        (
            "kind = \"drop\"",
            "keel.toml:13: chaos.faults[0]: missing field `rate`",
        ),
        (
            "rate = 0.1\nkind = \"status\"",
            "keel.toml:13: chaos.faults[0].status: kind = \"status\" needs status, like status = 503",
        ),
        (
            "rate = 0.1\nkind = \"status\"\nstatus = 200",
            "keel.toml:16: chaos.faults[0].status: 200 is not an HTTP error status; use 400..=599",
        ),
        (
            "rate = 0.1\nkind = \"status\"\nstatus = 600",
            "keel.toml:16: chaos.faults[0].status: 600 is not an HTTP error status; use 400..=599",
        ),
        (
            "rate = 0.1\nkind = \"drop\"\nstatus = 503\nretry_after = \"1s\"",
            "keel.toml:16: chaos.faults[0].status: only applies to kind = \"status\", not \"drop\"\n\
             keel.toml:17: chaos.faults[0].retry_after: only applies to kind = \"status\", not \"drop\"",
        ),
        (
            "rate = 0.1\nkind = \"status\"\nstatus = 503\nretry_after = \"soon\"",
            "keel.toml:17: chaos.faults[0].retry_after: invalid duration \"soon\": expected number \
             at 0; write durations like \"250ms\", \"30s\" or \"10m\"",
        ),
        (
            "rate = 0.1\nkind = \"latency\"",
            "keel.toml:13: chaos.faults[0].latency: kind = \"latency\" needs latency, like latency = \"200ms\"",
        ),
        (
            "rate = 0.1\nkind = \"latency\"\nlatency = \"0s\"",
            "keel.toml:16: chaos.faults[0].latency: must be longer than 0s",
        ),
        (
            "rate = 0.1\nkind = \"latency\"\nlatency = { min = \"2s\", max = \"1s\" }",
            "keel.toml:16: chaos.faults[0].latency.min: 2s is longer than max 1s",
        ),
        (
            "rate = 0.1\nkind = \"latency\"\nlatency = { min = \"2s\" }",
            "keel.toml:16: chaos.faults[0].latency: missing field `max`",
        ),
        (
            "rate = 0.1\nkind = \"latency\"\nlatency = 5",
            "keel.toml:16: chaos.faults[0].latency: invalid type: integer `5`, expected a \
             duration like \"200ms\" or a range like { min = \"50ms\", max = \"500ms\" }",
        ),
        (
            "rate = 0.1\nkind = \"hang\"\nlatency = \"1s\"",
            "keel.toml:16: chaos.faults[0].latency: only applies to kind = \"latency\", not \"hang\"",
        ),
        (
            "rate = 0.1\nkind = \"stream_cut\"",
            "keel.toml:13: chaos.faults[0].after_chunks: kind = \"stream_cut\" needs after_chunks, \
             like after_chunks = 3",
        ),
        (
            "rate = 0.1\nkind = \"malformed\"\nafter_chunks = 2",
            "keel.toml:16: chaos.faults[0].after_chunks: only applies to kind = \"stream_cut\", \
             not \"malformed\"",
        ),
        (
            "match = { route = \"smrt\" }\nrate = 0.1\nkind = \"drop\"",
            "keel.toml:14: chaos.faults[0].match.route: unknown route \"smrt\"; known: fast, smart",
        ),
        (
            "match = { target = \"openai/gpt-6\" }\nrate = 0.1\nkind = \"drop\"",
            "keel.toml:14: chaos.faults[0].match.target: unknown target \"openai/gpt-6\"; write it \
             as provider/model of a route's target; known: openai/gpt-5, openai/gpt-5-mini",
        ),
        (
            "match = { route = \"fast\", target = \"openai/gpt-5\" }\nrate = 0.1\nkind = \"drop\"",
            "keel.toml:14: chaos.faults[0].match.target: \"openai/gpt-5\" is not a target of route \
             \"fast\"; its targets: openai/gpt-5-mini",
        ),
        (
            "match = { task = \"\" }\nrate = 0.1\nkind = \"drop\"",
            "keel.toml:14: chaos.faults[0].match.task: must not be empty; leave it out to match any",
        ),
        (
            "match = { model = \"smart\" }\nrate = 0.1\nkind = \"drop\"",
            "keel.toml:14: chaos.faults[0].match.model: unknown field `model`, expected one of \
             `route`, `target`, `agent`, `task`",
        ),
    ];
    let mut wrong = Vec::new();
    for (rule, expected) in table {
        let text = with_base(&format!("[[chaos.faults]]\n{rule}\n"));
        let got = errors(&text);
        if got != *expected {
            wrong.push(format!("rule:\n{rule}\n  got: {got}\n want: {expected}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
}

#[test]
fn every_outage_is_checked_with_file_line_and_key() {
    let table: &[(&str, &str)] = &[
        (
            "start = \"30s\"\nduration = \"20s\"",
            "keel.toml:13: chaos.outages[0]: needs route = \"NAME\" or target = \
             \"provider/model\": what is down",
        ),
        (
            "route = \"smart\"\ntarget = \"openai/gpt-5\"\nstart = \"30s\"\nduration = \"20s\"",
            "keel.toml:15: chaos.outages[0].target: give either route or target, not both",
        ),
        (
            "route = \"nope\"\nstart = \"30s\"\nduration = \"20s\"",
            "keel.toml:14: chaos.outages[0].route: unknown route \"nope\"; known: fast, smart",
        ),
        (
            "target = \"openai/gpt-5\"\nstart = \"next tuesday\"\nduration = \"20s\"",
            "keel.toml:15: chaos.outages[0].start: \"next tuesday\" is neither a duration after \
             keel starts (\"30s\") nor a UTC time (\"2026-11-23T10:00:00Z\")",
        ),
        (
            "target = \"openai/gpt-5\"\nstart = \"30s\"\nduration = \"0s\"",
            "keel.toml:16: chaos.outages[0].duration: must be longer than 0s",
        ),
        (
            "target = \"openai/gpt-5\"\nstart = \"30s\"",
            "keel.toml:13: chaos.outages[0]: missing field `duration`",
        ),
        (
            "target = \"openai/gpt-5\"\nstart = \"30s\"\nduration = \"1s\"\nkind = \"latency\"\n\
             latency = \"1s\"",
            "keel.toml:17: chaos.outages[0].kind: an outage fails every attempt; use one of \
             \"drop\", \"status\", \"hang\", or a [[chaos.faults]] rule with rate = 1.0 for \"latency\"",
        ),
        (
            "target = \"openai/gpt-5\"\nstart = \"30s\"\nduration = \"1s\"\nstatus = 503",
            "keel.toml:17: chaos.outages[0].status: only applies to kind = \"status\", not \"drop\"",
        ),
    ];
    let mut wrong = Vec::new();
    for (outage, expected) in table {
        let text = with_base(&format!("[[chaos.outages]]\n{outage}\n"));
        let got = errors(&text);
        if got != *expected {
            wrong.push(format!(
                "outage:\n{outage}\n  got: {got}\n want: {expected}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
}

#[test]
fn with_agent_keys_a_rule_may_only_name_configured_agents() {
    let text = with_base(
        "[agents.support]
keys_env = [\"KEEL_KEY_SUPPORT\"]

[[chaos.faults]]
match = { agent = \"suport\" }
rate = 0.1
kind = \"drop\"
",
    );
    assert_eq!(
        errors(&text),
        "keel.toml:17: chaos.faults[0].match.agent: unknown agent \"suport\"; known: support"
    );
    // Without keys any x-keel-agent name can call, so any name may be matched.
    let open = with_base(
        "[[chaos.faults]]\nmatch = { agent = \"anyone\" }\nrate = 0.1\nkind = \"drop\"\n",
    );
    assert_eq!(
        settings(&open).chaos.faults[0].scope.agent.as_deref(),
        Some("anyone")
    );
}

#[test]
fn unknown_chaos_key_is_rejected() {
    assert_eq!(
        errors("[chaos]\nenable = true\n"),
        "keel.toml:2: chaos.enable: unknown field `enable`, expected one of `enabled`, `seed`, \
         `faults`, `outages`"
    );
}
