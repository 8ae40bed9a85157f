"""The history service's settings: defaults, required values, and refused values."""

from __future__ import annotations

import pytest

from history_svc.config import Settings
from payments_common.settings import SettingsError
from tests.support.auth import server_env

REQUIRED = {
    "HISTORY_REDIS_URL": "redis://127.0.0.1:6379/0",
    "HISTORY_PAGE_TOKEN_SECRET": "s" * 16,
    **server_env("HISTORY_"),
}


def test_defaults() -> None:
    settings = Settings.from_env(REQUIRED)
    assert settings.port == 50052
    assert settings.host == "[::]"
    assert settings.metrics_port == 9102
    assert settings.max_connection_age_seconds == 300
    assert settings.consistency_wait_max_seconds == 5
    assert settings.grace_seconds == 10
    assert settings.namespace == "rm:v1"
    assert settings.slot_name == "payments_read_model"
    assert settings.page_token_secret == b"s" * 16


def test_every_setting_is_read() -> None:
    settings = Settings.from_env(
        {
            **REQUIRED,
            "HISTORY_HOST": "127.0.0.1",
            "HISTORY_PORT": "0",
            "HISTORY_METRICS_PORT": "0",
            "HISTORY_MAX_CONNECTION_AGE_SECONDS": "30",
            "HISTORY_CONSISTENCY_WAIT_MAX_SECONDS": "1.5",
            "HISTORY_WATCH_QUEUE_SIZE": "8",
            "HISTORY_GRACE_SECONDS": "2",
            "HISTORY_MAX_MESSAGE_BYTES": "1048576",
            "HISTORY_LOG_LEVEL": "debug",
            "HISTORY_KEY_NAMESPACE": "rm:v2",
            "HISTORY_SLOT_NAME": "other",
            "HISTORY_REDIS_MAX_CONNECTIONS": "8",
            "HISTORY_REDIS_TIMEOUT_SECONDS": "0.5",
        }
    )
    assert (settings.host, settings.port, settings.metrics_port) == ("127.0.0.1", 0, 0)
    assert settings.max_connection_age_seconds == 30
    assert settings.consistency_wait_max_seconds == 1.5
    assert settings.watch_queue_size == 8
    assert settings.grace_seconds == 2
    assert settings.max_message_bytes == 1048576
    assert settings.log_level == "DEBUG"
    assert (settings.namespace, settings.slot_name) == ("rm:v2", "other")
    assert (settings.redis_max_connections, settings.redis_timeout_seconds) == (8, 0.5)


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"HISTORY_REDIS_URL": REQUIRED["HISTORY_REDIS_URL"]},
        {"HISTORY_PAGE_TOKEN_SECRET": "s" * 16},
        {**REQUIRED, "HISTORY_PAGE_TOKEN_SECRET": "short"},
        {**REQUIRED, "HISTORY_REDIS_URL": "http://example"},
        {**REQUIRED, "HISTORY_PORT": "x"},
        {**REQUIRED, "HISTORY_WATCH_QUEUE_SIZE": "0"},
        {**REQUIRED, "HISTORY_LOG_LEVEL": "loud"},
        {**REQUIRED, "HISTORY_REDIS_TIMEOUT_SECONDS": "0"},
    ],
)
def test_missing_or_bad_values_stop_start_up(environ: dict[str, str]) -> None:
    with pytest.raises(SettingsError):
        Settings.from_env(environ)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("HISTORY_KEY_NAMESPACE", "rm:*"),
        ("HISTORY_KEY_NAMESPACE", "rm:v1 "),
        ("HISTORY_KEY_NAMESPACE", "rm:account"),
        ("HISTORY_SLOT_NAME", "Payments"),
    ],
)
def test_a_version_that_no_replicator_could_write_is_refused(variable: str, value: str) -> None:
    """The same rules as the replicator's: a typo stops the start instead of serving an empty version."""
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env({**REQUIRED, variable: value})


def test_a_redis_cluster_url_is_accepted_and_a_malformed_one_refused() -> None:
    url = "redis+cluster://10.0.0.1:7000,10.0.0.2:7000"
    assert Settings.from_env({**REQUIRED, "HISTORY_REDIS_URL": url}).redis_url == url
    for bad in ("redis+cluster://10.0.0.1", "redis+cluster://10.0.0.1:7000/3", "http://10.0.0.1:7000"):
        with pytest.raises(SettingsError, match="HISTORY_REDIS_URL"):
            Settings.from_env({**REQUIRED, "HISTORY_REDIS_URL": bad})
