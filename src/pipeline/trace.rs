//! The trace of one message across the pipeline: its `consume` span continues the incoming
//! W3C `traceparent`, the `issue` and `store` spans of its batch hang under it, and the
//! `publish` span's context becomes the outgoing event's `traceparent`.
//!
//! Spans reach the exporter only when [`crate::telemetry`] installed one
//! (`OTEL_EXPORTER_OTLP_ENDPOINT`); without it these functions cost little and the outgoing
//! `traceparent` keeps the incoming trace id with a new span id.

use std::collections::HashMap;
use std::future::Future;

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::broker::topology::headers;

tokio::task_local! {
    /// The `consume` span of each request of the batch being provisioned, by message
    /// identity, so that the batch's issue calls land in the right trace.
    static REQUEST_SPANS: HashMap<String, Span>;
}

/// Makes `span` continue the trace that `traceparent` names.
pub(super) fn continue_trace(span: &Span, traceparent: Option<&str>) {
    let Some(tp) = traceparent else { return };
    let carrier = HashMap::from([(headers::TRACEPARENT.to_owned(), tp.to_owned())]);
    let parent = TraceContextPropagator::new().extract(&carrier);
    if parent.span().span_context().is_valid() {
        // Fails only when the span is not exported or already started: nothing to continue.
        let _ = span.set_parent(parent);
    }
}

/// The `traceparent` of a message published within `span`, when traces are exported.
pub(super) fn outgoing(span: &Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove(headers::TRACEPARENT)
}

/// Runs `work` (a batch's provisioning) knowing each request's `consume` span.
pub(super) async fn with_request_spans<F: Future>(
    spans: HashMap<String, Span>,
    work: F,
) -> F::Output {
    REQUEST_SPANS.scope(spans, work).await
}

/// The `consume` span of the request with this identity, when the batch being provisioned
/// has one; else the current span.
pub(super) fn request_span(identity: &str) -> Span {
    REQUEST_SPANS
        .try_with(|spans| spans.get(identity).cloned())
        .ok()
        .flatten()
        .unwrap_or_else(Span::current)
}
