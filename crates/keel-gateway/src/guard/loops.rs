//! The loop guard on model outputs: a task whose answers keep coming back nearly the same
//! is going round in circles, and every further call burns money for nothing.
//!
//! Each answer of a task (its text, and the names and arguments of the tools it calls) is
//! reduced to a MinHash signature of its word 3-shingles ([`SIGNATURE`] minimum hashes; the
//! share of equal positions in two signatures estimates the Jaccard similarity of the two
//! shingle sets, within about ±0.04). Two answers are near-identical at an estimated
//! similarity of [`SIMILAR`] or more: a repeat, a repeat with other case or punctuation, or a
//! long answer with a word or two changed. One changed word in a 20-word answer (similarity
//! 0.71) is not near-identical: short templated answers ("step 3 done", "step 4 done") are
//! progress. When [`REPEATS`] of a task's last [`WINDOW`] answers are near-identical to the
//! newest, the task loops. Answers of fewer than [`MIN_WORDS`] words are not judged.
//!
//! A task found looping is stopped: keel records `loop_detected`, hands the task to a
//! person, and refuses the task's further model calls until that person lets it go on.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use parking_lot::Mutex;

/// Answers of a task compared with each other.
pub const WINDOW: usize = 6;
/// Near-identical answers in the window (the newest included) that make a loop.
pub const REPEATS: usize = 3;
/// Estimated Jaccard similarity from which two answers are near-identical.
pub const SIMILAR: f64 = 0.85;
/// Answers shorter than this (in words) are not judged.
pub const MIN_WORDS: usize = 8;
/// Minimum hashes in a signature.
pub const SIGNATURE: usize = 128;
/// Tasks remembered at once; the longest idle is forgotten first.
const MAX_TASKS: usize = 10_000;

/// One answer's MinHash signature.
pub type Signature = Box<[u32; SIGNATURE]>;

/// 64-bit FNV-1a of a shingle, lowercased: a fixed hash (the std hasher is seeded per
/// process).
fn fnv1a(words: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, w) in words.iter().enumerate() {
        if i > 0 {
            h ^= u64::from(b' ');
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        for b in w.bytes() {
            h ^= u64::from(b.to_ascii_lowercase());
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// splitmix64's finaliser: spreads the bits of `x` over the whole word.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The MinHash signature of `text` over its word 3-shingles; `None` below [`MIN_WORDS`]
/// words. The `i`-th hash of a shingle is `mix(h1 + i·h2)` (double hashing), so each
/// shingle is hashed once.
pub fn signature(text: &str) -> Option<Signature> {
    let words: Vec<&str> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    if words.len() < MIN_WORDS {
        return None;
    }
    let mut sig = Box::new([u32::MAX; SIGNATURE]);
    for shingle in words.windows(3) {
        let h = fnv1a(shingle);
        let (h1, h2) = (mix(h), mix(h ^ 0x9e37_79b9_7f4a_7c15) | 1);
        for (i, slot) in sig.iter_mut().enumerate() {
            let v = (mix(h1.wrapping_add((i as u64).wrapping_mul(h2))) >> 32) as u32;
            if v < *slot {
                *slot = v;
            }
        }
    }
    Some(sig)
}

/// The estimated Jaccard similarity of the shingle sets behind two signatures.
pub fn similarity(a: &[u32; SIGNATURE], b: &[u32; SIGNATURE]) -> f64 {
    let equal = a.iter().zip(b.iter()).filter(|(x, y)| x == y).count();
    equal as f64 / SIGNATURE as f64
}

/// What of a chat completion the guard compares: the first choice's text and the names
/// and arguments of the tools it calls. `None` for a body that is not a chat completion.
pub fn answer_text(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Completion {
        choices: Vec<Choice>,
    }
    #[derive(serde::Deserialize)]
    struct Choice {
        message: Message,
    }
    #[derive(serde::Deserialize)]
    struct Message {
        #[serde(default)]
        content: Option<String>,
        #[serde(default)]
        tool_calls: Vec<ToolCall>,
    }
    #[derive(serde::Deserialize)]
    struct ToolCall {
        function: Function,
    }
    #[derive(serde::Deserialize)]
    struct Function {
        name: String,
        #[serde(default)]
        arguments: String,
    }
    let completion: Completion = serde_json::from_slice(body).ok()?;
    let message = completion.choices.into_iter().next()?.message;
    let mut text = message.content.unwrap_or_default();
    for call in message.tool_calls {
        text.push(' ');
        text.push_str(&call.function.name);
        text.push(' ');
        text.push_str(&call.function.arguments);
    }
    Some(text)
}

/// A loop found in a task's answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    /// Near-identical answers among the last [`WINDOW`] (bouncing: in both tasks).
    pub similar: usize,
    /// Answers compared.
    pub window: usize,
    /// The other task, when two tasks bounce the same content between them.
    pub with: Option<String>,
}

/// A task the guard stopped, and the handoff that may let it go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stopped {
    /// Why, in words.
    pub reason: String,
    /// The approval (handoff) a person decides on; `None` when the task could not be
    /// handed off (keel's supervisor does not know it).
    pub approval: Option<String>,
}

/// The span over which a task's token burn is summed.
pub const BURN_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Default)]
struct TaskState {
    answers: VecDeque<Signature>,
    /// Tokens spent, when, over the last [`BURN_WINDOW`].
    spent: VecDeque<(Instant, u64)>,
    stopped: Option<Stopped>,
    seen: Option<Instant>,
}

/// Recent answers per task, and the tasks stopped.
#[derive(Default)]
pub struct LoopGuard {
    tasks: Mutex<HashMap<String, TaskState>>,
    /// Every task's answers of the last [`BOUNCE_WINDOW`] (at most [`MAX_RECENT`]).
    recent: Mutex<VecDeque<(String, Signature, Instant)>>,
}

/// How far back answers of other tasks are compared for bouncing.
pub const BOUNCE_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
/// Answers of all tasks kept for the bouncing check.
const MAX_RECENT: usize = 512;

impl LoopGuard {
    /// Adds an answer of `task`; a loop when it completes one.
    pub fn observe(&self, task: &str, answer: &str) -> Option<Detected> {
        let sig = signature(answer)?;
        let mut tasks = self.tasks.lock();
        if tasks.len() >= MAX_TASKS && !tasks.contains_key(task) {
            let idlest = tasks
                .iter()
                .min_by_key(|(_, s)| s.seen)
                .map(|(k, _)| k.clone());
            if let Some(k) = idlest {
                tasks.remove(&k);
            }
        }
        let now = Instant::now();
        let state = tasks.entry(task.to_owned()).or_default();
        state.seen = Some(now);
        let similar = 1 + state
            .answers
            .iter()
            .filter(|earlier| similarity(earlier, &sig) >= SIMILAR)
            .count();
        if state.answers.len() + 1 >= WINDOW {
            state.answers.pop_front();
        }
        state.answers.push_back(sig.clone());
        let window = state.answers.len();
        drop(tasks);
        if similar >= REPEATS {
            return Some(Detected {
                similar,
                window,
                with: None,
            });
        }
        self.bouncing(task, sig, now)
    }

    /// Two tasks bouncing the same content: this answer is near-identical to at least one
    /// earlier answer of this task and two of exactly one other task within
    /// [`BOUNCE_WINDOW`]. Content that three or more tasks share is a common phrase, not a
    /// bounce.
    fn bouncing(&self, task: &str, sig: Signature, now: Instant) -> Option<Detected> {
        let mut recent = self.recent.lock();
        while recent.len() >= MAX_RECENT
            || recent
                .front()
                .is_some_and(|(_, _, at)| now.saturating_duration_since(*at) > BOUNCE_WINDOW)
        {
            recent.pop_front();
        }
        let mut mine = 1;
        let mut others: HashMap<&str, usize> = HashMap::new();
        for (t, s, _) in recent.iter() {
            if similarity(s, &sig) >= SIMILAR {
                if t == task {
                    mine += 1;
                } else {
                    *others.entry(t.as_str()).or_default() += 1;
                }
            }
        }
        let found = match (others.len(), others.iter().next()) {
            (1, Some((other, &theirs))) if mine >= 2 && theirs >= 2 => Some(Detected {
                similar: mine + theirs,
                window: recent.len() + 1,
                with: Some((*other).to_owned()),
            }),
            _ => None,
        };
        recent.push_back((task.to_owned(), sig, now));
        found
    }

    /// Adds `tokens` that `task` spent at `now`; the tokens of the last [`BURN_WINDOW`]
    /// when they exceed `limit`.
    pub fn burn(&self, task: &str, tokens: u64, now: Instant, limit: u64) -> Option<u64> {
        let mut tasks = self.tasks.lock();
        let state = tasks.entry(task.to_owned()).or_default();
        state.seen = Some(now);
        state.spent.push_back((now, tokens));
        while state
            .spent
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > BURN_WINDOW)
        {
            state.spent.pop_front();
        }
        let burnt: u64 = state.spent.iter().map(|(_, t)| t).sum();
        (burnt > limit).then_some(burnt)
    }

    /// Marks `task` stopped.
    pub fn stop(&self, task: &str, stopped: Stopped) {
        let mut tasks = self.tasks.lock();
        let state = tasks.entry(task.to_owned()).or_default();
        state.seen = Some(Instant::now());
        state.stopped = Some(stopped);
    }

    /// Why `task` is stopped, if it is.
    pub fn stopped(&self, task: &str) -> Option<Stopped> {
        self.tasks.lock().get(task)?.stopped.clone()
    }

    /// Lets `task` go on, with a fresh window (a person looked at it).
    pub fn release(&self, task: &str) {
        self.tasks.lock().remove(task);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAN: &str = "I will search the knowledge base for the refund policy and then reply to the customer with the answer";

    fn sim(a: &str, b: &str) -> f64 {
        similarity(&signature(a).unwrap(), &signature(b).unwrap())
    }

    /// A long answer: `n` distinct words, then `tail`.
    fn long(n: usize, tail: &str) -> String {
        let words: Vec<String> = (0..n).map(|i| format!("w{i}")).collect();
        format!("{} {tail}", words.join(" "))
    }

    #[test]
    fn similarity_tracks_the_share_of_shared_shingles() {
        assert_eq!(sim(PLAN, PLAN), 1.0);
        assert_eq!(
            sim(PLAN, &PLAN.to_uppercase().replace(' ', "  ")),
            1.0,
            "case and spacing do not count"
        );
        // One word of 20 changed: 15 of 21 shingles shared (0.71): not near-identical.
        let one_word = sim(PLAN, &PLAN.replace("customer", "client"));
        assert!((0.6..0.82).contains(&one_word), "{one_word}");
        // One word of 100 changed: 95 of 101 (0.94): near-identical.
        let long_one_word = sim(&long(100, "alpha"), &long(100, "beta"));
        assert!(long_one_word >= SIMILAR, "{long_one_word}");
        let unrelated = sim(
            PLAN,
            "The weather in Paris is sunny today with a light breeze from the west and no rain expected",
        );
        assert!(unrelated < 0.1, "{unrelated}");
        assert!(signature("OK, done.").is_none(), "too short to judge");
    }

    #[test]
    fn the_third_repeat_in_the_window_is_a_loop() {
        let guard = LoopGuard::default();
        assert_eq!(guard.observe("t", PLAN), None);
        assert_eq!(
            guard.observe(
                "t",
                "Here is a completely different answer about shipping times to Canada and Mexico"
            ),
            None
        );
        assert_eq!(guard.observe("t", &PLAN.to_lowercase()), None);
        assert_eq!(guard.observe("other", PLAN), None, "tasks are apart");
        let found = guard.observe("t", PLAN).unwrap();
        assert_eq!(
            found,
            Detected {
                similar: 3,
                window: 4,
                with: None,
            }
        );
    }

    #[test]
    fn templated_progress_is_not_a_loop() {
        let guard = LoopGuard::default();
        for i in 0..30 {
            let answer =
                format!("sim reply to: sim task 12 call {i} of the plan, step {i} is done now");
            assert_eq!(guard.observe("t", &answer), None, "{answer}");
        }
        for i in 0..30 {
            let answer = format!(
                "Step {i}: I read chapter {i} of the manual and it explains part {i} of the setup"
            );
            assert_eq!(guard.observe("u", &answer), None, "{answer}");
        }
    }

    #[test]
    fn a_window_forgets_old_answers() {
        let guard = LoopGuard::default();
        assert_eq!(guard.observe("t", PLAN), None);
        assert_eq!(guard.observe("t", PLAN), None);
        for i in 0..WINDOW {
            let distinct: Vec<String> = (0..10).map(|k| format!("x{i}y{k}")).collect();
            assert_eq!(guard.observe("t", &distinct.join(" ")), None);
        }
        assert_eq!(
            guard.observe("t", PLAN),
            None,
            "the two early ones are out of the window"
        );
        assert!(guard.observe("t", PLAN).is_none());
        assert!(guard.observe("t", PLAN).is_some());
    }

    #[test]
    fn a_task_burning_tokens_too_fast_is_caught_and_old_spend_ages_out() {
        let guard = LoopGuard::default();
        let t0 = Instant::now();
        assert_eq!(guard.burn("t", 400, t0, 1000), None);
        assert_eq!(
            guard.burn("t", 500, t0 + std::time::Duration::from_secs(30), 1000),
            None
        );
        assert_eq!(guard.burn("u", 2000, t0, 5000), None, "tasks are apart");
        assert_eq!(
            guard.burn("t", 200, t0 + std::time::Duration::from_secs(50), 1000),
            Some(1100)
        );
        // Two minutes later the early spend has aged out.
        assert_eq!(
            guard.burn("t", 200, t0 + std::time::Duration::from_secs(200), 1000),
            None
        );
    }

    #[test]
    fn two_tasks_bouncing_one_answer_are_caught_but_a_common_phrase_is_not() {
        let guard = LoopGuard::default();
        let other =
            "Here is a completely different answer about shipping times to Canada and Mexico";
        assert_eq!(guard.observe("a", PLAN), None);
        assert_eq!(guard.observe("b", PLAN), None);
        assert_eq!(guard.observe("a", other), None);
        assert_eq!(guard.observe("a", PLAN), None, "a has it twice, b once");
        let found = guard.observe("b", PLAN).unwrap();
        assert_eq!(found.with.as_deref(), Some("a"));
        assert_eq!(found.similar, 4);

        // The same answer from three tasks is a phrase they share, not a bounce.
        let guard = LoopGuard::default();
        for task in ["x", "y", "z", "x", "y"] {
            assert_eq!(guard.observe(task, PLAN), None, "{task}");
        }
    }

    #[test]
    fn a_stopped_task_stays_stopped_until_released() {
        let guard = LoopGuard::default();
        guard.stop(
            "t",
            Stopped {
                reason: "loop".into(),
                approval: Some("apr_1".into()),
            },
        );
        assert_eq!(
            guard.stopped("t").unwrap().approval.as_deref(),
            Some("apr_1")
        );
        guard.release("t");
        assert_eq!(guard.stopped("t"), None);
    }
}
