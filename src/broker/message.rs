//! Reading and writing AMQP properties and headers of deliveries.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};

/// A header's value as text, for string-typed headers.
pub fn header_str<'a>(props: &'a BasicProperties, name: &str) -> Option<&'a str> {
    table_str(props.headers().as_ref()?, name)
}

/// A header's value as a number, whatever integer type the publisher chose.
pub fn header_u32(props: &BasicProperties, name: &str) -> Option<u32> {
    u32::try_from(table_int(props.headers().as_ref()?, name)?).ok()
}

/// A copy of `props` whose headers are changed by `edit`.
pub(crate) fn with_headers(
    props: &BasicProperties,
    edit: impl FnOnce(&mut FieldTable),
) -> BasicProperties {
    let mut table = props.headers().clone().unwrap_or_default();
    edit(&mut table);
    props.clone().with_headers(table).with_delivery_mode(2)
}

/// A long-string header value.
pub(crate) fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub(crate) fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A field of `table` as text, for string-typed fields: the one reader of text headers, also
/// for tables nested in headers (RabbitMQ's `x-death` entries) that [`header_str`] cannot reach.
pub(crate) fn table_str<'a>(table: &'a FieldTable, name: &str) -> Option<&'a str> {
    // Looked up by `&str` (`ShortString: Borrow<str>`): `ShortString::from` panics on a name
    // over 255 bytes, and no header can have such a name anyway.
    value_str(table.inner().get(name)?)
}

/// A field of `table` as a number, whatever integer type the publisher chose (a timestamp, or
/// a decimal string, counts too): the one reader of numeric headers, nested tables included.
pub(crate) fn table_int(table: &FieldTable, name: &str) -> Option<i64> {
    value_int(table.inner().get(name)?)
}

/// A header value as text when it is a (UTF-8) string.
pub(crate) fn value_str(value: &AMQPValue) -> Option<&str> {
    match value {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

/// A header value as a number when it is an integer, a timestamp or a decimal string.
pub(crate) fn value_int(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
        other => value_str(other)?.trim().parse().ok(),
    }
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
        let p = BasicProperties::default().with_headers(t);
        assert_eq!(header_u32(&p, "a"), Some(3));
        assert_eq!(header_u32(&p, "b"), Some(4));
        assert_eq!(header_u32(&p, "c"), Some(5));
        assert_eq!(header_u32(&p, "d"), None);
    }

    #[test]
    fn cuts_on_char_boundaries() {
        assert_eq!(cut("héllo", 2), "h");
        assert_eq!(cut("abc", 10), "abc");
    }

    #[test]
    fn reads_nested_tables_and_other_types() {
        let mut t = FieldTable::default();
        t.insert("n".into(), AMQPValue::Timestamp(7));
        t.insert("s".into(), AMQPValue::ShortString("x".into()));
        t.insert("d".into(), text(" 42 "));
        t.insert("neg".into(), AMQPValue::LongInt(-1));
        assert_eq!(table_int(&t, "n"), Some(7));
        assert_eq!(table_int(&t, "d"), Some(42));
        assert_eq!(table_int(&t, "s"), None);
        assert_eq!(table_str(&t, "s"), Some("x"));
        assert_eq!(table_str(&t, "n"), None);
        let p = BasicProperties::default().with_headers(t);
        assert_eq!(header_u32(&p, "neg"), None, "negative is not a u32");
        assert_eq!(header_str(&p, "s"), Some("x"));
    }
}
