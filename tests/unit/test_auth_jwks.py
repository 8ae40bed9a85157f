"""Key sources (payments_common/jwks.py): which keys a JWKS yields, the file's reloads, the URL's cache and re-fetches."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from payments_common.jwks import JwksError, JwksFile, JwksUrl, KeysUnavailable, parse_jwks
from stack.auth import LocalAuthority


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _rsa_jwk(bits: int, kid: str) -> dict[str, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())), "kid": kid}


def test_only_signing_keys_of_accepted_algorithms_with_a_kid_are_kept(tmp_path: Path) -> None:
    good = LocalAuthority.create(tmp_path).jwks()["keys"][0]
    document = {
        "keys": [
            good,
            {**good, "kid": "enc", "use": "enc"},
            {key: value for key, value in good.items() if key != "kid"},
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {**good, "kid": "p384-claimed", "alg": "ES384"},
            _rsa_jwk(1024, "short-rsa"),
            _rsa_jwk(2048, "rsa"),
            {"kty": "nonsense", "kid": "broken"},
            "not a key",
        ]
    }
    assert sorted(parse_jwks(document)) == sorted([good["kid"], "rsa"])


@pytest.mark.parametrize(
    "document", [[], {}, {"keys": {}}, {"keys": []}, {"keys": [{"kty": "oct", "kid": "x"}]}]
)
def test_a_document_with_no_usable_key_is_refused(document: Any) -> None:
    with pytest.raises(JwksError):
        parse_jwks(document)


async def test_the_file_is_reread_when_it_changes_at_most_once_a_second(tmp_path: Path) -> None:
    authority = LocalAuthority.create(tmp_path)
    old = authority.current_kid
    clock = Clock()
    source = JwksFile(authority.jwks_path, clock=clock)
    assert await source.key(old) is not None
    new = authority.rotate()
    # A token of the new key makes the source look at once.
    assert await source.key(new) is not None
    authority.retire(old)
    # Within the second, a known kid is answered from memory ...
    assert await source.key(old) is not None
    clock.now += 1.0
    # ... after it, the file is checked again: the retired key is gone.
    assert await source.key(old) is None
    assert await source.key(new) is not None


async def test_a_changed_file_that_cannot_be_used_keeps_the_keys(tmp_path: Path) -> None:
    authority = LocalAuthority.create(tmp_path)
    clock = Clock()
    source = JwksFile(authority.jwks_path, clock=clock)
    authority.jwks_path.write_text('{"keys": [')
    clock.now += 5
    assert await source.key(authority.current_kid) is not None
    authority.jwks_path.unlink()
    clock.now += 5
    assert await source.key(authority.current_kid) is not None


def test_a_file_that_cannot_be_used_at_start_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(JwksError, match="cannot read"):
        JwksFile(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("nope")
    with pytest.raises(JwksError, match="not JSON"):
        JwksFile(tmp_path / "bad.json")


class Fetches:
    """A stand-in for the HTTP fetch: serves the authority's current JWKS and counts the calls."""

    def __init__(self, authority: LocalAuthority) -> None:
        self.authority = authority
        self.calls = 0
        self.failing = False
        self.release: threading.Event | None = None

    def __call__(self, url: str, timeout: float) -> dict[str, jwt.PyJWK]:
        self.calls += 1
        if self.release is not None:
            self.release.wait(10)
        if self.failing:
            raise OSError("connection refused")
        return parse_jwks(self.authority.jwks())


@pytest.fixture
def authority(tmp_path: Path) -> LocalAuthority:
    return LocalAuthority.create(tmp_path)


async def test_the_url_is_cached_then_fetched_again_when_stale(authority: LocalAuthority) -> None:
    clock, fetches = Clock(), Fetches(authority)
    source = JwksUrl("https://idp/jwks", cache_seconds=300, clock=clock, fetch=fetches)
    kid = authority.current_kid
    assert await source.key(kid) is not None
    assert await source.key(kid) is not None
    assert fetches.calls == 1
    clock.now += 300
    assert await source.key(kid) is not None
    assert fetches.calls == 2


async def test_an_unknown_kid_refetches_at_most_once_per_interval(authority: LocalAuthority) -> None:
    clock, fetches = Clock(), Fetches(authority)
    source = JwksUrl("https://idp/jwks", cache_seconds=300, refetch_interval=10, clock=clock, fetch=fetches)
    await source.key(authority.current_kid)
    clock.now += 10
    new = authority.rotate()
    assert await source.key(new) is not None  # rotated: found by the re-fetch
    assert fetches.calls == 2
    for _ in range(20):  # made-up kids do not hammer the identity provider
        assert await source.key("made-up") is None
    assert fetches.calls == 2
    clock.now += 10
    assert await source.key("made-up") is None
    assert fetches.calls == 3


async def test_a_failed_fetch_keeps_the_keys_held(authority: LocalAuthority) -> None:
    clock, fetches = Clock(), Fetches(authority)
    source = JwksUrl("https://idp/jwks", cache_seconds=60, clock=clock, fetch=fetches)
    await source.key(authority.current_kid)
    fetches.failing = True
    clock.now += 60
    assert await source.key(authority.current_kid) is not None
    assert fetches.calls == 2


async def test_no_keys_yet_is_unavailable_not_unauthenticated(authority: LocalAuthority) -> None:
    clock, fetches = Clock(), Fetches(authority)
    fetches.failing = True
    source = JwksUrl("https://idp/jwks", clock=clock, fetch=fetches)
    with pytest.raises(KeysUnavailable):
        await source.key(authority.current_kid)
    with pytest.raises(KeysUnavailable):
        await source.key(authority.current_kid)
    assert fetches.calls == 1
    fetches.failing = False
    clock.now += 10
    assert await source.key(authority.current_kid) is not None


async def test_concurrent_callers_share_one_fetch_off_the_event_loop(authority: LocalAuthority) -> None:
    clock, fetches = Clock(), Fetches(authority)
    fetches.release = threading.Event()
    source = JwksUrl("https://idp/jwks", clock=clock, fetch=fetches)
    waiting = [asyncio.create_task(source.key(authority.current_kid)) for _ in range(5)]
    # The fetch blocks in its thread; the loop still runs (this line would hang otherwise).
    await asyncio.sleep(0)
    assert not any(task.done() for task in waiting)
    fetches.release.set()
    assert all(key is not None for key in await asyncio.gather(*waiting))
    assert fetches.calls == 1


async def test_a_caller_that_gives_up_does_not_cancel_the_fetch(authority: LocalAuthority) -> None:
    clock, fetches = Clock(), Fetches(authority)
    fetches.release = threading.Event()
    source = JwksUrl("https://idp/jwks", clock=clock, fetch=fetches)
    first = asyncio.create_task(source.key(authority.current_kid))
    second = asyncio.create_task(source.key(authority.current_kid))
    await asyncio.sleep(0)
    first.cancel()
    fetches.release.set()
    assert await second is not None
    assert fetches.calls == 1
