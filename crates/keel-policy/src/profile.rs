//! Histogram profiles: what values of a numeric tool argument are usual, and whether a
//! new one is far outside them ("delete 1,000 rows when it usually deletes 5").
//!
//! A [`Profile`] is a DDSketch (the `sketches-ddsketch` crate, relative error 1%) of the
//! magnitudes seen: constant size whatever the number of values, mergeable (nodes and
//! restarts add up), and serializable (the store keeps it). [`Profile::judge`] compares a
//! value with `quantile(q) × factor` once `warmup` values have been seen; until then
//! everything is usual, because a profile of three values knows nothing yet.
//!
//! Magnitudes (`|v|`) are profiled: a value of -1,000 is as far from the usual 5 as 1,000.

use serde::{Deserialize, Serialize};
use sketches_ddsketch::{Config, DDSketch};

/// When a value is an outlier.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProfileRule {
    /// Values the profile must have seen before it judges anything.
    pub warmup: u64,
    /// The quantile of the usual values the threshold starts from, in (0, 1].
    pub quantile: f64,
    /// How far beyond that quantile a value may go: the threshold is `quantile × factor`.
    pub factor: f64,
}

impl Default for ProfileRule {
    /// 20 values of warm-up; outlier beyond 3 × the 99th percentile.
    fn default() -> Self {
        Self {
            warmup: 20,
            quantile: 0.99,
            factor: 3.0,
        }
    }
}

/// The distribution of one argument's values, as a DDSketch.
#[derive(Clone, Serialize, Deserialize)]
pub struct Profile {
    sketch: DDSketch,
}

impl std::fmt::Debug for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Profile")
            .field("summary", &self.summary())
            .finish()
    }
}

impl Default for Profile {
    fn default() -> Self {
        Self::new()
    }
}

/// A profile's shape in a few numbers, for an approver or an operator.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Values seen.
    pub count: u64,
    /// Smallest magnitude seen.
    pub min: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest magnitude seen.
    pub max: f64,
}

/// What a profile says of a value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Judgement {
    /// Fewer than `warmup` values seen: no verdict yet.
    Learning {
        /// Values seen so far.
        seen: u64,
    },
    /// At or below the threshold.
    Usual {
        /// `quantile × factor`.
        threshold: f64,
    },
    /// Beyond the threshold.
    Outlier {
        /// `quantile × factor`.
        threshold: f64,
        /// The configured quantile of the values seen.
        quantile_value: f64,
    },
}

impl Profile {
    /// An empty profile (relative error 1%).
    pub fn new() -> Self {
        Self {
            sketch: DDSketch::new(Config::defaults()),
        }
    }

    /// Adds one value; a value that is not a finite number is ignored.
    pub fn observe(&mut self, value: f64) {
        if value.is_finite() {
            self.sketch.add(value.abs());
        }
    }

    /// Adds everything `other` has seen.
    pub fn merge(&mut self, other: &Self) {
        // Both use `Config::defaults()`, so the merge cannot be refused.
        if let Err(e) = self.sketch.merge(&other.sketch) {
            debug_assert!(false, "profiles with different configs: {e}");
        }
    }

    /// Values seen.
    pub fn count(&self) -> u64 {
        self.sketch.count() as u64
    }

    /// The `q` quantile of the magnitudes seen (`None` while empty or for a bad `q`).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        self.sketch.quantile(q).ok().flatten()
    }

    /// Count, min, p50, p90, p99 and max; `None` while empty.
    pub fn summary(&self) -> Option<Summary> {
        Some(Summary {
            count: self.count(),
            min: self.sketch.min()?,
            p50: self.quantile(0.5)?,
            p90: self.quantile(0.9)?,
            p99: self.quantile(0.99)?,
            max: self.sketch.max()?,
        })
    }

    /// Judges `value` against the profile under `rule`.
    pub fn judge(&self, value: f64, rule: &ProfileRule) -> Judgement {
        let seen = self.count();
        let Some(quantile_value) = self.quantile(rule.quantile).filter(|_| seen >= rule.warmup)
        else {
            return Judgement::Learning { seen };
        };
        let threshold = quantile_value * rule.factor;
        // A value that is not a number cannot be placed; the caller's rules decide.
        if value.is_finite() && value.abs() > threshold {
            Judgement::Outlier {
                threshold,
                quantile_value,
            }
        } else {
            Judgement::Usual { threshold }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn learned(values: impl IntoIterator<Item = f64>) -> Profile {
        let mut p = Profile::new();
        values.into_iter().for_each(|v| p.observe(v));
        p
    }

    #[test]
    fn usually_five_rows_stops_a_thousand() {
        // The seed's example: an agent that deletes about 5 rows (3 to 8) each time.
        let p = learned((0..40).map(|i| f64::from(3 + i % 6)));
        let rule = ProfileRule::default();
        match p.judge(1000.0, &rule) {
            Judgement::Outlier {
                threshold,
                quantile_value,
            } => {
                assert!((7.9..=8.1).contains(&quantile_value), "{quantile_value}");
                assert!((23.0..=25.0).contains(&threshold), "{threshold}");
            }
            other => panic!("1000 rows should be an outlier, got {other:?}"),
        }
        assert!(matches!(p.judge(6.0, &rule), Judgement::Usual { .. }));
        assert!(matches!(p.judge(-1000.0, &rule), Judgement::Outlier { .. }));
    }

    #[test]
    fn no_verdict_during_warmup() {
        let p = learned([5.0; 19]);
        let rule = ProfileRule::default();
        assert_eq!(p.judge(1e9, &rule), Judgement::Learning { seen: 19 });
        let p = learned([5.0; 20]);
        assert!(matches!(p.judge(1e9, &rule), Judgement::Outlier { .. }));
    }

    #[test]
    fn survives_a_round_trip_and_merges() {
        let a = learned((1..=50).map(f64::from));
        let text = serde_json::to_string(&a).unwrap();
        let back: Profile = serde_json::from_str(&text).unwrap();
        assert_eq!(back.summary(), a.summary());
        let mut merged = back;
        merged.merge(&learned((51..=100).map(f64::from)));
        assert_eq!(merged.count(), 100);
        let p50 = merged.quantile(0.5).unwrap();
        assert!((49.0..=51.5).contains(&p50), "{p50}");
        let s = merged.summary().unwrap();
        assert_eq!((s.min, s.max), (1.0, 100.0));
    }

    #[test]
    fn ignores_what_is_not_a_number() {
        let p = learned([f64::NAN, f64::INFINITY, 4.0]);
        assert_eq!(p.count(), 1);
    }

    proptest! {
        /// Whatever was learned, a value no larger than the largest seen is never an
        /// outlier when the quantile is 1 and the factor at least 1.02 (the sketch's 1%
        /// relative error, twice), and a value far above the threshold always is.
        #[test]
        fn threshold_is_monotone(values in proptest::collection::vec(0.001f64..1e6, 20..200), factor in 1.02f64..10.0) {
            let p = learned(values.iter().copied());
            let rule = ProfileRule { warmup: 20, quantile: 1.0, factor };
            let max = values.iter().copied().fold(0.0, f64::max);
            let judged = p.judge(max, &rule);
            prop_assert!(matches!(judged, Judgement::Usual { .. }), "max {} judged {:?}", max, judged);
            let far = max * factor * 1.1;
            let judged = p.judge(far, &rule);
            prop_assert!(matches!(judged, Judgement::Outlier { .. }), "far {} judged {:?}", far, judged);
        }
    }
}
