"""Bearer token verification (payments_common/jwtverify.py): each way a token can be wrong has its reason."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from payments_common.errors import Unauthenticated
from payments_common.jwks import JwksFile
from payments_common.jwtverify import MESSAGES, VERIFIED_CACHE_SIZE, TokenVerifier
from stack.auth import LocalAuthority


@pytest.fixture
def authority(tmp_path: Path) -> LocalAuthority:
    return LocalAuthority.create(tmp_path)


def _verifier(authority: LocalAuthority, skew: float = 30.0) -> TokenVerifier:
    return TokenVerifier([JwksFile(authority.jwks_path)], authority.ISSUER, authority.AUDIENCE, skew)


async def _reason(authority: LocalAuthority, token: str) -> str:
    with pytest.raises(Unauthenticated) as raised:
        await _verifier(authority).verify(token)
    assert raised.value.message == MESSAGES[raised.value.reason]
    return raised.value.reason


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return ".".join([_b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode()), _b64(signature)])


def _claims(authority: LocalAuthority, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"iss": authority.ISSUER, "aud": authority.AUDIENCE, "sub": "alice", "exp": now + 600}
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


async def test_a_good_token_gives_its_claims(authority: LocalAuthority) -> None:
    claims = await _verifier(authority).verify(authority.token("alice", ["customer"], ["a-1"]))
    assert (claims["sub"], claims["roles"], claims["accounts"]) == ("alice", ["customer"], ["a-1"])


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"lifetime_seconds": -120}, "TOKEN_EXPIRED"),
        ({"not_before_offset_seconds": 120}, "TOKEN_NOT_YET_VALID"),
        ({"issuer": "https://evil.example"}, "WRONG_ISSUER"),
        ({"audience": "someone-else"}, "WRONG_AUDIENCE"),
    ],
)
async def test_claims_out_of_bounds_have_their_reason(
    authority: LocalAuthority, changes: dict[str, Any], reason: str
) -> None:
    assert await _reason(authority, authority.token("alice", [], **changes)) == reason


async def test_the_clock_skew_is_allowed(authority: LocalAuthority) -> None:
    just_expired = authority.token("alice", [], lifetime_seconds=-5)
    not_quite_valid = authority.token("alice", [], not_before_offset_seconds=5)
    assert (await _verifier(authority, skew=30).verify(just_expired))["sub"] == "alice"
    assert (await _verifier(authority, skew=30).verify(not_quite_valid))["sub"] == "alice"
    with pytest.raises(Unauthenticated):
        await _verifier(authority, skew=0).verify(just_expired)


async def test_keys_not_published_are_unknown_or_bad(authority: LocalAuthority) -> None:
    assert await _reason(authority, authority.foreign_token("mallory", ["reviewer"])) == "UNKNOWN_KEY"
    # A key of its own, under the kid of a published key: the signature does not verify.
    forged = authority.foreign_token("mallory", ["reviewer"], kid=authority.current_kid)
    assert await _reason(authority, forged) == "BAD_SIGNATURE"


async def test_a_tampered_payload_does_not_verify(authority: LocalAuthority) -> None:
    header, _, signature = authority.token("alice", ["customer"]).split(".")
    payload = _b64(json.dumps(_claims(authority, sub="alice", roles=["reviewer"])).encode())
    assert await _reason(authority, f"{header}.{payload}.{signature}") == "BAD_SIGNATURE"


@pytest.mark.parametrize(
    "token",
    ["", "x", "a.b", "a.b.c", "a.b.c.d.e", "Bearer", "eyJhbGciOiJFUzI1NiJ9.%%%.sig", "\u00e9.\u00e9.\u00e9"],
)
async def test_garbage_is_malformed(authority: LocalAuthority, token: str) -> None:
    assert await _reason(authority, token) == "TOKEN_MALFORMED"


async def test_unsigned_and_shared_secret_tokens_are_never_accepted(authority: LocalAuthority) -> None:
    kid = authority.current_kid
    claims = _claims(authority)
    assert await _reason(authority, _unsigned({"alg": "none", "kid": kid}, claims)) == "BAD_SIGNATURE"
    # HS256 keyed with the published key: the classic algorithm confusion.
    header, body = _unsigned({"alg": "HS256", "kid": kid}, claims).split(".")[:2]
    secret = json.dumps(authority.jwks()["keys"][0]).encode()
    mac = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    assert await _reason(authority, f"{header}.{body}.{_b64(mac)}") == "BAD_SIGNATURE"


async def test_a_header_alg_other_than_the_keys_is_a_bad_signature(authority: LocalAuthority) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(_claims(authority), rsa_key, algorithm="RS256", headers={"kid": authority.current_kid})
    assert await _reason(authority, token) == "BAD_SIGNATURE"


async def test_a_token_without_a_usable_kid_names_an_unknown_key(authority: LocalAuthority) -> None:
    key = serialization.load_pem_private_key(
        (authority.directory / "keys" / f"{authority.current_kid}.pem").read_bytes(), password=None
    )
    for headers in ({}, {"kid": ""}):
        token = jwt.encode(_claims(authority), key, algorithm="ES256", headers=headers)  # type: ignore[arg-type]
        assert await _reason(authority, token) == "UNKNOWN_KEY"
    # A kid that is not text makes the header itself malformed.
    odd = _unsigned({"alg": "ES256", "kid": 7}, _claims(authority), b"sig")
    assert await _reason(authority, odd) == "TOKEN_MALFORMED"


@pytest.mark.parametrize("missing", ["exp", "iss", "aud", "sub"])
async def test_a_required_claim_missing_is_malformed_or_wrong(
    authority: LocalAuthority, missing: str
) -> None:
    key = serialization.load_pem_private_key(
        (authority.directory / "keys" / f"{authority.current_kid}.pem").read_bytes(), password=None
    )
    claims = _claims(authority, **{missing: None})
    token = jwt.encode(claims, key, algorithm="ES256", headers={"kid": authority.current_kid})  # type: ignore[arg-type]
    assert await _reason(authority, token) == "TOKEN_MALFORMED"


async def test_a_subject_that_is_not_text_is_malformed(authority: LocalAuthority) -> None:
    key = serialization.load_pem_private_key(
        (authority.directory / "keys" / f"{authority.current_kid}.pem").read_bytes(), password=None
    )
    for subject in (42, "", "x" * 256):  # OpenID Connect: at most 255 characters
        claims = _claims(authority, sub=subject)
        token = jwt.encode(claims, key, algorithm="ES256", headers={"kid": authority.current_kid})  # type: ignore[arg-type]
        assert await _reason(authority, token) == "TOKEN_MALFORMED"
    longest = authority.token("x" * 255, ["reviewer"])
    assert (await _verifier(authority).verify(longest))["sub"] == "x" * 255


async def test_eddsa_and_rsa_keys_verify_too(tmp_path: Path) -> None:
    ed_key = ed25519.Ed25519PrivateKey.generate()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks = {
        "keys": [
            {**json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(ed_key.public_key())), "kid": "ed"},
            {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key())), "kid": "rsa"},
        ]
    }
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    verifier = TokenVerifier([JwksFile(path)], "https://issuer", "aud")
    claims = {"iss": "https://issuer", "aud": "aud", "sub": "svc", "exp": int(time.time()) + 60}
    for key, alg, kid in ((ed_key, "EdDSA", "ed"), (rsa_key, "RS256", "rsa")):
        token = jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})
        assert (await verifier.verify(token))["sub"] == "svc"


async def test_no_message_names_what_the_server_expects(authority: LocalAuthority) -> None:
    wrong = [
        authority.token("alice", [], issuer="https://evil.example"),
        authority.token("alice", [], audience="other"),
        authority.foreign_token("alice", []),
    ]
    for token in wrong:
        with pytest.raises(Unauthenticated) as raised:
            await _verifier(authority).verify(token)
        text = raised.value.message + str(raised.value.metadata)
        for secret in (authority.ISSUER, authority.AUDIENCE, authority.current_kid):
            assert secret not in text


async def test_a_remembered_token_is_checked_again_for_its_key_and_its_times(tmp_path: Path) -> None:
    authority = LocalAuthority.create(tmp_path)
    now = [time.time()]
    source = JwksFile(authority.jwks_path, check_interval=0)
    verifier = TokenVerifier([source], authority.ISSUER, authority.AUDIENCE, 30, clock=lambda: now[0])
    old_kid = authority.current_kid
    token = authority.token("alice", ["customer"], lifetime_seconds=600)
    assert (await verifier.verify(token))["sub"] == "alice"
    assert (await verifier.verify(token))["sub"] == "alice"  # remembered
    # Past its expiry (and the skew), a remembered token is refused all the same.
    now[0] += 600 + 31
    with pytest.raises(Unauthenticated) as expired:
        await verifier.verify(token)
    assert expired.value.reason == "TOKEN_EXPIRED"
    # Its key removed from the JWKS, a remembered token is refused.
    now[0] = time.time()
    fresh = authority.token("alice", ["customer"])
    await verifier.verify(fresh)
    authority.rotate()
    authority.retire(old_kid)
    with pytest.raises(Unauthenticated) as removed:
        await verifier.verify(fresh)
    assert removed.value.reason == "UNKNOWN_KEY"
    # Every key withdrawn at once (an empty JWKS), a remembered token is refused too.
    newest = authority.token("alice", ["customer"])
    await verifier.verify(newest)
    authority.jwks_path.write_text('{"keys": []}')
    with pytest.raises(Unauthenticated) as withdrawn:
        await verifier.verify(newest)
    assert withdrawn.value.reason == "UNKNOWN_KEY"


@pytest.mark.parametrize("name", ["exp", "nbf", "iat"])
async def test_a_time_claim_that_is_not_a_number_is_malformed_every_time(
    authority: LocalAuthority, name: str
) -> None:
    """RFC 7519's NumericDate: "1893456000" is text; refused on first use and on every use after."""
    key = serialization.load_pem_private_key(
        (authority.directory / "keys" / f"{authority.current_kid}.pem").read_bytes(), password=None
    )
    value = int(time.time()) + (600 if name == "exp" else -60)
    claims = _claims(authority, **{name: str(value)})
    token = jwt.encode(claims, key, algorithm="ES256", headers={"kid": authority.current_kid})  # type: ignore[arg-type]
    verifier = _verifier(authority)
    for _ in range(2):
        with pytest.raises(Unauthenticated) as raised:
            await verifier.verify(token)
        assert raised.value.reason == "TOKEN_MALFORMED"


async def test_callers_of_one_remembered_token_all_see_its_removed_key(tmp_path: Path) -> None:
    """Calls with the same remembered token, checked at once after its key is withdrawn: UNKNOWN_KEY each."""
    authority = LocalAuthority.create(tmp_path)

    class Slow(JwksFile):
        async def key(self, kid: str) -> Any:
            await asyncio.sleep(0)  # every lookup yields, as a fetch over the network does
            return await super().key(kid)

    verifier = TokenVerifier(
        [Slow(authority.jwks_path, check_interval=0)], authority.ISSUER, authority.AUDIENCE
    )
    old_kid = authority.current_kid
    token = authority.token("alice", ["customer"])
    await verifier.verify(token)
    authority.rotate()
    authority.retire(old_kid)
    outcomes = await asyncio.gather(*(verifier.verify(token) for _ in range(10)), return_exceptions=True)
    assert all(isinstance(outcome, Unauthenticated) for outcome in outcomes), outcomes
    assert {outcome.reason for outcome in outcomes if isinstance(outcome, Unauthenticated)} == {"UNKNOWN_KEY"}


async def test_at_most_a_bounded_number_of_verified_tokens_is_remembered(authority: LocalAuthority) -> None:
    """Every client's token may be remembered, but not without limit: the oldest are forgotten."""
    verifier = _verifier(authority)
    tokens = [authority.token(f"client-{i}", ["customer"]) for i in range(VERIFIED_CACHE_SIZE + 20)]
    for token in tokens:
        await verifier.verify(token)
    assert len(verifier._verified) == VERIFIED_CACHE_SIZE
    assert tokens[0] not in verifier._verified
    assert tokens[-1] in verifier._verified
    # A forgotten token is verified again, in full.
    assert (await verifier.verify(tokens[0]))["sub"] == "client-0"
