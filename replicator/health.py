"""grpc.health.v1 for Kubernetes probes, served by a small synchronous gRPC server."""

from __future__ import annotations

from concurrent import futures
from typing import Final

import grpc
from grpc_health.v1 import health, health_pb2

from payments_common.grpcserver import LIVENESS, READINESS, add_health_and_reflection, bind
from payments_common.settings import ALL_INTERFACES

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# Health checks answer at once, so the checks in flight at a stop need no more than this;
# watches still open then are cut off.
STOP_GRACE_SECONDS: Final = 1.0


class HealthServer:
    """`liveness` says the loop runs; `readiness` and "" say this instance streams the slot."""

    def __init__(
        self, port: int, host: str = ALL_INTERFACES, credentials: grpc.ServerCredentials | None = None
    ) -> None:
        self.servicer = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        # With reflection, grpcurl and buf curl probe it as they probe the other services.
        add_health_and_reflection(self.server, self.servicer)
        self.port = bind(self.server, f"{host}:{port}", credentials)
        self.set_ready(False)
        self.servicer.set(LIVENESS, SERVING)

    def start(self) -> None:
        self.server.start()

    def set_ready(self, ready: bool) -> None:
        for name in ("", READINESS):
            self.servicer.set(name, SERVING if ready else NOT_SERVING)

    def stop(self) -> None:
        self.servicer.enter_graceful_shutdown()
        self.server.stop(grace=STOP_GRACE_SECONDS).wait()
