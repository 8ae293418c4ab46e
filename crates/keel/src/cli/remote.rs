//! What the admin commands do: call the server, print tables or JSON.

use std::process::ExitCode;

use serde_json::{Value, json};

use super::admin::{self, Client};
use super::{ApprovalsCommand, DlqCommand, Order, ServerArgs, TasksCommand};
use crate::output;

/// Runs an admin command against the server on a small runtime.
pub fn run<F, Fut>(server: &ServerArgs, f: F) -> anyhow::Result<ExitCode>
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<ExitCode>>,
{
    // `$KEEL_ADMIN_TOKEN` wins (below): with it set, the variable the config names need not
    // be, so it stands in for a variable that is missing.
    let given = std::env::var("KEEL_ADMIN_TOKEN").ok();
    let env = |name: &str| std::env::var(name).ok().or_else(|| given.clone());
    let configured = match &server.config {
        Some(path) => match keel_config::load_server(path, &env) {
            Ok(settings) => Some(settings),
            Err(errors) => {
                for e in &errors.0 {
                    output::error(&e.to_string());
                }
                return Ok(ExitCode::from(2));
            }
        },
        None => None,
    };
    // An empty `$KEEL_SERVER` is no address, as an empty `$KEEL_ADMIN_TOKEN` is no token.
    let base = match server
        .server
        .as_deref()
        .filter(|url| !url.trim().is_empty())
    {
        Some(url) => base_url(url)?,
        None => {
            let listen = configured
                .as_ref()
                .map_or(keel_config::DEFAULT_LISTEN_ADDR, |s| s.listen);
            format!("http://{}", reachable(listen))
        }
    };
    let token = given.or_else(|| {
        configured
            .and_then(|s| s.admin_token)
            .map(|t| t.expose().to_owned())
    });
    let client = Client::new(&base, token)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(f(client))
}

/// `--server` as a base URL; `IP:PORT` or `HOST:PORT` alone means plain HTTP.
pub(crate) fn base_url(given: &str) -> anyhow::Result<String> {
    let given = given.trim().trim_end_matches('/');
    // The SDKs' base URL (`http://127.0.0.1:8420/v1`) names the same keel.
    let given = given.strip_suffix("/v1").unwrap_or(given);
    let url = if given.contains("://") {
        given.to_owned()
    } else {
        format!("http://{given}")
    };
    match reqwest::Url::parse(&url) {
        Ok(parsed) if matches!(parsed.scheme(), "http" | "https") && parsed.host().is_some() => {
            Ok(url)
        }
        Ok(parsed) => anyhow::bail!(
            "--server (or $KEEL_SERVER) {given:?}: keel speaks http or https, not {:?}; write a URL like http://127.0.0.1:8420",
            parsed.scheme()
        ),
        Err(e) => anyhow::bail!(
            "--server (or $KEEL_SERVER) {given:?} is not a URL ({e}); write a URL like http://127.0.0.1:8420"
        ),
    }
}

/// Where a client reaches a server listening on `listen`: a wildcard address (all
/// interfaces) is reached on loopback.
fn reachable(listen: std::net::SocketAddr) -> std::net::SocketAddr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    std::net::SocketAddr::new(ip, listen.port())
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

/// A task id as a path segment. `claim`, `.` and `..` are no task's id (keel refuses them at
/// creation): as a path they would reach another endpoint, or none.
fn task_segment(id: &str) -> anyhow::Result<String> {
    if keel_supervisor::RESERVED_TASK_IDS.contains(&id) {
        anyhow::bail!("{id:?} is not a task id: claim, . and .. are reserved");
    }
    Ok(urlencode(id))
}

/// Percent-encodes everything but RFC 3986's unreserved characters: right in a path
/// segment and in a query value alike.
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

/// ` NAME VALUE` for a listing's filter that is set, the value quoted for a shell when it
/// needs it; empty when unset.
fn flag(name: &str, value: Option<&str>) -> String {
    let Some(value) = value else {
        return String::new();
    };
    let plain = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '/'));
    if plain {
        format!(" {name} {value}")
    } else {
        format!(" {name} '{}'", value.replace('\'', r"'\''"))
    }
}

/// ` --limit N` when `limit` is not the listing's default.
fn limit_flag(limit: u64, default: u64) -> String {
    flag(
        "--limit",
        (limit != default).then(|| limit.to_string()).as_deref(),
    )
}

/// `keel tasks ...`
pub async fn tasks(c: Client, command: TasksCommand, json: bool) -> anyhow::Result<ExitCode> {
    let is_requeue = matches!(command, TasksCommand::Requeue { .. });
    match command {
        TasksCommand::Ls {
            state,
            agent,
            limit,
            cursor,
            order,
        } => {
            // What the next page's command needs besides its cursor: the same filters.
            let more = format!(
                "{}{}{}{}",
                flag("--state", state.as_deref()),
                flag("--agent", agent.as_deref()),
                limit_flag(limit, super::TASKS_PAGE),
                flag("--order", order.unless(Order::Desc))
            );
            let q = query(&[
                ("state", state),
                ("agent", agent),
                ("limit", Some(limit.to_string())),
                ("cursor", cursor),
                ("order", Some(order.as_str().to_owned())),
            ]);
            let v = c.get(&format!("/v1/tasks{q}")).await?;
            if json {
                print_json(&v)
            } else {
                admin::task_table(&v, &more)
            }
        }
        TasksCommand::Show { id } => {
            let v = c.get(&format!("/v1/tasks/{}", task_segment(&id)?)).await?;
            if json {
                print_json(&v)
            } else {
                admin::task_detail(&v)
            }
        }
        TasksCommand::Events { id } => {
            let text = c
                .get_text(&format!("/v1/tasks/{}/events", task_segment(&id)?))
                .await?;
            if json {
                output::line(text.trim_end())
            } else {
                admin::event_lines(&text)
            }
        }
        TasksCommand::Requeue { id, reason } | TasksCommand::Cancel { id, reason } => {
            let call = if is_requeue { "requeue" } else { "cancel" };
            let v = c
                .post(
                    &format!("/v1/tasks/{}/{call}", task_segment(&id)?),
                    json!({"reason": reason}),
                )
                .await?;
            print_state(&v, json);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A task an operator call changed: its JSON, or its state in a line.
fn print_state(v: &Value, json: bool) {
    if json {
        print_json(v)
    } else {
        output::line(&state_line(v))
    }
}

/// `keel dlq ...`
pub async fn dlq(c: Client, command: DlqCommand, json: bool) -> anyhow::Result<ExitCode> {
    let v = match command {
        DlqCommand::Ls {
            agent,
            limit,
            cursor,
            order,
        } => {
            let more = format!(
                "{}{}{}",
                flag("--agent", agent.as_deref()),
                limit_flag(limit, super::DLQ_PAGE),
                flag("--order", order.unless(Order::Asc))
            );
            let q = query(&[
                ("agent", agent),
                ("limit", Some(limit.to_string())),
                ("cursor", cursor),
                ("order", Some(order.as_str().to_owned())),
            ]);
            let v = c.get(&format!("/v1/dlq{q}")).await?;
            if json {
                print_json(&v)
            } else {
                admin::task_table(&v, &more)
            }
            return Ok(ExitCode::SUCCESS);
        }
        DlqCommand::Show { id } => {
            let mut v = c.get(&format!("/v1/tasks/{}", task_segment(&id)?)).await?;
            if v["state"] != "dead" {
                anyhow::bail!(
                    "task {id} is not in the dead-letter queue: it is {} (`keel tasks show {id}`)",
                    v["state"].as_str().unwrap_or("in an unknown state")
                );
            }
            // Its last error and its whole log, to decide between requeue and discard.
            let log = c
                .get_text(&format!("/v1/tasks/{}/events", task_segment(&id)?))
                .await?;
            if json {
                let events: Vec<Value> = log
                    .lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect();
                v["events"] = Value::Array(events);
                print_json(&v)
            } else {
                admin::task_detail(&v);
                output::line("");
                admin::event_lines(&log);
            }
            return Ok(ExitCode::SUCCESS);
        }
        DlqCommand::Requeue { id, note } => {
            c.post(
                &format!("/v1/dlq/{}/requeue", task_segment(&id)?),
                json!({"note": note}),
            )
            .await?
        }
        DlqCommand::Discard { id, note } => {
            c.post(
                &format!("/v1/dlq/{}/discard", task_segment(&id)?),
                json!({"note": note}),
            )
            .await?
        }
    };
    print_state(&v, json);
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
                                    .map(|k| match (*k, a[*k].as_str()) {
                                        ("reason", Some(reason)) => {
                                            keel_core::text::one_line(reason, admin::MAX_TEXT)
                                        }
                                        (_, text) => text.unwrap_or("-").to_owned(),
                                    })
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

/// `keel postmortem ID`: Markdown, or the server's JSON.
pub async fn postmortem(c: Client, id: String, json: bool) -> anyhow::Result<ExitCode> {
    let v = c.get(&format!("/v1/postmortem/{}", urlencode(&id))).await?;
    if json {
        print_json(&v);
    } else {
        let report: keel_observe::postmortem::Postmortem =
            serde_json::from_value(v).map_err(|e| {
                anyhow::anyhow!("the server sent a postmortem this CLI cannot read: {e}")
            })?;
        output::line(report.to_markdown().trim_end());
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

#[cfg(test)]
mod tests {
    use super::{base_url, flag, reachable};

    #[test]
    fn a_next_page_flag_is_quoted_only_when_a_shell_needs_it() {
        assert_eq!(flag("--agent", None), "");
        assert_eq!(flag("--agent", Some("support-bot")), " --agent support-bot");
        assert_eq!(flag("--agent", Some("a b")), " --agent 'a b'");
        assert_eq!(flag("--agent", Some("it's")), r" --agent 'it'\''s'");
    }

    #[test]
    fn a_reserved_word_is_no_task_id() {
        for id in ["claim", ".", ".."] {
            let e = super::task_segment(id).unwrap_err().to_string();
            assert!(e.contains("is not a task id"), "{e}");
        }
        assert_eq!(super::task_segment("a b/c").unwrap(), "a%20b%2Fc");
    }

    #[test]
    fn server_without_a_scheme_is_plain_http() {
        assert_eq!(base_url("127.0.0.1:8420").unwrap(), "http://127.0.0.1:8420");
        assert_eq!(
            base_url("keel.internal:80/").unwrap(),
            "http://keel.internal:80"
        );
        assert_eq!(
            base_url("https://keel.example.com/").unwrap(),
            "https://keel.example.com"
        );
        // The SDKs' base URL names the same keel.
        assert_eq!(
            base_url("http://127.0.0.1:8420/v1/").unwrap(),
            "http://127.0.0.1:8420"
        );
    }

    #[test]
    fn a_server_that_is_not_an_http_url_is_refused_with_an_example() {
        let e = base_url("ftp://127.0.0.1:21").unwrap_err().to_string();
        assert!(e.contains("keel speaks http or https, not \"ftp\""), "{e}");
        let e = base_url("127.0.0.1:99999").unwrap_err().to_string();
        assert!(
            e.starts_with("--server (or $KEEL_SERVER) \"127.0.0.1:99999\" is not a URL (")
                && e.ends_with("write a URL like http://127.0.0.1:8420"),
            "{e}"
        );
    }

    #[test]
    fn a_wildcard_listen_address_is_reached_on_loopback() {
        assert_eq!(
            reachable("0.0.0.0:9000".parse().unwrap()).to_string(),
            "127.0.0.1:9000"
        );
        assert_eq!(
            reachable("[::]:9000".parse().unwrap()).to_string(),
            "[::1]:9000"
        );
        assert_eq!(
            reachable("10.0.0.5:9000".parse().unwrap()).to_string(),
            "10.0.0.5:9000"
        );
    }
}
