//! The broker names of the contract (§2) and their idempotent declaration.
//!
//! Every process declares the whole topology at start-up with the same arguments, so any
//! number of replicas (and `migrate`) can race to declare it safely. Queue arguments are part
//! of a queue's identity in RabbitMQ: changing one here makes redeclaration fail with
//! `PRECONDITION_FAILED` on brokers that already have the queue, so treat them as a contract.

use std::time::Duration;

use lapin::{
    Channel, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, ShortString},
};

/// Topic exchange that producers publish lifecycle events to; `tenant.token.ready` goes here too.
pub const EVENTS_EXCHANGE: &str = "tenant.events";
/// The worker's input: a durable quorum queue.
pub const REQUESTS_QUEUE: &str = "tenant-tokens.requests";
/// Exchange that given-up messages are routed through.
pub const DEAD_LETTER_EXCHANGE: &str = "tenant-tokens.dlx";
/// The dead-letter queue operators watch.
pub const DEAD_LETTER_QUEUE: &str = "tenant-tokens.dead";
/// Prefix of the delayed-retry queues (`tenant-tokens.retry.5s`, …).
pub(crate) const RETRY_QUEUE_PREFIX: &str = "tenant-tokens.retry.";

/// Routing key of eager provisioning requests.
pub const TENANT_CREATED: &str = "tenant.created";
/// Routing key of lazy provisioning requests.
pub const EXTENSION_REQUESTED: &str = "extension.requested";
/// Routing key of rotation requests (contract §10).
pub const TOKEN_ROTATE: &str = "tenant.token.rotate";
/// Routing key of deletions (contract §10).
pub const TENANT_DELETED: &str = "tenant.deleted";
/// Routing key of the outgoing event.
pub const TOKEN_READY: &str = "tenant.token.ready";
/// Routing key of the event published for each revoked token (contract §10).
pub const TOKEN_REVOKED: &str = "tenant.token.revoked";

/// Broker-side safety net: a message redelivered this many times (for example because it
/// crashes the process every time) is dead-lettered by RabbitMQ itself. The worker's own
/// attempt count (`x-tt-attempts`, see `MAX_ATTEMPTS`) is what normally ends retries.
pub(crate) const DELIVERY_LIMIT: i64 = 50;

/// Headers the worker sets on dead letters (§2) and on retried or replayed messages.
pub mod headers {
    /// Human-readable reason, no secrets, at most 1 KiB.
    pub const ERROR: &str = "x-tt-error";
    /// `invalid`, `rejected`, `exhausted` or `gone`.
    pub const ERROR_KIND: &str = "x-tt-error-kind";
    /// Deliveries that failed with a retryable error.
    pub const ATTEMPTS: &str = "x-tt-attempts";
    /// The routing key the message was first published with.
    pub const ORIGINAL_ROUTING_KEY: &str = "x-tt-original-routing-key";
    /// When the message was given up, RFC 3339.
    pub const FAILED_AT: &str = "x-tt-failed-at";
    /// The issuer's HTTP status, for `rejected`.
    pub const ISSUER_STATUS: &str = "x-tt-issuer-status";
    /// Set by `dlq replay` on the republished copy.
    pub const REPLAYED_AT: &str = "x-tt-replayed-at";
    /// W3C trace context.
    pub(crate) const TRACEPARENT: &str = "traceparent";
    /// Copy of the triggering message's `correlation_id` on the outgoing event.
    pub(crate) const REQUEST_CORRELATION_ID: &str = "x-request-correlation-id";
}

/// The name of the retry queue that holds messages for `delay`.
pub fn retry_queue_name(delay: Duration) -> String {
    format!("{RETRY_QUEUE_PREFIX}{}", humanize(delay))
}

fn humanize(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(v.into())
}

fn quorum_args() -> FieldTable {
    let mut a = FieldTable::default();
    a.insert("x-queue-type".into(), s("quorum"));
    a
}

/// Declares exchanges, queues and bindings of §2, plus one retry queue per delay.
///
/// Retry queues hold a message for their TTL and then dead-letter it (at least once) back to
/// the requests queue through the default exchange. The request queue dead-letters to
/// `tenant-tokens.dlx` only when its delivery limit is hit.
pub async fn declare(ch: &Channel, retry_delays: &[Duration]) -> Result<(), lapin::Error> {
    for exchange in [EVENTS_EXCHANGE, DEAD_LETTER_EXCHANGE] {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;
    }
    declare_requests(ch).await?;
    ch.queue_declare(DEAD_LETTER_QUEUE.into(), DURABLE, quorum_args())
        .await?;
    bind(ch, DEAD_LETTER_QUEUE, DEAD_LETTER_EXCHANGE, "#").await?;
    for delay in retry_delays {
        declare_retry_queue(ch, *delay).await?;
    }
    Ok(())
}

const DURABLE: QueueDeclareOptions = QueueDeclareOptions {
    passive: false,
    durable: true,
    exclusive: false,
    auto_delete: false,
    nowait: false,
};

/// The requests queue: dead-letters to `tenant-tokens.dlx` only at its delivery limit.
async fn declare_requests(ch: &Channel) -> Result<(), lapin::Error> {
    let mut args = quorum_args();
    args.insert("x-dead-letter-exchange".into(), s(DEAD_LETTER_EXCHANGE));
    args.insert("x-dead-letter-strategy".into(), s("at-least-once"));
    args.insert("x-overflow".into(), s("reject-publish"));
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(DELIVERY_LIMIT),
    );
    ch.queue_declare(REQUESTS_QUEUE.into(), DURABLE, args)
        .await?;
    for key in [
        TENANT_CREATED,
        EXTENSION_REQUESTED,
        TOKEN_ROTATE,
        TENANT_DELETED,
    ] {
        bind(ch, REQUESTS_QUEUE, EVENTS_EXCHANGE, key).await?;
    }
    Ok(())
}

/// A retry queue holds a message for its TTL, then dead-letters it (at least once) back to
/// the requests queue through the default exchange.
async fn declare_retry_queue(ch: &Channel, delay: Duration) -> Result<(), lapin::Error> {
    let mut a = quorum_args();
    a.insert(
        "x-message-ttl".into(),
        AMQPValue::LongLongInt(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
    );
    a.insert("x-dead-letter-exchange".into(), s(""));
    a.insert("x-dead-letter-routing-key".into(), s(REQUESTS_QUEUE));
    a.insert("x-dead-letter-strategy".into(), s("at-least-once"));
    a.insert("x-overflow".into(), s("reject-publish"));
    let name: ShortString = retry_queue_name(delay).into();
    ch.queue_declare(name, DURABLE, a).await?;
    Ok(())
}

async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str) -> Result<(), lapin::Error> {
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
}

/// A queue's counts (messages ready, consumers), by a passive declare: creates nothing, and
/// fails if the queue does not exist.
pub async fn inspect(ch: &Channel, queue: &str) -> Result<lapin::Queue, lapin::Error> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ch.queue_declare(queue.into(), passive, FieldTable::default())
        .await
}

/// Messages in `tenant-tokens.dead`.
pub(crate) async fn dead_letter_count(ch: &Channel) -> Result<u32, lapin::Error> {
    Ok(inspect(ch, DEAD_LETTER_QUEUE).await?.message_count())
}

/// Declares a private queue (exclusive, deleted with its connection) that receives every
/// `tenant.token.ready`, for the demo, the benchmark and tests that watch the worker's output.
pub async fn declare_ready_listener(ch: &Channel) -> Result<ShortString, lapin::Error> {
    declare_listener(ch, TOKEN_READY).await
}

/// Consumes every event published on `tenant.events` with `routing_key`, from a private queue
/// bound before this returns (no acks: the queue is the listener's own). For the demo and
/// `token rotate --wait`, which watch the worker's output.
pub async fn listen(ch: &Channel, routing_key: &str) -> Result<lapin::Consumer, lapin::Error> {
    let queue = declare_listener(ch, routing_key).await?;
    let no_ack = lapin::options::BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    ch.basic_consume(queue, "".into(), no_ack, FieldTable::default())
        .await
}

/// Declares a private queue (exclusive, deleted with its connection) that receives every
/// event published on `tenant.events` with `routing_key` (e.g. `tenant.token.revoked`).
pub async fn declare_listener(
    ch: &Channel,
    routing_key: &str,
) -> Result<ShortString, lapin::Error> {
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    bind(ch, q.name().as_str(), EVENTS_EXCHANGE, routing_key).await?;
    Ok(q.name().clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_queue_names_read_well() {
        assert_eq!(
            retry_queue_name(Duration::from_secs(5)),
            "tenant-tokens.retry.5s"
        );
        assert_eq!(
            retry_queue_name(Duration::from_secs(120)),
            "tenant-tokens.retry.2m"
        );
        assert_eq!(
            retry_queue_name(Duration::from_millis(250)),
            "tenant-tokens.retry.250ms"
        );
    }
}
