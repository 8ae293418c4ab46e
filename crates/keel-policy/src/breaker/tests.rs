use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::clock::{Clock, ManualClock};
use BreakerState::{Closed, HalfOpen, Open};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Count window of 10, 5 calls before evaluating, open at 50 % failures or 80 % slow calls,
/// slow from 1 s, open for 30 s, 3 trials.
fn settings() -> BreakerSettings {
    BreakerSettings {
        window: Window::Count(10),
        min_calls: 5,
        failure_rate: 0.5,
        slow_call_rate: 0.8,
        slow_call: secs(1),
        open_for: secs(30),
        half_open_calls: 3,
    }
}

const FAST: Duration = Duration::from_millis(10);

fn ok() -> Outcome {
    Outcome::success(FAST)
}

fn fail() -> Outcome {
    Outcome::failure(FAST)
}

/// Acquires and records one call at `now`.
fn call(breaker: &mut Breaker, now: Duration, outcome: Outcome) -> Result<(), Rejected> {
    let permit = breaker.try_acquire(now)?;
    breaker.record(permit, now, outcome);
    Ok(())
}

fn calls(breaker: &mut Breaker, now: Duration, outcomes: &[Outcome]) {
    for outcome in outcomes {
        call(breaker, now, *outcome).expect("call permitted");
    }
}

/// A breaker opened at `at` by five failures.
fn opened_at(at: Duration) -> Breaker {
    let mut breaker = Breaker::new(settings());
    calls(&mut breaker, at, &[fail(); 5]);
    assert_eq!(breaker.state(), BreakerState::Open);
    breaker.take_transitions();
    breaker
}

/// A breaker that went half-open at `at` (its first trial permit is returned).
fn half_open_at(at: Duration) -> (Breaker, Permit) {
    let mut breaker = opened_at(at - secs(30));
    let permit = breaker.try_acquire(at).expect("first trial");
    assert_eq!(breaker.state(), BreakerState::HalfOpen);
    breaker.take_transitions();
    (breaker, permit)
}

fn transition(
    from: BreakerState,
    to: BreakerState,
    at: Duration,
    rates: Option<(f64, f64)>,
) -> Transition {
    Transition {
        from,
        to,
        at,
        failure_rate: rates.map(|r| r.0),
        slow_call_rate: rates.map(|r| r.1),
    }
}

// === closed ===

#[test]
fn opens_after_failure_rate_exceeded() {
    let mut breaker = Breaker::new(settings());
    calls(&mut breaker, secs(1), &[ok(), ok(), fail(), fail()]);
    assert_eq!(breaker.state(), Closed);
    calls(&mut breaker, secs(2), &[fail()]);
    assert_eq!(breaker.state(), Open);
    assert_eq!(
        breaker.take_transitions(),
        [transition(Closed, Open, secs(2), Some((0.6, 0.0)))]
    );
}

#[test]
fn opens_at_exactly_the_failure_rate() {
    let mut breaker = Breaker::new(BreakerSettings {
        min_calls: 4,
        ..settings()
    });
    calls(&mut breaker, secs(1), &[ok(), fail(), ok(), fail()]);
    assert_eq!(breaker.state(), Open);
}

#[test]
fn stays_closed_below_failure_rate() {
    let mut breaker = Breaker::new(settings());
    for _ in 0..10 {
        calls(&mut breaker, secs(1), &[ok(), fail(), ok(), ok(), fail()]);
    }
    assert_eq!(breaker.state(), Closed);
    assert!(breaker.take_transitions().is_empty());
}

#[test]
fn does_not_open_below_min_calls() {
    let mut breaker = Breaker::new(settings());
    calls(&mut breaker, secs(1), &[fail(); 4]);
    assert_eq!(breaker.state(), Closed);
    calls(&mut breaker, secs(1), &[fail()]);
    assert_eq!(breaker.state(), Open);
}

#[test]
fn min_calls_above_count_window_size_is_lowered_to_the_size() {
    let mut breaker = Breaker::new(BreakerSettings {
        window: Window::Count(3),
        min_calls: 20,
        ..settings()
    });
    assert_eq!(breaker.settings().min_calls, 3);
    calls(&mut breaker, secs(1), &[fail(); 3]);
    assert_eq!(breaker.state(), Open);
}

#[test]
fn count_window_keeps_only_the_last_n_calls() {
    let mut breaker = Breaker::new(BreakerSettings {
        window: Window::Count(4),
        min_calls: 4,
        failure_rate: 0.75,
        ..settings()
    });
    // With every call counted this would be 5 failures in 9 (56 %): below 75 %.
    calls(
        &mut breaker,
        secs(1),
        &[fail(), fail(), ok(), ok(), ok(), ok(), fail(), fail()],
    );
    assert_eq!(breaker.state(), Closed);
    // The last four are ok, fail, fail, fail: 75 %.
    calls(&mut breaker, secs(1), &[fail()]);
    assert_eq!(breaker.state(), Open);
}

#[test]
fn opens_on_slow_call_rate() {
    let mut breaker = Breaker::new(settings());
    let slow = Outcome::success(secs(2));
    calls(&mut breaker, secs(1), &[slow, slow, slow, ok(), slow]);
    assert_eq!(breaker.state(), Open);
    assert_eq!(
        breaker.take_transitions(),
        [transition(Closed, Open, secs(1), Some((0.0, 0.8)))]
    );
}

#[test]
fn call_lasting_exactly_slow_call_is_slow() {
    let mut breaker = Breaker::new(settings());
    calls(&mut breaker, secs(1), &[Outcome::success(secs(1)); 5]);
    assert_eq!(breaker.state(), Open);
}

#[test]
fn slow_failure_counts_as_failure_and_as_slow() {
    let mut breaker = Breaker::new(settings());
    calls(&mut breaker, secs(1), &[Outcome::failure(secs(5)); 5]);
    assert_eq!(
        breaker.take_transitions(),
        [transition(Closed, Open, secs(1), Some((1.0, 1.0)))]
    );
}

#[test]
fn time_window_forgets_old_calls() {
    let mut breaker = Breaker::new(BreakerSettings {
        window: Window::Time(secs(10)),
        ..settings()
    });
    calls(&mut breaker, secs(0), &[fail(); 4]);
    // Ten seconds later the first four fall out: one call in the window, below min_calls.
    calls(&mut breaker, secs(10), &[fail()]);
    assert_eq!(breaker.state(), Closed);
    calls(&mut breaker, secs(19), &[fail(); 3]);
    assert_eq!(breaker.state(), Closed);
    calls(&mut breaker, ms(19_999), &[fail()]);
    assert_eq!(breaker.state(), Open);
}

#[test]
fn time_window_counts_every_call_within_its_span() {
    let mut breaker = Breaker::new(BreakerSettings {
        window: Window::Time(ms(9_500)),
        ..settings()
    });
    for at in [0, 2_000, 4_000, 6_000, 9_900] {
        calls(&mut breaker, ms(at), &[fail()]);
    }
    assert_eq!(breaker.state(), Open);
}

#[test]
fn time_window_tolerates_a_clock_stepping_back() {
    let mut breaker = Breaker::new(BreakerSettings {
        window: Window::Time(secs(10)),
        ..settings()
    });
    calls(&mut breaker, secs(50), &[fail(); 2]);
    calls(&mut breaker, secs(45), &[fail(); 3]);
    assert_eq!(breaker.state(), Open);
}

// === open ===

#[test]
fn rejects_while_open_with_time_until_half_open() {
    let mut breaker = opened_at(secs(10));
    assert_eq!(
        breaker.try_acquire(secs(25)),
        Err(Rejected { retry_in: secs(15) })
    );
    assert_eq!(
        breaker.try_acquire(ms(39_999)),
        Err(Rejected { retry_in: ms(1) })
    );
    assert_eq!(breaker.state(), Open);
}

#[test]
fn half_opens_after_open_for() {
    let mut breaker = opened_at(secs(10));
    let permit = breaker.try_acquire(secs(40)).expect("first trial");
    assert_eq!(permit.state(), HalfOpen);
    assert_eq!(breaker.state(), HalfOpen);
    assert_eq!(
        breaker.take_transitions(),
        [transition(Open, HalfOpen, secs(40), None)]
    );
}

#[test]
fn stays_open_until_the_next_acquire() {
    let breaker = opened_at(secs(10));
    // No call came in: the breaker does not move by itself.
    assert_eq!(breaker.state(), Open);
}

// === half-open ===

#[test]
fn half_open_permits_exactly_half_open_calls() {
    let (mut breaker, first) = half_open_at(secs(40));
    let second = breaker.try_acquire(secs(40)).expect("second trial");
    let third = breaker.try_acquire(secs(41)).expect("third trial");
    assert_eq!(
        breaker.try_acquire(secs(41)),
        Err(Rejected {
            retry_in: Duration::ZERO
        })
    );
    for permit in [first, second, third] {
        assert_eq!(permit.state(), HalfOpen);
    }
}

#[test]
fn closes_after_successful_trials() {
    let (mut breaker, first) = half_open_at(secs(40));
    breaker.record(first, secs(41), ok());
    calls(&mut breaker, secs(42), &[ok()]);
    assert_eq!(breaker.state(), HalfOpen);
    calls(&mut breaker, secs(43), &[ok()]);
    assert_eq!(breaker.state(), Closed);
    assert_eq!(
        breaker.take_transitions(),
        [transition(HalfOpen, Closed, secs(43), Some((0.0, 0.0)))]
    );
}

#[test]
fn closes_when_trials_stay_below_the_thresholds() {
    let (mut breaker, first) = half_open_at(secs(40));
    breaker.record(first, secs(41), fail());
    calls(&mut breaker, secs(42), &[ok(), ok()]);
    assert_eq!(breaker.state(), Closed);
}

#[test]
fn reopens_after_failed_trial() {
    let (mut breaker, first) = half_open_at(secs(40));
    breaker.record(first, secs(41), fail());
    calls(&mut breaker, secs(42), &[fail()]);
    // Two failures out of three trials is already over the rate, but all trials decide.
    assert_eq!(breaker.state(), HalfOpen);
    calls(&mut breaker, secs(43), &[ok()]);
    assert_eq!(breaker.state(), Open);
    let rates = breaker.take_transitions()[0];
    assert_eq!((rates.from, rates.to, rates.at), (HalfOpen, Open, secs(43)));
    assert!((rates.failure_rate.unwrap() - 2.0 / 3.0).abs() < 1e-12);
    // Open again for a full `open_for` from the reopening.
    assert_eq!(
        breaker.try_acquire(secs(72)),
        Err(Rejected { retry_in: secs(1) })
    );
    assert!(breaker.try_acquire(secs(73)).is_ok());
}

#[test]
fn reopens_after_slow_trials() {
    let (mut breaker, first) = half_open_at(secs(40));
    breaker.record(first, secs(45), Outcome::success(secs(5)));
    calls(&mut breaker, secs(46), &[Outcome::success(secs(5)); 2]);
    assert_eq!(breaker.state(), Open);
}

#[test]
fn release_frees_a_half_open_slot() {
    let (mut breaker, first) = half_open_at(secs(40));
    let second = breaker.try_acquire(secs(40)).expect("second trial");
    let third = breaker.try_acquire(secs(40)).expect("third trial");
    assert!(breaker.try_acquire(secs(40)).is_err());
    breaker.release(third);
    let replacement = breaker.try_acquire(secs(40)).expect("slot freed");
    for permit in [first, second, replacement] {
        breaker.record(permit, secs(41), ok());
    }
    assert_eq!(breaker.state(), Closed);
}

#[test]
fn release_of_a_closed_permit_changes_nothing() {
    let mut breaker = Breaker::new(settings());
    let permit = breaker.try_acquire(secs(1)).unwrap();
    breaker.release(permit);
    calls(&mut breaker, secs(1), &[fail(); 4]);
    assert_eq!(breaker.state(), Closed);
}

#[test]
fn late_record_from_previous_state_is_ignored() {
    let mut breaker = Breaker::new(settings());
    let slow_call = breaker.try_acquire(secs(1)).unwrap();
    calls(&mut breaker, secs(1), &[fail(); 5]);
    assert_eq!(breaker.state(), Open);
    let (first, second, third) = {
        let a = breaker.try_acquire(secs(31)).unwrap();
        let b = breaker.try_acquire(secs(31)).unwrap();
        let c = breaker.try_acquire(secs(31)).unwrap();
        (a, b, c)
    };
    // The call admitted while closed answers now, failed: it says nothing about the trials.
    breaker.record(slow_call, secs(32), fail());
    breaker.record(first, secs(32), ok());
    breaker.record(second, secs(32), ok());
    assert_eq!(breaker.state(), HalfOpen);
    breaker.record(third, secs(32), ok());
    assert_eq!(breaker.state(), Closed);
}

#[test]
fn closing_starts_a_fresh_window() {
    let mut breaker = Breaker::new(settings());
    calls(&mut breaker, secs(1), &[ok(), ok(), ok(), ok(), ok(), ok()]);
    calls(&mut breaker, secs(1), &[fail(); 4]);
    assert_eq!(breaker.state(), Closed);
    calls(&mut breaker, secs(1), &[fail()]);
    assert_eq!(breaker.state(), Open);
    calls(&mut breaker, secs(31), &[ok(); 3]);
    assert_eq!(breaker.state(), Closed);
    // The failures of before the trip are gone: min_calls must be reached again.
    calls(&mut breaker, secs(32), &[fail(); 4]);
    assert_eq!(breaker.state(), Closed);
}

#[test]
fn take_transitions_drains() {
    let mut breaker = opened_at(secs(1));
    assert!(breaker.take_transitions().is_empty());
    drop(breaker.try_acquire(secs(31)).unwrap());
    assert_eq!(breaker.take_transitions().len(), 1);
    assert!(breaker.take_transitions().is_empty());
}

#[test]
fn undrained_transitions_are_bounded() {
    let mut breaker = Breaker::new(BreakerSettings {
        half_open_calls: 1,
        ..settings()
    });
    calls(&mut breaker, secs(0), &[fail(); 5]);
    for n in 1..=100 {
        calls(&mut breaker, secs(30 * n), &[fail()]);
    }
    let transitions = breaker.take_transitions();
    assert_eq!(transitions.len(), 64);
    assert_eq!(transitions.last().unwrap().at, secs(3000));
}

#[test]
fn state_names_and_gauge_values_match_the_design() {
    assert_eq!(
        [Closed, HalfOpen, Open].map(|s| (s.as_str(), s.gauge())),
        [("closed", 0), ("half_open", 1), ("open", 2)]
    );
    assert_eq!(serde_json::to_string(&HalfOpen).unwrap(), "\"half_open\"");
    assert_eq!(HalfOpen.to_string(), "half_open");
}

#[test]
fn zero_sizes_are_raised_to_one() {
    let mut breaker = Breaker::new(BreakerSettings {
        window: Window::Count(0),
        min_calls: 0,
        half_open_calls: 0,
        ..settings()
    });
    calls(&mut breaker, secs(1), &[fail()]);
    assert_eq!(breaker.state(), Open);
    calls(&mut breaker, secs(31), &[ok()]);
    assert_eq!(breaker.state(), Closed);
}

#[test]
fn drives_with_a_manual_clock() {
    let clock = ManualClock::new();
    let mut breaker = Breaker::new(settings());
    for _ in 0..5 {
        clock.advance(secs(1));
        call(&mut breaker, clock.now(), fail()).unwrap();
    }
    clock.advance(secs(29));
    assert!(breaker.try_acquire(clock.now()).is_err());
    clock.advance(secs(1));
    assert!(breaker.try_acquire(clock.now()).is_ok());
}

// === properties ===

#[derive(Debug, Clone)]
enum Op {
    Advance(u64),
    Acquire,
    Record {
        pick: usize,
        success: bool,
        millis: u64,
    },
    Release {
        pick: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0u64..20_000).prop_map(Op::Advance),
        4 => Just(Op::Acquire),
        4 => (any::<usize>(), any::<bool>(), 0u64..3_000)
            .prop_map(|(pick, success, millis)| Op::Record { pick, success, millis }),
        1 => any::<usize>().prop_map(|pick| Op::Release { pick }),
    ]
}

fn any_settings() -> impl Strategy<Value = BreakerSettings> {
    (
        prop_oneof![
            (1u32..20).prop_map(Window::Count),
            (1u64..30).prop_map(|s| Window::Time(secs(s))),
        ],
        1u32..15,
        1u32..=100,
        1u32..=100,
        1u64..3,
        1u64..60,
        1u32..5,
    )
        .prop_map(
            |(window, min_calls, failure, slow, slow_call, open_for, half_open_calls)| {
                BreakerSettings {
                    window,
                    min_calls,
                    failure_rate: f64::from(failure) / 100.0,
                    slow_call_rate: f64::from(slow) / 100.0,
                    slow_call: secs(slow_call),
                    open_for: secs(open_for),
                    half_open_calls,
                }
            },
        )
}

fn legal(from: BreakerState, to: BreakerState) -> bool {
    matches!(
        (from, to),
        (Closed, Open) | (Open, HalfOpen) | (HalfOpen, Closed) | (HalfOpen, Open)
    )
}

proptest! {
    #[test]
    fn state_machine_keeps_its_invariants(settings in any_settings(), ops in proptest::collection::vec(op(), 1..300)) {
        let clock = ManualClock::new();
        let mut breaker = Breaker::new(settings);
        let mut outstanding: Vec<Permit> = Vec::new();
        let mut state = Closed;
        let mut opened_at = Duration::ZERO;
        for op in ops {
            let before = breaker.state();
            match op {
                Op::Advance(millis) => clock.advance(ms(millis)),
                Op::Acquire => match (breaker.would_admit(clock.now()), breaker.try_acquire(clock.now())) {
                    (admits, result) if admits != result.is_ok() => {
                        prop_assert!(false, "would_admit said {} before {:?}", admits, result.map(|_| ()));
                    }
                    (_, Ok(permit)) => {
                        prop_assert!(
                            before != Open || clock.now() >= opened_at + settings.open_for,
                            "permitted a call {:?} after opening", clock.now() - opened_at
                        );
                        prop_assert_ne!(breaker.state(), Open);
                        prop_assert_eq!(permit.state(), breaker.state());
                        outstanding.push(permit);
                    }
                    (_, Err(rejected)) => {
                        prop_assert_ne!(breaker.state(), Closed);
                        let expected = match breaker.state() {
                            Open => opened_at + settings.open_for - clock.now(),
                            Closed | HalfOpen => Duration::ZERO,
                        };
                        prop_assert_eq!(rejected.retry_in, expected);
                    }
                },
                Op::Record { pick, success, millis } if !outstanding.is_empty() => {
                    let permit = outstanding.swap_remove(pick % outstanding.len());
                    let outcome = Outcome { success, duration: ms(millis) };
                    breaker.record(permit, clock.now(), outcome);
                }
                Op::Release { pick } if !outstanding.is_empty() => {
                    let permit = outstanding.swap_remove(pick % outstanding.len());
                    breaker.release(permit);
                }
                Op::Record { .. } | Op::Release { .. } => {}
            }
            for t in breaker.take_transitions() {
                prop_assert_eq!(t.from, state);
                prop_assert!(legal(t.from, t.to), "{:?} -> {:?}", t.from, t.to);
                prop_assert_eq!(t.at, clock.now());
                prop_assert_eq!(t.failure_rate.is_some(), t.from != Open);
                if t.to == Open {
                    opened_at = t.at;
                }
                state = t.to;
            }
            prop_assert_eq!(breaker.state(), state);
            if let State::HalfOpen { issued, trials } = &breaker.state {
                let current = outstanding
                    .iter()
                    .filter(|p| p.generation == breaker.generation)
                    .count() as u64;
                prop_assert!(current <= u64::from(settings.half_open_calls));
                prop_assert!(*issued <= settings.half_open_calls);
                prop_assert_eq!(u64::from(*issued), current + trials.calls);
            }
        }
    }

    #[test]
    fn never_opens_with_only_fast_successes(settings in any_settings(), steps in proptest::collection::vec(0u64..5_000, 1..300)) {
        let mut breaker = Breaker::new(BreakerSettings { slow_call_rate: 1.0, ..settings });
        let mut now = Duration::ZERO;
        for step in steps {
            now += ms(step);
            call(&mut breaker, now, Outcome::success(settings.slow_call / 2)).unwrap();
            prop_assert_eq!(breaker.state(), Closed);
        }
    }

    #[test]
    fn is_open_after_min_calls_failures(settings in any_settings(), step in 0u64..60) {
        let mut breaker = Breaker::new(settings);
        let needed = breaker.settings().min_calls;
        let mut now = Duration::ZERO;
        for n in 1..=needed {
            prop_assert_eq!(breaker.state(), Closed, "opened after {} of {} failures", n - 1, needed);
            call(&mut breaker, now, Outcome::failure(FAST)).unwrap();
            now += ms(step);
        }
        prop_assert_eq!(breaker.state(), Open);
    }
}

#[test]
fn open_remaining_counts_down_without_changing_the_state() {
    let breaker = opened_at(secs(10));
    assert_eq!(breaker.open_remaining(secs(10)), Some(secs(30)));
    assert_eq!(breaker.open_remaining(secs(39)), Some(secs(1)));
    assert_eq!(
        breaker.open_remaining(secs(40)),
        None,
        "a trial would be let through"
    );
    assert_eq!(breaker.state(), Open, "asking changes nothing");
    assert_eq!(Breaker::new(settings()).open_remaining(secs(1)), None);
}
