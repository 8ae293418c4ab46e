//! OpenTelemetry traces end to end: keel exports OTLP/HTTP (protobuf) to a small receiver
//! here, which decodes the spans with the OTLP protobuf definitions and checks their
//! names, GenAI attributes and parent-child links.

use std::collections::HashMap;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use serde_json::json;
use tokio::sync::mpsc;

use crate::common::{Keel, sim};

/// An OTLP/HTTP receiver on loopback: the spans of every export, and the service name.
async fn receiver() -> (String, mpsc::UnboundedReceiver<(String, Vec<Span>)>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let tx = tx.clone();
                async move {
                    assert_eq!(
                        headers.get("content-type").unwrap(),
                        "application/x-protobuf"
                    );
                    let request = ExportTraceServiceRequest::decode(body).unwrap();
                    for resource in request.resource_spans {
                        let service = resource
                            .resource
                            .iter()
                            .flat_map(|r| &r.attributes)
                            .find(|a| a.key == "service.name")
                            .and_then(|a| a.value.as_ref()?.value.clone());
                        let service = match service {
                            Some(Any::StringValue(s)) => s,
                            _ => String::new(),
                        };
                        let spans = resource
                            .scope_spans
                            .into_iter()
                            .flat_map(|s| s.spans)
                            .collect();
                        let _ = tx.send((service, spans));
                    }
                    axum::http::StatusCode::OK
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, rx)
}

fn attr(span: &Span, key: &str) -> Option<Any> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref()?.value.clone())
}

fn text(span: &Span, key: &str) -> String {
    match attr(span, key) {
        Some(Any::StringValue(s)) => s,
        other => panic!("{key} is {other:?} on span {}", span.name),
    }
}

fn int(span: &Span, key: &str) -> i64 {
    match attr(span, key) {
        Some(Any::IntValue(n)) => n,
        other => panic!("{key} is {other:?} on span {}", span.name),
    }
}

const TRACED: &str = r#"

[providers.sim]
kind = "openai"
base_url = "{sim}"

[routes.smart]
targets = [{ provider = "sim", model = "primary" }]

[tools.search]
url = "{sim}/tools/search"

[tools.refund]
url = "{sim}/tools/refund"
rules = ["args.amount <= 500"]

[telemetry]
otlp_endpoint = "{otlp}"
service_name = "keel-under-test"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn spans_follow_the_genai_conventions_and_nest_under_their_task() {
    let models = sim().await;
    let (otlp, mut exports) = receiver().await;
    let keel = Keel::start(&TRACED.replace("{otlp}", &otlp), &models).await;
    let headers = [("x-keel-agent", "support")];

    let (id, token) = keel.claimed_task("support").await;
    let in_task = [("x-keel-agent", "support"), ("x-keel-task", id.as_str())];
    let (status, answer) = keel
        .post_json(
            "/v1/chat/completions",
            &in_task,
            &json!({"model": "smart", "messages": [{"role": "user", "content": "find the refund policy"}]}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let (status, _) = keel
        .post_json(
            "/v1/tools/search/invoke",
            &headers,
            &json!({"task": id, "args": {"query": "refund policy"}}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = keel
        .post_json(
            "/v1/tools/refund/invoke",
            &headers,
            &json!({"task": id, "args": {"amount": 900}}),
        )
        .await;
    assert_eq!(status, 403);
    let (status, done) = keel
        .post_json(
            &format!("/v1/tasks/{id}/complete"),
            &headers,
            &json!({"lease_token": token, "output": "ok", "confidence": 0.8}),
        )
        .await;
    assert_eq!(status, 200, "{done}");

    // Exports arrive about every second; gather until the task's span is there.
    let mut spans: HashMap<String, Span> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !spans.contains_key("invoke_agent support") {
        let (service, batch) = tokio::time::timeout_at(deadline, exports.recv())
            .await
            .expect("no invoke_agent span within 10 s")
            .unwrap();
        assert_eq!(service, "keel-under-test");
        for span in batch {
            spans.insert(span.name.clone(), span);
        }
    }
    let task = &spans["invoke_agent support"];
    let chat = spans.get("chat smart").expect("a chat span");
    let search = spans.get("execute_tool search").expect("a tool span");
    let refund = spans
        .get("execute_tool refund")
        .expect("a blocked tool's span");

    // One trace per task: the calls are children of the task's span.
    assert!(
        task.parent_span_id.is_empty(),
        "the task's span is the root"
    );
    for child in [chat, search, refund] {
        assert_eq!(
            child.trace_id, task.trace_id,
            "{} in the task's trace",
            child.name
        );
        assert_eq!(
            child.parent_span_id, task.span_id,
            "{} under the task",
            child.name
        );
        assert!(child.start_time_unix_nano >= task.start_time_unix_nano);
        assert!(child.end_time_unix_nano <= task.end_time_unix_nano);
    }

    assert_eq!(text(task, "gen_ai.operation.name"), "invoke_agent");
    assert_eq!(text(task, "gen_ai.agent.name"), "support");
    assert_eq!(text(task, "keel.task.id"), id);
    assert_eq!(text(task, "keel.task.state"), "succeeded");

    assert_eq!(chat.kind, 3, "client span");
    assert_eq!(text(chat, "gen_ai.operation.name"), "chat");
    assert_eq!(text(chat, "gen_ai.system"), "openai");
    assert_eq!(text(chat, "gen_ai.request.model"), "smart");
    assert_eq!(
        text(chat, "gen_ai.response.model"),
        answer["model"].as_str().unwrap()
    );
    assert_eq!(
        int(chat, "gen_ai.usage.input_tokens"),
        answer["usage"]["prompt_tokens"].as_i64().unwrap()
    );
    assert_eq!(
        int(chat, "gen_ai.usage.output_tokens"),
        answer["usage"]["completion_tokens"].as_i64().unwrap()
    );
    match attr(chat, "gen_ai.response.finish_reasons") {
        Some(Any::ArrayValue(a)) => assert_eq!(
            a.values[0].value,
            Some(Any::StringValue(
                answer["choices"][0]["finish_reason"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            ))
        ),
        other => panic!("finish reasons: {other:?}"),
    }
    assert_eq!(int(chat, "keel.attempts"), 1);
    assert_eq!(attr(chat, "keel.fallback"), Some(Any::BoolValue(false)));
    assert_eq!(text(chat, "keel.breaker.state"), "closed");
    assert_eq!(text(chat, "keel.target"), "sim/primary");

    assert_eq!(text(search, "gen_ai.tool.name"), "search");
    assert_eq!(text(search, "keel.guardrail.verdict"), "allow");
    assert_eq!(text(refund, "keel.guardrail.verdict"), "block");
    assert_eq!(refund.status.as_ref().unwrap().code, 2, "an error status");
}
