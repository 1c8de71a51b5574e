-- The database of tenant-tokens, locked down (docs/privileges.md). Create it first, owned by
-- the migrating role (then nobody needs CREATEDB):
--
--     createdb -U postgres --owner=tenant_tokens_migrator tenant_tokens
--
-- and run this file in it once, as a superuser (the `public` schema belongs to the bootstrap
-- superuser on Postgres 13 and 14):
--
--     psql -U postgres -d tenant_tokens -f deploy/sql/database.sql
--
-- Only the migrating role may create objects; nobody else may connect until grants.sql lets
-- the runtime role in; nobody creates temporary tables.
ALTER SCHEMA public OWNER TO tenant_tokens_migrator;
REVOKE ALL ON SCHEMA public FROM PUBLIC;
DO $$
BEGIN
    EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database());
END
$$;
