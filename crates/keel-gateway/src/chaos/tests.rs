//! The decision function: precedence, scopes, windows, reproducibility and rates.

use std::time::{Duration, SystemTime};

use keel_config::{
    ChaosSettings, Fault, FaultRule, Latency, Outage, OutageScope, OutageStart, Scope,
};

use super::*;

fn rule(scope: Scope, rate: f64, fault: Fault) -> FaultRule {
    FaultRule { scope, rate, fault }
}

fn chaos(seed: u64, faults: Vec<FaultRule>, outages: Vec<Outage>) -> Chaos {
    let settings = ChaosSettings {
        enabled: true,
        seed: Some(seed),
        faults,
        outages,
    };
    Chaos::new(&settings).unwrap()
}

fn attempt<'a>(task: Option<&'a str>, call_attempt: u32) -> AttemptInfo<'a> {
    AttemptInfo {
        route: "smart",
        target: "sim/primary",
        agent: "support",
        task,
        call_attempt,
    }
}

fn at(secs: u64) -> Now {
    Now {
        since_start: Duration::from_secs(secs),
        wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs),
    }
}

const E503: Fault = Fault::Status {
    status: 503,
    retry_after: None,
};

#[test]
fn disabled_chaos_is_not_built() {
    let settings = ChaosSettings {
        enabled: false,
        faults: vec![rule(Scope::default(), 1.0, Fault::Drop)],
        ..ChaosSettings::default()
    };
    assert!(Chaos::new(&settings).is_none());
}

#[test]
fn rate_one_always_fires_and_rate_zero_never_does() {
    let always = chaos(1, vec![rule(Scope::default(), 1.0, E503)], vec![]);
    let never = chaos(1, vec![rule(Scope::default(), 0.0, E503)], vec![]);
    for n in 1..=200 {
        let a = attempt(Some("t"), n);
        assert_eq!(
            always.decide(&a, None, at(0)),
            Some(Injection {
                fault: E503,
                source: Source::Rule
            })
        );
        assert_eq!(never.decide(&a, None, at(0)), None);
    }
}

#[test]
fn a_fixed_seed_fires_at_the_configured_rate() {
    let c = chaos(42, vec![rule(Scope::default(), 0.05, Fault::Drop)], vec![]);
    let trials = 100_000;
    let fired = (0..trials)
        .filter(|i| {
            let task = format!("task-{}", i % 1000);
            c.decide(&attempt(Some(&task), 1), None, at(0)).is_some()
        })
        .count();
    // 5% of 100k is 5000 with a standard deviation of about 69: allow 5 sigma.
    assert!((4650..=5350).contains(&fired), "fired {fired} of {trials}");
}

#[test]
fn the_same_seed_gives_the_same_faults_whatever_the_interleaving() {
    let rules = || vec![rule(Scope::default(), 0.3, Fault::Drop)];
    let (a, b) = (chaos(7, rules(), vec![]), chaos(7, rules(), vec![]));
    let tasks = ["t1", "t2", "t3"];
    // Run `a` task after task, `b` round-robin: per task, the same sequence.
    let mut seq_a: Vec<Vec<bool>> = Vec::new();
    for task in tasks {
        seq_a.push(
            (0..50)
                .map(|_| a.decide(&attempt(Some(task), 1), None, at(0)).is_some())
                .collect(),
        );
    }
    let mut seq_b: Vec<Vec<bool>> = vec![Vec::new(); 3];
    for _ in 0..50 {
        for (i, task) in tasks.iter().enumerate() {
            seq_b[i].push(b.decide(&attempt(Some(task), 1), None, at(0)).is_some());
        }
    }
    assert_eq!(seq_a, seq_b);
    // Another seed gives another schedule.
    let other = chaos(8, rules(), vec![]);
    let seq_other: Vec<bool> = (0..50)
        .map(|_| other.decide(&attempt(Some("t1"), 1), None, at(0)).is_some())
        .collect();
    assert_ne!(seq_a[0], seq_other);
}

#[test]
fn a_rule_applies_only_within_its_match() {
    let scope = Scope {
        route: Some("smart".into()),
        target: Some("sim/primary".into()),
        agent: Some("support".into()),
        task: Some("t-1".into()),
    };
    let c = chaos(1, vec![rule(scope, 1.0, Fault::Hang)], vec![]);
    assert!(c.decide(&attempt(Some("t-1"), 1), None, at(0)).is_some());
    assert!(c.decide(&attempt(Some("t-2"), 1), None, at(0)).is_none());
    assert!(c.decide(&attempt(None, 1), None, at(0)).is_none());
    let other_target = AttemptInfo {
        target: "sim/secondary",
        ..attempt(Some("t-1"), 1)
    };
    assert!(c.decide(&other_target, None, at(0)).is_none());
    let other_agent = AttemptInfo {
        agent: "ops",
        ..attempt(Some("t-1"), 1)
    };
    assert!(c.decide(&other_agent, None, at(0)).is_none());
}

#[test]
fn the_first_rule_that_fires_wins() {
    let c = chaos(
        1,
        vec![
            rule(Scope::default(), 0.0, Fault::Hang),
            rule(Scope::default(), 1.0, Fault::Drop),
            rule(Scope::default(), 1.0, Fault::Malformed),
        ],
        vec![],
    );
    let got = c.decide(&attempt(None, 1), None, at(0)).map(|i| i.fault);
    assert_eq!(got, Some(Fault::Drop));
}

#[test]
fn outages_fail_their_scope_only_inside_their_window() {
    let outage = |scope, start| Outage {
        scope,
        start,
        duration: Duration::from_secs(20),
        fault: Fault::Drop,
    };
    let c = chaos(
        1,
        vec![],
        vec![
            outage(
                OutageScope::Target("sim/primary".into()),
                OutageStart::AfterStart(Duration::from_secs(30)),
            ),
            outage(
                OutageScope::Route("fast".into()),
                OutageStart::At(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_100)),
            ),
        ],
    );
    let primary = attempt(None, 1);
    assert!(c.decide(&primary, None, at(29)).is_none());
    let hit = c.decide(&primary, None, at(30)).unwrap();
    assert_eq!(hit.source, Source::Outage);
    assert!(c.decide(&primary, None, at(49)).is_some());
    assert!(
        c.decide(&primary, None, at(50)).is_none(),
        "the window is half-open"
    );
    let secondary = AttemptInfo {
        target: "sim/secondary",
        ..primary
    };
    assert!(c.decide(&secondary, None, at(35)).is_none());
    let fast = AttemptInfo {
        route: "fast",
        ..secondary
    };
    assert!(c.decide(&fast, None, at(99)).is_none());
    assert!(c.decide(&fast, None, at(100)).is_some());
    assert!(c.decide(&fast, None, at(120)).is_none());
}

#[test]
fn the_header_wins_for_the_attempts_it_covers() {
    let c = chaos(1, vec![rule(Scope::default(), 1.0, Fault::Drop)], vec![]);
    let header = HeaderFault::parse("status=503;attempts=2").unwrap();
    let first = c.decide(&attempt(None, 1), Some(&header), at(0)).unwrap();
    assert_eq!((first.fault, first.source), (E503, Source::Header));
    assert_eq!(
        c.decide(&attempt(None, 2), Some(&header), at(0))
            .map(|i| i.source),
        Some(Source::Header)
    );
    // Past its attempts, the config's rules apply again.
    let third = c.decide(&attempt(None, 3), Some(&header), at(0)).unwrap();
    assert_eq!((third.fault, third.source), (Fault::Drop, Source::Rule));
    // With no rules at all, the header alone decides.
    let bare = chaos(1, vec![], vec![]);
    assert!(
        bare.decide(&attempt(None, 3), Some(&header), at(0))
            .is_none()
    );
}

#[test]
fn latency_ranges_resolve_to_a_delay_within_the_range() {
    let range = Latency::Uniform {
        min: Duration::from_millis(50),
        max: Duration::from_millis(500),
    };
    let c = chaos(
        3,
        vec![rule(Scope::default(), 1.0, Fault::Latency(range))],
        vec![],
    );
    let mut seen = std::collections::BTreeSet::new();
    for n in 1..=200 {
        let Some(Injection {
            fault: Fault::Latency(Latency::Fixed(d)),
            ..
        }) = c.decide(&attempt(Some("t"), n), None, at(0))
        else {
            panic!("a fixed latency");
        };
        assert!((Duration::from_millis(50)..=Duration::from_millis(500)).contains(&d));
        seen.insert(d.as_millis() / 50);
    }
    assert!(seen.len() >= 8, "delays spread over the range: {seen:?}");
}

#[test]
fn one_key_rolls_are_independent_from_attempt_to_attempt() {
    let c = chaos(42, vec![rule(Scope::default(), 0.3, Fault::Drop)], vec![]);
    let fired: Vec<bool> = (0..20_000)
        .map(|_| c.decide(&attempt(None, 1), None, at(0)).is_some())
        .collect();
    let rate = fired.iter().filter(|f| **f).count() as f64 / fired.len() as f64;
    let pairs = fired.windows(2).filter(|w| w[0] && w[1]).count() as f64 / (fired.len() - 1) as f64;
    assert!((0.28..0.32).contains(&rate), "rate {rate}");
    assert!(
        (0.08..0.10).contains(&pairs),
        "back-to-back {pairs}, want about 0.09"
    );
}
