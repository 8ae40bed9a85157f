"""The local stack's identities: its token authority under .stack/auth/, one subject per role, tokens on demand.

`make up` creates the authority once and keeps it across `make down`, so that tokens
printed by `python -m stack token` stay valid for every later stack (and for a dev
cluster whose Secret auth-jwks holds the same JWKS).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives import serialization

from stack.auth import (
    ACCOUNTS_ADMIN,
    ALGORITHM,
    CUSTOMER,
    HISTORY_READER,
    JWKS_FILE,
    KEYS_DIR,
    PAYMENT_GATEWAY,
    REVIEWER,
    ROLES,
    LocalAuthority,
)

AUTH_DIR: Final = "auth"
AUTH_ENV_FILE: Final = "auth.env"

# Who each role's tokens name as their subject. The reviewer's subject is the actor that
# the timeline records for a review decision.
SUBJECTS: Final = {
    CUSTOMER: "customer",
    PAYMENT_GATEWAY: "spiffe://payments.local/ns/payments/sa/payment-gateway",
    REVIEWER: "operator.jane",
    ACCOUNTS_ADMIN: "operator.sam",
    HISTORY_READER: "support.lee",
}

# Tokens written to auth.env at `make up` last this long; `python -m stack token` makes more.
STACK_TOKEN_LIFETIME_SECONDS: Final = 12 * 3600


def authority(root: Path) -> LocalAuthority:
    """The authority under `root`/auth, created on first use."""
    directory = root / AUTH_DIR
    if (directory / JWKS_FILE).exists():
        try:
            return LocalAuthority.load(directory)
        except (OSError, ValueError, KeyError) as error:
            raise RuntimeError(
                f"cannot load the token authority in {directory} ({error}): remove it"
            ) from None
    return LocalAuthority.create(directory)


def token_for(
    issuer: LocalAuthority,
    roles: Sequence[str],
    accounts: Sequence[str] = (),
    subject: str | None = None,
    lifetime_seconds: float = 3600,
) -> str:
    """A token with `roles` (and, for a customer, the accounts it acts for), named after the first role's subject."""
    unknown = sorted(set(roles) - set(ROLES))
    if not roles or unknown:
        raise ValueError(f"roles must be among {', '.join(ROLES)}; got {', '.join(roles) or 'none'}")
    if subject is None:
        subject = SUBJECTS[roles[0]]
        if roles[0] == CUSTOMER and accounts:
            subject = f"customer:{accounts[0]}"
    return issuer.token(subject, roles, accounts, lifetime_seconds=lifetime_seconds)


class LocalCredentials:
    """Tokens of the local authority for the roles of `stack.clients.Payments`, renewed at half their lifetime."""

    def __init__(self, issuer: LocalAuthority, lifetime_seconds: float = 3600) -> None:
        self.issuer = issuer
        self.lifetime_seconds = lifetime_seconds
        self._cache: dict[tuple[str, str], tuple[str, float]] = {}

    def _cached(self, role: str, account_id: str = "") -> str:
        key = (role, account_id)
        token, renew_at = self._cache.get(key, ("", 0.0))
        if time.monotonic() >= renew_at:
            token = token_for(
                self.issuer, [role], [account_id] if account_id else [], None, self.lifetime_seconds
            )
            self._cache[key] = (token, time.monotonic() + self.lifetime_seconds / 2)
        return token

    def role(self, role: str) -> str:
        """A token of `role`'s subject, acting for no account in particular."""
        return self._cached(role)

    def customer(self, account_id: str) -> str:
        """A customer's token that acts for `account_id` only."""
        return self._cached(CUSTOMER, account_id)


def write_auth_env(root: Path, issuer: LocalAuthority) -> Path:
    """Writes root/auth.env: where the servers' JWKS and policies are, and a token for each role."""
    lines = [
        "# The local stack's token authority; `python -m stack token --role ROLE` prints more tokens.",
        f"AUTH_ISSUER={shlex.quote(issuer.ISSUER)}",
        f"AUTH_AUDIENCE={shlex.quote(issuer.AUDIENCE)}",
        f"AUTH_JWKS_FILE={shlex.quote(str(issuer.jwks_path))}",
        f"APPROVAL_AUTH_POLICY_FILE={shlex.quote(str(issuer.policy_path('APPROVAL_')))}",
        f"HISTORY_AUTH_POLICY_FILE={shlex.quote(str(issuer.policy_path('HISTORY_')))}",
        f"# Tokens valid for {STACK_TOKEN_LIFETIME_SECONDS // 3600} hours. A customer's token names the",
        "# accounts it acts for: python -m stack token --role customer --account ID",
    ]
    for role in ROLES:
        if role != CUSTOMER:
            token = token_for(issuer, [role], lifetime_seconds=STACK_TOKEN_LIFETIME_SECONDS)
            lines.append(f"{token_variable(role)}={token}")
    path = root / AUTH_ENV_FILE
    path.unlink(missing_ok=True)
    # Only its owner may read it: the tokens in it are credentials.
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        out.write("\n".join(lines) + "\n")
    return path


def token_variable(role: str) -> str:
    """The variable of auth.env that holds `role`'s token: TOKEN_REVIEWER, TOKEN_HISTORY_READER, ..."""
    return "TOKEN_" + role.upper().replace("-", "_")


def refused_tokens(issuer: LocalAuthority, roles: Sequence[str]) -> list[tuple[str, str]]:
    """Tokens with `roles` that a server trusting `issuer` must refuse, each with the reason it answers.

    One defect each: expired, not valid yet, another issuer or audience, an unknown key, a
    bad signature (a published kid, another key), a payload altered after signing. The
    forgeries that the library must refuse whatever they claim (no algorithm, an HMAC keyed
    with the public key, no expiry) have the reason "" (any UNAUTHENTICATED reason).
    """
    subject = SUBJECTS[roles[0]]
    skew = 3600  # far beyond any allowed clock skew
    valid = issuer.token(subject, roles)
    header, payload, signature = valid.split(".")
    claims = jwt.decode(valid, options={"verify_signature": False})
    altered = _b64(json.dumps({**claims, "sub": "someone.else", "roles": list(ROLES)}).encode())
    key = serialization.load_pem_private_key(
        (issuer.directory / KEYS_DIR / f"{issuer.current_kid}.pem").read_bytes(), password=None
    )
    no_expiry = {k: v for k, v in claims.items() if k != "exp"}
    public_pem = issuer.jwks_path.read_bytes()
    return [
        ("TOKEN_EXPIRED", issuer.token(subject, roles, lifetime_seconds=-skew)),
        ("TOKEN_NOT_YET_VALID", issuer.token(subject, roles, not_before_offset_seconds=skew)),
        ("WRONG_ISSUER", issuer.token(subject, roles, issuer="https://issuer.invalid")),
        ("WRONG_AUDIENCE", issuer.token(subject, roles, audience="another-service")),
        ("UNKNOWN_KEY", issuer.foreign_token(subject, roles)),
        ("BAD_SIGNATURE", issuer.foreign_token(subject, roles, kid=issuer.current_kid)),
        ("BAD_SIGNATURE", f"{header}.{altered}.{signature}"),
        ("", f"{_b64(json.dumps({'alg': 'none', 'kid': issuer.current_kid}).encode())}.{payload}."),
        ("", _hmac_token(public_pem, claims, issuer.current_kid)),
        ("", jwt.encode(no_expiry, key, algorithm=ALGORITHM, headers={"kid": issuer.current_kid})),  # type: ignore[arg-type]
    ]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _hmac_token(secret: bytes, claims: dict[str, Any], kid: str) -> str:
    """An HS256 token keyed with what the server publishes (its JWKS): the classic algorithm confusion."""
    signing_input = f"{_b64(json.dumps({'alg': 'HS256', 'typ': 'JWT', 'kid': kid}).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"
