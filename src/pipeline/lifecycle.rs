//! Rotation and deletion requests (contract §10): one transaction each, on the tenant's locked
//! row (see [`crate::store::lifecycle`]). They are rare, so clarity wins over round trips.
//!
//! A rotation issues generation n+1 with an `Idempotency-Key` of tenant, container and n+1,
//! journals it (sealed, in case the commit never comes), stores it as current, queues
//! generation n for revocation after `ROTATION_GRACE` (at once with `now`), and stores the
//! rotate request as the issuer of generation n+1 in the same commit: a redelivery finds that
//! it issued a token, reports it (`newly_issued`, `rotated`) and rotates nothing more.

use std::collections::HashMap;
use std::time::Duration;

use super::provision::{Outcome, ProvisionError, Provisioner, ready_event};
use crate::domain::{ContainerName, ProvisionRequest, TenantToken};
use crate::issuer::IssuerError;
use crate::store::lifecycle::{self, Deletion, Rotation};
use crate::store::{self, NewToken, StoredToken, TenantRow};
use crate::telemetry::metric;

impl Provisioner {
    /// Rotates the tenant's token; a tenant without one is provisioned as `tenant.created`
    /// would be.
    pub(super) async fn rotate(&self, r: &ProvisionRequest) -> Result<Outcome, ProvisionError> {
        let rotated = {
            let mut conn = self.store.pool().acquire().await?;
            self.rotate_on(&mut conn, r).await?
        };
        match rotated {
            Some(outcome) => Ok(outcome),
            None => self.provision_first(r).await,
        }
    }

    /// The rotation on one connection; `None` when the tenant has no token to rotate.
    async fn rotate_on(
        &self,
        conn: &mut sqlx::PgConnection,
        r: &ProvisionRequest,
    ) -> Result<Option<Outcome>, ProvisionError> {
        let id = r.identity.as_str();
        if let Some(event) = self.rotated_before(conn, r).await? {
            return Ok(Some(event));
        }
        let mut tx = sqlx::Connection::begin(conn).await?;
        let locked = lifecycle::lock_tenant(&mut tx, r.tenant_id.as_str(), id).await?;
        let Some((row, now)) =
            locked.filter(|(row, _)| row.token.is_some() || row.deleted_at.is_some())
        else {
            return Ok(None);
        };
        if let Some(deleted_at) = row.deleted_at {
            return Ok(Some(Outcome::Gone { deleted_at }));
        }
        // Another worker may have rotated for this very request while this one waited.
        if let Some(outcome) = self.issued_event(r, &row) {
            return Ok(Some(outcome));
        }
        let (token, new, next) = match self.issue_next(r, &row, now).await? {
            Ok(issued) => issued,
            Err(e) => return Ok(Some(Outcome::Failed(e))),
        };
        let generation = next.generation;
        let stored = next
            .token
            .as_ref()
            .ok_or_else(|| ProvisionError::Invariant("a rotated tenant has no token".into()))?;
        let mut event = ready_event(r, &next, stored);
        let grace = if r.rotate_now {
            Duration::ZERO
        } else {
            self.rotation_grace
        };
        let rotation = Rotation {
            current: &row,
            new: &new,
            grace,
        };
        lifecycle::rotate(&mut tx, &rotation).await?;
        tx.commit().await?;
        metrics::counter!(metric::TOKENS_ISSUED).increment(1);
        tracing::info!(
            id,
            generation,
            reason = r.reason.as_deref(),
            ?grace,
            "token rotated"
        );
        if self.include_token {
            event.token = Some(token.expose().to_owned());
        }
        Ok(Some(Outcome::Ready(Box::new(event))))
    }

    /// Issues generation n+1 and journals it (sealed): the token, what to store, and the row
    /// as it will be once stored at `now`. The inner `Err` is the issuer's refusal.
    async fn issue_next(
        &self,
        r: &ProvisionRequest,
        row: &TenantRow,
        now: time::OffsetDateTime,
    ) -> Result<Result<(TenantToken, NewToken, TenantRow), IssuerError>, ProvisionError> {
        let generation = row.generation.saturating_add(1);
        let container = ContainerName::from_stored(row.container.clone());
        let token = match self
            .issuer
            .issue(&r.tenant_id, &container, generation)
            .await
        {
            Ok(token) => token,
            Err(e) => return Ok(Err(e)),
        };
        let new = NewToken {
            tenant_id: row.tenant_id.clone(),
            sealed: self.cipher.seal(&r.tenant_id, &token),
            fingerprint: token.fingerprint().as_str().to_owned(),
            jti: token.jti(),
            issued_by: r.identity.as_str().to_owned(),
        };
        let next = next_generation(row, &new, now);
        let journaled = HashMap::from([(next.tenant_id.clone(), next.clone())]);
        self.journal(std::slice::from_ref(&new), &journaled).await?;
        Ok(Ok((token, new, next)))
    }

    /// Deletes the tenant: a tombstone, and every token not yet revoked due at once.
    pub(super) async fn delete(&self, r: &ProvisionRequest) -> Result<Outcome, ProvisionError> {
        let mut conn = self.store.pool().acquire().await?;
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let container = self.naming.name(&r.tenant_id, r.tenant_name.as_ref());
        let id = r.identity.as_str();
        let done = lifecycle::delete(&mut tx, r.tenant_id.as_str(), container.as_str(), id).await?;
        tx.commit().await?;
        if done == Deletion::Deleted {
            tracing::info!("tenant deleted; its tokens are due for revocation");
        }
        Ok(Outcome::Deleted)
    }

    /// A rotation of a tenant that has no token yet: the batch path, alone.
    async fn provision_first(&self, r: &ProvisionRequest) -> Result<Outcome, ProvisionError> {
        self.provision_batch(std::slice::from_ref(r))
            .await?
            .pop()
            .ok_or_else(|| ProvisionError::Invariant("no outcome for a rotation".into()))
    }

    /// The event of a rotate request that was handled before (it issued one of the tenant's
    /// tokens), with the token under `EVENT_INCLUDE_TOKEN`; `None` when it was not, or the
    /// tenant has no token.
    async fn rotated_before(
        &self,
        conn: &mut sqlx::PgConnection,
        r: &ProvisionRequest,
    ) -> Result<Option<Outcome>, ProvisionError> {
        let tenant = r.tenant_id.as_str().to_owned();
        let id = r.identity.as_str().to_owned();
        let (tenants, ids) = (std::slice::from_ref(&tenant), std::slice::from_ref(&id));
        let rows = store::lookup(conn, tenants, ids, self.include_token).await?;
        Ok(rows.get(&tenant).and_then(|row| self.issued_event(r, row)))
    }

    /// The event of request `r` if it issued one of the tenant's tokens, which is still
    /// held (with the token under `EVENT_INCLUDE_TOKEN`).
    fn issued_event(&self, r: &ProvisionRequest, row: &TenantRow) -> Option<Outcome> {
        let (Some(token), None, Some(_)) = (
            row.token.as_ref(),
            row.deleted_at,
            row.generation_issued_by(r.identity.as_str()),
        ) else {
            return None;
        };
        let mut event = ready_event(r, row, token);
        if self.include_token {
            match self.open(r, Some(row)) {
                Ok(t) => event.token = t.map(|t| t.expose().to_owned()),
                Err(e) => return Some(Outcome::Undecryptable(e)),
            }
        }
        Some(Outcome::Ready(Box::new(event)))
    }
}

/// The tenant's row as it will be once generation n+1 is stored at `now`.
fn next_generation(row: &TenantRow, new: &NewToken, now: time::OffsetDateTime) -> TenantRow {
    TenantRow {
        generation: row.generation.saturating_add(1),
        token: Some(StoredToken {
            fingerprint: new.fingerprint.clone(),
            issued_at: now,
            jti: new.jti.clone(),
            sealed: None,
        }),
        issued_by: Some(new.issued_by.clone()),
        past_issuers: row
            .issued_by
            .iter()
            .map(|by| (by.clone(), row.generation))
            .chain(row.past_issuers.iter().cloned())
            .collect(),
        ..row.clone()
    }
}
