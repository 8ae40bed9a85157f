"""The authentication settings of a gRPC server: where its keys and policy come from, or that it is off."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from payments_common.policy import Policy

DISABLED_WARNING: Final = "authentication is DISABLED: every caller may call every method"


@dataclass(frozen=True, kw_only=True)
class AuthSettings:
    """Who may call: token keys (a JWKS file and/or URL), the policy, or `disabled`.

    Client certificates are a source of identities too when the server's TLS settings
    name a client CA (mutual TLS). The default (nothing set, not disabled) is refused
    when a server is built, as it is when read from the environment.
    """

    disabled: bool = False
    jwks_file: str = ""
    jwks_url: str = ""
    jwks_cache_seconds: float = 300.0
    issuer: str = ""
    audience: str = ""
    clock_skew_seconds: float = 30.0
    policy_file: str = ""
    policy: Policy | None = None

    @property
    def tokens(self) -> bool:
        """Whether bearer tokens are accepted (a JWKS is set)."""
        return bool(self.jwks_file or self.jwks_url)

    def mode(self, certificates: bool) -> str:
        """ "disabled", or the identity sources ("token", "certificate" or both), for the start-up log."""
        if self.disabled:
            return "disabled"
        sources = ["token"] if self.tokens else []
        return "+".join([*sources, "certificate"] if certificates else sources) or "none"
