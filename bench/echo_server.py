"""The gRPC floor: a bare echo RPC on the services' own server stack, run as a process of its own.

`python -m bench.echo_server --port N` serves `/bench.Echo/Echo`, which returns its
`google.protobuf.StringValue` request unchanged. It is registered through
`payments_common.grpcserver.build_server`, so it has the same interceptors, health,
reflection, channel options and event loop (uvloop) as the real services: what a real
RPC costs beyond it is the cost of our code.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import grpc
import uvloop
from google.protobuf import wrappers_pb2
from grpc_health.v1 import health_pb2

from payments_common.authsettings import AuthSettings
from payments_common.grpcserver import READINESS, build_server, wait_for_signal
from payments_common.logs import configure_logging
from payments_common.settings import ServerSettings

SERVICE = "bench.Echo"
METHOD = f"/{SERVICE}/Echo"


async def echo(request: wrappers_pb2.StringValue, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    return request


def register(server: grpc.aio.Server) -> None:
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(
                echo,
                request_deserializer=wrappers_pb2.StringValue.FromString,
                response_serializer=wrappers_pb2.StringValue.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))


async def serve(host: str, port: int) -> None:
    # No service name for reflection: the echo has no descriptor to describe.
    # A baseline of gRPC alone: no authentication (turned off explicitly, as it must be).
    settings = ServerSettings(host=host, port=port, auth=AuthSettings(disabled=True))
    server, _, readiness = build_server(settings, register, [])
    await server.start()
    for name in ("", READINESS):  # the echo depends on nothing: ready at once, without a probe loop
        await readiness.health.set(name, health_pb2.HealthCheckResponse.SERVING)
    await wait_for_signal()
    await server.stop(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.echo_server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    configure_logging("bench-echo", "WARNING")
    uvloop.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
