//! What the admin commands do: call the server, print tables or JSON.

use std::process::ExitCode;

use serde_json::{Value, json};

use super::admin::{self, Client};
use super::{ApprovalsCommand, DlqCommand, ServerArgs, TasksCommand};
use crate::output;

/// Runs an admin command against the server on a small runtime.
pub fn run<F, Fut>(server: &ServerArgs, f: F) -> anyhow::Result<ExitCode>
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<ExitCode>>,
{
    let client = Client::new(&server.server, std::env::var("KEEL_ADMIN_TOKEN").ok())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(f(client))
}

fn print_json(v: &Value) {
    output::line(&serde_json::to_string_pretty(v).unwrap_or_default());
}

fn query(pairs: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", urlencode(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

fn urlencode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn state_line(v: &Value) -> String {
    format!(
        "{} is now {}",
        v["id"].as_str().unwrap_or("?"),
        v["state"].as_str().unwrap_or("?")
    )
}

/// `keel tasks ...`
pub async fn tasks(c: Client, command: TasksCommand, json: bool) -> anyhow::Result<ExitCode> {
    match command {
        TasksCommand::Ls {
            state,
            agent,
            limit,
            cursor,
        } => {
            let q = query(&[
                ("state", state),
                ("agent", agent),
                ("limit", Some(limit.to_string())),
                ("cursor", cursor),
            ]);
            let v = c.get(&format!("/v1/tasks{q}")).await?;
            if json {
                print_json(&v)
            } else {
                admin::task_table(&v)
            }
        }
        TasksCommand::Show { id } => {
            let v = c.get(&format!("/v1/tasks/{}", urlencode(&id))).await?;
            if json {
                print_json(&v)
            } else {
                admin::task_detail(&v)
            }
        }
        TasksCommand::Events { id } => {
            let text = c
                .get_text(&format!("/v1/tasks/{}/events", urlencode(&id)))
                .await?;
            if json {
                output::line(text.trim_end())
            } else {
                admin::event_lines(&text)
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `keel dlq ...`
pub async fn dlq(c: Client, command: DlqCommand, json: bool) -> anyhow::Result<ExitCode> {
    let v = match command {
        DlqCommand::Ls {
            agent,
            limit,
            cursor,
        } => {
            let q = query(&[
                ("agent", agent),
                ("limit", Some(limit.to_string())),
                ("cursor", cursor),
            ]);
            let v = c.get(&format!("/v1/dlq{q}")).await?;
            if json {
                print_json(&v)
            } else {
                admin::task_table(&v)
            }
            return Ok(ExitCode::SUCCESS);
        }
        DlqCommand::Show { id } => {
            let v = c.get(&format!("/v1/tasks/{}", urlencode(&id))).await?;
            if json {
                print_json(&v)
            } else {
                admin::task_detail(&v)
            }
            return Ok(ExitCode::SUCCESS);
        }
        DlqCommand::Requeue { id } => {
            c.post(&format!("/v1/dlq/{}/requeue", urlencode(&id)), json!({}))
                .await?
        }
        DlqCommand::Discard { id, note } => {
            c.post(
                &format!("/v1/dlq/{}/discard", urlencode(&id)),
                json!({"note": note}),
            )
            .await?
        }
    };
    if json {
        print_json(&v)
    } else {
        output::line(&state_line(&v))
    }
    Ok(ExitCode::SUCCESS)
}

/// `keel approvals ...`
pub async fn approvals(
    c: Client,
    command: ApprovalsCommand,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let (id, decision, note) = match command {
        ApprovalsCommand::Ls => {
            let v = c.get("/v1/approvals").await?;
            if json {
                print_json(&v);
            } else {
                let keys = ["id", "task", "agent", "reason", "default"];
                let rows: Vec<Vec<String>> = v["approvals"]
                    .as_array()
                    .map(|list| {
                        list.iter()
                            .map(|a| {
                                keys.iter()
                                    .map(|k| a[*k].as_str().unwrap_or("-").to_owned())
                                    .collect()
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                admin::table(&keys, &rows);
            }
            return Ok(ExitCode::SUCCESS);
        }
        ApprovalsCommand::Approve { id, note } => (id, "approve", note),
        ApprovalsCommand::Deny { id, note } => (id, "deny", note),
    };
    let by = std::env::var("USER").unwrap_or_else(|_| "cli".to_owned());
    let body = json!({"decision": decision, "note": note, "by": by});
    let v = c
        .post(&format!("/v1/approvals/{}", urlencode(&id)), body)
        .await?;
    if json {
        print_json(&v)
    } else {
        output::line(&format!(
            "{id} {}: {}",
            if decision == "approve" {
                "approved"
            } else {
                "denied"
            },
            state_line(&v)
        ))
    }
    Ok(ExitCode::SUCCESS)
}

/// `keel audit verify`: exit 1 when the chain is broken.
pub async fn audit(c: Client, json: bool) -> anyhow::Result<ExitCode> {
    let v = c.get("/v1/audit/verify").await?;
    let intact = v["intact"] == true;
    if json {
        print_json(&v);
    } else if intact {
        output::line(&format!(
            "hash chain intact: {} events verified",
            v["events"]
        ));
    } else {
        output::error(&format!(
            "hash chain broken at event {}: {}",
            v["first_broken_seq"],
            v["reason"].as_str().unwrap_or("?")
        ));
    }
    Ok(if intact {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
