"""Key sources (payments_common/jwks.py): which keys a JWKS yields, the file's reloads, the URL's cache and re-fetches."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from payments_common.jwks import (
    MAX_JWKS_BYTES,
    JwksError,
    JwksFile,
    JwksUrl,
    KeysUnavailable,
    fetch_jwks,
    parse_jwks,
)
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


@pytest.mark.parametrize("document", [[], {}, {"keys": {}}, "keys"])
def test_a_document_that_is_not_a_jwks_is_refused(document: Any) -> None:
    with pytest.raises(JwksError):
        parse_jwks(document)


@pytest.mark.parametrize(
    "document", [{"keys": []}, {"keys": [{"kty": "oct", "kid": "x"}]}, {"keys": ["not a key"]}]
)
def test_a_jwks_with_no_usable_key_trusts_no_key(document: Any) -> None:
    assert parse_jwks(document) == {}


async def test_a_file_that_lists_no_key_withdraws_every_key(tmp_path: Path) -> None:
    """How a compromised key is withdrawn before its replacement exists: `{"keys": []}`."""
    authority = LocalAuthority.create(tmp_path)
    clock = Clock()
    source = JwksFile(authority.jwks_path, clock=clock)
    assert await source.key(authority.current_kid) is not None
    authority.jwks_path.write_text('{"keys": []}')
    clock.now += 1.0
    assert await source.key(authority.current_kid) is None
    # Published again, the key is trusted again.
    authority.rotate()
    assert await source.key(authority.current_kid) is not None


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


@pytest.mark.parametrize(
    "replacement",
    [
        {"keys": [{"kty": "EC", "crv": "P-384", "kid": "p384", "x": "AAAA", "y": "AAAA"}]},
        {"keys": [_rsa_jwk(1024, "short-rsa")]},
        {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]},
    ],
    ids=["another-curve", "short-rsa", "no-kid"],
)
async def test_a_changed_jwks_withdraws_every_key_it_does_not_hold_usable(
    tmp_path: Path, replacement: dict[str, Any]
) -> None:
    """A key is withdrawn by publishing a set without it, even when nothing in the new set can be used."""
    authority = LocalAuthority.create(tmp_path)
    clock = Clock()
    source = JwksFile(authority.jwks_path, clock=clock)
    assert await source.key(authority.current_kid) is not None
    authority.jwks_path.write_text(json.dumps(replacement))
    clock.now += 1.0
    assert await source.key(authority.current_kid) is None


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
    # At start a set that lists keys, none usable, is a mistake (an explicit empty set is not).
    (tmp_path / "unusable.json").write_text(json.dumps({"keys": [_rsa_jwk(1024, "short-rsa")]}))
    with pytest.raises(JwksError, match="no usable signing key"):
        JwksFile(tmp_path / "unusable.json")


async def until(condition: Callable[[], bool | Awaitable[bool]], what: str, within: float = 10.0) -> None:
    """Polls `condition` until it holds; fails, saying `what` did not happen, after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        await asyncio.sleep(0.01)


class Fetches:
    """A stand-in for the HTTP fetch: serves the authority's current JWKS and counts the calls."""

    def __init__(self, authority: LocalAuthority) -> None:
        self.authority = authority
        self.calls = 0
        self.failing = False
        self.release: threading.Event | None = None

    def __call__(self, url: str, timeout: float, time_limit: float) -> dict[str, jwt.PyJWK]:
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
    # Stale: answered from the keys held while they are fetched again in the background.
    assert await source.key(kid) is not None
    await until(lambda: fetches.calls == 2, "the stale keys fetched again")


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


async def test_a_fetched_set_that_lists_no_key_withdraws_every_key(authority: LocalAuthority) -> None:
    clock, fetches = Clock(), Fetches(authority)
    source = JwksUrl("https://idp/jwks", cache_seconds=60, clock=clock, fetch=fetches)
    kid = authority.current_kid
    assert await source.key(kid) is not None
    authority.jwks_path.write_text('{"keys": []}')
    clock.now += 60
    await source.key(kid)  # stale: fetched again in the background
    await until(lambda: fetches.calls == 2, "the stale keys fetched again")
    await until(lambda: _withdrawn(source, kid), "the key withdrawn")
    assert source.ready  # a set with no key is an answer, not a failure


async def _withdrawn(source: JwksUrl, kid: str) -> bool:
    return await source.key(kid) is None


async def test_a_failed_fetch_keeps_the_keys_held(authority: LocalAuthority) -> None:
    clock, fetches = Clock(), Fetches(authority)
    source = JwksUrl("https://idp/jwks", cache_seconds=60, clock=clock, fetch=fetches)
    await source.key(authority.current_kid)
    fetches.failing = True
    clock.now += 60
    assert await source.key(authority.current_kid) is not None
    await until(lambda: fetches.calls == 2, "the stale keys fetched again")
    await source.key("made-up")  # waits for the fetch in flight, which fails
    assert await source.key(authority.current_kid) is not None
    assert source.ready


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


# -- against a real HTTP server --------------------------------------------------------------


class IdentityProvider:
    """A real HTTP server on a free port of 127.0.0.1 serving the authority's JWKS.

    `hold()` makes requests wait, before any byte of the answer, until `release()`;
    `drip` (seconds) sends the answer one byte at a time; `body` replaces the JWKS.
    """

    def __init__(self, authority: LocalAuthority) -> None:
        self.authority = authority
        self.requests = 0
        self.open = threading.Event()
        self.open.set()
        self.stopping = threading.Event()
        self.drip: float | None = None
        self.body: bytes | None = None
        self.url = ""

    def hold(self) -> None:
        self.open.clear()

    def release(self) -> None:
        self.open.set()

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        self.requests += 1
        self.open.wait()
        body = self.body if self.body is not None else json.dumps(self.authority.jwks()).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if self.drip is None:
            handler.wfile.write(body)
            return
        for offset in range(len(body)):
            if self.stopping.wait(self.drip):
                return  # the test is over: the connection closes short
            handler.wfile.write(body[offset : offset + 1])
            handler.wfile.flush()


@pytest.fixture
def idp(authority: LocalAuthority) -> Iterator[IdentityProvider]:
    provider = IdentityProvider(authority)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with contextlib.suppress(OSError):  # the client gave up
                provider.answer(self)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    provider.url = f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
    thread = threading.Thread(target=server.serve_forever, name="idp-http", daemon=True)
    thread.start()
    try:
        yield provider
    finally:
        provider.stopping.set()
        provider.release()
        server.shutdown()
        server.server_close()
        thread.join()


async def test_a_held_kid_is_answered_while_a_fetch_for_an_unknown_kid_is_in_flight(
    authority: LocalAuthority, idp: IdentityProvider
) -> None:
    clock = Clock()
    source = JwksUrl(idp.url, clock=clock)
    held = authority.current_kid
    assert await source.key(held) is not None
    idp.hold()
    clock.now += 10
    new = authority.rotate()
    unknown = asyncio.create_task(source.key(new))
    await until(lambda: idp.requests == 2, "the fetch for the unknown kid reached the server")
    lookup = asyncio.create_task(source.key(held))
    # The server is still held: the held kid's lookup does not wait for the fetch.
    await until(lookup.done, "the held kid answered while the fetch is in flight")
    assert lookup.result() is not None
    assert not unknown.done()
    idp.release()
    assert await unknown is not None  # the kid not held waited for the fetch, and found the new key
    assert idp.requests == 2


async def test_a_held_kid_is_answered_from_stale_keys_while_they_are_fetched_again(
    authority: LocalAuthority, idp: IdentityProvider
) -> None:
    clock = Clock()
    source = JwksUrl(idp.url, cache_seconds=60, clock=clock)
    old = authority.current_kid
    assert await source.key(old) is not None
    idp.hold()
    new = authority.rotate()
    authority.retire(old)
    clock.now += 60
    lookup = asyncio.create_task(source.key(old))
    await until(lookup.done, "the held kid answered from the stale keys")
    assert lookup.result() is not None
    await until(lambda: idp.requests == 2, "the stale keys being fetched again")
    waiting = [asyncio.create_task(source.key(new)) for _ in range(3)]
    idp.release()
    # The kid not held waited for the fetch in flight (no other fetch: the interval has not passed).
    assert all(key is not None for key in await asyncio.gather(*waiting))
    assert await source.key(old) is None  # the removed key is refused once fetched again
    assert idp.requests == 2


async def test_a_dripping_fetch_fails_at_its_deadline_and_the_keys_held_are_kept(
    authority: LocalAuthority, idp: IdentityProvider
) -> None:
    clock = Clock()
    source = JwksUrl(idp.url, clock=clock, deadline=0.5)
    held = authority.current_kid
    assert await source.key(held) is not None
    idp.drip = 0.05  # a JWKS of two keys would take tens of seconds
    new = authority.rotate()
    clock.now += 10
    assert await source.key(new) is None  # UNKNOWN_KEY: the fetch failed at its deadline
    assert await source.key(held) is not None
    assert idp.requests == 2


async def test_until_a_fetch_ends_within_its_deadline_a_token_is_unavailable(
    authority: LocalAuthority, idp: IdentityProvider
) -> None:
    idp.drip = 0.05
    source = JwksUrl(idp.url, clock=Clock(), deadline=0.5)
    with pytest.raises(KeysUnavailable):
        await source.key(authority.current_kid)
    assert not source.ready


async def test_past_its_deadline_a_stalled_fetch_is_not_waited_for_nor_started_again_until_it_ends(
    authority: LocalAuthority, idp: IdentityProvider
) -> None:
    clock = Clock()
    idp.hold()  # not a byte of the answer: the thread stays blocked past the deadline
    source = JwksUrl(idp.url, clock=clock, timeout=60, deadline=0.5)
    kid = authority.current_kid
    with pytest.raises(KeysUnavailable):
        await source.key(kid)
    clock.now += 10
    with pytest.raises(KeysUnavailable):
        await source.key(kid)
    assert idp.requests == 1  # one thread at a time, however long the server stalls
    idp.release()

    async def accepted() -> bool:
        clock.now += 10
        try:
            return await source.key(kid) is not None
        except KeysUnavailable:
            return False

    await until(accepted, "the token accepted once the stalled fetch has ended")


async def test_fetch_jwks_gives_up_past_its_time_limit_or_size(
    authority: LocalAuthority, idp: IdentityProvider
) -> None:
    assert authority.current_kid in await asyncio.to_thread(fetch_jwks, idp.url, 5.0)
    idp.drip = 0.05
    with pytest.raises(JwksError, match=r"longer than 0\.3 s"):
        await asyncio.to_thread(fetch_jwks, idp.url, 5.0, 0.3)
    idp.drip = None
    idp.body = b" " * (MAX_JWKS_BYTES + 1)
    with pytest.raises(JwksError, match="larger than"):
        await asyncio.to_thread(fetch_jwks, idp.url, 5.0)
    source = JwksUrl(idp.url, clock=Clock())
    with pytest.raises(KeysUnavailable):
        await source.key(authority.current_kid)


async def test_created_in_a_running_loop_it_fetches_at_once_and_is_ready_once_keys_are_held(
    authority: LocalAuthority, idp: IdentityProvider
) -> None:
    idp.hold()
    source = JwksUrl(idp.url, clock=Clock())
    assert not source.ready
    await until(lambda: idp.requests == 1, "the first fetch started without a call")
    assert not source.ready
    idp.release()
    await until(lambda: source.ready, "ready once the keys are fetched")
    assert await source.key(authority.current_kid) is not None
    assert idp.requests == 1


async def test_created_outside_a_running_loop_it_fetches_at_the_first_call(
    authority: LocalAuthority, idp: IdentityProvider
) -> None:
    source = await asyncio.to_thread(JwksUrl, idp.url, clock=Clock())
    assert not source.ready
    assert idp.requests == 0
    assert await source.key(authority.current_kid) is not None
    assert source.ready
    assert idp.requests == 1


async def test_available_keeps_fetching_until_keys_are_held_without_any_token(
    authority: LocalAuthority,
) -> None:
    """What readiness asks: a first fetch that failed is tried again (once per interval) with no call coming."""
    clock, fetches = Clock(), Fetches(authority)
    fetches.failing = True
    source = JwksUrl("https://idp/jwks", clock=clock, fetch=fetches)  # in a loop: fetches at once
    await until(lambda: fetches.calls == 1 and not source._in_flight(), "the first fetch failed")
    assert not await source.available()
    assert fetches.calls == 1  # within the interval: no new fetch
    fetches.failing = False
    clock.now += 10
    assert not await source.available()  # started a fetch, not done yet
    await until(lambda: source.ready, "the keys fetched")
    assert await source.available()
    assert fetches.calls == 2
    # A file is held from the start.
    assert await JwksFile(authority.jwks_path).available()
