"""Reading a service's settings from the environment, with clear errors for missing values."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


class SettingsError(Exception):
    """A setting is missing or malformed; the message names the variable."""


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()


class EnvReader:
    """Reads `<PREFIX><NAME>` variables from one environment mapping.

    A variable `<PREFIX><NAME>_FILE` holding a path is read from that file
    instead, so that Kubernetes can mount credentials as files.
    """

    def __init__(self, prefix: str, environ: Mapping[str, str]) -> None:
        self.prefix = prefix
        self.environ = environ

    def _raw(self, name: str) -> str | None:
        key = self.prefix + name
        path = self.environ.get(key + "_FILE")
        if path:
            try:
                return Path(path).read_text().strip()
            except OSError as exc:
                raise SettingsError(f"{key}_FILE: cannot read {path}: {exc.strerror}") from exc
        return self.environ.get(key)

    def text(self, name: str, default: str | _Required = REQUIRED) -> str:
        value = self._raw(name)
        if value is None or value == "":
            if isinstance(default, _Required):
                raise SettingsError(f"{self.prefix}{name} is required but not set")
            return default
        return value

    def integer(self, name: str, default: int | _Required = REQUIRED, minimum: int | None = None) -> int:
        raw = self._raw(name)
        if raw is None or raw == "":
            if isinstance(default, _Required):
                raise SettingsError(f"{self.prefix}{name} is required but not set")
            return default
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{self.prefix}{name} must be an integer, got {raw!r}") from None
        if minimum is not None and value < minimum:
            raise SettingsError(f"{self.prefix}{name} must be at least {minimum}, got {value}")
        return value

    def number(self, name: str, default: float | _Required = REQUIRED) -> float:
        raw = self._raw(name)
        if raw is None or raw == "":
            if isinstance(default, _Required):
                raise SettingsError(f"{self.prefix}{name} is required but not set")
            return default
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(f"{self.prefix}{name} must be a number, got {raw!r}") from None
        if value < 0:
            raise SettingsError(f"{self.prefix}{name} must not be negative, got {value}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        raw = self._raw(name)
        if raw is None or raw == "":
            return default
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{self.prefix}{name} must be true or false, got {raw!r}")
