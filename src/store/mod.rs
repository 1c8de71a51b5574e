//! The Postgres store: tenants with their (encrypted) tokens, each with the identity of the
//! request that issued it. Nothing is written per handled request: a request's ready event
//! follows from its identity and the tenant's row (see [`TenantRow::generation_issued_by`]),
//! so the database grows with tenants and tokens, never with traffic.
//!
//! # How a tenant gets exactly one token
//!
//! A token is written once and never changed, so a committed token can be read without a
//! lock ([`lookup`]). A tenant without one is *claimed* by [`claim`]: an upsert of its
//! row that takes the row lock and keeps it until the transaction ends. The transaction then
//! calls the issuer, stores the token ([`store_tokens`]) and commits. A second worker (another
//! process, or a duplicate in flight) that claims the same tenant blocks on the row lock until
//! the first commits, then finds the token and calls no issuer. If the first dies, Postgres
//! ends its transaction and releases the lock, and the waiter issues instead (with the same
//! `Idempotency-Key`, so a well-behaved issuer hands back the same token). Claims of a batch
//! are taken in tenant-id order so two batches cannot deadlock on each other; a deadlock
//! reported anyway is a retryable error.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::MigrateDatabase as _;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions as _, PgConnection, PgPool, Postgres, Row as _};
use time::OffsetDateTime;

use crate::crypto::Sealed;

/// The columns of a tenant's row (table alias `t`) that [`row_from`] reads, in its order: the
/// ciphertext only when the parameter `$cipher` (a boolean) is true, and the requests among the
/// parameter `$requests` (a `text[]`) that issued one of its superseded or revoked tokens,
/// with their generations. A literal, so that queries stay `&'static str`.
macro_rules! tenant_columns {
    ($cipher:literal, $requests:literal) => {
        concat!(
            "t.tenant_id, t.container, t.token_fingerprint, t.issued_at, t.jti, ",
            "CASE WHEN ",
            $cipher,
            " THEN t.token_ciphertext END, t.key_id, t.generation, ",
            "t.deleted_at, t.issued_by, ",
            "ARRAY(SELECT v.issued_by FROM revocations v WHERE v.tenant_id = t.tenant_id ",
            "AND v.issued_by = ANY(",
            $requests,
            "::text[]) ORDER BY v.generation), ",
            "ARRAY(SELECT v.generation FROM revocations v WHERE v.tenant_id = t.tenant_id ",
            "AND v.issued_by = ANY(",
            $requests,
            "::text[]) ORDER BY v.generation)"
        )
    };
}

pub(crate) mod lifecycle;
pub(crate) mod revocations;
mod schema;
pub(crate) mod sealed;

/// A Postgres failure. [`StoreError::is_retryable`] tells a database that is unavailable or
/// busy (try again, nothing is wrong with the messages) from one that refuses what it was given
/// (retrying the same statement cannot help).
#[derive(Debug, thiserror::Error)]
#[error("database: {0}")]
pub struct StoreError(#[from] sqlx::Error);

impl StoreError {
    /// Whether the same statements may succeed later: connection and pool failures, I/O,
    /// timeouts, and the SQLSTATE classes of a busy or restarting server (`08` connection, `40`
    /// serialization failure and deadlock, `53` insufficient resources, `57` operator
    /// intervention, `58` system error). Data exceptions (`22`, e.g. a NUL in `text`),
    /// integrity violations (`23`) and undecodable values are not: they follow the data.
    pub fn is_retryable(&self) -> bool {
        match &self.0 {
            sqlx::Error::Database(e) => {
                let code = e.code();
                let class = code.as_deref().map_or("", |c| c.get(..2).unwrap_or(""));
                !matches!(class, "22" | "23")
            }
            sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::Decode(_)
            | sqlx::Error::Encode(_)
            | sqlx::Error::ColumnNotFound(_)
            | sqlx::Error::ColumnIndexOutOfBounds { .. }
            | sqlx::Error::TypeNotFound { .. }
            | sqlx::Error::RowNotFound => false,
            _ => true,
        }
    }
}

/// The pool size for `batches` batches in flight: one connection each, which a batch holds
/// from its first read to its commit, plus one for the short statements that run beside them
/// (the journal of issued tokens, committed on its own while a batch's transaction is open,
/// and the revoker). No batch can wait on another for a connection: at most `batches` hold one.
pub(crate) fn pool_size_for(batches: u32) -> u32 {
    batches.max(1) + 1
}

/// Pool and migrations.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
}

/// A tenant's row as the engine needs it.
#[derive(Debug, Clone)]
pub(crate) struct TenantRow {
    /// The tenant.
    pub tenant_id: String,
    /// Its container, fixed once stored.
    pub container: String,
    /// Set once the token is stored; erased when the tenant is deleted.
    pub token: Option<StoredToken>,
    /// The current token's generation (1 for the first).
    pub generation: u32,
    /// Set when the tenant was deleted: the row is a tombstone.
    pub deleted_at: Option<OffsetDateTime>,
    /// The identity of the request that issued the current token.
    pub issued_by: Option<String>,
    /// Requests (of those asked about) that issued a superseded or revoked token, with the
    /// generation each issued.
    pub past_issuers: Vec<(String, u32)>,
}

impl TenantRow {
    /// The generation that request `id` issued, if it issued one of the tenant's tokens: its
    /// event says `newly_issued` (contract §7), on every redelivery.
    pub(crate) fn generation_issued_by(&self, id: &str) -> Option<u32> {
        if self.issued_by.as_deref() == Some(id) {
            return Some(self.generation);
        }
        self.past_issuers
            .iter()
            .find(|(by, _)| by == id)
            .map(|&(_, generation)| generation)
    }
}

/// What is stored of a token.
#[derive(Debug, Clone)]
pub(crate) struct StoredToken {
    /// Public fingerprint.
    pub fingerprint: String,
    /// When it was stored.
    pub issued_at: OffsetDateTime,
    /// The `jti` claim, when the token had one.
    pub jti: Option<String>,
    /// The ciphertext, when it was asked for.
    pub sealed: Option<Sealed>,
}

/// A token to store for a claimed tenant.
pub(crate) struct NewToken {
    /// The tenant.
    pub tenant_id: String,
    /// The encrypted token.
    pub sealed: Sealed,
    /// Its fingerprint.
    pub fingerprint: String,
    /// Its `jti`.
    pub jti: Option<String>,
    /// The identity of the request that issued it.
    pub issued_by: String,
}

impl Store {
    /// Connects, creating the database only if it does not exist (so a role without
    /// `CREATEDB` connects to an existing one). Does not migrate.
    pub async fn connect(url: &str, pool_size: u32) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)?
            .application_name("tenant-tokens")
            .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1))
            .log_statements(tracing::log::LevelFilter::Trace);
        let pool_options = PgPoolOptions::new()
            .max_connections(pool_size.max(1))
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(10));
        match pool_options.clone().connect_with(options.clone()).await {
            // invalid_catalog_name: the database does not exist.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => {}
            connected => return Ok(Self { pool: connected? }),
        }
        match Postgres::create_database(url).await {
            Ok(()) => tracing::info!("created the database"),
            // Another replica created it first.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => return Err(e.into()),
        }
        let pool = pool_options.connect_with(options).await?;
        Ok(Self { pool })
    }

    /// Applies the SQL files of `migrations/` (under an advisory lock, safe with replicas).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        schema::MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|e| StoreError(e.into()))
    }

    /// Applies the migrations only if some are pending; returns how many were. `run` calls
    /// this at start-up: on an up-to-date database it reads `_sqlx_migrations` and changes
    /// nothing, so a runtime role without DDL rights can start the worker.
    pub async fn migrate_if_pending(&self) -> Result<usize, StoreError> {
        let pending = schema::pending(&self.pool).await?;
        if pending > 0 {
            tracing::info!(pending, "applying database migrations");
            self.migrate().await?;
        }
        Ok(pending)
    }

    /// The pool, for transactions.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A tenant's row with its ciphertext (`token show`).
    pub(crate) async fn tenant(&self, tenant_id: &str) -> Result<Option<TenantRow>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            tenant_columns!("true", "NULL"),
            " FROM tenants t WHERE t.tenant_id = $1"
        ))
        .bind(tenant_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(row_from).transpose()?)
    }
}

/// An issued token as journaled (fingerprint and `jti` only, never the token).
pub(crate) struct IssuedToken {
    /// The tenant.
    pub tenant_id: String,
    /// Its container.
    pub container: String,
    /// The token's fingerprint.
    pub fingerprint: String,
    /// The token's `jti`, when it has one.
    pub jti: Option<String>,
    /// The generation it was issued as.
    pub generation: u32,
    /// The token, encrypted: kept until the token is stored or revoked as an orphan.
    pub sealed: Option<Sealed>,
}

/// Journals issued tokens in a transaction of their own, before the main transaction stores
/// them, so a token whose storing never commits can still be found and revoked
/// (`orphaned_tokens`). Asynchronous commit: this guards against the worker dying, and costs
/// no extra disk flush.
pub(crate) async fn journal_issued(
    pool: &PgPool,
    tokens: &[IssuedToken],
) -> Result<(), StoreError> {
    if tokens.is_empty() {
        return Ok(());
    }
    // One statement, its own implicit transaction; set_config(.., true) scopes the
    // asynchronous commit to it.
    sqlx::query(
        "WITH async_commit AS (SELECT set_config('synchronous_commit', 'off', true))
         INSERT INTO issued_tokens
                (tenant_id, container, token_fingerprint, jti, generation, token_ciphertext, key_id)
         SELECT u.* FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[],
                                $6::bytea[], $7::text[]) AS u, async_commit",
    )
    .bind(
        tokens
            .iter()
            .map(|t| t.tenant_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        tokens
            .iter()
            .map(|t| t.container.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        tokens
            .iter()
            .map(|t| t.fingerprint.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(tokens.iter().map(|t| t.jti.as_deref()).collect::<Vec<_>>())
    .bind(
        tokens
            .iter()
            .map(|t| generation_i32(t.generation))
            .collect::<Vec<_>>(),
    )
    .bind(
        tokens
            .iter()
            .map(|t| t.sealed.as_ref().map(|s| s.blob.as_slice()))
            .collect::<Vec<_>>(),
    )
    .bind(
        tokens
            .iter()
            .map(|t| t.sealed.as_ref().map(|s| s.key_id.as_str()))
            .collect::<Vec<_>>(),
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// A generation as Postgres `integer`.
pub(crate) fn generation_i32(g: u32) -> i32 {
    i32::try_from(g).unwrap_or(i32::MAX)
}

/// An issued token that never became a tenant's stored token, with its revocation's state.
#[derive(Debug, Clone)]
pub(crate) struct Orphan {
    /// The tenant it was issued for.
    pub tenant_id: String,
    /// Its container.
    pub container: String,
    /// The token's fingerprint.
    pub fingerprint: String,
    /// The token's `jti`, when it had one.
    pub jti: Option<String>,
    /// When the issuer handed it out.
    pub issued_at: OffsetDateTime,
    /// When its revocation became due (none yet: younger than `ORPHAN_GRACE`).
    pub revocation_due_at: Option<OffsetDateTime>,
    /// When the issuer confirmed the revocation.
    pub revoked_at: Option<OffsetDateTime>,
    /// Failed revoke calls so far.
    pub revocation_attempts: i32,
}

/// Issued tokens that never became a tenant's stored token, oldest first.
pub(crate) async fn orphaned_tokens(pool: &PgPool) -> Result<Vec<Orphan>, StoreError> {
    let rows = sqlx::query(
        "SELECT tenant_id, container, token_fingerprint, jti, issued_at, revocation_due_at,
                revoked_at, coalesce(revocation_attempts, 0)
           FROM orphaned_tokens ORDER BY issued_at",
    )
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Orphan {
                tenant_id: r.try_get(0)?,
                container: r.try_get(1)?,
                fingerprint: r.try_get(2)?,
                jti: r.try_get(3)?,
                issued_at: r.try_get(4)?,
                revocation_due_at: r.try_get(5)?,
                revoked_at: r.try_get(6)?,
                revocation_attempts: r.try_get(7)?,
            })
        })
        .collect()
}

/// One read for a batch: the tenants among `tenant_ids` whose token is committed, or that are
/// tombstones, each with the generations that requests among `request_ids` issued. No lock: a
/// committed token changes only under a rotation, whose requests take the row lock.
pub(crate) async fn lookup(
    conn: &mut PgConnection,
    tenant_ids: &[String],
    request_ids: &[String],
    with_ciphertext: bool,
) -> Result<HashMap<String, TenantRow>, StoreError> {
    let rows = sqlx::query(concat!(
        "SELECT ",
        tenant_columns!("$2", "$3"),
        " FROM tenants t
          WHERE t.tenant_id = ANY($1) AND (t.issued_at IS NOT NULL OR t.deleted_at IS NOT NULL)"
    ))
    .bind(tenant_ids)
    .bind(with_ciphertext)
    .bind(request_ids)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| row_from(r).map(|row| (row.tenant_id.clone(), row)))
        .collect::<Result<_, _>>()
        .map_err(StoreError::from)
}

fn row_from(r: &sqlx::postgres::PgRow) -> Result<TenantRow, sqlx::Error> {
    let fingerprint: Option<String> = r.try_get(2)?;
    let issued_at: Option<OffsetDateTime> = r.try_get(3)?;
    let blob: Option<Vec<u8>> = r.try_get(5)?;
    let key_id: Option<String> = r.try_get(6)?;
    let token = match (fingerprint, issued_at) {
        (Some(fingerprint), Some(issued_at)) => Some(StoredToken {
            fingerprint,
            issued_at,
            jti: r.try_get(4)?,
            sealed: blob
                .zip(key_id)
                .map(|(blob, key_id)| Sealed { key_id, blob }),
        }),
        _ => None,
    };
    let generation: i32 = r.try_get(7)?;
    let past_by: Vec<String> = r.try_get(10)?;
    let past_generations: Vec<i32> = r.try_get(11)?;
    Ok(TenantRow {
        tenant_id: r.try_get(0)?,
        container: r.try_get(1)?,
        token,
        generation: generation_u32(generation),
        deleted_at: r.try_get(8)?,
        issued_by: r.try_get(9)?,
        past_issuers: past_by
            .into_iter()
            .zip(past_generations.into_iter().map(generation_u32))
            .collect(),
    })
}

/// A stored generation (never below 1).
fn generation_u32(g: i32) -> u32 {
    u32::try_from(g).unwrap_or(1).max(1)
}

/// Claims tenants: inserts missing rows with the proposed container and locks every row until
/// the transaction ends. Returns the rows as stored (an existing container wins; a token that
/// another worker committed meanwhile is returned, and then no issue call is needed), and the
/// transaction's `now()`, which [`store_tokens`] stores as `issued_at`.
pub(crate) async fn claim(
    tx: &mut PgConnection,
    claims: &[(String, String, Option<String>)],
    request_ids: &[String],
    with_ciphertext: bool,
) -> Result<(Vec<TenantRow>, Option<OffsetDateTime>), StoreError> {
    let mut sorted: Vec<&(String, String, Option<String>)> = claims.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let ids: Vec<&str> = sorted.iter().map(|c| c.0.as_str()).collect();
    let containers: Vec<&str> = sorted.iter().map(|c| c.1.as_str()).collect();
    let names: Vec<Option<&str>> = sorted.iter().map(|c| c.2.as_deref()).collect();
    // When two workers claim the same new tenant at once, the loser's insert may fail on the
    // container's unique index, which is not the `ON CONFLICT` arbiter (Postgres checks it
    // without retrying the speculative insertion), after waiting for the winner to commit.
    // Run again in a savepoint, the statement finds the winner's row; a container that another
    // tenant holds fails again, as before.
    let mut retried = false;
    let rows = loop {
        let mut savepoint = sqlx::Connection::begin(&mut *tx).await?;
        let result = sqlx::query(concat!(
            "INSERT INTO tenants AS t (tenant_id, container, tenant_name)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) ORDER BY 1
             ON CONFLICT (tenant_id) DO UPDATE SET tenant_id = EXCLUDED.tenant_id
             RETURNING ",
            tenant_columns!("$4", "$5"),
            ", now()"
        ))
        .bind(&ids)
        .bind(&containers)
        .bind(&names)
        .bind(with_ciphertext)
        .bind(request_ids)
        .fetch_all(&mut *savepoint)
        .await;
        match result {
            Ok(rows) => {
                savepoint.commit().await?;
                break rows;
            }
            Err(sqlx::Error::Database(e))
                if !retried
                    && e.code().as_deref() == Some("23505")
                    && e.constraint() == Some("tenants_container_key") =>
            {
                savepoint.rollback().await?;
                retried = true;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let now = match rows.first() {
        Some(r) => Some(r.try_get(12)?),
        None => None,
    };
    Ok((rows.iter().map(row_from).collect::<Result<_, _>>()?, now))
}

/// In one statement, stores the tokens of claimed tenants (with `issued_at = now()`, the
/// transaction's start time, and the request that issued each) and erases their journal
/// copies. Returns how many tokens were stored.
pub(crate) async fn store_tokens(
    tx: &mut PgConnection,
    tokens: &[NewToken],
) -> Result<usize, StoreError> {
    if tokens.is_empty() {
        return Ok(0);
    }
    let t_ids: Vec<&str> = tokens.iter().map(|t| t.tenant_id.as_str()).collect();
    let blobs: Vec<&[u8]> = tokens.iter().map(|t| t.sealed.blob.as_slice()).collect();
    let keys: Vec<&str> = tokens.iter().map(|t| t.sealed.key_id.as_str()).collect();
    let fps: Vec<&str> = tokens.iter().map(|t| t.fingerprint.as_str()).collect();
    let jtis: Vec<Option<&str>> = tokens.iter().map(|t| t.jti.as_deref()).collect();
    let by: Vec<&str> = tokens.iter().map(|t| t.issued_by.as_str()).collect();
    let stored: i64 = sqlx::query_scalar(
        "WITH stored AS (
             UPDATE tenants t
                SET token_ciphertext = u.blob, key_id = u.key_id, token_fingerprint = u.fp,
                    jti = u.jti, issued_at = now(), issued_by = u.issued_by
               FROM unnest($1::text[], $2::bytea[], $3::text[], $4::text[], $5::text[],
                           $6::text[])
                    AS u(tenant_id, blob, key_id, fp, jti, issued_by)
              WHERE t.tenant_id = u.tenant_id AND t.issued_at IS NULL
                AND t.deleted_at IS NULL
              RETURNING t.tenant_id
         ), unjournaled AS (
             -- A stored token needs no journal copy: erase it in the same transaction.
             UPDATE issued_tokens SET token_ciphertext = NULL, key_id = NULL
              WHERE token_fingerprint = ANY($4) AND token_ciphertext IS NOT NULL
         )
         SELECT count(*) FROM stored",
    )
    .bind(&t_ids)
    .bind(&blobs)
    .bind(&keys)
    .bind(&fps)
    .bind(&jtis)
    .bind(&by)
    .fetch_one(&mut *tx)
    .await?;
    Ok(usize::try_from(stored).unwrap_or(0))
}
