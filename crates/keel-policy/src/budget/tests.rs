use std::time::Duration;

use proptest::prelude::*;

use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[test]
fn empty_budget_without_floor_allows_no_retry() {
    let mut budget = RetryBudget::new(secs(1), 0, 1.0);
    assert!(!budget.withdraw(Duration::ZERO));
}

#[test]
fn floor_allows_min_per_sec_times_ttl() {
    let mut budget = RetryBudget::new(secs(2), 5, 0.0);
    let allowed = (0..20).filter(|_| budget.withdraw(ms(100))).count();
    assert_eq!(allowed, 10);
}

#[test]
fn ratio_allows_one_retry_per_five_calls() {
    let mut budget = RetryBudget::new(secs(10), 0, 0.2);
    for _ in 0..25 {
        budget.deposit(secs(1));
    }
    let allowed = (0..10).filter(|_| budget.withdraw(secs(1))).count();
    assert_eq!(allowed, 5);
}

#[test]
fn ratio_above_one_allows_several_retries_per_call() {
    let mut budget = RetryBudget::new(secs(10), 0, 2.5);
    budget.deposit(secs(1));
    budget.deposit(secs(1));
    let allowed = (0..10).filter(|_| budget.withdraw(secs(1))).count();
    assert_eq!(allowed, 5);
}

#[test]
fn deposits_expire_after_ttl() {
    let mut budget = RetryBudget::new(secs(1), 0, 1.0);
    budget.deposit(Duration::ZERO);
    assert!(!budget.withdraw(secs(3)));
}

#[test]
fn deposits_still_count_just_inside_the_window() {
    let mut budget = RetryBudget::new(secs(1), 0, 0.5);
    budget.deposit(Duration::ZERO);
    budget.deposit(Duration::ZERO);
    assert!(budget.withdraw(ms(899)));
    assert!(!budget.withdraw(ms(899)));
}

#[test]
fn window_slides_so_older_deposits_drop_out() {
    let mut budget = RetryBudget::new(secs(1), 0, 0.5);
    budget.deposit(ms(3000));
    budget.deposit(ms(3300));
    budget.deposit(ms(4100));
    // At 4.1 s the first deposit has expired; the other two fund one retry.
    assert!(budget.withdraw(ms(4100)));
    assert!(!budget.withdraw(ms(4100)));
}

#[test]
fn withdrawals_are_repaid_as_the_window_slides() {
    let mut budget = RetryBudget::new(secs(1), 3, 0.0);
    assert_eq!(
        (0..5).filter(|_| budget.withdraw(Duration::ZERO)).count(),
        3
    );
    assert!(!budget.withdraw(ms(900)));
    assert_eq!((0..5).filter(|_| budget.withdraw(ms(1200))).count(), 3);
}

#[test]
fn retry_storm_is_capped_at_ratio_of_traffic() {
    // 1000 calls per second, each failing and asking for up to 3 retries.
    let mut budget = RetryBudget::new(secs(10), 10, 0.2);
    let mut retries = 0u64;
    for tick in 0..60_000 {
        let now = ms(tick);
        budget.deposit(now);
        retries += (0..3).filter(|_| budget.withdraw(now)).count() as u64;
    }
    // 60 s of traffic: at most 20 % of 60 000 calls plus the floor of each window.
    assert!(retries <= 12_000 + 6 * 100, "{retries}");
    assert!(retries >= 11_000, "{retries}");
}

#[test]
fn invalid_ratio_counts_as_zero() {
    for ratio in [f64::NAN, -1.0, f64::NEG_INFINITY] {
        let mut budget = RetryBudget::new(secs(1), 0, ratio);
        budget.deposit(Duration::ZERO);
        assert!(!budget.withdraw(Duration::ZERO), "{ratio}");
    }
}

#[test]
fn clock_stepping_back_does_not_resurrect_expired_deposits() {
    let mut budget = RetryBudget::new(secs(1), 0, 1.0);
    budget.deposit(Duration::ZERO);
    assert!(!budget.withdraw(secs(5)));
    assert!(!budget.withdraw(Duration::ZERO));
}

#[test]
fn default_is_ten_seconds_ten_per_second_twenty_percent() {
    let mut budget = RetryBudget::default();
    assert_eq!((0..150).filter(|_| budget.withdraw(secs(1))).count(), 100);
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Deposit,
    Withdraw,
}

fn ops() -> impl Strategy<Value = Vec<(u64, Op)>> {
    proptest::collection::vec(
        (
            prop_oneof![3 => 0u64..5, 1 => 0u64..400, 1 => 0u64..3_000],
            prop_oneof![Just(Op::Deposit), Just(Op::Withdraw)],
        ),
        1..400,
    )
}

/// What `replay` saw: when each event happened, in the order it happened.
#[derive(Debug, Clone, Copy)]
enum Event {
    Deposit(Duration),
    Withdraw(Duration, bool),
}

/// Runs `ops`, each advancing time by its milliseconds first.
fn replay(budget: &mut RetryBudget, ops: &[(u64, Op)]) -> Vec<Event> {
    let mut now = Duration::ZERO;
    let mut log = Vec::new();
    for &(step, op) in ops {
        now += ms(step);
        log.push(match op {
            Op::Deposit => {
                budget.deposit(now);
                Event::Deposit(now)
            }
            Op::Withdraw => Event::Withdraw(now, budget.withdraw(now)),
        });
    }
    log
}

/// Deposits and granted withdrawals among `events` at times in `(from, to]`; no lower
/// bound when `from` is `None`.
fn counts(events: &[Event], from: Option<Duration>, to: Duration) -> (f64, f64) {
    let inside = |t: Duration| t <= to && from.is_none_or(|from| t > from);
    let mut deposits = 0.0;
    let mut granted = 0.0;
    for event in events {
        match *event {
            Event::Deposit(t) if inside(t) => deposits += 1.0,
            Event::Withdraw(t, true) if inside(t) => granted += 1.0,
            Event::Deposit(_) | Event::Withdraw(..) => {}
        }
    }
    (deposits, granted)
}

proptest! {
    /// Retry storms stay bounded: at every granted retry, the retries of the last `ttl` are at
    /// most the floor plus `ratio` times the calls of the last `ttl` (+1 for rounding).
    #[test]
    fn withdrawals_never_exceed_floor_plus_ratio_of_deposits(
        ttl_ms in 100u64..5_000,
        min_per_sec in 0u32..5,
        ratio_pct in 0u32..300,
        ops in ops(),
    ) {
        let ttl = ms(ttl_ms);
        let ratio = f64::from(ratio_pct) / 100.0;
        let mut budget = RetryBudget::new(ttl, min_per_sec, ratio);
        let log = replay(&mut budget, &ops);
        let floor = (f64::from(min_per_sec) * ttl.as_secs_f64()).floor();
        for (i, event) in log.iter().enumerate() {
            let Event::Withdraw(t, true) = *event else { continue };
            let (calls, spent) = counts(&log[..=i], t.checked_sub(ttl), t);
            prop_assert!(
                spent <= floor + ratio * calls + 1.0,
                "at {:?}: {} retries for {} calls (floor {})", t, spent, calls, floor
            );
        }
    }

    /// The budget is not stingier than its bucketing requires: a retry is refused only when
    /// the retries of the last `ttl` plus one bucket already use up what the calls of the
    /// last `ttl` minus one bucket earned.
    #[test]
    fn withdrawal_is_refused_only_when_the_window_is_spent(
        ttl_ms in 100u64..5_000,
        min_per_sec in 0u32..5,
        ratio_pct in 0u32..300,
        ops in ops(),
    ) {
        let ttl = ms(ttl_ms);
        let bucket = ttl / 10;
        let ratio = f64::from(ratio_pct) / 100.0;
        let mut budget = RetryBudget::new(ttl, min_per_sec, ratio);
        let log = replay(&mut budget, &ops);
        let floor = (f64::from(min_per_sec) * ttl.as_secs_f64()).floor();
        for (i, event) in log.iter().enumerate() {
            let Event::Withdraw(t, false) = *event else { continue };
            let (_, spent) = counts(&log[..i], t.checked_sub(ttl + bucket), t);
            // `[t - (ttl - bucket), t]`, closed: widen the open lower bound by a nanosecond.
            let recent = t.checked_sub(ttl - bucket + Duration::from_nanos(1));
            let (calls, _) = counts(&log[..i], recent, t);
            prop_assert!(
                spent + 1.0 > floor + ratio * calls - 1e-6,
                "refused at {:?} with {} retries for {} calls (floor {})", t, spent, calls, floor
            );
        }
    }
}
