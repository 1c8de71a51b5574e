-- One row per tenant: its container (fixed once chosen) and, once issued, its token.
CREATE TABLE tenants (
    tenant_id         text PRIMARY KEY,
    container         text NOT NULL UNIQUE,
    tenant_name       text,
    -- AES-256-GCM: 12-byte nonce || ciphertext || tag; the tenant id is the associated data.
    token_ciphertext  bytea,
    key_id            text,
    token_fingerprint text,
    jti               text,
    issued_at         timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT token_complete CHECK (
        (token_ciphertext IS NULL AND key_id IS NULL AND token_fingerprint IS NULL AND issued_at IS NULL)
        OR (token_ciphertext IS NOT NULL AND key_id IS NOT NULL AND token_fingerprint IS NOT NULL AND issued_at IS NOT NULL)
    )
);

-- One row per handled request (by message identity): the ready event it yields, written in
-- the same transaction as the token, so a redelivery publishes exactly the same event.
CREATE TABLE requests (
    request_id  text PRIMARY KEY,
    tenant_id   text NOT NULL REFERENCES tenants (tenant_id),
    event_id    uuid NOT NULL,
    event       text NOT NULL,
    handled_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX requests_handled_at ON requests (handled_at);
