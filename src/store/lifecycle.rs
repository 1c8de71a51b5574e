//! Rotation and deletion (contract §10), each in a transaction of its own.
//!
//! Both start by locking the tenant's row, like a claim ([`super::claim`]): a rotation or
//! deletion in another batch or process waits for this one to commit, then sees its result.
//! So two rotations of one tenant yield two generations one after the other, never two
//! current tokens; and a deletion that races a rotation revokes whatever was current when it
//! got the lock, superseded tokens included.

use std::time::Duration;

use sqlx::{PgConnection, Row as _};
use time::OffsetDateTime;

use super::{NewToken, StoreError, TenantRow, generation_i32, row_from};

/// Locks a tenant's row until the transaction ends; returns it with its ciphertext (and
/// whether `request_id` issued one of its tokens) and the transaction's `now()` (which a
/// rotation stores as `issued_at`). `None` when there is none.
pub(crate) async fn lock_tenant(
    tx: &mut PgConnection,
    tenant_id: &str,
    request_id: &str,
) -> Result<Option<(TenantRow, OffsetDateTime)>, StoreError> {
    let row = sqlx::query(concat!(
        "SELECT ",
        tenant_columns!("true", "ARRAY[$2]"),
        ", now() FROM tenants t WHERE t.tenant_id = $1 FOR UPDATE OF t"
    ))
    .bind(tenant_id)
    .bind(request_id)
    .fetch_optional(&mut *tx)
    .await?;
    match row {
        Some(r) => Ok(Some((row_from(&r)?, r.try_get(12)?))),
        None => Ok(None),
    }
}

/// What a rotation stores, in one statement.
pub(crate) struct Rotation<'a> {
    /// The tenant's row as locked, holding generation n (with its ciphertext).
    pub current: &'a TenantRow,
    /// Generation n+1, encrypted.
    pub new: &'a NewToken,
    /// How long generation n stays valid (zero for `now: true`).
    pub grace: Duration,
}

/// Stores generation n+1 as current (issued by the rotate request, `new.issued_by`), queues
/// generation n for revocation after the grace (with the request that issued it), and erases
/// the new token's journal copy, in one statement of the caller's transaction.
pub(crate) async fn rotate(tx: &mut PgConnection, r: &Rotation<'_>) -> Result<(), StoreError> {
    let old = r.current.token.as_ref();
    let sealed = old.and_then(|t| t.sealed.as_ref());
    sqlx::query(
        "WITH superseded AS (
             INSERT INTO revocations (token_fingerprint, tenant_id, container, generation, jti,
                                      token_ciphertext, key_id, reason, correlation_id, due_at,
                                      next_attempt_at, issued_by)
             SELECT $1, $2, $3, $4, $5, $6, $7, 'rotated', $8,
                    now() + make_interval(secs => $9), now() + make_interval(secs => $9), $15
              WHERE $1::text IS NOT NULL AND $6::bytea IS NOT NULL
             ON CONFLICT (token_fingerprint) DO NOTHING
         ), unjournaled AS (
             UPDATE issued_tokens SET token_ciphertext = NULL, key_id = NULL
              WHERE token_fingerprint = $12 AND token_ciphertext IS NOT NULL
         )
         UPDATE tenants SET token_ciphertext = $10, key_id = $11, token_fingerprint = $12,
                            jti = $13, issued_at = now(), generation = $14, issued_by = $8
          WHERE tenant_id = $2",
    )
    .bind(old.map(|t| t.fingerprint.as_str()))
    .bind(r.current.tenant_id.as_str())
    .bind(r.current.container.as_str())
    .bind(generation_i32(r.current.generation))
    .bind(old.and_then(|t| t.jti.as_deref()))
    .bind(sealed.map(|s| s.blob.as_slice()))
    .bind(sealed.map(|s| s.key_id.as_str()))
    .bind(r.new.issued_by.as_str())
    .bind(r.grace.as_secs_f64())
    .bind(r.new.sealed.blob.as_slice())
    .bind(r.new.sealed.key_id.as_str())
    .bind(r.new.fingerprint.as_str())
    .bind(r.new.jti.as_deref())
    .bind(generation_i32(r.current.generation.saturating_add(1)))
    .bind(r.current.issued_by.as_deref())
    .execute(tx)
    .await?;
    Ok(())
}

/// What became of a deletion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Deletion {
    /// The tenant is a tombstone now; its tokens are due for revocation.
    Deleted,
    /// It already was (a repeated deletion changes nothing).
    AlreadyDeleted,
}

/// Deletes a tenant: its row becomes a tombstone (created if the tenant was never seen, with
/// the container it would have had, so a late `tenant.created` finds it), its current token
/// and every superseded one not yet revoked become due at once (reason `deleted`), and its
/// ciphertext leaves the row (the revocation keeps it until the token is revoked).
pub(crate) async fn delete(
    tx: &mut PgConnection,
    tenant_id: &str,
    container_if_new: &str,
    request_id: &str,
) -> Result<Deletion, StoreError> {
    // No conflict target: a concurrent first claim of the same tenant may collide on the
    // container's unique index as well as on the id; either way, wait for it and lock its row.
    sqlx::query(
        "INSERT INTO tenants (tenant_id, container) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(tenant_id)
    .bind(container_if_new)
    .execute(&mut *tx)
    .await?;
    let deleted_at: Option<OffsetDateTime> =
        sqlx::query_scalar("SELECT deleted_at FROM tenants WHERE tenant_id = $1 FOR UPDATE")
            .bind(tenant_id)
            .fetch_one(&mut *tx)
            .await?;
    if deleted_at.is_some() {
        return Ok(Deletion::AlreadyDeleted);
    }
    sqlx::query(
        "WITH current_token AS (
             INSERT INTO revocations (token_fingerprint, tenant_id, container, generation, jti,
                                      token_ciphertext, key_id, reason, correlation_id, due_at,
                                      next_attempt_at, issued_by)
             SELECT token_fingerprint, tenant_id, container, generation, jti, token_ciphertext,
                    key_id, 'deleted', $2, now(), now(), issued_by
               FROM tenants WHERE tenant_id = $1 AND token_ciphertext IS NOT NULL
             ON CONFLICT (token_fingerprint) DO NOTHING
         ), superseded AS (
             UPDATE revocations SET reason = 'deleted', correlation_id = $2, due_at = now(),
                                    next_attempt_at = now()
              WHERE tenant_id = $1 AND revoked_at IS NULL
         )
         UPDATE tenants SET token_ciphertext = NULL, key_id = NULL, token_fingerprint = NULL,
                            jti = NULL, issued_at = NULL, issued_by = NULL, deleted_at = now(),
                            deleted_by = $2
          WHERE tenant_id = $1",
    )
    .bind(tenant_id)
    .bind(request_id)
    .execute(tx)
    .await?;
    Ok(Deletion::Deleted)
}
