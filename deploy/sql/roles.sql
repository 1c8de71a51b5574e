-- The two Postgres roles of tenant-tokens (docs/privileges.md). Run once per cluster as a role
-- with CREATEROLE (e.g. `psql -U postgres -f deploy/sql/roles.sql`), then give each a password
-- (`\password tenant_tokens_migrator`) or map them to your identity provider.
--
-- tenant_tokens_migrator owns the database and its schema: `tenant-tokens migrate` (DDL) and
-- deploy/sql/grants.sql run as it. tenant_tokens_runtime is what `tenant-tokens run` connects
-- as: it reads and writes rows, and can change no schema, create no database and no role.
CREATE ROLE tenant_tokens_migrator LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION;
CREATE ROLE tenant_tokens_runtime LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION
    NOINHERIT;
