//! Logs (tracing, JSON or pretty), metrics (Prometheus text at `/metrics`) and, when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, traces over OTLP ([`otlp`]).

pub mod otlp;

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Stable metric names of contract §8 (dashboards and alerts depend on them).
pub mod metric {
    /// Deliveries taken from the requests queue, by `routing_key`.
    pub(crate) const DELIVERIES: &str = "tenant_tokens_deliveries_total";
    /// What became of requests, by `outcome`.
    pub(crate) const OUTCOMES: &str = "tenant_tokens_outcomes_total";
    /// Issue calls, by `status` class.
    pub(crate) const ISSUER_REQUESTS: &str = "tenant_tokens_issuer_requests_total";
    /// Issue call latency.
    pub(crate) const ISSUER_DURATION: &str = "tenant_tokens_issuer_request_duration_seconds";
    /// Time from delivery to ack.
    pub(crate) const HANDLE_DURATION: &str = "tenant_tokens_handle_duration_seconds";
    /// Deliveries being handled.
    pub(crate) const IN_FLIGHT: &str = "tenant_tokens_in_flight";
    /// 1 while consumption is paused by the issuer breaker.
    pub(crate) const BREAKER_OPEN: &str = "tenant_tokens_breaker_open";
    /// Messages in `tenant-tokens.dead`.
    pub(crate) const DEAD_LETTERS: &str = "tenant_tokens_dead_letters";
    /// Tokens stored.
    pub(crate) const TOKENS_ISSUED: &str = "tenant_tokens_tokens_issued_total";
    /// Tokens revoked, by `reason` (`rotated`, `deleted`, `orphan`).
    pub const REVOCATIONS: &str = "tenant_tokens_revocations_total";
    /// Tokens due for revocation and not yet revoked.
    pub const REVOCATIONS_PENDING: &str = "tenant_tokens_revocations_pending";
    /// Batches handled, by size (extra: shows how well batching works).
    pub(crate) const BATCH_SIZE: &str = "tenant_tokens_batch_size";
    /// `basic.ack` frames sent, by `multiple` (extra: shows how well acks coalesce).
    pub(crate) const ACK_FRAMES: &str = "tenant_tokens_ack_frames_total";
}

/// How logs are written (`LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, for log pipelines.
    #[default]
    Json,
    /// Human-readable, for terminals.
    Pretty,
}

/// Installs the global subscriber; the level comes from `RUST_LOG` (default `info`).
/// Logs go to stderr so that command output on stdout stays clean.
pub fn init_tracing(format: LogFormat, default_level: &str) {
    install(format, default_level, None);
}

/// [`init_tracing`] for the worker: also exports spans over OTLP when the environment asks
/// for it (see [`otlp`]). Keep the returned value until the end: dropping it flushes.
pub fn init_tracing_with_traces(format: LogFormat, default_level: &str) -> otlp::Traces {
    let (provider, traces) = otlp::from_env();
    install(format, default_level, provider.as_ref());
    traces
}

fn install(
    format: LogFormat,
    default_level: &str,
    traces: Option<&opentelemetry_sdk::trace::SdkTracerProvider>,
) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(traces.map(otlp::layer));
    let result = match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Pretty => registry
            .with(fmt::layer().compact().with_writer(std::io::stderr))
            .try_init(),
    };
    // Already installed (tests, or the demo's worker inside the demo's process): keep it.
    let _ = result;
}

/// The process-wide Prometheus recorder, installed on first use.
pub(crate) fn metrics_handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let buckets = [
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ];
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(metric::BATCH_SIZE.into()),
                    &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
                )
            });
        match builder.map(PrometheusBuilder::build_recorder) {
            Ok(recorder) => {
                let handle = recorder.handle();
                // Fails only if another recorder is installed; then ours just stays empty.
                let _ = metrics::set_global_recorder(recorder);
                handle
            }
            Err(_) => PrometheusBuilder::new().build_recorder().handle(),
        }
    })
}

/// Registers every contract metric with a zero value, so dashboards see them from the start.
pub fn describe_metrics() {
    metrics_handle();
    for key in ["tenant.created", "extension.requested"] {
        metrics::counter!(metric::DELIVERIES, "routing_key" => key).increment(0);
    }
    for o in [
        "provisioned",
        "existing",
        "invalid",
        "rejected",
        "exhausted",
        "retried",
    ] {
        metrics::counter!(metric::OUTCOMES, "outcome" => o).increment(0);
    }
    for s in ["2xx", "4xx", "5xx", "error"] {
        metrics::counter!(metric::ISSUER_REQUESTS, "status" => s).increment(0);
    }
    metrics::counter!(metric::TOKENS_ISSUED).increment(0);
    for reason in ["rotated", "deleted", "orphan"] {
        metrics::counter!(metric::REVOCATIONS, "reason" => reason).increment(0);
    }
    metrics::gauge!(metric::REVOCATIONS_PENDING).set(0.0);
    metrics::gauge!(metric::IN_FLIGHT).set(0.0);
    metrics::gauge!(metric::BREAKER_OPEN).set(0.0);
    // Registered without a sample, so they are exported (empty) from the start.
    let _ = metrics::histogram!(metric::ISSUER_DURATION);
    let _ = metrics::histogram!(metric::HANDLE_DURATION);
    let _ = metrics::gauge!(metric::DEAD_LETTERS);
}

/// One delivery counted in `tenant_tokens_in_flight` from the moment the worker takes it until
/// it is dropped, whichever way that happens (settled, handed back, or its task aborted at the
/// end of the shutdown grace), so the gauge never keeps counting messages that are gone.
#[derive(Debug)]
pub(crate) struct InFlight(());

impl InFlight {
    /// Counts one more message in flight.
    pub(crate) fn enter() -> Self {
        metrics::gauge!(metric::IN_FLIGHT).increment(1.0);
        Self(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!(metric::IN_FLIGHT).decrement(1.0);
    }
}

/// A connection URL (AMQP or Postgres) with its password replaced by `***`: the one way a URL
/// reaches logs, errors and command output.
pub fn redact_url(url: &str) -> String {
    if url.contains(',') {
        // The nodes of a cluster (`AMQP_URL`): each one redacted.
        return url.split(',').map(redact_url).collect::<Vec<_>>().join(",");
    }
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let cred = &url[s + 3..at];
            match cred.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &cred[..c], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_passwords() {
        assert_eq!(redact_url("amqp://u:p@h:1/v"), "amqp://u:***@h:1/v");
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("amqp://u:p@ss@h/v"), "amqp://u:***@h/v");
        assert_eq!(
            redact_url("amqp://u:p@a/v,amqp://u:q@b/v"),
            "amqp://u:***@a/v,amqp://u:***@b/v"
        );
    }
}
