//! The provisioning step: a batch of requests in, one outcome per request out.
//!
//! One database transaction serves the whole batch (that is what makes the worker fast):
//!
//! 1. requests already handled (a redelivery) get their stored event back, untouched;
//! 2. tenants with a committed token are answered from Postgres, no issuer call;
//! 3. the other tenants are claimed (row lock, see [`crate::store`]) and issued a token, all
//!    issue calls of the batch at once; each issued token is journaled at once, outside the
//!    transaction, so one whose storing never commits can be revoked;
//! 4. the tokens (encrypted) and every request's ready event are written, and committed
//!    together — the event is decided in the same transaction as the token, so a crash between
//!    commit and publish is repaired by the redelivery, which finds and republishes it.
//!
//! Issuer failures are per request (the rest of the batch goes on); a database failure fails
//! the whole batch, which is then retried as a whole.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::future::join_all;

use crate::crypto::TokenCipher;
use crate::domain::{ContainerName, NamingStrategy, ProvisionRequest, TenantToken};
use crate::event::{ReadyEvent, rfc3339};
use crate::issuer::{IssuerClient, IssuerError};
use crate::store::{
    self, IssuedToken, NewRequest, NewToken, Store, StoreError, StoredToken, TenantRow,
};
use crate::telemetry::metric;

/// What became of one request.
#[derive(Debug)]
pub enum Outcome {
    /// The tenant has its token; publish this event, then ack.
    Ready(Box<ReadyEvent>),
    /// The issue call failed; the error says whether to retry, dead-letter or pause.
    Failed(IssuerError),
}

/// Ties store, issuer and cipher together.
#[derive(Clone)]
pub struct Provisioner {
    store: Store,
    issuer: IssuerClient,
    cipher: Arc<TokenCipher>,
    naming: NamingStrategy,
    include_token: bool,
}

impl Provisioner {
    /// A provisioner; `include_token` puts the token into ready events (`EVENT_INCLUDE_TOKEN`).
    pub fn new(
        store: Store,
        issuer: IssuerClient,
        cipher: Arc<TokenCipher>,
        naming: NamingStrategy,
        include_token: bool,
    ) -> Self {
        Self {
            store,
            issuer,
            cipher,
            naming,
            include_token,
        }
    }

    /// The issuer client (the breaker probes with it).
    pub fn issuer(&self) -> &IssuerClient {
        &self.issuer
    }

    /// Handles a batch; outcomes are in the order of `reqs`.
    pub async fn provision(&self, reqs: &[ProvisionRequest]) -> Result<Vec<Outcome>, StoreError> {
        let mut tx = self.store.pool().begin().await?;

        // The first request of each tenant names its container and carries its parsed id.
        let mut first: HashMap<&str, &ProvisionRequest> = HashMap::new();
        for r in reqs {
            first.entry(r.tenant_id.as_str()).or_insert(r);
        }
        let ids: Vec<String> = unique(reqs.iter().map(|r| r.identity.as_str()));
        let known = store::known_requests(&mut tx, &ids).await?;

        let wanted: Vec<String> = unique(
            reqs.iter()
                .filter(|r| self.include_token || !known.contains_key(r.identity.as_str()))
                .map(|r| r.tenant_id.as_str()),
        );
        let mut tenants = if wanted.is_empty() {
            HashMap::new()
        } else {
            store::provisioned(&mut tx, &wanted, self.include_token).await?
        };

        // Claim tenants without a token.
        let claims: Vec<(String, String, Option<String>)> = wanted
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
            .collect();
        if !claims.is_empty() {
            for row in store::claim(&mut tx, &claims, self.include_token).await? {
                tenants.insert(row.tenant_id.clone(), row);
            }
        }

        let (fresh, failures) = self.issue_missing(&first, &tenants).await;
        let journal: Vec<IssuedToken> = fresh
            .iter()
            .map(|(tenant, token)| IssuedToken {
                tenant_id: tenant.clone(),
                container: tenants
                    .get(tenant)
                    .map_or_else(String::new, |r| r.container.clone()),
                fingerprint: token.fingerprint().as_str().to_owned(),
                jti: token.jti(),
            })
            .collect();
        store::journal_issued(self.store.pool(), &journal).await?;
        let new_tokens: Vec<NewToken> = fresh
            .iter()
            .filter_map(|(tenant, token)| {
                let r = first.get(tenant.as_str())?;
                Some(NewToken {
                    tenant_id: tenant.clone(),
                    sealed: self.cipher.seal(&r.tenant_id, token),
                    fingerprint: token.fingerprint().as_str().to_owned(),
                    jti: token.jti(),
                })
            })
            .collect();
        let stored = store::store_tokens(&mut tx, &new_tokens).await?;
        let mut newly: HashSet<String> = HashSet::new();
        for (tenant, issued_at) in stored {
            if let (Some(row), Some(token)) = (tenants.get_mut(&tenant), fresh.get(&tenant)) {
                row.token = Some(StoredToken {
                    fingerprint: token.fingerprint().as_str().to_owned(),
                    issued_at,
                    jti: token.jti(),
                    sealed: None,
                });
                newly.insert(tenant);
            }
        }
        metrics::counter!(metric::TOKENS_ISSUED).increment(newly.len() as u64);

        let mut outcomes = Vec::with_capacity(reqs.len());
        let mut new_requests = Vec::new();
        let mut decided: HashMap<&str, usize> = HashMap::new();
        for r in reqs {
            let id = r.identity.as_str();
            let tenant = r.tenant_id.as_str();
            let outcome = if let Some(stored) = known.get(id) {
                Outcome::Ready(Box::new(parse_event(stored)?))
            } else if let Some(&i) = decided.get(id) {
                match &outcomes[i] {
                    Outcome::Ready(e) => Outcome::Ready(e.clone()),
                    Outcome::Failed(e) => Outcome::Failed(e.clone()),
                }
            } else if let Some(e) = failures.get(tenant) {
                Outcome::Failed(e.clone())
            } else if let Some(token) = tenants.get(tenant).and_then(|row| row.token.as_ref()) {
                let container = tenants.get(tenant).map_or("", |row| row.container.as_str());
                let event = ReadyEvent {
                    event_id: r.identity.event_id(),
                    tenant_id: tenant.to_owned(),
                    container: container.to_owned(),
                    token_fingerprint: token.fingerprint.clone(),
                    issued_at: rfc3339(token.issued_at),
                    newly_issued: newly.remove(tenant),
                    trigger: r.trigger.as_str().to_owned(),
                    correlation_id: id.to_owned(),
                    token: None,
                };
                new_requests.push(NewRequest {
                    request_id: id.to_owned(),
                    tenant_id: tenant.to_owned(),
                    event_id: event.event_id,
                    event: serde_json::to_string(&event).unwrap_or_default(),
                });
                decided.insert(id, outcomes.len());
                Outcome::Ready(Box::new(event))
            } else {
                // A claimed row always has a token or an issue failure; this is a bug.
                Outcome::Failed(IssuerError::Transient {
                    message: "internal: tenant neither provisioned nor failed".into(),
                    status: None,
                    retry_after: None,
                })
            };
            outcomes.push(outcome);
        }
        let lost_races = store::record_requests(&mut tx, &new_requests).await?;
        tx.commit().await?;

        for (r, outcome) in reqs.iter().zip(outcomes.iter_mut()) {
            if let Outcome::Ready(event) = outcome {
                if let Some(stored) = lost_races.get(r.identity.as_str()) {
                    **event = parse_event(stored)?;
                }
                if self.include_token {
                    event.token = fresh
                        .get(&event.tenant_id)
                        .cloned()
                        .or_else(|| self.open(r, tenants.get(&event.tenant_id)))
                        .map(|t| t.expose().to_owned());
                }
            }
        }
        Ok(outcomes)
    }

    /// Issue calls for claimed tenants without a token, all at once.
    async fn issue_missing(
        &self,
        first: &HashMap<&str, &ProvisionRequest>,
        tenants: &HashMap<String, TenantRow>,
    ) -> (HashMap<String, TenantToken>, HashMap<String, IssuerError>) {
        let calls = tenants
            .values()
            .filter(|row| row.token.is_none())
            .filter_map(|row| Some((first.get(row.tenant_id.as_str())?, row)))
            .map(|(r, row)| {
                let tenant = &r.tenant_id;
                let container = ContainerName::from_stored(row.container.clone());
                async move {
                    let result = self.issuer.issue(tenant, &container).await;
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

    fn open(&self, r: &ProvisionRequest, row: Option<&TenantRow>) -> Option<TenantToken> {
        let sealed = row?.token.as_ref()?.sealed.as_ref()?;
        match self.cipher.open(&r.tenant_id, sealed) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(tenant = %r.tenant_id, error = %e, "cannot decrypt the stored token for the event");
                None
            }
        }
    }
}

fn parse_event(stored: &str) -> Result<ReadyEvent, StoreError> {
    serde_json::from_str(stored).map_err(|e| StoreError::from(sqlx::Error::Decode(Box::new(e))))
}

fn unique<'a>(items: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut seen = HashSet::new();
    items
        .filter(|s| seen.insert(*s))
        .map(str::to_owned)
        .collect()
}
