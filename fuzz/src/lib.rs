//! What the fuzz targets share: how an input's bytes become what the worker is handed (a
//! delivery's envelope and body, AMQP wire bytes), and the promises every target checks
//! (the same ones `tests/hostile_input.rs` property-tests).
//!
//! Each check panics with a message when a promise is broken: libFuzzer reports a panic as a
//! crash and keeps the input under `fuzz/artifacts/<target>/`.

use lapin::BasicProperties;
use lapin::protocol::basic::{gen_properties, parse_properties};
use lapin::types::ShortString;
use lapin::types::parsing::parse_short_string;
use tenant_tokens::domain::{ProvisionRequest, TenantId, Trigger};
use tenant_tokens::pipeline::decode::{DecodeError, Envelope};

/// The header lines of a `decode` input, in order, before the body.
pub const DECODE_FIELDS: [&str; 5] = [
    "routing key",
    "content type",
    "message id",
    "correlation id",
    "traceparent",
];

/// A `decode` input taken apart: five lines (routing key, content type, message id,
/// correlation id, traceparent; an empty line is an absent property), then the body, bytes as
/// they are. Text seeds stay readable and the fuzzer mutates the envelope and the body alike.
pub struct DecodeInput<'a> {
    fields: [Option<String>; 5],
    /// The body: everything after the fifth line.
    pub body: &'a [u8],
}

impl<'a> DecodeInput<'a> {
    /// Splits `data` (see the type's docs); missing lines are absent properties.
    pub fn split(data: &'a [u8]) -> Self {
        let mut rest = data;
        let mut fields: [Option<String>; 5] = Default::default();
        for field in &mut fields {
            let Some(end) = rest.iter().position(|b| *b == b'\n') else {
                break;
            };
            let line = String::from_utf8_lossy(&rest[..end]).into_owned();
            *field = (!line.is_empty()).then_some(line);
            rest = &rest[end + 1..];
        }
        Self { fields, body: rest }
    }

    /// The envelope the decoder is handed.
    pub fn envelope(&self) -> Envelope<'_> {
        let [key, content_type, message_id, correlation_id, traceparent] = &self.fields;
        Envelope {
            routing_key: key.as_deref().unwrap_or(""),
            message_id: message_id.as_deref(),
            correlation_id: correlation_id.as_deref(),
            content_type: content_type.as_deref(),
            traceparent: traceparent.as_deref(),
        }
    }
}

/// What every accepted request holds, so that Postgres stores it and the event encoder
/// publishes it: the tenant id is valid, names and ids have no NUL, the identity fits an AMQP
/// short string (the events' `correlation_id`) without control characters, all bounded.
pub fn check_accepted(env: &Envelope<'_>, r: &ProvisionRequest) {
    let id = r.tenant_id.as_str();
    assert_eq!(TenantId::parse(id).ok().as_ref(), Some(&r.tenant_id));
    assert_eq!(
        r.trigger.as_str(),
        env.routing_key,
        "trigger of another key"
    );
    if let Some(name) = &r.tenant_name {
        assert!(name.as_str().chars().count() <= 256, "tenant name too long");
        assert!(!name.as_str().contains('\0'), "NUL in the tenant name");
    }
    let identity = r.identity.as_str();
    assert!(!identity.is_empty(), "empty identity");
    assert!(
        ShortString::try_new(identity).is_ok(),
        "identity of {} bytes",
        identity.len()
    );
    assert!(
        !identity.chars().any(char::is_control),
        "control character in the identity {identity:?}"
    );
    assert_eq!(identity.trim(), identity, "identity not trimmed");
    for (what, v) in [
        ("extension_id", &r.extension_id),
        ("correlation_id", &r.correlation_id),
        ("reason", &r.reason),
    ] {
        if let Some(v) = v {
            assert!(v.chars().count() <= 256, "{what} too long");
        }
    }
    if r.trigger != Trigger::TokenRotate {
        assert!(r.reason.is_none() && !r.rotate_now, "rotation fields kept");
    }
    if let Some(t) = &r.traceparent {
        assert_eq!(t.len(), 55, "traceparent {t:?}");
        assert!(t.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit()));
    }
}

/// An error is short and never repeats the body (bodies may carry anything; errors go to logs
/// and dead-letter headers). Errors about the routing key or content type only echo those.
///
/// `redecode` decodes another body in the same envelope and returns its error text. A body
/// found in the error is only a leak when the error follows the body: the same body with its
/// letters' case flipped must show up flipped in the error of `redecode`. (Without that, a
/// body that spells out part of a fixed message, as the fuzzer found with the body
/// `body is not valid J`, would count as leaked.)
pub fn check_refused(body: &[u8], e: &DecodeError, redecode: impl FnOnce(&[u8]) -> Option<String>) {
    let text = e.to_string();
    assert!(
        text.chars().count() <= 1024,
        "an error of {} chars",
        text.len()
    );
    if matches!(
        e,
        DecodeError::UnknownRoutingKey(_) | DecodeError::ContentType(_)
    ) {
        return;
    }
    let shown = String::from_utf8_lossy(body);
    let shown = shown.trim();
    if shown.chars().count() < 12 || !text.contains(shown) {
        return;
    }
    let flipped: Vec<u8> = body
        .iter()
        .map(|b| match b {
            b'a'..=b'z' => b.to_ascii_uppercase(),
            b'A'..=b'Z' => b.to_ascii_lowercase(),
            _ => *b,
        })
        .collect();
    assert_ne!(
        flipped.as_slice(),
        body,
        "the body leaked into {text:?} (and has no letters to tell a fixed message from an echo)"
    );
    let flipped_shown = String::from_utf8_lossy(&flipped).trim().to_owned();
    if let Some(again) = redecode(&flipped) {
        assert!(
            !again.contains(&flipped_shown),
            "the body leaked into {text:?} (and {again:?})"
        );
    }
}

/// A delivery's routing key, properties and body, as they come off the wire: an AMQP short
/// string, a content header's property list (flags, then the properties present, headers as
/// a field table), then the body. Parsed by the same amq-protocol parser lapin uses.
pub fn parse_delivery(data: &[u8]) -> Option<(String, BasicProperties, &[u8])> {
    let (rest, key) = parse_short_string(data).ok()?;
    let (body, props) = parse_properties(rest).ok()?;
    Some((key.as_str().to_owned(), props, body))
}

/// `props` as a content header's property list, or why they cannot be published.
pub fn properties_bytes(props: &BasicProperties) -> Result<Vec<u8>, String> {
    cookie_factory::gen_simple(gen_properties(props), Vec::new()).map_err(|e| format!("{e:?}"))
}

/// Properties the worker publishes are publishable: they serialise, and the broker's reader
/// (the same parser) gets back exactly them (compared as bytes: a NaN header is not equal to
/// itself).
pub fn check_publishable(props: &BasicProperties) {
    let bytes = properties_bytes(props).unwrap_or_else(|e| panic!("unpublishable: {e}"));
    let (rest, back) = parse_properties(&bytes[..]).expect("published properties parse");
    assert!(rest.is_empty(), "trailing bytes after the properties");
    assert_eq!(
        properties_bytes(&back).as_deref(),
        Ok(&bytes[..]),
        "properties changed on the wire"
    );
}
