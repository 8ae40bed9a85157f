"""Property-based tests of the services' RPCs: the Hypothesis settings, fuzzed requests and the contract's check."""

from __future__ import annotations

from typing import Any

import grpc
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from payments_common.grpcstatus import error_info
from stack.auth import LocalAuthority


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


# -- credentials ---------------------------------------------------------------------------

# Every RPC may be refused before it runs: no valid credentials, or a caller that may not
# make the call; `call` checks that a refusal is one the call's credentials explain.
AUTH_CODES = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
UNAUTHENTICATED_REASONS = {
    "CREDENTIALS_MISSING",
    "TOKEN_MALFORMED",
    "TOKEN_EXPIRED",
    "TOKEN_NOT_YET_VALID",
    "WRONG_ISSUER",
    "WRONG_AUDIENCE",
    "UNKNOWN_KEY",
    "BAD_SIGNATURE",
}
Metadata = tuple[tuple[str, str], ...]


def gives_nothing_away(error: grpc.RpcError, issuer: LocalAuthority) -> None:
    """A refusal names no issuer, audience or key id that would help to forge a token."""
    info = error_info(error)
    assert info is not None
    said = [error.details() or "", *info.metadata.keys(), *info.metadata.values()]
    for secret in (issuer.ISSUER, *issuer.published_kids):
        assert not [text for text in said if secret in text], secret
    assert issuer.AUDIENCE not in info.metadata.values()


VALID, EITHER, REFUSED = "valid", "either", "refused"
# What gRPC lets a client put in a text header (it refuses control and non-ASCII characters itself).
HEADER_TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300)
SEGMENT = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", max_size=120)


def authorizations(valid: str, refused: list[tuple[str, str]]) -> st.SearchStrategy[tuple[Metadata, str]]:
    """`authorization` metadata and what the server must answer to it.

    VALID: the method's normal answer; EITHER: that or UNAUTHENTICATED (a variant of the
    valid token that a strict server may refuse); REFUSED: UNAUTHENTICATED with any reason;
    a reason: UNAUTHENTICATED with exactly that reason.
    """

    def header(value: str) -> Metadata:
        return (("authorization", value),)

    return st.one_of(
        st.just(((), "CREDENTIALS_MISSING")),
        st.sampled_from(["x-authorization", "authentication", "token"]).map(
            lambda key: (((key, f"Bearer {valid}"),), "CREDENTIALS_MISSING")
        ),
        HEADER_TEXT.map(lambda text: (header(text), REFUSED)),
        HEADER_TEXT.map(lambda text: (header(f"Bearer {text}"), REFUSED)),
        st.sampled_from(
            [
                "",
                "Bearer",
                "Bearer ",
                "Bearer null",
                "Basic dXNlcjpwYXNzd29yZA==",
                "Bearer ..",
                "Bearer a.b.c",
                "Bearer " + "A" * 4000,
                f"Basic {valid}",
            ]
        ).map(lambda value: (header(value), REFUSED)),
        st.tuples(SEGMENT, SEGMENT, SEGMENT).map(
            lambda parts: (header("Bearer " + ".".join(parts)), REFUSED)
        ),
        st.sampled_from(refused).map(lambda case: (header(f"Bearer {case[1]}"), case[0] or REFUSED)),
        st.integers(0, len(valid) - 1).flatmap(
            lambda i: st.sampled_from("AZaz09-_.=").map(
                lambda c: (header(f"Bearer {valid[:i]}{c}{valid[i + 1 :]}"), EITHER)
            )
        ),
        st.integers(0, len(valid)).map(lambda i: (header(f"Bearer {valid[:i]}"), EITHER)),
        st.sampled_from(["bearer ", "BEARER ", "Bearer  ", " Bearer "]).map(
            lambda scheme: (header(scheme + valid), EITHER)
        ),
        st.just(((("authorization", f"Bearer {valid}"), ("authorization", "Bearer x")), EITHER)),
        st.just(((("authorization", "Bearer x"), ("authorization", f"Bearer {valid}")), EITHER)),
        st.just((header(f"Bearer {valid}"), VALID)),
    )


def check_authorization(method: str, code: grpc.StatusCode, reason: str, expected: str) -> None:
    outcome = f"{method}: {code.name} {reason} for {expected}"
    if expected == VALID:
        assert code not in AUTH_CODES, outcome
    elif expected == EITHER:
        assert code == grpc.StatusCode.UNAUTHENTICATED or code not in AUTH_CODES, outcome
    elif expected == REFUSED:
        assert code == grpc.StatusCode.UNAUTHENTICATED, outcome
    else:
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, expected), outcome
