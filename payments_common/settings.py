"""Settings from the environment: the reader, and the base that every service's settings extend.

A service declares its settings as a frozen dataclass that extends `ServiceSettings`
(a process: log level, metrics port, TLS) or `ServerSettings` (a gRPC server besides:
host, port, limits, shutdown grace, authentication), names its variable prefix, and
reads only its own fields in `read`; `from_env` reads the shared ones, under the same
names everywhere.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final, Self, TypeVar

from payments_common.authsettings import AuthSettings
from payments_common.jwks import JwksError, read_jwks_file
from payments_common.policy import Policy, PolicyError
from payments_common.redisurl import SCHEMES, url_problem
from payments_common.tls import TlsSettings

# Where a server listens unless told otherwise: every interface, IPv6 and IPv4.
ALL_INTERFACES: Final = "[::]"


class SettingsError(Exception):
    """A setting is missing or malformed; the message names the variable."""


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()

V = TypeVar("V")

# A larger skew would keep expired tokens alive for longer than a clock is ever wrong.
MAX_CLOCK_SKEW_SECONDS: Final = 300.0
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Below this, a page of ListPayments or a payment with a long timeline might not fit.
MIN_MESSAGE_BYTES: Final = 64 * 1024


class EnvReader:
    """Reads `<PREFIX><NAME>` variables from one environment mapping.

    A variable `<PREFIX><NAME>_FILE` holding a path is read from that file
    instead, so that Kubernetes can mount credentials as files.
    """

    def __init__(self, prefix: str, environ: Mapping[str, str], serving: bool = True) -> None:
        self.prefix = prefix
        self.environ = environ
        # False for a command that serves no calls (a migration): it needs no authentication settings.
        self.serving = serving

    def _raw(self, name: str) -> str | None:
        key = self.prefix + name
        path = self.environ.get(key + "_FILE")
        if path:
            try:
                return Path(path).read_text().strip()
            except OSError as exc:
                raise SettingsError(f"{key}_FILE: cannot read {path}: {exc.strerror}") from exc
        return self.environ.get(key)

    def _parsed(self, name: str, default: V | _Required, parse: Callable[[str], V], expected: str) -> V:
        """The variable through `parse`, or `default` when unset or empty (an error if REQUIRED).

        A ValueError from `parse` becomes "<VARIABLE> must be <expected>, got <raw>".
        """
        raw = self._raw(name)
        if raw is None or raw == "":
            if isinstance(default, _Required):
                raise SettingsError(f"{self.prefix}{name} is required but not set")
            return default
        try:
            return parse(raw)
        except ValueError:
            raise SettingsError(f"{self.prefix}{name} must be {expected}, got {raw!r}") from None

    def text(self, name: str, default: str | _Required = REQUIRED) -> str:
        return self._parsed(name, default, str, "text")

    def url(self, name: str, schemes: tuple[str, ...]) -> str:
        """A required URL that starts with one of `schemes` ("redis://", ...)."""
        value = self.text(name)
        if not value.startswith(schemes):
            allowed = ", ".join(schemes[:-1]) + f" or {schemes[-1]}" if len(schemes) > 1 else schemes[0]
            raise SettingsError(f"{self.prefix}{name} must start with {allowed}")
        return value

    def redis_url(self, name: str) -> str:
        """A required Redis URL: one node's, or a cluster's seeds (payments_common/redisconn.py)."""
        value = self.url(name, SCHEMES)
        problem = url_problem(value)
        if problem:
            raise SettingsError(f"{self.prefix}{name} {problem}")
        return value

    def flag(self, name: str, default: bool = False) -> bool:
        """A boolean: true or false (also 1/0, yes/no), any case."""
        raw = self.text(name, "").strip().lower()
        if not raw:
            return default
        if raw in ("true", "1", "yes"):
            return True
        if raw in ("false", "0", "no"):
            return False
        raise SettingsError(f"{self.prefix}{name} must be true or false, got {raw!r}")

    def integer(self, name: str, default: int | _Required = REQUIRED, minimum: int | None = None) -> int:
        value = self._parsed(name, default, int, "an integer")
        if minimum is not None and value < minimum:
            raise SettingsError(f"{self.prefix}{name} must be at least {minimum}, got {value}")
        return value

    def port(self, name: str, default: int) -> int:
        """A TCP port; 0 means any free port (or, for an optional port, none)."""
        value = self.integer(name, default, minimum=0)
        if value > 65535:
            raise SettingsError(f"{self.prefix}{name} must be at most 65535, got {value}")
        return value

    def number(self, name: str, default: float | _Required = REQUIRED, maximum: float | None = None) -> float:
        """A finite number, not negative (nan and inf are refused), at most `maximum` if given."""
        value = self._parsed(name, default, float, "a number")
        if not math.isfinite(value):
            raise SettingsError(f"{self.prefix}{name} must be a finite number, got {value}")
        if value < 0:
            raise SettingsError(f"{self.prefix}{name} must not be negative, got {value}")
        if maximum is not None and value > maximum:
            raise SettingsError(f"{self.prefix}{name} must be at most {maximum:g}, got {value:g}")
        return value

    def positive(self, name: str, default: float) -> float:
        """A number above zero (a timeout, say, where 0 would mean "fail at once")."""
        value = self.number(name, default)
        if value <= 0:
            raise SettingsError(f"{self.prefix}{name} must be positive, got {value}")
        return value

    def log_level(self, default: str) -> str:
        level = self.text("LOG_LEVEL", default).upper()
        if level not in LOG_LEVELS:
            raise SettingsError(f"{self.prefix}LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return level

    def tls(self) -> TlsSettings:
        """The PEM files of the port the process serves: both or neither of certificate and key."""
        tls = TlsSettings(
            cert_file=self.text("TLS_CERT_FILE", ""),
            key_file=self.text("TLS_KEY_FILE", ""),
            client_ca_file=self.text("TLS_CLIENT_CA_FILE", ""),
        )
        if bool(tls.cert_file) != bool(tls.key_file):
            raise SettingsError(
                f"{self.prefix}TLS_CERT_FILE and {self.prefix}TLS_KEY_FILE must be set together"
            )
        if tls.client_ca_file and not tls.cert_file:
            raise SettingsError(
                f"{self.prefix}TLS_CLIENT_CA_FILE needs {self.prefix}TLS_CERT_FILE and _KEY_FILE"
            )
        return tls

    def auth(
        self, served: Collection[str], client_certificates: bool, scoped: Collection[str] | None = None
    ) -> AuthSettings:
        """Authentication: a JWKS (file, URL) and/or client certificates, and the policy; or disabled.

        The policy is checked against `served`, the methods the server serves. Nothing set
        and not disabled is an error: authentication is on unless turned off explicitly.
        """
        p = self.prefix
        if self.flag("AUTH_DISABLED"):
            return AuthSettings(disabled=True)
        jwks_file = self.text("AUTH_JWKS_FILE", "")
        jwks_url = self.text("AUTH_JWKS_URL", "")
        if not (jwks_file or jwks_url or client_certificates):
            raise SettingsError(
                f"authentication needs {p}AUTH_JWKS_FILE or {p}AUTH_JWKS_URL (bearer tokens) or "
                f"{p}TLS_CLIENT_CA_FILE (client certificates); {p}AUTH_DISABLED=true turns it off"
            )
        if jwks_url and not jwks_url.startswith(("https://", "http://")):
            raise SettingsError(f"{p}AUTH_JWKS_URL must start with https:// or http://")
        if jwks_file:
            try:
                read_jwks_file(Path(jwks_file), at_start=True)
            except JwksError as error:
                raise SettingsError(f"{p}AUTH_JWKS_FILE: {error}") from None
        tokens = bool(jwks_file or jwks_url)
        policy_file = self.text("AUTH_POLICY_FILE", "")
        if not policy_file:
            raise SettingsError(f"{p}AUTH_POLICY_FILE is required unless {p}AUTH_DISABLED=true")
        try:
            policy = Policy.load(Path(policy_file), served, scoped)
        except PolicyError as error:
            raise SettingsError(f"{p}AUTH_POLICY_FILE: {error}") from None
        return AuthSettings(
            jwks_file=jwks_file,
            jwks_url=jwks_url,
            jwks_cache_seconds=self.positive("AUTH_JWKS_CACHE_SECONDS", AuthSettings.jwks_cache_seconds),
            # Required with a JWKS: a token is only accepted from one issuer, for one audience.
            issuer=self.text("AUTH_ISSUER") if tokens else "",
            audience=self.text("AUTH_AUDIENCE") if tokens else "",
            clock_skew_seconds=self.number(
                "AUTH_CLOCK_SKEW_SECONDS", AuthSettings.clock_skew_seconds, maximum=MAX_CLOCK_SKEW_SECONDS
            ),
            policy_file=policy_file,
            policy=policy,
        )


@dataclass(frozen=True, kw_only=True)
class ServiceSettings:
    """What every process of the platform reads: its log level, its metrics port and its TLS files.

    A subclass sets `PREFIX`, declares its own fields (and may give a shared one its own
    default, such as the metrics port) and extends `read` with its own fields.
    """

    PREFIX: ClassVar[str] = ""

    metrics_port: int = 0  # 0 serves no metrics
    log_level: str = "INFO"
    tls: TlsSettings = field(default_factory=TlsSettings)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, serving: bool = True) -> Self:
        """Reads the settings (from os.environ by default); raises SettingsError naming the variable at fault.

        `serving` False reads what a command that serves no calls needs (no authentication).
        """
        env = EnvReader(cls.PREFIX, os.environ if environ is None else environ, serving)
        return cls(**cls.read(env))

    @classmethod
    def read(cls, env: EnvReader) -> dict[str, Any]:
        """The value of each field, by field name; a subclass adds its own to those of its base."""
        return {
            "metrics_port": env.port("METRICS_PORT", cls.metrics_port),
            "log_level": env.log_level(cls.log_level),
            "tls": env.tls(),
        }

    @classmethod
    def from_env_or_exit(
        cls, program: str, environ: Mapping[str, str] | None = None, *, serving: bool = True
    ) -> Self:
        """The settings, or exit status 2 with one line on stderr naming the variable at fault."""
        try:
            return cls.from_env(environ, serving=serving)
        except SettingsError as error:
            print(f"{program}: {error}", file=sys.stderr)
            raise SystemExit(2) from None


@dataclass(frozen=True, kw_only=True)
class ServerSettings(ServiceSettings):
    """What every gRPC server reads besides: where it listens, its limits, its shutdown grace, who may call.

    A subclass names in `SERVED_METHODS` the methods it serves ("package.Service/Method"),
    against which the authorization policy is checked, and in `SCOPED_METHODS` those that
    confine a customer to its accounts.
    """

    SERVED_METHODS: ClassVar[tuple[str, ...]] = ()
    # The served methods whose handlers confine a customer to its accounts: only these may
    # give a customer role.
    SCOPED_METHODS: ClassVar[tuple[str, ...]] = ()

    host: str = ALL_INTERFACES
    port: int = 0  # 0 picks a free port
    max_message_bytes: int = 4 * 1024 * 1024
    # Older connections are closed (GOAWAY), so that clients rebalance onto new pods; 0 keeps them.
    max_connection_age_seconds: float = 0.0
    # On SIGTERM, how long calls in flight may finish; also the grace of an aged connection.
    grace_seconds: float = 10.0
    auth: AuthSettings = field(default_factory=AuthSettings)

    @classmethod
    def read(cls, env: EnvReader) -> dict[str, Any]:
        shared = super().read(env)
        return {
            **shared,
            # Unread for a command that serves nothing: a server built with it refuses to start.
            "auth": (
                env.auth(cls.SERVED_METHODS, bool(shared["tls"].client_ca_file), cls.SCOPED_METHODS)
                if env.serving
                else AuthSettings()
            ),
            "host": env.text("HOST", cls.host),
            "port": env.port("PORT", cls.port),
            "max_message_bytes": env.integer(
                "MAX_MESSAGE_BYTES", cls.max_message_bytes, minimum=MIN_MESSAGE_BYTES
            ),
            "max_connection_age_seconds": env.number(
                "MAX_CONNECTION_AGE_SECONDS", cls.max_connection_age_seconds
            ),
            "grace_seconds": env.number("GRACE_SECONDS", cls.grace_seconds),
        }
