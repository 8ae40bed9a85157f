"""Where token signing keys come from: a JWKS file (re-read when it changes) or URL (cached, re-fetched).

Both follow key rotation: a token that names a key id (`kid`) not held yet makes the
source look again (the file at once, the URL at most once per `refetch_interval`),
so a new key is accepted as soon as it is published, and a removed one is refused
once the source has been read again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from payments_common.errors import Unavailable

log = logging.getLogger(__name__)

# The signature algorithms accepted: never `none`, never a shared secret (HS*).
ALGORITHMS: Final = ("ES256", "RS256", "EdDSA")
MIN_RSA_BITS: Final = 2048
# A JWKS larger than this is refused: a key set is a few kilobytes.
MAX_JWKS_BYTES: Final = 1024 * 1024
# A fetch of a JWKS URL that has not ended within this many seconds counts as failed.
FETCH_DEADLINE_SECONDS: Final = 10.0
_READ_CHUNK: Final = 64 * 1024


class JwksError(ValueError):
    """A document that is not a usable JWKS (the message says why)."""


class KeysUnavailable(Unavailable):
    """The key set could not be fetched yet; the call can be retried."""

    def __init__(self) -> None:
        super().__init__("KEYS_UNAVAILABLE", "the keys that verify tokens are not available; retry later")


def parse_jwks(document: object) -> dict[str, jwt.PyJWK]:
    """The usable signing keys of a JWKS document, by kid; JwksError when it is not a JWKS.

    A key without a kid, meant for encryption, of an algorithm not accepted, or an RSA
    key shorter than 2048 bits is left out (and logged). A JWKS whose keys are all left
    out, or that lists none, is what it says: no key is trusted, and every token is refused.
    So publishing a new set withdraws every key it does not hold, usable or not (how a
    compromised key is withdrawn, before its replacement exists if need be).
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JwksError('not a JWKS: expected an object with a "keys" list')
    keys: dict[str, jwt.PyJWK] = {}
    for entry in document["keys"]:
        kid = entry.get("kid") if isinstance(entry, dict) else None
        if not isinstance(kid, str) or not kid or entry.get("use", "sig") != "sig":
            log.warning("JWKS key left out: no kid, or not a signing key")
            continue
        try:
            key = jwt.PyJWK(entry)
        except Exception as error:  # a malformed key (a member missing, say) is left out, whatever it raises
            log.warning("JWKS key %s left out: %s", kid, type(error).__name__)
            continue
        if key.algorithm_name not in ALGORITHMS:
            log.warning("JWKS key %s left out: algorithm %s is not accepted", kid, key.algorithm_name)
            continue
        if isinstance(key.key, rsa.RSAPublicKey) and key.key.key_size < MIN_RSA_BITS:
            log.warning("JWKS key %s left out: RSA keys need at least %d bits", kid, MIN_RSA_BITS)
            continue
        keys[kid] = key
    if not keys:
        log.warning("the JWKS holds no usable key: every token is refused until keys are published")
    return keys


def _require_usable(keys: dict[str, jwt.PyJWK], document: dict[str, Any]) -> None:
    """At start, a JWKS that lists keys of which none can be used is a mistake, not a withdrawal."""
    if not keys and document["keys"]:
        raise JwksError(f"no usable signing key (accepted algorithms: {', '.join(ALGORITHMS)})")


class KeySource(Protocol):
    async def key(self, kid: str) -> jwt.PyJWK | None:
        """The published key with this kid, or None."""

    async def available(self) -> bool:
        """Whether keys are held; a source that holds none starts getting them (as its limits allow)."""


def read_jwks_file(path: Path, at_start: bool = False) -> dict[str, jwt.PyJWK]:
    """The keys of a JWKS file; JwksError (naming the file) when it cannot be read or is not a JWKS.

    `at_start`, a file that lists keys of which none can be used is an error too.
    """
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_JWKS_BYTES + 1)
    except OSError as error:
        raise JwksError(f"cannot read {path}: {error.strerror}") from None
    if len(raw) > MAX_JWKS_BYTES:
        raise JwksError(f"{path} is larger than {MAX_JWKS_BYTES} bytes")
    try:
        document = json.loads(raw)
    except ValueError:
        raise JwksError(f"{path} is not JSON") from None
    keys = parse_jwks(document)
    if at_start:
        _require_usable(keys, document)
    return keys


def _signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when the file is replaced (Kubernetes swaps a symlink) or rewritten."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


class JwksFile:
    """A JWKS in a file: read at start (it must be valid then), re-read when it changes.

    The file is checked at most once per `check_interval` seconds, and whenever a token
    names a kid not held. A changed file that cannot be read or is not a JWKS (not JSON,
    say) leaves the keys as they were (logged), so a half-written secret does not lock every
    caller out; a changed JWKS replaces them all, so a key it does not hold, or holds in a
    form that cannot be used, is withdrawn (`{"keys": []}` withdraws every key).
    """

    def __init__(
        self, path: Path, check_interval: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = path
        self._check_interval = check_interval
        self._clock = clock
        self._seen = _signature(path)
        self._keys = read_jwks_file(path, at_start=True)
        self._checked = clock()

    def _reload_if_changed(self) -> None:
        self._checked = self._clock()
        seen = _signature(self.path)
        if seen == self._seen:
            return
        self._seen = seen
        try:
            self._keys = read_jwks_file(self.path)
        except JwksError as error:
            log.error("JWKS file changed but cannot be used, keeping the keys held: %s", error)
            return
        log.info("JWKS file reloaded", extra={"kids": sorted(self._keys)})

    async def available(self) -> bool:
        return True  # read at start, and a file that cannot be used then stops the start

    async def key(self, kid: str) -> jwt.PyJWK | None:
        if self._clock() - self._checked >= self._check_interval:
            self._reload_if_changed()
        found = self._keys.get(kid)
        if found is None:
            self._reload_if_changed()  # a stat, and a read only when the file changed
            found = self._keys.get(kid)
        return found


def fetch_jwks(url: str, timeout: float, time_limit: float = FETCH_DEADLINE_SECONDS) -> dict[str, jwt.PyJWK]:
    """The keys of the JWKS at `url` (blocking: run it off the event loop).

    `timeout` bounds each socket operation; the body is read in pieces and the fetch gives
    up (JwksError) once `time_limit` seconds have passed since it began, or once the body
    is larger than MAX_JWKS_BYTES. (A server dripping its headers is bounded only by
    `timeout` per read: JwksUrl stops waiting at its deadline whatever the thread does.)
    """
    deadline = time.monotonic() + time_limit
    # The settings allow only http(s) URLs here: urllib's other schemes (file:) never reach it.
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        raw = bytearray()
        while True:
            if time.monotonic() >= deadline:
                raise JwksError(f"the JWKS took longer than {time_limit:g} s to fetch")
            chunk = response.read1(_READ_CHUNK)
            if not chunk:
                break
            raw += chunk
            if len(raw) > MAX_JWKS_BYTES:
                raise JwksError(f"the JWKS is larger than {MAX_JWKS_BYTES} bytes")
    try:
        document: Any = json.loads(raw)
    except ValueError:
        raise JwksError("the JWKS is not JSON") from None
    return parse_jwks(document)


Fetch = Callable[[str, float, float], dict[str, jwt.PyJWK]]
"""A blocking fetch of a JWKS: (url, timeout of each read, overall time limit) -> keys by kid."""


class JwksUrl:
    """A JWKS fetched over HTTP(S), off the event loop, cached for `cache_seconds`.

    The first fetch starts when the source is created in a running event loop, else at the
    first call; `ready` is True once a fetch has succeeded (keys are held).

    A kid held is answered at once from the keys held, even while a fetch is in flight:
    when the keys are stale (older than `cache_seconds`) the call starts a fetch in the
    background and is answered from the stale keys meanwhile, so a slow identity provider
    never delays tokens whose key is known (a key removed from the set is refused once the
    fetch has succeeded). Only a kid not held waits: for the fetch in flight if there is
    one, else for a new one, at most once per `refetch_interval` seconds (so tokens with
    made-up kids cannot make it hammer the identity provider). A fetch is shared by every
    caller waiting for it; one caller giving up does not cancel it.

    A fetch runs in a daemon thread and has an overall `deadline` (seconds): past it, the
    callers stop waiting and the fetch counts as failed, the thread being left to finish on
    its own (no other fetch starts until it has). A failed fetch keeps the keys held and is
    logged; until the first fetch succeeds, calls with tokens fail with UNAVAILABLE
    (KEYS_UNAVAILABLE).
    """

    def __init__(
        self,
        url: str,
        cache_seconds: float = 300.0,
        refetch_interval: float = 10.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        fetch: Fetch = fetch_jwks,
        deadline: float = FETCH_DEADLINE_SECONDS,
    ) -> None:
        self.url = url
        self._cache_seconds = cache_seconds
        self._refetch_interval = refetch_interval
        self._timeout = timeout
        self._deadline = deadline
        self._clock = clock
        self._fetch = fetch
        self._keys: dict[str, jwt.PyJWK] | None = None
        self._fetched = 0.0  # when the keys held were fetched
        self._attempted: float | None = None  # when the last fetch started
        self._running: asyncio.Task[None] | None = None  # the fetch the callers wait for
        self._thread_ended: threading.Event | None = None  # set when the last fetch's thread is done fetching
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop yet: the first call fetches
        self._start()

    @property
    def ready(self) -> bool:
        """True once a fetch has succeeded: keys are held (stale or not)."""
        return self._keys is not None

    def _in_flight(self) -> bool:
        return self._running is not None and not self._running.done()

    def _may_fetch(self) -> bool:
        return self._attempted is None or self._clock() - self._attempted >= self._refetch_interval

    def _start(self) -> None:
        """Starts a fetch (the caller has checked that none is in flight and that one may start)."""
        self._attempted = self._clock()
        self._running = asyncio.get_running_loop().create_task(self._fetch_now(), name="jwks-fetch")

    def _stale(self) -> bool:
        return self._keys is None or self._clock() - self._fetched >= self._cache_seconds

    def _in_thread(self) -> asyncio.Future[dict[str, jwt.PyJWK]]:
        """Runs the blocking fetch in a daemon thread; its outcome, as a future of this loop."""
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[dict[str, jwt.PyJWK]] = loop.create_future()
        # Nobody may be waiting any more when it ends (past the deadline): the error is not "never retrieved".
        outcome.add_done_callback(lambda done: done.cancelled() or done.exception())

        def settle(keys: dict[str, jwt.PyJWK] | None, error: Exception | None) -> None:
            if outcome.done():
                return
            if error is not None:
                outcome.set_exception(error)
            else:
                outcome.set_result(keys or {})

        def run() -> None:
            keys: dict[str, jwt.PyJWK] | None = None
            error: Exception | None = None
            try:
                keys = self._fetch(self.url, self._timeout, self._deadline)
            except Exception as failure:  # handed to the loop, which logs it
                error = failure
            ended.set()  # before the loop hears of it: the next fetch may start then
            with contextlib.suppress(RuntimeError):  # the loop has closed meanwhile: nobody is waiting
                loop.call_soon_threadsafe(settle, keys, error)

        ended = self._thread_ended = threading.Event()
        threading.Thread(target=run, name="jwks-fetch", daemon=True).start()
        return outcome

    async def _fetch_now(self) -> None:
        if self._thread_ended is not None and not self._thread_ended.is_set():
            log.warning("JWKS fetch not started: the previous one, past its deadline, has not ended yet")
            return
        try:
            keys = await asyncio.wait_for(self._in_thread(), self._deadline)
        except TimeoutError:
            log.warning("JWKS fetch failed, keeping the keys held: no answer within %g s", self._deadline)
            return
        except Exception as error:  # the network, the server, the document: keep what is held
            log.warning("JWKS fetch failed, keeping the keys held: %s", error)
            return
        if self._keys is None or keys.keys() != self._keys.keys():
            log.info("JWKS fetched", extra={"kids": sorted(keys)})
        self._keys = keys
        self._fetched = self._clock()

    async def available(self) -> bool:
        """`ready`; until then each call starts a fetch, at most once per `refetch_interval` (a
        readiness check calls it, so that a source whose first fetch failed keeps trying without
        waiting for tokens, which a server that is not ready does not get)."""
        if not self.ready and not self._in_flight() and self._may_fetch():
            self._start()
        return self.ready

    async def key(self, kid: str) -> jwt.PyJWK | None:
        if self._stale() and not self._in_flight() and self._may_fetch():
            self._start()  # in the background: a kid held is answered from the keys held meanwhile
        found = self._keys.get(kid) if self._keys is not None else None
        if found is not None:
            return found
        # A kid not held: wait for the fetch in flight, else start one (at most once per interval).
        if not self._in_flight() and self._may_fetch():
            self._start()
        if self._running is not None and self._in_flight():
            await asyncio.shield(self._running)  # a caller that gives up does not cancel it
        if self._keys is None:
            raise KeysUnavailable()
        return self._keys.get(kid)
