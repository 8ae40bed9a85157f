"""The audit trail of privileged actions: one JSON line per call, allowed or not, on the `payments.audit` logger.

A line holds who called (`identity`, and how it was proven: `identity_source`), the
method, what it acted on (`target`, the ids the request or response names) and the
outcome (the gRPC status code name); the request id comes from the log context.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Final

from payments_common.identity import Identity
from payments_common.logs import bounded

AUDIT_LOGGER: Final = "payments.audit"
log = logging.getLogger(AUDIT_LOGGER)

# The ids an audited call acts on, from its request (None when it could not be parsed)
# and its response (None when it failed).
TargetOf = Callable[[Any, Any], dict[str, str]]


def record(method: str, identity: Identity | None, target: Mapping[str, str], outcome: str) -> None:
    """Writes the audit line of one call; `identity` None when the call was not authenticated."""
    log.info(
        "audit",
        extra={
            "method": method,
            "identity": bounded(identity.subject) if identity is not None else "",
            "identity_source": identity.source.value if identity is not None else "",
            # Ids from the request as sent: a refused call's may be anything, of any length.
            "target": {name: bounded(str(value)) for name, value in target.items()},
            "outcome": outcome,
        },
    )
