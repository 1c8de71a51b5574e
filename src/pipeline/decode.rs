//! Message decoding (contract §3): an AMQP delivery's routing key, properties and body become
//! a [`ProvisionRequest`], or a [`DecodeError`] that sends the message to the dead-letter
//! queue with kind `invalid`. Decoding never panics, whatever the bytes.

use serde::Deserialize;
use serde_json::Value;

use crate::domain::{MessageIdentity, ProvisionRequest, TenantId, TenantName, Trigger};

/// The largest body the worker reads.
pub(crate) const MAX_BODY: usize = 64 * 1024;

/// What the decoder needs of a delivery, independent of the AMQP client.
#[derive(Debug, Clone, Default)]
pub struct Envelope<'a> {
    /// The routing key the request was first published with (the retry path keeps it in a header).
    pub routing_key: &'a str,
    /// The AMQP `message_id` property.
    pub message_id: Option<&'a str>,
    /// The AMQP `correlation_id` property.
    pub correlation_id: Option<&'a str>,
    /// The AMQP `content_type` property.
    pub content_type: Option<&'a str>,
    /// The W3C `traceparent` header.
    pub traceparent: Option<&'a str>,
}

/// Why a message is not a valid request. The text never contains the body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A routing key the worker does not handle.
    #[error(
        "unknown routing key {0:?}: expected tenant.created, extension.requested, tenant.token.rotate or tenant.deleted"
    )]
    UnknownRoutingKey(String),
    /// Body over [`MAX_BODY`].
    #[error("body of {0} bytes is over the 64 KiB limit")]
    TooLarge(usize),
    /// A content type that is neither JSON nor structured CloudEvents.
    #[error(
        "unsupported content type {0:?}: expected application/json or application/cloudevents+json"
    )]
    ContentType(String),
    /// Not UTF-8 JSON.
    #[error("body is not valid JSON: {0}")]
    NotJson(String),
    /// JSON, but not an object.
    #[error("body is not a JSON object")]
    NotObject,
    /// A CloudEvents envelope that breaks the CloudEvents rules the contract names.
    #[error("invalid CloudEvent: {0}")]
    CloudEvent(String),
    /// No `tenant_id`.
    #[error("tenant_id is missing")]
    MissingTenant,
    /// A field with a bad value.
    #[error("{0}")]
    Field(String),
}

#[derive(Deserialize)]
struct Fields {
    tenant_id: Option<Value>,
    tenant_name: Option<Value>,
    extension_id: Option<Value>,
    reason: Option<Value>,
    now: Option<Value>,
}

/// Decodes one delivery into a request.
pub fn decode(env: &Envelope<'_>, body: &[u8]) -> Result<ProvisionRequest, DecodeError> {
    let trigger = Trigger::from_routing_key(env.routing_key)
        .ok_or_else(|| DecodeError::UnknownRoutingKey(truncate(env.routing_key, 64)))?;
    if body.len() > MAX_BODY {
        return Err(DecodeError::TooLarge(body.len()));
    }
    let cloud_event = is_cloud_event(env.content_type)?;
    let json: Value =
        serde_json::from_slice(body).map_err(|e| DecodeError::NotJson(e.to_string()))?;
    let Value::Object(obj) = json else {
        return Err(DecodeError::NotObject);
    };
    let (data, ce_id) = if cloud_event {
        let (data, id) = cloud_event_data(obj, env.routing_key)?;
        (data, Some(id))
    } else {
        (Value::Object(obj), None)
    };
    let fields: Fields = serde_json::from_value(data).map_err(|_| DecodeError::NotObject)?;
    let (reason, rotate_now) = if trigger == Trigger::TokenRotate {
        (rotation_reason(fields.reason)?, rotate_now(fields.now)?)
    } else {
        (None, false)
    };
    let identity = env
        .message_id
        .and_then(MessageIdentity::given)
        .or_else(|| ce_id.as_deref().and_then(MessageIdentity::given))
        .unwrap_or_else(|| MessageIdentity::digest(env.routing_key, body));
    Ok(ProvisionRequest {
        identity,
        trigger,
        tenant_id: tenant_id(fields.tenant_id)?,
        tenant_name: tenant_name(fields.tenant_name)?,
        extension_id: match fields.extension_id {
            Some(Value::String(s)) if trigger == Trigger::ExtensionRequested => {
                Some(truncate(&s, 256))
            }
            _ => None,
        },
        correlation_id: env.correlation_id.map(|c| truncate(c, 256)),
        traceparent: env
            .traceparent
            .filter(|t| valid_traceparent(t))
            .map(str::to_owned),
        reason,
        rotate_now,
    })
}

/// A delivery the way the worker meets it, without a broker: taken apart at the edge (routing
/// key, `x-tt-attempts`, `traceparent` and the properties read from the headers), decoded,
/// and copied with the `x-tt-*` headers a retry or a dead letter adds (the copy must be
/// publishable whatever came in). Public only for the fuzz target
/// `fuzz/fuzz_targets/dead_letter_headers.rs`; not an API.
#[doc(hidden)]
pub fn decode_delivery(
    delivery: lapin::message::Delivery,
) -> (
    Result<ProvisionRequest, DecodeError>,
    lapin::BasicProperties,
) {
    use crate::broker::message::{cut, text};
    use crate::broker::topology::headers;
    let acks = crate::broker::acks::Acks::detached();
    let m = crate::broker::inbound::Inbound::from_delivery(delivery, &acks);
    let decoded = decode(&m.envelope(), &m.body);
    let error = decoded.as_ref().err().map(ToString::to_string);
    let copy = m.copy_properties(|h| {
        let attempts = lapin::types::AMQPValue::LongLongInt(i64::from(m.attempts));
        h.insert(headers::ATTEMPTS.into(), attempts);
        h.insert(headers::ORIGINAL_ROUTING_KEY.into(), text(&m.routing_key));
        h.insert(
            headers::ERROR.into(),
            text(cut(error.as_deref().unwrap_or(""), 1024)),
        );
    });
    (decoded, copy)
}

/// Whether the content type says structured CloudEvents; plain JSON (or none) is not.
fn is_cloud_event(content_type: Option<&str>) -> Result<bool, DecodeError> {
    let media = content_type.map(|c| {
        c.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    });
    match media.as_deref() {
        None | Some("") | Some("application/json") => Ok(false),
        Some("application/cloudevents+json") => Ok(true),
        Some(other) => Err(DecodeError::ContentType(truncate(other, 64))),
    }
}

/// The `data` object and `id` of a structured CloudEvent, checked against the rules the
/// contract names (`specversion` 1.0, `type` equal to the routing key, a non-empty `id`).
fn cloud_event_data(
    mut obj: serde_json::Map<String, Value>,
    routing_key: &str,
) -> Result<(Value, String), DecodeError> {
    let invalid = |why: &str| DecodeError::CloudEvent(why.to_owned());
    if obj.get("specversion").and_then(Value::as_str) != Some("1.0") {
        return Err(invalid("specversion must be \"1.0\""));
    }
    if obj.get("type").and_then(Value::as_str) != Some(routing_key) {
        return Err(DecodeError::CloudEvent(format!(
            "type must equal the routing key {routing_key:?}"
        )));
    }
    let id = match obj.get("id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err(invalid("id must be a non-empty string")),
    };
    match obj.remove("data") {
        Some(Value::Object(d)) => Ok((Value::Object(d), id)),
        _ => Err(invalid("data must be a JSON object")),
    }
}

fn tenant_id(v: Option<Value>) -> Result<TenantId, DecodeError> {
    match v {
        None | Some(Value::Null) => Err(DecodeError::MissingTenant),
        Some(Value::String(s)) => TenantId::parse(&s).map_err(DecodeError::Field),
        Some(_) => Err(DecodeError::Field("tenant_id must be a string".into())),
    }
}

/// A rotation's `reason`: optional, at most 256 characters, logged only.
fn rotation_reason(v: Option<Value>) -> Result<Option<String>, DecodeError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.chars().count() <= 256 => Ok(Some(s)),
        Some(Value::String(_)) => Err(DecodeError::Field(
            "reason is longer than 256 characters".into(),
        )),
        Some(_) => Err(DecodeError::Field("reason must be a string".into())),
    }
}

/// A rotation's `now`: optional boolean, false when absent.
fn rotate_now(v: Option<Value>) -> Result<bool, DecodeError> {
    match v {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(b),
        Some(_) => Err(DecodeError::Field("now must be true or false".into())),
    }
}

fn tenant_name(v: Option<Value>) -> Result<Option<TenantName>, DecodeError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => TenantName::parse(&s).map(Some).map_err(DecodeError::Field),
        Some(_) => Err(DecodeError::Field("tenant_name must be a string".into())),
    }
}

/// `version-traceid-parentid-flags` with the lengths of W3C Trace Context.
fn valid_traceparent(t: &str) -> bool {
    let parts: Vec<&str> = t.split('-').collect();
    parts.len() == 4
        && [2, 32, 16, 2]
            .iter()
            .zip(&parts)
            .all(|(n, p)| p.len() == *n && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(key: &str) -> Envelope<'_> {
        Envelope {
            routing_key: key,
            ..Default::default()
        }
    }

    #[test]
    fn plain_json() {
        let r = decode(
            &env("tenant.created"),
            br#"{"tenant_id":"acme-42","tenant_name":"Acme","extra":1}"#,
        )
        .expect("valid");
        assert_eq!(r.tenant_id.as_str(), "acme-42");
        assert_eq!(
            r.tenant_name.map(|n| n.as_str().to_owned()),
            Some("Acme".into())
        );
        assert_eq!(r.trigger, Trigger::TenantCreated);
        assert!(r.identity.as_str().starts_with("sha256:"));
    }

    #[test]
    fn identity_prefers_message_id_then_cloudevent_id() {
        let mut e = env("extension.requested");
        e.content_type = Some("application/cloudevents+json; charset=utf-8");
        let body = br#"{"specversion":"1.0","type":"extension.requested","id":"ce-1","source":"x","data":{"tenant_id":"t1","extension_id":"ext"}}"#;
        let r = decode(&e, body).expect("valid");
        assert_eq!(r.identity.as_str(), "ce-1");
        assert_eq!(r.extension_id.as_deref(), Some("ext"));
        e.message_id = Some("m-9");
        assert_eq!(decode(&e, body).expect("valid").identity.as_str(), "m-9");
    }

    #[test]
    fn invalid_inputs_are_named() {
        let cases: Vec<(Envelope<'_>, Vec<u8>, &str)> = vec![
            (
                env("tenant.renamed"),
                br#"{"tenant_id":"a"}"#.to_vec(),
                "unknown routing key",
            ),
            (
                env("tenant.created"),
                b"not json".to_vec(),
                "not valid JSON",
            ),
            (env("tenant.created"), vec![0xff, 0xfe], "not valid JSON"),
            (env("tenant.created"), b"[1]".to_vec(), "not a JSON object"),
            (
                env("tenant.created"),
                br#"{"tenant_name":"x"}"#.to_vec(),
                "missing",
            ),
            (
                env("tenant.created"),
                br#"{"tenant_id":""}"#.to_vec(),
                "empty",
            ),
            (
                env("tenant.created"),
                br#"{"tenant_id":"-bad"}"#.to_vec(),
                "must match",
            ),
            (
                env("tenant.created"),
                br#"{"tenant_id":7}"#.to_vec(),
                "must be a string",
            ),
            (env("tenant.created"), vec![b' '; MAX_BODY + 1], "64 KiB"),
        ];
        for (e, body, want) in cases {
            let err = decode(&e, &body).expect_err("invalid").to_string();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
    }

    #[test]
    fn cloudevents_rules() {
        let mut e = env("tenant.created");
        e.content_type = Some("application/cloudevents+json");
        for body in [
            r#"{"specversion":"0.3","type":"tenant.created","id":"1","data":{"tenant_id":"a"}}"#,
            r#"{"specversion":"1.0","type":"other","id":"1","data":{"tenant_id":"a"}}"#,
            r#"{"specversion":"1.0","type":"tenant.created","data":{"tenant_id":"a"}}"#,
            r#"{"specversion":"1.0","type":"tenant.created","id":"1"}"#,
        ] {
            assert!(
                matches!(decode(&e, body.as_bytes()), Err(DecodeError::CloudEvent(_))),
                "{body}"
            );
        }
        e.content_type = Some("text/plain");
        assert!(matches!(
            decode(&e, b"{}"),
            Err(DecodeError::ContentType(_))
        ));
    }

    #[test]
    fn rotation_fields_are_read_and_checked() {
        let e = env("tenant.token.rotate");
        let r = decode(&e, br#"{"tenant_id":"a","reason":"leak","now":true}"#).expect("valid");
        assert_eq!(r.trigger, Trigger::TokenRotate);
        assert_eq!(r.reason.as_deref(), Some("leak"));
        assert!(r.rotate_now);
        let plain = decode(&e, br#"{"tenant_id":"a"}"#).expect("valid");
        assert!(!plain.rotate_now && plain.reason.is_none());
        for bad in [
            r#"{"tenant_id":"a","now":"yes"}"#.to_owned(),
            r#"{"tenant_id":"a","reason":7}"#.to_owned(),
            format!(r#"{{"tenant_id":"a","reason":"{}"}}"#, "r".repeat(257)),
        ] {
            assert!(
                matches!(decode(&e, bad.as_bytes()), Err(DecodeError::Field(_))),
                "{bad}"
            );
        }
        let deleted = decode(&env("tenant.deleted"), br#"{"tenant_id":"a","now":1}"#);
        assert_eq!(deleted.expect("valid").trigger, Trigger::TenantDeleted);
    }

    #[test]
    fn traceparent_is_kept_only_when_well_formed() {
        let mut e = env("tenant.created");
        e.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert!(
            decode(&e, br#"{"tenant_id":"a"}"#)
                .expect("valid")
                .traceparent
                .is_some()
        );
        e.traceparent = Some("garbage");
        assert!(
            decode(&e, br#"{"tenant_id":"a"}"#)
                .expect("valid")
                .traceparent
                .is_none()
        );
    }
}
