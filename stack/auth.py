"""A local token authority: signing keys, the JWKS that publishes them, the policies, and signed tokens.

The local stack, the demo and the tests use it in place of an identity provider. It keeps
its state in one directory: `jwks.json` (the public keys, what the servers read),
`approval-policy.json` and `history-policy.json` (who may call which method of each
service), and the private keys under `keys/`, so that another process (`make demo`) can
`load` what `make up` created and sign tokens the running servers accept.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

APPROVAL_SERVICE: Final = "payments.approval.v1.ApprovalService"
HISTORY_SERVICE: Final = "payments.history.v1.HistoryService"

# The roles of the default policies.
CUSTOMER: Final = "customer"  # a payer acting for itself: scoped to the accounts of its token
PAYMENT_GATEWAY: Final = "payment-gateway"  # a customer-facing service submitting for any payer
REVIEWER: Final = "reviewer"  # the review console: approves and declines held payments
ACCOUNTS_ADMIN: Final = "accounts-admin"  # opens, freezes and unfreezes accounts
HISTORY_READER: Final = "history-reader"  # reads any account's history (statements, support)
ROLES: Final = (CUSTOMER, PAYMENT_GATEWAY, REVIEWER, ACCOUNTS_ADMIN, HISTORY_READER)

# Every method of each service and the roles that may call it.
APPROVAL_METHODS: Final[Mapping[str, Sequence[str]]] = {
    f"{APPROVAL_SERVICE}/CreateAccount": [ACCOUNTS_ADMIN],
    f"{APPROVAL_SERVICE}/SubmitPayment": [CUSTOMER, PAYMENT_GATEWAY],
    f"{APPROVAL_SERVICE}/ApprovePayment": [REVIEWER],
    f"{APPROVAL_SERVICE}/DeclinePayment": [REVIEWER],
    f"{APPROVAL_SERVICE}/FreezeAccount": [ACCOUNTS_ADMIN],
    f"{APPROVAL_SERVICE}/UnfreezeAccount": [ACCOUNTS_ADMIN],
    f"{APPROVAL_SERVICE}/GetPayment": [CUSTOMER, PAYMENT_GATEWAY, REVIEWER],
}
HISTORY_METHODS: Final[Mapping[str, Sequence[str]]] = {
    **{
        f"{HISTORY_SERVICE}/{name}": [CUSTOMER, PAYMENT_GATEWAY, REVIEWER, HISTORY_READER]
        for name in ("GetPayment", "ListPayments", "GetAccount", "WatchPayments")
    },
    # The review queue spans every account: the reviewers who work it, and readers of any account.
    f"{HISTORY_SERVICE}/ListHeldPayments": [REVIEWER, HISTORY_READER],
}


def default_policy(methods: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """The policy document of one service: the roles of `methods`, customers scoped by claim `accounts`."""
    return {
        "roles_claim": "roles",
        "accounts_claim": "accounts",
        "identities": {},
        "customer_roles": [CUSTOMER],
        "methods": {method: list(roles) for method, roles in methods.items()},
    }


POLICIES: Final = {"APPROVAL_": APPROVAL_METHODS, "HISTORY_": HISTORY_METHODS}
POLICY_FILES: Final = {"APPROVAL_": "approval-policy.json", "HISTORY_": "history-policy.json"}
JWKS_FILE: Final = "jwks.json"
KEYS_DIR: Final = "keys"
CURRENT_KEY_FILE: Final = "current-kid"
ALGORITHM: Final = "ES256"


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _public_jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    return {**jwk, "kid": kid, "alg": ALGORITHM, "use": "sig"}


def _write_private(path: Path, text: str) -> None:
    """Writes a file only its owner may read, atomically (a reader never sees half of it)."""
    partial = path.with_name(path.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    partial.replace(path)


class LocalAuthority:
    """A signing key (EC P-256) with a kid, the JWKS that publishes it, and tokens signed by it."""

    ISSUER: Final = "https://auth.payments.local"
    AUDIENCE: Final = "payments"

    def __init__(self, directory: Path, keys: dict[str, ec.EllipticCurvePrivateKey], current: str) -> None:
        self.directory = directory
        self._keys = keys  # every key this authority holds, by kid (published or retired)
        self._published = list(keys)  # the kids in the JWKS, oldest first
        self.current_kid = current

    @property
    def jwks_path(self) -> Path:
        return self.directory / JWKS_FILE

    def policy_path(self, prefix: str) -> Path:
        """The policy file of the server reading settings under `prefix` ("APPROVAL_" or "HISTORY_")."""
        return self.directory / POLICY_FILES[prefix]

    @classmethod
    def create(cls, directory: Path) -> LocalAuthority:
        """A new authority with one key; writes the JWKS, both policies and the private key under `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / KEYS_DIR).mkdir(mode=0o700, exist_ok=True)
        kid = uuid.uuid4().hex
        authority = cls(directory, {kid: _new_key()}, kid)
        authority._save_key(kid)
        authority._publish()
        authority.write_policies()
        return authority

    def write_policies(self) -> None:
        """Writes the default policy of each service, as this version of the code defines it."""
        for prefix, methods in POLICIES.items():
            self.policy_path(prefix).write_text(json.dumps(default_policy(methods), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> LocalAuthority:
        """The authority that `create` made in `directory` (by another process: `make up`)."""
        jwks = json.loads((directory / JWKS_FILE).read_text())
        keys: dict[str, ec.EllipticCurvePrivateKey] = {}
        for jwk in jwks["keys"]:
            pem = (directory / KEYS_DIR / f"{jwk['kid']}.pem").read_bytes()
            key = serialization.load_pem_private_key(pem, password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"key {jwk['kid']} is not an EC key")
            keys[jwk["kid"]] = key
        current = (directory / CURRENT_KEY_FILE).read_text().strip()
        return cls(directory, keys, current)

    def _save_key(self, kid: str) -> None:
        pem = self._keys[kid].private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        _write_private(self.directory / KEYS_DIR / f"{kid}.pem", pem.decode())

    def _publish(self) -> None:
        """Writes the JWKS of the published keys and the current kid, each file replaced atomically."""
        jwks = {"keys": [_public_jwk(self._keys[kid], kid) for kid in self._published]}
        partial = self.jwks_path.with_name(JWKS_FILE + ".partial")
        partial.write_text(json.dumps(jwks, indent=2) + "\n")
        partial.replace(self.jwks_path)
        _write_private(self.directory / CURRENT_KEY_FILE, self.current_kid + "\n")

    @property
    def published_kids(self) -> list[str]:
        return list(self._published)

    def jwks(self) -> dict[str, Any]:
        """The JWKS document as the file holds it (to serve it over HTTP, say)."""
        data: dict[str, Any] = json.loads(self.jwks_path.read_text())
        return data

    def rotate(self) -> str:
        """A new signing key and kid, published beside the old ones (which still verify); returns the kid."""
        kid = uuid.uuid4().hex
        self._keys[kid] = _new_key()
        self._save_key(kid)
        self._published.append(kid)
        self.current_kid = kid
        self._publish()
        return kid

    def retire(self, kid: str) -> None:
        """Removes a key from the JWKS: tokens it signed are no longer accepted. The current key stays."""
        if kid == self.current_kid:
            raise ValueError("the current signing key cannot be retired; rotate first")
        self._published.remove(kid)
        self._publish()

    def token(
        self,
        subject: str,
        roles: Sequence[str],
        accounts: Sequence[str] = (),
        *,
        lifetime_seconds: float = 3600,
        not_before_offset_seconds: float = 0,
        issuer: str | None = None,
        audience: str | None = None,
        kid: str | None = None,
    ) -> str:
        """A token for `subject` with its roles and accounts, signed by the current key (or key `kid`).

        A negative `lifetime_seconds` gives a token that has expired; a positive
        `not_before_offset_seconds` one that is not valid yet.
        """
        signer = kid or self.current_kid
        return _sign(
            self._keys[signer],
            signer,
            _claims(subject, roles, accounts, lifetime_seconds, not_before_offset_seconds, issuer, audience),
        )

    def foreign_token(
        self, subject: str, roles: Sequence[str], accounts: Sequence[str] = (), *, kid: str | None = None
    ) -> str:
        """A token signed by a key that is not published: an unknown kid, or (given a published `kid`) a bad signature."""
        return _sign(
            _new_key(), kid or uuid.uuid4().hex, _claims(subject, roles, accounts, 3600, 0, None, None)
        )

    def service_token(self, subject: str = "spiffe://payments.local/ns/payments/sa/operator") -> str:
        """A token of a service identity with every role, for the demo and test clients."""
        return self.token(subject, ROLES)

    def server_env(self, prefix: str) -> dict[str, str]:
        """The `<prefix>AUTH_*` variables a server needs to accept this authority's tokens."""
        return {
            f"{prefix}AUTH_JWKS_FILE": str(self.jwks_path),
            f"{prefix}AUTH_ISSUER": self.ISSUER,
            f"{prefix}AUTH_AUDIENCE": self.AUDIENCE,
            f"{prefix}AUTH_POLICY_FILE": str(self.policy_path(prefix)),
        }


def _claims(
    subject: str,
    roles: Sequence[str],
    accounts: Sequence[str],
    lifetime_seconds: float,
    not_before_offset_seconds: float,
    issuer: str | None,
    audience: str | None,
) -> dict[str, Any]:
    now = int(time.time())
    return {
        "iss": issuer or LocalAuthority.ISSUER,
        "aud": audience or LocalAuthority.AUDIENCE,
        "sub": subject,
        "iat": now,
        "nbf": now + int(not_before_offset_seconds),
        "exp": now + int(lifetime_seconds),
        "jti": uuid.uuid4().hex,
        "roles": list(roles),
        "accounts": list(accounts),
    }


def _sign(key: ec.EllipticCurvePrivateKey, kid: str, claims: dict[str, Any]) -> str:
    return jwt.encode(claims, key, algorithm=ALGORITHM, headers={"kid": kid})
