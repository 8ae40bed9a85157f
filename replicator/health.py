"""grpc.health.v1 for Kubernetes probes, served by a small synchronous gRPC server."""

from __future__ import annotations

from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from payments_common.grpcserver import LIVENESS, READINESS

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthServer:
    """`liveness` says the loop runs; `readiness` and "" say this instance streams the slot."""

    def __init__(
        self, port: int, host: str = "[::]", credentials: grpc.ServerCredentials | None = None
    ) -> None:
        self.servicer = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self.server)
        # Reflection, so that grpcurl and buf curl can probe it like the other services.
        reflection.enable_server_reflection(
            [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], self.server
        )
        address = f"{host}:{port}"
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)
        self.set_ready(False)
        self.servicer.set(LIVENESS, SERVING)

    def start(self) -> None:
        self.server.start()

    def set_ready(self, ready: bool) -> None:
        for name in ("", READINESS):
            self.servicer.set(name, SERVING if ready else NOT_SERVING)

    def stop(self) -> None:
        self.servicer.enter_graceful_shutdown()
        self.server.stop(grace=1).wait()
