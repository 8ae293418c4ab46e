use std::time::Duration;

use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::SmallRng;

use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn rng(seed: u64) -> SmallRng {
    SmallRng::seed_from_u64(seed)
}

/// `min(cap, base·2^n)` computed the slow, obviously-correct way.
fn reference(base: Duration, cap: Duration, retry: u32) -> Duration {
    let mut v = base;
    for _ in 0..retry {
        v = v.saturating_mul(2);
        if v >= cap {
            return cap;
        }
    }
    v.min(cap)
}

#[test]
fn no_jitter_doubles_until_cap() {
    let mut backoff = Backoff::new(ms(100), ms(1000), Jitter::None);
    let mut rng = rng(1);
    let delays: Vec<_> = (0..6).map(|n| backoff.delay(n, &mut rng)).collect();
    assert_eq!(
        delays,
        [ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]
    );
}

#[test]
fn huge_retry_numbers_saturate_at_cap() {
    let mut rng = rng(2);
    for jitter in [Jitter::None, Jitter::Equal] {
        let mut backoff = Backoff::new(Duration::MAX / 4, Duration::MAX, jitter);
        let d = backoff.delay(u32::MAX, &mut rng);
        assert!(d >= Duration::MAX / 2, "{jitter:?}: {d:?}");
    }
    let mut backoff = Backoff::new(Duration::from_nanos(1), ms(10), Jitter::None);
    for retry in [31, 32, 63, 64, 127, 128, 1000, u32::MAX] {
        assert_eq!(backoff.delay(retry, &mut rng), ms(10), "retry {retry}");
    }
}

#[test]
fn tiny_base_is_not_capped_early() {
    // 1ns · 2^32 ≈ 4.3s is below a 10s cap; a u32 multiplier would have saturated here.
    let mut backoff = Backoff::new(
        Duration::from_nanos(1),
        Duration::from_secs(10),
        Jitter::None,
    );
    assert_eq!(
        backoff.delay(32, &mut rng(3)),
        Duration::from_nanos(1 << 32)
    );
}

#[test]
fn full_jitter_spreads_over_zero_to_v() {
    let mut backoff = Backoff::new(ms(100), ms(10_000), Jitter::Full);
    let mut rng = rng(4);
    let delays: Vec<_> = (0..2000).map(|_| backoff.delay(3, &mut rng)).collect();
    assert!(delays.iter().all(|d| *d <= ms(800)));
    assert!(delays.iter().any(|d| *d < ms(100)));
    assert!(delays.iter().any(|d| *d > ms(700)));
    let mean = delays.iter().sum::<Duration>() / 2000;
    assert!(mean > ms(360) && mean < ms(440), "mean {mean:?}");
}

#[test]
fn equal_jitter_keeps_at_least_half() {
    let mut backoff = Backoff::new(ms(100), ms(10_000), Jitter::Equal);
    let mut rng = rng(5);
    let delays: Vec<_> = (0..2000).map(|_| backoff.delay(2, &mut rng)).collect();
    assert!(delays.iter().all(|d| *d >= ms(200) && *d <= ms(400)));
    assert!(delays.iter().any(|d| *d < ms(250)));
    assert!(delays.iter().any(|d| *d > ms(350)));
}

#[test]
fn decorrelated_grows_from_base_and_restarts_at_retry_zero() {
    let base = ms(10);
    let mut backoff = Backoff::new(base, ms(1000), Jitter::Decorrelated);
    let mut rng = rng(6);
    let first = backoff.delay(0, &mut rng);
    assert!(first >= base && first <= ms(30), "{first:?}");
    let mut prev = first;
    for retry in 1..20 {
        let d = backoff.delay(retry, &mut rng);
        assert!(
            d >= base && d <= (prev * 3).min(ms(1000)),
            "{d:?} after {prev:?}"
        );
        prev = d;
    }
    // A new sequence starts from `base` again, whatever the previous sequence reached.
    let restarted = backoff.delay(0, &mut rng);
    assert!(restarted <= ms(30), "{restarted:?}");
}

#[test]
fn decorrelated_with_base_above_cap_returns_cap() {
    let mut backoff = Backoff::new(ms(500), ms(100), Jitter::Decorrelated);
    let mut rng = rng(7);
    for retry in 0..5 {
        assert_eq!(backoff.delay(retry, &mut rng), ms(100));
    }
}

#[test]
fn zero_base_gives_zero_delays() {
    let mut rng = rng(8);
    for jitter in [
        Jitter::None,
        Jitter::Full,
        Jitter::Equal,
        Jitter::Decorrelated,
    ] {
        let mut backoff = Backoff::new(Duration::ZERO, ms(100), jitter);
        assert_eq!(backoff.delay(5, &mut rng), Duration::ZERO, "{jitter:?}");
    }
}

#[test]
fn same_seed_gives_same_delays() {
    let run = |seed| {
        let mut backoff = Backoff::new(ms(5), ms(2000), Jitter::Decorrelated);
        let mut rng = rng(seed);
        (0..10)
            .map(|n| backoff.delay(n, &mut rng))
            .collect::<Vec<_>>()
    };
    assert_eq!(run(9), run(9));
    assert_ne!(run(9), run(10));
}

#[test]
fn retry_after_is_honoured_up_to_cap() {
    assert_eq!(retry_after_delay(ms(300), ms(1000)), ms(300));
    assert_eq!(retry_after_delay(ms(30_000), ms(1000)), ms(1000));
}

#[test]
fn jitter_names_match_serde() {
    for jitter in [
        Jitter::None,
        Jitter::Full,
        Jitter::Equal,
        Jitter::Decorrelated,
    ] {
        let json = serde_json::to_string(&jitter).unwrap();
        assert_eq!(json, format!("\"{}\"", jitter.as_str()));
        assert_eq!(serde_json::from_str::<Jitter>(&json).unwrap(), jitter);
    }
    assert_eq!(Jitter::default(), Jitter::Full);
}

fn any_jitter() -> impl Strategy<Value = Jitter> {
    prop_oneof![
        Just(Jitter::None),
        Just(Jitter::Full),
        Just(Jitter::Equal),
        Just(Jitter::Decorrelated),
    ]
}

proptest! {
    #[test]
    fn delay_never_exceeds_cap(
        base_ns in 0u64..=10_000_000_000,
        cap_ns in 0u64..=100_000_000_000,
        jitter in any_jitter(),
        retries in proptest::collection::vec(0u32..=300, 1..30),
        seed in any::<u64>(),
    ) {
        let cap = Duration::from_nanos(cap_ns);
        let mut backoff = Backoff::new(Duration::from_nanos(base_ns), cap, jitter);
        let mut rng = rng(seed);
        for retry in retries {
            prop_assert!(backoff.delay(retry, &mut rng) <= cap);
        }
    }

    #[test]
    fn none_and_equal_respect_their_lower_bounds(
        base_ns in 0u64..=10_000_000_000,
        cap_ns in 0u64..=100_000_000_000,
        retry in 0u32..=200,
        seed in any::<u64>(),
    ) {
        let (base, cap) = (Duration::from_nanos(base_ns), Duration::from_nanos(cap_ns));
        let v = reference(base, cap, retry);
        let mut rng = rng(seed);
        prop_assert_eq!(Backoff::new(base, cap, Jitter::None).delay(retry, &mut rng), v);
        let equal = Backoff::new(base, cap, Jitter::Equal).delay(retry, &mut rng);
        prop_assert!(equal >= v / 2 && equal <= v, "{:?} not in [{:?}, {:?}]", equal, v / 2, v);
    }

    #[test]
    fn decorrelated_never_goes_below_base(
        base_ns in 0u64..=1_000_000_000,
        extra_ns in 0u64..=100_000_000_000,
        retries in proptest::collection::vec(0u32..=50, 1..50),
        seed in any::<u64>(),
    ) {
        let base = Duration::from_nanos(base_ns);
        let cap = base + Duration::from_nanos(extra_ns);
        let mut backoff = Backoff::new(base, cap, Jitter::Decorrelated);
        let mut rng = rng(seed);
        for retry in retries {
            let d = backoff.delay(retry, &mut rng);
            prop_assert!(d >= base && d <= cap);
        }
    }
}
