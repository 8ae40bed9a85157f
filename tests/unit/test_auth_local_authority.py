"""The local token authority (stack/auth.py) and the bearer-token client interceptors (stack/clients.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest

from stack.auth import APPROVAL_METHODS, HISTORY_METHODS, ROLES, LocalAuthority
from stack.clients import bearer_interceptors, with_bearer


def _verify(authority: LocalAuthority, token: str) -> dict[str, Any]:
    keys = jwt.PyJWKSet.from_dict(authority.jwks())
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in keys.keys if k.key_id == kid)
    claims: dict[str, Any] = jwt.decode(
        token, key, algorithms=["ES256"], audience=LocalAuthority.AUDIENCE, issuer=LocalAuthority.ISSUER
    )
    return claims


def test_a_token_verifies_against_the_published_jwks(tmp_path: Path) -> None:
    authority = LocalAuthority.create(tmp_path)
    claims = _verify(authority, authority.token("alice", ["customer"], ["acc-1"]))
    assert claims["sub"] == "alice"
    assert claims["roles"] == ["customer"]
    assert claims["accounts"] == ["acc-1"]


def test_the_jwks_holds_public_keys_only(tmp_path: Path) -> None:
    authority = LocalAuthority.create(tmp_path)
    (jwk,) = authority.jwks()["keys"]
    assert jwk["kid"] == authority.current_kid
    assert "d" not in jwk
    assert (tmp_path / "keys" / f"{authority.current_kid}.pem").stat().st_mode & 0o077 == 0


def test_rotation_publishes_both_keys_and_retiring_removes_the_old(tmp_path: Path) -> None:
    authority = LocalAuthority.create(tmp_path)
    old = authority.current_kid
    old_token = authority.token("alice", ["customer"])
    new = authority.rotate()
    assert authority.published_kids == [old, new]
    assert jwt.get_unverified_header(authority.token("alice", ["customer"]))["kid"] == new
    assert _verify(authority, old_token)["sub"] == "alice"
    authority.retire(old)
    assert [k["kid"] for k in authority.jwks()["keys"]] == [new]
    with pytest.raises(ValueError, match="rotate first"):
        authority.retire(new)


def test_load_reads_what_create_wrote(tmp_path: Path) -> None:
    created = LocalAuthority.create(tmp_path)
    created.rotate()
    loaded = LocalAuthority.load(tmp_path)
    assert loaded.current_kid == created.current_kid
    assert _verify(created, loaded.token("bob", ["reviewer"]))["sub"] == "bob"


def test_lifetimes_issuer_audience_and_kid_are_what_was_asked(tmp_path: Path) -> None:
    authority = LocalAuthority.create(tmp_path)
    first = authority.current_kid
    authority.rotate()
    token = authority.token(
        "x",
        [],
        lifetime_seconds=-60,
        not_before_offset_seconds=10,
        issuer="https://other",
        audience="else",
        kid=first,
    )
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] < claims["iat"] < claims["nbf"]
    assert (claims["iss"], claims["aud"]) == ("https://other", "else")
    assert jwt.get_unverified_header(token)["kid"] == first


def test_a_foreign_token_does_not_verify(tmp_path: Path) -> None:
    authority = LocalAuthority.create(tmp_path)
    unknown = authority.foreign_token("mallory", ["reviewer"])
    assert jwt.get_unverified_header(unknown)["kid"] not in authority.published_kids
    forged = authority.foreign_token("mallory", ["reviewer"], kid=authority.current_kid)
    with pytest.raises(jwt.InvalidSignatureError):
        _verify(authority, forged)


def test_policies_cover_every_role_and_server_env_names_them(tmp_path: Path) -> None:
    authority = LocalAuthority.create(tmp_path)
    for prefix, methods in (("APPROVAL_", APPROVAL_METHODS), ("HISTORY_", HISTORY_METHODS)):
        env = authority.server_env(prefix)
        policy = json.loads(Path(env[f"{prefix}AUTH_POLICY_FILE"]).read_text())
        assert policy["methods"] == {m: list(r) for m, r in methods.items()}
        assert env[f"{prefix}AUTH_JWKS_FILE"] == str(authority.jwks_path)
    every_role = {
        role for methods in (APPROVAL_METHODS, HISTORY_METHODS) for r in methods.values() for role in r
    }
    assert every_role == set(ROLES)
    assert _verify(authority, authority.service_token())["roles"] == list(ROLES)


def test_an_authority_kept_from_an_earlier_version_gets_this_versions_policies(tmp_path: Path) -> None:
    LocalAuthority.create(tmp_path)
    path = tmp_path / "history-policy.json"
    older = json.loads(path.read_text())
    del older["methods"]["payments.history.v1.HistoryService/ListHeldPayments"]
    path.write_text(json.dumps(older))
    kept = LocalAuthority.load(tmp_path)
    kept.write_policies()  # as `make up` does
    assert json.loads(path.read_text())["methods"] == {m: list(r) for m, r in HISTORY_METHODS.items()}


# The interceptors, against a server that answers with the authorization it received.
_SEEN = "/test.Echo/Seen"
_SEEN_STREAM = "/test.Echo/SeenStream"


def _authorization(context: Any) -> bytes:
    found = dict(context.invocation_metadata()).get("authorization", "")
    return str(found).encode()


class _Echo(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        if handler_call_details.method == _SEEN:

            async def unary(request: bytes, context: Any) -> bytes:
                return _authorization(context)

            return grpc.unary_unary_rpc_method_handler(unary)
        if handler_call_details.method == _SEEN_STREAM:

            async def stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
                yield _authorization(context)

            return grpc.unary_stream_rpc_method_handler(stream)
        return None


@pytest.fixture
async def echo_address() -> AsyncIterator[str]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([_Echo()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


async def test_asyncio_interceptors_send_the_token_on_unary_and_streaming_calls(echo_address: str) -> None:
    tokens = iter(["first", "second"])
    async with grpc.aio.insecure_channel(
        echo_address, interceptors=bearer_interceptors(lambda: next(tokens))
    ) as channel:
        unary = await channel.unary_unary(_SEEN, None, None)(b"", metadata=[("x-other", "1")])
        streamed = [m async for m in channel.unary_stream(_SEEN_STREAM, None, None)(b"")]
    assert unary == b"Bearer first"
    assert streamed == [b"Bearer second"]


@pytest.fixture
def sync_channel(echo_address: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(echo_address) as channel:
        yield with_bearer(channel, "tok")


async def test_sync_interceptors_send_the_token(sync_channel: grpc.Channel) -> None:
    import asyncio

    def calls() -> tuple[bytes, list[bytes]]:
        unary = sync_channel.unary_unary(_SEEN, None, None)(b"", timeout=10)
        streamed = list(sync_channel.unary_stream(_SEEN_STREAM, None, None)(b"", timeout=10))
        return unary, streamed

    # The server runs on this event loop: the blocking calls go to a thread.
    unary, streamed = await asyncio.to_thread(calls)
    assert unary == b"Bearer tok"
    assert streamed == [b"Bearer tok"]
