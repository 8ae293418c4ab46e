//! The loop guard end to end: a task whose model answers keep coming back the same, or
//! that makes the same tool call over and over, is handed to a person, its worker is told
//! `handoff`, and the call that would go on looping is refused.

use serde_json::{Value, json};

use crate::common::{Keel, sdk, sim};

const LOOPS: &str = r#"

[providers.sim]
kind = "openai"
base_url = "{sim}"

[routes.smart]
targets = [{ provider = "sim", model = "primary" }]

[tools.search]
url = "{sim}/tools/search"
"#;

async fn post(keel: &Keel, path: &str, task: Option<&str>, body: Value) -> (u16, Value) {
    let mut headers = vec![("x-keel-agent", "looper")];
    headers.extend(task.map(|task| ("x-keel-task", task)));
    keel.post_json(path, &headers, &body).await
}

/// A created and claimed task: its id and lease token.
async fn running_task(keel: &Keel) -> (String, String) {
    keel.claimed_task("looper").await
}

async fn task_state(keel: &Keel, id: &str) -> Value {
    let response = reqwest::get(format!("{}/v1/tasks/{id}", keel.url))
        .await
        .unwrap();
    response.json().await.unwrap()
}

async fn heartbeat(keel: &Keel, id: &str, token: &str) -> Value {
    let (status, hb) = post(
        keel,
        &format!("/v1/tasks/{id}/heartbeat"),
        None,
        json!({"lease_token": token}),
    )
    .await;
    assert_eq!(status, 200, "{hb}");
    hb
}

const PROMPT: &str = "Please look up the refund policy for order 1234 and tell me what it says";

/// Approves `approval` with `keel approvals approve`, then worker `w2` claims the task
/// `id` again.
async fn approve_and_reclaim(keel: &Keel, approval: &str, id: &str) {
    keel.cli_ok(&["approvals", "approve", approval]);
    let (status, claimed) = post(
        keel,
        "/v1/tasks/claim",
        None,
        json!({"agent": "looper", "worker": "w2", "lease": "30s"}),
    )
    .await;
    assert_eq!(
        (status, claimed["id"].as_str()),
        (200, Some(id)),
        "{claimed}"
    );
}

async fn ask(keel: &Keel, task: &str, prompt: &str) -> (u16, Value) {
    post(
        keel,
        "/v1/chat/completions",
        Some(task),
        json!({"model": "smart", "messages": [{"role": "user", "content": prompt}]}),
    )
    .await
}

/// Asks task `id`'s same question three times, so that the loop guard hands it off; the
/// handoff's approval id.
async fn loop_until_handed_off(keel: &Keel, id: &str) -> String {
    for _ in 0..3 {
        let (status, answer) = ask(keel, id, PROMPT).await;
        assert_eq!(status, 200, "{answer}");
    }
    let task = task_state(keel, id).await;
    assert_eq!(task["approval"]["handoff"], true, "{task}");
    task["approval"]["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_whose_answers_repeat_is_handed_off_and_its_next_call_refused() {
    let models = sim().await;
    let keel = Keel::start(LOOPS, &models).await;
    let (id, token) = running_task(&keel).await;

    // Different questions, different answers: progress, not a loop.
    for i in 0..4 {
        let (status, _) = ask(
            &keel,
            &id,
            &format!(
                "Now summarise chapter {i} of the handbook about {}",
                ["billing", "shipping", "returns", "privacy"][i]
            ),
        )
        .await;
        assert_eq!(status, 200);
    }
    assert!(keel.events_of("loop_detected").is_empty());
    // The same question, the same answer, three times: the third answer still reaches
    // the agent, and the loop is recorded.
    for _ in 0..3 {
        let (status, answer) = ask(&keel, &id, PROMPT).await;
        assert_eq!(status, 200, "{answer}");
    }
    let found = keel.events_of("loop_detected");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["kind"], "repeated_output");
    assert_eq!(found[0]["similar"], 3);

    // The task waits for a person; its worker hears `handoff`.
    let task = task_state(&keel, &id).await;
    assert_eq!(task["state"], "awaiting_human", "{task}");
    assert_eq!(task["approval"]["handoff"], true, "{task}");
    let approval = task["approval"]["id"].as_str().unwrap().to_owned();
    assert_eq!(heartbeat(&keel, &id, &token).await["directive"], "handoff");

    // The next model call of the task is refused: the openai SDK raises ConflictError.
    let calls = models.calls("primary");
    let out = sdk(
        "chat",
        &keel.base_url(),
        &[
            "--header",
            &format!("x-keel-task={id}"),
            "--header",
            "x-keel-agent=looper",
        ],
    )
    .await;
    assert_eq!(out["exception"], "ConflictError", "{out}");
    assert!(out["message"].as_str().unwrap().contains("loop"), "{out}");
    assert_eq!(
        models.calls("primary"),
        calls,
        "a refused call never reaches the model"
    );

    // A person looks and lets it go on: the task is queued, a worker claims it, and its
    // calls pass again.
    let listed = keel.cli(&["approvals", "ls"]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&approval));
    approve_and_reclaim(&keel, &approval, &id).await;
    let (status, answer) = ask(&keel, &id, PROMPT).await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_handed_off_as_looping_stays_refused_after_a_restart() {
    let models = sim().await;
    let mut keel = Keel::start(LOOPS, &models).await;
    let (id, _) = running_task(&keel).await;
    let approval = loop_until_handed_off(&keel, &id).await;
    let (status, refused) = ask(&keel, &id, PROMPT).await;
    assert_eq!(status, 409, "{refused}");

    // kill -9 and start again over the same store: the stop is not in memory any more,
    // but the task still waits for a person, so its calls are still refused.
    keel.child.kill().await.unwrap();
    let dir = std::mem::replace(&mut keel.dir, tempfile::tempdir().unwrap());
    let keel = Keel::start_in(dir, LOOPS, &models).await;
    let calls = models.calls("primary");
    let (status, refused) = ask(&keel, &id, PROMPT).await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["error"]["code"], "loop_detected", "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&approval),
        "{refused}"
    );
    assert_eq!(models.calls("primary"), calls, "the model was not called");

    // The person approves: the calls pass again.
    approve_and_reclaim(&keel, &approval, &id).await;
    let (status, answer) = ask(&keel, &id, PROMPT).await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_looping_task_denied_then_requeued_from_the_dlq_may_call_again() {
    let models = sim().await;
    let keel = Keel::start(LOOPS, &models).await;
    let (id, _) = running_task(&keel).await;
    let approval = loop_until_handed_off(&keel, &id).await;
    keel.cli_ok(&["approvals", "deny", &approval]);
    assert_eq!(task_state(&keel, &id).await["state"], "dead");
    keel.cli_ok(&["dlq", "requeue", &id]);
    let (status, claimed) = post(
        &keel,
        "/v1/tasks/claim",
        None,
        json!({"agent": "looper", "worker": "w2", "lease": "30s"}),
    )
    .await;
    assert_eq!(
        (status, claimed["id"].as_str()),
        (200, Some(id.as_str())),
        "{claimed}"
    );
    // The person decided; the requeued task starts afresh, its calls are not refused.
    let (status, answer) = ask(
        &keel,
        &id,
        "Now summarise the shipping chapter of the handbook",
    )
    .await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_tool_call_over_and_over_is_stopped_as_a_loop() {
    let models = sim().await;
    let keel = Keel::start(LOOPS, &models).await;
    let (id, token) = running_task(&keel).await;
    let call = json!({"task": id, "args": {"query": "refund policy"}});
    for _ in 0..5 {
        let (status, answer) = post(&keel, "/v1/tools/search/invoke", None, call.clone()).await;
        assert_eq!(status, 200, "{answer}");
    }
    // Other args are another call.
    let (status, _) = post(
        &keel,
        "/v1/tools/search/invoke",
        None,
        json!({"task": id, "args": {"query": "shipping"}}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, answer) = post(&keel, "/v1/tools/search/invoke", None, call).await;
    assert_eq!(status, 403, "{answer}");
    assert_eq!(answer["rules"], json!(["loop:same_call"]));
    assert_eq!(models.calls("tool:search"), 6);
    let found = keel.events_of("loop_detected");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["kind"], "same_tool_call");
    assert_eq!(found[0]["repeats"], 5);
    assert_eq!(task_state(&keel, &id).await["state"], "awaiting_human");
    assert_eq!(heartbeat(&keel, &id, &token).await["directive"], "handoff");
    assert!(
        keel.metrics()
            .await
            .contains("keel_guardrail_blocks_total{tool=\"search\",rule=\"loop:same_call\"} 1")
    );
    assert!(
        keel.metrics()
            .await
            .contains("keel_loops_detected_total{agent=\"looper\",kind=\"same_tool_call\"} 1")
    );

    // A person lets it go on: the count starts again, so the same call passes (up to the
    // limit once more) instead of being stopped at once.
    let approvals: Value = reqwest::get(format!("{}/v1/approvals", keel.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let approval = approvals["approvals"][0]["id"].as_str().unwrap().to_owned();
    approve_and_reclaim(&keel, &approval, &id).await;
    let again = json!({"task": id, "args": {"query": "refund policy"}});
    let (status, answer) = post(&keel, "/v1/tools/search/invoke", None, again).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(models.calls("tool:search"), 7);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_loop_of_tool_calls_pauses_a_label_s_model_calls_too() {
    let models = sim().await;
    let keel = Keel::start(LOOPS, &models).await;
    // A task id keel's supervisor does not know: the client's own label.
    let call = json!({"task": "my-own-label", "args": {"query": "refund policy"}});
    for _ in 0..5 {
        let (status, answer) = post(&keel, "/v1/tools/search/invoke", None, call.clone()).await;
        assert_eq!(status, 200, "{answer}");
    }
    let (status, answer) = post(&keel, "/v1/tools/search/invoke", None, call).await;
    assert_eq!(status, 403, "{answer}");
    assert_eq!(answer["rules"], json!(["loop:same_call"]));

    // No person can be asked about a label: its model calls are refused for the loop
    // guard's minute, saying which loop and for how long.
    let (status, refused) = ask(&keel, "my-own-label", PROMPT).await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["error"]["code"], "loop_detected", "{refused}");
    let message = refused["error"]["message"].as_str().unwrap();
    let (why, left) = message
        .split_once(
            "; its further model calls are refused and no person can let it go on (there is no supervisor task by that name), so they go on in ",
        )
        .unwrap_or_else(|| panic!("{message}"));
    assert_eq!(
        why,
        "keel detected a loop in task \"my-own-label\": the same call of tool \"search\" was made 5 times"
    );
    let left: u64 = left.trim_end_matches('s').parse().unwrap();
    assert!((50..=60).contains(&left), "{message}");
    assert_eq!(models.calls("primary"), 0, "the model was not called");
    // Only that label is paused.
    let (status, answer) = ask(&keel, "another-label", PROMPT).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(models.calls("primary"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_person_s_handoff_replaces_a_pause_keel_set_itself() {
    let models = sim().await;
    let mut keel = Keel::start(LOOPS, &models).await;
    let (id, _) = running_task(&keel).await;
    let approval = loop_until_handed_off(&keel, &id).await;

    // Restarted, keel no longer holds the person's stop in memory. A loop of tool calls
    // then gets a pause of keel's own: the supervisor refuses to hand off again a task that
    // waits for a person already.
    keel.child.kill().await.unwrap();
    let dir = std::mem::replace(&mut keel.dir, tempfile::tempdir().unwrap());
    let keel = Keel::start_in(dir, LOOPS, &models).await;
    let call = json!({"task": id, "args": {"query": "refund policy"}});
    for _ in 0..5 {
        let (status, answer) = post(&keel, "/v1/tools/search/invoke", None, call.clone()).await;
        assert_eq!(status, 200, "{answer}");
    }
    let (status, answer) = post(&keel, "/v1/tools/search/invoke", None, call).await;
    assert_eq!(status, 403, "{answer}");

    // The next model call learns of the person's handoff: the task waits for that person,
    // not for the pause to run out.
    let calls = models.calls("primary");
    let (status, refused) = ask(&keel, &id, PROMPT).await;
    assert_eq!(status, 409, "{refused}");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!(
            "it waits for a person (handoff {approval}: `keel approvals ls`, `keel approvals approve {approval}` to let it go on)"
        )),
        "{message}"
    );
    assert!(!message.contains("go on in"), "{message}");
    assert_eq!(models.calls("primary"), calls, "the model was not called");

    // So the person's approval lets it go on at once.
    approve_and_reclaim(&keel, &approval, &id).await;
    let (status, answer) = ask(&keel, &id, PROMPT).await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_cannot_act_in_another_agent_s_task() {
    let models = sim().await;
    let keel = Keel::start(LOOPS, &models).await;
    let (id, _) = running_task(&keel).await;
    let client = reqwest::Client::new();
    let tool = client
        .post(format!("{}/v1/tools/search/invoke", keel.url))
        .header("x-keel-agent", "intruder")
        .json(&json!({"task": id, "args": {"query": "x"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(tool.status().as_u16(), 403);
    let err: Value = tool.json().await.unwrap();
    assert_eq!(err["error"]["code"], "task_of_another_agent", "{err}");
    assert_eq!(
        err["error"]["message"],
        format!("task {id:?} belongs to agent \"looper\", not \"intruder\"")
    );
    // The same for model calls: the openai SDK raises PermissionDeniedError.
    let out = sdk(
        "chat",
        &keel.base_url(),
        &[
            "--header",
            &format!("x-keel-task={id}"),
            "--header",
            "x-keel-agent=intruder",
        ],
    )
    .await;
    assert_eq!(out["exception"], "PermissionDeniedError", "{out}");
    assert_eq!(models.calls("primary"), 0);
    assert_eq!(models.calls("tool:search"), 0);
    // Its owner can; a task id keel's supervisor does not know is the caller's own label.
    let (status, _) = post(
        &keel,
        "/v1/tools/search/invoke",
        None,
        json!({"task": id, "args": {"query": "x"}}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = ask(&keel, "my-own-label", PROMPT).await;
    assert_eq!(status, 200);
    // A label whose answers repeat is stopped too, but no person can let it go on: its calls
    // are refused for the loop guard's minute, not for good.
    for _ in 0..2 {
        let (status, answer) = ask(&keel, "my-own-label", PROMPT).await;
        assert_eq!(status, 200, "{answer}");
    }
    let (status, refused) = ask(&keel, "my-own-label", PROMPT).await;
    assert_eq!(status, 409, "{refused}");
    let message = refused["error"]["message"].as_str().unwrap();
    let (_, left) = message
        .split_once(
            "no person can let it go on (there is no supervisor task by that name), so they go on in ",
        )
        .unwrap_or_else(|| panic!("{message}"));
    let left: u64 = left.trim_end_matches('s').parse().unwrap();
    assert!((50..=60).contains(&left), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_burning_tokens_too_fast_is_stopped() {
    let models = sim().await;
    let config = format!("{LOOPS}\n[agents.looper]\ntask_tokens_per_minute = 60\n");
    let keel = Keel::start(&config, &models).await;
    let (id, token) = running_task(&keel).await;
    // Different questions, so no answer repeats: only the spend can stop the task.
    let mut calls = 0;
    loop {
        let (status, answer) = ask(
            &keel,
            &id,
            &format!("Question {calls}: describe part {calls} of the warranty terms in detail"),
        )
        .await;
        if status == 409 {
            assert_eq!(answer["error"]["code"], "loop_detected", "{answer}");
            break;
        }
        assert_eq!(status, 200, "{answer}");
        calls += 1;
        assert!(calls < 20, "never stopped");
    }
    let found = keel.events_of("loop_detected");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["kind"], "token_burn");
    assert!(found[0]["tokens_last_minute"].as_u64().unwrap() > 60);
    assert_eq!(found[0]["limit"], 60);
    assert_eq!(task_state(&keel, &id).await["state"], "awaiting_human");
    assert_eq!(heartbeat(&keel, &id, &token).await["directive"], "handoff");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_tasks_bouncing_the_same_content_are_both_stopped() {
    let models = sim().await;
    let keel = Keel::start(LOOPS, &models).await;
    let (a, _) = running_task(&keel).await;
    let (b, token_b) = running_task(&keel).await;
    // Each passes the other the same message; neither repeats itself three times.
    for task in [&a, &b, &a] {
        let (status, answer) = ask(&keel, task, PROMPT).await;
        assert_eq!(status, 200, "{answer}");
    }
    assert!(keel.events_of("loop_detected").is_empty());
    let (status, _) = ask(&keel, &b, PROMPT).await;
    assert_eq!(
        status, 200,
        "the answer that completes the bounce still arrives"
    );
    let found = keel.events_of("loop_detected");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["kind"], "bouncing");
    assert_eq!(found[0]["task"], b.as_str());
    assert_eq!(found[0]["other_task"], a.as_str());
    for task in [&a, &b] {
        assert_eq!(task_state(&keel, task).await["state"], "awaiting_human");
        let (status, answer) = ask(&keel, task, "Anything else to add about the policy?").await;
        assert_eq!(status, 409, "{answer}");
    }
    assert_eq!(heartbeat(&keel, &b, &token_b).await["directive"], "handoff");
}

#[tokio::test(flavor = "multi_thread")]
async fn streamed_answers_that_repeat_are_caught_like_whole_ones() {
    let models = sim().await;
    let keel = Keel::start(LOOPS, &models).await;
    let (id, token) = running_task(&keel).await;
    let client = reqwest::Client::new();
    for _ in 0..3 {
        let response = client
            .post(format!("{}/v1/chat/completions", keel.url))
            .header("x-keel-agent", "looper")
            .header("x-keel-task", &id)
            .json(&json!({"model": "smart", "stream": true,
                "messages": [{"role": "user", "content": PROMPT}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        let text = response.text().await.unwrap();
        assert!(text.contains("data: [DONE]"), "{text}");
    }
    let found = keel.events_of("loop_detected");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["kind"], "repeated_output");
    assert_eq!(found[0]["similar"], 3);
    assert_eq!(task_state(&keel, &id).await["state"], "awaiting_human");
    assert_eq!(heartbeat(&keel, &id, &token).await["directive"], "handoff");
    let (status, answer) = ask(
        &keel,
        &id,
        "Something else entirely, about shipping to Canada",
    )
    .await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["error"]["code"], "loop_detected", "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_s_loop_guard_limits_are_its_own() {
    let models = sim().await;
    let config = format!("{LOOPS}\n[agents.tuned]\nloop_guard = {{ same_call = 2 }}\n");
    let keel = Keel::start(&config, &models).await;
    let call = json!({"task": "tuned-1", "args": {"query": "refund policy"}});
    let invoke = |agent: &'static str, body: Value| {
        let keel = &keel;
        async move {
            keel.post_json("/v1/tools/search/invoke", &[("x-keel-agent", agent)], &body)
                .await
        }
    };
    for _ in 0..2 {
        let (status, answer) = invoke("tuned", call.clone()).await;
        assert_eq!(status, 200, "{answer}");
    }
    let (status, answer) = invoke("tuned", call).await;
    assert_eq!(
        status, 403,
        "the third identical call of `tuned` is a loop: {answer}"
    );
    assert_eq!(answer["rules"], json!(["loop:same_call"]));
    assert_eq!(keel.events_of("loop_detected")[0]["repeats"], 2);
    // Another agent keeps the default (5).
    let other = json!({"task": "looper-1", "args": {"query": "refund policy"}});
    for _ in 0..3 {
        let (status, answer) = invoke("looper", other.clone()).await;
        assert_eq!(status, 200, "{answer}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_check_retried_with_its_idempotency_key_is_not_counted_as_a_repeat() {
    let models = sim().await;
    let config = format!("{LOOPS}\n[agents.tuned]\nloop_guard = {{ same_call = 2 }}\n");
    let keel = Keel::start(&config, &models).await;
    let check = json!({"agent": "tuned", "task": "tuned-1", "tool": "search", "args": {"query": "refund policy"}});
    let ask = |key: Option<&'static str>, body: Value| {
        let keel = &keel;
        async move {
            let mut headers = vec![("x-keel-agent", "tuned")];
            headers.extend(key.map(|k| ("idempotency-key", k)));
            keel.post_json("/v1/actions/check", &headers, &body).await
        }
    };
    // A client retrying one check (its answer lost, say) gets the first verdict each time.
    for _ in 0..4 {
        let (status, answer) = ask(Some("check-1"), check.clone()).await;
        assert_eq!(
            (status, &answer["verdict"]),
            (200, &json!("allow")),
            "{answer}"
        );
    }
    assert_eq!(keel.events_of("action_checked").len(), 1);
    assert!(keel.events_of("loop_detected").is_empty());
    let other = json!({"agent": "tuned", "task": "tuned-1", "tool": "search", "args": {"query": "shipping"}});
    let (status, err) = ask(Some("check-1"), other).await;
    assert_eq!(status, 422, "{err}");
    assert_eq!(err["error"]["code"], "idempotency_key_reused", "{err}");
    // Checks without a key are each a call: the second more is the loop.
    let (status, answer) = ask(None, check.clone()).await;
    assert_eq!(
        (status, &answer["verdict"]),
        (200, &json!("allow")),
        "{answer}"
    );
    let (status, answer) = ask(None, check).await;
    assert_eq!(
        (status, &answer["verdict"]),
        (200, &json!("block")),
        "{answer}"
    );
    assert_eq!(keel.events_of("loop_detected")[0]["repeats"], 2);
}
