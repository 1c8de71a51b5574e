//! Every stored ciphertext, wherever it lives, for `tenant-tokens rekey`: the tenants' current
//! tokens, the superseded tokens waiting for revocation, and the journal of issued tokens.
//!
//! Rekeying works in short transactions beside running workers. A batch is claimed with
//! `FOR UPDATE SKIP LOCKED` in primary-key order after the last key seen (keyset pagination:
//! each row is read once per pass), so it never waits for a row a worker holds (a claim, a
//! rotation, a revoke call) and a worker waits for a rekeyed row only until the batch commits.
//! A row is rewritten only if it still holds the ciphertext that was read (the lock guarantees
//! it; the statement checks it anyway), and only its ciphertext and key id change.

use sqlx::{PgConnection, PgPool, Row as _};

use super::StoreError;
use crate::crypto::Sealed;

/// A table that holds sealed tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Holder {
    /// `tenants`: each tenant's current token.
    Tenants,
    /// `revocations`: superseded, deleted and orphaned tokens not yet revoked.
    Revocations,
    /// `issued_tokens`: tokens issued but not yet stored (the journal).
    Journal,
}

impl Holder {
    /// Every holder, in the order `rekey` walks them.
    pub(crate) const ALL: [Holder; 3] = [Self::Tenants, Self::Revocations, Self::Journal];

    /// How operators call it.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Tenants => "current",
            Self::Revocations => "superseded",
            Self::Journal => "journal",
        }
    }

    /// A primary key (as text) below every row's: where a pass starts.
    pub(crate) fn before_all(self) -> &'static str {
        match self {
            Self::Tenants | Self::Revocations => "",
            Self::Journal => "0",
        }
    }

    fn table(self) -> &'static str {
        match self {
            Self::Tenants => "tenants",
            Self::Revocations => "revocations",
            Self::Journal => "issued_tokens",
        }
    }

    /// The primary key column and the cast that turns its text form back into it.
    fn key(self) -> (&'static str, &'static str) {
        match self {
            Self::Tenants => ("tenant_id", "text"),
            Self::Revocations => ("token_fingerprint", "text"),
            Self::Journal => ("id", "bigint"),
        }
    }
}

/// One stored ciphertext, claimed by the caller's transaction.
#[derive(Debug)]
pub(crate) struct SealedRow {
    /// The row's primary key, as text.
    pub key: String,
    /// The tenant (the ciphertext's associated data).
    pub tenant_id: String,
    /// The stored fingerprint of the token.
    pub fingerprint: String,
    /// The ciphertext and the id of its key.
    pub sealed: Sealed,
}

/// What a batch asks for: rows sealed with one of `keys` (the configured keys other than the
/// current one), after `after` in key order, except `skip` (rows that failed before).
pub(crate) struct Claim<'a> {
    /// The table.
    pub holder: Holder,
    /// Key ids to take.
    pub keys: &'a [String],
    /// The last primary key of the previous batch of this pass ([`Holder::before_all`] for
    /// the first).
    pub after: &'a str,
    /// Primary keys to leave alone.
    pub skip: &'a [String],
    /// Batch size.
    pub limit: i64,
}

/// Claims the next batch (row locks held until the caller's transaction ends), skipping rows
/// that another transaction holds.
pub(crate) async fn claim(
    tx: &mut PgConnection,
    c: &Claim<'_>,
) -> Result<Vec<SealedRow>, StoreError> {
    let (key, cast) = c.holder.key();
    let sql = format!(
        "SELECT {key}::text, tenant_id, token_fingerprint, token_ciphertext, key_id
           FROM {table}
          WHERE token_ciphertext IS NOT NULL AND key_id = ANY($1)
            AND {key} > $2::{cast}
            AND {key}::text <> ALL($3)
          ORDER BY {key}
          LIMIT $4
            FOR UPDATE SKIP LOCKED",
        table = c.holder.table()
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(c.keys)
        .bind(c.after)
        .bind(c.skip)
        .bind(c.limit)
        .fetch_all(tx)
        .await?;
    rows.iter()
        .map(|r| {
            Ok(SealedRow {
                key: r.try_get(0)?,
                tenant_id: r.try_get(1)?,
                fingerprint: r.try_get(2)?,
                sealed: Sealed {
                    blob: r.try_get(3)?,
                    key_id: r.try_get(4)?,
                },
            })
        })
        .collect()
}

/// Replaces the ciphertexts of claimed rows, each only where it still holds the one read;
/// returns how many rows changed.
pub(crate) async fn replace(
    tx: &mut PgConnection,
    holder: Holder,
    rows: &[(&SealedRow, Sealed)],
) -> Result<u64, StoreError> {
    if rows.is_empty() {
        return Ok(0);
    }
    let (key, cast) = holder.key();
    let sql = format!(
        "UPDATE {table} t SET token_ciphertext = u.blob, key_id = u.key_id
           FROM unnest($1::text[], $2::bytea[], $3::text[], $4::bytea[])
                AS u(pk, old_blob, key_id, blob)
          WHERE t.{key} = u.pk::{cast} AND t.token_ciphertext = u.old_blob",
        table = holder.table()
    );
    let pks: Vec<&str> = rows.iter().map(|(r, _)| r.key.as_str()).collect();
    let old: Vec<&[u8]> = rows.iter().map(|(r, _)| r.sealed.blob.as_slice()).collect();
    let ids: Vec<&str> = rows.iter().map(|(_, s)| s.key_id.as_str()).collect();
    let new: Vec<&[u8]> = rows.iter().map(|(_, s)| s.blob.as_slice()).collect();
    let done = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&pks)
        .bind(&old)
        .bind(&ids)
        .bind(&new)
        .execute(tx)
        .await?;
    Ok(done.rows_affected())
}

/// Stored ciphertexts not sealed with `current`, by holder and key id (no lock: a census).
pub(crate) async fn census(
    pool: &PgPool,
    current: &str,
) -> Result<Vec<(Holder, String, i64)>, StoreError> {
    let mut out = Vec::new();
    for holder in Holder::ALL {
        let sql = format!(
            "SELECT key_id, count(*) FROM {} WHERE token_ciphertext IS NOT NULL
                AND key_id <> $1 GROUP BY key_id ORDER BY key_id",
            holder.table()
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(current)
            .fetch_all(pool)
            .await?;
        for r in rows {
            out.push((holder, r.try_get(0)?, r.try_get(1)?));
        }
    }
    Ok(out)
}
