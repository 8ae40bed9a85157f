"""Client channels to the services: one for approval, round-robin with retries over history processes."""

from __future__ import annotations

import json

import grpc

HISTORY_SERVICE = "payments.history.v1.HistoryService"

# Reads are safe to retry; UNAVAILABLE covers a pod going away (and a
# consistency token not reached yet, which a retry may well find reached).
HISTORY_SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": HISTORY_SERVICE}],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.05s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}


def history_target(addresses: list[str]) -> str:
    """A target that gRPC resolves to every address, e.g. "ipv4:127.0.0.1:5001,127.0.0.1:5002".

    In Kubernetes use the headless Service instead: "dns:///history-headless.payments:50052".
    """
    return "ipv4:" + ",".join(addresses)


def history_channel(target: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.aio.Channel:
    """An asyncio channel that spreads calls over every history process and retries UNAVAILABLE.

    With `credentials` (payments_common.tls.channel_credentials) the channel speaks TLS.
    """
    options = [
        ("grpc.service_config", json.dumps(HISTORY_SERVICE_CONFIG)),
        ("grpc.enable_retries", 1),
    ]
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=options)
    return grpc.aio.insecure_channel(target, options=options)


def approval_channel(address: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.aio.Channel:
    """An asyncio channel to the approval service. Mutations are retried by the caller, with the same request_id."""
    if credentials is not None:
        return grpc.aio.secure_channel(address, credentials)
    return grpc.aio.insecure_channel(address)
