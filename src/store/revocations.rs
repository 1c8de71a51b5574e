//! The revocation queue (contract §10): rows of `revocations`, written in the transaction that
//! makes each one due (rotation, deletion) or by the orphan sweep, and worked off by the
//! revoker.
//!
//! A revocation is claimed with a row lock (`FOR UPDATE SKIP LOCKED`) held across the revoke
//! call and released by the commit that records the result: two replicas never call for the
//! same token, and a claimant that dies mid-call loses its lock with its session, so the
//! revocation is simply due again (the issuer answers a repeated revoke as already revoked).
//! Nothing is ever deleted: a failed call only pushes `next_attempt_at` back.

use std::time::Duration;

use sqlx::{PgConnection, PgPool, Row as _};
use time::OffsetDateTime;

use super::StoreError;
use crate::crypto::Sealed;

/// A revocation that is due, claimed by the caller's transaction.
#[derive(Debug)]
pub(crate) struct Due {
    /// The token's fingerprint (the row's key).
    pub fingerprint: String,
    /// The tenant, the associated data of the ciphertext.
    pub tenant_id: String,
    /// The token, encrypted.
    pub sealed: Sealed,
    /// `rotated`, `deleted` or `orphan`.
    pub reason: String,
    /// Failed calls so far.
    pub attempts: i32,
}

/// Claims up to `limit` due revocations, oldest first, skipping those another transaction
/// holds.
pub(crate) async fn claim_due(tx: &mut PgConnection, limit: i64) -> Result<Vec<Due>, StoreError> {
    let rows = sqlx::query(
        "SELECT token_fingerprint, tenant_id, token_ciphertext, key_id, reason, attempts
           FROM revocations
          WHERE revoked_at IS NULL AND next_attempt_at <= now()
          ORDER BY next_attempt_at
          LIMIT $1
            FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(tx)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Due {
                fingerprint: r.try_get(0)?,
                tenant_id: r.try_get(1)?,
                sealed: Sealed {
                    blob: r.try_get(2)?,
                    key_id: r.try_get(3)?,
                },
                reason: r.try_get(4)?,
                attempts: r.try_get(5)?,
            })
        })
        .collect()
}

/// Records confirmed revocations: the time, and the ciphertext erased for good.
pub(crate) async fn mark_revoked(
    tx: &mut PgConnection,
    fingerprints: &[&str],
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE revocations
            SET revoked_at = clock_timestamp(), token_ciphertext = NULL, key_id = NULL,
                last_error = NULL
          WHERE token_fingerprint = ANY($1)",
    )
    .bind(fingerprints)
    .execute(tx)
    .await?;
    Ok(())
}

/// Records a failed attempt: the error (no secrets) and when to try again.
pub(crate) async fn mark_failed(
    tx: &mut PgConnection,
    fingerprint: &str,
    error: &str,
    retry_in: Duration,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE revocations
            SET attempts = attempts + 1, last_error = $2,
                next_attempt_at = now() + make_interval(secs => $3)
          WHERE token_fingerprint = $1",
    )
    .bind(fingerprint)
    .bind(error)
    .bind(retry_in.as_secs_f64())
    .execute(tx)
    .await?;
    Ok(())
}

/// A revoked token whose `tenant.token.revoked` event is not yet confirmed.
#[derive(Debug)]
pub(crate) struct Unpublished {
    /// The token's fingerprint.
    pub fingerprint: String,
    /// The tenant.
    pub tenant_id: String,
    /// Its container.
    pub container: String,
    /// The token's generation.
    pub generation: i32,
    /// The token's `jti`.
    pub jti: Option<String>,
    /// Why it was revoked.
    pub reason: String,
    /// When.
    pub revoked_at: OffsetDateTime,
    /// Identity of the message that made it due.
    pub correlation_id: Option<String>,
}

/// Claims up to `limit` revoked tokens whose event is not yet published.
pub(crate) async fn claim_unpublished(
    tx: &mut PgConnection,
    limit: i64,
) -> Result<Vec<Unpublished>, StoreError> {
    let rows = sqlx::query(
        "SELECT token_fingerprint, tenant_id, container, generation, jti, reason, revoked_at,
                correlation_id
           FROM revocations
          WHERE revoked_at IS NOT NULL AND event_published_at IS NULL
          ORDER BY revoked_at
          LIMIT $1
            FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(tx)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Unpublished {
                fingerprint: r.try_get(0)?,
                tenant_id: r.try_get(1)?,
                container: r.try_get(2)?,
                generation: r.try_get(3)?,
                jti: r.try_get(4)?,
                reason: r.try_get(5)?,
                revoked_at: r.try_get(6)?,
                correlation_id: r.try_get(7)?,
            })
        })
        .collect()
}

/// Records that the events of these revocations were confirmed by the broker.
pub(crate) async fn mark_published(
    tx: &mut PgConnection,
    fingerprints: &[&str],
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE revocations SET event_published_at = now() WHERE token_fingerprint = ANY($1)",
    )
    .bind(fingerprints)
    .execute(tx)
    .await?;
    Ok(())
}

/// Tokens due for revocation and not yet revoked (`tenant_tokens_revocations_pending`).
pub(crate) async fn pending(pool: &PgPool) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM revocations WHERE revoked_at IS NULL AND due_at <= now()",
    )
    .fetch_one(pool)
    .await?)
}

/// Queues for revocation (reason `orphan`) every journaled token older than `grace` that is
/// still sealed in the journal (so never stored) and not its tenant's current token, and
/// moves its ciphertext from the journal to the queue; returns how many.
pub(crate) async fn sweep_orphans(pool: &PgPool, grace: Duration) -> Result<u64, StoreError> {
    let queued: i64 = sqlx::query_scalar(
        "WITH orphans AS (
             SELECT j.id, j.tenant_id, j.container, j.generation, j.token_fingerprint, j.jti,
                    j.token_ciphertext, j.key_id
               FROM issued_tokens j
               LEFT JOIN tenants t ON t.tenant_id = j.tenant_id
              WHERE j.token_ciphertext IS NOT NULL
                AND j.issued_at < now() - make_interval(secs => $1)
                AND t.token_fingerprint IS DISTINCT FROM j.token_fingerprint
              ORDER BY j.issued_at
              LIMIT 256
                FOR UPDATE OF j SKIP LOCKED
         ), queued AS (
             INSERT INTO revocations (token_fingerprint, tenant_id, container, generation, jti,
                                      token_ciphertext, key_id, reason, due_at, next_attempt_at)
             SELECT token_fingerprint, tenant_id, container, generation, jti, token_ciphertext,
                    key_id, 'orphan', now(), now()
               FROM orphans
             ON CONFLICT (token_fingerprint) DO NOTHING
             RETURNING 1
         ), moved AS (
             UPDATE issued_tokens SET token_ciphertext = NULL, key_id = NULL
              WHERE id IN (SELECT id FROM orphans)
         )
         SELECT count(*) FROM queued",
    )
    .bind(grace.as_secs_f64())
    .fetch_one(pool)
    .await?;
    Ok(u64::try_from(queued).unwrap_or(0))
}

/// A token of a tenant's past (superseded, or revoked with the tenant), as `token show`
/// lists it.
#[derive(Debug)]
pub(crate) struct PastToken {
    /// Its generation.
    pub generation: i32,
    /// Its fingerprint.
    pub fingerprint: String,
    /// Its `jti`.
    pub jti: Option<String>,
    /// `rotated`, `deleted` or `orphan`.
    pub reason: String,
    /// When its revocation is or was due.
    pub due_at: OffsetDateTime,
    /// When the issuer confirmed the revocation.
    pub revoked_at: Option<OffsetDateTime>,
    /// Failed revoke calls so far.
    pub attempts: i32,
    /// The last failure, if any.
    pub last_error: Option<String>,
}

/// Every queued or done revocation of a tenant, newest generation first.
pub(crate) async fn of_tenant(
    pool: &PgPool,
    tenant_id: &str,
) -> Result<Vec<PastToken>, StoreError> {
    let rows = sqlx::query(
        "SELECT generation, token_fingerprint, jti, reason, due_at, revoked_at, attempts,
                last_error
           FROM revocations WHERE tenant_id = $1
          ORDER BY generation DESC, created_at DESC",
    )
    .bind(tenant_id)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(PastToken {
                generation: r.try_get(0)?,
                fingerprint: r.try_get(1)?,
                jti: r.try_get(2)?,
                reason: r.try_get(3)?,
                due_at: r.try_get(4)?,
                revoked_at: r.try_get(5)?,
                attempts: r.try_get(6)?,
                last_error: r.try_get(7)?,
            })
        })
        .collect()
}
