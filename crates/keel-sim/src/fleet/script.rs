//! Task scripts: what each simulated task asks of its agent, generated from a seed.
//!
//! A script is a pure function of `(seed, index)`, so the same seed gives the same
//! tasks in the same order on every machine. A task needs `calls` model calls
//! (1 + Binomial(8, ½): mean 5, from 1 to 9); some calls are streamed; a few tasks
//! carry a *trap* that later guards learn to handle. A task is feasible unless its
//! trap says otherwise.

use serde::{Deserialize, Serialize};

/// What makes a task hard beyond faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trap {
    /// The goal cannot be met: the agent ends up failing it for good.
    Infeasible,
    /// The agent tends to repeat itself.
    LoopProne,
    /// The task tempts the agent into a risky action.
    RiskyAction,
}

/// One task of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskScript {
    /// Position in the run, from 0.
    pub index: u32,
    /// Model calls the task needs.
    pub calls: u32,
    /// Which calls are streamed (bit `j` for call `j`).
    pub streamed: u32,
    /// The task's trap, if any.
    pub trap: Option<Trap>,
}

/// Share of tasks that are infeasible, loop-prone and risky.
const TRAPS: [(Trap, f64); 3] = [
    (Trap::Infeasible, 0.02),
    (Trap::LoopProne, 0.03),
    (Trap::RiskyAction, 0.02),
];

/// Share of model calls that are streamed.
const STREAMED: f64 = 0.3;

// === impl TaskScript ===

impl TaskScript {
    /// Whether the task can succeed at all.
    pub fn feasible(&self) -> bool {
        self.trap != Some(Trap::Infeasible)
    }

    /// Whether call `call` is streamed.
    pub fn is_streamed(&self, call: u32) -> bool {
        call < 32 && self.streamed & (1 << call) != 0
    }

    /// The script of task `index` of the run seeded with `seed`.
    pub fn generate(seed: u64, index: u32) -> Self {
        let mut draw = Draws::new(seed, u64::from(index));
        let calls = 1 + (0..8).filter(|_| draw.next() & 1 == 1).count() as u32;
        let mut streamed = 0;
        for call in 0..calls {
            if draw.unit() < STREAMED {
                streamed |= 1 << call;
            }
        }
        let r = draw.unit();
        let mut edge = 0.0;
        let mut trap = None;
        for (t, share) in TRAPS {
            edge += share;
            if r < edge {
                trap = Some(t);
                break;
            }
        }
        Self {
            index,
            calls,
            streamed,
            trap,
        }
    }
}

/// The scripts of a run of `tasks` tasks.
pub fn generate(seed: u64, tasks: u32) -> Vec<TaskScript> {
    (0..tasks).map(|i| TaskScript::generate(seed, i)).collect()
}

/// A reproducible stream of pseudo-random numbers for one key (SplitMix64).
#[derive(Debug, Clone)]
pub(crate) struct Draws(u64);

impl Draws {
    /// The stream for `key` under `seed`.
    pub(crate) fn new(seed: u64, key: u64) -> Self {
        Self(mix64(seed ^ mix64(key.wrapping_add(0x9E37_79B9_7F4A_7C15))))
    }

    /// The next 64 random bits.
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// The next number in `[0, 1)`.
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// SplitMix64's finaliser: a bijective scramble of 64 bits.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_scripts() {
        assert_eq!(generate(7, 500), generate(7, 500));
    }

    #[test]
    fn another_seed_gives_other_scripts() {
        assert_ne!(generate(7, 500), generate(8, 500));
    }

    #[test]
    fn a_longer_run_starts_with_the_shorter_run_s_tasks() {
        assert_eq!(generate(3, 1000)[..100], generate(3, 100)[..]);
    }

    #[test]
    fn calls_average_about_five_and_stay_in_range() {
        let scripts = generate(42, 10_000);
        let mean = scripts.iter().map(|s| f64::from(s.calls)).sum::<f64>() / 10_000.0;
        assert!((4.9..5.1).contains(&mean), "mean {mean}");
        assert!(scripts.iter().all(|s| (1..=9).contains(&s.calls)));
    }

    #[test]
    fn traps_and_streams_come_in_their_shares() {
        let scripts = generate(42, 20_000);
        let share = |t| scripts.iter().filter(|s| s.trap == Some(t)).count() as f64 / 20_000.0;
        assert!((0.015..0.025).contains(&share(Trap::Infeasible)));
        assert!((0.025..0.035).contains(&share(Trap::LoopProne)));
        assert!((0.015..0.025).contains(&share(Trap::RiskyAction)));
        let calls: u32 = scripts.iter().map(|s| s.calls).sum();
        let streamed: u32 = scripts.iter().map(|s| s.streamed.count_ones()).sum();
        let share = f64::from(streamed) / f64::from(calls);
        assert!((0.28..0.32).contains(&share), "streamed share {share}");
        assert!(
            scripts
                .iter()
                .filter(|s| !s.feasible())
                .all(|s| s.trap == Some(Trap::Infeasible))
        );
    }
}
