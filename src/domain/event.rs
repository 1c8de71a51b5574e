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
    /// The token itself, only with `EVENT_INCLUDE_TOKEN=true`; never stored with the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// RFC 3339 in UTC with microseconds (Postgres' precision), e.g. `2026-11-29T12:00:00.123456Z`.
pub(crate) fn rfc3339(t: time::OffsetDateTime) -> String {
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
