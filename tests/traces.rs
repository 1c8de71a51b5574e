//! Traces out: one request's spans (consume → issue call → store → publish) continue the
//! trace of its incoming `traceparent`, and the ready event carries that trace on.
//!
//! The spans go to the OpenTelemetry SDK's in-memory exporter through the same `tracing`
//! layer `run` installs for OTLP ([`tenant_tokens::telemetry::otlp::layer`]); the worker
//! runs in this process on the real RabbitMQ and Postgres.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use opentelemetry::trace::SpanId;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing_subscriber::prelude::*;

use support::{Collector, Producer, TestEnv, eventually, stub_issuer, tenant};

const WAIT: Duration = Duration::from_secs(30);
/// The spans of one request, by name.
const SPANS: [&str; 4] = ["consume", "issue", "store", "publish"];

/// The exported spans of the trace `trace_id`, by name.
fn spans_of(exporter: &InMemorySpanExporter, trace_id: &str) -> HashMap<String, SpanData> {
    exporter
        .get_finished_spans()
        .unwrap_or_default()
        .into_iter()
        .filter(|s| s.span_context.trace_id().to_string() == trace_id)
        .map(|s| (s.name.to_string(), s))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_requests_spans_continue_the_incoming_trace_and_the_event_carries_it() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new("info"))
        .with(tenant_tokens::telemetry::otlp::layer(&provider))
        .try_init()
        .expect("the only subscriber of this test binary");

    let env = TestEnv::new().await;
    let stub = stub_issuer(Duration::ZERO).await;
    let ready = Collector::ready_events(&env).await;
    let worker = env.start_worker(&stub.url(), &[]).await;
    let producer = Producer::new(&env).await;

    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let incoming_span = "00f067aa0ba902b7";
    let mut h = FieldTable::default();
    let traceparent = format!("00-{trace_id}-{incoming_span}-01");
    h.insert(
        "traceparent".into(),
        AMQPValue::LongString(traceparent.into()),
    );
    let t = tenant("traced");
    let body = serde_json::json!({ "tenant_id": t }).to_string();
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id(format!("m-{t}").into())
        .with_headers(h);
    producer
        .publish("tenant.created", body.as_bytes(), props)
        .await;

    let events = ready.wait_for(1, WAIT).await;
    let outgoing = events[0]
        .header("traceparent")
        .expect("the event's traceparent");
    let parts: Vec<&str> = outgoing.split('-').collect();
    assert_eq!(parts.get(1), Some(&trace_id.as_str()), "{outgoing}");

    eventually("the request's four spans exported", WAIT, || {
        let spans = spans_of(&exporter, &trace_id);
        async move { SPANS.iter().all(|n| spans.contains_key(*n)) }
    })
    .await;
    let spans = spans_of(&exporter, &trace_id);
    let consume = &spans["consume"];
    assert_eq!(
        consume.parent_span_id,
        SpanId::from_hex(incoming_span).expect("span id"),
        "consume continues the incoming span"
    );
    let consume_id = consume.span_context.span_id();
    for name in ["issue", "store", "publish"] {
        assert_eq!(
            spans[name].parent_span_id, consume_id,
            "{name} under consume"
        );
    }
    assert_eq!(
        parts.get(2).copied(),
        Some(spans["publish"].span_context.span_id().to_string().as_str()),
        "the event's parent is the publish span"
    );

    worker.stop().await;
    stub.shutdown().await;
    env.cleanup().await;
}
