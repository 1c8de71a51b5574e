-- Token lifecycle (contract §10): generations, rotation, deletion, revocation.

-- The current token's generation (1 for the first), and the tombstone of a deleted tenant: its
-- row stays (id, container, when, by which message) with no token, so a later request for it
-- is answered `gone` and an out-of-order `tenant.created` cannot resurrect it.
ALTER TABLE tenants
    ADD COLUMN generation integer NOT NULL DEFAULT 1,
    ADD COLUMN deleted_at timestamptz,
    ADD COLUMN deleted_by text;

-- Every token that must be revoked, kept on record after: a superseded token waiting out its
-- grace, the tokens of a deleted tenant, an orphan. A row is written in the same transaction
-- that makes the revocation due; it is claimed with a row lock (FOR UPDATE SKIP LOCKED) for
-- the revoke call, so two replicas never call for the same token and a dead claimant's claim
-- ends with its session. The ciphertext is kept until the token is revoked, then erased.
CREATE TABLE revocations (
    token_fingerprint  text PRIMARY KEY,
    tenant_id          text NOT NULL,
    container          text NOT NULL,
    generation         integer NOT NULL,
    jti                text,
    token_ciphertext   bytea,
    key_id             text,
    reason             text NOT NULL CHECK (reason IN ('rotated', 'deleted', 'orphan')),
    -- Identity of the message that made the revocation due (none for an orphan).
    correlation_id     text,
    due_at             timestamptz NOT NULL,
    attempts           integer NOT NULL DEFAULT 0,
    next_attempt_at    timestamptz NOT NULL,
    last_error         text,
    revoked_at         timestamptz,
    event_published_at timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT sealed_until_revoked CHECK (
        (revoked_at IS NULL AND token_ciphertext IS NOT NULL AND key_id IS NOT NULL)
        OR (revoked_at IS NOT NULL AND token_ciphertext IS NULL AND key_id IS NULL)
    )
);
CREATE INDEX revocations_due ON revocations (next_attempt_at) WHERE revoked_at IS NULL;
CREATE INDEX revocations_unpublished ON revocations (revoked_at)
    WHERE revoked_at IS NOT NULL AND event_published_at IS NULL;
CREATE INDEX revocations_tenant ON revocations (tenant_id);

-- The journal keeps each issued token sealed until it is stored as a tenant's token (the
-- storing transaction erases it) or revoked as an orphan.
ALTER TABLE issued_tokens
    ADD COLUMN generation integer NOT NULL DEFAULT 1,
    ADD COLUMN token_ciphertext bytea,
    ADD COLUMN key_id text;
CREATE INDEX issued_tokens_fingerprint ON issued_tokens (token_fingerprint);
CREATE INDEX issued_tokens_sealed ON issued_tokens (issued_at) WHERE token_ciphertext IS NOT NULL;

-- Issued tokens that never became a tenant's stored token (the tenant has another one, or none
-- a minute later, so that transactions still in flight do not show up), and were not rotated
-- away or revoked with their deleted tenant; with the state of their revocation.
DROP VIEW orphaned_tokens;
CREATE VIEW orphaned_tokens AS
SELECT j.tenant_id, j.container, j.token_fingerprint, j.jti, j.issued_at, j.generation,
       r.due_at AS revocation_due_at, r.revoked_at, r.attempts AS revocation_attempts,
       r.last_error AS revocation_error
  FROM issued_tokens j
  LEFT JOIN tenants t ON t.tenant_id = j.tenant_id
  LEFT JOIN revocations r ON r.token_fingerprint = j.token_fingerprint
 WHERE (r.token_fingerprint IS NULL OR r.reason = 'orphan')
   AND ((t.issued_at IS NOT NULL AND t.token_fingerprint <> j.token_fingerprint)
        OR (t.issued_at IS NULL AND j.issued_at < now() - interval '1 minute'));
