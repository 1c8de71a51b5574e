-- Every token the issuer handed out, written (outside the main transaction) as soon as the
-- issuer answers. A token issued but never stored — the worker died before its transaction
-- committed, and the issuer did not honour the Idempotency-Key on the retry — stays here with
-- its jti, so that it can be revoked.
CREATE TABLE issued_tokens (
    id                bigserial PRIMARY KEY,
    tenant_id         text NOT NULL,
    container         text NOT NULL,
    token_fingerprint text NOT NULL,
    jti               text,
    issued_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX issued_tokens_tenant ON issued_tokens (tenant_id);

-- Issued tokens that are not the tenant's stored token: the tenant has another one, or has
-- none a minute later (so that transactions still in flight do not show up).
CREATE VIEW orphaned_tokens AS
SELECT j.tenant_id, j.container, j.token_fingerprint, j.jti, j.issued_at
  FROM issued_tokens j
  LEFT JOIN tenants t ON t.tenant_id = j.tenant_id
 WHERE (t.issued_at IS NOT NULL AND t.token_fingerprint <> j.token_fingerprint)
    OR (t.issued_at IS NULL AND j.issued_at < now() - interval '1 minute');
