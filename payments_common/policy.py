"""The authorization policy: which roles may call which method, which identities hold which roles (pure).

A policy document (JSON, documented in docs/security.md) is checked as a whole when it
is loaded: against its own shape and against the methods the server serves, so that a
typo stops the start instead of denying (or allowing) calls at run time.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from google.protobuf.descriptor import ServiceDescriptor

_KEYS: Final = frozenset({"roles_claim", "accounts_claim", "identities", "customer_roles", "methods"})


class PolicyError(ValueError):
    """The policy document is malformed, or names a method the server does not serve."""


def method_names(service: ServiceDescriptor) -> list[str]:
    """The policy's names of a service's methods: "package.Service/Method"."""
    return [f"{service.full_name}/{method.name}" for method in service.methods]


def policy_method(grpc_method: str) -> str:
    """The policy's name of a method from gRPC's "/package.Service/Method"."""
    return grpc_method.removeprefix("/")


@dataclass(frozen=True)
class Decision:
    """Whether a call may run, and whether it is scoped to the caller's accounts.

    A call allowed only through roles of `customer_roles` is scoped; one allowed through
    any other role acts for any account.
    """

    allowed: bool
    scoped: bool = False


DENIED: Final = Decision(allowed=False)


def _strings(value: object, where: str) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise PolicyError(f"{where} must be a list of non-empty strings")
    return frozenset(value)


def _object(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise PolicyError(f"{where} must be an object")
    return value


def _claim_name(document: Mapping[str, Any], key: str, default: str) -> str:
    value = document.get(key, default)
    if not isinstance(value, str) or not value or any(not part for part in value.split(".")):
        raise PolicyError(f"{key} must be a claim name (dots separate nested claims)")
    return value


@dataclass(frozen=True)
class Policy:
    """Method -> the roles that may call it; identity -> roles; the claims that carry roles and accounts."""

    methods: Mapping[str, frozenset[str]] = field(hash=False)
    identities: Mapping[str, frozenset[str]] = field(default_factory=dict, hash=False)
    customer_roles: frozenset[str] = frozenset()
    roles_claim: str = "roles"
    accounts_claim: str = "accounts"

    @classmethod
    def parse(
        cls, document: object, served: Collection[str], scoped: Collection[str] | None = None
    ) -> Policy:
        """The policy of a decoded JSON document; PolicyError says what is wrong with it.

        `scoped` names the served methods whose handlers confine a customer to its accounts;
        a customer role on any other method is refused (it would act for every account).
        None: every served method does (for policies checked outside a server).
        """
        top = _object(document, "the policy")
        unknown = sorted(set(top) - _KEYS)
        if unknown:
            raise PolicyError(f"unknown key {unknown[0]!r} (expected {', '.join(sorted(_KEYS))})")
        if "methods" not in top:
            raise PolicyError("methods is required")
        served_names = {policy_method(name) for name in served}
        methods: dict[str, frozenset[str]] = {}
        for name, roles in _object(top["methods"], "methods").items():
            method = policy_method(name)
            if method not in served_names:
                raise PolicyError(f"methods names {name!r}, which this server does not serve")
            if method in methods:
                raise PolicyError(f"methods names {method!r} twice")
            methods[method] = _strings(roles, f"methods[{name!r}]")
        identities = {
            subject: _strings(roles, f"identities[{subject!r}]")
            for subject, roles in _object(top.get("identities", {}), "identities").items()
        }
        customer_roles = _strings(top.get("customer_roles", []), "customer_roles")
        if scoped is not None:
            confining = {policy_method(name) for name in scoped}
            for method, roles in methods.items():
                customers = sorted(roles & customer_roles)
                if customers and method not in confining:
                    raise PolicyError(
                        f"methods[{method!r}] gives {customers[0]!r}, a customer role, but {method} "
                        "does not confine a customer to its accounts: it would act for every account"
                    )
        return cls(
            methods=methods,
            identities=identities,
            customer_roles=customer_roles,
            roles_claim=_claim_name(top, "roles_claim", "roles"),
            accounts_claim=_claim_name(top, "accounts_claim", "accounts"),
        )

    @classmethod
    def load(cls, path: Path, served: Collection[str], scoped: Collection[str] | None = None) -> Policy:
        """The policy in a JSON file; PolicyError when it cannot be read or is not valid."""
        try:
            document = json.loads(path.read_text())
        except OSError as error:
            raise PolicyError(f"cannot read {path}: {error.strerror}") from None
        except ValueError as error:
            raise PolicyError(f"{path} is not JSON: {error}") from None
        return cls.parse(document, served, scoped)

    def roles_of(self, subject: str, claimed: Iterable[str] = ()) -> frozenset[str]:
        """The roles of an identity: those its credentials claim and those the policy gives its subject."""
        return frozenset(claimed) | self.identities.get(subject, frozenset())

    def decide(self, grpc_method: str, roles: Collection[str]) -> Decision:
        """May a caller with `roles` call the method? A method the policy does not list is denied."""
        granting = self.methods.get(policy_method(grpc_method), frozenset()).intersection(roles)
        if not granting:
            return DENIED
        return Decision(allowed=True, scoped=granting <= self.customer_roles)

    def unlisted(self, served: Iterable[str]) -> list[str]:
        """The served methods that the policy does not list: nobody may call them."""
        return [name for name in served if policy_method(name) not in self.methods]
