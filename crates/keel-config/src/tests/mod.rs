//! Whole-file tests: parse + validate + placement of every error in the file.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use keel_policy::backoff::Jitter;
use keel_policy::breaker::{BreakerSettings, Window};

use super::*;

/// The environment of every test: a closure, never the process environment.
fn env(name: &str) -> Option<String> {
    match name {
        "OPENAI_API_KEY" => Some("sk-openai".into()),
        "KEEL_ADMIN_TOKEN" => Some("admin-token".into()),
        "KEEL_KEY_SUPPORT" => Some("key-support".into()),
        "KEEL_KEY_OPS" => Some("key-ops".into()),
        "KEEL_KEY_COPY" => Some("key-support".into()),
        "EMPTY" => Some(String::new()),
        _ => None,
    }
}

fn settings(text: &str) -> Settings {
    match parse(text, "keel.toml", &env) {
        Ok(settings) => settings,
        Err(e) => panic!("config should be valid:\n{e}"),
    }
}

/// Every error of `text`, one per line, as `keel config check` prints them.
fn errors(text: &str) -> String {
    match parse(text, "keel.toml", &env) {
        Ok(_) => panic!("config should be invalid"),
        Err(e) => e.to_string(),
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// The example config shipped in the repository.
const EXAMPLE: &str = include_str!("../../../../examples/keel.toml");

const PROVIDER: &str = r#"
[providers.openai]
kind = "openai"
base_url = "https://api.openai.com/v1"
"#;

/// DESIGN.md §4, verbatim.
const DESIGN_EXAMPLE: &str = r#"[server]
listen = "127.0.0.1:8420"
admin_token_env = "KEEL_ADMIN_TOKEN"

[store]
url = "sqlite://keel-data/keel.db"        # or "postgres://user@host/db"

[providers.openai]
kind = "openai"                           # any OpenAI-compatible API; also "anthropic"
base_url = "https://api.openai.com/v1"
api_key_env = "OPENAI_API_KEY"

[routes.smart]                            # clients send "model": "smart"
targets = [
  { provider = "openai", model = "gpt-5" },
  { provider = "openai", model = "gpt-5-mini" },   # the small "reflex" model
]
degraded_reply = "I'm busy right now; please try again shortly."
retry    = { max_attempts = 3, base = "200ms", cap = "10s", jitter = "full", respect_retry_after = true, budget_ratio = 0.2 }
timeouts = { connect = "2s", first_token = "20s", idle = "15s", attempt = "60s", total = "120s" }

[breaker]                                 # per target; resilience4j's meaning for each field
window = "count"                          # or "time"
window_size = 100
min_calls = 20
failure_rate = 0.05
slow_call_rate = 0.5
slow_call = "30s"
open_for = "30s"
half_open_calls = 5

[agents.support]
keys_env = ["KEEL_KEY_SUPPORT"]
budget = { tokens_per_hour = 200000, usd_per_day = 50.0 }
max_steps = 40
task_timeout = "10m"
max_attempts = 3

[tools.refund]
url = "http://127.0.0.1:9001/refund"      # or wasm = "tools/refund.wasm"
side_effects = true                       # never retried without an idempotency key
rules = ["args.amount <= 500", "args.currency in ['USD','EUR']"]   # CEL
profile = { args = ["amount"], action = "approve" }                # histogram guard
"#;

// === whole files ===

#[test]
fn design_example_parses_to_expected_settings() {
    let breaker = BreakerSettings {
        window: Window::Count(100),
        min_calls: 20,
        failure_rate: 0.05,
        slow_call_rate: 0.5,
        slow_call: secs(30),
        open_for: secs(30),
        half_open_calls: 5,
    };
    let three = NonZeroU32::new(3).unwrap();
    let expected = Settings {
        server: ServerSettings {
            listen: DEFAULT_LISTEN_ADDR,
            admin_token: Some(Secret::new("admin-token".into())),
            max_body_bytes: 4 * 1024 * 1024,
            body_timeout: std::time::Duration::from_secs(60),
        },
        store: StoreSettings {
            backend: StoreBackend::Sqlite {
                path: PathBuf::from("keel-data/keel.db"),
            },
            durability: Durability::Fsync,
            ..StoreSettings::default()
        },
        providers: BTreeMap::from([(
            "openai".to_owned(),
            ProviderSettings {
                name: "openai".into(),
                kind: ProviderKind::OpenAi,
                base_url: "https://api.openai.com/v1".into(),
                api_key: Some(Secret::new("sk-openai".into())),
                api_key_header: None,
                headers: vec![],
                query: vec![],
                prices: BTreeMap::new(),
            },
        )]),
        routes: BTreeMap::from([(
            "smart".to_owned(),
            RouteSettings {
                name: "smart".into(),
                targets: vec![
                    TargetSettings {
                        provider: "openai".into(),
                        model: "gpt-5".into(),
                    },
                    TargetSettings {
                        provider: "openai".into(),
                        model: "gpt-5-mini".into(),
                    },
                ],
                degraded_reply: Some("I'm busy right now; please try again shortly.".into()),
                retry: RetrySettings {
                    max_attempts: three,
                    base: Duration::from_millis(200),
                    cap: secs(10),
                    jitter: Jitter::Full,
                    respect_retry_after: true,
                    budget_ratio: 0.2,
                    budget_min_per_sec: 10,
                },
                timeouts: TimeoutSettings {
                    connect: secs(2),
                    first_token: secs(20),
                    idle: secs(15),
                    attempt: secs(60),
                    total: secs(120),
                    // Written in the file: it bounds a stream too.
                    stream_attempt: Some(secs(60)),
                },
                breaker,
                validate_output: true,
            },
        )]),
        breaker,
        agents: BTreeMap::from([(
            "support".to_owned(),
            AgentSettings {
                name: "support".into(),
                keys: vec![Secret::new("key-support".into())],
                budget: BudgetSettings {
                    tokens_per_hour: Some(200_000),
                    usd_per_day: Some(50.0),
                    requests_per_minute: None,
                    warn_at: 0.8,
                },
                max_steps: Some(40),
                task_timeout: Some(secs(600)),
                max_attempts: three,
                key_names: vec!["KEEL_KEY_SUPPORT".into()],
                key_budget: None,
                loop_guard: Some(crate::LoopGuardSettings::default()),
                task_tokens_per_minute: None,
                tools: Vec::new(),
                preflight: Vec::new(),
                screen_input: crate::InjectionAction::Flag,
            },
        )]),
        tools: BTreeMap::from([(
            "refund".to_owned(),
            ToolSettings {
                name: "refund".into(),
                endpoint: ToolEndpoint::Http {
                    url: "http://127.0.0.1:9001/refund".into(),
                },
                side_effects: true,
                timeout: crate::DEFAULT_TOOL_TIMEOUT,
                retry: RetrySettings {
                    max_attempts: NonZeroU32::MIN,
                    ..RetrySettings::default()
                },
                redact: Vec::new(),
                injection: crate::InjectionAction::Flag,
                rules: vec![
                    "args.amount <= 500".into(),
                    "args.currency in ['USD','EUR']".into(),
                ],
                profile: Some(ProfileSettings {
                    args: vec!["amount".into()],
                    action: ProfileAction::Approve,
                    warmup: 20,
                    quantile: 0.99,
                    factor: 3.0,
                    timeout: Duration::from_secs(24 * 3600),
                }),
            },
        )]),
        chaos: ChaosSettings::default(),
        alerts: crate::AlertsSettings::default(),
        telemetry: crate::TelemetrySettings::default(),
    };
    assert_eq!(settings(DESIGN_EXAMPLE), expected);
}

#[test]
fn example_file_passes_validation_with_its_env_vars_set() {
    let settings = settings(EXAMPLE);
    assert_eq!(settings.providers.len(), 2);
    assert_eq!(settings.providers["local"].api_key, None);
    assert_eq!(
        settings.providers["local"].base_url,
        "http://127.0.0.1:11434/v1"
    );
    assert_eq!(settings.routes["smart"].targets.len(), 3);
    let fast = &settings.routes["fast"];
    assert_eq!(fast.retry.jitter, Jitter::Decorrelated);
    // The two routes share targets, so neither overrides [breaker].
    assert_eq!(fast.breaker, settings.breaker);
    assert_eq!(settings.breaker.failure_rate, 0.5);
    assert_eq!(settings.routes["smart"].breaker, settings.breaker);
    assert_eq!(settings.agents["support"].keys[0].expose(), "key-support");
}

#[test]
fn example_file_names_every_missing_env_var() {
    let Err(errors) = parse(EXAMPLE, "examples/keel.toml", &|_| None) else {
        panic!("should fail without env");
    };
    let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "server.admin_token_env",
            "providers.openai.api_key_env",
            "agents.support.keys_env[0]"
        ]
    );
    assert!(
        errors
            .iter()
            .all(|e| e.line.is_some() && e.file == "examples/keel.toml")
    );
}

#[test]
fn load_reads_the_file_and_names_it_in_errors() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/keel.toml");
    assert!(load(&path, &env).is_ok());
    let missing = std::path::Path::new("/nonexistent/keel.toml");
    let rendered = load(missing, &env).unwrap_err().to_string();
    assert!(
        rendered.starts_with("/nonexistent/keel.toml: cannot read the config file: "),
        "{rendered}"
    );
}

#[test]
fn load_server_reads_server_alone_without_the_other_secrets() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/keel.toml");
    // The example names provider keys this environment lacks; only the admin token is read.
    let only_admin = |name: &str| (name == "KEEL_ADMIN_TOKEN").then(|| "t0ken".to_owned());
    assert!(load(&path, &only_admin).is_err());
    let server = crate::load_server(&path, &only_admin).expect("server settings");
    assert_eq!(server.listen.to_string(), "127.0.0.1:8420");
    assert_eq!(
        server.admin_token.map(|t| t.expose().to_owned()),
        Some("t0ken".to_owned())
    );
    let rendered = crate::load_server(&path, &|_| None)
        .unwrap_err()
        .to_string();
    assert!(
        rendered.contains("keel.toml:12: server.admin_token_env: "),
        "{rendered}"
    );
}

#[test]
fn empty_file_is_the_embedded_default() {
    assert_eq!(settings(""), embedded_default());
}

#[test]
fn embedded_default_listens_on_loopback_with_sqlite() {
    let d = embedded_default();
    assert_eq!(d.server.listen.to_string(), DEFAULT_LISTEN);
    assert_eq!(d.server.admin_token, None);
    assert_eq!(d.server.max_body_bytes, 4 * 1024 * 1024);
    assert_eq!(
        d.store.backend,
        StoreBackend::Sqlite {
            path: "keel-data/keel.db".into()
        }
    );
    assert_eq!(d.store.durability, Durability::Fsync);
    assert_eq!(d.store.call_durability, Durability::Relaxed);
    assert!(d.providers.is_empty() && d.routes.is_empty() && d.agents.is_empty());
    assert_eq!(d.breaker, DEFAULT_BREAKER);
    assert_eq!(d.breaker.window, Window::Count(100));
    assert_eq!(d.breaker.slow_call_rate, 1.0);
}

#[test]
fn route_defaults_fill_retry_and_timeouts() {
    let s = settings(&format!(
        "{PROVIDER}\n[routes.r]\ntargets = [{{ provider = \"openai\", model = \"m\" }}]\n"
    ));
    let route = &s.routes["r"];
    assert_eq!(route.retry, RetrySettings::default());
    assert_eq!(route.retry.max_attempts.get(), 3);
    assert_eq!(route.retry.base, Duration::from_millis(200));
    assert_eq!(route.timeouts, TimeoutSettings::default());
    assert_eq!(route.timeouts.total, secs(120));
    assert_eq!(route.degraded_reply, None);
}

#[test]
fn provider_trims_base_url_and_keeps_headers_and_query() {
    let s = settings(
        r#"
[providers.azure]
kind = "openai"
base_url = "https://x.openai.azure.com/openai/deployments/gpt-4o/"
headers = { "x-foo" = "bar" }
query = { "api-version" = "2024-06-01" }

[providers.claude]
kind = "anthropic"
base_url = "https://api.anthropic.com"
"#,
    );
    let azure = &s.providers["azure"];
    assert_eq!(
        azure.base_url,
        "https://x.openai.azure.com/openai/deployments/gpt-4o"
    );
    assert_eq!(azure.headers, vec![("x-foo".to_owned(), "bar".to_owned())]);
    assert_eq!(
        azure.query,
        vec![("api-version".to_owned(), "2024-06-01".to_owned())]
    );
    assert_eq!(s.providers["claude"].kind, ProviderKind::Anthropic);
}

#[test]
fn an_azure_provider_sends_its_key_in_the_header_it_names() {
    let s = settings(
        r#"
[providers.azure]
kind = "openai"
base_url = "https://x.openai.azure.com/openai/v1"
api_key_env = "OPENAI_API_KEY"
api_key_header = "Api-Key"

[providers.openai]
kind = "openai"
base_url = "https://api.openai.com/v1"
api_key_env = "OPENAI_API_KEY"
"#,
    );
    // Header names are case-insensitive; the settings keep the lowercase form.
    assert_eq!(
        s.providers["azure"].api_key_header.as_deref(),
        Some("api-key")
    );
    assert_eq!(s.providers["openai"].api_key_header, None);
}

/// The example file's commented-out Azure provider, uncommented, is a valid provider that
/// sends its key in `api-key`.
#[test]
fn the_example_s_azure_provider_is_valid_when_uncommented() {
    let block: String = EXAMPLE
        .lines()
        .skip_while(|line| *line != "# [providers.azure]")
        .take_while(|line| line.starts_with("# "))
        .map(|line| format!("{}\n", &line[2..]))
        .collect();
    assert!(block.starts_with("[providers.azure]\n"), "{block}");
    let env = |name: &str| (name == "AZURE_OPENAI_API_KEY").then(|| "azure-key".to_owned());
    let settings = match parse(&block, "keel.toml", &env) {
        Ok(settings) => settings,
        Err(e) => panic!("{block}\n{e}"),
    };
    let azure = &settings.providers["azure"];
    assert_eq!(azure.api_key_header.as_deref(), Some("api-key"));
    assert_eq!(
        azure.query,
        vec![("api-version".to_owned(), "2024-10-21".to_owned())]
    );
}

#[test]
fn store_accepts_postgres_and_relaxed_durability() {
    let s = settings("[store]\nurl = \"postgres://keel@db/keel\"\ndurability = \"relaxed\"\n");
    assert_eq!(
        s.store.backend,
        StoreBackend::Postgres {
            url: "postgres://keel@db/keel".into()
        }
    );
    assert_eq!(s.store.durability, Durability::Relaxed);
    // Model-call records keep their own default unless set.
    assert_eq!(s.store.call_durability, Durability::Relaxed);
    let s = settings("[store]\ncall_durability = \"fsync\"\n");
    assert_eq!(
        (s.store.durability, s.store.call_durability),
        (Durability::Fsync, Durability::Fsync)
    );
    let e = errors("[store]\ncall_durability = \"sometimes\"\n");
    assert!(
        e.contains("keel.toml:2") && e.contains("call_durability") && e.contains("fsync"),
        "{e}"
    );
    let s = settings("[store]\nurl = \"sqlite:///var/lib/keel.db\"\n");
    assert_eq!(
        s.store.backend,
        StoreBackend::Sqlite {
            path: "/var/lib/keel.db".into()
        }
    );
}

#[test]
fn commit_delay_is_optional_and_bounded() {
    // Unset, the store picks its default for the durability (keel_store::WriteOptions).
    assert_eq!(settings("").store.commit_delay, None);
    let s = settings("[store]\ncommit_delay = \"1ms\"\n");
    assert_eq!(s.store.commit_delay, Some(Duration::from_millis(1)));
    assert_eq!(
        settings("[store]\ncommit_delay = \"0s\"\n")
            .store
            .commit_delay,
        Some(Duration::ZERO)
    );
    let e = errors("[store]\ncommit_delay = \"2s\"\n");
    assert!(
        e.contains("keel.toml:2")
            && e.contains("store.commit_delay")
            && e.contains("at most 100ms"),
        "{e}"
    );
    let e = errors("[store]\ncommit_delay = \"soon\"\n");
    assert!(
        e.contains("keel.toml:2") && e.contains("store.commit_delay"),
        "{e}"
    );
}

#[test]
fn time_window_size_is_seconds() {
    let s = settings("[breaker]\nwindow = \"time\"\nwindow_size = 60\n");
    assert_eq!(s.breaker.window, Window::Time(secs(60)));
}

#[test]
fn secrets_never_appear_in_debug_output() {
    let s = settings(DESIGN_EXAMPLE);
    let debug = format!("{s:?}");
    for secret in ["sk-openai", "admin-token", "key-support"] {
        assert!(!debug.contains(secret), "{secret} leaked");
    }
    assert!(debug.contains("[redacted]"));
}

mod chaos;
mod rules;
