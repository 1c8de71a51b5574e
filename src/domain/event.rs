//! The outgoing `tenant.token.ready` event (contract §7).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The body of `tenant.token.ready`. Stored (without `token`) in the same transaction as the
/// token, so every redelivery of a request publishes exactly the same event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadyEvent {
    /// UUID v5 of the request identity.
    pub event_id: Uuid,
    /// The tenant.
    pub tenant_id: String,
    /// Its container.
    pub container: String,
    /// First 16 hex characters of SHA-256 of the token.
    pub token_fingerprint: String,
    /// When the token was stored, RFC 3339 UTC.
    pub issued_at: String,
    /// True for exactly one request per tenant: the one whose handling stored the token.
    pub newly_issued: bool,
    /// The routing key of the triggering request.
    pub trigger: String,
    /// The triggering request's identity.
    pub correlation_id: String,
    /// True when this request replaced an earlier token (`tenant.token.rotate`).
    #[serde(default)]
    pub rotated: bool,
    /// The token's generation: 1 for a tenant's first token, n+1 after n rotations.
    #[serde(default = "first_generation")]
    pub generation: u32,
    /// The token itself, only with `EVENT_INCLUDE_TOKEN=true`; never stored with the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// Events stored before generations existed describe a first token.
fn first_generation() -> u32 {
    1
}

/// The body of `tenant.token.revoked` (contract §10): one per revoked token, published after
/// the revocation succeeded. Derived from the revocation's row, so every republish is equal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevokedEvent {
    /// UUID v5 of the token fingerprint.
    pub event_id: Uuid,
    /// The tenant.
    pub tenant_id: String,
    /// Its container.
    pub container: String,
    /// The revoked token's fingerprint.
    pub token_fingerprint: String,
    /// The token's `jti`, when it had one.
    pub jti: Option<String>,
    /// The token's generation.
    pub generation: u32,
    /// `rotated`, `deleted` or `orphan`.
    pub reason: String,
    /// When the issuer confirmed the revocation, RFC 3339 UTC.
    pub revoked_at: String,
    /// Identity of the message that made the revocation due (none for an orphan).
    pub correlation_id: Option<String>,
}

impl RevokedEvent {
    /// The event id of a token's revocation: the same for every republish.
    pub fn event_id_for(fingerprint: &str) -> Uuid {
        Uuid::new_v5(&REVOKED_NAMESPACE, fingerprint.as_bytes())
    }
}

/// Namespace of the revoked events' UUID v5 ids (fixed: changing it changes every id).
const REVOKED_NAMESPACE: Uuid = Uuid::from_u128(0x2f0d_93c4_71a8_4b6e_8e15_c7d9_04b3_6a52);

/// RFC 3339 in UTC with microseconds (Postgres' precision), e.g. `2026-11-29T12:00:00.123456Z`.
/// Public only for `tests/instructions.rs`; not an API.
#[doc(hidden)]
pub fn rfc3339(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    t.format(&fmt)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// Now, as [`rfc3339`].
pub(crate) fn now_rfc3339() -> String {
    rfc3339(time::OffsetDateTime::now_utc())
}
