//! Whether the schema is up to date, read without DDL: `run` applies migrations at start-up
//! only when some are pending, so it can run as a role that may not change the schema (see
//! `docs/privileges.md`). Applying them stays the job of `migrate` (and of `run` with a role
//! that may, on a database that needs it).

use std::collections::HashMap;

use sqlx::migrate::Migrator;
use sqlx::{PgPool, Row as _};

use super::StoreError;

/// The migrations of `migrations/`, compiled in.
pub(super) static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// How many of the compiled-in migrations are not applied (successfully, with the same
/// checksum) to the database. Reads `_sqlx_migrations` only; a database without it has every
/// migration pending. A changed or failed migration counts as pending, so that applying them
/// reports the mismatch as `migrate` would.
pub(super) async fn pending(pool: &PgPool) -> Result<usize, StoreError> {
    let rows = match sqlx::query("SELECT version, checksum, success FROM _sqlx_migrations")
        .fetch_all(pool)
        .await
    {
        Ok(rows) => rows,
        // undefined_table: nothing was ever applied.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let mut applied: HashMap<i64, Vec<u8>> = HashMap::new();
    for r in &rows {
        if r.try_get::<bool, _>(2)? {
            applied.insert(r.try_get(0)?, r.try_get(1)?);
        }
    }
    Ok(MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .filter(|m| applied.get(&m.version).map(Vec::as_slice) != Some(&*m.checksum))
        .count())
}
