"""The access decision (payments_common/access.py), client certificate identities and the authentication settings."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from approval_svc.config import Settings as ApprovalSettings
from history_svc.config import Settings as HistorySettings
from payments_common.access import (
    Gate,
    MethodNotAllowed,
    OpenGate,
    PolicyGate,
    bearer_token,
    claim_values,
    gate_for,
)
from payments_common.errors import PermissionDenied, Unauthenticated
from payments_common.identity import ANONYMOUS, Caller, Identity, NotYourAccount, Source, account_ids
from payments_common.jwks import JwksFile
from payments_common.jwtverify import TokenVerifier
from payments_common.peercert import peer_subject, subject_of
from payments_common.policy import Policy
from payments_common.settings import EnvReader, SettingsError
from stack.auth import LocalAuthority
from tests.support.auth import bearer

METHOD = "/pkg.Svc/Read"
ACCOUNT = "00000000-0000-4000-8000-00000000000a"


class Context:
    """What the gate reads of a call: its metadata and its TLS peer."""

    def __init__(self, metadata: Sequence[tuple[str, str]] = (), auth: dict[str, list[bytes]] | None = None):
        self.metadata = tuple(metadata)
        self.auth = auth or {}

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return self.auth


def _certificate(common_name: str, uris: Sequence[str] = ()) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(hours=1))
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("example.org"), *(x509.UniformResourceIdentifier(u) for u in uris)]
            ),
            critical=False,
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    ("uris", "expected"),
    [
        ((), "console"),
        (
            ("https://example.org/x", "spiffe://payments.local/ns/ops/sa/console"),
            "spiffe://payments.local/ns/ops/sa/console",
        ),
        (("urn:example:console",), "urn:example:console"),
    ],
)
def test_a_certificate_names_its_spiffe_id_else_its_uri_else_its_cn(
    uris: Sequence[str], expected: str
) -> None:
    assert subject_of(_certificate("console", uris)) == expected


def test_no_certificate_no_subject() -> None:
    assert peer_subject({}) is None
    assert peer_subject({"x509_pem_cert": [b"not a certificate"]}) is None


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ([], None),
        ([("x-other", "1")], None),
        ([("authorization", "Bearer abc.def.ghi")], "abc.def.ghi"),
        ([("authorization", "bearer   abc.def.ghi  ")], "abc.def.ghi"),
    ],
)
def test_the_bearer_token_is_read_from_the_authorization_header(
    metadata: list[tuple[str, str]], token: str | None
) -> None:
    assert bearer_token(metadata) == token


@pytest.mark.parametrize(
    "metadata",
    [
        [("authorization", "Basic dXNlcjpwdw==")],
        [("authorization", "Bearer")],
        [("authorization", "Bearer ")],
        [("authorization", "abc.def.ghi")],
        [("authorization", "Bearer a b")],
        [("authorization", "Bearer a"), ("authorization", "Bearer b")],
    ],
)
def test_an_authorization_header_of_another_shape_is_malformed(metadata: list[tuple[str, str]]) -> None:
    with pytest.raises(Unauthenticated) as raised:
        bearer_token(metadata)
    assert raised.value.reason == "TOKEN_MALFORMED"


def test_claim_values_are_lists_or_space_separated_text_and_may_be_nested() -> None:
    claims = {"roles": ["a", "b"], "scope": "x y", "realm_access": {"roles": ["r"]}}
    assert claim_values(claims, "roles") == ["a", "b"]
    assert claim_values(claims, "scope") == ["x", "y"]
    assert claim_values(claims, "realm_access.roles") == ["r"]
    assert claim_values(claims, "missing") == []
    assert claim_values(claims, "realm_access.missing.deeper") == []
    for bad in ({"roles": 7}, {"roles": [1]}, {"roles": {"a": 1}}):
        with pytest.raises(Unauthenticated):
            claim_values(bad, "roles")


def test_account_ids_are_canonical() -> None:
    assert account_ids([ACCOUNT.upper(), "not-a-uuid"]) == {ACCOUNT, "not-a-uuid"}


def test_a_scoped_caller_acts_for_its_accounts_only() -> None:
    customer = Caller(Identity("alice", Source.TOKEN, frozenset({"customer"})), frozenset({ACCOUNT}))
    customer.require_account(ACCOUNT)
    customer.require_party("someone else", ACCOUNT)
    with pytest.raises(NotYourAccount) as raised:
        customer.require_account("someone else")
    assert isinstance(raised.value, PermissionDenied)
    assert raised.value.reason == "NOT_YOUR_ACCOUNT"
    with pytest.raises(NotYourAccount):
        customer.require_party("x", "y")
    service = Caller(Identity("svc", Source.TOKEN, frozenset({"gateway"})))
    service.require_account("anything")
    assert not service.scoped
    assert customer.scoped


@pytest.fixture
def authority(tmp_path: Path) -> LocalAuthority:
    return LocalAuthority.create(tmp_path)


def _gate(authority: LocalAuthority, certificates: bool = False, tokens: bool = True) -> PolicyGate:
    policy = Policy.parse(
        {
            "methods": {"pkg.Svc/Read": ["customer", "support"], "pkg.Svc/Admin": ["admin"]},
            "customer_roles": ["customer"],
            "identities": {"spiffe://payments.local/sa/console": ["admin"], "carol": ["support"]},
        },
        ["pkg.Svc/Read", "pkg.Svc/Admin"],
    )
    verifier = TokenVerifier([JwksFile(authority.jwks_path)], authority.ISSUER, authority.AUDIENCE)
    return PolicyGate(policy, verifier if tokens else None, certificates)


async def _caller(gate: Gate, method: str, context: Context) -> Caller:
    return gate.authorize(method, await gate.identify(context))


async def _refused(gate: PolicyGate, method: str, context: Context) -> tuple[type[Exception], str]:
    with pytest.raises((Unauthenticated, PermissionDenied)) as raised:
        gate.authorize(method, await gate.identify(context))
    error = raised.value
    assert isinstance(error, Unauthenticated | PermissionDenied)
    return type(error), error.reason


async def test_a_customer_token_is_scoped_to_its_accounts(authority: LocalAuthority) -> None:
    token = authority.token("alice", ["customer"], [ACCOUNT.upper()])
    caller = await _caller(_gate(authority), METHOD, Context(bearer(token)))
    assert caller.subject == "alice"
    assert caller.identity.source is Source.TOKEN
    assert caller.scope == frozenset({ACCOUNT})


async def test_a_role_beyond_customer_lifts_the_scope(authority: LocalAuthority) -> None:
    token = authority.token("svc", ["customer", "support"], [ACCOUNT])
    assert (await _caller(_gate(authority), METHOD, Context(bearer(token)))).scope is None
    # ... and so does a role the policy gives the subject.
    token = authority.token("carol", ["customer"], [ACCOUNT])
    assert (await _caller(_gate(authority), METHOD, Context(bearer(token)))).scope is None


async def test_no_role_for_the_method_is_method_not_allowed(authority: LocalAuthority) -> None:
    token = authority.token("alice", ["customer"])
    assert await _refused(_gate(authority), "/pkg.Svc/Admin", Context(bearer(token))) == (
        MethodNotAllowed,
        "METHOD_NOT_ALLOWED",
    )
    # A method the policy does not list: the same answer, whatever the roles.
    token = authority.token("root", ["customer", "support", "admin"])
    assert (await _refused(_gate(authority), "/pkg.Svc/Other", Context(bearer(token))))[
        1
    ] == "METHOD_NOT_ALLOWED"


async def test_no_credentials_are_missing(authority: LocalAuthority) -> None:
    assert await _refused(_gate(authority), METHOD, Context()) == (Unauthenticated, "CREDENTIALS_MISSING")
    # Mutual TLS on, but no certificate in the call (a plaintext port, say): missing too.
    assert (await _refused(_gate(authority, certificates=True), METHOD, Context()))[
        1
    ] == "CREDENTIALS_MISSING"


async def test_a_certificate_identity_takes_its_roles_from_the_policy(authority: LocalAuthority) -> None:
    pem = _certificate("console", ["spiffe://payments.local/sa/console"])
    context = Context(auth={"x509_pem_cert": [pem]})
    caller = await _caller(_gate(authority, certificates=True), "/pkg.Svc/Admin", context)
    assert (caller.subject, caller.identity.source, caller.scope) == (
        "spiffe://payments.local/sa/console",
        Source.CERTIFICATE,
        None,
    )
    # An unknown certificate is authenticated but holds no role.
    stranger = Context(auth={"x509_pem_cert": [_certificate("stranger")]})
    assert (await _refused(_gate(authority, certificates=True), METHOD, stranger))[1] == "METHOD_NOT_ALLOWED"
    # Without mutual TLS, a certificate is not an identity.
    assert (await _refused(_gate(authority), "/pkg.Svc/Admin", context))[1] == "CREDENTIALS_MISSING"


async def test_a_token_speaks_for_the_call_even_beside_a_certificate(authority: LocalAuthority) -> None:
    pem = _certificate("console", ["spiffe://payments.local/sa/console"])
    token = authority.token("alice", ["customer"], [ACCOUNT])
    context = Context(bearer(token), {"x509_pem_cert": [pem]})
    caller = await _caller(_gate(authority, certificates=True), METHOD, context)
    assert caller.subject == "alice"
    # A bad token is refused, not replaced by the certificate.
    bad = Context(bearer("garbage"), {"x509_pem_cert": [pem]})
    assert (await _refused(_gate(authority, certificates=True), "/pkg.Svc/Admin", bad))[
        1
    ] == "TOKEN_MALFORMED"


async def test_a_token_sent_to_a_server_that_takes_none_is_unknown_key(authority: LocalAuthority) -> None:
    token = authority.token("alice", ["customer"], [ACCOUNT])
    gate = _gate(authority, certificates=True, tokens=False)
    assert (await _refused(gate, METHOD, Context(bearer(token))))[1] == "UNKNOWN_KEY"


async def test_a_malformed_roles_claim_is_a_malformed_token(
    authority: LocalAuthority, tmp_path: Path
) -> None:
    key = serialization.load_pem_private_key(
        (tmp_path / "keys" / f"{authority.current_kid}.pem").read_bytes(), password=None
    )
    payload = jwt.decode(authority.token("alice", ["customer"]), options={"verify_signature": False})
    odd = jwt.encode(
        {**payload, "roles": {"customer": True}},
        key,  # type: ignore[arg-type]
        algorithm="ES256",
        headers={"kid": authority.current_kid},
    )
    assert (await _refused(_gate(authority), METHOD, Context(bearer(odd))))[1] == "TOKEN_MALFORMED"


async def test_with_authentication_disabled_everyone_is_anonymous_and_unscoped() -> None:
    caller = await _caller(OpenGate(), METHOD, Context())
    assert caller == Caller(ANONYMOUS)
    assert not caller.authenticated
    assert not caller.scoped


# -- the settings ---------------------------------------------------------------------------


def _auth(environ: dict[str, str], client_certificates: bool = False, prefix: str = "APPROVAL_") -> Any:
    served = ApprovalSettings.SERVED_METHODS if prefix == "APPROVAL_" else HistorySettings.SERVED_METHODS
    return EnvReader(prefix, environ).auth(served, client_certificates)


def test_the_settings_read_every_variable(authority: LocalAuthority) -> None:
    env = {
        **authority.server_env("APPROVAL_"),
        "APPROVAL_AUTH_JWKS_URL": "https://idp.example/jwks.json",
        "APPROVAL_AUTH_JWKS_CACHE_SECONDS": "60",
        "APPROVAL_AUTH_CLOCK_SKEW_SECONDS": "5",
    }
    auth = _auth(env)
    assert (auth.jwks_file, auth.jwks_url) == (str(authority.jwks_path), "https://idp.example/jwks.json")
    assert (auth.issuer, auth.audience) == (authority.ISSUER, authority.AUDIENCE)
    assert (auth.jwks_cache_seconds, auth.clock_skew_seconds) == (60, 5)
    assert auth.policy is not None
    assert not auth.disabled
    assert auth.mode(certificates=True) == "token+certificate"


def test_nothing_set_is_refused_naming_the_variables() -> None:
    with pytest.raises(SettingsError) as raised:
        _auth({})
    for name in (
        "APPROVAL_AUTH_JWKS_FILE",
        "APPROVAL_AUTH_JWKS_URL",
        "APPROVAL_TLS_CLIENT_CA_FILE",
        "APPROVAL_AUTH_DISABLED",
    ):
        assert name in str(raised.value)


def test_disabled_needs_nothing_else() -> None:
    assert _auth({"APPROVAL_AUTH_DISABLED": "true"}).disabled
    assert _auth({"APPROVAL_AUTH_DISABLED": "TRUE"}).mode(certificates=False) == "disabled"
    with pytest.raises(SettingsError, match="APPROVAL_AUTH_DISABLED must be true or false"):
        _auth({"APPROVAL_AUTH_DISABLED": "maybe"})


def test_client_certificates_alone_need_only_a_policy(authority: LocalAuthority) -> None:
    env = {"APPROVAL_AUTH_POLICY_FILE": str(authority.policy_path("APPROVAL_"))}
    auth = _auth(env, client_certificates=True)
    assert not auth.tokens
    assert auth.mode(certificates=True) == "certificate"


@pytest.mark.parametrize(
    ("change", "variable"),
    [
        ({"APPROVAL_AUTH_ISSUER": ""}, "APPROVAL_AUTH_ISSUER"),
        ({"APPROVAL_AUTH_AUDIENCE": ""}, "APPROVAL_AUTH_AUDIENCE"),
        ({"APPROVAL_AUTH_POLICY_FILE": ""}, "APPROVAL_AUTH_POLICY_FILE"),
        ({"APPROVAL_AUTH_POLICY_FILE": "/nowhere/policy.json"}, "APPROVAL_AUTH_POLICY_FILE"),
        ({"APPROVAL_AUTH_JWKS_FILE": "/nowhere/jwks.json"}, "APPROVAL_AUTH_JWKS_FILE"),
        ({"APPROVAL_AUTH_JWKS_URL": "ftp://idp/jwks"}, "APPROVAL_AUTH_JWKS_URL"),
        ({"APPROVAL_AUTH_JWKS_URL": "file:///etc/passwd"}, "APPROVAL_AUTH_JWKS_URL"),
        ({"APPROVAL_AUTH_CLOCK_SKEW_SECONDS": "-1"}, "APPROVAL_AUTH_CLOCK_SKEW_SECONDS"),
        ({"APPROVAL_AUTH_JWKS_CACHE_SECONDS": "0"}, "APPROVAL_AUTH_JWKS_CACHE_SECONDS"),
    ],
)
def test_a_bad_value_names_its_variable(
    authority: LocalAuthority, change: dict[str, str], variable: str
) -> None:
    with pytest.raises(SettingsError, match=variable):
        _auth({**authority.server_env("APPROVAL_"), **change})


def test_a_policy_of_the_other_service_is_refused(authority: LocalAuthority) -> None:
    env = {
        **authority.server_env("HISTORY_"),
        "HISTORY_AUTH_POLICY_FILE": str(authority.policy_path("APPROVAL_")),
    }
    with pytest.raises(SettingsError, match=r"HISTORY_AUTH_POLICY_FILE: .*does not serve"):
        _auth(env, prefix="HISTORY_")


def test_a_jwks_file_with_no_usable_key_is_refused(authority: LocalAuthority, tmp_path: Path) -> None:
    unusable = tmp_path / "unusable.json"
    unusable.write_text('{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}]}')
    with pytest.raises(SettingsError, match=r"APPROVAL_AUTH_JWKS_FILE: .*no usable signing key"):
        _auth({**authority.server_env("APPROVAL_"), "APPROVAL_AUTH_JWKS_FILE": str(unusable)})


def test_a_jwks_file_that_lists_no_key_is_taken_at_its_word(
    authority: LocalAuthority, tmp_path: Path
) -> None:
    """A server may start trusting no key (every token refused): the keys were withdrawn on purpose."""
    empty = tmp_path / "empty.json"
    empty.write_text('{"keys": []}')
    auth = _auth({**authority.server_env("APPROVAL_"), "APPROVAL_AUTH_JWKS_FILE": str(empty)})
    assert auth.jwks_file == str(empty)


def test_a_command_that_serves_nothing_reads_no_authentication() -> None:
    settings = ApprovalSettings.from_env({"APPROVAL_DATABASE_URL": "postgresql://db/x"}, serving=False)
    assert not settings.auth.disabled
    assert settings.auth.policy is None


@pytest.mark.parametrize(
    ("variable", "value", "complaint"),
    [
        ("AUTH_CLOCK_SKEW_SECONDS", "nan", "finite"),
        ("AUTH_CLOCK_SKEW_SECONDS", "inf", "finite"),
        ("AUTH_CLOCK_SKEW_SECONDS", "1e12", "at most 300"),
        ("AUTH_JWKS_CACHE_SECONDS", "nan", "finite"),
    ],
)
def test_a_skew_or_cache_time_that_would_switch_checks_off_is_refused(
    authority: LocalAuthority, variable: str, value: str, complaint: str
) -> None:
    """A skew of nan, inf or years would accept tokens that expired long ago."""
    env = {**authority.server_env("APPROVAL_"), f"APPROVAL_{variable}": value}
    with pytest.raises(SettingsError, match=f"APPROVAL_{variable} must be .*{complaint}"):
        _auth(env)


def test_a_jwks_url_over_plain_http_is_warned_about(
    authority: LocalAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    env = {**authority.server_env("APPROVAL_"), "APPROVAL_AUTH_JWKS_URL": "http://idp.example/jwks.json"}
    settings = ApprovalSettings.from_env({**env, "APPROVAL_DATABASE_URL": "postgresql://h/db"})
    with caplog.at_level(logging.WARNING, logger="payments_common.access"):
        gate_for(settings)
    assert any("plain http" in record.getMessage() for record in caplog.records)
