//! One test per validation rule, asserting the exact rendered message, line included.

use super::{env, errors, parse, secs};

/// A provider on lines 1-3, so route tests can start at line 5.
const OPENAI: &str = "[providers.openai]
kind = \"openai\"
base_url = \"https://api.openai.com/v1\"
";

fn with_openai(rest: &str) -> String {
    format!("{OPENAI}\n{rest}")
}

/// Route `smart` to `openai/gpt-5` on lines 5-6, then `rest` from line 7.
fn with_smart(rest: &str) -> String {
    with_openai(&format!(
        "[routes.smart]\ntargets = [{{ provider = \"openai\", model = \"gpt-5\" }}]\n{rest}"
    ))
}

// === syntax and serde ===

#[test]
fn syntax_error_names_its_line() {
    let text = "[server]\nlisten = \"127.0.0.1:8420\"\n[routes.smart\n";
    assert_eq!(
        errors(text),
        "keel.toml:3: invalid TOML: unclosed table, expected `]`"
    );
}

#[test]
fn unknown_key_is_rejected_with_its_line() {
    let text = with_smart(
        "retry = { max_attempts = 3, bse = \"200ms\" }
",
    );
    assert_eq!(
        errors(&text),
        "keel.toml:7: routes.smart.retry.bse: unknown field `bse`, expected one of \
         `max_attempts`, `base`, `cap`, `jitter`, `respect_retry_after`, `budget_ratio`, \
         `budget_min_per_sec`"
    );
}

#[test]
fn unknown_table_is_rejected_with_its_line() {
    assert_eq!(
        errors("[server]\nlisten = \"127.0.0.1:1\"\n\n[chaoss]\n"),
        "keel.toml:4: chaoss: unknown field `chaoss`, expected one of `server`, `store`, \
         `providers`, `routes`, `breaker`, `agents`, `tools`, `chaos`, `alerts`, `telemetry`"
    );
}

#[test]
fn duplicate_key_is_named() {
    assert_eq!(
        errors("[server]\nlisten = \"127.0.0.1:1\"\nlisten = \"127.0.0.1:2\"\n"),
        "keel.toml:3: invalid TOML: duplicate key listen: it is set twice in the same table; \
         keep one"
    );
}

#[test]
fn a_value_where_a_table_belongs_says_a_table_is_expected() {
    assert_eq!(
        errors("[routes]\nsmart = 3\n"),
        "keel.toml:2: routes.smart: invalid type: integer `3`, expected a table"
    );
}

#[test]
fn a_number_of_the_wrong_kind_says_what_number_is_expected() {
    assert_eq!(
        errors("[server]\nmax_body_bytes = \"4MiB\"\n"),
        "keel.toml:2: server.max_body_bytes: invalid type: string \"4MiB\", expected a whole \
         number, 0 or more"
    );
    let budget = with_openai("[agents.support]\nbudget = { tokens_per_hour = -5 }\n");
    let message = errors(&budget);
    assert!(
        message.ends_with(
            "agents.support.budget.tokens_per_hour: invalid value: integer `-5`, expected a \
             whole number, 0 or more"
        ),
        "{message}"
    );
}

#[test]
fn names_and_models_cannot_be_empty() {
    let text = with_openai(
        "[routes.\"\"]
targets = [{ provider = \"openai\", model = \"\" }]

[agents.\" \"]
",
    );
    assert_eq!(
        errors(&text),
        "keel.toml:5: routes.\"\": a name cannot be empty: write [routes.NAME] with a name to \
         refer to it by\n\
         keel.toml:6: routes.\"\".targets[0].model: must name the provider's model, like \
         \"gpt-5\" (it is sent upstream as `model`)\n\
         keel.toml:8: agents.\" \": a name cannot be empty: write [agents.NAME] with a name to \
         refer to it by"
    );
}

#[test]
fn an_agent_name_cannot_look_like_a_key_budget() {
    assert_eq!(
        errors("[agents.\"ops/key/1\"]\n"),
        "keel.toml:1: agents.\"ops/key/1\": an agent's name cannot contain \"/key/\": keel \
         names the budget of one of an agent's keys AGENT/key/KEY"
    );
}

#[test]
fn duration_must_parse() {
    let text = with_smart(
        "timeouts = { connect = \"2 parsecs\" }
",
    );
    assert_eq!(
        errors(&text),
        "keel.toml:7: routes.smart.timeouts.connect: invalid duration \"2 parsecs\": unknown \
         time unit \"parsecs\", supported units: ns, us/µs, ms, sec, min, hours, days, weeks, \
         months, years (and few variations); write durations like \"250ms\", \"30s\" or \"10m\""
    );
}

#[test]
fn duration_must_be_a_string() {
    assert_eq!(
        errors("[agents.a]\ntask_timeout = 600\n"),
        "keel.toml:2: agents.a.task_timeout: invalid type: integer `600`, expected a duration \
         string like \"250ms\", \"30s\" or \"10m\""
    );
}

#[test]
fn unknown_provider_kind_is_rejected() {
    assert_eq!(
        errors("[providers.x]\nkind = \"gemini\"\nbase_url = \"https://x\"\n"),
        "keel.toml:2: providers.x.kind: unknown variant `gemini`, expected `openai` or `anthropic`"
    );
}

#[test]
fn missing_target_field_names_the_target() {
    let text = with_openai("[routes.smart]\ntargets = [{ provider = \"openai\" }]\n");
    assert_eq!(
        errors(&text),
        "keel.toml:6: routes.smart.targets[0]: missing field `model`"
    );
}

// === server and store ===

#[test]
fn listen_must_be_a_socket_address() {
    assert_eq!(
        errors("[server]\nlisten = \"localhost:8420\"\n"),
        "keel.toml:2: server.listen: \"localhost:8420\" is not a socket address; write IP:PORT, \
         like \"127.0.0.1:8420\""
    );
}

#[test]
fn admin_token_env_must_be_set() {
    assert_eq!(
        errors("[server]\nadmin_token_env = \"KEEL_ADMIN\"\n"),
        "keel.toml:2: server.admin_token_env: environment variable KEEL_ADMIN is not set"
    );
}

#[test]
fn empty_env_var_counts_as_missing() {
    assert_eq!(
        errors("[server]\nadmin_token_env = \"EMPTY\"\n"),
        "keel.toml:2: server.admin_token_env: environment variable EMPTY is empty"
    );
}

#[test]
fn max_body_bytes_must_be_positive_and_at_most_a_gibibyte() {
    assert_eq!(
        errors("[server]\nmax_body_bytes = 0\n"),
        "keel.toml:2: server.max_body_bytes: 0 is outside 1 to 1073741824 (1 GiB): keel holds a request's body in memory"
    );
    assert!(
        errors("[server]\nmax_body_bytes = 99999999999999\n")
            .starts_with("keel.toml:2: server.max_body_bytes: 99999999999999 is outside 1 to")
    );
}

/// Durations and counts that would break keel (a panic, a route down for a century) are
/// refused with their line, as a user who typed `"1ns"` or `"100years"` would want.
#[test]
fn durations_and_counts_out_of_their_range_are_refused() {
    let cases = [
        (
            "[routes.r]\ntargets = [{ provider = \"p\", model = \"m\" }]\ntimeouts = { total = \"500000000000years\" }\n",
            "keel.toml:3: routes.r.timeouts.total: duration \"500000000000years\" is longer than any keel takes (100years)",
        ),
        (
            "[routes.r]\ntargets = [{ provider = \"p\", model = \"m\" }]\ntimeouts = { total = \"2days\" }\n",
            "keel.toml:3: routes.r.timeouts.total: 2days is longer than 1day, the longest a model call may take",
        ),
        (
            "[routes.r]\ntargets = [{ provider = \"p\", model = \"m\" }]\nretry = { max_attempts = 1000000 }\n",
            "keel.toml:3: routes.r.retry.max_attempts: 1000000 is over 100, the most attempts keel makes on one target",
        ),
        (
            "[routes.r]\ntargets = [{ provider = \"p\", model = \"m\" }]\nretry = { cap = \"100years\" }\n",
            "keel.toml:3: routes.r.retry.cap: 100years is longer than 1h, the longest keel waits between attempts",
        ),
        (
            "[breaker]\nslow_call = \"1ns\"\n",
            "keel.toml:2: breaker.slow_call: 1ns is shorter than 1ms: every call would be slow",
        ),
        (
            "[breaker]\nopen_for = \"3days\"\n",
            "keel.toml:2: breaker.open_for: 3days is outside (0s, 1day]: an open circuit lets no call through for that long",
        ),
        (
            "[alerts]\ndigest_every = \"1ns\"\n",
            "keel.toml:2: alerts.digest_every: 1ns is shorter than 1s: a digest is sent this often",
        ),
    ];
    for (text, want) in cases {
        let got = errors(&format!(
            "{text}[providers.p]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\n"
        ));
        assert!(got.starts_with(want), "{got}\nwanted {want}");
    }
}

#[test]
fn store_url_scheme_must_be_known() {
    assert_eq!(
        errors("[store]\nurl = \"mysql://root:pw@db/keel\"\n"),
        "keel.toml:2: store.url: unsupported store url scheme \"mysql\"; use \"sqlite://PATH\" \
         or \"postgres://USER@HOST/DB\""
    );
}

// === providers ===

#[test]
fn api_key_env_must_be_set() {
    let text = "[providers.openai]
kind = \"openai\"
base_url = \"https://api.openai.com/v1\"
api_key_env = \"OPENAI_KEY_TYPO\"
";
    assert_eq!(
        errors(text),
        "keel.toml:4: providers.openai.api_key_env: environment variable OPENAI_KEY_TYPO is not set"
    );
}

#[test]
fn base_url_must_be_http() {
    assert_eq!(
        errors("[providers.x]\nkind = \"openai\"\nbase_url = \"api.openai.com/v1\"\n"),
        "keel.toml:3: providers.x.base_url: \"api.openai.com/v1\" is not an http(s) URL; write \
         it like \"https://api.openai.com/v1\""
    );
}

#[test]
fn header_names_must_be_tokens() {
    let text = "[providers.x]
kind = \"openai\"
base_url = \"http://x\"
headers = { \"x foo\" = \"bar\" }
";
    assert_eq!(
        errors(text),
        "keel.toml:4: providers.x.headers.\"x foo\": \"x foo\" is not a valid header name"
    );
}

#[test]
fn an_api_key_header_needs_a_valid_name_a_key_and_an_openai_kind() {
    let provider = |kind: &str, rest: &str| {
        format!("[providers.x]\nkind = \"{kind}\"\nbase_url = \"http://x\"\n{rest}")
    };
    assert_eq!(
        errors(&provider(
            "openai",
            "api_key_env = \"OPENAI_API_KEY\"\napi_key_header = \"api key\"\n"
        )),
        "keel.toml:5: providers.x.api_key_header: \"api key\" is not a valid header name"
    );
    assert_eq!(
        errors(&provider(
            "openai",
            "api_key_env = \"OPENAI_API_KEY\"\napi_key_header = \"Content-Type\"\n"
        )),
        "keel.toml:5: providers.x.api_key_header: \"Content-Type\" belongs to HTTP itself, not \
         to a key; name the header the provider reads its key from, such as \"api-key\""
    );
    assert_eq!(
        errors(&provider("openai", "api_key_header = \"api-key\"\n")),
        "keel.toml:4: providers.x.api_key_header: \"api-key\" would carry the key, but there \
         is none: name the variable that holds it with api_key_env"
    );
    assert_eq!(
        errors(&provider(
            "anthropic",
            "api_key_env = \"OPENAI_API_KEY\"\napi_key_header = \"api-key\"\n"
        )),
        "keel.toml:5: providers.x.api_key_header: kind = \"anthropic\" always sends the key as \
         x-api-key; api_key_header is for kind = \"openai\""
    );
    // A header of the provider's own by the same name would replace the key.
    assert_eq!(
        errors(&provider(
            "openai",
            "api_key_env = \"OPENAI_API_KEY\"\napi_key_header = \"api-key\"\nheaders = { \"Api-Key\" = \"x\" }\n"
        )),
        "keel.toml:5: providers.x.api_key_header: headers.\"Api-Key\" would replace the key \
         sent in \"api-key\"; leave one out"
    );
}

// === routes ===

#[test]
fn targets_must_not_be_empty() {
    let text = with_openai("[routes.smart]\ntargets = []\n");
    assert_eq!(
        errors(&text),
        "keel.toml:6: routes.smart.targets: must list at least one target, like \
         { provider = \"openai\", model = \"gpt-5\" }"
    );
}

#[test]
fn missing_targets_point_at_the_route() {
    let text = with_openai("[routes.smart]\ndegraded_reply = \"busy\"\n");
    assert_eq!(
        errors(&text),
        "keel.toml:5: routes.smart.targets: must list at least one target, like \
         { provider = \"openai\", model = \"gpt-5\" }"
    );
}

#[test]
fn target_provider_must_exist() {
    let text = with_openai(
        "[routes.smart]
targets = [
  { provider = \"openai\", model = \"gpt-5\" },
  { provider = \"opnai\", model = \"gpt-5-mini\" },
]
",
    );
    assert_eq!(
        errors(&text),
        "keel.toml:8: routes.smart.targets[1].provider: unknown provider \"opnai\"; known: openai"
    );
}

#[test]
fn target_provider_without_any_providers() {
    assert_eq!(
        errors("[routes.r]\ntargets = [{ provider = \"openai\", model = \"m\" }]\n"),
        "keel.toml:2: routes.r.targets[0].provider: unknown provider \"openai\"; no providers \
         are configured"
    );
}

#[test]
fn retry_base_must_not_exceed_cap() {
    let text = with_smart(
        "retry = { base = \"20s\", cap = \"10s\" }
",
    );
    assert_eq!(
        errors(&text),
        "keel.toml:7: routes.smart.retry.base: 20s is larger than cap 10s"
    );
}

#[test]
fn multi_line_inline_tables_keep_their_lines() {
    let text = with_smart(
        "retry = {
  base = \"20s\",
  cap = \"10s\",
}
",
    );
    assert_eq!(
        errors(&text),
        "keel.toml:8: routes.smart.retry.base: 20s is larger than cap 10s"
    );
}

#[test]
fn retry_base_above_default_cap_points_at_base() {
    let text = with_smart(
        "
[routes.smart.retry]
max_attempts = 2
base = \"1m\"
",
    );
    assert_eq!(
        errors(&text),
        "keel.toml:10: routes.smart.retry.base: 1m is larger than cap 10s (cap not set here: its default; set cap too)"
    );
}

#[test]
fn retry_cap_alone_below_the_default_base_points_at_cap() {
    let text = with_smart(
        "retry = { cap = \"100ms\" }
",
    );
    assert_eq!(
        errors(&text),
        "keel.toml:7: routes.smart.retry.cap: 100ms is smaller than base 200ms (base not set here: its default; set base too)"
    );
}

#[test]
fn retry_max_attempts_must_be_positive() {
    let text = with_smart(
        "retry = { max_attempts = 0 }
",
    );
    assert_eq!(
        errors(&text),
        "keel.toml:7: routes.smart.retry.max_attempts: must be at least 1"
    );
}

#[test]
fn retry_budget_ratio_must_be_a_fraction() {
    let text = with_smart(
        "retry = { budget_ratio = 1.5 }
",
    );
    assert_eq!(
        errors(&text),
        "keel.toml:7: routes.smart.retry.budget_ratio: 1.5 is outside [0, 1]"
    );
}

#[test]
fn attempt_timeout_must_fit_in_total() {
    let text = with_smart(
        "timeouts = { attempt = \"90s\", total = \"60s\" }
",
    );
    assert_eq!(
        errors(&text),
        "keel.toml:7: routes.smart.timeouts.attempt: 1m 30s is longer than total 1m"
    );
}

#[test]
fn unset_timeouts_fit_inside_a_shorter_total() {
    let text = with_smart(
        "timeouts = { total = \"30s\" }

[routes.quick]
targets = [{ provider = \"openai\", model = \"gpt-5\" }]
timeouts = { total = \"10s\", attempt = \"1s\" }
",
    );
    let settings = super::settings(&text);
    let smart = &settings.routes["smart"].timeouts;
    // attempt's default (60s) is cut to total; the others' still fit.
    assert_eq!(
        (smart.connect, smart.first_token, smart.attempt, smart.total),
        (secs(2), secs(20), secs(30), secs(30))
    );
    let quick = &settings.routes["quick"].timeouts;
    assert_eq!(
        (quick.connect, quick.first_token, quick.idle),
        (secs(1), secs(1), secs(15))
    );
}

#[test]
fn a_written_timeout_longer_than_an_unset_one_says_so() {
    let text = with_smart(
        "
[routes.smart.timeouts]
total = \"10s\"
first_token = \"20s\"
",
    );
    assert_eq!(
        errors(&text),
        "keel.toml:10: routes.smart.timeouts.first_token: 20s is longer than attempt 10s \
         (not set here: its default, fitted inside what holds it; set attempt too)"
    );
}

#[test]
fn first_token_and_connect_must_fit_in_attempt() {
    let text = with_smart(
        "timeouts = { connect = \"10s\", first_token = \"30s\", attempt = \"5s\" }
",
    );
    assert_eq!(
        errors(&text),
        "keel.toml:7: routes.smart.timeouts.connect: 10s is longer than attempt 5s\n\
         keel.toml:7: routes.smart.timeouts.first_token: 30s is longer than attempt 5s"
    );
}

#[test]
fn timeouts_must_be_positive() {
    let text = with_smart(
        "timeouts = { idle = \"0s\" }
",
    );
    assert_eq!(
        errors(&text),
        "keel.toml:7: routes.smart.timeouts.idle: must be longer than 0s"
    );
    // A zero total is the one problem: the unset timeouts inside it are not blamed.
    let text = with_smart(
        "timeouts = { total = \"0s\" }
",
    );
    assert_eq!(
        errors(&text),
        "keel.toml:7: routes.smart.timeouts.total: must be longer than 0s"
    );
}

// === breaker ===

#[test]
fn failure_rate_must_be_in_zero_one() {
    assert_eq!(
        errors("[breaker]\nfailure_rate = 0.0\nslow_call_rate = 1.5\n"),
        "keel.toml:2: breaker.failure_rate: 0 is outside (0, 1]\n\
         keel.toml:3: breaker.slow_call_rate: 1.5 is outside (0, 1]"
    );
}

#[test]
fn breaker_counts_must_be_positive() {
    assert_eq!(
        errors("[breaker]\nwindow_size = 0\nmin_calls = 0\nhalf_open_calls = 0\n"),
        "keel.toml:2: breaker.window_size: must be at least 1\n\
         keel.toml:3: breaker.min_calls: must be at least 1\n\
         keel.toml:4: breaker.half_open_calls: must be at least 1"
    );
}

#[test]
fn a_breaker_window_is_bounded_since_it_is_kept_in_memory() {
    assert_eq!(
        errors("[breaker]\nwindow_size = 4000000000\n"),
        "keel.toml:2: breaker.window_size: 4000000000 is over the largest window, 1000000 calls"
    );
    assert_eq!(
        errors("[breaker]\nwindow = \"time\"\nwindow_size = 604800\n"),
        "keel.toml:3: breaker.window_size: 604800 is over the largest window, 86400 seconds (a day)"
    );
    assert!(parse("[breaker]\nwindow_size = 1000000\n", "keel.toml", &env).is_ok());
}

#[test]
fn route_breaker_override_is_validated_at_its_key() {
    let text = with_openai(
        "[routes.fast]
targets = [{ provider = \"openai\", model = \"gpt-5-mini\" }]
breaker = { failure_rate = 2.0 }
",
    );
    assert_eq!(
        errors(&text),
        "keel.toml:7: routes.fast.breaker.failure_rate: 2 is outside (0, 1]"
    );
}

#[test]
fn routes_sharing_a_target_must_agree_on_its_breaker() {
    // "fast" comes first by name; "smart" shares gpt-5-mini with it but not its override.
    let text = with_openai(
        "[routes.smart]
targets = [
  { provider = \"openai\", model = \"gpt-5\" },
  { provider = \"openai\", model = \"gpt-5-mini\" },
]

[routes.fast]
targets = [{ provider = \"openai\", model = \"gpt-5-mini\" }]
breaker = { min_calls = 10 }
",
    );
    assert_eq!(
        errors(&text),
        "keel.toml:8: routes.smart.targets[1]: target openai/gpt-5-mini is also a target of \
         route \"fast\", with other breaker settings; a target has one circuit breaker, so give \
         the routes that share it the same `breaker` (or none), or reach the model through a \
         provider of another name for a breaker of its own"
    );
    // The same override on both, or an override that changes nothing, is one breaker.
    let same = text.replace(
        "  { provider = \"openai\", model = \"gpt-5-mini\" },\n]\n",
        "  { provider = \"openai\", model = \"gpt-5-mini\" },\n]\nbreaker = { min_calls = 10 }\n",
    );
    let shared = super::settings(&same);
    let fast = shared.routes["fast"].breaker;
    assert_eq!(shared.routes["smart"].breaker, fast);
    assert_eq!(fast.min_calls, 10);
    assert_eq!(
        fast.failure_rate, shared.breaker.failure_rate,
        "inherited from [breaker]"
    );
    let unchanged = text.replace("{ min_calls = 10 }", "{ min_calls = 20 }");
    super::settings(&unchanged);
}

// === agents and tools ===

#[test]
fn every_agent_key_env_must_be_set() {
    let text = "[agents.support]
keys_env = [
  \"KEEL_KEY_SUPPORT\",
  \"KEEL_KEY_SUPPORT_2\",
]
";
    assert_eq!(
        errors(text),
        "keel.toml:4: agents.support.keys_env[1]: environment variable KEEL_KEY_SUPPORT_2 is not set"
    );
}

#[test]
fn agent_limits_must_be_positive() {
    let text = "[agents.a]
budget = { tokens_per_hour = 0, usd_per_day = -1.0 }
max_steps = 0
task_timeout = \"0s\"
max_attempts = 0
";
    assert_eq!(
        errors(text),
        "keel.toml:2: agents.a.budget.tokens_per_hour: must be at least 1; leave it out for no limit\n\
         keel.toml:2: agents.a.budget.usd_per_day: -1 is not a positive amount; leave it out for no limit\n\
         keel.toml:3: agents.a.max_steps: must be at least 1; leave it out for no limit\n\
         keel.toml:4: agents.a.task_timeout: must be longer than 0s; leave it out for no limit\n\
         keel.toml:5: agents.a.max_attempts: must be at least 1"
    );
}

#[test]
fn the_loop_guard_is_on_off_or_tuned_and_its_limits_are_checked() {
    let text = "[agents.a]\n\n[agents.b]\nloop_guard = false\n\n[agents.c]\nloop_guard = { same_call = 2, similarity = 0.9 }\n";
    let settings = super::settings(text);
    let guard = |name: &str| settings.agents[name].loop_guard;
    assert_eq!(guard("a"), Some(crate::LoopGuardSettings::default()));
    assert_eq!(guard("b"), None);
    assert_eq!(
        guard("c"),
        Some(crate::LoopGuardSettings {
            same_call: 2,
            repeats: crate::DEFAULT_LOOP_REPEATS,
            window: crate::DEFAULT_LOOP_WINDOW,
            similarity: 0.9,
        })
    );

    let text =
        "[agents.a]\nloop_guard = { same_call = 0, repeats = 4, window = 3, similarity = 1.5 }\n";
    assert_eq!(
        errors(text),
        "keel.toml:2: agents.a.loop_guard.same_call: must be at least 1 (identical tool calls a task may make); use loop_guard = false to turn the guard off\n\
         keel.toml:2: agents.a.loop_guard.window: must be at least repeats (4): the repeats are counted among the last window answers\n\
         keel.toml:2: agents.a.loop_guard.similarity: must be in (0, 1], like 0.85; got 1.5"
    );
    let unknown = errors("[agents.a]\nloop_guard = { same_calls = 2 }\n");
    assert!(
        unknown.starts_with("keel.toml:2: agents.a.loop_guard") && unknown.contains("same_calls"),
        "{unknown}"
    );
    let wrong = errors("[agents.a]\nloop_guard = \"yes\"\n");
    assert!(wrong.contains("true, false, or a table"), "{wrong}");
}

#[test]
fn two_agents_may_not_share_a_key() {
    let text = "[agents.ops]
keys_env = [\"KEEL_KEY_OPS\", \"KEEL_KEY_COPY\"]

[agents.support]
keys_env = [\"KEEL_KEY_SUPPORT\"]
";
    assert_eq!(
        errors(text),
        "keel.toml:5: agents.support.keys_env[0]: the key in KEEL_KEY_SUPPORT is also the key \
         in KEEL_KEY_COPY of agent \"ops\"; each key must name one agent"
    );
}

#[test]
fn tool_needs_exactly_one_endpoint() {
    assert_eq!(
        errors(
            "[tools.a]\nside_effects = true\n\n[tools.b]\nurl = \"http://x\"\nwasm = \"b.wasm\"\n"
        ),
        "keel.toml:1: tools.a: needs url = \"http://...\" or wasm = \"path.wasm\"\n\
         keel.toml:6: tools.b.wasm: give either url or wasm, not both"
    );
}

#[test]
fn a_tool_rule_that_is_not_cel_is_named_by_key_and_line() {
    let text = "[tools.refund]\nurl = \"http://127.0.0.1:9/refund\"\nrules = [\n  \"args.amount <= 500\",\n  \"args.amount <=\",\n]\n";
    let text = errors(text);
    assert!(
        text.starts_with("keel.toml:5: tools.refund.rules[1]: not a CEL expression: "),
        "{text}"
    );
}

#[test]
fn tool_timeout_and_retry_are_checked() {
    assert_eq!(
        errors("[tools.t]\nurl = \"http://x\"\ntimeout = \"0s\"\nretry = { max_attempts = 0 }\n"),
        "keel.toml:3: tools.t.timeout: must be longer than 0s\n\
         keel.toml:4: tools.t.retry.max_attempts: must be at least 1"
    );
}

#[test]
fn a_bad_profile_is_named_by_key_and_line() {
    let text = "[tools.delete_rows]\nurl = \"http://x\"\nredact = [\"rows\"]\nprofile = { args = [\"rows\"], quantile = 1.5, factor = 0.5, timeout = \"0s\" }\n";
    assert_eq!(
        errors(text),
        "keel.toml:4: tools.delete_rows.profile.args: \"rows\" is also in redact: keel learns a profile from the values it logs, and a redacted value is never logged\n\
         keel.toml:4: tools.delete_rows.profile.quantile: must be in (0, 1], like 0.99; got 1.5\n\
         keel.toml:4: tools.delete_rows.profile.factor: must be at least 1 (the threshold is quantile × factor); got 0.5\n\
         keel.toml:4: tools.delete_rows.profile.timeout: must be longer than 0s"
    );
}

#[test]
fn a_key_budget_needs_keys() {
    assert_eq!(
        errors("[agents.a]\nkey_budget = { tokens_per_hour = 10 }\n"),
        "keel.toml:2: agents.a.key_budget: needs keys_env: a key budget limits each of the agent's keys, and it has none"
    );
}

#[test]
fn an_agent_s_preflight_rules_and_tools_are_checked() {
    let text = "[tools.lookup]\nurl = \"http://x\"\n\n[agents.support]\ntools = [\"lookup\", \"refund\"]\npreflight = [\"size(input.question) > 0\", \"input.question ==\"]\n";
    let got = errors(text);
    let lines: Vec<&str> = got.lines().collect();
    assert_eq!(lines.len(), 2, "{got}");
    assert!(
        lines.contains(
            &"keel.toml:5: agents.support.tools[1]: unknown tool \"refund\"; known: lookup"
        ),
        "{got}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l
                .starts_with("keel.toml:6: agents.support.preflight[1]: not a CEL expression: ")),
        "{got}"
    );
}

// === many at once ===

#[test]
fn all_validation_errors_are_reported_in_file_order() {
    let text = "[server]
listen = \"nope\"
admin_token_env = \"UNSET_TOKEN\"

[providers.openai]
kind = \"openai\"
base_url = \"https://api.openai.com/v1\"
api_key_env = \"UNSET_KEY\"

[routes.smart]
targets = [{ provider = \"opnai\", model = \"gpt-5\" }]
retry = { base = \"20s\", cap = \"10s\", budget_ratio = -0.1 }

[breaker]
min_calls = 0
";
    assert_eq!(
        errors(text),
        "keel.toml:2: server.listen: \"nope\" is not a socket address; write IP:PORT, like \"127.0.0.1:8420\"\n\
         keel.toml:3: server.admin_token_env: environment variable UNSET_TOKEN is not set\n\
         keel.toml:8: providers.openai.api_key_env: environment variable UNSET_KEY is not set\n\
         keel.toml:11: routes.smart.targets[0].provider: unknown provider \"opnai\"; known: openai\n\
         keel.toml:12: routes.smart.retry.base: 20s is larger than cap 10s\n\
         keel.toml:12: routes.smart.retry.budget_ratio: -0.1 is outside [0, 1]\n\
         keel.toml:15: breaker.min_calls: must be at least 1"
    );
}

// === alerts ===

#[test]
fn alerts_name_their_webhooks_and_detector_settings() {
    let text = "[alerts]\ndigest_every = \"1m\"\nwebhooks = [\n  { url = \"http://127.0.0.1:9/hook\", format = \"slack\", min_severity = \"critical\" },\n  { url = \"http://127.0.0.1:9/all\" },\n]\nanomaly = { sigmas = 4.0 }\n";
    let alerts = super::settings(text).alerts;
    assert_eq!(alerts.digest_every, std::time::Duration::from_secs(60));
    assert!(alerts.log);
    assert_eq!(
        alerts.webhooks,
        vec![
            crate::Webhook {
                url: "http://127.0.0.1:9/hook".into(),
                format: crate::WebhookFormat::Slack,
                min_severity: crate::Severity::Critical,
            },
            crate::Webhook {
                url: "http://127.0.0.1:9/all".into(),
                format: crate::WebhookFormat::Json,
                min_severity: crate::Severity::Warning,
            },
        ]
    );
    assert_eq!(alerts.anomaly.sigmas, 4.0);
    assert_eq!(alerts.anomaly.warmup, 20);

    let bad = "[alerts]\ndigest_every = \"0s\"\nwebhooks = [{ url = \"ftp://x\" }]\nanomaly = { warmup = 1, sigmas = 0.0, recent = 0 }\n";
    let got = errors(bad);
    let lines: Vec<&str> = got.lines().collect();
    assert_eq!(lines.len(), 5, "{got}");
    assert_eq!(
        lines[0],
        "keel.toml:2: alerts.digest_every: 0s is shorter than 1s: a digest is sent this often"
    );
    assert!(
        lines[1].starts_with("keel.toml:3: alerts.webhooks[0].url: "),
        "{got}"
    );
    assert!(
        lines[2].starts_with("keel.toml:4: alerts.anomaly.warmup: must be at least 2"),
        "{got}"
    );
    assert!(
        lines[3].starts_with("keel.toml:4: alerts.anomaly.sigmas: must be above 0"),
        "{got}"
    );
    assert_eq!(
        lines[4],
        "keel.toml:4: alerts.anomaly.recent: must be at least 1"
    );
    let unknown = errors("[alerts]\nwebhooks = [{ url = \"http://x\", formatt = \"slack\" }]\n");
    assert!(unknown.contains("formatt"), "{unknown}");
}

#[test]
fn telemetry_names_a_bad_endpoint_and_defaults_to_no_traces() {
    let settings = super::settings("[telemetry]\nlog_format = \"json\"\n").telemetry;
    assert_eq!(settings.otlp_endpoint, None);
    assert_eq!(settings.log_format, crate::LogFormat::Json);
    assert_eq!(settings.service_name, "keel");
    let on = super::settings(
        "[telemetry]\notlp_endpoint = \"http://127.0.0.1:4318/\"\notlp_protocol = \"http/json\"\n",
    )
    .telemetry;
    assert_eq!(on.otlp_endpoint.as_deref(), Some("http://127.0.0.1:4318"));
    assert_eq!(on.otlp_protocol, crate::OtlpProtocol::HttpJson);
    let got = errors("[telemetry]\notlp_endpoint = \"grpc://x:4317\"\n");
    assert!(
        got.starts_with("keel.toml:2: telemetry.otlp_endpoint: "),
        "{got}"
    );
    // The example is a collector's URL, not a model provider's.
    let got = errors("[telemetry]\notlp_endpoint = \"localhost:4318\"\n");
    assert!(
        got.ends_with("is not an http(s) URL; write it like \"http://127.0.0.1:4318\""),
        "{got}"
    );
    let got = errors("[telemetry]\notlp_protocol = \"grpc\"\n");
    assert!(got.contains("http/protobuf"), "{got}");
}

#[test]
fn a_key_in_the_file_and_an_unquoted_dotted_name_get_a_hint() {
    assert_eq!(
        errors(
            "[providers.openai]
kind = \"openai\"
base_url = \"https://api.openai.com/v1\"
api_key = \"sk-123\"
"
        ),
        "keel.toml:4: providers.openai.api_key: unknown field `api_key`, expected one of \
         `kind`, `base_url`, `api_key_env`, `api_key_header`, `headers`, `query`, `prices`; keel \
         takes no key in the file: put it in an environment variable and name the variable with api_key_env"
    );
    let text = with_openai(
        "[routes.gpt-4.1]
targets = [{ provider = \"openai\", model = \"gpt-4.1\" }]
",
    );
    let got = errors(&text);
    assert!(
        got.ends_with("if \"gpt-4.1\" is one name, quote it: [routes.\"gpt-4.1\"]"),
        "{got}"
    );
}

#[test]
fn a_base_url_that_names_an_endpoint_is_refused() {
    assert_eq!(
        errors(
            "[providers.openai]
kind = \"openai\"
base_url = \"https://api.openai.com/v1/chat/completions\"
"
        ),
        "keel.toml:3: providers.openai.base_url: \"https://api.openai.com/v1/chat/completions\" \
         names an endpoint; give the API's root, which keel appends /chat/completions and the \
         others to (for example \"https://api.openai.com/v1\")"
    );
}

#[test]
fn a_task_timeout_is_at_most_a_year() {
    assert_eq!(
        errors("[agents.a]\ntask_timeout = \"400d\"\n"),
        "keel.toml:2: agents.a.task_timeout: must be at most 366d; leave it out for no limit"
    );
}

#[test]
fn an_empty_degraded_reply_is_refused() {
    let text = with_smart(
        "degraded_reply = \" \"
",
    );
    assert_eq!(
        errors(&text),
        "keel.toml:7: routes.smart.degraded_reply: is empty: clients would get a blank answer; write the text to serve, or leave degraded_reply out for a 503"
    );
}
