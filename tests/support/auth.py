"""Authentication for the tests: one token authority per test session, its service token, and channels that carry it.

Every server the tests start runs with authentication on, trusting this authority's
JWKS, with its default policies; clients call as a service identity that holds every
role. A test about authentication itself makes its own authority (stack.auth) in its
tmp_path, so that it can rotate keys without disturbing the others.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from payments_common.authsettings import AuthSettings
from payments_common.policy import Policy
from payments_common.settings import EnvReader, ServerSettings
from stack.auth import ROLES, LocalAuthority
from stack.clients import bearer_interceptors, bearer_metadata, with_bearer

# The identity the tests' clients call as, and how long its token lasts (longer than any run).
SERVICE_SUBJECT: Final = "spiffe://payments.local/ns/tests/sa/operator"
TOKEN_LIFETIME_S: Final = 7 * 24 * 3600


@functools.cache
def authority() -> LocalAuthority:
    """The session's authority, in a folder of its own that is removed when the tests end."""
    folder = Path(tempfile.mkdtemp(prefix="payments-auth-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return LocalAuthority.create(folder)


@functools.cache
def service_token() -> str:
    """A token of the tests' service identity, with every role of the default policies."""
    return authority().token(SERVICE_SUBJECT, ROLES, lifetime_seconds=TOKEN_LIFETIME_S)


def server_env(prefix: str) -> dict[str, str]:
    """The `<prefix>AUTH_*` variables of a server process that trusts the session's authority."""
    return authority().server_env(prefix)


def auth_settings(settings: type[ServerSettings], env: Mapping[str, str] | None = None) -> AuthSettings:
    """A server's authentication settings, read as the process would read them from `env`.

    By default, those that trust the session's authority with the service's default policy.
    """
    environ = server_env(settings.PREFIX) if env is None else env
    return EnvReader(settings.PREFIX, environ).auth(
        settings.SERVED_METHODS, client_certificates=False, scoped=settings.SCOPED_METHODS
    )


def trusting(authority: LocalAuthority, methods: Mapping[str, Sequence[str]]) -> AuthSettings:
    """Settings that trust `authority`'s JWKS with a policy of `methods` (for a test service of its own)."""
    return AuthSettings(
        jwks_file=str(authority.jwks_path),
        issuer=authority.ISSUER,
        audience=authority.AUDIENCE,
        policy=Policy.parse({"methods": dict(methods)}, served=list(methods)),
    )


def policy_for(methods: Collection[str], roles: Sequence[str] = ROLES) -> dict[str, list[str]]:
    """A policy's `methods` that lets every one of `roles` call every one of `methods`."""
    return {method: list(roles) for method in methods}


def bearer(token: str) -> list[tuple[str, str]]:
    """The call metadata that carries `token`, as a list that a test can extend."""
    return list(bearer_metadata(token))


def aio_channel(address: str, token: str | None = None, **options: Any) -> grpc.aio.Channel:
    """An asyncio plaintext channel whose calls carry `token` (the service token by default)."""
    return grpc.aio.insecure_channel(
        address, interceptors=bearer_interceptors(token or service_token()), **options
    )


def sync_channel(address: str, token: str | None = None, **options: Any) -> grpc.Channel:
    """A blocking plaintext channel whose calls carry `token` (the service token by default)."""
    return with_bearer(grpc.insecure_channel(address, **options), token or service_token())


# Each way a call's credentials can be wrong, and the reason the servers answer it with.
BAD_CREDENTIALS: Final = {
    "no token": "CREDENTIALS_MISSING",
    "expired": "TOKEN_EXPIRED",
    "not yet valid": "TOKEN_NOT_YET_VALID",
    "wrong audience": "WRONG_AUDIENCE",
    "wrong issuer": "WRONG_ISSUER",
    "unknown key": "UNKNOWN_KEY",
    "bad signature": "BAD_SIGNATURE",
    "malformed token": "TOKEN_MALFORMED",
    "not a bearer token": "TOKEN_MALFORMED",
}


def bad_credentials(authority: LocalAuthority, case: str) -> list[tuple[str, str]]:
    """The metadata of a call whose credentials are wrong as `case` says, though its roles would allow anything."""
    subject = "spiffe://payments.local/ns/tests/sa/everything"
    if case == "no token":
        return []
    if case == "not a bearer token":
        return [("authorization", "Basic dXNlcjpwYXNzd29yZA==")]
    if case == "malformed token":
        return bearer("not-a-token")
    if case in ("unknown key", "bad signature"):
        kid = authority.current_kid if case == "bad signature" else None
        return bearer(authority.foreign_token(subject, ROLES, kid=kid))
    claims: dict[str, dict[str, Any]] = {
        "expired": {"lifetime_seconds": -300},
        "not yet valid": {"not_before_offset_seconds": 300},
        "wrong audience": {"audience": "someone-else"},
        "wrong issuer": {"issuer": "https://auth.example.org"},
    }
    return bearer(authority.token(subject, ROLES, **claims[case]))


async def assert_open_without_credentials(address: str, service_name: str) -> None:
    """Health says SERVING and reflection lists `service_name` to a call that carries no credentials."""
    async with grpc.aio.insecure_channel(address) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="readiness"), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await call.read()
        await call.done_writing()
        assert service_name in {service.name for service in reply.list_services_response.service}
