//! Anomaly baselines: what is usual for one signal (a route's error rate, an agent's
//! trajectory length), learnt as it goes, and whether the newest values are far from it.
//!
//! What is judged and learnt is `m`, the median of the newest `recent` values: robust to
//! one outlier (a single very long task is not a trend, and does not inflate the spread).
//! The baseline of `m` is an exponentially weighted mean and variance (Finch, "Incremental
//! calculation of weighted mean and variance", 2009); each new `m` is learnt with weight `α`:
//!
//! ```text
//! δ  = m − μ
//! μ ← μ + α·δ
//! σ² ← (1 − α)·(σ² + α·δ²)
//! ```
//!
//! so the mean and spread follow the signal, and an old value's weight decays as
//! `(1 − α)^age` (with `α = 0.05`, a value 14 values old weighs half as much as the newest;
//! the first values are averaged plainly, `α = 1/n`, so the warm-up is not biased). The
//! distance of the newest `m` from the baseline, in standard deviations, is
//!
//! ```text
//! z = (m − μ) / max(σ, se, floor),    se = 1.2533²·dₓ / √recent,    floor = max(absolute, relative·|μ|)
//! (se = 1.2533·dₓ when recent is 1)
//! ```
//!
//! (`μ − m` when down is bad), judged against the baseline before `m` is learnt. The
//! floor keeps a perfectly steady signal (`σ = 0`) from calling every small wobble an
//! anomaly. `se` is the standard error of a median of `recent` values (`1.2533·σₓ/√recent`,
//! `σₓ` alone when `recent` is 1), with the values' own deviation `σₓ` estimated as
//! `1.2533·dₓ`, `dₓ` being the weighted mean distance of each value from the median of the
//! `recent` values before it (learnt with the same weights; a lasting change moves that
//! median along, so it does not count as spread; each distance is clipped at four
//! deviations, so that one very long task does not blunt the judgement of the next ones). Medians of overlapping
//! windows move together, so `σ`, learnt from them, is often far too small in a calm
//! stretch, and a chance run of long tasks then read as an anomaly: a fleet whose tasks take
//! 1 + Binomial(8, ½) steps raised 354 false anomalies in 120,000 tasks without `se`,
//! 20 with it, while trajectories that double are still raised within a few tasks. After `warmup` learnt values, `z ≥ k` raises the anomaly (`k` = `sigmas`); it
//! clears when `z` falls below `k / 2` (hysteresis, so that a value near the threshold does
//! not flap).
//!
//! While a signal is anomalous its values are learnt at `α / 4`: a spike barely moves the
//! baseline, and a lasting change still becomes the new normal, over about `4 / α` values;
//! that is how the threshold moves with the baseline.

use std::collections::VecDeque;

/// The weight of the newest value in the baseline.
pub const ALPHA: f64 = 0.05;

/// Which way is bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Values above the baseline (error rate, latency, trajectory length, spend).
    Up,
    /// Values below it (confidence).
    Down,
}

/// The least standard deviation a baseline is judged with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Floor {
    /// In the signal's unit.
    pub absolute: f64,
    /// As a share of the baseline's mean.
    pub relative: f64,
}

/// How a baseline judges.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BaselineSettings {
    /// Values learnt before it judges.
    pub warmup: u64,
    /// Standard deviations from the baseline that raise an anomaly.
    pub sigmas: f64,
    /// Newest values whose median is judged.
    pub recent: usize,
    /// Which way is bad.
    pub direction: Direction,
    /// The least standard deviation used.
    pub floor: Floor,
}

/// What one value changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Nothing: still usual, or still anomalous.
    Same,
    /// The signal just became anomalous.
    Raised,
    /// The signal is usual again.
    Cleared,
}

/// The judgement after one value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Judgement {
    /// What changed.
    pub change: Change,
    /// Whether the signal is anomalous now.
    pub anomalous: bool,
    /// The median of the newest values.
    pub recent: f64,
    /// The baseline's mean before this value.
    pub mean: f64,
    /// The baseline's standard deviation before this value (floor not applied).
    pub sd: f64,
    /// The distance in standard deviations (signed; positive is the bad direction). 0
    /// while warming up.
    pub z: f64,
    /// Medians learnt so far, this one included.
    pub learnt: u64,
}

/// One signal's baseline.
#[derive(Debug, Clone)]
pub struct Baseline {
    settings: BaselineSettings,
    mean: f64,
    var: f64,
    /// The values' own weighted mean absolute distance from `mean` (`dₓ`), for `se`.
    value_mad: f64,
    learnt: u64,
    recent: VecDeque<f64>,
    anomalous: bool,
}

impl Baseline {
    /// An empty baseline.
    pub fn new(settings: BaselineSettings) -> Self {
        Self {
            settings,
            mean: 0.0,
            var: 0.0,
            value_mad: 0.0,
            learnt: 0,
            recent: VecDeque::with_capacity(settings.recent.max(1)),
            anomalous: false,
        }
    }

    /// Whether the signal is anomalous now.
    pub fn anomalous(&self) -> bool {
        self.anomalous
    }

    /// Judges the median of the newest values, `x` included, against the baseline, then
    /// learns it.
    pub fn observe(&mut self, x: f64) -> Judgement {
        let s = self.settings;
        // How far `x` is from what came just before it, for `dₓ`.
        let distance = if self.recent.is_empty() {
            0.0
        } else {
            (x - median(&self.recent)).abs()
        };
        if self.recent.len() >= s.recent.max(1) {
            self.recent.pop_front();
        }
        self.recent.push_back(x);
        let recent = median(&self.recent);
        let (mean, sd) = (self.mean, self.var.max(0.0).sqrt());
        let judged = self.learnt >= s.warmup && self.recent.len() >= s.recent.max(1);
        let z = if judged {
            let floor = self.floor(mean);
            let n = s.recent.max(1);
            let value_sd = MEDIAN_EFFICIENCY * self.value_mad;
            let se = if n == 1 {
                value_sd
            } else {
                MEDIAN_EFFICIENCY * value_sd / (n as f64).sqrt()
            };
            let spread = sd.max(se).max(floor);
            let distance = match s.direction {
                Direction::Up => recent - mean,
                Direction::Down => mean - recent,
            };
            if spread > 0.0 { distance / spread } else { 0.0 }
        } else {
            0.0
        };
        let was = self.anomalous;
        self.anomalous = judged
            && if was {
                z >= s.sigmas / 2.0
            } else {
                z >= s.sigmas
            };
        let alpha = if self.anomalous { ALPHA / 4.0 } else { ALPHA };
        self.learn(recent, distance, alpha);
        Judgement {
            change: match (was, self.anomalous) {
                (false, true) => Change::Raised,
                (true, false) => Change::Cleared,
                _ => Change::Same,
            },
            anomalous: self.anomalous,
            recent,
            mean,
            sd,
            z,
            learnt: self.learnt,
        }
    }

    /// The least standard deviation judged with, around `mean`.
    fn floor(&self, mean: f64) -> f64 {
        let floor = self.settings.floor;
        floor.absolute.max(floor.relative * mean.abs())
    }

    /// Learns the median `m`, and `distance`, that of the value from the median before it.
    fn learn(&mut self, m: f64, distance: f64, alpha: f64) {
        if self.learnt == 0 {
            (self.mean, self.var, self.value_mad) = (m, 0.0, 0.0);
        } else {
            // The first values weigh more, so that the warm-up is a plain average.
            let alpha = alpha.max(1.0 / (self.learnt as f64 + 1.0));
            let delta = m - self.mean;
            self.mean += alpha * delta;
            self.var = (1.0 - alpha) * (self.var + alpha * delta * delta);
            // One very long task is clipped to a few deviations, so that it does not blunt
            // the judgement of the tasks after it.
            let most = 4.0 * (MEDIAN_EFFICIENCY * self.value_mad).max(self.floor(self.mean));
            self.value_mad += alpha * (distance.min(most) - self.value_mad);
        }
        self.learnt += 1;
    }
}

/// √(π/2), for values spread normally: the standard error of a median of n values is about
/// this times that of their mean, and the standard deviation this times the mean absolute
/// deviation.
const MEDIAN_EFFICIENCY: f64 = 1.253_314_137_315_500_3;

fn median(values: &VecDeque<f64>) -> f64 {
    let mut sorted: Vec<f64> = values.iter().copied().collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => f64::midpoint(sorted[n / 2 - 1], sorted[n / 2]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn steps() -> BaselineSettings {
        BaselineSettings {
            warmup: 20,
            sigmas: 3.0,
            recent: 5,
            direction: Direction::Up,
            floor: Floor {
                absolute: 0.5,
                relative: 0.1,
            },
        }
    }

    /// 4, 5, 6, 5, 4, 5, 6, …: an agent whose tasks take about 5 steps.
    fn usual(i: usize) -> f64 {
        [4.0, 5.0, 6.0, 5.0][i % 4]
    }

    #[test]
    fn doubled_trajectories_raise_and_clear_when_they_return() {
        let mut b = Baseline::new(steps());
        for i in 0..40 {
            assert_eq!(
                b.observe(usual(i)).change,
                Change::Same,
                "warming up at {i}"
            );
        }
        // One long task is not a trend: the median of the last five does not move.
        assert!(!b.observe(30.0).anomalous);
        for i in 0..4 {
            assert!(!b.observe(usual(i)).anomalous);
        }
        // Trajectories double: raised by the third such task (the median flips).
        let mut raised_at = None;
        for i in 0..5 {
            let j = b.observe(2.0 * usual(i));
            if j.change == Change::Raised {
                raised_at = Some(i);
                assert!(j.z >= 3.0, "{j:?}");
            }
        }
        assert_eq!(raised_at, Some(2));
        // Back to usual: cleared once the median is back.
        let mut cleared_at = None;
        for i in 0..5 {
            if b.observe(usual(i)).change == Change::Cleared {
                cleared_at = Some(i);
            }
        }
        assert!(
            matches!(cleared_at, Some(2 | 3)),
            "cleared once the median is usual again (6, then 5): {cleared_at:?}"
        );
    }

    /// Tasks of 1 + Binomial(8, ½) steps, as `keel sim` runs them: noise, not anomalies.
    fn fleet_steps(rng: &mut rand::rngs::SmallRng) -> f64 {
        use rand::Rng;
        f64::from(1 + (0..8).filter(|_| rng.random_bool(0.5)).count() as u32)
    }

    #[test]
    fn chance_runs_of_long_tasks_are_seldom_an_anomaly_and_a_doubling_is_one() {
        use rand::SeedableRng;
        let mut raised = 0;
        for seed in 0..5 {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
            let mut b = Baseline::new(steps());
            for _ in 0..6000 {
                raised += usize::from(b.observe(fleet_steps(&mut rng)).change == Change::Raised);
            }
        }
        // Judged with the deviation of the medians alone, this raised about 18 false
        // anomalies per 6,000 tasks (the demo's dashboard flapped).
        assert!(raised <= 5 * 6, "{raised} false anomalies in 30,000 tasks");
        // The same fleet whose trajectories double is raised within a few tasks.
        for seed in 0..5 {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
            let mut b = Baseline::new(steps());
            for _ in 0..1000 {
                b.observe(fleet_steps(&mut rng));
            }
            let first = (0..20).find(|_| b.observe(2.0 * fleet_steps(&mut rng)).anomalous);
            assert!(first.is_some_and(|n| n < 10), "seed {seed}: {first:?}");
        }
    }

    #[test]
    fn a_very_long_task_in_the_warm_up_does_not_blunt_the_judgement() {
        let mut b = Baseline::new(steps());
        for i in 0..40 {
            b.observe(if i == 5 { 300.0 } else { usual(i) });
        }
        let raised = (0..5).find(|&i| b.observe(2.0 * usual(i)).change == Change::Raised);
        assert_eq!(raised, Some(2), "raised by the third doubled task");
    }

    #[test]
    fn a_lasting_change_becomes_the_new_normal() {
        let mut b = Baseline::new(steps());
        for i in 0..40 {
            b.observe(usual(i));
        }
        let mut cleared = None;
        for i in 0..400 {
            let j = b.observe(2.0 * usual(i));
            if j.change == Change::Cleared {
                cleared = Some(i);
                break;
            }
        }
        let cleared = cleared.expect("the doubled length became the baseline");
        assert!(cleared > 20, "not too soon: {cleared}");
    }

    #[test]
    fn a_drop_is_judged_when_down_is_bad() {
        let mut b = Baseline::new(BaselineSettings {
            direction: Direction::Down,
            floor: Floor {
                absolute: 0.05,
                relative: 0.0,
            },
            ..steps()
        });
        for i in 0..30 {
            b.observe(0.9 + 0.02 * (i % 3) as f64);
        }
        assert!(!b.observe(0.99).anomalous, "higher confidence is fine");
        let raised = (0..5).any(|_| b.observe(0.5).change == Change::Raised);
        assert!(raised, "confidence fell from 0.9 to 0.5");
    }

    proptest! {
        #[test]
        fn a_steady_signal_is_never_an_anomaly(value in -1e6f64..1e6, n in 1usize..200) {
            let mut b = Baseline::new(steps());
            for _ in 0..n {
                let j = b.observe(value);
                prop_assert!(!j.anomalous, "a constant {} was judged anomalous: {:?}", value, j);
            }
        }

        #[test]
        fn noise_within_the_floor_is_never_an_anomaly(noise in proptest::collection::vec(-0.2f64..0.2, 1..300)) {
            // Medians within ±0.2 of 5, and so the mean: z at most 0.4 / 0.5 (the floor).
            let mut b = Baseline::new(steps());
            for e in noise {
                let j = b.observe(5.0 + e);
                prop_assert!(!j.anomalous, "{:?}", j);
            }
        }
    }
}
