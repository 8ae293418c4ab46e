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
//! newest, the task loops. Answers of fewer than [`MIN_WORDS`] words are not judged. Those
//! three are the defaults; `[agents.NAME] loop_guard = { repeats, window, similarity }`
//! sets them per agent ([`LoopGuardSettings`]).
//!
//! A task found looping is stopped: keel records `loop_detected`, hands the task to a
//! person, and refuses the task's further model calls until that person lets it go on.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use keel_config::LoopGuardSettings;
use parking_lot::Mutex;

/// Answers of a task compared with each other (default).
pub const WINDOW: usize = keel_config::DEFAULT_LOOP_WINDOW;
/// Near-identical answers in the window (the newest included) that make a loop (default).
pub const REPEATS: usize = keel_config::DEFAULT_LOOP_REPEATS;
/// Estimated Jaccard similarity from which two answers are near-identical (default).
pub const SIMILAR: f64 = keel_config::DEFAULT_LOOP_SIMILARITY;
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

/// The most of a streamed answer kept for the loop guard.
const MAX_STREAMED: usize = 1024 * 1024;

/// A streamed answer put together from its chunks (`choices[0].delta`: content, and the
/// tool calls' names and argument pieces), so that the loop guard judges a streamed answer
/// as it judges a whole one ([`answer_text`]).
#[derive(Debug, Default)]
pub struct StreamedAnswer {
    content: String,
    /// Tool calls by their `index`: name and arguments so far.
    calls: Vec<(String, String)>,
    size: usize,
}

impl StreamedAnswer {
    /// Adds one chunk's data (the JSON of one `data:` line); other chunks are ignored.
    pub fn add(&mut self, chunk: &[u8]) {
        #[derive(serde::Deserialize)]
        struct Chunk {
            #[serde(default)]
            choices: Vec<Choice>,
        }
        #[derive(serde::Deserialize)]
        struct Choice {
            #[serde(default)]
            index: u32,
            #[serde(default)]
            delta: Option<Delta>,
        }
        #[derive(serde::Deserialize)]
        struct Delta {
            #[serde(default)]
            content: Option<String>,
            #[serde(default)]
            tool_calls: Vec<CallDelta>,
        }
        #[derive(serde::Deserialize)]
        struct CallDelta {
            #[serde(default)]
            index: usize,
            #[serde(default)]
            function: Option<FunctionDelta>,
        }
        #[derive(serde::Deserialize)]
        struct FunctionDelta {
            #[serde(default)]
            name: Option<String>,
            #[serde(default)]
            arguments: Option<String>,
        }
        if self.size >= MAX_STREAMED {
            return;
        }
        let Ok(chunk) = serde_json::from_slice::<Chunk>(chunk) else {
            return;
        };
        for delta in chunk
            .choices
            .into_iter()
            .filter(|c| c.index == 0)
            .filter_map(|c| c.delta)
        {
            if let Some(text) = delta.content {
                self.size += text.len();
                self.content.push_str(&text);
            }
            for call in delta.tool_calls {
                let Some(function) = call.function else {
                    continue;
                };
                // Indexes come in order from 0; a gap is filled so that none is lost.
                if call.index >= self.calls.len() && call.index < 128 {
                    self.calls.resize(call.index + 1, Default::default());
                }
                if let Some((name, args)) = self.calls.get_mut(call.index) {
                    let added = function.name.unwrap_or_default();
                    let more = function.arguments.unwrap_or_default();
                    self.size += added.len() + more.len();
                    name.push_str(&added);
                    args.push_str(&more);
                }
            }
        }
    }

    /// The answer as [`answer_text`] gives a whole one: the content, then each tool call's
    /// name and arguments.
    pub fn text(self) -> String {
        let mut text = self.content;
        for (name, args) in self.calls {
            text.push(' ');
            text.push_str(&name);
            text.push(' ');
            text.push_str(&args);
        }
        text
    }
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
    /// What lets it go on.
    pub release: Release,
}

impl Stopped {
    /// Whether a person decides when it goes on.
    pub fn decided_by_person(&self) -> bool {
        matches!(self.release, Release::Person(_))
    }
}

/// What lets a stopped task go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Release {
    /// A person, deciding on this approval (the handoff).
    Person(String),
    /// Time: the task could not be handed to a person (`why`: keel's supervisor does not
    /// know it, as for an `x-keel-task` label of the client's own), so no person can let it
    /// go on; its calls are refused until `at` ([`PAUSE`] after the stop).
    At {
        /// When the stop ends.
        at: Instant,
        /// Why no person was asked, in words.
        why: String,
    },
}

/// How long the calls of a looping task no person was asked about are refused: the loop
/// guard's own window, so a loop that goes on is found and stopped again, and a label a
/// client keeps (a session, a ticket) is not refused for good.
pub const PAUSE: std::time::Duration = BURN_WINDOW;

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
    /// Adds an answer of `task`; a loop, by the agent's `limits`, when it completes one.
    pub fn observe(
        &self,
        task: &str,
        answer: &str,
        limits: &LoopGuardSettings,
    ) -> Option<Detected> {
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
            .filter(|earlier| similarity(earlier, &sig) >= limits.similarity)
            .count();
        // The newest and the answers it was compared with.
        let window = state.answers.len() + 1;
        while state.answers.len() + 1 >= limits.window.max(1) && !state.answers.is_empty() {
            state.answers.pop_front();
        }
        state.answers.push_back(sig.clone());
        drop(tasks);
        if similar >= limits.repeats {
            return Some(Detected {
                similar,
                window,
                with: None,
            });
        }
        self.bouncing(task, sig, now, limits.similarity)
    }

    /// Two tasks bouncing the same content: this answer is near-identical to at least one
    /// earlier answer of this task and two of exactly one other task within
    /// [`BOUNCE_WINDOW`]. Content that three or more tasks share is a common phrase, not a
    /// bounce.
    fn bouncing(&self, task: &str, sig: Signature, now: Instant, similar: f64) -> Option<Detected> {
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
            if similarity(s, &sig) >= similar {
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
        // A stop a person decides on stays: a second loop found meanwhile (a bounce's other
        // end, an answer in flight) could not be handed off again, the task waiting already.
        if state
            .stopped
            .as_ref()
            .is_some_and(Stopped::decided_by_person)
            && !stopped.decided_by_person()
        {
            return;
        }
        state.stopped = Some(stopped);
    }

    /// Why `task` is stopped, if it is; a stop whose [`Release::At`] has passed is over (the task
    /// goes on with a fresh window).
    pub fn stopped(&self, task: &str) -> Option<Stopped> {
        let mut tasks = self.tasks.lock();
        let stopped = tasks.get(task)?.stopped.clone()?;
        if matches!(stopped.release, Release::At { at, .. } if at <= Instant::now()) {
            tasks.remove(task);
            return None;
        }
        Some(stopped)
    }

    /// Lets `task` go on, with a fresh window (a person looked at it).
    pub fn release(&self, task: &str) {
        self.tasks.lock().remove(task);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observe(guard: &LoopGuard, task: &str, answer: &str) -> Option<Detected> {
        guard.observe(task, answer, &LoopGuardSettings::default())
    }

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
        assert_eq!(observe(&guard, "t", PLAN), None);
        assert_eq!(
            observe(
                &guard,
                "t",
                "Here is a completely different answer about shipping times to Canada and Mexico"
            ),
            None
        );
        assert_eq!(observe(&guard, "t", &PLAN.to_lowercase()), None);
        assert_eq!(observe(&guard, "other", PLAN), None, "tasks are apart");
        let found = observe(&guard, "t", PLAN).unwrap();
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
            assert_eq!(observe(&guard, "t", &answer), None, "{answer}");
        }
        for i in 0..30 {
            let answer = format!(
                "Step {i}: I read chapter {i} of the manual and it explains part {i} of the setup"
            );
            assert_eq!(observe(&guard, "u", &answer), None, "{answer}");
        }
    }

    #[test]
    fn a_streamed_answer_reads_as_the_whole_one() {
        let whole = br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"I will look it up","tool_calls":[{"id":"c1","type":"function","function":{"name":"search","arguments":"{\"q\":\"refund policy\"}"}}]}}]}"#;
        let chunks: [&[u8]; 6] = [
            br#"{"choices":[{"index":0,"delta":{"role":"assistant","content":"I will "}}]}"#,
            br#"{"choices":[{"index":0,"delta":{"content":"look it up"}}]}"#,
            br#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c1","type":"function","function":{"name":"search","arguments":""}}]}}]}"#,
            br#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"q\":\"refund"}}]}}]}"#,
            br#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":" policy\"}"}}]}}]}"#,
            br#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#,
        ];
        let mut streamed = StreamedAnswer::default();
        for chunk in chunks {
            streamed.add(chunk);
        }
        assert_eq!(Some(streamed.text()), answer_text(whole));
    }

    #[test]
    fn an_agent_s_own_limits_decide() {
        let guard = LoopGuard::default();
        let strict = LoopGuardSettings {
            repeats: 2,
            window: 2,
            similarity: 0.99,
            ..LoopGuardSettings::default()
        };
        // A changed word is not a repeat at 0.99, an exact repeat is, at the second time.
        let changed = PLAN.replace("customer", "client");
        assert_eq!(guard.observe("t", PLAN, &strict), None);
        assert_eq!(guard.observe("t", &changed, &strict), None);
        let found = guard.observe("t", &changed, &strict).unwrap();
        assert_eq!(found.similar, 2);
        assert_eq!(found.window, 2);
        // The default needs a third.
        let lax = LoopGuard::default();
        assert_eq!(observe(&lax, "t", PLAN), None);
        assert_eq!(observe(&lax, "t", PLAN), None);
    }

    #[test]
    fn a_window_forgets_old_answers() {
        let guard = LoopGuard::default();
        assert_eq!(observe(&guard, "t", PLAN), None);
        assert_eq!(observe(&guard, "t", PLAN), None);
        for i in 0..WINDOW {
            let distinct: Vec<String> = (0..10).map(|k| format!("x{i}y{k}")).collect();
            assert_eq!(observe(&guard, "t", &distinct.join(" ")), None);
        }
        assert_eq!(
            observe(&guard, "t", PLAN),
            None,
            "the two early ones are out of the window"
        );
        assert!(observe(&guard, "t", PLAN).is_none());
        assert!(observe(&guard, "t", PLAN).is_some());
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
        assert_eq!(observe(&guard, "a", PLAN), None);
        assert_eq!(observe(&guard, "b", PLAN), None);
        assert_eq!(observe(&guard, "a", other), None);
        assert_eq!(observe(&guard, "a", PLAN), None, "a has it twice, b once");
        let found = observe(&guard, "b", PLAN).unwrap();
        assert_eq!(found.with.as_deref(), Some("a"));
        assert_eq!(found.similar, 4);

        // The same answer from three tasks is a phrase they share, not a bounce.
        let guard = LoopGuard::default();
        for task in ["x", "y", "z", "x", "y"] {
            assert_eq!(observe(&guard, task, PLAN), None, "{task}");
        }
    }

    #[test]
    fn a_stopped_task_stays_stopped_until_released() {
        let guard = LoopGuard::default();
        guard.stop(
            "t",
            Stopped {
                reason: "loop".into(),
                release: Release::Person("apr_1".into()),
            },
        );
        // A second loop that could not be handed off does not replace the person's stop.
        guard.stop(
            "t",
            Stopped {
                reason: "again".into(),
                release: Release::At {
                    at: Instant::now(),
                    why: "it waits for a person already".into(),
                },
            },
        );
        assert_eq!(
            guard.stopped("t").unwrap().release,
            Release::Person("apr_1".into())
        );
        guard.release("t");
        assert_eq!(guard.stopped("t"), None);
    }

    #[test]
    fn a_person_s_handoff_replaces_a_pause_and_a_later_pause_does_not_replace_it() {
        let guard = LoopGuard::default();
        let paused = Stopped {
            reason: "loop of tool calls".into(),
            release: Release::At {
                at: Instant::now() + PAUSE,
                why: "the supervisor refused".into(),
            },
        };
        let handed_off = Stopped {
            reason: "loop".into(),
            release: Release::Person("apr_1".into()),
        };
        guard.stop("t", paused.clone());
        guard.stop("t", handed_off.clone());
        assert_eq!(guard.stopped("t"), Some(handed_off.clone()));
        guard.stop("t", paused);
        assert_eq!(guard.stopped("t"), Some(handed_off));
    }

    #[test]
    fn a_stopped_label_goes_on_when_its_pause_is_over() {
        let guard = LoopGuard::default();
        let now = Instant::now();
        let label = |at| Stopped {
            reason: "loop".into(),
            release: Release::At {
                at,
                why: "no such task".into(),
            },
        };
        guard.stop("paused", label(now + PAUSE));
        guard.stop("over", label(now));
        assert!(guard.stopped("paused").is_some());
        assert_eq!(guard.stopped("over"), None);
        // With a fresh window: the answers before the stop are forgotten.
        assert!(!guard.tasks.lock().contains_key("over"));
    }
}
