"""Opaque tokens: consistency tokens (a WAL position) and tamper-evident page tokens."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
import zlib

_CONSISTENCY_PREFIX = "c1."
_PAGE_VERSION = 1
_MAC_BYTES = 16


class TokenError(ValueError):
    """A token is malformed, altered, or was issued for another request."""


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise TokenError("not base64url") from exc


def encode_consistency_token(lsn: int) -> str:
    """Wraps a WAL position in an opaque token with a checksum against typos and truncation.

    The token is not a secret: it only says "a read must include this position".
    """
    body = struct.pack(">Q", lsn)
    return _CONSISTENCY_PREFIX + _b64encode(body + struct.pack(">I", zlib.crc32(body)))


def decode_consistency_token(token: str) -> int:
    """Returns the WAL position of a token; raises TokenError when it is not a valid token."""
    if not token.startswith(_CONSISTENCY_PREFIX) or len(token) > 64:
        raise TokenError("unknown consistency token format")
    raw = _b64decode(token[len(_CONSISTENCY_PREFIX) :])
    if len(raw) != 12:
        raise TokenError("consistency token has the wrong length")
    body, (crc,) = raw[:8], struct.unpack(">I", raw[8:])
    if zlib.crc32(body) != crc:
        raise TokenError("consistency token checksum mismatch")
    (lsn,) = struct.unpack(">Q", body)
    return int(lsn)


class PageTokenCodec:
    """Signs page cursors with HMAC-SHA256 and binds them to the query they page through.

    A token carries the cursor and a fingerprint of the query's fields; decoding it
    with other fields, another secret, or altered bytes raises TokenError.
    """

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the page token secret must be at least 16 bytes")
        self._secret = secret

    @staticmethod
    def _fingerprint(query: tuple[object, ...]) -> bytes:
        return hashlib.sha256(repr(query).encode()).digest()[:16]

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, payload, hashlib.sha256).digest()[:_MAC_BYTES]

    def encode(self, query: tuple[object, ...], cursor: str) -> str:
        payload = bytes([_PAGE_VERSION]) + self._fingerprint(query) + cursor.encode()
        return _b64encode(payload + self._mac(payload))

    def decode(self, query: tuple[object, ...], token: str) -> str:
        if len(token) > 1024:
            raise TokenError("page token too long")
        raw = _b64decode(token)
        if len(raw) < 1 + 16 + _MAC_BYTES:
            raise TokenError("page token too short")
        payload, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise TokenError("page token signature mismatch")
        if payload[0] != _PAGE_VERSION or payload[1:17] != self._fingerprint(query):
            raise TokenError("page token belongs to another query")
        try:
            return payload[17:].decode()
        except UnicodeDecodeError as exc:
            raise TokenError("page token cursor is not text") from exc
