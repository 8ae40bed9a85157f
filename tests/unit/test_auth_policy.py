"""The authorization policy (payments_common/policy.py): loading, validation, default deny, customer scoping."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from approval_svc.config import Settings as ApprovalSettings
from history_svc.config import Settings as HistorySettings
from payments_common.policy import DENIED, Decision, Policy, PolicyError, policy_method
from stack.auth import APPROVAL_METHODS, HISTORY_METHODS, default_policy

SERVED = ["pkg.Svc/Read", "pkg.Svc/Write", "pkg.Svc/Admin"]


def _policy(**document: Any) -> Policy:
    return Policy.parse({"methods": {}, **document}, SERVED)


def test_the_default_policies_load_against_what_each_server_serves() -> None:
    approval = Policy.parse(
        default_policy(APPROVAL_METHODS), ApprovalSettings.SERVED_METHODS, ApprovalSettings.SCOPED_METHODS
    )
    history = Policy.parse(
        default_policy(HISTORY_METHODS), HistorySettings.SERVED_METHODS, HistorySettings.SCOPED_METHODS
    )
    assert approval.unlisted(ApprovalSettings.SERVED_METHODS) == []
    assert history.unlisted(HistorySettings.SERVED_METHODS) == []
    # One service's policy names methods the other does not serve.
    with pytest.raises(PolicyError, match="does not serve"):
        Policy.parse(default_policy(APPROVAL_METHODS), HistorySettings.SERVED_METHODS)


def test_a_method_not_listed_is_denied_to_everyone() -> None:
    policy = _policy(methods={"pkg.Svc/Read": ["reader"]})
    assert policy.decide("/pkg.Svc/Write", {"reader", "admin", "writer"}) == DENIED
    assert policy.unlisted(SERVED) == ["pkg.Svc/Write", "pkg.Svc/Admin"]


def test_a_role_listed_for_the_method_allows_it_and_others_do_not() -> None:
    policy = _policy(methods={"pkg.Svc/Read": ["reader", "auditor"]})
    assert policy.decide("/pkg.Svc/Read", {"auditor"}).allowed
    assert policy.decide("/pkg.Svc/Read", {"writer"}) == DENIED
    assert policy.decide("/pkg.Svc/Read", set()) == DENIED


def test_a_call_allowed_only_through_a_customer_role_is_scoped() -> None:
    policy = _policy(
        methods={"pkg.Svc/Read": ["customer", "support"], "pkg.Svc/Write": ["customer"]},
        customer_roles=["customer"],
    )
    assert policy.decide("/pkg.Svc/Read", {"customer"}) == Decision(allowed=True, scoped=True)
    # Any other role that grants the method lifts the scope.
    assert policy.decide("/pkg.Svc/Read", {"customer", "support"}) == Decision(allowed=True, scoped=False)
    assert policy.decide("/pkg.Svc/Read", {"support"}) == Decision(allowed=True, scoped=False)
    # A role that does not grant this method does not lift it.
    assert policy.decide("/pkg.Svc/Write", {"customer", "support"}) == Decision(allowed=True, scoped=True)


def test_identities_add_roles_to_a_subject() -> None:
    policy = _policy(
        methods={"pkg.Svc/Admin": ["admin"]},
        identities={"spiffe://payments.local/ns/ops/sa/console": ["admin"]},
    )
    roles = policy.roles_of("spiffe://payments.local/ns/ops/sa/console", ["reader"])
    assert roles == {"admin", "reader"}
    assert policy.decide("/pkg.Svc/Admin", roles).allowed
    assert policy.roles_of("someone else") == frozenset()


def test_claim_names_default_and_can_be_nested() -> None:
    assert (_policy().roles_claim, _policy().accounts_claim) == ("roles", "accounts")
    nested = _policy(roles_claim="realm_access.roles", accounts_claim="ext.accounts")
    assert (nested.roles_claim, nested.accounts_claim) == ("realm_access.roles", "ext.accounts")


def test_method_names_may_carry_grpcs_leading_slash() -> None:
    policy = _policy(methods={"/pkg.Svc/Read": ["reader"]})
    assert policy.decide("/pkg.Svc/Read", {"reader"}).allowed
    assert policy_method("/pkg.Svc/Read") == "pkg.Svc/Read"


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ([], "the policy must be an object"),
        ({}, "methods is required"),
        ({"methods": [], "x": 1}, "unknown key 'x'"),
        ({"method": {}}, "unknown key 'method'"),
        ({"methods": []}, "methods must be an object"),
        ({"methods": {"pkg.Svc/Nope": ["r"]}}, "'pkg.Svc/Nope', which this server does not serve"),
        ({"methods": {"other.Svc/Read": ["r"]}}, "does not serve"),
        ({"methods": {"pkg.Svc/Read": "reader"}}, "must be a list of non-empty strings"),
        ({"methods": {"pkg.Svc/Read": [""]}}, "must be a list of non-empty strings"),
        ({"methods": {"pkg.Svc/Read": [1]}}, "must be a list of non-empty strings"),
        ({"methods": {"pkg.Svc/Read": [], "/pkg.Svc/Read": []}}, "twice"),
        ({"methods": {}, "identities": {"x": "admin"}}, r"identities\['x'\]"),
        ({"methods": {}, "identities": []}, "identities must be an object"),
        ({"methods": {}, "customer_roles": "customer"}, "customer_roles"),
        ({"methods": {}, "roles_claim": ""}, "roles_claim"),
        ({"methods": {}, "accounts_claim": "a..b"}, "accounts_claim"),
        ({"methods": {}, "roles_claim": 7}, "roles_claim"),
    ],
)
def test_a_malformed_policy_is_refused_saying_why(document: Any, problem: str) -> None:
    with pytest.raises(PolicyError, match=problem):
        Policy.parse(document, SERVED)


def test_load_reads_a_file_and_names_it_when_it_cannot(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"methods": {"pkg.Svc/Read": ["reader"]}}))
    assert Policy.load(path, SERVED).decide("/pkg.Svc/Read", {"reader"}).allowed
    path.write_text("{not json")
    with pytest.raises(PolicyError, match="is not JSON"):
        Policy.load(path, SERVED)
    with pytest.raises(PolicyError, match="cannot read"):
        Policy.load(tmp_path / "missing.json", SERVED)


def test_a_customer_role_on_a_method_that_does_not_confine_it_is_refused() -> None:
    """Freezing takes no account scope: a customer role there would freeze anyone's account."""
    document = default_policy(APPROVAL_METHODS)
    document["methods"]["payments.approval.v1.ApprovalService/FreezeAccount"] = ["accounts-admin", "customer"]
    with pytest.raises(PolicyError, match=r"FreezeAccount.*does not confine a customer"):
        Policy.parse(document, ApprovalSettings.SERVED_METHODS, ApprovalSettings.SCOPED_METHODS)


def test_a_customer_role_on_the_review_queue_is_refused() -> None:
    """The queue spans every account: a policy that gave it to a customer would not load."""
    document = default_policy(HISTORY_METHODS)
    document["methods"]["payments.history.v1.HistoryService/ListHeldPayments"] = ["reviewer", "customer"]
    with pytest.raises(PolicyError, match=r"ListHeldPayments.*does not confine a customer"):
        Policy.parse(document, HistorySettings.SERVED_METHODS, HistorySettings.SCOPED_METHODS)
