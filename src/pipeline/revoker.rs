//! The revoker: works off the revocation queue of [`crate::store::revocations`] in the
//! background of every worker process, beside the consumer.
//!
//! Each pass (every second): queue orphans older than `ORPHAN_GRACE` (every 30 s), claim the
//! due revocations, call the issuer for each (sharing `ISSUER_CONCURRENCY` with issue calls),
//! record the results, then publish one confirmed `tenant.token.revoked` per revoked token
//! whose event is not out yet. A failed call is retried with backoff on a later pass, in this
//! process or another, across restarts: nothing is dropped or dead-lettered. While the breaker
//! is open (401/403), only one revocation at a time is tried, as the breaker's probe.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use lapin::BasicProperties;
use tokio_util::sync::CancellationToken;

use crate::broker::publisher::Publisher;
use crate::broker::topology;
use crate::crypto::TokenCipher;
use crate::domain::{RevokedEvent, rfc3339};
use crate::issuer::{IssuerClient, IssuerError};
use crate::ops::health::Health;
use crate::store::revocations::{self, Due, Unpublished};
use crate::store::{Store, StoreError};
use crate::telemetry::metric;

/// Time between passes.
const PASS: Duration = Duration::from_secs(1);
/// Time between orphan sweeps (at most; `ORPHAN_GRACE` / 4 when that is shorter).
const SWEEP: Duration = Duration::from_secs(30);
/// Revocations claimed in one pass.
const BATCH: i64 = 32;

/// What the revoker needs; cheap to clone.
#[derive(Clone)]
pub(crate) struct Revoker {
    pub(crate) store: Store,
    pub(crate) issuer: IssuerClient,
    pub(crate) cipher: Arc<TokenCipher>,
    pub(crate) health: Arc<Health>,
    pub(crate) orphan_grace: Duration,
}

impl Revoker {
    /// Runs passes until `stop` (the end of the broker session, or shutdown): events need
    /// the session's publisher, so a new session starts a new revoker.
    pub(crate) async fn run(self, publisher: Publisher, stop: CancellationToken) {
        let sweep_every = SWEEP.min(self.orphan_grace / 4).max(PASS);
        let mut last_sweep: Option<Instant> = None;
        loop {
            if last_sweep.is_none_or(|t| t.elapsed() >= sweep_every) {
                last_sweep = Some(Instant::now());
                self.sweep_orphans().await;
            }
            if let Err(e) = self.pass(&publisher).await {
                tracing::warn!(error = %e, "revocation pass failed; will retry");
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(PASS) => {}
            }
        }
    }

    async fn sweep_orphans(&self) {
        match revocations::sweep_orphans(self.store.pool(), self.orphan_grace).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                orphans = n,
                "tokens issued but never stored are due for revocation"
            ),
            Err(e) => tracing::warn!(error = %e, "sweeping orphaned tokens failed"),
        }
    }

    /// One pass: revoke what is due, publish what was revoked, report what is pending.
    async fn pass(&self, publisher: &Publisher) -> Result<(), StoreError> {
        self.revoke_due().await?;
        self.publish_revoked(publisher).await?;
        let pending = revocations::pending(self.store.pool()).await?;
        metrics::gauge!(metric::REVOCATIONS_PENDING).set(pending as f64);
        Ok(())
    }

    /// Claims due revocations (row locks held across the calls) and records each result.
    async fn revoke_due(&self) -> Result<(), StoreError> {
        let breaker = &self.health.breaker;
        let probe = if breaker.is_open() {
            match breaker.try_probe() {
                Some(guard) => Some(guard),
                None => return Ok(()),
            }
        } else {
            None
        };
        let limit = if probe.is_some() { 1 } else { BATCH };
        let mut conn = self.store.pool().acquire().await?;
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let due = revocations::claim_due(&mut tx, limit).await?;
        if due.is_empty() {
            return Ok(());
        }
        let results = join_all(due.iter().map(|d| self.revoke_one(d))).await;
        let mut revoked = Vec::new();
        for (d, result) in due.iter().zip(results) {
            match result {
                Ok(()) => revoked.push(d),
                Err(e) => {
                    // A refused master token is the breaker's business, not the token's: try
                    // again as soon as the breaker lets a probe through.
                    let retry_in = if let IssuerError::Unauthorized { status } = e {
                        breaker.trip(&format!("issuer answered HTTP {status} to a revoke call"));
                        PASS
                    } else {
                        backoff(d.attempts)
                    };
                    tracing::warn!(fingerprint = %d.fingerprint, reason = %d.reason, error = %e, ?retry_in, "revocation failed; will retry");
                    revocations::mark_failed(&mut tx, &d.fingerprint, &e.to_string(), retry_in)
                        .await?;
                }
            }
        }
        let fingerprints: Vec<&str> = revoked.iter().map(|d| d.fingerprint.as_str()).collect();
        revocations::mark_revoked(&mut tx, &fingerprints).await?;
        tx.commit().await?;
        for d in &revoked {
            metrics::counter!(metric::REVOCATIONS, "reason" => d.reason.clone()).increment(1);
            tracing::info!(fingerprint = %d.fingerprint, reason = %d.reason, "token revoked");
        }
        if !revoked.is_empty() && probe.is_some() {
            breaker.record_success();
        }
        Ok(())
    }

    async fn revoke_one(&self, d: &Due) -> Result<(), IssuerError> {
        let tenant = crate::domain::TenantId::parse(&d.tenant_id).map_err(|e| transient(&e))?;
        let token = self
            .cipher
            .open(&tenant, &d.sealed)
            .map_err(|e| transient(&e.to_string()))?;
        self.issuer.revoke(&token).await
    }

    /// Publishes the events of revoked tokens (confirmed), then records them as published.
    async fn publish_revoked(&self, publisher: &Publisher) -> Result<(), StoreError> {
        let mut conn = self.store.pool().acquire().await?;
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let batch = revocations::claim_unpublished(&mut tx, 64).await?;
        if batch.is_empty() {
            return Ok(());
        }
        let sent = join_all(batch.iter().map(|u| publish_one(publisher, u))).await;
        let confirmed: Vec<&str> = batch
            .iter()
            .zip(sent)
            .filter_map(|(u, ok)| ok.then_some(u.fingerprint.as_str()))
            .collect();
        revocations::mark_published(&mut tx, &confirmed).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// The `tenant.token.revoked` event of a revocation (contract §10).
fn revoked_event(u: &Unpublished) -> RevokedEvent {
    RevokedEvent {
        event_id: RevokedEvent::event_id_for(&u.fingerprint),
        tenant_id: u.tenant_id.clone(),
        container: u.container.clone(),
        token_fingerprint: u.fingerprint.clone(),
        jti: u.jti.clone(),
        generation: u32::try_from(u.generation).unwrap_or(1),
        reason: u.reason.clone(),
        revoked_at: rfc3339(u.revoked_at),
        correlation_id: u.correlation_id.clone(),
    }
}

/// Publishes one revoked event and waits for its confirm; `false` when it did not take.
async fn publish_one(publisher: &Publisher, u: &Unpublished) -> bool {
    let event = revoked_event(u);
    let body = match serde_json::to_vec(&event) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a revoked event");
            return false;
        }
    };
    let mut props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(event.event_id.to_string().into())
        .with_app_id("tenant-tokens".into())
        .with_type(topology::TOKEN_REVOKED.into())
        .with_timestamp(time::OffsetDateTime::now_utc().unix_timestamp().max(0) as u64);
    if let Some(c) = &event.correlation_id {
        props = props.with_correlation_id(c.as_str().into());
    }
    let published = publisher
        .publish(
            topology::EVENTS_EXCHANGE,
            topology::TOKEN_REVOKED,
            &body,
            props,
            false,
        )
        .await;
    if let Err(e) = &published {
        tracing::warn!(error = %e, "publishing a revoked event failed; will retry");
    }
    published.is_ok()
}

/// Backoff after `attempts` earlier failures: 1 s doubling to 5 minutes.
fn backoff(attempts: i32) -> Duration {
    let exp = u32::try_from(attempts.clamp(0, 9)).unwrap_or(9);
    Duration::from_secs(2u64.pow(exp)).min(Duration::from_secs(300))
}

fn transient(message: &str) -> IssuerError {
    IssuerError::Transient {
        message: message.to_owned(),
        status: None,
        retry_after: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_revocations_back_off_to_five_minutes() {
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(8));
        assert_eq!(backoff(40), Duration::from_secs(300));
    }
}
