//! Traces out: the per-message spans exported over OTLP (HTTP, protobuf), configured with the
//! standard OpenTelemetry variables and off unless an endpoint is set.
//!
//! - `OTEL_EXPORTER_OTLP_ENDPOINT` (e.g. `http://collector:4318`; spans go to `/v1/traces`)
//!   or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (the full URL) turns export on;
//! - `OTEL_SERVICE_NAME` (default `tenant-tokens`), `OTEL_RESOURCE_ATTRIBUTES`,
//!   `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_TRACES_SAMPLER` and the
//!   batch settings (`OTEL_BSP_*`) are read by the SDK as usual;
//! - `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turns it off again.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetryLayer;
use tracing_subscriber::registry::LookupSpan;

/// The name spans are exported under unless `OTEL_SERVICE_NAME` says otherwise.
const SERVICE_NAME: &str = "tenant-tokens";

/// Keeps the exporter of `run` alive; dropping it sends what is still buffered.
#[derive(Debug, Default)]
pub struct Traces(Option<SdkTracerProvider>);

impl Drop for Traces {
    fn drop(&mut self) {
        if let Some(provider) = self.0.take()
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "flushing the last traces failed");
        }
    }
}

/// A `tracing` layer that hands spans to `provider`'s tracer (tests pass an in-memory one).
pub fn layer<S>(provider: &SdkTracerProvider) -> OpenTelemetryLayer<S, SdkTracer>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
{
    tracing_opentelemetry::layer::<S>().with_tracer(provider.tracer(SERVICE_NAME))
}

/// The OTLP exporter the environment asks for, or `None` when export is off; an exporter that
/// cannot be built is reported and export stays off (traces are not worth a failed start).
pub(super) fn from_env() -> (Option<SdkTracerProvider>, Traces) {
    if !wanted(|name| std::env::var(name).ok()) {
        return (None, Traces::default());
    }
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
    {
        Ok(e) => e,
        Err(e) => {
            eprintln!("warning: OTLP trace export is off: {e}");
            return (None, Traces::default());
        }
    };
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(SERVICE_NAME);
    }
    let provider = SdkTracerProvider::builder()
        .with_resource(resource.build())
        .with_batch_exporter(exporter)
        .build();
    (Some(provider.clone()), Traces(Some(provider)))
}

/// Whether the environment (read through `var`) turns export on.
fn wanted(var: impl Fn(&str) -> Option<String>) -> bool {
    let set = |name: &str| var(name).is_some_and(|v| !v.trim().is_empty());
    let off = var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
        || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim().eq_ignore_ascii_case("none"));
    !off && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_is_off_unless_an_endpoint_is_set() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert!(!wanted(env(&[])));
        assert!(!wanted(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])));
        assert!(wanted(env(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://c:4318"
        )])));
        assert!(wanted(env(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://c:4318/v1/traces"
        )])));
        assert!(!wanted(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_SDK_DISABLED", "true"),
        ])));
    }
}
