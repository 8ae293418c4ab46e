//! The gateway's Prometheus metrics (DESIGN §7), in one registry.
//!
//! Owns the metric families and their label sets; it does not decide when to
//! count (the route executor does) and does not serve HTTP (the router does).

use std::sync::atomic::AtomicU64;

use keel_core::LabelValue;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of `keel_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Route the client named; `none` for a request refused before its route was known.
    pub route: LabelValue,
    /// `provider/model` that answered, or `none`.
    pub target: LabelValue,
    /// `ok`, `degraded`, `error`, `stream_error`, `client_gone`, `rejected`.
    pub outcome: LabelValue,
}

/// Labels of `keel_attempts_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    /// `provider/model`.
    pub target: LabelValue,
    /// `ok`, the error class of the failure (`retryable`, `fallback_only`, `fatal`), or
    /// `stream_error` (a stream that failed after its first byte; counted when it ends).
    pub outcome: LabelValue,
}

/// A label set with only `route`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    /// Route name.
    pub route: LabelValue,
}

/// A label set with only `target`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabel {
    /// `provider/model`.
    pub target: LabelValue,
}

/// Labels of `gen_ai_client_token_usage` (OTel GenAI semantic conventions).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    /// `input` or `output`.
    pub gen_ai_token_type: LabelValue,
    /// Route name.
    pub route: LabelValue,
}

/// Labels of `keel_budget_remaining`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BudgetLabels {
    /// Agent name.
    pub agent: LabelValue,
    /// `tokens`, `usd` or `requests`.
    pub unit: LabelValue,
}

/// Labels of `keel_loops_detected_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoopLabels {
    /// The agent whose task looped.
    pub agent: LabelValue,
    /// `repeated_output`, `bouncing`, `same_tool_call` or `token_burn`.
    pub kind: LabelValue,
}

/// Labels of `keel_breaker_transitions_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    /// `provider/model`.
    pub target: LabelValue,
    /// The state entered: `open`, `half_open` or `closed`.
    pub to: LabelValue,
}

/// Labels of `keel_guardrail_blocks_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GuardrailLabels {
    /// The tool.
    pub tool: LabelValue,
    /// The rule that blocked, as configured.
    pub rule: LabelValue,
}

/// Labels of `keel_chaos_injected_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChaosLabels {
    /// `provider/model` of the attempt.
    pub target: LabelValue,
    /// `status`, `latency`, `hang`, `drop`, `stream_cut` or `malformed`.
    pub fault: LabelValue,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms .. ~262 s: model calls are slow (the default total deadline is 120 s, and a
    // stream lasts until its end), the gateway's own work is not.
    Histogram::new(exponential_buckets(0.001, 2.0, 19))
}

fn token_histogram() -> Histogram {
    // 1 .. ~4M tokens, OTel's advised boundaries are powers of 4.
    Histogram::new(exponential_buckets(1.0, 4.0, 12))
}

/// A route's series that every answered call updates, resolved once when the gateway is
/// built instead of by label on each call (which clones the labels, hashes them and takes
/// the family's lock). They share their values with the families, so `/metrics` shows the
/// same series, from the start at zero.
#[derive(Debug)]
pub(crate) struct RouteMetrics {
    /// `keel_request_duration_seconds{route}`.
    pub(crate) duration: Histogram,
    /// `gen_ai_client_token_usage{gen_ai_token_type="input",route}`.
    pub(crate) input_tokens: Histogram,
    /// `gen_ai_client_token_usage{gen_ai_token_type="output",route}`.
    pub(crate) output_tokens: Histogram,
    /// `keel_requests_total{route,target,outcome="ok"}`, per target id of the route.
    ok: Vec<(String, Counter)>,
}

impl RouteMetrics {
    /// The series of `route` over `targets` (their ids), created in `m`.
    pub(crate) fn new<'t>(
        m: &Metrics,
        route: &str,
        targets: impl Iterator<Item = &'t str>,
    ) -> Self {
        let labels = |kind: &str| TokenLabels {
            gen_ai_token_type: kind.into(),
            route: route.into(),
        };
        let ok = targets
            .map(|target| {
                let counter = m
                    .requests
                    .get_or_create(&RequestLabels {
                        route: route.into(),
                        target: target.into(),
                        outcome: "ok".into(),
                    })
                    .clone();
                (target.to_owned(), counter)
            })
            .collect();
        // One statement each: `get_or_create` hands out a read guard on the family, and a
        // guard kept to the end of a larger expression would deadlock the next creation.
        let duration = m
            .request_duration
            .get_or_create(&RouteLabel {
                route: route.into(),
            })
            .clone();
        let input_tokens = m.token_usage.get_or_create(&labels("input")).clone();
        let output_tokens = m.token_usage.get_or_create(&labels("output")).clone();
        Self {
            duration,
            input_tokens,
            output_tokens,
            ok,
        }
    }

    /// Counts an answered call (`outcome="ok"`) of `target`; false when `target` is not
    /// one of the route's (the caller counts it by label).
    pub(crate) fn count_ok(&self, target: &str) -> bool {
        match self.ok.iter().find(|(id, _)| id == target) {
            Some((_, counter)) => {
                counter.inc();
                true
            }
            None => false,
        }
    }
}

/// Every gateway metric, registered once.
pub struct Metrics {
    registry: Registry,
    /// `keel_requests_total{route,target,outcome}`.
    pub requests: Family<RequestLabels, Counter>,
    /// `keel_request_duration_seconds{route}`.
    pub request_duration: HistogramFamily<RouteLabel>,
    /// `keel_attempts_total{target,outcome}`.
    pub attempts: Family<AttemptLabels, Counter>,
    /// `keel_retries_total{route}`.
    pub retries: Family<RouteLabel, Counter>,
    /// `keel_fallbacks_total{route}`.
    pub fallbacks: Family<RouteLabel, Counter>,
    /// `keel_degraded_total{route}`.
    pub degraded: Family<RouteLabel, Counter>,
    /// `keel_stream_errors_total{route}`: streams ended by an error event after the first byte.
    pub stream_errors: Family<RouteLabel, Counter>,
    /// `keel_breaker_state{target}`: 0 closed, 1 half-open, 2 open.
    pub breaker_state: Family<TargetLabel, Gauge>,
    /// `keel_self_corrections_total{route}`: answers sent back once to be corrected.
    pub self_corrections: Family<RouteLabel, Counter>,
    /// `keel_guardrail_blocks_total{tool,rule}`: actions a guard blocked.
    pub guardrail_blocks: Family<GuardrailLabels, Counter>,
    /// `keel_breaker_transitions_total{target,to}`: breaker state changes (trips are `to="open"`).
    pub breaker_transitions: Family<TransitionLabels, Counter>,
    /// `gen_ai_client_token_usage{gen_ai_token_type,route}`.
    pub token_usage: HistogramFamily<TokenLabels>,
    /// `keel_budget_remaining{agent,unit}`.
    pub budget_remaining: Family<BudgetLabels, Gauge<f64, AtomicU64>>,
    /// `keel_budget_limit{agent,unit}`: each budget's size per window.
    pub budget_limit: Family<BudgetLabels, Gauge<f64, AtomicU64>>,
    /// `keel_loops_detected_total{agent,kind}`.
    pub loops_detected: Family<LoopLabels, Counter>,
    /// `keel_chaos_injected_total{target,fault}`: faults `[chaos]` injected into attempts.
    pub chaos_injected: Family<ChaosLabels, Counter>,
    /// Agent names as labels, bounded (with no agent keys, `x-keel-agent` is any name).
    pub agents: std::sync::Arc<keel_core::AgentLabels>,
}

impl Metrics {
    /// Creates and registers every family.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let request_duration: HistogramFamily<RouteLabel> =
            Family::new_with_constructor(latency_histogram);
        let attempts = Family::<AttemptLabels, Counter>::default();
        let retries = Family::<RouteLabel, Counter>::default();
        let fallbacks = Family::<RouteLabel, Counter>::default();
        let degraded = Family::<RouteLabel, Counter>::default();
        let stream_errors = Family::<RouteLabel, Counter>::default();
        let breaker_state = Family::<TargetLabel, Gauge>::default();
        let breaker_transitions = Family::<TransitionLabels, Counter>::default();
        let guardrail_blocks = Family::<GuardrailLabels, Counter>::default();
        let self_corrections = Family::<RouteLabel, Counter>::default();
        let token_usage: HistogramFamily<TokenLabels> =
            Family::new_with_constructor(token_histogram);
        let budget_remaining = Family::<BudgetLabels, Gauge<f64, AtomicU64>>::default();
        let budget_limit = Family::<BudgetLabels, Gauge<f64, AtomicU64>>::default();
        let loops_detected = Family::<LoopLabels, Counter>::default();
        let chaos_injected = Family::<ChaosLabels, Counter>::default();
        // prometheus-client appends `_total` to counters itself.
        registry.register(
            "keel_requests",
            "Gateway requests by route, answering target and outcome",
            requests.clone(),
        );
        registry.register(
            "keel_request_duration_seconds",
            "Time from request to the end of the answer, per route",
            request_duration.clone(),
        );
        registry.register(
            "keel_attempts",
            "Upstream attempts by target and outcome",
            attempts.clone(),
        );
        registry.register(
            "keel_retries",
            "Retries scheduled, per route",
            retries.clone(),
        );
        registry.register(
            "keel_fallbacks",
            "Calls answered by a target other than the first, per route",
            fallbacks.clone(),
        );
        registry.register(
            "keel_degraded",
            "Static degraded replies served, per route",
            degraded.clone(),
        );
        registry.register(
            "keel_stream_errors",
            "Streams ended with an error event after the first byte, per route",
            stream_errors.clone(),
        );
        registry.register(
            "keel_breaker_state",
            "Circuit breaker state per target: 0 closed, 1 half-open, 2 open",
            breaker_state.clone(),
        );
        registry.register(
            "keel_self_corrections",
            "Answers that did not match the request's JSON schema and were sent back once",
            self_corrections.clone(),
        );
        registry.register(
            "keel_guardrail_blocks",
            "Actions blocked by a guard, by tool and rule",
            guardrail_blocks.clone(),
        );
        registry.register(
            "keel_breaker_transitions",
            "Circuit breaker state changes per target, by the state entered",
            breaker_transitions.clone(),
        );
        registry.register(
            "gen_ai_client_token_usage",
            "Tokens used per call, by token type (input, output)",
            token_usage.clone(),
        );
        registry.register(
            "keel_budget_remaining",
            "Budget left in the current window, per agent and unit",
            budget_remaining.clone(),
        );
        registry.register(
            "keel_budget_limit",
            "Budget per window (tokens per hour, USD per day, requests per minute), per agent and unit",
            budget_limit.clone(),
        );
        registry.register(
            "keel_loops_detected",
            "Loops the loop guard stopped, by agent and kind",
            loops_detected.clone(),
        );
        registry.register(
            "keel_chaos_injected",
            "Faults injected by [chaos] into upstream attempts, by target and fault",
            chaos_injected.clone(),
        );
        Self {
            registry,
            requests,
            request_duration,
            attempts,
            retries,
            fallbacks,
            degraded,
            stream_errors,
            breaker_state,
            breaker_transitions,
            guardrail_blocks,
            self_corrections,
            token_usage,
            budget_remaining,
            budget_limit,
            loops_detected,
            agents: std::sync::Arc::default(),
            chaos_injected,
        }
    }

    /// Sets `keel_budget_remaining` of `agent` for each unit in `left`.
    pub fn set_budget_remaining(&self, agent: &str, left: &crate::agents::Remaining) {
        for (unit, left) in left {
            self.budget_remaining
                .get_or_create(&BudgetLabels {
                    agent: agent.into(),
                    unit: unit.as_str().into(),
                })
                .set(*left);
        }
    }

    /// The registry, for other parts of keel to register their metrics in
    /// before the gateway starts serving `/metrics`.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Renders the Prometheus text exposition format (version 0.0.4), which
    /// every Prometheus tool reads; see [`Metrics::render_openmetrics`].
    pub fn render(&self) -> String {
        to_prometheus_text(&self.render_openmetrics())
    }

    /// Renders the OpenMetrics text format (what `prometheus-client` speaks natively).
    pub fn render_openmetrics(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an error here would be a bug in
        // the encoder, and an empty scrape is the honest answer to it.
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Rewrites OpenMetrics text as Prometheus text 0.0.4: a counter family's
/// `# HELP`/`# TYPE` name gains its samples' `_total` suffix, and the
/// OpenMetrics-only `# UNIT` and `# EOF` lines go.
fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match rewritten {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_design_names() {
        let m = Metrics::new();
        m.requests
            .get_or_create(&RequestLabels {
                route: "smart".into(),
                target: "openai/gpt".into(),
                outcome: "ok".into(),
            })
            .inc();
        m.breaker_state
            .get_or_create(&TargetLabel {
                target: "openai/gpt".into(),
            })
            .set(2);
        let text = m.render();
        assert!(text.contains(
            "keel_requests_total{route=\"smart\",target=\"openai/gpt\",outcome=\"ok\"} 1"
        ));
        assert!(text.contains("keel_breaker_state{target=\"openai/gpt\"} 2"));
        assert!(
            text.contains("# TYPE keel_requests_total counter"),
            "{text}"
        );
        assert!(
            text.contains("# HELP keel_requests_total Gateway requests"),
            "{text}"
        );
        assert!(!text.contains("# EOF"));
        assert!(m.render_openmetrics().ends_with("# EOF\n"));
    }

    #[test]
    fn a_route_s_resolved_series_are_the_families_series() {
        let m = Metrics::new();
        let route = RouteMetrics::new(&m, "smart", ["sim/a", "sim/b"].into_iter());
        let zero = m.render();
        assert!(
            zero.contains("keel_requests_total{route=\"smart\",target=\"sim/b\",outcome=\"ok\"} 0"),
            "{zero}"
        );
        assert!(route.count_ok("sim/b") && route.count_ok("sim/b"));
        assert!(!route.count_ok("sim/c"), "not a target of the route");
        route.duration.observe(0.25);
        route.input_tokens.observe(7.0);
        // The same series, updated by label as before.
        m.requests
            .get_or_create(&RequestLabels {
                route: "smart".into(),
                target: "sim/b".into(),
                outcome: "ok".into(),
            })
            .inc();
        let text = m.render();
        assert!(
            text.contains("keel_requests_total{route=\"smart\",target=\"sim/b\",outcome=\"ok\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("keel_requests_total{route=\"smart\",target=\"sim/a\",outcome=\"ok\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("keel_request_duration_seconds_count{route=\"smart\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("gen_ai_token_type=\"input\",route=\"smart\"} 1"),
            "{text}"
        );
    }
}
