"""Decides each call before its handler runs: who calls (bearer token or client certificate), and may it.

A call with an `authorization` header is judged by its token alone (a client that also
presents a certificate acts as the token's subject); a call without one, by its verified
client certificate when mutual TLS is on. The policy then allows the method or not, and
says whether the call is scoped to the caller's accounts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

from payments_common import jwtverify
from payments_common.authsettings import DISABLED_WARNING, AuthSettings
from payments_common.errors import PermissionDenied
from payments_common.identity import ANONYMOUS, Caller, Identity, Source, account_ids
from payments_common.jwks import JwksFile, JwksUrl, KeySource
from payments_common.jwtverify import TOKEN_MALFORMED, UNKNOWN_KEY, TokenVerifier, unauthenticated
from payments_common.peercert import peer_subject
from payments_common.policy import Policy
from payments_common.settings import ServerSettings, SettingsError

log = logging.getLogger(__name__)

AUTHORIZATION: Final = "authorization"


class MethodNotAllowed(PermissionDenied):
    """No role of the caller may call the method (or the policy does not list it)."""

    def __init__(self) -> None:
        super().__init__("METHOD_NOT_ALLOWED", "the caller's roles do not allow this method")


class Gate(Protocol):
    """Decides a call in two steps, so that a refused call's audit line can still name who made it."""

    async def identify(self, context: Any) -> Identity:
        """Who makes the call; raises Unauthenticated."""

    def authorize(self, method: str, identity: Identity) -> Caller:
        """The caller, if `identity` may call `method`; raises PermissionDenied."""

    async def ready(self) -> bool:
        """Whether calls can be decided: the keys that verify tokens are held."""


class OpenGate:
    """Authentication disabled: every call runs as the anonymous identity, allowed everything."""

    async def identify(self, context: Any) -> Identity:
        return ANONYMOUS

    def authorize(self, method: str, identity: Identity) -> Caller:
        return Caller(identity)

    async def ready(self) -> bool:
        return True


def bearer_token(metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
    """The token of the call's `authorization: Bearer <token>`, None without the header.

    Several headers, another scheme or an empty token are TOKEN_MALFORMED.
    """
    values = [value for key, value in metadata if key == AUTHORIZATION]
    if not values:
        return None
    if len(values) > 1 or not isinstance(values[0], str):
        raise unauthenticated(TOKEN_MALFORMED)
    scheme, _, token = values[0].strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise unauthenticated(TOKEN_MALFORMED)
    return token


def claim(claims: Mapping[str, Any], name: str) -> Any:
    """A claim by name; dots reach into nested objects ("realm_access.roles")."""
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def claim_values(claims: Mapping[str, Any], name: str) -> list[str]:
    """A claim holding a list of strings, or one space-separated string (as OAuth's `scope` is); [] when absent."""
    value = claim(claims, name)
    if value is None:
        return []
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise unauthenticated(TOKEN_MALFORMED)


class PolicyGate:
    """Authenticates each call by token or certificate, then asks the policy."""

    def __init__(self, policy: Policy, verifier: TokenVerifier | None, certificates: bool) -> None:
        self._policy = policy
        self._verifier = verifier
        self._certificates = certificates

    async def identify(self, context: Any) -> Identity:
        token = bearer_token(context.invocation_metadata() or ())
        if token is not None:
            if self._verifier is None:
                raise unauthenticated(UNKNOWN_KEY)  # this server accepts no tokens at all
            claims = await self._verifier.verify(token)
            subject: str = claims["sub"]
            return Identity(
                subject,
                Source.TOKEN,
                self._policy.roles_of(subject, claim_values(claims, self._policy.roles_claim)),
                account_ids(claim_values(claims, self._policy.accounts_claim)),
                self._verifier.expires_at(claims),
            )
        if self._certificates:
            subject_name = peer_subject(context.auth_context())
            if subject_name is not None:
                return Identity(subject_name, Source.CERTIFICATE, self._policy.roles_of(subject_name))
        raise unauthenticated(jwtverify.CREDENTIALS_MISSING)

    async def ready(self) -> bool:
        return self._verifier is None or await self._verifier.available()

    def authorize(self, method: str, identity: Identity) -> Caller:
        decision = self._policy.decide(method, identity.roles)
        if not decision.allowed:
            raise MethodNotAllowed()
        return Caller(identity, identity.accounts if decision.scoped else None)


def gate_for(settings: ServerSettings) -> Gate:
    """The gate a server's settings ask for; SettingsError when they name no way to authenticate."""
    auth: AuthSettings = settings.auth
    if auth.disabled:
        log.warning(DISABLED_WARNING)
        return OpenGate()
    certificates = bool(settings.tls.client_ca_file)
    if auth.policy is None or not (auth.tokens or certificates):
        raise SettingsError(
            "authentication needs a policy and a JWKS or a client CA (mutual TLS), or to be disabled"
        )
    verifier = None
    if auth.tokens:
        sources: list[KeySource] = []
        if auth.jwks_file:
            sources.append(JwksFile(Path(auth.jwks_file)))
        if auth.jwks_url:
            if auth.jwks_url.startswith("http://"):
                log.warning(
                    "the JWKS URL %s is plain http: anyone on the network path can substitute the "
                    "signing keys; use https outside a test",
                    auth.jwks_url,
                )
            sources.append(JwksUrl(auth.jwks_url, auth.jwks_cache_seconds))
        verifier = TokenVerifier(sources, auth.issuer, auth.audience, auth.clock_skew_seconds)
    unlisted = auth.policy.unlisted(settings.SERVED_METHODS)
    if unlisted:
        log.warning("the policy lists no role for %s: nobody may call them", ", ".join(unlisted))
    return PolicyGate(auth.policy, verifier, certificates)
