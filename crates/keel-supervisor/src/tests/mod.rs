//! Behaviour of `decide` + `evolve`: a small in-memory world playing the I/O layer, and
//! the tests by theme: the state table, the worker protocol's scenarios, the encoding of
//! events, and random command sequences.

mod encoding;
mod proptests;
mod protocol;
mod table;

use serde_json::{Value, json};

use crate::{
    ApprovalDecision, ApprovalDefault, Asker, Command, Ctx, DeadReason, Decision, Directive, Task,
    TaskError, TaskEvent, TaskState, decide, evolve, renew,
};

const START: i64 = 1_700_000_000_000;
const TTL: u64 = 30_000;

/// A task and a clock, with the I/O layer's part played in memory.
struct World {
    task: Option<Task>,
    now: i64,
    minted: u32,
    /// The token the last claim handed out (the task keeps only its hash).
    claimed_token: Option<String>,
}

impl World {
    fn new() -> Self {
        Self {
            task: None,
            now: START,
            minted: 0,
            claimed_token: None,
        }
    }

    /// Decides `command` and, when accepted, folds its events into the task.
    fn run(&mut self, command: Command) -> Result<Decision, TaskError> {
        self.minted += 1;
        let ctx = Ctx {
            now_ms: self.now,
            new_token: format!("tok-{}", self.minted),
        };
        let decision = decide(self.task.as_ref(), &command, &ctx)?;
        for event in &decision.events {
            if let TaskEvent::Claimed(_) = event {
                self.claimed_token = Some(ctx.new_token.clone());
            }
            self.task = Some(evolve(self.task.take(), event, self.now));
        }
        Ok(decision)
    }

    fn ok(&mut self, command: Command) -> Decision {
        self.run(command).expect("command accepted")
    }

    fn task(&self) -> &Task {
        self.task.as_ref().expect("task exists")
    }

    /// The token of the task's lease, as the claim handed it to the worker.
    fn token(&self) -> String {
        let lease = self.task().lease.as_ref().expect("task has a lease");
        let token = self
            .claimed_token
            .clone()
            .expect("a claim handed out a token");
        assert_eq!(lease.token_hash, crate::token_hash(&token));
        token
    }

    fn advance(&mut self, ms: i64) {
        self.now += ms;
    }

    /// A world whose task is in `state` (cancelled: from queued, without a lease).
    fn in_state(state: TaskState) -> Self {
        let mut world = Self::new();
        world.ok(create(3));
        match state {
            TaskState::Queued => {}
            TaskState::Running => {
                world.ok(claim("w1"));
            }
            TaskState::Succeeded => {
                world.ok(claim("w1"));
                let token = world.token();
                world.ok(complete(&token));
            }
            TaskState::Dead => {
                world.ok(claim("w1"));
                let token = world.token();
                world.ok(fail(&token, false));
            }
            TaskState::AwaitingHuman => {
                world.ok(request_approval(None, ApprovalDefault::Deny));
            }
            TaskState::Cancelled => {
                world.ok(Command::Cancel { reason: None });
            }
        }
        assert_eq!(world.task().state, state);
        world
    }
}

fn create(max_attempts: u32) -> Command {
    Command::Create {
        id: "t1".into(),
        agent: "researcher".into(),
        input: json!({"question": "why is the sky blue"}),
        deadline_ms: None,
        max_attempts,
        max_steps: None,
    }
}

fn claim(worker: &str) -> Command {
    Command::Claim {
        worker: worker.into(),
        lease_ttl_ms: TTL,
    }
}

fn heartbeat(token: &str) -> Command {
    Command::Heartbeat {
        token: token.into(),
    }
}

fn step(token: &str) -> Command {
    Command::Step {
        token: token.into(),
        kind: "tool_call".into(),
        summary: "searched the web".into(),
        progress: Some(0.5),
        confidence: Some(0.8),
    }
}

fn checkpoint(token: &str) -> Command {
    Command::Checkpoint {
        token: token.into(),
        label: Some("after search".into()),
        state_hash: "sha256:abc".into(),
        size: 42,
    }
}

fn complete(token: &str) -> Command {
    Command::Complete {
        token: token.into(),
        output: json!({"answer": "rayleigh scattering"}),
        confidence: Some(0.9),
    }
}

fn fail(token: &str, retryable: bool) -> Command {
    Command::Fail {
        token: token.into(),
        error: json!({"message": "tool crashed"}),
        retryable,
    }
}

/// An approval request by the holder of `token`, or without one by an operator.
fn request_approval(token: Option<&str>, default: ApprovalDefault) -> Command {
    Command::RequestApproval {
        asker: match token {
            Some(token) => Asker::Holder {
                token: token.to_owned(),
            },
            None => Asker::Operator,
        },
        approval_id: "ap1".into(),
        reason: "deletes 1,000 rows".into(),
        context: json!({"tool": "sql", "rows": 1000}),
        timeout_ms: 60_000,
        default,
    }
}

fn decide_approval(id: &str, decision: ApprovalDecision) -> Command {
    Command::DecideApproval {
        approval_id: id.into(),
        decision,
        by: "alice".into(),
        note: Some("checked".into()),
    }
}

fn kinds(decision: &Decision) -> Vec<&'static str> {
    decision.events.iter().map(|e| e.kind().as_str()).collect()
}
