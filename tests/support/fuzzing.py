"""Property-based tests of the services' RPCs: the Hypothesis settings, fuzzed requests and the contract's check."""

from __future__ import annotations

from typing import Any

import grpc
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from payments_common.grpcstatus import error_info


def fuzz_settings(max_examples: int) -> settings:
    """Reproducible runs (derandomized, no example database) of large, slow examples, without deadlines."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def fields(
    data: st.DataObject, valid: dict[str, Any], fuzzed: dict[str, st.SearchStrategy[Any]]
) -> dict[str, Any]:
    """A valid request's fields with a few of them (none, one or more) replaced by fuzzed values.

    Corrupting a few fields at a time reaches every validation rule and the paths past
    validation too, which fuzzing every field at once would almost never do.
    """
    corrupt = data.draw(st.sets(st.sampled_from(sorted(fuzzed)), max_size=3))
    return {name: data.draw(fuzzed[name]) if name in corrupt else value for name, value in valid.items()}


def documented_refusal(
    method: str, error: grpc.RpcError, allowed: dict[str, set[grpc.StatusCode]], reasons: set[str]
) -> str:
    """Checks a refused call against the contract: a code `method` may answer, no traceback, a known reason.

    Returns the ErrorInfo reason.
    """
    code = error.code()
    details = error.details() or ""
    assert "Traceback" not in details
    assert code in allowed[method], f"{method}: {code.name} {details}"
    info = error_info(error)
    assert info is not None, f"{method}: {code.name} without ErrorInfo"
    assert info.reason in reasons
    return str(info.reason)
