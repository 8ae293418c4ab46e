//! CLI commands that read or change state through a running keel's HTTP API:
//! `keel tasks`, `keel dlq`, `keel approvals`, `keel audit verify`.
//!
//! Tables for people; `--json` prints the server's JSON for scripts.

use anyhow::{Context, bail};
use keel_core::text::one_line;
use serde_json::Value;

use crate::output;

/// Where the server is and how to authenticate to it.
pub struct Client {
    base: String,
    http: reqwest::Client,
    token: Option<String>,
}

impl Client {
    /// A client of the server at `base` (e.g. `http://127.0.0.1:8420`).
    pub fn new(base: &str, token: Option<String>) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            http,
            token,
        })
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, String)> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url);
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let response = req.send().await.with_context(|| {
            format!(
                "cannot reach keel at {} (is `keel serve` running? --server sets the address)",
                self.base
            )
        })?;
        let status = response.status().as_u16();
        let text = response.text().await.context("cannot read the answer")?;
        if status >= 400 {
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                .unwrap_or(text);
            bail!("{message} (HTTP {status})");
        }
        Ok((status, text))
    }

    /// `GET path` as JSON.
    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let (_, text) = self.send(reqwest::Method::GET, path, None).await?;
        serde_json::from_str(&text).context("the server's answer is not JSON")
    }

    /// `GET path` as text.
    pub async fn get_text(&self, path: &str) -> anyhow::Result<String> {
        Ok(self.send(reqwest::Method::GET, path, None).await?.1)
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let (_, text) = self.send(reqwest::Method::POST, path, Some(body)).await?;
        if text.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).context("the server's answer is not JSON")
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => one_line(s, usize::MAX),
        other => other.to_string(),
    }
}

/// A task's `last_error` in a table cell: a worker's error as it sent it (its `message` or
/// `msg` when it sent an object with one), a person's decision as `denied by NAME: NOTE`.
fn last_error(error: &Value) -> String {
    let text = |key: &str| error.get(key).and_then(Value::as_str);
    match (text("reason"), text("by")) {
        (Some(reason), Some(by)) => match text("note") {
            Some(note) => format!("{reason} by {by}: {note}"),
            None => format!("{reason} by {by}"),
        },
        _ => match text("message").or_else(|| text("msg")) {
            Some(message) => message.to_owned(),
            None => cell(error),
        },
    }
}

fn ms_to_time(v: &Value) -> String {
    v.as_i64().map_or_else(
        || "-".to_owned(),
        |ms| {
            // RFC 3339 ends at the year 9999; a later time is shown as it came.
            const LAST_RFC3339_SECOND: u64 = 253_402_300_799;
            match u64::try_from(ms.div_euclid(1000)) {
                Ok(secs) if secs <= LAST_RFC3339_SECOND => {
                    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
                    humantime::format_rfc3339_seconds(t).to_string()
                }
                _ => format!("{ms} (unix ms)"),
            }
        },
    )
}

/// The longest free text (a last error, an approval's reason) shown in a table cell.
pub(crate) const MAX_TEXT: usize = 80;

/// Prints rows as a left-aligned table with a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    // Each cell on one line; ids and data whole, to be copied into the next command.
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|c| one_line(c, usize::MAX)).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, c) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        output::line(padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_uppercase()).collect());
    for row in rows {
        line(row);
    }
}

/// A table of tasks (`GET /v1/tasks` or `/v1/dlq` answers).
/// `more` is what the next page's command needs besides the cursor (the listing's filters,
/// an `--order` that is not its default).
pub fn task_table(answer: &Value, more: &str) {
    let rows: Vec<Vec<String>> = answer["tasks"]
        .as_array()
        .map(|tasks| {
            tasks
                .iter()
                .map(|t| {
                    vec![
                        cell(&t["id"]),
                        cell(&t["agent"]),
                        cell(&t["state"]),
                        format!("{}/{}", cell(&t["attempts"]), cell(&t["max_attempts"])),
                        cell(&t["steps"]),
                        t["checkpoint"]["seq"]
                            .as_u64()
                            .map_or("-".to_owned(), |s| s.to_string()),
                        ms_to_time(&t["updated_at_ms"]),
                        one_line(&last_error(&t["last_error"]), MAX_TEXT),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        &[
            "id",
            "agent",
            "state",
            "attempts",
            "steps",
            "checkpoint",
            "updated",
            "last error",
        ],
        &rows,
    );
    if let Some(next) = answer["next"].as_str() {
        output::line(&format!("(more: --cursor {next}{more})"));
    }
}

/// One task, field by field.
pub fn task_detail(t: &Value) {
    for key in [
        "id",
        "agent",
        "state",
        "attempts",
        "max_attempts",
        "steps",
        "max_steps",
    ] {
        output::line(&format!("{key:<14}{}", cell(&t[key])));
    }
    output::line(&format!(
        "{:<14}{}",
        "created",
        ms_to_time(&t["created_at_ms"])
    ));
    output::line(&format!(
        "{:<14}{}",
        "updated",
        ms_to_time(&t["updated_at_ms"])
    ));
    output::line(&format!(
        "{:<14}{}",
        "deadline",
        ms_to_time(&t["deadline_ms"])
    ));
    if let Some(lease) = t["lease"].as_object() {
        output::line(&format!(
            "{:<14}{} until {}",
            "lease",
            cell(&lease["worker"]),
            ms_to_time(&lease["expires_at_ms"])
        ));
    }
    if let Some(c) = t["checkpoint"].as_object() {
        output::line(&format!(
            "{:<14}#{} {} ({} bytes)",
            "checkpoint",
            cell(&c["seq"]),
            cell(&c["label"]),
            cell(&c["size"])
        ));
    }
    for key in ["input", "output", "last_error", "approval"] {
        if !t[key].is_null() {
            output::line(&format!("{key:<14}{}", t[key]));
        }
    }
}

/// A task's events, one per line.
pub fn event_lines(ndjson: &str) {
    let rows: Vec<Vec<String>> = ndjson
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|e| {
            vec![
                cell(&e["seq"]),
                cell(&e["at"]),
                cell(&e["kind"]),
                e["data"].to_string(),
            ]
        })
        .collect();
    table(&["seq", "at", "kind", "data"], &rows);
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{MAX_TEXT, cell, last_error, one_line};

    #[test]
    fn a_cell_stays_on_one_line_and_prints_no_control_character() {
        let task = json!({"tasks": [{"id": "t-1", "last_error": {"message": "wire money\nAPPROVED BY CFO \u{1b}[2K"}}]});
        let error = one_line(&last_error(&task["tasks"][0]["last_error"]), MAX_TEXT);
        assert_eq!(error, "wire money\\nAPPROVED BY CFO \\u{1b}[2K");
        // Free text is cut; an id is shown whole, to be copied into the next command.
        let long = "x".repeat(200);
        assert_eq!(
            one_line(&last_error(&json!(long)), MAX_TEXT),
            format!("{}...", "x".repeat(MAX_TEXT))
        );
        assert_eq!(cell(&json!("t-\u{7}bell")), "t-\\u{7}bell");
        assert_eq!(cell(&json!(long)), long);
    }

    #[test]
    fn a_last_error_reads_as_words_in_a_table() {
        assert_eq!(last_error(&json!(null)), "-");
        assert_eq!(
            last_error(&json!("task_timeout exceeded")),
            "task_timeout exceeded"
        );
        assert_eq!(
            last_error(&json!({"message": "tool crashed"})),
            "tool crashed"
        );
        assert_eq!(last_error(&json!({"msg": "boom 2"})), "boom 2");
        assert_eq!(
            last_error(&json!({"reason": "denied", "by": "alice", "note": "too risky"})),
            "denied by alice: too risky"
        );
        assert_eq!(
            last_error(&json!({"reason": "denied", "by": "timeout", "note": null})),
            "denied by timeout"
        );
        assert_eq!(last_error(&json!({"code": 7})), r#"{"code":7}"#);
    }
}
