"""Who is calling: the authenticated identity, the accounts the call may act for, and the handlers' accessor.

The server skeleton (grpcserver.py) decides every call before its handler runs and
leaves the outcome in a ContextVar; a handler reads it with `current_caller()`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from payments_common.errors import PermissionDenied


class Source(StrEnum):
    """How the caller proved who it is."""

    TOKEN = "token"  # a bearer token (JWT) verified against the JWKS
    CERTIFICATE = "certificate"  # a client certificate verified by mutual TLS
    NONE = "none"  # nothing: authentication is disabled


@dataclass(frozen=True)
class Identity:
    """An authenticated subject, its roles (from its token and the policy) and the accounts bound to it."""

    subject: str
    source: Source
    roles: frozenset[str] = frozenset()
    accounts: frozenset[str] = frozenset()
    # When its credentials stop being accepted (seconds since the epoch): a token's expiry
    # plus the clock skew allowed. None: they do not expire while the call lasts (a client
    # certificate is checked by TLS when the connection is made).
    expires_at: float | None = None


# The longest subject OpenID Connect allows (Core 1.0, section 2): a token's `sub` is at
# most this long, so that it fits wherever an identity is recorded (a review's actor).
MAX_SUBJECT: Final = 255

# The identity of every call while authentication is disabled.
ANONYMOUS: Final = Identity("anonymous", Source.NONE)


def account_ids(values: Iterable[str]) -> frozenset[str]:
    """Account ids in the form the services use (canonical UUID text); other text is kept as it is."""
    canonical = set()
    for value in values:
        try:
            canonical.add(str(uuid.UUID(value)))
        except ValueError:
            canonical.add(value)
    return frozenset(canonical)


class NotYourAccount(PermissionDenied):
    """A caller acting for a customer names an account, or a payment, that is not the customer's.

    A payment that does not exist is answered the same way, so that a customer cannot
    learn which payment ids exist.
    """

    def __init__(self) -> None:
        super().__init__("NOT_YOUR_ACCOUNT", "the caller may not act for this account or payment")


@dataclass(frozen=True)
class Caller:
    """An identity and what this call allows it: any account (`scope` None) or only the accounts in `scope`."""

    identity: Identity
    scope: frozenset[str] | None = None

    @property
    def authenticated(self) -> bool:
        return self.identity.source is not Source.NONE

    @property
    def subject(self) -> str:
        return self.identity.subject

    @property
    def scoped(self) -> bool:
        """Whether the call acts for the caller's own accounts only (a customer's)."""
        return self.scope is not None

    def may_act_for(self, account_id: str) -> bool:
        return self.scope is None or account_id in self.scope

    def require_account(self, account_id: str) -> None:
        """Raises NotYourAccount unless the call may act for `account_id`."""
        if not self.may_act_for(account_id):
            raise NotYourAccount()

    def require_party(self, payer_account_id: str, payee_account_id: str) -> None:
        """Raises NotYourAccount unless the call may act for the payer or the payee of a payment."""
        if not (self.may_act_for(payer_account_id) or self.may_act_for(payee_account_id)):
            raise NotYourAccount()


_caller: ContextVar[Caller] = ContextVar("caller")


def set_caller(caller: Caller) -> None:
    """Records the caller of the current call (the server skeleton does, before the handler runs)."""
    _caller.set(caller)


def current_caller() -> Caller:
    """The caller of the current call.

    Raises LookupError outside a call decided by the server skeleton: a handler never runs
    without a decision, so that a missing one fails rather than allows.
    """
    return _caller.get()
