#!/usr/bin/env bash
# Creates the dev overlay's Secrets with random passwords, unless they exist already.
# Nothing is written to disk. Rotation is a different procedure: see ../../README.md.
#
# The Secret auth-jwks holds the public keys that approval and history verify bearer tokens
# with: the JWKS file named by AUTH_JWKS_FILE (your identity provider's), or else the local
# authority's (created once under .stack/auth/), so that `python -m stack token --role ROLE`
# prints tokens this cluster accepts.
set -euo pipefail
ns=${NAMESPACE:-payments-dev}
root=$(cd "$(dirname "$0")/../../../.." && pwd)

rand() { head -c 24 /dev/urandom | base64 | tr -d '/+=' ; }

exists() { kubectl -n "$ns" get secret "$1" >/dev/null 2>&1; }

apply() { kubectl -n "$ns" create secret generic "$@" --dry-run=client -o yaml | kubectl apply -f - ; }

if ! exists auth-jwks; then
    jwks=${AUTH_JWKS_FILE:-}
    if [ -z "$jwks" ]; then
        jwks=$(cd "$root" && "${PYTHON:-.venv/bin/python}" -m stack authority | sed -n 's/^AUTH_JWKS_FILE=//p')
    fi
    [ -n "$jwks" ] || { echo "no JWKS: set AUTH_JWKS_FILE or run from a checkout with .venv" >&2; exit 1; }
    apply auth-jwks --from-file=jwks.json="$jwks"
fi

if exists postgres-secrets; then
    echo "secrets exist in $ns already; nothing to do" >&2
    exit 0
fi

pg_owner=$(rand) pg_approval=$(rand) pg_replicator=$(rand) pg_super=$(rand)
redis_history=$(rand) redis_replicator=$(rand) page_token=$(head -c 32 /dev/urandom | base64)
pg=postgresql.$ns.svc.cluster.local:5432/payments
redis=redis.$ns.svc.cluster.local:6379/0

apply postgres-secrets \
    --from-literal=postgres-password="$pg_super" \
    --from-literal=migrate-password="$pg_owner" \
    --from-literal=approval-password="$pg_approval" \
    --from-literal=replicator-password="$pg_replicator"
apply redis-secrets --from-literal=users.acl="user default off
user replicator on >$redis_replicator ~* &* +@all
user history on >$redis_history ~* &* +@read +@connection +ping +info +evalsha_ro +eval_ro"
apply migrate-secrets --from-literal=database-url="postgresql://payments_owner:$pg_owner@$pg"
apply approval-secrets --from-literal=database-url="postgresql://approval:$pg_approval@$pg"
apply replicator-secrets \
    --from-literal=database-url="postgresql://replicator:$pg_replicator@$pg" \
    --from-literal=redis-url="redis://replicator:$redis_replicator@$redis"
apply history-secrets \
    --from-literal=redis-url="redis://history:$redis_history@$redis" \
    --from-literal=page-token-secret="$page_token"
