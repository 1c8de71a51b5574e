use std::fmt;

use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::{TenantId, TenantName};

/// What a request asks for: the routing key it came with (contract §3 and §10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// `tenant.created`: eager provisioning.
    TenantCreated,
    /// `extension.requested`: lazy provisioning.
    ExtensionRequested,
    /// `tenant.token.rotate`: a new generation replaces the current token.
    TokenRotate,
    /// `tenant.deleted`: revoke every token, erase them, keep a tombstone.
    TenantDeleted,
}

impl Trigger {
    /// Parses a routing key; `None` for keys the worker does not handle.
    pub(crate) fn from_routing_key(key: &str) -> Option<Self> {
        match key {
            crate::broker::topology::TENANT_CREATED => Some(Self::TenantCreated),
            crate::broker::topology::EXTENSION_REQUESTED => Some(Self::ExtensionRequested),
            crate::broker::topology::TOKEN_ROTATE => Some(Self::TokenRotate),
            crate::broker::topology::TENANT_DELETED => Some(Self::TenantDeleted),
            _ => None,
        }
    }

    /// The routing key, as carried in the ready event's `trigger`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TenantCreated => crate::broker::topology::TENANT_CREATED,
            Self::ExtensionRequested => crate::broker::topology::EXTENSION_REQUESTED,
            Self::TokenRotate => crate::broker::topology::TOKEN_ROTATE,
            Self::TenantDeleted => crate::broker::topology::TENANT_DELETED,
        }
    }
}

/// A request's identity (contract §3): the AMQP `message_id`, else the CloudEvents `id`, else
/// a digest of routing key and body. Redeliveries and duplicates share it, so it keys the
/// request's stored outcome and derives its event id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageIdentity(String);

/// Namespace of the UUID v5 event ids (a fixed random UUID: changing it changes every event id).
const EVENT_NAMESPACE: Uuid = Uuid::from_u128(0x6d1c_2b8e_4a57_4f0e_9c3a_0e55_b1d2_7a41);

impl MessageIdentity {
    /// The longest identity kept verbatim; longer ones are replaced by their digest. It is
    /// published as the events' AMQP `correlation_id` property, a short string of at most 255
    /// bytes (`ShortString::from` panics beyond), so 255.
    const MAX_LEN: usize = 255;

    /// An identity given by the producer (`message_id` or CloudEvents `id`).
    pub(crate) fn given(id: &str) -> Option<Self> {
        let id = id.trim();
        if id.is_empty() {
            None
        } else if id.len() > Self::MAX_LEN || id.chars().any(char::is_control) {
            Some(Self(format!(
                "sha256:{}",
                hex::encode(Sha256::digest(id.as_bytes()))
            )))
        } else {
            Some(Self(id.to_owned()))
        }
    }

    /// The identity of a message without one: a digest of its routing key and body.
    pub(crate) fn digest(routing_key: &str, body: &[u8]) -> Self {
        let mut h = Sha256::new();
        h.update(routing_key.as_bytes());
        h.update([0]);
        h.update(body);
        Self(format!("sha256:{}", hex::encode(h.finalize())))
    }

    /// The identity as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The ready event's id: a UUID v5 of the identity, the same for every redelivery.
    pub fn event_id(&self) -> Uuid {
        Uuid::new_v5(&EVENT_NAMESPACE, self.0.as_bytes())
    }
}

impl fmt::Display for MessageIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A decoded, valid provisioning request: everything the engine needs, nothing it must check.
#[derive(Debug, Clone)]
pub struct ProvisionRequest {
    /// The request's identity.
    pub identity: MessageIdentity,
    /// Which event asked.
    pub trigger: Trigger,
    /// The tenant.
    pub tenant_id: TenantId,
    /// The tenant's display name, if given.
    pub tenant_name: Option<TenantName>,
    /// The extension that asked (`extension.requested`), for logs.
    pub extension_id: Option<String>,
    /// The incoming `correlation_id` property, copied to the event's headers.
    pub correlation_id: Option<String>,
    /// W3C trace context to continue.
    pub traceparent: Option<String>,
    /// `tenant.token.rotate` only: why (at most 256 characters), for logs.
    pub reason: Option<String>,
    /// `tenant.token.rotate` only: revoke the superseded token at once, without grace.
    pub rotate_now: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_are_deterministic() {
        let a = MessageIdentity::given("m-1").expect("id");
        assert_eq!(
            a.event_id(),
            MessageIdentity::given(" m-1 ").expect("id").event_id()
        );
        assert_ne!(
            a.event_id(),
            MessageIdentity::given("m-2").expect("id").event_id()
        );
        assert_eq!(a.event_id().get_version_num(), 5);
    }

    #[test]
    fn digests_depend_on_key_and_body() {
        let a = MessageIdentity::digest("tenant.created", b"{}");
        assert_eq!(a, MessageIdentity::digest("tenant.created", b"{}"));
        assert_ne!(a, MessageIdentity::digest("extension.requested", b"{}"));
        assert!(MessageIdentity::given("").is_none());
        assert!(
            MessageIdentity::given(&"x".repeat(300))
                .expect("id")
                .as_str()
                .starts_with("sha256:")
        );
    }
}
