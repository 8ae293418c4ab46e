//! Bytes keel stores per model call in a long conversation (issue: storage must
//! not grow like the peers'). An agent resends its whole history with every
//! call; keel stores each message once, so bytes per call should stay flat.

use std::path::Path;

use anyhow::Context;
use serde_json::json;

/// What a conversation cost: bytes the client sent and bytes keel stored.
pub struct ConversationCost {
    /// Calls made.
    pub calls: usize,
    /// Request body bytes sent in all.
    pub sent: u64,
    /// Blob and event bytes stored for the conversation's task.
    pub stored: u64,
}

/// Runs a `calls`-call conversation through keel at `base_url` under task
/// `task`, then reads what `db` holds for that task.
pub async fn measure(
    base_url: &str,
    route: &str,
    db: &Path,
    task: &str,
    calls: usize,
) -> anyhow::Result<ConversationCost> {
    let client = reqwest::Client::new();
    let url = format!(
        "{}/tasks/{task}/v1/chat/completions",
        base_url.trim_end_matches('/').trim_end_matches("/v1")
    );
    let mut messages =
        vec![json!({"role": "system", "content": "You are a careful support agent. ".repeat(20)})];
    let mut sent = 0u64;
    for turn in 0..calls {
        messages.push(json!({"role": "user", "content": format!("question {turn}: {}", "details ".repeat(40))}));
        let body = json!({"model": route, "messages": messages});
        sent += body.to_string().len() as u64;
        let answer: serde_json::Value = client
            .post(&url)
            .json(&body)
            .send()
            .await
            .context("conversation call")?
            .error_for_status()
            .context("conversation call failed")?
            .json()
            .await
            .context("conversation answer")?;
        messages.push(answer["choices"][0]["message"].clone());
    }
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("opening {}", db.display()))?;
    let blobs: i64 = conn.query_row(
        "SELECT coalesce(sum(b.size), 0) FROM blobs b JOIN task_blobs t ON t.hash = b.hash WHERE t.task_id = ?1",
        [task],
        |r| r.get(0),
    )?;
    let events: i64 = conn.query_row(
        "SELECT coalesce(sum(length(data)), 0) FROM events WHERE task_id = ?1",
        [task],
        |r| r.get(0),
    )?;
    Ok(ConversationCost {
        calls,
        sent,
        stored: u64::try_from(blobs + events).unwrap_or(0),
    })
}
