"""Whom a request_id belongs to: the caller's key, as the servicer stores it beside the request_id."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from approval_svc.servicer import MAX_CALLER_TEXT, caller_key
from payments_common.identity import ANONYMOUS, Caller, Identity, Source


def test_keys_recorded_before_callers_were_told_apart_are_the_anonymous_callers() -> None:
    """Migration 0002 writes the anonymous caller's key out (a migration is a snapshot); it must be this one."""
    path = Path(__file__).parents[2] / "approval_svc/migrations/versions/0002_request_id_per_caller.py"
    spec = importlib.util.spec_from_file_location("migration_0002", path)
    assert spec is not None
    assert spec.loader is not None
    migration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(migration)
    assert migration.ANONYMOUS_CALLER == caller_key(Caller(ANONYMOUS)) == "none:anonymous"


def test_a_caller_is_its_source_and_subject() -> None:
    assert caller_key(Caller(Identity("operator.jane", Source.TOKEN))) == "token:operator.jane"
    # The account scope of a call does not make it another caller.
    assert caller_key(Caller(Identity("alice", Source.TOKEN), frozenset({"a"}))) == caller_key(
        Caller(Identity("alice", Source.TOKEN), frozenset({"b"}))
    )
    # A token whose subject spells a certificate's identity is not that certificate.
    spiffe = "spiffe://payments.local/ns/payments/sa/payment-gateway"
    assert caller_key(Caller(Identity(spiffe, Source.TOKEN))) != caller_key(
        Caller(Identity(spiffe, Source.CERTIFICATE))
    )
    # Nor is a token whose subject is "anonymous" the anonymous caller.
    assert caller_key(Caller(Identity("anonymous", Source.TOKEN))) != caller_key(Caller(ANONYMOUS))


def test_a_long_subject_is_kept_as_its_digest_which_no_short_subject_spells() -> None:
    long = "x" * (MAX_CALLER_TEXT + 1)
    key = caller_key(Caller(Identity(long, Source.TOKEN)))
    assert key.startswith("token#sha256:")
    assert len(key) == len("token#sha256:") + 64
    assert key != caller_key(Caller(Identity("y" + long, Source.TOKEN)))
    # A subject that spells the digest form is a plain key, not the long subject's.
    assert caller_key(Caller(Identity(key.removeprefix("token"), Source.TOKEN))) != key
    assert (
        caller_key(Caller(Identity("x" * MAX_CALLER_TEXT, Source.TOKEN))) == "token:" + "x" * MAX_CALLER_TEXT
    )
