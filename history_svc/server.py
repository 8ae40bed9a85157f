"""Builds the history server from settings and its dependencies, and runs it until SIGTERM."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import grpc
import prometheus_client
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from history_svc.config import Settings
from history_svc.multiplex import Multiplexer
from history_svc.queries import ReadModel
from history_svc.servicer import HistoryServicer, serialize
from history_svc.watcher import ChangeWatcher
from payments.history.v1 import history_service_pb2
from payments.history.v1 import history_service_pb2 as pb
from payments_common.grpcserver import Readiness, ServerOptions, build_server, wait_for_signal
from payments_common.keys import KeySchema
from payments_common.tokens import PageTokenCodec

log = logging.getLogger(__name__)

SERVICE_NAME = history_service_pb2.DESCRIPTOR.services_by_name["HistoryService"].full_name

# The change watcher blocks this long per XREAD; its connection's timeout allows for it.
WATCH_BLOCK_MS = 1000


def _reconnect_once() -> Retry:
    """After Redis restarts, pooled connections are dead; one retry on a new connection hides that.

    Only connection errors are retried (every command here is a read): a timeout is not,
    so a hung Redis costs a caller one timeout, not two.
    """
    return Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))


@dataclass
class Dependencies:
    """The connections a server uses: a bounded pool for queries, one connection for the watcher.

    `multiplexer` shares one pipelined connection of the query pool's settings among all
    GetPayment and ListPayments calls (see history_svc/multiplex.py).
    """

    redis: Redis
    watch_redis: Redis
    multiplexer: Multiplexer

    @classmethod
    def connect(cls, settings: Settings) -> Dependencies:
        """Creates the clients; they connect lazily, at the first command."""
        pool = BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=settings.redis_max_connections,
            timeout=settings.redis_timeout_s,
            socket_timeout=settings.redis_timeout_s,
            socket_connect_timeout=min(settings.redis_timeout_s, 2.0),
            health_check_interval=30,
            retry=_reconnect_once(),
        )
        watch_pool = BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=2,
            timeout=settings.redis_timeout_s,
            socket_timeout=settings.redis_timeout_s + WATCH_BLOCK_MS / 1000,
            socket_connect_timeout=min(settings.redis_timeout_s, 2.0),
            retry=_reconnect_once(),
        )
        redis = Redis(connection_pool=pool)
        return cls(
            redis=redis,
            watch_redis=Redis(connection_pool=watch_pool),
            multiplexer=Multiplexer(redis, settings.redis_timeout_s),
        )

    async def close(self) -> None:
        await self.multiplexer.close()
        await self.redis.aclose(close_connection_pool=True)
        await self.watch_redis.aclose(close_connection_pool=True)


class HistoryServer:
    """The gRPC server with the tasks it needs: the change watcher and the readiness probe."""

    def __init__(
        self, server: grpc.aio.Server, watcher: ChangeWatcher, readiness: Readiness, grace_s: float
    ) -> None:
        self.grpc = server
        self.watcher = watcher
        self.readiness = readiness
        self.grace_s = grace_s

    async def start(self) -> None:
        await self.watcher.start()
        await self.readiness.start()
        await self.grpc.start()

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, watch streams ended, in-flight calls finished within `grace`."""
        await self.readiness.stop()
        self.watcher.close_streams()
        # The watcher keeps running meanwhile: in-flight reads may be waiting for a checkpoint.
        await self.grpc.stop(self.grace_s if grace is None else grace)
        await self.watcher.stop()

    async def wait_for_termination(self) -> None:
        await self.grpc.wait_for_termination()


def method_handlers(servicer: HistoryServicer) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """The service's methods, as the generated registration has them but with `serialize`.

    `serialize` passes the bytes that GetPayment and ListPayments build through unchanged,
    so a response is never parsed nor serialized again; the wire contract is the same.
    """
    return {
        "GetPayment": grpc.unary_unary_rpc_method_handler(
            servicer.GetPayment,
            request_deserializer=pb.GetPaymentRequest.FromString,
            response_serializer=serialize,
        ),
        "ListPayments": grpc.unary_unary_rpc_method_handler(
            servicer.ListPayments,
            request_deserializer=pb.ListPaymentsRequest.FromString,
            response_serializer=serialize,
        ),
        "GetAccount": grpc.unary_unary_rpc_method_handler(
            servicer.GetAccount,
            request_deserializer=pb.GetAccountRequest.FromString,
            response_serializer=pb.GetAccountResponse.SerializeToString,
        ),
        "WatchPayments": grpc.unary_stream_rpc_method_handler(
            servicer.WatchPayments,
            request_deserializer=pb.WatchPaymentsRequest.FromString,
            response_serializer=pb.WatchPaymentsResponse.SerializeToString,
        ),
    }


def create_server(settings: Settings, deps: Dependencies) -> tuple[HistoryServer, int]:
    """Creates (not starts) the server and binds its port; port 0 picks a free one."""
    keys = KeySchema(settings.key_namespace)
    read_model = ReadModel(deps.redis, keys, settings.slot_name, deps.multiplexer)
    watcher = ChangeWatcher(
        deps.watch_redis, keys, settings.slot_name, timelines=read_model.timelines, block_ms=WATCH_BLOCK_MS
    )
    servicer = HistoryServicer(
        read_model,
        watcher,
        PageTokenCodec(settings.page_token_secret),
        consistency_wait_max_s=settings.consistency_wait_max_s,
        watch_queue_size=settings.watch_queue_size,
        stream_redis=deps.redis,
        keys=keys,
    )
    options = ServerOptions(
        host=settings.host,
        port=settings.port,
        max_message_bytes=settings.max_message_bytes,
        max_connection_age_s=settings.max_connection_age_s,
        grace_s=settings.grace_s,
    )

    def register(server: grpc.aio.Server) -> None:
        handlers = method_handlers(servicer)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        server.add_registered_method_handlers(SERVICE_NAME, handlers)  # type: ignore[attr-defined]

    server, port, health = build_server(
        options, register, [SERVICE_NAME], credentials=settings.tls.server_credentials()
    )
    readiness = Readiness(health=health, service_names=[SERVICE_NAME], probe=read_model.ping)
    return HistoryServer(server, watcher, readiness, settings.grace_s), port


async def serve(settings: Settings) -> None:
    """Runs the server until SIGTERM or SIGINT, then stops it gracefully."""
    metrics: Any = None
    if settings.metrics_port:
        metrics = prometheus_client.start_http_server(settings.metrics_port)
    deps = Dependencies.connect(settings)
    try:
        server, port = create_server(settings, deps)
        await server.start()
        log.info(
            "history service listening",
            extra={"port": port, "metrics_port": settings.metrics_port, "namespace": settings.key_namespace},
        )
        await wait_for_signal()
        log.info("stopping", extra={"grace_seconds": settings.grace_s})
        await server.stop()
    finally:
        await deps.close()
        if isinstance(metrics, tuple):
            metrics[0].shutdown()
    log.info("stopped")
