//! Handling one batch of deliveries, top to bottom:
//! delivery → [`decode`](crate::pipeline::decode) → [`Provisioner::provision`] → event → ack.
//!
//! Every delivery ends in exactly one of: ack after its ready event is confirmed; ack after a
//! confirmed copy went to a retry queue or to the dead-letter queue; or nack with requeue
//! (nothing is lost) when that copy could not be published, the issuer refuses the master
//! token, or the process is shutting down.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable};
use rand::Rng as _;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::broker::message::{self, cut, header_u32, original_routing_key, text, with_headers};
use crate::broker::publisher::{PublishError, Publisher};
use crate::broker::topology::{self, headers};
use crate::domain::ProvisionRequest;
use crate::domain::{ReadyEvent, now_rfc3339};
use crate::issuer::IssuerError;
use crate::ops::health::Health;
use crate::pipeline::decode::{self, DecodeError};
use crate::pipeline::provision::{Outcome, Provisioner};
use crate::telemetry::metric;

/// The kinds of dead letter (contract §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadKind {
    /// Bad input, never retried.
    Invalid,
    /// The issuer refused the request (4xx other than 401/403).
    Rejected,
    /// `MAX_ATTEMPTS` deliveries failed with retryable errors.
    Exhausted,
}

impl DeadKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Invalid => "invalid",
            Self::Rejected => "rejected",
            Self::Exhausted => "exhausted",
        }
    }
}

/// What the batch handler needs; shared by every batch of the process.
pub struct Context {
    /// The provisioning step.
    pub provisioner: Provisioner,
    /// Readiness and the breaker.
    pub health: Arc<Health>,
    /// `MAX_ATTEMPTS`.
    pub max_attempts: u32,
    /// Retry-queue delays.
    pub retry_delays: Vec<Duration>,
    /// Cancelled on SIGTERM: stop retrying in place and hand messages back.
    pub shutdown: CancellationToken,
}

/// Handles a batch: one transaction and one confirm wait for all of it.
pub async fn handle_batch(ctx: &Context, publisher: &Publisher, deliveries: Vec<Delivery>) {
    let started = Instant::now();
    let n = deliveries.len();
    metrics::gauge!(metric::IN_FLIGHT).increment(n as f64);
    metrics::histogram!(metric::BATCH_SIZE).record(n as f64);

    let mut valid = Vec::with_capacity(n);
    let mut reqs = Vec::with_capacity(n);
    let mut invalid = Vec::new();
    for d in deliveries {
        let key = original_routing_key(d.routing_key.as_str(), &d.properties);
        metrics::counter!(metric::DELIVERIES, "routing_key" => key.to_owned()).increment(1);
        match decode::decode(
            &message::envelope(d.routing_key.as_str(), &d.properties),
            &d.data,
        ) {
            Ok(req) => {
                valid.push(d);
                reqs.push(req);
            }
            Err(e) => invalid.push((d, e)),
        }
    }

    let invalid_done = join_all(
        invalid
            .into_iter()
            .map(|(d, e)| reject_invalid(publisher, d, e)),
    );
    let valid_done = async {
        if reqs.is_empty() {
            return;
        }
        let Some(outcomes) = provision_with_retry(ctx, &reqs).await else {
            for d in &valid {
                requeue(d).await;
            }
            return;
        };
        join_all(
            valid
                .iter()
                .zip(&reqs)
                .zip(outcomes)
                .map(|((d, req), outcome)| {
                    let span = request_span(req);
                    finish(ctx, publisher, d, req, outcome).instrument(span)
                }),
        )
        .await;
    };
    tokio::join!(invalid_done, valid_done);

    let secs = started.elapsed().as_secs_f64();
    for _ in 0..n {
        metrics::histogram!(metric::HANDLE_DURATION).record(secs);
    }
    metrics::gauge!(metric::IN_FLIGHT).decrement(n as f64);
}

fn request_span(req: &ProvisionRequest) -> tracing::Span {
    let trace_id = req.traceparent.as_deref().and_then(|t| t.split('-').nth(1));
    tracing::info_span!(
        "request",
        tenant = %req.tenant_id,
        message = %req.identity,
        trigger = req.trigger.as_str(),
        extension = req.extension_id.as_deref(),
        correlation_id = req.correlation_id.as_deref(),
        trace_id,
    )
}

/// Runs the provisioning step, retrying database failures in place (the messages stay
/// unacked, so nothing is lost and nothing spins). `None` on shutdown.
async fn provision_with_retry(ctx: &Context, reqs: &[ProvisionRequest]) -> Option<Vec<Outcome>> {
    let mut delay = Duration::from_millis(100);
    loop {
        match ctx.provisioner.provision(reqs).await {
            Ok(outcomes) => {
                ctx.health.set_database(true);
                return Some(outcomes);
            }
            Err(e) => {
                ctx.health.set_database(false);
                tracing::warn!(error = %e, batch = reqs.len(), retry_in = ?delay, "provisioning failed, will retry");
            }
        }
        tokio::select! {
            () = ctx.shutdown.cancelled() => return None,
            () = tokio::time::sleep(jitter(delay)) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Ends one valid delivery according to its outcome.
async fn finish(
    ctx: &Context,
    publisher: &Publisher,
    d: &Delivery,
    req: &ProvisionRequest,
    outcome: Outcome,
) {
    match outcome {
        Outcome::Ready(event) => {
            if event.newly_issued {
                // The issuer answered: evidence that it works again.
                ctx.health.breaker.record_success();
            }
            publish_ready(publisher, d, req, &event).await;
        }
        Outcome::Failed(IssuerError::Unauthorized { status }) => {
            ctx.health.breaker.trip(&format!(
                "issuer answered HTTP {status} to the master token"
            ));
            probe_or_requeue(ctx, publisher, d, req).await;
        }
        Outcome::Failed(IssuerError::Rejected { status, body }) => {
            ctx.health.breaker.record_success();
            let error = format!("issuer rejected the request with HTTP {status}: {body}");
            tracing::warn!(status, "issuer rejected the request; dead-lettering");
            settle(
                d,
                dead_letter(
                    publisher,
                    d,
                    DeadKind::Rejected,
                    &error,
                    attempts(d),
                    Some(status),
                )
                .await,
            )
            .await;
            metrics::counter!(metric::OUTCOMES, "outcome" => "rejected").increment(1);
        }
        Outcome::Failed(e @ IssuerError::Transient { .. }) => {
            if ctx.health.breaker.is_open() || ctx.health.breaker.record_transient() {
                probe_or_requeue(ctx, publisher, d, req).await;
            } else {
                retry_later(ctx, publisher, d, &e.to_string()).await;
            }
        }
    }
}

async fn publish_ready(
    publisher: &Publisher,
    d: &Delivery,
    req: &ProvisionRequest,
    event: &ReadyEvent,
) {
    let body = serde_json::to_vec(event).unwrap_or_default();
    let mut h = FieldTable::default();
    if let Some(c) = &req.correlation_id {
        h.insert(headers::REQUEST_CORRELATION_ID.into(), text(c));
    }
    if let Some(tp) = req.traceparent.as_deref().and_then(child_traceparent) {
        h.insert(headers::TRACEPARENT.into(), text(&tp));
    }
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(event.event_id.to_string().into())
        .with_correlation_id(req.identity.as_str().into())
        .with_app_id("tenant-tokens".into())
        .with_type(topology::TOKEN_READY.into())
        .with_timestamp(time::OffsetDateTime::now_utc().unix_timestamp().max(0) as u64)
        .with_headers(h);
    let result = publisher
        .publish(
            topology::EVENTS_EXCHANGE,
            topology::TOKEN_READY,
            &body,
            props,
            false,
        )
        .await;
    if result.is_ok() {
        let outcome = if event.newly_issued {
            "provisioned"
        } else {
            "existing"
        };
        metrics::counter!(metric::OUTCOMES, "outcome" => outcome).increment(1);
        tracing::info!(container = %event.container, newly_issued = event.newly_issued, event_id = %event.event_id, "token ready");
    }
    settle(d, result).await;
}

/// The half-open breaker: one held delivery retries its whole provisioning with backoff until
/// the issuer answers; every other delivery goes back to the queue untouched (no attempt counted).
async fn probe_or_requeue(
    ctx: &Context,
    publisher: &Publisher,
    d: &Delivery,
    req: &ProvisionRequest,
) {
    let Some(_probe) = ctx.health.breaker.try_probe() else {
        requeue(d).await;
        return;
    };
    let mut delay = Duration::from_millis(500);
    loop {
        tokio::select! {
            () = ctx.shutdown.cancelled() => {
                requeue(d).await;
                return;
            }
            () = tokio::time::sleep(jitter(delay)) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(30));
        let Some(mut outcomes) = provision_with_retry(ctx, std::slice::from_ref(req)).await else {
            requeue(d).await;
            return;
        };
        match outcomes.pop() {
            Some(Outcome::Failed(IssuerError::Unauthorized { .. })) => {
                tracing::info!(next_probe_in = ?delay, "issuer still refuses the master token");
            }
            Some(Outcome::Failed(IssuerError::Transient { .. })) => {
                tracing::info!(next_probe_in = ?delay, "issuer still unavailable");
            }
            Some(outcome) => {
                ctx.health.breaker.record_success();
                Box::pin(finish(ctx, publisher, d, req, outcome)).await;
                return;
            }
            None => {
                requeue(d).await;
                return;
            }
        }
    }
}

/// A retryable failure: the message waits in a retry queue, or is dead-lettered as
/// `exhausted` once `MAX_ATTEMPTS` deliveries have failed.
async fn retry_later(ctx: &Context, publisher: &Publisher, d: &Delivery, error: &str) {
    let attempts = attempts(d) + 1;
    if attempts >= ctx.max_attempts {
        tracing::warn!(attempts, error, "retries exhausted; dead-lettering");
        let result = dead_letter(publisher, d, DeadKind::Exhausted, error, attempts, None).await;
        if result.is_ok() {
            metrics::counter!(metric::OUTCOMES, "outcome" => "exhausted").increment(1);
        }
        settle(d, result).await;
        return;
    }
    let tier = (attempts as usize)
        .saturating_sub(1)
        .min(ctx.retry_delays.len().saturating_sub(1));
    let Some(delay) = ctx.retry_delays.get(tier) else {
        requeue(d).await;
        return;
    };
    let key = original_routing_key(d.routing_key.as_str(), &d.properties).to_owned();
    let props = with_headers(&d.properties, |h| {
        h.insert(
            headers::ATTEMPTS.into(),
            AMQPValue::LongLongInt(i64::from(attempts)),
        );
        h.insert(headers::ORIGINAL_ROUTING_KEY.into(), text(&key));
        h.insert(headers::ERROR.into(), text(cut(error, 1024)));
    });
    let queue = topology::retry_queue_name(*delay);
    tracing::info!(attempts, retry_in = ?delay, error, "issuer unavailable; retrying later");
    let result = publisher.publish("", &queue, &d.data, props, true).await;
    if result.is_ok() {
        metrics::counter!(metric::OUTCOMES, "outcome" => "retried").increment(1);
    }
    settle(d, result).await;
}

async fn reject_invalid(publisher: &Publisher, d: Delivery, e: DecodeError) {
    tracing::warn!(routing_key = %d.routing_key, error = %e, "invalid message; dead-lettering");
    let result = dead_letter(
        publisher,
        &d,
        DeadKind::Invalid,
        &e.to_string(),
        attempts(&d),
        None,
    )
    .await;
    if result.is_ok() {
        metrics::counter!(metric::OUTCOMES, "outcome" => "invalid").increment(1);
    }
    settle(&d, result).await;
}

/// Publishes a copy to `tenant-tokens.dlx` with the original body and properties plus the
/// `x-tt-*` headers of contract §2, confirmed and mandatory (so it surely reached a queue).
pub async fn dead_letter(
    publisher: &Publisher,
    d: &Delivery,
    kind: DeadKind,
    error: &str,
    attempts: u32,
    issuer_status: Option<u16>,
) -> Result<(), PublishError> {
    let key = original_routing_key(d.routing_key.as_str(), &d.properties).to_owned();
    let props = with_headers(&d.properties, |h| {
        h.insert(headers::ERROR.into(), text(cut(error, 1024)));
        h.insert(headers::ERROR_KIND.into(), text(kind.as_str()));
        h.insert(
            headers::ATTEMPTS.into(),
            AMQPValue::LongLongInt(i64::from(attempts)),
        );
        h.insert(headers::ORIGINAL_ROUTING_KEY.into(), text(&key));
        h.insert(headers::FAILED_AT.into(), text(&now_rfc3339()));
        if let Some(s) = issuer_status {
            h.insert(
                headers::ISSUER_STATUS.into(),
                AMQPValue::LongLongInt(i64::from(s)),
            );
        }
    });
    publisher
        .publish(topology::DEAD_LETTER_EXCHANGE, &key, &d.data, props, true)
        .await
}

/// Deliveries of this message that already failed with a retryable error.
fn attempts(d: &Delivery) -> u32 {
    header_u32(&d.properties, headers::ATTEMPTS).unwrap_or(0)
}

/// Acks when the follow-up publish took, else hands the message back.
async fn settle(d: &Delivery, published: Result<(), PublishError>) {
    match published {
        Ok(()) => {
            if let Err(e) = d.acker.ack(BasicAckOptions::default()).await {
                tracing::warn!(error = %e, "ack failed; the broker will redeliver and the redelivery is answered idempotently");
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "publish failed; returning the message to the queue");
            requeue(d).await;
        }
    }
}

async fn requeue(d: &Delivery) {
    let opts = BasicNackOptions {
        requeue: true,
        multiple: false,
    };
    if let Err(e) = d.acker.nack(opts).await {
        tracing::warn!(error = %e, "nack failed; the broker will redeliver when the channel closes");
    }
}

/// The traceparent of the outgoing event: same trace, a new span id.
fn child_traceparent(parent: &str) -> Option<String> {
    let mut parts = parent.split('-');
    let (version, trace, _, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let span: u64 = rand::rng().random_range(1..u64::MAX);
    Some(format!("{version}-{trace}-{span:016x}-{flags}"))
}

fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.5..1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_traceparent_keeps_the_trace() {
        let p = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let c = child_traceparent(p).expect("child");
        assert!(c.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(c.ends_with("-01"));
        assert_ne!(c, p);
    }
}
