-- What the runtime role of tenant-tokens may do (docs/privileges.md): exactly the statements
-- `tenant-tokens run` makes, on the tables of migrations/, and no DDL. Run as the migrating
-- role (the owner of the tables) after every `tenant-tokens migrate`; it is idempotent:
--
--     psql -U tenant_tokens_migrator -d tenant_tokens -f deploy/sql/grants.sql
--
-- A migration that adds a table the worker uses adds its grant here (tests/privileges.rs runs
-- the worker with exactly these grants).
DO $$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO tenant_tokens_runtime', current_database());
END
$$;
GRANT USAGE ON SCHEMA public TO tenant_tokens_runtime;

-- Start-up: `run` reads which migrations are applied, and applies none when all are.
GRANT SELECT ON _sqlx_migrations TO tenant_tokens_runtime;
-- Claims (an upsert that locks the row), stored tokens, rotations and tombstones.
GRANT SELECT, INSERT, UPDATE ON tenants TO tenant_tokens_runtime;
-- The journal of issued tokens: written before storing, erased once stored or swept.
GRANT SELECT, INSERT, UPDATE ON issued_tokens TO tenant_tokens_runtime;
GRANT USAGE ON SEQUENCE issued_tokens_id_seq TO tenant_tokens_runtime;
-- The revocation queue, claimed with row locks by the revoker.
GRANT SELECT, INSERT, UPDATE ON revocations TO tenant_tokens_runtime;
-- Read by `tenant-tokens token orphans` (the operator commands can use this role too).
GRANT SELECT ON orphaned_tokens TO tenant_tokens_runtime;
