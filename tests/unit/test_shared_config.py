"""The settings every service shares: read the same way, under the same names, whatever the prefix."""

from __future__ import annotations

import pytest

from approval_svc.config import Settings as ApprovalSettings
from history_svc.config import Settings as HistorySettings
from payments_common.grpcserver import channel_args
from payments_common.settings import ServerSettings, ServiceSettings, SettingsError
from replicator.config import Settings as ReplicatorSettings
from tests.support.auth import server_env

# What each service needs to start; a server trusts the tests' token authority besides.
REQUIRED: dict[type[ServiceSettings], dict[str, str]] = {
    ApprovalSettings: {"APPROVAL_DATABASE_URL": "postgresql://u@db/payments", **server_env("APPROVAL_")},
    HistorySettings: {
        "HISTORY_REDIS_URL": "redis://r:6379/0",
        "HISTORY_PAGE_TOKEN_SECRET": "s" * 16,
        **server_env("HISTORY_"),
    },
    ReplicatorSettings: {
        "REPLICATOR_DATABASE_URL": "postgresql://db/x",
        "REPLICATOR_REDIS_URL": "redis://r:6379/0",
    },
}
SERVICES = list(REQUIRED)
SERVERS: list[type[ServerSettings]] = [ApprovalSettings, HistorySettings]


def _env(cls: type[ServiceSettings], **values: str) -> dict[str, str]:
    return {**REQUIRED[cls], **{cls.PREFIX + name: value for name, value in values.items()}}


@pytest.mark.parametrize("cls", SERVICES)
def test_every_service_reads_the_shared_settings(cls: type[ServiceSettings]) -> None:
    settings = cls.from_env(
        _env(cls, METRICS_PORT="9999", LOG_LEVEL="warning", TLS_CERT_FILE="/c.pem", TLS_KEY_FILE="/k.pem")
    )
    assert settings.metrics_port == 9999
    assert settings.log_level == "WARNING"
    assert (settings.tls.cert_file, settings.tls.key_file, settings.tls.mode) == ("/c.pem", "/k.pem", "on")


@pytest.mark.parametrize("cls", SERVICES)
@pytest.mark.parametrize(
    ("values", "variable"),
    [
        ({"METRICS_PORT": "70000"}, "METRICS_PORT"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
        ({"TLS_CERT_FILE": "/c.pem"}, "TLS_KEY_FILE"),
    ],
)
def test_every_service_refuses_the_same_bad_values(
    cls: type[ServiceSettings], values: dict[str, str], variable: str
) -> None:
    with pytest.raises(SettingsError, match=cls.PREFIX + variable):
        cls.from_env(_env(cls, **values))


@pytest.mark.parametrize("cls", SERVERS)
def test_every_server_reads_where_it_listens_its_limits_and_its_grace(cls: type[ServerSettings]) -> None:
    settings = cls.from_env(
        _env(
            cls,
            HOST="127.0.0.1",
            PORT="0",
            GRACE_SECONDS="2.5",
            MAX_MESSAGE_BYTES="65536",
            MAX_CONNECTION_AGE_SECONDS="30",
        )
    )
    assert (settings.host, settings.port, settings.grace_seconds) == ("127.0.0.1", 0, 2.5)
    args = dict(channel_args(settings))
    assert args["grpc.max_receive_message_length"] == args["grpc.max_send_message_length"] == 65536
    assert args["grpc.max_connection_age_ms"] == 30_000
    assert args["grpc.max_connection_age_grace_ms"] == 2_500


@pytest.mark.parametrize(
    ("cls", "port", "metrics_port", "max_connection_age_seconds"),
    [(ApprovalSettings, 50051, 9101, 0.0), (HistorySettings, 50052, 9102, 300.0)],
)
def test_each_server_keeps_its_own_defaults(
    cls: type[ServerSettings], port: int, metrics_port: int, max_connection_age_seconds: float
) -> None:
    settings = cls.from_env(REQUIRED[cls])
    assert (settings.host, settings.port, settings.metrics_port) == ("[::]", port, metrics_port)
    assert (settings.grace_seconds, settings.max_message_bytes) == (10.0, 4 * 1024 * 1024)
    assert settings.max_connection_age_seconds == max_connection_age_seconds
    assert ("grpc.max_connection_age_ms" in dict(channel_args(settings))) == (max_connection_age_seconds > 0)


@pytest.mark.parametrize("cls", SERVERS)
@pytest.mark.parametrize(
    ("values", "variable"),
    [
        ({"PORT": "65536"}, "PORT"),
        ({"MAX_MESSAGE_BYTES": "65535"}, "MAX_MESSAGE_BYTES"),
        ({"GRACE_SECONDS": "-1"}, "GRACE_SECONDS"),
        ({"MAX_CONNECTION_AGE_SECONDS": "soon"}, "MAX_CONNECTION_AGE_SECONDS"),
    ],
)
def test_every_server_refuses_the_same_bad_values(
    cls: type[ServerSettings], values: dict[str, str], variable: str
) -> None:
    with pytest.raises(SettingsError, match=cls.PREFIX + variable):
        cls.from_env(_env(cls, **values))


@pytest.mark.parametrize("cls", SERVICES)
def test_no_credential_is_in_the_repr(cls: type[ServiceSettings]) -> None:
    environ = {
        name: value.replace("://", "://user:hunter2-password@")
        if value.startswith(("postgres", "redis"))
        else value
        for name, value in REQUIRED[cls].items()
    }
    shown = repr(cls.from_env(environ))
    assert "hunter2" not in shown
    assert "s" * 16 not in shown


@pytest.mark.parametrize("cls", SERVICES)
def test_a_bad_setting_exits_with_status_2_and_one_line(
    cls: type[ServiceSettings], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cls.from_env_or_exit("prog", {})
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("prog: ")
    assert err.count("\n") == 1
    assert cls.PREFIX in err
