"""TLS and mutual TLS on the gRPC servers, configured by environment, with certificates made by the test."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from payments.approval.v1 import approval_service_pb2 as approval_pb
from payments.approval.v1 import approval_service_pb2_grpc as approval_grpc
from payments.history.v1 import history_service_pb2 as history_pb
from payments.history.v1 import history_service_pb2_grpc as history_grpc
from payments_common.tls import channel_credentials
from stack.clients import with_bearer
from stack.servers import free_port
from tests.support.auth import service_token
from tests.support.faults import Pki, approval_process, history_process, make_pki
from tests.support.processes import ServiceProcess


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Certificates from another CA, which the servers do not trust."""
    return make_pki(tmp_path_factory.mktemp("stranger"), label="stranger")


def tls_env(pki: Pki, mutual: bool) -> dict[str, str]:
    env = {"tls_cert_file": str(pki.server_cert), "tls_key_file": str(pki.server_key)}
    if mutual:
        env["tls_client_ca_file"] = str(pki.ca_cert)
    return env


def check(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    """The outcome of one health check over a fresh channel."""
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="liveness"), timeout=5
            )
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


@pytest.fixture(params=["tls", "mutual"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextlib.contextmanager
def serving_over_tls(process: ServiceProcess, pki: Pki, mode: str) -> Iterator[ServiceProcess]:
    """Starts the process and waits until it serves a client with `mode`'s credentials; stops it after."""
    process.start()
    try:
        process.wait_serving(60, credentials=client_credentials(pki, mode))
        yield process
    finally:
        process.stop(5)


@pytest.fixture
def approval(migrated_dsn: str, tmp_path: Path, pki: Pki, mode: str) -> Iterator[ServiceProcess]:
    process = approval_process(
        migrated_dsn, free_port(), tmp_path / "approval.log", **tls_env(pki, mode == "mutual")
    )
    with serving_over_tls(process, pki, mode):
        yield process


@pytest.fixture
def history(redis_url: str, tmp_path: Path, pki: Pki, mode: str) -> Iterator[ServiceProcess]:
    process = history_process(
        redis_url, free_port(), tmp_path / "history.log", "tls_slot", **tls_env(pki, mode == "mutual")
    )
    with serving_over_tls(process, pki, mode):
        yield process


def client_credentials(pki: Pki, mode: str) -> grpc.ChannelCredentials:
    if mode == "mutual":
        return channel_credentials(str(pki.ca_cert), str(pki.client_cert), str(pki.client_key))
    return channel_credentials(str(pki.ca_cert))


def assert_refusals(address: str, pki: Pki, stranger: Pki, mode: str) -> None:
    # Plaintext never reaches a TLS port; nor does a client that trusts another CA.
    assert check(address, None) == grpc.StatusCode.UNAVAILABLE
    assert check(address, channel_credentials(str(stranger.ca_cert))) == grpc.StatusCode.UNAVAILABLE
    if mode == "mutual":
        # Without a client certificate, or with one the server's CA did not sign: refused.
        assert check(address, channel_credentials(str(pki.ca_cert))) == grpc.StatusCode.UNAVAILABLE
        foreign = channel_credentials(str(pki.ca_cert), str(stranger.client_cert), str(stranger.client_key))
        assert check(address, foreign) == grpc.StatusCode.UNAVAILABLE


def test_approval_serves_only_over_tls(approval: ServiceProcess, pki: Pki, stranger: Pki, mode: str) -> None:
    secure = grpc.secure_channel(approval.address, client_credentials(pki, mode))
    with with_bearer(secure, service_token()) as channel:
        stub = approval_grpc.ApprovalServiceStub(channel)
        reply = stub.CreateAccount(
            approval_pb.CreateAccountRequest(
                request_id="tls-1",
                owner_name="Ada",
                currency_code="EUR",
                opening_balance_minor=10,
                per_payment_limit_minor=10,
                daily_limit_minor=10,
            ),
            timeout=10,
        )
        assert reply.account.account_id
    assert_refusals(approval.address, pki, stranger, mode)
    assert approval.alive


def test_history_serves_only_over_tls(history: ServiceProcess, pki: Pki, stranger: Pki, mode: str) -> None:
    secure = grpc.secure_channel(history.address, client_credentials(pki, mode))
    with with_bearer(secure, service_token()) as channel:
        stub = history_grpc.HistoryServiceStub(channel)
        with pytest.raises(grpc.RpcError) as missing:
            stub.GetAccount(
                history_pb.GetAccountRequest(account_id="00000000-0000-4000-8000-000000000000"), timeout=10
            )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert_refusals(history.address, pki, stranger, mode)
    assert history.alive


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"TLS_CERT_FILE": "/c.pem"}, "TLS_KEY_FILE"),
        ({"TLS_KEY_FILE": "/k.pem"}, "TLS_KEY_FILE"),
        ({"TLS_CLIENT_CA_FILE": "/ca.pem"}, "TLS_CLIENT_CA_FILE"),
    ],
)
def test_incomplete_tls_settings_stop_start_up(env: dict[str, str], variable: str) -> None:
    from approval_svc.config import Settings as ApprovalSettings
    from history_svc.config import Settings as HistorySettings
    from payments_common.settings import SettingsError

    approval_env = {
        "APPROVAL_DATABASE_URL": "postgresql://u@h/db",
        **{f"APPROVAL_{k}": v for k, v in env.items()},
    }
    with pytest.raises(SettingsError, match=f"APPROVAL_{variable}"):
        ApprovalSettings.from_env(approval_env)
    history_env = {
        "HISTORY_REDIS_URL": "redis://h:6379/0",
        "HISTORY_PAGE_TOKEN_SECRET": "x" * 32,
        **{f"HISTORY_{k}": v for k, v in env.items()},
    }
    with pytest.raises(SettingsError, match=f"HISTORY_{variable}"):
        HistorySettings.from_env(history_env)


def test_replicator_health_port_serves_only_over_tls(pki: Pki, stranger: Pki, mode: str) -> None:
    from payments_common.tls import TlsSettings
    from replicator.health import HealthServer

    settings = TlsSettings(
        cert_file=str(pki.server_cert),
        key_file=str(pki.server_key),
        client_ca_file=str(pki.ca_cert) if mode == "mutual" else "",
    )
    health = HealthServer(0, host="127.0.0.1", credentials=settings.server_credentials())
    health.start()
    try:
        address = f"127.0.0.1:{health.port}"
        assert check(address, client_credentials(pki, mode)) == grpc.StatusCode.OK
        assert_refusals(address, pki, stranger, mode)
    finally:
        health.stop()
