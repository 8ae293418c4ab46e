//! `kill -9` under load: every call that got a response has its `llm_call` after restart.

use std::collections::HashSet;
use std::time::Duration;

use crate::common::{Keel, TWO_TARGETS, read_events, sim};

#[tokio::test(flavor = "multi_thread")]
async fn every_answered_call_survives_kill_9() {
    answered_calls_survive_kill_9(TWO_TARGETS).await;
}

/// The same with the store at `durability = "relaxed"` (a call is answered once its
/// commit is written, not synced) and payloads not recorded: the gateway's lightest setup
/// still keeps every answered call through `kill -9` of keel.
#[tokio::test(flavor = "multi_thread")]
async fn every_answered_call_survives_kill_9_with_relaxed_durability_and_events_only() {
    let store = "url = \"sqlite://{dir}/keel.db\"\n";
    assert!(TWO_TARGETS.contains(store));
    let config = TWO_TARGETS.replace(
        store,
        &format!("{store}durability = \"relaxed\"\nrecord_payloads = false\n"),
    );
    answered_calls_survive_kill_9(&config).await;
}

/// Loads keel (configured by `config`) from 16 clients, `kill -9`s it, and checks that
/// every answered call has its `llm_call` event and that keel starts again over the store.
async fn answered_calls_survive_kill_9(config: &str) {
    let sim = sim().await;
    let mut keel = Keel::start(config, &sim).await;
    let url = format!("{}/v1/chat/completions", keel.url);
    let client = reqwest::Client::new();
    let mut workers = Vec::new();
    for worker in 0..16 {
        let client = client.clone();
        let url = url.clone();
        workers.push(tokio::spawn(async move {
            let mut answered = Vec::new();
            for i in 0.. {
                let step = format!("w{worker}-{i}");
                let body = serde_json::json!({"model": "smart", "messages": [{"role": "user", "content": step}]});
                let sent = client.post(&url).header("x-keel-step", &step).json(&body).send().await;
                match sent {
                    Ok(r) if r.status().is_success() => match r.bytes().await {
                        Ok(_) => answered.push(step),
                        Err(_) => break,
                    },
                    _ => break,
                }
            }
            answered
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pid = keel.child.id().unwrap();
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    keel.child.wait().await.unwrap();
    let mut answered = HashSet::new();
    for w in workers {
        answered.extend(w.await.unwrap());
    }
    assert!(
        answered.len() > 50,
        "too little load before the kill: {}",
        answered.len()
    );
    let recorded: HashSet<String> = read_events(&keel.db_path())
        .into_iter()
        .filter(|(k, _)| k == "llm_call")
        .filter_map(|(_, d)| d["step"].as_str().map(str::to_owned))
        .collect();
    let lost: Vec<_> = answered.difference(&recorded).collect();
    assert!(
        lost.is_empty(),
        "{} answered calls have no llm_call event: {lost:?}",
        lost.len()
    );
    // keel starts again over the same store and keeps appending to the chain.
    let dir = std::mem::replace(&mut keel.dir, tempfile::tempdir().unwrap());
    let keel = Keel::start_in(dir, config, &sim).await;
    let r = client
        .post(format!("{}/v1/chat/completions", keel.url))
        .json(&serde_json::json!({"model": "smart", "messages": [{"role": "user", "content": "after restart"}]}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
}
