//! Fault injection (`[chaos]` and the `x-keel-chaos` header): which attempt gets which fault.
//!
//! [`Chaos::decide`] is asked once per provider attempt, before the call, and answers with
//! the fault to inject, if any. Precedence: the request's `x-keel-chaos` header (for the
//! attempts it covers), then a scheduled outage in its window, then the `[[chaos.faults]]`
//! rules in file order (the first whose `match` fits and whose roll is under its `rate`).
//!
//! Decisions are reproducible: a rule's roll is a pure function of the seed, the rule's
//! index, the route, the target, the task (or the agent, for calls without a task) and a
//! counter of attempts for that (route, target, task-or-agent). So a task's faults do not
//! depend on how other tasks' calls interleave with its own, and the same seed over the
//! same calls gives the same faults. Without a configured seed a random one is drawn per
//! start of keel (and logged).
//!
//! This module decides; its `inject` submodule makes an attempt fail the way the decision says, and
//! the route executor records the fault (`llm_attempt_failed.injected`, `llm_call.chaos`,
//! `keel_chaos_injected_total`).

pub mod header;
pub(crate) mod inject;

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use keel_config::{ChaosSettings, Fault, FaultRule, Latency, Outage, OutageScope, OutageStart};
use parking_lot::Mutex;
use tokio::time::Instant;

pub use header::HeaderFault;

/// Distinct counters kept before the table is reset (so a long game day with many tasks
/// cannot grow it without bound; the reset happens at the same call in a repeated run).
const MAX_COUNTERS: usize = 100_000;

/// Salt of the roll that decides whether a rule fires.
const FIRE: u64 = 0x6669_7265;
/// Salt of the roll that picks a latency within a range.
const PICK: u64 = 0x7069_636b;
/// Rule index used for the header's own rolls (a latency range in the header).
const HEADER_RULE: u64 = u64::MAX;

/// The live `[chaos]` of an enabled config.
pub struct Chaos {
    seed: u64,
    rules: Vec<FaultRule>,
    outages: Vec<Outage>,
    started: Instant,
    counters: Mutex<HashMap<u64, u64>>,
}

/// What is known about one attempt when deciding its fault.
#[derive(Debug, Clone, Copy)]
pub struct AttemptInfo<'a> {
    /// Route name.
    pub route: &'a str,
    /// Target, `provider/model`.
    pub target: &'a str,
    /// Agent name.
    pub agent: &'a str,
    /// Task id, when the call has one.
    pub task: Option<&'a str>,
    /// 1-based number of this attempt within its call (over every target).
    pub call_attempt: u32,
}

/// Where an injected fault came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The request's `x-keel-chaos` header.
    Header,
    /// A `[[chaos.outages]]` window.
    Outage,
    /// A `[[chaos.faults]]` rule.
    Rule,
}

impl Source {
    /// The name recorded in `llm_call.chaos[].source`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Header => "header",
            Self::Outage => "outage",
            Self::Rule => "rule",
        }
    }
}

/// A decision to inject `fault` into one attempt. A latency range is already resolved to
/// a [`Latency::Fixed`] delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Injection {
    /// The fault.
    pub fault: Fault,
    /// Why.
    pub source: Source,
}

/// "Now" for outage windows: time since keel started and the wall clock.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// Since the [`Chaos`] was built (keel's start).
    pub since_start: Duration,
    /// Wall-clock time, for outages given as a UTC time.
    pub wall: SystemTime,
}

impl Chaos {
    /// The live chaos of `settings`, or `None` when `[chaos]` is not enabled.
    pub fn new(settings: &ChaosSettings) -> Option<Self> {
        if !settings.enabled {
            return None;
        }
        let seed = settings.seed.unwrap_or_else(rand::random);
        Some(Self {
            seed,
            rules: settings.faults.clone(),
            outages: settings.outages.clone(),
            started: Instant::now(),
            counters: Mutex::new(HashMap::new()),
        })
    }

    /// The seed in use (the configured one, or the one drawn at start).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The current time for outage windows.
    pub fn now(&self) -> Now {
        Now {
            since_start: self.started.elapsed(),
            wall: SystemTime::now(),
        }
    }

    /// The fault for one attempt, if any; see the module docs for precedence and rolls.
    pub fn decide(
        &self,
        attempt: &AttemptInfo<'_>,
        header: Option<&HeaderFault>,
        now: Now,
    ) -> Option<Injection> {
        let key = attempt.task.unwrap_or(attempt.agent);
        if let Some(h) = header.filter(|h| h.covers(attempt.call_attempt)) {
            let pick = roll(
                self.seed,
                HEADER_RULE,
                PICK,
                attempt,
                key,
                u64::from(attempt.call_attempt),
            );
            return Some(Injection {
                fault: resolve(h.fault, pick),
                source: Source::Header,
            });
        }
        if let Some(outage) = self
            .outages
            .iter()
            .find(|o| outage_hits(o, attempt) && outage_active(o, now))
        {
            return Some(Injection {
                fault: outage.fault,
                source: Source::Outage,
            });
        }
        if self.rules.is_empty() {
            return None;
        }
        let n = self.next_count(attempt, key);
        for (index, rule) in (0u64..).zip(&self.rules) {
            if !rule_matches(rule, attempt) {
                continue;
            }
            if roll(self.seed, index, FIRE, attempt, key, n) < rule.rate {
                let pick = roll(self.seed, index, PICK, attempt, key, n);
                return Some(Injection {
                    fault: resolve(rule.fault, pick),
                    source: Source::Rule,
                });
            }
        }
        None
    }

    /// The 0-based number of this attempt for its (route, target, task-or-agent).
    fn next_count(&self, attempt: &AttemptInfo<'_>, key: &str) -> u64 {
        let id = Fnv::new()
            .str(attempt.route)
            .str(attempt.target)
            .str(key)
            .finish();
        let mut counters = self.counters.lock();
        if counters.len() >= MAX_COUNTERS && !counters.contains_key(&id) {
            counters.clear();
        }
        let counter = counters.entry(id).or_insert(0);
        let n = *counter;
        *counter += 1;
        n
    }
}

fn rule_matches(rule: &FaultRule, a: &AttemptInfo<'_>) -> bool {
    let s = &rule.scope;
    s.route.as_deref().is_none_or(|r| r == a.route)
        && s.target.as_deref().is_none_or(|t| t == a.target)
        && s.agent.as_deref().is_none_or(|g| g == a.agent)
        && s.task.as_deref().is_none_or(|t| Some(t) == a.task)
}

fn outage_hits(outage: &Outage, a: &AttemptInfo<'_>) -> bool {
    match &outage.scope {
        OutageScope::Route(route) => route == a.route,
        OutageScope::Target(target) => target == a.target,
    }
}

/// Whether `now` is in `[start, start + duration)`.
pub(crate) fn outage_active(outage: &Outage, now: Now) -> bool {
    match outage.start {
        OutageStart::AfterStart(start) => {
            now.since_start >= start && now.since_start - start < outage.duration
        }
        OutageStart::At(start) => now
            .wall
            .duration_since(start)
            .is_ok_and(|into| into < outage.duration),
    }
}

/// A latency range becomes one delay, `pick` in [0, 1) placing it within the range.
fn resolve(fault: Fault, pick: f64) -> Fault {
    match fault {
        Fault::Latency(Latency::Uniform { min, max }) => {
            Fault::Latency(Latency::Fixed(min + (max - min).mul_f64(pick)))
        }
        other @ (Fault::Status { .. }
        | Fault::Latency(Latency::Fixed(_))
        | Fault::Hang
        | Fault::Drop
        | Fault::StreamCut { .. }
        | Fault::Malformed) => other,
    }
}

/// A uniform number in [0, 1), a pure function of its inputs.
fn roll(seed: u64, rule: u64, salt: u64, a: &AttemptInfo<'_>, key: &str, n: u64) -> f64 {
    let h = Fnv::new()
        .u64(seed)
        .u64(rule)
        .u64(salt)
        .str(a.route)
        .str(a.target)
        .str(key)
        .u64(n)
        .finish();
    // The top 53 bits, as f64 has 53 bits of mantissa.
    (mix(h) >> 11) as f64 / (1u64 << 53) as f64
}

/// FNV-1a, 64-bit: a stable hash (std's `DefaultHasher` may change between releases,
/// and a game day should replay the same on the next keel version).
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn bytes(mut self, bytes: &[u8]) -> Self {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        self
    }

    /// A string and its length, so ("ab", "c") and ("a", "bc") differ.
    fn str(self, s: &str) -> Self {
        self.u64(s.len() as u64).bytes(s.as_bytes())
    }

    fn u64(self, n: u64) -> Self {
        self.bytes(&n.to_le_bytes())
    }

    fn finish(self) -> u64 {
        self.0
    }
}

/// SplitMix64's finalizer: spreads FNV's weak low bits over the whole word.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests;
