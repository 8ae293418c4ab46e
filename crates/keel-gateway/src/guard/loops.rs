//! The loop guard on model outputs: a task whose answers keep coming back nearly the same
//! is going round in circles, and every further call burns money for nothing.
//!
//! Each answer of a task (its text, and the names and arguments of the tools it calls) is
//! reduced to a 64-bit SimHash over word 3-shingles (Charikar's similarity hash: texts that
//! share most shingles get hashes a few bits apart). When, among the task's last
//! [`WINDOW`] answers, [`REPEATS`] lie within [`MAX_DISTANCE`] bits of each other, the
//! task loops. Answers of fewer than [`MIN_WORDS`] words are not judged: "OK" may
//! legitimately come back every time.
//!
//! A task found looping is stopped: keel records `loop_detected`, hands the task to a
//! person, and refuses the task's further model calls until that person lets it go on.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use parking_lot::Mutex;

/// Answers of a task compared with each other.
pub const WINDOW: usize = 6;
/// Near-identical answers in the window that make a loop.
pub const REPEATS: usize = 3;
/// Bits (of 64) two SimHashes may differ by and still be "the same answer": one changed
/// word in a 20-word answer moves about 11 bits; unrelated texts differ by about 32 ± 4.
pub const MAX_DISTANCE: u32 = 14;
/// Answers shorter than this (in words) are not judged.
pub const MIN_WORDS: usize = 8;
/// Tasks remembered at once; the longest idle is forgotten first.
const MAX_TASKS: usize = 50_000;

/// 64-bit FNV-1a: a fixed, fast hash for shingles (the std hasher is seeded per process).
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

/// The SimHash of `text` over its word 3-shingles; `None` below [`MIN_WORDS`] words.
pub fn simhash(text: &str) -> Option<u64> {
    let words: Vec<&str> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    if words.len() < MIN_WORDS {
        return None;
    }
    let mut weights = [0i32; 64];
    for shingle in words.windows(3) {
        let h = fnv1a(shingle);
        for (bit, weight) in weights.iter_mut().enumerate() {
            *weight += if h >> bit & 1 == 1 { 1 } else { -1 };
        }
    }
    Some(
        weights
            .iter()
            .enumerate()
            .filter(|(_, w)| **w > 0)
            .fold(0u64, |acc, (bit, _)| acc | 1 << bit),
    )
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
    /// Near-identical answers among the last [`WINDOW`].
    pub similar: usize,
    /// Answers compared.
    pub window: usize,
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

#[derive(Default)]
struct TaskState {
    hashes: VecDeque<u64>,
    stopped: Option<Stopped>,
    seen: Option<Instant>,
}

/// Recent answers per task, and the tasks stopped.
#[derive(Default)]
pub struct LoopGuard {
    tasks: Mutex<HashMap<String, TaskState>>,
}

impl LoopGuard {
    /// Adds an answer of `task`; a loop when it completes one.
    pub fn observe(&self, task: &str, answer: &str) -> Option<Detected> {
        let hash = simhash(answer)?;
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
        let state = tasks.entry(task.to_owned()).or_default();
        state.seen = Some(Instant::now());
        if state.hashes.len() == WINDOW {
            state.hashes.pop_front();
        }
        state.hashes.push_back(hash);
        let similar = state
            .hashes
            .iter()
            .filter(|h| (**h ^ hash).count_ones() <= MAX_DISTANCE)
            .count();
        (similar >= REPEATS).then_some(Detected {
            similar,
            window: state.hashes.len(),
        })
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

    #[test]
    fn near_identical_answers_hash_close_and_different_ones_far() {
        let a = simhash(PLAN).unwrap();
        let b = simhash(&PLAN.replace("customer", "client")).unwrap();
        let c = simhash("The weather in Paris is sunny today with a light breeze from the west and no rain expected").unwrap();
        assert!(
            (a ^ b).count_ones() <= MAX_DISTANCE,
            "{}",
            (a ^ b).count_ones()
        );
        assert!(
            (a ^ c).count_ones() > MAX_DISTANCE,
            "{}",
            (a ^ c).count_ones()
        );
        assert_eq!(simhash("OK, done."), None, "too short to judge");
        assert_eq!(
            simhash(PLAN),
            simhash(&PLAN.to_uppercase()),
            "case does not matter"
        );
    }

    #[test]
    fn the_third_near_repeat_in_the_window_is_a_loop() {
        let guard = LoopGuard::default();
        assert_eq!(guard.observe("t", PLAN), None);
        assert_eq!(
            guard.observe(
                "t",
                "Here is a completely different answer about shipping times to Canada and Mexico"
            ),
            None
        );
        assert_eq!(guard.observe("t", &PLAN.replace("then", "next")), None);
        assert_eq!(guard.observe("other", PLAN), None, "tasks are apart");
        let found = guard.observe("t", PLAN).unwrap();
        assert_eq!(
            found,
            Detected {
                similar: 3,
                window: 4
            }
        );
    }

    #[test]
    fn progress_is_not_a_loop() {
        let guard = LoopGuard::default();
        for i in 0..20 {
            let answer = format!(
                "Step {i}: I read chapter {i} of the manual and it explains part {i} of the setup, section {}",
                i * 7
            );
            assert_eq!(guard.observe("t", &answer), None, "{answer}");
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
