-- Storage that does not grow with traffic (issue 11): instead of a row per handled request,
-- each token remembers the request that issued it. A request's ready event follows from its
-- identity and the tenant's row: `event_id` from the identity, `newly_issued` from whether
-- the request issued one of the tenant's tokens, the rest from the token as stored now
-- (contract §7). So an already-provisioned request reads and writes nothing.

-- The identity of the request that issued the tenant's current token; NULL on a tombstone.
ALTER TABLE tenants ADD COLUMN issued_by text;
-- The identity of the request that issued a superseded or deleted token (NULL for an orphan).
ALTER TABLE revocations ADD COLUMN issued_by text;

-- Backfill from the recorded events: the request whose event said `newly_issued` for a token.
UPDATE tenants t
   SET issued_by = r.request_id
  FROM requests r
 WHERE r.tenant_id = t.tenant_id
   AND (r.event::jsonb ->> 'newly_issued')::boolean
   AND r.event::jsonb ->> 'token_fingerprint' = t.token_fingerprint;
UPDATE revocations v
   SET issued_by = r.request_id
  FROM requests r
 WHERE r.tenant_id = v.tenant_id
   AND (r.event::jsonb ->> 'newly_issued')::boolean
   AND r.event::jsonb ->> 'token_fingerprint' = v.token_fingerprint;

DROP TABLE requests;
