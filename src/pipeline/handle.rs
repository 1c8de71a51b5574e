//! Handling one batch of messages, top to bottom:
//! [`Inbound`] → [`decode`](super::decode) → [`Provisioner::provision`] →
//! [`disposition::decide`] → carry the disposition out (publish, then ack).
//!
//! Every message ends in exactly one of: ack after its ready event is confirmed; ack after a
//! confirmed copy went to a retry queue or to the dead-letter queue; or nack with requeue
//! (nothing is lost) when that copy could not be published, the breaker is open, or the
//! process is shutting down. This module carries dispositions out; it decides none of them.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use rand::Rng as _;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::decode;
use super::disposition::{self, BreakerState, DeadKind, Disposition, Happened, Policy};
use super::provision::{Outcome, ProvisionError, Provisioner};
use super::trace;
use crate::broker::inbound::Inbound;
use crate::broker::message::{cut, text};
use crate::broker::publisher::{PublishError, Publisher};
use crate::broker::topology::{self, headers};
use crate::crypto::CryptoError;
use crate::domain::{ProvisionRequest, ReadyEvent, now_rfc3339};
use crate::issuer::IssuerError;
use crate::ops::health::Health;
use crate::telemetry::metric;

/// What the batch handler needs; shared by every batch of the process.
pub(crate) struct Context {
    /// The provisioning step.
    pub provisioner: Provisioner,
    /// Readiness and the breaker.
    pub health: Arc<Health>,
    /// `MAX_ATTEMPTS` and `RETRY_DELAYS`.
    pub policy: Policy,
    /// Cancelled on SIGTERM: stop retrying in place and hand messages back.
    pub shutdown: CancellationToken,
}

/// What became of one valid request, as the handler sees it.
enum Fate {
    /// The provisioning step answered.
    Provisioned(Outcome),
    /// Provisioning this request alone failed with an error retrying cannot fix.
    Unrecoverable(String),
    /// Shutdown came before an answer.
    Interrupted,
}

impl Fate {
    fn happened(&self) -> Happened {
        match self {
            Self::Provisioned(Outcome::Ready(_)) => Happened::Ready,
            Self::Provisioned(Outcome::Failed(IssuerError::Unauthorized { .. })) => {
                Happened::Unauthorized
            }
            Self::Provisioned(Outcome::Failed(IssuerError::Rejected { status, .. })) => {
                Happened::Rejected { status: *status }
            }
            Self::Provisioned(Outcome::Failed(IssuerError::Transient { .. })) => {
                Happened::Transient
            }
            Self::Provisioned(Outcome::Gone { .. }) => Happened::Gone,
            Self::Provisioned(Outcome::Deleted) => Happened::Done,
            Self::Provisioned(Outcome::Undecryptable(CryptoError::UnknownKey(_))) => {
                Happened::KeyMissing
            }
            Self::Provisioned(Outcome::Undecryptable(_)) | Self::Unrecoverable(_) => {
                Happened::Unrecoverable
            }
            Self::Interrupted => Happened::Interrupted,
        }
    }

    /// Whether the issuer answered this request (so it works, whatever else failed).
    fn issuer_answered(&self) -> bool {
        matches!(
            self,
            Self::Provisioned(Outcome::Ready(e)) if e.newly_issued
        ) || matches!(
            self,
            Self::Provisioned(Outcome::Failed(IssuerError::Rejected { .. }))
        )
    }

    /// The `x-tt-error` text of a failure.
    fn error(&self) -> String {
        match self {
            Self::Provisioned(Outcome::Failed(e)) => e.to_string(),
            Self::Provisioned(Outcome::Undecryptable(e)) => e.to_string(),
            Self::Provisioned(Outcome::Gone { deleted_at }) => format!(
                "the tenant was deleted at {}; tenant ids are never reused",
                crate::domain::rfc3339(*deleted_at)
            ),
            Self::Provisioned(Outcome::Ready(_) | Outcome::Deleted) => String::new(),
            Self::Unrecoverable(e) => e.clone(),
            Self::Interrupted => "interrupted by shutdown".into(),
        }
    }
}

/// Handles a batch: one transaction and one confirm wait for all of it.
pub(crate) async fn handle_batch(ctx: &Context, publisher: &Publisher, batch: Vec<Inbound>) {
    metrics::histogram!(metric::BATCH_SIZE).record(batch.len() as f64);
    // Messages and their requests side by side: the provisioning step takes the requests as
    // a slice, without copying them.
    let mut valid = Vec::with_capacity(batch.len());
    let mut reqs = Vec::with_capacity(batch.len());
    let mut invalid = Vec::new();
    for m in batch {
        metrics::counter!(metric::DELIVERIES, "routing_key" => m.routing_key.clone()).increment(1);
        match decode::decode(&m.envelope(), &m.body) {
            Ok(req) => {
                valid.push(m);
                reqs.push(req);
            }
            Err(e) => invalid.push((m, e)),
        }
    }
    let invalid_done = join_all(invalid.iter().map(|(m, e)| async move {
        tracing::warn!(routing_key = %m.routing_key, error = %e, "invalid message; dead-lettering");
        carry_out(ctx, publisher, m, Happened::Invalid, &e.to_string()).await;
    }));
    let valid_done =
        async {
            let spans: Vec<tracing::Span> = reqs.iter().map(request_span).collect();
            let fates = provision_traced(ctx, &reqs, &spans).await;
            let settled = valid.iter().zip(&reqs).zip(fates).zip(spans);
            join_all(settled.map(|(((m, req), fate), span)| {
                settle(ctx, publisher, m, req, fate).instrument(span)
            }))
            .await;
        };
    tokio::join!(invalid_done, valid_done);
}

/// The `consume` span of one request (named `request` in logs), continuing its trace.
fn request_span(req: &ProvisionRequest) -> tracing::Span {
    let trace_id = req.traceparent.as_deref().and_then(|t| t.split('-').nth(1));
    let span = tracing::info_span!(
        "request",
        otel.name = "consume",
        otel.kind = "consumer",
        tenant = %req.tenant_id,
        message = %req.identity,
        trigger = req.trigger.as_str(),
        extension = req.extension_id.as_deref(),
        correlation_id = req.correlation_id.as_deref(),
        trace_id,
    );
    trace::continue_trace(&span, req.traceparent.as_deref());
    span
}

/// [`provision`] in the batch's `store` span, each issue call in its own request's trace.
async fn provision_traced(
    ctx: &Context,
    reqs: &[ProvisionRequest],
    spans: &[tracing::Span],
) -> Vec<Fate> {
    let by_identity = reqs
        .iter()
        .zip(spans)
        .map(|(r, s)| (r.identity.as_str().to_owned(), s.clone()))
        .collect();
    let provisioning = provision(ctx, reqs).instrument(store_span(spans));
    trace::with_request_spans(by_identity, provisioning).await
}

/// The span of a batch's transaction: in the trace of its first request, linked to the
/// others (one transaction serves them all).
fn store_span(spans: &[tracing::Span]) -> tracing::Span {
    let Some((first, others)) = spans.split_first() else {
        return tracing::Span::none();
    };
    let span = tracing::info_span!(parent: first, "store", batch = spans.len());
    for other in others {
        span.follows_from(other);
    }
    span
}

/// Runs the provisioning step until every request has a fate. A database that is unavailable
/// or busy is retried in place with backoff (the messages stay unacked, readiness says so); a
/// batch that fails with an error retrying cannot fix is split and each request provisioned
/// alone, so one poison message is dead-lettered and the others complete.
async fn provision(ctx: &Context, reqs: &[ProvisionRequest]) -> Vec<Fate> {
    if reqs.is_empty() {
        return Vec::new();
    }
    let mut delay = Duration::from_millis(100);
    loop {
        let error = match ctx.provisioner.provision(reqs).await {
            Ok(outcomes) => {
                ctx.health.set_database(true);
                return outcomes.into_iter().map(Fate::Provisioned).collect();
            }
            Err(e) if e.is_retryable() => e,
            Err(e) => return split(ctx, reqs, e).await,
        };
        ctx.health.set_database(false);
        tracing::warn!(error = %error, batch = reqs.len(), retry_in = ?delay, "provisioning failed, will retry");
        tokio::select! {
            () = ctx.shutdown.cancelled() => return reqs.iter().map(|_| Fate::Interrupted).collect(),
            () = tokio::time::sleep(jitter(delay)) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// A batch failed with an error that retrying the batch cannot fix: provision each request
/// alone. A request that fails alone the same way is the poison.
async fn split(ctx: &Context, reqs: &[ProvisionRequest], error: ProvisionError) -> Vec<Fate> {
    if let [req] = reqs {
        tracing::error!(tenant = %req.tenant_id, message = %req.identity, error = %error, "request cannot be provisioned; dead-lettering");
        return vec![Fate::Unrecoverable(error.to_string())];
    }
    tracing::warn!(error = %error, batch = reqs.len(), "batch failed; provisioning its requests one by one");
    let mut fates = Vec::with_capacity(reqs.len());
    for req in reqs {
        fates.extend(Box::pin(provision(ctx, std::slice::from_ref(req))).await);
    }
    fates
}

/// Ends one valid message according to its fate.
async fn settle(
    ctx: &Context,
    publisher: &Publisher,
    m: &Inbound,
    req: &ProvisionRequest,
    fate: Fate,
) {
    let happened = fate.happened();
    let breaker = ctx.health.breaker.record(happened, fate.issuer_answered());
    match disposition::decide(happened, m.attempts, breaker, &ctx.policy) {
        Disposition::Publish => {
            if let Fate::Provisioned(Outcome::Ready(event)) = &fate {
                publish_ready(publisher, m, req, event).await;
            }
        }
        Disposition::HoldAsProbe => probe(ctx, publisher, m, req).await,
        other => execute(publisher, m, &other, &fate.error()).await,
    }
}

/// Decides and carries out the disposition of a message that has no request (invalid input).
async fn carry_out(
    ctx: &Context,
    publisher: &Publisher,
    m: &Inbound,
    happened: Happened,
    error: &str,
) {
    let d = disposition::decide(happened, m.attempts, BreakerState::Closed, &ctx.policy);
    execute(publisher, m, &d, error).await;
}

/// Carries out a disposition that needs no provisioning: a retry copy, a dead letter, or
/// handing the message back.
async fn execute(publisher: &Publisher, m: &Inbound, d: &Disposition, error: &str) {
    match *d {
        Disposition::RetryLater { delay, attempts } => {
            tracing::info!(attempts, retry_in = ?delay, error, "issuer unavailable; retrying later");
            let result = retry_later(publisher, m, delay, attempts, error).await;
            finish(m, result, "retried");
        }
        Disposition::DeadLetter {
            kind,
            attempts,
            issuer_status,
        } => {
            tracing::warn!(
                kind = kind.as_str(),
                attempts,
                issuer_status,
                error,
                "dead-lettering"
            );
            let result = dead_letter(publisher, m, kind, error, attempts, issuer_status).await;
            finish(m, result, kind.as_str());
        }
        Disposition::Ack => finish(m, Ok(()), "deleted"),
        Disposition::Requeue | Disposition::HoldAsProbe | Disposition::Publish => {
            m.requeue();
        }
    }
}

async fn publish_ready(publisher: &Publisher, m: &Inbound, req: &ProvisionRequest, e: &ReadyEvent) {
    let span = tracing::info_span!(
        "publish",
        otel.kind = "producer",
        routing_key = topology::TOKEN_READY
    );
    let result = match serde_json::to_vec(e) {
        Ok(body) => {
            let traceparent = trace::outgoing(&span)
                .or_else(|| req.traceparent.as_deref().and_then(child_traceparent));
            let props = ready_properties(req, e, traceparent.as_deref());
            publisher
                .publish(
                    topology::EVENTS_EXCHANGE,
                    topology::TOKEN_READY,
                    &body,
                    props,
                    false,
                )
                .instrument(span)
                .await
        }
        Err(error) => Err(PublishError::Encode(error.to_string())),
    };
    if result.is_ok() {
        tracing::info!(container = %e.container, newly_issued = e.newly_issued, event_id = %e.event_id, "token ready");
    }
    let outcome = if e.newly_issued {
        "provisioned"
    } else {
        "existing"
    };
    finish(m, result, outcome);
}

/// The properties of `tenant.token.ready` (contract §7).
/// `traceparent` is the event's own trace context, if it has one.
fn ready_properties(
    req: &ProvisionRequest,
    event: &ReadyEvent,
    traceparent: Option<&str>,
) -> BasicProperties {
    let mut h = FieldTable::default();
    if let Some(c) = &req.correlation_id {
        h.insert(headers::REQUEST_CORRELATION_ID.into(), text(c));
    }
    if let Some(tp) = traceparent {
        h.insert(headers::TRACEPARENT.into(), text(tp));
    }
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(event.event_id.to_string().into())
        .with_correlation_id(req.identity.as_str().into())
        .with_app_id("tenant-tokens".into())
        .with_type(topology::TOKEN_READY.into())
        .with_timestamp(time::OffsetDateTime::now_utc().unix_timestamp().max(0) as u64)
        .with_headers(h)
}

/// The half-open breaker: this message stays unacked (still the queue's, should the process
/// die) and retries its whole provisioning with backoff, one real request at a time, until
/// the issuer answers; then it is settled like any other. Another message that finds a probe
/// running goes back to the queue untouched.
async fn probe(ctx: &Context, publisher: &Publisher, m: &Inbound, req: &ProvisionRequest) {
    let Some(_probe) = ctx.health.breaker.try_probe() else {
        m.requeue();
        return;
    };
    let mut delay = Duration::from_millis(500);
    loop {
        tokio::select! {
            () = ctx.shutdown.cancelled() => return m.requeue(),
            () = tokio::time::sleep(jitter(delay)) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(30));
        match provision(ctx, std::slice::from_ref(req)).await.pop() {
            Some(Fate::Interrupted) | None => return m.requeue(),
            Some(f) if matches!(f.happened(), Happened::Unauthorized | Happened::Transient) => {
                tracing::info!(next_probe_in = ?delay, error = %f.error(), "issuer still refuses or is unavailable");
            }
            Some(fate) => {
                ctx.health.breaker.record_success();
                return Box::pin(settle(ctx, publisher, m, req, fate)).await;
            }
        }
    }
}

/// Publishes a copy to the retry queue of `delay`, with the attempt count and last error.
async fn retry_later(
    publisher: &Publisher,
    m: &Inbound,
    delay: Duration,
    attempts: u32,
    error: &str,
) -> Result<(), PublishError> {
    let props = m.copy_properties(|h| {
        h.insert(
            headers::ATTEMPTS.into(),
            AMQPValue::LongLongInt(i64::from(attempts)),
        );
        h.insert(headers::ORIGINAL_ROUTING_KEY.into(), text(&m.routing_key));
        h.insert(headers::ERROR.into(), text(cut(error, 1024)));
    });
    let queue = topology::retry_queue_name(delay);
    publisher.publish("", &queue, &m.body, props, true).await
}

/// Publishes a copy to `tenant-tokens.dlx` with the original body and properties plus the
/// `x-tt-*` headers of contract §2, confirmed and mandatory (so it surely reached a queue).
async fn dead_letter(
    publisher: &Publisher,
    m: &Inbound,
    kind: DeadKind,
    error: &str,
    attempts: u32,
    issuer_status: Option<u16>,
) -> Result<(), PublishError> {
    let props = m.copy_properties(|h| {
        h.insert(headers::ERROR.into(), text(cut(error, 1024)));
        h.insert(headers::ERROR_KIND.into(), text(kind.as_str()));
        h.insert(
            headers::ATTEMPTS.into(),
            AMQPValue::LongLongInt(i64::from(attempts)),
        );
        h.insert(headers::ORIGINAL_ROUTING_KEY.into(), text(&m.routing_key));
        h.insert(headers::FAILED_AT.into(), text(&now_rfc3339()));
        if let Some(s) = issuer_status {
            h.insert(
                headers::ISSUER_STATUS.into(),
                AMQPValue::LongLongInt(i64::from(s)),
            );
        }
    });
    let key = &m.routing_key;
    publisher
        .publish(topology::DEAD_LETTER_EXCHANGE, key, &m.body, props, true)
        .await
}

/// Acks when the follow-up publish took (counting `outcome` and the time since delivery),
/// else hands the message back.
fn finish(m: &Inbound, published: Result<(), PublishError>, outcome: &'static str) {
    match published {
        Ok(()) => {
            m.ack();
            metrics::counter!(metric::OUTCOMES, "outcome" => outcome).increment(1);
        }
        Err(e) => {
            tracing::warn!(error = %e, "publish failed; returning the message to the queue");
            m.requeue();
        }
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
