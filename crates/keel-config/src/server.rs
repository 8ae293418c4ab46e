//! `[server]` (listen address, admin token, body limit and timeout) and `[store]` (event
//! store backend).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;

use serde::Deserialize;

use crate::error::{Invalid, KeyPath, Problems};
use crate::secret::{self, Secret};

/// The address `keel serve` listens on when no config says otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8420";

/// [`DEFAULT_LISTEN`] as a socket address.
pub const DEFAULT_LISTEN_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8420));

/// Default limit on a request body: 4 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Default time a request body may take to arrive: 60 s.
pub const DEFAULT_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Longest `[server] body_timeout`: a client that stops sending holds its request (and a
/// stop of keel) this long.
pub const MAX_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// The shortest `body_timeout`: under a second is a typo (`"1ms"` for `"1m"`) more likely
/// than a choice, and would refuse every large request.
pub const MIN_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// The largest `max_body_bytes`: a request's body is held in memory.
pub const MAX_BODY_BYTES: usize = 1 << 30;

/// The store used when no config says otherwise.
pub const DEFAULT_STORE_URL: &str = "sqlite://keel-data/keel.db";

// === server ===

/// `[server]` as written in keel.toml. Nothing here is trusted yet.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// `IP:PORT` to listen on.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Environment variable holding the admin API bearer token.
    #[serde(default)]
    pub admin_token_env: Option<String>,
    /// Largest accepted request body, in bytes.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// How long a request body may take to arrive (default 60s).
    #[serde(default, deserialize_with = "crate::duration::optional")]
    pub body_timeout: Option<std::time::Duration>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            admin_token_env: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            body_timeout: None,
        }
    }
}

fn default_listen() -> String {
    DEFAULT_LISTEN.to_owned()
}

fn default_max_body_bytes() -> usize {
    DEFAULT_MAX_BODY_BYTES
}

/// Validated `[server]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// Address of the HTTP listener (gateway, task API, admin API, metrics, UI).
    pub listen: SocketAddr,
    /// Bearer token for the admin API; `None` leaves it open (loopback setups).
    pub admin_token: Option<Secret>,
    /// Largest accepted request body in bytes; at least 1.
    pub max_body_bytes: usize,
    /// How long a request body may take to arrive before it is refused (a 408): a client
    /// that stops sending cannot hold a request, or keel's stop, for good.
    pub body_timeout: std::time::Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN_ADDR,
            admin_token: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            body_timeout: DEFAULT_BODY_TIMEOUT,
        }
    }
}

impl ServerConfig {
    /// Checks every rule and reads the admin token from `env`.
    pub fn validate(
        self,
        at: &KeyPath,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ServerSettings, Vec<Invalid>> {
        let mut problems = Problems::default();
        let listen = problems.one(self.listen.parse::<SocketAddr>().map_err(|_| {
            at.child("listen").invalid(format!(
                "{:?} is not a socket address; write IP:PORT, like \"{DEFAULT_LISTEN}\"",
                self.listen
            ))
        }));
        let admin_token = match &self.admin_token_env {
            Some(var) => problems
                .one(secret::from_env(var, &at.child("admin_token_env"), env))
                .map(Some),
            None => Some(None),
        };
        if self.max_body_bytes == 0 || self.max_body_bytes > MAX_BODY_BYTES {
            problems.push(at.child("max_body_bytes").invalid(format!(
                "{} is outside 1 to {MAX_BODY_BYTES} (1 GiB): keel holds a request's body in memory",
                self.max_body_bytes
            )));
        }
        let body_timeout = self.body_timeout.unwrap_or(DEFAULT_BODY_TIMEOUT);
        if body_timeout < MIN_BODY_TIMEOUT || body_timeout > MAX_BODY_TIMEOUT {
            problems.push(at.child("body_timeout").invalid(format!(
                "{} is outside {} to {} (a client that stops sending holds its request this long; {} is the default)",
                crate::duration::show(body_timeout),
                crate::duration::show(MIN_BODY_TIMEOUT),
                crate::duration::show(MAX_BODY_TIMEOUT),
                crate::duration::show(DEFAULT_BODY_TIMEOUT)
            )));
        }
        problems.finish(at, || {
            Some(ServerSettings {
                listen: listen?,
                admin_token: admin_token?,
                max_body_bytes: self.max_body_bytes,
                body_timeout,
            })
        })
    }
}

// === store ===

/// How hard the store works to keep an acknowledged event across a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// An acknowledged event is on disk (SQLite `synchronous=FULL`; PostgreSQL
    /// `synchronous_commit=on`): it survives `kill -9` and power loss.
    #[default]
    Fsync,
    /// Faster; an acknowledged event survives `kill -9` of keel but may be lost on power
    /// loss (SQLite WAL with `synchronous=NORMAL`; PostgreSQL `synchronous_commit=off`).
    Relaxed,
}

/// `[store]` as written in keel.toml. Nothing here is trusted yet.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite://relative/path.db`, `sqlite:///absolute/path.db` or `postgres://...`.
    #[serde(default = "default_store_url")]
    pub url: String,
    /// `"fsync"` (default) or `"relaxed"`: task writes, tool and approval events, alerts,
    /// state; every write but the records of model calls.
    #[serde(default)]
    pub durability: Durability,
    /// `"relaxed"` (default) or `"fsync"`: the records of a model call through the gateway
    /// (`llm_call` and the events around it).
    #[serde(default = "relaxed")]
    pub call_durability: Durability,
    /// How long a busy writer waits for more writes to share its commit (default: 200us
    /// for a commit that is not synced, none for one that is; `"0s"` commits at once).
    #[serde(default, deserialize_with = "crate::duration::optional")]
    pub commit_delay: Option<std::time::Duration>,
    /// Finished tasks (succeeded, cancelled) older than this are pruned; unset keeps them.
    #[serde(default, deserialize_with = "crate::duration::optional")]
    pub retention: Option<std::time::Duration>,
    /// Checkpoint states kept per task (the newest); unset keeps all.
    pub keep_checkpoints: Option<usize>,
    /// Largest checkpoint state a worker may save, in bytes (default 1 MiB).
    #[serde(default = "default_max_checkpoint_bytes")]
    pub max_checkpoint_bytes: usize,
    /// Whether model requests and responses are kept (content-addressed) with
    /// each `llm_call` (default true).
    #[serde(default = "default_true")]
    pub record_payloads: bool,
}

fn default_true() -> bool {
    true
}

fn relaxed() -> Durability {
    Durability::Relaxed
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: default_store_url(),
            durability: Durability::default(),
            call_durability: Durability::Relaxed,
            commit_delay: None,
            retention: None,
            keep_checkpoints: None,
            max_checkpoint_bytes: default_max_checkpoint_bytes(),
            record_payloads: true,
        }
    }
}

/// Largest `[store] commit_delay`: every commit under load waits this long.
pub const MAX_COMMIT_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

/// Default `[store] max_checkpoint_bytes`: 1 MiB.
pub const DEFAULT_MAX_CHECKPOINT_BYTES: usize = 1 << 20;

fn default_max_checkpoint_bytes() -> usize {
    DEFAULT_MAX_CHECKPOINT_BYTES
}

fn default_store_url() -> String {
    DEFAULT_STORE_URL.to_owned()
}

/// Which database holds the event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreBackend {
    /// A SQLite file; a relative path is relative to the working directory.
    Sqlite {
        /// The database file.
        path: PathBuf,
    },
    /// A PostgreSQL database, for several keel nodes sharing one log.
    Postgres {
        /// The connection URL as written (`postgres://user@host/db`); it may hold a password.
        url: String,
    },
}

/// Validated `[store]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSettings {
    /// The database.
    pub backend: StoreBackend,
    /// The durability of an acknowledged write, but for model-call records.
    pub durability: Durability,
    /// The durability of the records of a model call through the gateway.
    pub call_durability: Durability,
    /// How long the writer, when several writes are already queued, waits for more to
    /// join the same commit (`None`: the store's default for each commit's durability).
    pub commit_delay: Option<std::time::Duration>,
    /// Age after which finished tasks are pruned (`None`: never).
    pub retention: Option<std::time::Duration>,
    /// Checkpoints kept per task (`None`: all).
    pub keep_checkpoints: Option<usize>,
    /// Largest checkpoint state accepted, in bytes.
    pub max_checkpoint_bytes: usize,
    /// Whether model requests and responses are stored with `llm_call` events.
    pub record_payloads: bool,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            backend: StoreBackend::Sqlite {
                path: PathBuf::from("keel-data/keel.db"),
            },
            durability: Durability::Fsync,
            call_durability: Durability::Relaxed,
            commit_delay: None,
            retention: None,
            keep_checkpoints: None,
            max_checkpoint_bytes: DEFAULT_MAX_CHECKPOINT_BYTES,
            record_payloads: true,
        }
    }
}

impl StoreConfig {
    /// Checks the URL and returns the backend it names.
    pub fn validate(self, at: &KeyPath) -> Result<StoreSettings, Vec<Invalid>> {
        let mut problems = Vec::new();
        if self.keep_checkpoints == Some(0) {
            problems.push(
                at.child("keep_checkpoints")
                    .invalid("must be at least 1 (leave it out to keep every checkpoint)"),
            );
        }
        if self.retention.is_some_and(|r| r.is_zero()) {
            problems.push(
                at.child("retention")
                    .invalid("must be longer than 0s (leave it out to keep finished tasks)"),
            );
        }
        if self.commit_delay.is_some_and(|d| d > MAX_COMMIT_DELAY) {
            problems.push(at.child("commit_delay").invalid(format!(
                "must be at most {} (every commit under load waits this long; 200us is the default for a commit that is not synced)",
                crate::duration::show(MAX_COMMIT_DELAY)
            )));
        }
        if self.max_checkpoint_bytes == 0 {
            problems.push(
                at.child("max_checkpoint_bytes")
                    .invalid("must be at least 1"),
            );
        }
        let backend =
            parse_store_url(&self.url).map_err(|message| at.child("url").invalid(message));
        let backend = match backend {
            Ok(b) if problems.is_empty() => b,
            Ok(_) => return Err(problems),
            Err(e) => {
                problems.push(e);
                return Err(problems);
            }
        };
        Ok(StoreSettings {
            backend,
            durability: self.durability,
            call_durability: self.call_durability,
            commit_delay: self.commit_delay,
            retention: self.retention,
            keep_checkpoints: self.keep_checkpoints,
            max_checkpoint_bytes: self.max_checkpoint_bytes,
            record_payloads: self.record_payloads,
        })
    }
}

/// Parses a store URL. The message never repeats the URL past its scheme: it may hold a
/// password.
fn parse_store_url(url: &str) -> Result<StoreBackend, String> {
    let usage = "use \"sqlite://PATH\" or \"postgres://USER@HOST/DB\"";
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!("not a store url; {usage}"));
    };
    match scheme {
        "sqlite" if rest.is_empty() => Err(format!("the sqlite url has no path; {usage}")),
        "sqlite" => Ok(StoreBackend::Sqlite {
            path: PathBuf::from(rest),
        }),
        "postgres" | "postgresql" => Ok(StoreBackend::Postgres {
            url: url.to_owned(),
        }),
        other => Err(format!("unsupported store url scheme {other:?}; {usage}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_listen_constants_agree() {
        assert_eq!(
            DEFAULT_LISTEN.parse::<SocketAddr>().ok(),
            Some(DEFAULT_LISTEN_ADDR)
        );
    }

    #[test]
    fn sqlite_urls_give_relative_and_absolute_paths() {
        assert_eq!(
            parse_store_url("sqlite://keel-data/keel.db"),
            Ok(StoreBackend::Sqlite {
                path: "keel-data/keel.db".into()
            })
        );
        assert_eq!(
            parse_store_url("sqlite:///var/lib/keel/keel.db"),
            Ok(StoreBackend::Sqlite {
                path: "/var/lib/keel/keel.db".into()
            })
        );
    }

    #[test]
    fn postgres_url_is_kept_whole() {
        for url in [
            "postgres://keel@db/keel",
            "postgresql://keel:pw@db:5432/keel",
        ] {
            assert_eq!(
                parse_store_url(url),
                Ok(StoreBackend::Postgres { url: url.into() })
            );
        }
    }

    #[test]
    fn bad_store_urls_do_not_echo_credentials() {
        let err = parse_store_url("mysql://root:hunter2@db/keel")
            .err()
            .unwrap_or_default();
        assert!(
            err.starts_with("unsupported store url scheme \"mysql\""),
            "{err}"
        );
        assert!(!err.contains("hunter2"));
        assert!(parse_store_url("keel.db").is_err());
        assert!(parse_store_url("sqlite://").is_err());
    }
}

#[cfg(test)]
mod retention_tests {
    use crate::parse;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn retention_and_checkpoint_limits_parse() {
        let s = parse(
            "[store]\nretention = \"7d\"\nkeep_checkpoints = 3\nmax_checkpoint_bytes = 2048\n",
            "keel.toml",
            &no_env,
        )
        .unwrap();
        assert_eq!(
            s.store.retention,
            Some(std::time::Duration::from_secs(7 * 86400))
        );
        assert_eq!(s.store.keep_checkpoints, Some(3));
        assert_eq!(s.store.max_checkpoint_bytes, 2048);
    }

    #[test]
    fn a_body_timeout_parses_and_one_out_of_range_is_refused_with_its_line() {
        let s = parse("[server]\nbody_timeout = \"90s\"\n", "keel.toml", &no_env).unwrap();
        assert_eq!(s.server.body_timeout, std::time::Duration::from_secs(90));
        let s = parse("", "keel.toml", &no_env).unwrap();
        assert_eq!(s.server.body_timeout, std::time::Duration::from_secs(60));
        // Too short (`"1ms"` written for `"1m"`) or too long.
        for bad in ["0s", "1ms", "2h"] {
            let text = format!("[server]\nlisten = \"127.0.0.1:8420\"\nbody_timeout = \"{bad}\"\n");
            let e = parse(&text, "keel.toml", &no_env).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!(
                    "keel.toml:3: server.body_timeout: {bad} is outside 1s to 1h"
                )),
                "{e}"
            );
        }
    }

    #[test]
    fn zero_keep_checkpoints_is_refused_with_its_line() {
        let e = parse("[store]\nkeep_checkpoints = 0\n", "keel.toml", &no_env).unwrap_err();
        assert_eq!(
            e.to_string(),
            "keel.toml:2: store.keep_checkpoints: must be at least 1 (leave it out to keep every checkpoint)"
        );
    }
}
