//! The fleet's fault policy, installed in the simulated model server.
//!
//! Every model request of a run carries its task and call in the last message
//! (`sim task <i> call <j>`); the injector counts the requests it has seen for each
//! `(task, call, model)` and draws the request's fault from
//! `(seed, task, call, model, that count)`. The fault schedule is therefore a
//! function of the seed and of what keel sends upstream, not of timing: keel's
//! retry of a failed call is a new request and gets a fresh draw. Outages are the
//! exception: they are windows of wall-clock time since the run started.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::Value;
use tokio::time::Instant;

use super::mix::FaultMix;
use super::script::{Draws, mix64};
use crate::{Fault, Injector};

/// How long a hung call stays silent: far past any attempt timeout, short enough
/// not to pile up for the life of a long run.
pub const HANG: Duration = Duration::from_secs(120);

/// The added latency of a `slow` call when the mix does not say.
const DEFAULT_SLOW: Duration = Duration::from_secs(2);

/// Chunks a cut stream delivers before the connection is aborted.
const CUT_AFTER_CHUNKS: u32 = 2;

/// A fault kind as reports name it.
pub mod kind {
    /// 500, 502 or 503.
    pub const ERROR_5XX: &str = "error_5xx";
    /// 429 with `Retry-After`.
    pub const RATE_LIMITED: &str = "rate_limited";
    /// A call that hangs.
    pub const HANG: &str = "hang";
    /// A stream cut mid-way.
    pub const STREAM_CUT: &str = "stream_cut";
    /// A connection dropped before the answer.
    pub const DROP: &str = "drop";
    /// A 200 whose body is not JSON.
    pub const MALFORMED: &str = "malformed";
    /// A normal answer after an added latency.
    pub const SLOW: &str = "slow";
    /// A call answered 503 during an outage window.
    pub const OUTAGE: &str = "outage";
    /// An agent that died mid-task.
    pub const AGENT_KILLED: &str = "agent_killed";
    /// keel killed with `kill -9`.
    pub const KEEL_KILL9: &str = "keel_kill9";
}

/// The fleet's [`Injector`]: the mix's rates and outages, drawn from the seed.
#[derive(Debug)]
pub struct FleetInjector {
    seed: u64,
    mix: FaultMix,
    latency: HashMap<String, Duration>,
    started: Instant,
    seen: Mutex<HashMap<(u32, u32, String), u32>>,
    injected: Mutex<BTreeMap<&'static str, u64>>,
}

/// What the injector decides for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The report's name for the fault, `None` for a normal answer.
    pub kind: Option<&'static str>,
    /// The fault to apply (a normal answer still has its model's latency).
    pub fault: Option<Fault>,
}

// === impl FleetInjector ===

impl FleetInjector {
    /// An injector for `mix` under `seed`; `latency` is each model's normal answer time
    /// (models not listed answer at once). Outage windows count from now.
    pub fn new(seed: u64, mix: FaultMix, latency: HashMap<String, Duration>) -> Self {
        Self {
            seed,
            mix,
            latency,
            started: Instant::now(),
            seen: Mutex::default(),
            injected: Mutex::default(),
        }
    }

    /// Faults injected so far, by kind.
    pub fn injected(&self) -> BTreeMap<&'static str, u64> {
        self.injected.lock().clone()
    }

    /// Counts a fault that happened outside the model server (agent deaths, keel kills).
    pub fn count(&self, kind: &'static str) {
        *self.injected.lock().entry(kind).or_default() += 1;
    }

    /// The decision for the `nth` request (from 0) of `call` of `task` to `model`,
    /// `elapsed` after the start. Pure: the same arguments give the same decision.
    pub fn decide(
        &self,
        model: &str,
        task: u32,
        call: u32,
        nth: u32,
        streamed: bool,
        elapsed: Duration,
    ) -> Decision {
        let latency = self.latency_of(model, task, call, nth);
        if self.mix.outage_at(model, elapsed).is_some() {
            return Decision {
                kind: Some(kind::OUTAGE),
                fault: Some(Fault::status(503).with_delay(latency)),
            };
        }
        let key = u64::from(task) << 32 | u64::from(call) << 16 | u64::from(nth.min(0xFFFF));
        let mut draw = Draws::new(self.seed ^ mix64(name_hash(model)), key);
        let r = draw.unit();
        let pick = draw.next();
        let c = &self.mix.calls;
        let mut edge = c.error_5xx;
        if r < edge {
            let status = [500, 502, 503][(pick % 3) as usize];
            return Decision {
                kind: Some(kind::ERROR_5XX),
                fault: Some(Fault::status(status).with_delay(latency)),
            };
        }
        edge += c.rate_limited;
        if r < edge {
            let secs = c.retry_after.map_or(1, |d| d.as_secs().max(1));
            return Decision {
                kind: Some(kind::RATE_LIMITED),
                fault: Some(Fault::status(429).with_retry_after(secs.to_string())),
            };
        }
        edge += c.hang;
        if r < edge {
            return Decision {
                kind: Some(kind::HANG),
                fault: Some(Fault::delay(HANG)),
            };
        }
        edge += c.stream_cut;
        if r < edge {
            // Only streams can be cut mid-way; other calls answer normally.
            if streamed {
                return Decision {
                    kind: Some(kind::STREAM_CUT),
                    fault: Some(Fault::cut_after(CUT_AFTER_CHUNKS).with_delay(latency)),
                };
            }
        } else if r < edge + c.drop {
            return Decision {
                kind: Some(kind::DROP),
                fault: Some(Fault::drop_connection().with_delay(latency)),
            };
        } else if r < edge + c.drop + c.malformed {
            return Decision {
                kind: Some(kind::MALFORMED),
                fault: Some(Fault::malformed().with_delay(latency)),
            };
        } else if r < edge + c.drop + c.malformed + c.slow {
            let slow = c.slow_latency.unwrap_or(DEFAULT_SLOW);
            return Decision {
                kind: Some(kind::SLOW),
                fault: Some(Fault::delay(latency + slow)),
            };
        }
        Decision {
            kind: None,
            fault: (!latency.is_zero()).then(|| Fault::delay(latency)),
        }
    }

    /// The model's latency, ±25% drawn per request.
    fn latency_of(&self, model: &str, task: u32, call: u32, nth: u32) -> Duration {
        let Some(base) = self.latency.get(model) else {
            return Duration::ZERO;
        };
        let key = u64::from(task) << 32 | u64::from(call) << 16 | u64::from(nth.min(0xFFFF));
        let spread = Draws::new(self.seed ^ 0x004C_4154_454E_4359, key).unit();
        base.mul_f64(0.75 + spread * 0.5)
    }
}

impl Injector for FleetInjector {
    fn fault_for(&self, model: &str, request: &Value) -> Option<Fault> {
        let Some((task, call)) = task_call(request) else {
            return self.latency.get(model).map(|d| Fault::delay(*d));
        };
        let nth = {
            let mut seen = self.seen.lock();
            let n = seen.entry((task, call, model.to_owned())).or_default();
            let nth = *n;
            *n += 1;
            nth
        };
        let streamed = request.get("stream") == Some(&Value::Bool(true));
        let decision = self.decide(model, task, call, nth, streamed, self.started.elapsed());
        if let Some(kind) = decision.kind {
            self.count(kind);
        }
        decision.fault
    }
}

/// The text of the message a fleet agent sends for `call` of `task`.
pub fn call_message(task: u32, call: u32) -> String {
    format!("sim task {task} call {call}")
}

/// `(task, call)` from the last message of a fleet agent's request.
fn task_call(request: &Value) -> Option<(u32, u32)> {
    let last = request.get("messages")?.as_array()?.last()?;
    let text = last.get("content")?.as_str()?;
    let rest = text.strip_prefix("sim task ")?;
    let (task, rest) = rest.split_once(" call ")?;
    Some((task.parse().ok()?, rest.trim().parse().ok()?))
}

/// FNV-1a of a name, to give each model its own draws.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn injector(seed: u64) -> FleetInjector {
        FleetInjector::new(seed, FaultMix::standard().unwrap(), HashMap::new())
    }

    #[test]
    fn the_same_seed_gives_the_same_fault_schedule() {
        let (a, b) = (injector(9), injector(9));
        let t = Duration::ZERO;
        for task in 0..300 {
            for call in 0..5 {
                for nth in 0..3 {
                    assert_eq!(
                        a.decide("large", task, call, nth, call % 2 == 0, t),
                        b.decide("large", task, call, nth, call % 2 == 0, t)
                    );
                }
            }
        }
        let c = injector(10);
        let differs = (0..300).any(|task| {
            a.decide("large", task, 0, 0, true, t) != c.decide("large", task, 0, 0, true, t)
        });
        assert!(differs);
    }

    #[test]
    fn fault_shares_follow_the_mix() {
        let inj = injector(42);
        let mut counts: HashMap<&str, u32> = HashMap::new();
        let n = 200_000u32;
        for i in 0..n {
            if let Some(k) = inj.decide("small", i, i % 7, 0, true, Duration::ZERO).kind {
                *counts.entry(k).or_default() += 1;
            }
        }
        let share = |k| f64::from(counts.get(k).copied().unwrap_or(0)) / f64::from(n);
        assert!(
            (0.047..0.053).contains(&share(kind::ERROR_5XX)),
            "{counts:?}"
        );
        assert!(
            (0.018..0.022).contains(&share(kind::RATE_LIMITED)),
            "{counts:?}"
        );
        assert!((0.008..0.012).contains(&share(kind::HANG)), "{counts:?}");
        assert!(
            (0.004..0.006).contains(&share(kind::STREAM_CUT)),
            "{counts:?}"
        );
    }

    #[test]
    fn drop_malformed_and_slow_come_in_their_shares() {
        let mix = FaultMix::parse(
            "[calls]\ndrop = 0.02\nmalformed = 0.03\nslow = 0.05\nslow_latency = \"1s\"\n",
            "t",
        )
        .unwrap();
        let inj = FleetInjector::new(3, mix, HashMap::new());
        let mut counts: HashMap<&str, u32> = HashMap::new();
        let n = 100_000u32;
        for i in 0..n {
            let d = inj.decide("m", i, 0, 0, false, Duration::ZERO);
            if let Some(k) = d.kind {
                *counts.entry(k).or_default() += 1;
                let fault = d.fault.unwrap();
                match k {
                    kind::DROP => assert!(fault.drop_connection),
                    kind::MALFORMED => assert!(fault.malformed),
                    kind::SLOW => assert_eq!(fault.delay, Some(Duration::from_secs(1))),
                    other => panic!("unexpected {other}"),
                }
            }
        }
        let share = |k| f64::from(counts.get(k).copied().unwrap_or(0)) / f64::from(n);
        assert!((0.017..0.023).contains(&share(kind::DROP)), "{counts:?}");
        assert!(
            (0.026..0.034).contains(&share(kind::MALFORMED)),
            "{counts:?}"
        );
        assert!((0.045..0.055).contains(&share(kind::SLOW)), "{counts:?}");
    }

    #[test]
    fn a_retry_of_the_same_call_gets_a_fresh_draw() {
        let inj = injector(1);
        let faulted: Vec<u32> = (0..2000)
            .filter(|&t| {
                inj.decide("small", t, 0, 0, false, Duration::ZERO)
                    .kind
                    .is_some()
            })
            .collect();
        let again = faulted
            .iter()
            .filter(|&&t| {
                inj.decide("small", t, 0, 1, false, Duration::ZERO)
                    .kind
                    .is_some()
            })
            .count();
        assert!(again * 4 < faulted.len(), "{again} of {}", faulted.len());
    }

    #[test]
    fn the_outage_window_answers_503_to_its_model_only() {
        let inj = injector(1);
        let during = Duration::from_secs(6);
        let d = inj.decide("large", 1, 0, 0, false, during);
        assert_eq!(d.kind, Some(kind::OUTAGE));
        assert_eq!(d.fault.unwrap().status, Some(503));
        assert_ne!(
            inj.decide("small", 1, 0, 0, false, during).kind,
            Some(kind::OUTAGE)
        );
    }

    #[test]
    fn requests_are_matched_by_their_last_message_and_counted() {
        let inj = injector(1);
        let body = json!({"model": "large", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": call_message(12, 3)},
        ]});
        assert_eq!(task_call(&body), Some((12, 3)));
        for _ in 0..3 {
            let _ = inj.fault_for("large", &body);
        }
        assert_eq!(inj.seen.lock().get(&(12, 3, "large".to_owned())), Some(&3));
        assert_eq!(
            task_call(&json!({"messages": [{"role": "user", "content": "hi"}]})),
            None
        );
    }
}
