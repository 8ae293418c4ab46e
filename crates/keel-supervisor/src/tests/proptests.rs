//! Random command sequences: `decide` + `evolve` never panic, `version` counts the events
//! folded, and replaying the log (through its JSON encoding) gives the same task.

use proptest::prelude::*;
use serde_json::json;

use crate::{
    ApprovalDecision, ApprovalDefault, Asker, Command, Ctx, Directive, Task, TaskEvent, TaskState,
    decide, evolve, renew,
};

/// Which token a lease holder's command carries.
#[derive(Debug, Clone, Copy)]
enum Tok {
    /// The current (or last) lease's.
    Current,
    /// One handed out earlier.
    Stale,
    /// One never handed out.
    Wrong,
}

#[derive(Debug, Clone)]
enum Op {
    Advance(u16),
    Create {
        max_attempts: u8,
        max_steps: Option<u8>,
        deadline: Option<u16>,
    },
    Claim {
        ttl: u16,
    },
    Heartbeat(Tok),
    Step(Tok, Option<f64>),
    Checkpoint(Tok),
    Complete(Tok),
    Fail(Tok, bool),
    Requeue,
    Cancel,
    ExpireLease,
    RequestApproval(Option<Tok>, bool),
    DecideApproval {
        approve: bool,
        right_id: bool,
    },
    ExpireApproval,
    Handoff,
    DlqRequeue,
    DlqDiscard,
    CheckDeadline,
}

fn tok() -> impl Strategy<Value = Tok> {
    prop_oneof![3 => Just(Tok::Current), 1 => Just(Tok::Stale), 1 => Just(Tok::Wrong)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<u16>().prop_map(Op::Advance),
        1 => (0u8..4, proptest::option::of(0u8..5), proptest::option::of(any::<u16>()))
            .prop_map(|(max_attempts, max_steps, deadline)| Op::Create {
                max_attempts,
                max_steps,
                deadline,
            }),
        3 => (0u16..20_000).prop_map(|ttl| Op::Claim { ttl }),
        2 => tok().prop_map(Op::Heartbeat),
        3 => (tok(), proptest::option::of(-0.5f64..1.5)).prop_map(|(t, p)| Op::Step(t, p)),
        2 => tok().prop_map(Op::Checkpoint),
        1 => tok().prop_map(Op::Complete),
        2 => (tok(), any::<bool>()).prop_map(|(t, r)| Op::Fail(t, r)),
        1 => Just(Op::Requeue),
        1 => Just(Op::Cancel),
        2 => Just(Op::ExpireLease),
        1 => (proptest::option::of(tok()), any::<bool>())
            .prop_map(|(t, e)| Op::RequestApproval(t, e)),
        1 => (any::<bool>(), any::<bool>())
            .prop_map(|(approve, right_id)| Op::DecideApproval { approve, right_id }),
        1 => Just(Op::ExpireApproval),
        1 => Just(Op::Handoff),
        1 => Just(Op::DlqRequeue),
        1 => Just(Op::DlqDiscard),
        1 => Just(Op::CheckDeadline),
    ]
}

struct Run {
    task: Option<Task>,
    log: Vec<(String, serde_json::Value, i64)>,
    now: i64,
    tokens: Vec<String>,
}

impl Run {
    fn token(&self, tok: Tok) -> String {
        match tok {
            // A lease comes only from a claim: the last one's token is the lease's.
            Tok::Current => match self.task.as_ref().and_then(|t| t.lease.as_ref()) {
                Some(_) => self.tokens.last().cloned().unwrap_or_default(),
                None => "none".to_owned(),
            },
            Tok::Stale => self.tokens.first().cloned().unwrap_or_default(),
            Tok::Wrong => "never-issued".to_owned(),
        }
    }

    fn command(&self, op: &Op) -> Option<Command> {
        let approval_id = self
            .task
            .as_ref()
            .and_then(|t| t.approval.as_ref())
            .map_or_else(|| "ap-none".to_owned(), |a| a.id.clone());
        Some(match *op {
            Op::Advance(_) => return None,
            Op::Create {
                max_attempts,
                max_steps,
                deadline,
            } => Command::Create {
                id: "t1".into(),
                agent: "a".into(),
                input: json!({"n": 1}),
                deadline_ms: deadline.map(|d| self.now + i64::from(d)),
                max_attempts: u32::from(max_attempts),
                max_steps: max_steps.map(u32::from),
            },
            Op::Claim { ttl } => Command::Claim {
                worker: "w".into(),
                lease_ttl_ms: u64::from(ttl),
            },
            Op::Heartbeat(t) => Command::Heartbeat {
                token: self.token(t),
            },
            Op::Step(t, progress) => Command::Step {
                token: self.token(t),
                kind: "k".into(),
                summary: "s".into(),
                progress,
                confidence: progress,
            },
            Op::Checkpoint(t) => Command::Checkpoint {
                token: self.token(t),
                label: None,
                state_hash: format!("h{}", self.now),
                size: 7,
            },
            Op::Complete(t) => Command::Complete {
                token: self.token(t),
                output: json!("done"),
                confidence: Some(0.25),
            },
            Op::Fail(t, retryable) => Command::Fail {
                token: self.token(t),
                error: json!({"e": "boom"}),
                retryable,
            },
            Op::Requeue => Command::Requeue { reason: None },
            Op::Cancel => Command::Cancel {
                reason: Some("r".into()),
            },
            Op::ExpireLease => Command::ExpireLease,
            Op::Handoff => Command::Handoff {
                approval_id: format!("ap{}", self.log.len()),
                reason: "loop".into(),
                context: json!({}),
                timeout_ms: 5_000,
            },
            Op::RequestApproval(t, escalate) => Command::RequestApproval {
                asker: match t {
                    Some(t) => Asker::Holder {
                        token: self.token(t),
                    },
                    None => Asker::Operator,
                },
                approval_id: format!("ap{}", self.log.len()),
                reason: "risky".into(),
                context: json!({}),
                timeout_ms: 5_000,
                default: if escalate {
                    ApprovalDefault::Escalate
                } else {
                    ApprovalDefault::Deny
                },
            },
            Op::DecideApproval { approve, right_id } => Command::DecideApproval {
                approval_id: if right_id {
                    approval_id
                } else {
                    "ap-other".into()
                },
                decision: if approve {
                    ApprovalDecision::Approve
                } else {
                    ApprovalDecision::Deny
                },
                by: "alice".into(),
                note: None,
            },
            Op::ExpireApproval => Command::ExpireApproval,
            Op::DlqRequeue => Command::DlqRequeue {
                by: "bob".into(),
                note: None,
            },
            Op::DlqDiscard => Command::DlqDiscard {
                by: "bob".into(),
                note: None,
            },
            Op::CheckDeadline => Command::CheckDeadline,
        })
    }

    fn replay(&self) -> Option<Task> {
        self.log.iter().fold(None, |task, (kind, data, at)| {
            let event = TaskEvent::from_event(kind, data).unwrap().unwrap();
            Some(evolve(task, &event, *at))
        })
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_commands_never_panic_and_replay_gives_the_same_task(
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        let mut run = Run { task: None, log: Vec::new(), now: 1_000_000, tokens: Vec::new() };
        for (i, op) in ops.iter().enumerate() {
            if let Op::Advance(ms) = op {
                run.now += i64::from(*ms);
                continue;
            }
            let Some(command) = run.command(op) else { continue };
            let ctx = Ctx { now_ms: run.now, new_token: format!("tok-{i}") };
            match decide(run.task.as_ref(), &command, &ctx) {
                Ok(decision) => {
                    if decision.events.iter().any(|e| matches!(e, TaskEvent::Claimed(_))) {
                        run.tokens.push(ctx.new_token.clone());
                    }
                    for event in &decision.events {
                        run.task = Some(evolve(run.task.take(), event, run.now));
                        run.log.push((event.kind().as_str().to_owned(), event.to_data(), run.now));
                    }
                    // A heartbeat that appends nothing renews exactly when it says continue.
                    if let Command::Heartbeat { token } = &command
                        && decision.events.is_empty()
                    {
                        let renewed = renew(run.task.as_ref().unwrap(), token, run.now);
                        let goes_on = decision.directive == Some(Directive::Continue);
                        prop_assert_eq!(renewed.is_ok(), goes_on);
                    }
                }
                Err(error) => prop_assert!(matches!(error.status(), 404 | 409 | 422), "{error}"),
            }
            if let Some(task) = &run.task {
                prop_assert_eq!(task.version, run.log.len() as u64);
                prop_assert_eq!(task.state == TaskState::AwaitingHuman, task.approval.is_some());
                let handed_off = task.state == TaskState::AwaitingHuman
                    && task.approval.as_ref().is_some_and(|a| a.handoff);
                let holds_lease = task.state == TaskState::Running
                    || (task.state == TaskState::Cancelled && task.cancel_requested)
                    || (handed_off && task.lease.is_some());
                prop_assert_eq!(holds_lease, task.lease.is_some(), "{:?}", task);
            }
            prop_assert_eq!(&run.replay(), &run.task);
        }
    }
}

/// Any event, with fields drawn small so that ids and tokens collide.
fn event() -> impl Strategy<Value = TaskEvent> {
    use crate::event::{
        AlertRaised, ApprovalDecided, ApprovalRequested, Cancelled, CheckpointSaved, Claimed,
        Created, Dead, DeadReason, Failed, LeaseExpired, Requeued, StepRecorded, Succeeded,
    };
    let id = || prop_oneof![Just("a".to_owned()), Just("b".to_owned())];
    prop_oneof![
        (id(), any::<u32>(), proptest::option::of(any::<i64>())).prop_map(|(id, max, deadline)| {
            TaskEvent::Created(Created {
                id,
                agent: "x".into(),
                input: json!(null),
                deadline_ms: deadline,
                max_attempts: max,
                max_steps: None,
            })
        }),
        (
            id(),
            any::<u32>(),
            any::<u64>(),
            any::<i64>(),
            any::<bool>()
        )
            .prop_map(|(token, attempt, ttl, at, resumed)| {
                TaskEvent::Claimed(Claimed {
                    worker: "w".into(),
                    token_hash: crate::token_hash(&token),
                    lease_ttl_ms: ttl,
                    expires_at_ms: at,
                    attempt,
                    resumed,
                })
            }),
        any::<u32>().prop_map(|attempt| TaskEvent::LeaseExpired(LeaseExpired {
            worker: "w".into(),
            attempt,
            expired_at_ms: 0,
        })),
        any::<u32>().prop_map(|step| TaskEvent::StepRecorded(StepRecorded {
            step,
            kind: "k".into(),
            summary: String::new(),
            progress: None,
            confidence: Some(0.5),
            worker: "w".into(),
            attempt: 1,
        })),
        any::<u64>().prop_map(|seq| TaskEvent::CheckpointSaved(CheckpointSaved {
            seq,
            label: None,
            state_hash: "h".into(),
            size: 1,
            worker: "w".into(),
            attempt: 1,
        })),
        Just(TaskEvent::Succeeded(Succeeded {
            output: json!(1),
            confidence: None,
            worker: "w".into(),
            attempt: 1,
        })),
        any::<bool>().prop_map(|retryable| TaskEvent::Failed(Failed {
            error: json!("e"),
            retryable,
            worker: None,
            attempt: 1,
        })),
        Just(TaskEvent::Dead(Dead {
            reason: DeadReason::OutOfAttempts,
            error: None,
            attempts: 1,
        })),
        (any::<bool>(), proptest::option::of(any::<i64>())).prop_map(|(reset, deadline)| {
            TaskEvent::Requeued(Requeued {
                by: "op".into(),
                reason: None,
                reset_attempts: reset,
                deadline_ms: deadline,
            })
        }),
        any::<bool>().prop_map(|discarded| TaskEvent::Cancelled(Cancelled {
            reason: None,
            by: None,
            note: None,
            discarded,
            worker: None,
        })),
        (id(), any::<u64>(), any::<bool>()).prop_map(|(approval_id, timeout_ms, handoff)| {
            TaskEvent::ApprovalRequested(ApprovalRequested {
                approval_id,
                reason: "r".into(),
                context: json!({}),
                timeout_ms,
                default: ApprovalDefault::Escalate,
                worker: None,
                attempt: 0,
                handoff,
            })
        }),
        (id(), any::<bool>()).prop_map(|(approval_id, approve)| {
            TaskEvent::ApprovalDecided(ApprovalDecided {
                approval_id,
                decision: if approve {
                    ApprovalDecision::Approve
                } else {
                    ApprovalDecision::Deny
                },
                by: "p".into(),
                note: None,
            })
        }),
        proptest::option::of(id()).prop_map(|approval_id| TaskEvent::AlertRaised(AlertRaised {
            severity: "warning".into(),
            message: String::new(),
            approval_id,
        })),
    ]
}

proptest! {
    #[test]
    fn evolve_is_total_over_any_event_sequence(
        events in proptest::collection::vec((event(), any::<i64>()), 0..40),
    ) {
        let mut task: Option<Task> = None;
        for (n, (event, at)) in events.iter().enumerate() {
            task = Some(evolve(task, event, *at));
            let folded = task.as_ref().unwrap();
            prop_assert_eq!(folded.version, n as u64 + 1);
            prop_assert_eq!(folded.updated_at_ms, *at);
            let back = TaskEvent::from_event(event.kind().as_str(), &event.to_data()).unwrap();
            prop_assert_eq!(back.as_ref(), Some(event));
            // Whatever the log holds, every command is answered without a panic.
            for command in [Command::ExpireLease, Command::ExpireApproval, Command::CheckDeadline] {
                let ctx = Ctx { now_ms: *at, new_token: "t".into() };
                let _ = decide(Some(folded), &command, &ctx);
            }
        }
    }
}
