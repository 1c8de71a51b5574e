//! A delivery taken apart once, at the edge: the pipeline handles [`Inbound`] values and never
//! reads AMQP properties or headers itself.

use std::sync::Arc;
use std::time::Instant;

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::{FieldTable, ShortString};

use super::acks::Acks;
use super::message::{cut, header_str, header_u32, with_headers};
use super::topology::headers;
use crate::pipeline::decode::Envelope;
use crate::telemetry::{InFlight, metric};

/// One message taken from the requests queue, with what the pipeline needs of it.
pub(crate) struct Inbound {
    /// The routing key the request was first published with (a retried message keeps it in
    /// `x-tt-original-routing-key`).
    pub routing_key: String,
    /// Earlier deliveries that failed with a retryable error (`x-tt-attempts`).
    pub attempts: u32,
    /// The AMQP `message_id`.
    pub message_id: Option<String>,
    /// The AMQP `correlation_id`.
    pub correlation_id: Option<String>,
    /// The AMQP `content_type`.
    pub content_type: Option<String>,
    /// The W3C `traceparent` header, when it is text.
    pub traceparent: Option<String>,
    /// The body, as published.
    pub body: Vec<u8>,
    /// When the worker took the delivery (for `tenant_tokens_handle_duration_seconds`).
    pub received: Instant,
    properties: BasicProperties,
    tag: u64,
    acks: Arc<Acks>,
    _in_flight: InFlight,
}

impl Inbound {
    /// Takes a delivery apart and registers it with the `acks` of its channel. From here on it
    /// counts as in flight until it is dropped.
    pub(crate) fn from_delivery(d: Delivery, acks: &Arc<Acks>) -> Self {
        acks.delivered(d.delivery_tag);
        let p = &d.properties;
        let owned = |s: &Option<ShortString>| s.as_ref().map(|s| s.as_str().to_owned());
        Self {
            // The header is any long string; the key is published again (dead letter, retry)
            // as an AMQP short string, which panics beyond 255 bytes. A handled key is short.
            routing_key: cut(
                header_str(p, headers::ORIGINAL_ROUTING_KEY).unwrap_or(d.routing_key.as_str()),
                255,
            )
            .to_owned(),
            attempts: header_u32(p, headers::ATTEMPTS).unwrap_or(0),
            message_id: owned(p.message_id()),
            correlation_id: owned(p.correlation_id()),
            content_type: owned(p.content_type()),
            traceparent: header_str(p, headers::TRACEPARENT).map(str::to_owned),
            received: Instant::now(),
            _in_flight: InFlight::enter(),
            properties: d.properties,
            tag: d.delivery_tag,
            acks: acks.clone(),
            body: d.data,
        }
    }

    /// Delivery to settle, including waits for a batch slot or for the breaker.
    fn settled(&self) {
        metrics::histogram!(metric::HANDLE_DURATION).record(self.received.elapsed().as_secs_f64());
    }

    /// What the decoder needs.
    pub(crate) fn envelope(&self) -> Envelope<'_> {
        Envelope {
            routing_key: &self.routing_key,
            message_id: self.message_id.as_deref(),
            correlation_id: self.correlation_id.as_deref(),
            content_type: self.content_type.as_deref(),
            traceparent: self.traceparent.as_deref(),
        }
    }

    /// The original properties with headers changed by `edit`, persistent: for the copies that
    /// go to a retry queue or the dead-letter queue, which keep everything of the original.
    pub(crate) fn copy_properties(&self, edit: impl FnOnce(&mut FieldTable)) -> BasicProperties {
        with_headers(&self.properties, edit)
    }

    /// Settles the message: the broker forgets it (once its ack is sent, see [`Acks`]).
    pub(crate) fn ack(&self) {
        self.settled();
        self.acks.ack(self.tag);
    }

    /// Hands the message back to the queue, untouched.
    pub(crate) fn requeue(&self) {
        self.settled();
        self.acks.requeue(self.tag);
    }
}
