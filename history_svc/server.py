"""Builds the history server from settings and its dependencies, and runs it until SIGTERM."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from history_svc.changestream import ChangeStream
from history_svc.clusterqueries import ClusterReadModel
from history_svc.config import Settings
from history_svc.consistency import Consistency
from history_svc.multiplex import Multiplexer
from history_svc.queries import ReadModel, Reads
from history_svc.servicer import HistoryServicer, serialize
from history_svc.watch import Watches
from history_svc.watcher import READ_MODEL_AGE, ChangeWatcher
from payments.history.v1 import history_service_pb2 as pb
from payments_common import grpcserver
from payments_common.grpcserver import GrpcService, Readiness, build_server
from payments_common.keys import KeySchema, reader_name
from payments_common.redisconn import async_client
from payments_common.redisurl import is_cluster
from payments_common.tokens import PageTokenCodec

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["HistoryService"].full_name

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
    GetPayment and ListPayments calls (see history_svc/multiplex.py). On a Redis Cluster
    (`redis` and `watch_redis` are cluster clients) there is none: each read goes to the
    master of its entity (history_svc/clusterqueries.py).
    """

    redis: Redis | RedisCluster
    watch_redis: Redis | RedisCluster
    multiplexer: Multiplexer | None

    @classmethod
    def connect(cls, settings: Settings) -> Dependencies:
        """Creates the clients; they connect lazily, at the first command."""
        if is_cluster(settings.redis_url):
            return cls.connect_cluster(settings)
        pool = BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=settings.redis_max_connections,
            timeout=settings.redis_timeout_seconds,
            socket_timeout=settings.redis_timeout_seconds,
            socket_connect_timeout=min(settings.redis_timeout_seconds, 2.0),
            health_check_interval=30,
            retry=_reconnect_once(),
            client_name=reader_name(settings.namespace),
        )
        watch_pool = BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=2,
            timeout=settings.redis_timeout_seconds,
            socket_timeout=settings.redis_timeout_seconds + WATCH_BLOCK_MS / 1000,
            socket_connect_timeout=min(settings.redis_timeout_seconds, 2.0),
            retry=_reconnect_once(),
            client_name=reader_name(settings.namespace),
        )
        redis = Redis(connection_pool=pool)
        return cls(
            redis=redis,
            watch_redis=Redis(connection_pool=watch_pool),
            multiplexer=Multiplexer(redis, settings.redis_timeout_seconds),
        )

    @classmethod
    def connect_cluster(cls, settings: Settings) -> Dependencies:
        """The cluster clients: each keeps a pool per node, and reads the topology at its first command.

        redis-py's cluster client retries a command itself on a refreshed topology; the reads
        of history_svc/clusterqueries.py go to the nodes directly and retry themselves.
        """
        common: dict[str, Any] = {
            "socket_connect_timeout": min(settings.redis_timeout_seconds, 2.0),
            "client_name": reader_name(settings.namespace),
        }
        return cls(
            redis=async_client(
                settings.redis_url,
                max_connections=settings.redis_max_connections,
                socket_timeout=settings.redis_timeout_seconds,
                **common,
            ),
            watch_redis=async_client(
                settings.redis_url,
                max_connections=2,
                socket_timeout=settings.redis_timeout_seconds + WATCH_BLOCK_MS / 1000,
                **common,
            ),
            multiplexer=None,
        )

    async def close(self) -> None:
        if self.multiplexer is not None:
            await self.multiplexer.close()
        for client in (self.redis, self.watch_redis):
            if isinstance(client, RedisCluster):
                await client.aclose()
            else:
                await client.aclose(close_connection_pool=True)


class HistoryServer(GrpcService):
    """The gRPC server with the task it needs besides readiness: the change watcher.

    On stop, watch streams end once the service reports NOT_SERVING; the watcher keeps
    running until the last call has ended, since reads in flight may be waiting for a
    checkpoint.
    """

    def __init__(self, server: grpc.aio.Server, watcher: ChangeWatcher, readiness: Readiness) -> None:
        super().__init__(server, readiness)
        self.watcher = watcher

    async def starting(self) -> None:
        await self.watcher.start()

    async def draining(self) -> None:
        self.watcher.close_streams()

    async def stopped(self) -> None:
        await self.watcher.stop()


def method_handlers(servicer: HistoryServicer) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """The service's methods, as the generated registration has them but with `serialize`.

    `serialize` passes the bytes that GetPayment, ListPayments and ListHeldPayments build
    through unchanged, so a response is never parsed nor serialized again; the wire contract
    is the same.
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
        "ListHeldPayments": grpc.unary_unary_rpc_method_handler(
            servicer.ListHeldPayments,
            request_deserializer=pb.ListHeldPaymentsRequest.FromString,
            response_serializer=serialize,
        ),
        "WatchPayments": grpc.unary_stream_rpc_method_handler(
            servicer.WatchPayments,
            request_deserializer=pb.WatchPaymentsRequest.FromString,
            response_serializer=pb.WatchPaymentsResponse.SerializeToString,
        ),
    }


def create_server(settings: Settings, deps: Dependencies) -> tuple[HistoryServer, int]:
    """Creates (not starts) the server and binds its port; port 0 picks a free one."""
    cluster = isinstance(deps.redis, RedisCluster)
    schema = KeySchema.for_redis(settings.namespace, settings.slot_name, cluster)
    read_model: Reads
    if isinstance(deps.redis, RedisCluster):
        read_model = ClusterReadModel(deps.redis, schema, settings.slot_name, settings.redis_timeout_seconds)
    else:
        read_model = ReadModel(deps.redis, schema, settings.slot_name, deps.multiplexer)
    # The watcher follows the stream on a connection of its own (its reads block); resumes
    # read it back through the query pool.
    watcher = ChangeWatcher(
        ChangeStream(deps.watch_redis, schema, settings.slot_name),
        timelines=read_model.timelines,
        block_ms=WATCH_BLOCK_MS,
    )
    # Computed at each scrape from what the watcher last read: no Redis call of its own.
    READ_MODEL_AGE.labels(slot=settings.slot_name, key_namespace=settings.namespace).set_function(
        watcher.read_model_age
    )
    servicer = HistoryServicer(
        read_model,
        Consistency(watcher, settings.consistency_wait_max_seconds, read_model.refresh if cluster else None),
        Watches(
            watcher,
            read_model,
            ChangeStream(deps.redis, schema, settings.slot_name),
            settings.watch_queue_size,
        ),
        PageTokenCodec(settings.page_token_secret),
    )

    def register(server: grpc.aio.Server) -> None:
        handlers = method_handlers(servicer)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        server.add_registered_method_handlers(SERVICE_NAME, handlers)  # type: ignore[attr-defined]

    server, port, readiness = build_server(settings, register, [SERVICE_NAME], read_model.ping)
    return HistoryServer(server, watcher, readiness), port


@contextlib.asynccontextmanager
async def _opened(settings: Settings) -> AsyncIterator[tuple[GrpcService, int]]:
    """The server on its Redis clients, which are closed after the server stops."""
    deps = Dependencies.connect(settings)
    try:
        yield create_server(settings, deps)
    finally:
        await deps.close()


async def serve(settings: Settings) -> None:
    """Runs the server until SIGTERM or SIGINT, then stops it gracefully."""
    await grpcserver.serve(
        "history service", settings, lambda: _opened(settings), namespace=settings.namespace
    )
