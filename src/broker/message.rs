//! Reading and writing AMQP properties and headers of deliveries.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};

use super::topology::headers;
use crate::pipeline::decode::Envelope;

/// A header's value as text, for string-typed headers.
pub fn header_str<'a>(props: &'a BasicProperties, name: &str) -> Option<&'a str> {
    let table = props.headers().as_ref()?;
    match table.inner().get(&ShortString::from(name))? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

/// A header's value as a number, whatever integer type the publisher chose.
pub fn header_u32(props: &BasicProperties, name: &str) -> Option<u32> {
    let table = props.headers().as_ref()?;
    let v = match table.inner().get(&ShortString::from(name))? {
        AMQPValue::ShortShortInt(n) => i64::from(*n),
        AMQPValue::ShortShortUInt(n) => i64::from(*n),
        AMQPValue::ShortInt(n) => i64::from(*n),
        AMQPValue::ShortUInt(n) => i64::from(*n),
        AMQPValue::LongInt(n) => i64::from(*n),
        AMQPValue::LongUInt(n) => i64::from(*n),
        AMQPValue::LongLongInt(n) => *n,
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.parse().ok()?,
        _ => return None,
    };
    u32::try_from(v).ok()
}

/// The routing key a request was first published with: the delivery's own, unless the
/// message came back through a retry queue, which keeps the original in a header.
pub fn original_routing_key<'a>(routing_key: &'a str, props: &'a BasicProperties) -> &'a str {
    header_str(props, headers::ORIGINAL_ROUTING_KEY).unwrap_or(routing_key)
}

/// What the decoder needs of a delivery.
pub fn envelope<'a>(routing_key: &'a str, props: &'a BasicProperties) -> Envelope<'a> {
    Envelope {
        routing_key: original_routing_key(routing_key, props),
        message_id: props.message_id().as_ref().map(ShortString::as_str),
        correlation_id: props.correlation_id().as_ref().map(ShortString::as_str),
        content_type: props.content_type().as_ref().map(ShortString::as_str),
        traceparent: header_str(props, headers::TRACEPARENT),
    }
}

/// A copy of `props` whose headers are changed by `edit`.
pub fn with_headers(
    props: &BasicProperties,
    edit: impl FnOnce(&mut FieldTable),
) -> BasicProperties {
    let mut table = props.headers().clone().unwrap_or_default();
    edit(&mut table);
    props.clone().with_headers(table).with_delivery_mode(2)
}

/// A long-string header value.
pub fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_headers_of_any_integer_type() {
        let mut t = FieldTable::default();
        t.insert("a".into(), AMQPValue::LongLongInt(3));
        t.insert("b".into(), AMQPValue::ShortShortUInt(4));
        t.insert("c".into(), text("5"));
        t.insert(headers::ORIGINAL_ROUTING_KEY.into(), text("tenant.created"));
        let p = BasicProperties::default().with_headers(t);
        assert_eq!(header_u32(&p, "a"), Some(3));
        assert_eq!(header_u32(&p, "b"), Some(4));
        assert_eq!(header_u32(&p, "c"), Some(5));
        assert_eq!(header_u32(&p, "d"), None);
        assert_eq!(
            original_routing_key("tenant-tokens.requests", &p),
            "tenant.created"
        );
        assert_eq!(original_routing_key("x", &BasicProperties::default()), "x");
    }

    #[test]
    fn cuts_on_char_boundaries() {
        assert_eq!(cut("héllo", 2), "h");
        assert_eq!(cut("abc", 10), "abc");
    }
}
