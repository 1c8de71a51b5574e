//! AMQP properties and headers as a broker or a producer can send them (wire bytes, parsed by
//! lapin's own parser): the header readers, the edge that takes a delivery apart and decodes
//! it, the dead-letter id and the copy a retry or dead letter publishes. Never a panic; the
//! copy is publishable. Input: routing key (AMQP short string), property list, body.

#![no_main]

use lapin::message::Delivery;
use libfuzzer_sys::fuzz_target;
use tenant_tokens::broker::message::{header_str, header_u32};
use tenant_tokens::pipeline::decode::decode_delivery;
use tenant_tokens::tools::dlq::dead_letter_id;
use tenant_tokens_fuzz::{check_accepted, check_publishable, parse_delivery};

/// Every header name the worker or the dead-letter console reads, and an odd one.
const NAMES: [&str; 12] = [
    "x-tt-error",
    "x-tt-error-kind",
    "x-tt-attempts",
    "x-tt-original-routing-key",
    "x-tt-failed-at",
    "x-tt-issuer-status",
    "x-tt-replayed-at",
    "traceparent",
    "x-death",
    "x-delivery-count",
    "x-first-death-reason",
    "",
];

fuzz_target!(|data: &[u8]| {
    let Some((routing_key, props, body)) = parse_delivery(data) else {
        return;
    };
    for name in NAMES {
        let _ = header_str(&props, name);
        let _ = header_u32(&props, name);
    }
    let id = dead_letter_id(&props, body);
    assert_eq!(id.len(), 16);
    assert_eq!(id, dead_letter_id(&props, body), "the id is not stable");

    let mut delivery = Delivery::mock(
        1,
        "tenant.events".into(),
        routing_key.as_str().into(),
        false,
        body.to_vec(),
    );
    delivery.properties = props;
    let (decoded, copy) = decode_delivery(delivery);
    check_publishable(&copy);
    if let Ok(request) = decoded {
        let key = header_str(&copy, "x-tt-original-routing-key").unwrap_or_default();
        let env = tenant_tokens::pipeline::decode::Envelope {
            routing_key: key,
            ..Default::default()
        };
        check_accepted(&env, &request);
    }
});
