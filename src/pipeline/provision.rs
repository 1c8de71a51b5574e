//! The provisioning step: a batch of requests in, one outcome per request out.
//!
//! One database transaction serves the whole batch (that is what makes the worker fast):
//!
//! 1. tenants with a committed token are answered from Postgres, no issuer call;
//! 2. the other tenants are claimed (row lock, see [`crate::store`]) and issued a token, all
//!    issue calls of the batch at once; each issued token is journaled at once, outside the
//!    transaction, so one whose storing never commits can be revoked;
//! 3. the tokens (encrypted) are stored with the identity of the request that issued each,
//!    and committed.
//!
//! Nothing is written per request. A request's event follows from its identity and the
//! tenant's row (contract §7): `event_id` from the identity, `newly_issued` from whether this
//! request issued one of the tenant's tokens (stored with the token, in the same commit, so a
//! crash between commit and publish is repaired by the redelivery, which finds it), the rest
//! from the token as stored.
//!
//! Round trips to Postgres per batch: one read when every tenant already has its token (it
//! needs no transaction), and that is all. Otherwise `BEGIN`, the claim, one statement that
//! stores the tokens, and `COMMIT`.
//!
//! Issuer failures are per request (the rest of the batch goes on); a database failure fails
//! the whole batch with a [`ProvisionError`] that says whether retrying may help. The handler
//! retries a retryable one in place, and splits a batch that fails otherwise, so that one
//! poison message cannot hold the others.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use tracing::Instrument as _;

use crate::crypto::{CryptoError, TokenCipher};
use crate::domain::{ContainerName, NamingStrategy, ProvisionRequest, TenantToken, Trigger};
use crate::domain::{ReadyEvent, rfc3339};
use crate::issuer::{IssuerClient, IssuerError};
use crate::store::{self, IssuedToken, NewToken, Store, StoreError, StoredToken, TenantRow};
use crate::telemetry::metric;

/// Why a batch could not be provisioned. Nothing was committed; the messages are untouched.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// Postgres failed; [`StoreError::is_retryable`] says whether it may pass.
    #[error(transparent)]
    Database(#[from] StoreError),
    /// The database did something the engine's invariants exclude.
    #[error("internal: {0}")]
    Invariant(String),
}

impl ProvisionError {
    /// Whether provisioning the same batch again may succeed (the database was unavailable or
    /// busy), as opposed to failing the same way each time.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Database(e) => e.is_retryable(),
            Self::Invariant(_) => false,
        }
    }
}

impl From<sqlx::Error> for ProvisionError {
    fn from(e: sqlx::Error) -> Self {
        Self::Database(StoreError::from(e))
    }
}

/// What became of one request.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The tenant has its token; publish this event, then ack.
    Ready(Box<ReadyEvent>),
    /// The issue call failed; the error says whether to retry, dead-letter or pause.
    Failed(IssuerError),
    /// The tenant was deleted then (contract §10): no token, ever again.
    Gone {
        /// When it was deleted.
        deleted_at: time::OffsetDateTime,
    },
    /// A deletion is done (or was already): its revocations are due; nothing to publish.
    Deleted,
    /// The tenant has its token, but the event must carry it (`EVENT_INCLUDE_TOKEN`) and the
    /// stored ciphertext does not open: its key is not configured (a configuration fault,
    /// fixed by adding the key to `TOKEN_DECRYPTION_KEYS`: the message is retried, then
    /// dead-lettered for replay), or the row is damaged.
    Undecryptable(CryptoError),
}

/// A claim: tenant id, proposed container, tenant name.
type Claim = (String, String, Option<String>);

/// What the steps of one batch share.
struct Batch<'a> {
    reqs: &'a [ProvisionRequest],
    first: &'a HashMap<&'a str, &'a ProvisionRequest>,
    /// The identities of the batch's requests.
    ids: &'a [String],
}

/// Ties store, issuer and cipher together.
#[derive(Clone)]
pub struct Provisioner {
    pub(super) store: Store,
    pub(super) issuer: IssuerClient,
    pub(super) cipher: Arc<TokenCipher>,
    pub(super) naming: NamingStrategy,
    pub(super) include_token: bool,
    pub(super) rotation_grace: Duration,
}

impl Provisioner {
    /// A provisioner; `include_token` puts the token into ready events (`EVENT_INCLUDE_TOKEN`),
    /// `rotation_grace` is how long a superseded token stays valid (`ROTATION_GRACE`).
    pub fn new(
        store: Store,
        issuer: IssuerClient,
        cipher: Arc<TokenCipher>,
        naming: NamingStrategy,
        include_token: bool,
        rotation_grace: Duration,
    ) -> Self {
        Self {
            store,
            issuer,
            cipher,
            naming,
            include_token,
            rotation_grace,
        }
    }

    /// Handles a batch; outcomes are in the order of `reqs`. Provisioning requests share one
    /// transaction; rotations and deletions (rare) get one each. The batch is handled in queue
    /// order: the provisioning requests before a rotation or deletion are handled (together)
    /// before it, those after it after it, so a `tenant.created` queued behind a
    /// `tenant.deleted` finds the tombstone.
    pub async fn provision(
        &self,
        reqs: &[ProvisionRequest],
    ) -> Result<Vec<Outcome>, ProvisionError> {
        let mut outcomes = Vec::with_capacity(reqs.len());
        let mut start = 0;
        for (i, r) in reqs.iter().enumerate() {
            let lifecycle = match r.trigger {
                Trigger::TokenRotate | Trigger::TenantDeleted => r,
                Trigger::TenantCreated | Trigger::ExtensionRequested => continue,
            };
            outcomes.extend(self.provision_batch(&reqs[start..i]).await?);
            outcomes.push(match lifecycle.trigger {
                Trigger::TokenRotate => self.rotate(lifecycle).await?,
                _ => self.delete(lifecycle).await?,
            });
            start = i + 1;
        }
        outcomes.extend(self.provision_batch(&reqs[start..]).await?);
        Ok(outcomes)
    }

    /// The batch path: provisioning requests (`tenant.created`, `extension.requested`, and a
    /// rotation of a tenant without a token), one transaction for all of them.
    pub(super) async fn provision_batch(
        &self,
        reqs: &[ProvisionRequest],
    ) -> Result<Vec<Outcome>, ProvisionError> {
        if reqs.is_empty() {
            return Ok(Vec::new());
        }
        // The first request of each tenant names its container and carries its parsed id.
        let mut first: HashMap<&str, &ProvisionRequest> = HashMap::new();
        for r in reqs {
            first.entry(r.tenant_id.as_str()).or_insert(r);
        }
        let ids: Vec<String> = unique(reqs.iter().map(|r| r.identity.as_str()));
        let batch_tenants: Vec<String> = unique(reqs.iter().map(|r| r.tenant_id.as_str()));

        // Committed tokens are read without a transaction or a lock (see `store::lookup`).
        let mut conn = self.store.pool().acquire().await?;
        let tenants = store::lookup(&mut conn, &batch_tenants, &ids, self.include_token).await?;
        let claims = self.claims(&first, &batch_tenants, &tenants);
        if claims.is_empty() {
            // Every tenant has its token (or is gone): the events follow from what was read.
            drop(conn);
            let outcomes = decide(reqs, &tenants, &HashMap::new())?;
            return Ok(self.finish(reqs, outcomes, &HashMap::new(), &tenants));
        }
        let batch = Batch {
            reqs,
            first: &first,
            ids: &ids,
        };
        self.issue_and_store(&mut conn, &batch, tenants, &claims)
            .await
    }

    /// The tenants to claim: those without a committed token (nor a tombstone), each with its
    /// proposed container.
    fn claims(
        &self,
        first: &HashMap<&str, &ProvisionRequest>,
        batch_tenants: &[String],
        tenants: &HashMap<String, TenantRow>,
    ) -> Vec<Claim> {
        batch_tenants
            .iter()
            .filter(|t| !tenants.contains_key(t.as_str()))
            .filter_map(|t| first.get(t.as_str()))
            .map(|r| {
                let container = self.naming.name(&r.tenant_id, r.tenant_name.as_ref());
                let name = r.tenant_name.as_ref().map(|n| n.as_str().to_owned());
                (
                    r.tenant_id.as_str().to_owned(),
                    container.as_str().to_owned(),
                    name,
                )
            })
            .collect()
    }

    /// The transaction for a batch with tenants to claim: claim (row locks held until the
    /// commit), issue, journal, store the tokens and record the requests, commit.
    async fn issue_and_store(
        &self,
        conn: &mut sqlx::PgConnection,
        batch: &Batch<'_>,
        mut tenants: HashMap<String, TenantRow>,
        claims: &[Claim],
    ) -> Result<Vec<Outcome>, ProvisionError> {
        let mut tx = sqlx::Connection::begin(conn).await?;
        let (claimed, now) = store::claim(&mut tx, claims, batch.ids, self.include_token).await?;
        for row in claimed {
            tenants.insert(row.tenant_id.clone(), row);
        }
        let (fresh, failures) = self.issue_missing(batch.first, &tenants).await;
        let new_tokens = self.seal(batch.first, &fresh, &mut tenants, now);
        self.journal(&new_tokens, &tenants).await?;
        let outcomes = decide(batch.reqs, &tenants, &failures)?;
        let stored = store::store_tokens(&mut tx, &new_tokens).await?;
        if stored != new_tokens.len() {
            // A claimed row is locked by this transaction, so every token is stored; anything
            // else is a bug: roll back.
            return Err(ProvisionError::Invariant(format!(
                "stored {stored} of {} tokens of claimed tenants",
                new_tokens.len()
            )));
        }
        metrics::counter!(metric::TOKENS_ISSUED).increment(stored as u64);
        tx.commit().await?;
        Ok(self.finish(batch.reqs, outcomes, &fresh, &tenants))
    }

    /// Journals freshly issued tokens (sealed) in a transaction of their own, before the
    /// batch's commits, so one whose storing never commits can still be found and revoked.
    pub(super) async fn journal(
        &self,
        new_tokens: &[NewToken],
        tenants: &HashMap<String, TenantRow>,
    ) -> Result<(), StoreError> {
        let journal: Vec<IssuedToken> = new_tokens
            .iter()
            .map(|t| IssuedToken {
                tenant_id: t.tenant_id.clone(),
                container: tenants
                    .get(&t.tenant_id)
                    .map_or_else(String::new, |r| r.container.clone()),
                fingerprint: t.fingerprint.clone(),
                jti: t.jti.clone(),
                generation: tenants.get(&t.tenant_id).map_or(1, |r| r.generation),
                sealed: Some(t.sealed.clone()),
            })
            .collect();
        store::journal_issued(self.store.pool(), &journal).await
    }

    /// Encrypts the fresh tokens for storing and marks their rows as holding them, issued by
    /// the tenant's first request in the batch (the one whose claim it was). They are stored
    /// with `issued_at = now()`, the transaction's start time, which the claim returned: so
    /// the events can be decided before the statement that stores the tokens.
    fn seal(
        &self,
        first: &HashMap<&str, &ProvisionRequest>,
        fresh: &HashMap<String, TenantToken>,
        tenants: &mut HashMap<String, TenantRow>,
        now: Option<time::OffsetDateTime>,
    ) -> Vec<NewToken> {
        let mut new_tokens = Vec::with_capacity(fresh.len());
        for (tenant, token) in fresh {
            let (Some(r), Some(row), Some(now)) =
                (first.get(tenant.as_str()), tenants.get_mut(tenant), now)
            else {
                continue;
            };
            let new = NewToken {
                tenant_id: tenant.clone(),
                sealed: self.cipher.seal(&r.tenant_id, token),
                fingerprint: token.fingerprint().as_str().to_owned(),
                jti: token.jti(),
                issued_by: r.identity.as_str().to_owned(),
            };
            row.token = Some(StoredToken {
                fingerprint: new.fingerprint.clone(),
                issued_at: now,
                jti: new.jti.clone(),
                sealed: None,
            });
            row.issued_by = Some(new.issued_by.clone());
            new_tokens.push(new);
        }
        new_tokens
    }

    /// Under `EVENT_INCLUDE_TOKEN`, puts the token into every ready event: the fresh one, or
    /// the stored one opened.
    fn finish(
        &self,
        reqs: &[ProvisionRequest],
        mut outcomes: Vec<Outcome>,
        fresh: &HashMap<String, TenantToken>,
        tenants: &HashMap<String, TenantRow>,
    ) -> Vec<Outcome> {
        if !self.include_token {
            return outcomes;
        }
        for (r, outcome) in reqs.iter().zip(outcomes.iter_mut()) {
            let Outcome::Ready(event) = outcome else {
                continue;
            };
            let token = match fresh.get(&event.tenant_id) {
                Some(t) => Ok(Some(t.clone())),
                None => self.open(r, tenants.get(&event.tenant_id)),
            };
            match token {
                Ok(t) => event.token = t.map(|t| t.expose().to_owned()),
                Err(e) => *outcome = Outcome::Undecryptable(e),
            }
        }
        outcomes
    }

    /// Issue calls for claimed tenants without a token, all at once.
    async fn issue_missing(
        &self,
        first: &HashMap<&str, &ProvisionRequest>,
        tenants: &HashMap<String, TenantRow>,
    ) -> (HashMap<String, TenantToken>, HashMap<String, IssuerError>) {
        let calls = tenants
            .values()
            .filter(|row| row.token.is_none() && row.deleted_at.is_none())
            .filter_map(|row| Some((first.get(row.tenant_id.as_str())?, row)))
            .map(|(r, row)| {
                let tenant = &r.tenant_id;
                let container = ContainerName::from_stored(row.container.clone());
                let span = tracing::info_span!(
                    parent: &super::trace::request_span(r.identity.as_str()),
                    "issue",
                    otel.kind = "client",
                    tenant = %tenant,
                );
                async move {
                    let result = self
                        .issuer
                        .issue(tenant, &container, 1)
                        .instrument(span)
                        .await;
                    (tenant, result)
                }
            });
        let mut fresh = HashMap::new();
        let mut failures = HashMap::new();
        for (tenant, result) in join_all(calls).await {
            match result {
                Ok(token) => {
                    fresh.insert(tenant.as_str().to_owned(), token);
                }
                Err(e) => {
                    failures.insert(tenant.as_str().to_owned(), e);
                }
            }
        }
        (fresh, failures)
    }

    /// The stored token of `row`, for an event under `EVENT_INCLUDE_TOKEN`: `None` when the
    /// row holds none; an error when it cannot be opened (its key is not configured, or the
    /// row is damaged), which the handler turns into a retry, never into an event without
    /// its token.
    pub(super) fn open(
        &self,
        r: &ProvisionRequest,
        row: Option<&TenantRow>,
    ) -> Result<Option<TenantToken>, CryptoError> {
        let Some(sealed) = row
            .and_then(|row| row.token.as_ref())
            .and_then(|t| t.sealed.as_ref())
        else {
            return Ok(None);
        };
        self.cipher.open(&r.tenant_id, sealed).map(Some).inspect_err(|e| {
            tracing::error!(tenant = %r.tenant_id, key_id = %sealed.key_id, error = %e, "cannot decrypt the stored token for the event");
        })
    }
}

/// The outcome of each request, from the tenants' rows (with the tokens this batch stores)
/// and the batch's issuer failures: a pure function of what was read and issued.
fn decide(
    reqs: &[ProvisionRequest],
    tenants: &HashMap<String, TenantRow>,
    failures: &HashMap<String, IssuerError>,
) -> Result<Vec<Outcome>, ProvisionError> {
    reqs.iter()
        .map(|r| {
            let tenant = r.tenant_id.as_str();
            let row = tenants.get(tenant);
            if let Some(at) = row.and_then(|row| row.deleted_at) {
                return Ok(Outcome::Gone { deleted_at: at });
            }
            if let Some(e) = failures.get(tenant) {
                return Ok(Outcome::Failed(e.clone()));
            }
            match row.and_then(|row| Some((row, row.token.as_ref()?))) {
                Some((row, token)) => Ok(Outcome::Ready(Box::new(ready_event(r, row, token)))),
                // A claimed row always has a token or an issue failure; this is a bug.
                None => Err(ProvisionError::Invariant(format!(
                    "tenant {tenant} was neither provisioned nor failed"
                ))),
            }
        })
        .collect()
}

/// The ready event of request `r` for the tenant's token as stored (contract §7, §10):
/// `newly_issued` when `r` issued one of the tenant's tokens, `rotated` when that token was a
/// rotation's (generation 2 or later).
pub(super) fn ready_event(
    r: &ProvisionRequest,
    row: &TenantRow,
    token: &StoredToken,
) -> ReadyEvent {
    let issued = row.generation_issued_by(r.identity.as_str());
    ReadyEvent {
        event_id: r.identity.event_id(),
        tenant_id: row.tenant_id.clone(),
        container: row.container.clone(),
        token_fingerprint: token.fingerprint.clone(),
        issued_at: rfc3339(token.issued_at),
        newly_issued: issued.is_some(),
        trigger: r.trigger.as_str().to_owned(),
        correlation_id: r.identity.as_str().to_owned(),
        rotated: issued.is_some_and(|g| g > 1),
        generation: row.generation,
        token: None,
    }
}

fn unique<'a>(items: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut seen = HashSet::new();
    items
        .filter(|s| seen.insert(*s))
        .map(str::to_owned)
        .collect()
}
