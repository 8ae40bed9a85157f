#!/bin/bash
# Runs once, when the data directory is created: one role per use, passwords from the Secret.
set -euo pipefail
secrets=/var/run/secrets/postgres
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v owner_pw="$(cat "$secrets/migrate-password")" \
    -v approval_pw="$(cat "$secrets/approval-password")" \
    -v replicator_pw="$(cat "$secrets/replicator-password")" <<'SQL'
CREATE ROLE payments_owner LOGIN PASSWORD :'owner_pw';
CREATE ROLE approval LOGIN PASSWORD :'approval_pw';
CREATE ROLE replicator LOGIN REPLICATION PASSWORD :'replicator_pw';
ALTER DATABASE payments OWNER TO payments_owner;
ALTER SCHEMA public OWNER TO payments_owner;
GRANT USAGE ON SCHEMA public TO approval, replicator;
ALTER DEFAULT PRIVILEGES FOR ROLE payments_owner IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO approval;
ALTER DEFAULT PRIVILEGES FOR ROLE payments_owner IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO approval;
ALTER DEFAULT PRIVILEGES FOR ROLE payments_owner IN SCHEMA public
    GRANT SELECT ON TABLES TO replicator;
SQL
