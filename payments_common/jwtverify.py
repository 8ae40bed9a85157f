"""Bearer token (JWT) verification with PyJWT: signature by a published key, then issuer, audience and times.

Every failure is an Unauthenticated error whose reason says what is wrong in general
terms; the message never names the expected issuer, audience or key ids. The claims
are only looked at once the signature has been verified.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import jwt

from payments_common.errors import Unauthenticated
from payments_common.identity import MAX_SUBJECT
from payments_common.jwks import ALGORITHMS, KeySource

# The reasons of UNAUTHENTICATED, and the message sent with each.
CREDENTIALS_MISSING: Final = "CREDENTIALS_MISSING"
TOKEN_MALFORMED: Final = "TOKEN_MALFORMED"
TOKEN_EXPIRED: Final = "TOKEN_EXPIRED"
TOKEN_NOT_YET_VALID: Final = "TOKEN_NOT_YET_VALID"
WRONG_ISSUER: Final = "WRONG_ISSUER"
WRONG_AUDIENCE: Final = "WRONG_AUDIENCE"
UNKNOWN_KEY: Final = "UNKNOWN_KEY"
BAD_SIGNATURE: Final = "BAD_SIGNATURE"

MESSAGES: Final = {
    CREDENTIALS_MISSING: "the call carries no credentials: send 'authorization: Bearer <token>'",
    TOKEN_MALFORMED: "the bearer token is malformed or lacks a required claim",
    TOKEN_EXPIRED: "the bearer token has expired",
    TOKEN_NOT_YET_VALID: "the bearer token is not valid yet",
    WRONG_ISSUER: "the bearer token was issued by an issuer this service does not trust",
    WRONG_AUDIENCE: "the bearer token is not meant for this service",
    UNKNOWN_KEY: "the bearer token is signed by a key this service does not know",
    BAD_SIGNATURE: "the bearer token's signature does not verify",
}

# Claims every token must carry.
REQUIRED_CLAIMS: Final = ("exp", "iss", "aud", "sub")


def unauthenticated(reason: str) -> Unauthenticated:
    return Unauthenticated(reason, MESSAGES[reason])


# PyJWT's errors, most specific first, and the reason each is answered with.
_REASONS: Final[Sequence[tuple[type[Exception], str]]] = (
    (jwt.ExpiredSignatureError, TOKEN_EXPIRED),
    (jwt.ImmatureSignatureError, TOKEN_NOT_YET_VALID),
    (jwt.InvalidIssuerError, WRONG_ISSUER),
    (jwt.InvalidAudienceError, WRONG_AUDIENCE),
    (jwt.InvalidSignatureError, BAD_SIGNATURE),
    (jwt.InvalidAlgorithmError, BAD_SIGNATURE),  # the header's alg is not the key's
    (jwt.InvalidKeyError, BAD_SIGNATURE),
    (jwt.PyJWTError, TOKEN_MALFORMED),
)


def _reason(error: Exception) -> str:
    return next(reason for kind, reason in _REASONS if isinstance(error, kind))


# Tokens verified recently, kept so that a client's next calls skip the signature check.
VERIFIED_CACHE_SIZE: Final = 1024


@dataclass(frozen=True)
class _Verified:
    claims: dict[str, Any]
    key: jwt.PyJWK  # the key object that verified it: a reloaded or removed key misses the cache


TIME_CLAIMS: Final = ("exp", "nbf", "iat")


def _numeric_date(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class TokenVerifier:
    """Verifies bearer tokens against the keys of its sources, the issuer, the audience and the clock.

    A verified token is remembered (a bounded LRU): its next use checks only that the key
    that verified it is still the one published under its kid, and the token's times.
    """

    def __init__(
        self,
        sources: Sequence[KeySource],
        issuer: str,
        audience: str,
        clock_skew_seconds: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._sources = sources
        self._issuer = issuer
        self._audience = audience
        self._leeway = clock_skew_seconds
        self._clock = clock
        self._verified: OrderedDict[str, _Verified] = OrderedDict()

    def expires_at(self, claims: dict[str, Any]) -> float:
        """When a verified token stops being accepted: its expiry plus the clock skew allowed."""
        return float(claims["exp"]) + self._leeway

    def _still_valid(self, claims: dict[str, Any]) -> None:
        """The time checks of a token verified before (its claims are known to be numbers)."""
        now = self._clock()
        if claims["exp"] <= now - self._leeway:
            raise unauthenticated(TOKEN_EXPIRED)
        if max(claims.get("nbf", 0), claims.get("iat", 0)) > now + self._leeway:
            raise unauthenticated(TOKEN_NOT_YET_VALID)

    def _remember(self, token: str, verified: _Verified) -> None:
        self._verified[token] = verified
        if len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)

    async def _key(self, kid: str) -> jwt.PyJWK | None:
        for source in self._sources:
            found = await source.key(kid)
            if found is not None:
                return found
        return None

    async def available(self) -> bool:
        """Whether every source holds keys (each that holds none starts getting them)."""
        held = [await source.available() for source in self._sources]
        return all(held)

    async def verify(self, token: str) -> dict[str, Any]:
        """The token's claims; Unauthenticated with the reason when it is not acceptable."""
        known = self._verified.get(token)
        if known is not None:
            kid = known.key.key_id
            if kid is not None and await self._key(kid) is known.key:
                self._still_valid(known.claims)
                self._verified.move_to_end(token)
                return known.claims
            self._verified.pop(token, None)  # another call with this token may have dropped it already
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise unauthenticated(TOKEN_MALFORMED) from None
        if header.get("alg") not in ALGORITHMS:
            raise unauthenticated(BAD_SIGNATURE)  # `none`, or a shared secret: never accepted
        kid = header.get("kid")
        key = await self._key(kid) if isinstance(kid, str) and kid else None
        if key is None:
            raise unauthenticated(UNKNOWN_KEY)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[key.algorithm_name],
                issuer=self._issuer,
                audience=self._audience,
                leeway=self._leeway,
                options={"require": list(REQUIRED_CLAIMS), "enforce_minimum_key_length": True},
            )
        except jwt.PyJWTError as error:
            raise unauthenticated(_reason(error)) from None
        if not isinstance(claims["sub"], str) or not 0 < len(claims["sub"]) <= MAX_SUBJECT:
            raise unauthenticated(TOKEN_MALFORMED)
        # NumericDate (RFC 7519): PyJWT reads "1893456000" as a number, but it is text.
        if any(not _numeric_date(claims[name]) for name in TIME_CLAIMS if name in claims):
            raise unauthenticated(TOKEN_MALFORMED)
        self._remember(token, _Verified(claims, key))
        return claims
