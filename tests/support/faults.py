"""Support for the fault, fuzz and security suites: the services' settings, test certificates, load and readers.

Services run as real subprocesses (`python -m approval_svc serve`, `python -m history_svc
serve`, tests/support/processes.py) on fixed free ports, so that a test can kill one with
SIGKILL and start it again on the same address, the way Kubernetes restarts a container
behind a stable Service.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import random
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from payments.approval.v1 import approval_service_pb2 as approval_pb
from payments.approval.v1 import approval_service_pb2_grpc as approval_grpc
from payments.history.v1 import history_service_pb2 as history_pb
from payments.history.v1 import history_service_pb2_grpc as history_grpc
from payments.type.v1 import money_pb2
from tests.support.auth import aio_channel, server_env
from tests.support.processes import ServiceProcess
from tests.support.waiting import eventually

# Channels reconnect quickly after a process comes back (gRPC's default backoff grows to minutes).
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]

# Errors after which a client retries the same request (with the same request_id).
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)


# -- service subprocesses ---------------------------------------------------------------


def approval_process(dsn: str, port: int, log_path: Path, **env: str) -> ServiceProcess:
    """The approval service as a subprocess; it trusts the session's token authority unless `env` says otherwise."""
    return ServiceProcess(
        "approval",
        "approval_svc",
        port,
        {
            "APPROVAL_DATABASE_URL": dsn,
            "APPROVAL_HOST": "127.0.0.1",
            "APPROVAL_PORT": str(port),
            "APPROVAL_METRICS_PORT": "0",
            "APPROVAL_GRACE_SECONDS": "1",
            "APPROVAL_REVIEW_THRESHOLD_MINOR": "100000000",
            "APPROVAL_DB_POOL_SIZE": "5",
            **server_env("APPROVAL_"),
            **{f"APPROVAL_{k.upper()}": v for k, v in env.items()},
        },
        log_path,
    )


HISTORY_PAGE_SECRET = "faults-page-token-secret-0123456789"


def history_process(redis_url: str, port: int, log_path: Path, slot: str, **env: str) -> ServiceProcess:
    """The history service as a subprocess; it trusts the session's token authority unless `env` says otherwise."""
    return ServiceProcess(
        f"history-{port}",
        "history_svc",
        port,
        {
            "HISTORY_REDIS_URL": redis_url,
            "HISTORY_PAGE_TOKEN_SECRET": HISTORY_PAGE_SECRET,
            "HISTORY_HOST": "127.0.0.1",
            "HISTORY_PORT": str(port),
            "HISTORY_METRICS_PORT": "0",
            "HISTORY_GRACE_SECONDS": "1",
            "HISTORY_SLOT_NAME": slot,
            "HISTORY_REDIS_TIMEOUT_SECONDS": "1",
            "HISTORY_CONSISTENCY_WAIT_MAX_SECONDS": "2",
            **server_env("HISTORY_"),
            **{f"HISTORY_{k.upper()}": v for k, v in env.items()},
        },
        log_path,
    )


async def open_accounts(
    address: str, count: int, opening_balance_minor: int, token: str | None = None
) -> list[str]:
    """Opens `count` EUR accounts through the approval service at `address` (limits that never bind); their ids.

    The calls carry `token`, by default the tests' service token.
    """
    async with aio_channel(address, token) as channel:
        stub: approval_grpc.ApprovalServiceAsyncStub = approval_grpc.ApprovalServiceStub(channel)
        accounts = []
        for n in range(count):
            reply = await stub.CreateAccount(
                approval_pb.CreateAccountRequest(
                    request_id=f"open-{n}",
                    owner_name=f"Owner {n}",
                    currency_code="EUR",
                    opening_balance_minor=opening_balance_minor,
                    per_payment_limit_minor=10**9,
                    daily_limit_minor=10**12,
                ),
                timeout=30,
            )
            accounts.append(reply.account.account_id)
        return accounts


# -- certificates -----------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """PEM files of a test CA, a server certificate for 127.0.0.1/localhost and a client certificate."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


def make_pki(folder: Path, label: str = "test", client_uri: str = "") -> Pki:
    """Generates a CA and two leaf certificates signed by it, valid for one day.

    The client certificate's subject is CN "<label> client"; with `client_uri` it also
    names that URI (a SPIFFE ID, say) as its subject alternative name.
    """
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"{label} CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def leaf(name: str, usage: x509.ObjectIdentifier, san: list[x509.GeneralName]) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(f"{label} {name}"))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(folder / f"{name}-key.pem", key)

    leaf(
        "server",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    leaf(
        "client",
        ExtendedKeyUsageOID.CLIENT_AUTH,
        [x509.UniformResourceIdentifier(client_uri)] if client_uri else [],
    )
    return Pki(
        ca_cert=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server-key.pem",
        client_cert=folder / "client.pem",
        client_key=folder / "client-key.pem",
    )


# -- load and readers -------------------------------------------------------------------


@dataclass(frozen=True)
class Ack:
    """A payment that the approval service acknowledged."""

    request_id: str
    payment_id: str
    status: int
    token: str


@dataclass
class PaymentLoad:
    """Submits payments among `accounts` until stopped; retries every failure with the same request_id.

    Every request is retried until it gets a response, so when `run` returns every request
    that was sent is acknowledged (or listed in `unresolved` if its budget ran out). The calls
    carry `token`, by default the tests' service token.
    """

    approval_address: str
    accounts: list[str]
    currency: str = "EUR"
    workers: int = 3
    token: str | None = None
    # Each worker's pause after an acknowledged payment: a client's think time, which paces the load.
    think_s: float = 0.0
    request_budget_s: float = 90.0
    seed: int = 7
    acks: list[Ack] = field(default_factory=list)
    retries: int = 0
    retried_requests: int = 0
    unresolved: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        async with aio_channel(self.approval_address, self.token, options=FAST_RECONNECT) as channel:
            stub = approval_grpc.ApprovalServiceStub(channel)
            await asyncio.gather(*(self._worker(stub, n) for n in range(self.workers)))

    async def _worker(self, stub: approval_grpc.ApprovalServiceAsyncStub, number: int) -> None:
        rng = random.Random(self.seed * 1000 + number)
        while not self.stopping.is_set():
            payer, payee = rng.sample(self.accounts, 2)
            request = approval_pb.SubmitPaymentRequest(
                request_id=str(uuid.UUID(int=rng.getrandbits(128))),
                payer_account_id=payer,
                payee_account_id=payee,
                amount=money_pb2.Money(currency_code=self.currency, amount_minor=rng.randint(1, 500)),
                reference=f"load {number}",
            )
            await self._submit(stub, request)
            if self.think_s:
                await asyncio.sleep(self.think_s)  # pacing, not synchronisation

    async def _submit(
        self, stub: approval_grpc.ApprovalServiceAsyncStub, request: approval_pb.SubmitPaymentRequest
    ) -> None:
        deadline = time.monotonic() + self.request_budget_s
        attempts = 0
        while True:
            attempts += 1
            try:
                response = await stub.SubmitPayment(request, timeout=5)
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRYABLE:
                    self.unexpected.append(f"{request.request_id}: {error.code().name} {error.details()}")
                    return
                if time.monotonic() >= deadline:
                    self.unresolved.append(request.request_id)
                    return
                self.retries += 1
                if attempts == 2:
                    self.retried_requests += 1
                await asyncio.sleep(0.05)  # a client's retry backoff, not synchronisation
                continue
            self.acks.append(
                Ack(
                    request.request_id,
                    response.payment.payment_id,
                    response.payment.status,
                    response.consistency_token,
                )
            )
            return

    async def wait_acks(self, count: int, within_s: float = 60.0) -> None:
        """Polls until at least `count` payments are acknowledged."""

        def acknowledged() -> bool:
            if self.unexpected:
                raise AssertionError(f"unexpected errors: {self.unexpected[:5]}")
            return len(self.acks) >= count

        await eventually(acknowledged, within_s, f"{count} payments acknowledged")


@dataclass
class Readers:
    """Sequential readers of the query side that record the `source_lsn` seen for each key.

    Each reader checks that a key it reads again never shows an older version. Reads of
    acknowledged payments pass the acknowledgement's consistency token: the answer must
    then hold the payment as acknowledged (UNAVAILABLE or a deadline are allowed, NOT_FOUND
    or other data are not).
    """

    history_target: str
    accounts: list[str]
    load: PaymentLoad
    readers: int = 2
    seed: int = 11
    reads: int = 0
    answered: int = 0
    unavailable: int = 0
    backwards: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        options = [*FAST_RECONNECT, ("grpc.lb_policy_name", "round_robin")]
        async with aio_channel(self.history_target, options=options) as channel:
            stub = history_grpc.HistoryServiceStub(channel)
            await asyncio.gather(*(self._reader(stub, n) for n in range(self.readers)))

    def _saw(self, seen: dict[str, int], key: str, lsn: int) -> None:
        if lsn < seen.get(key, 0):
            self.backwards.append(f"{key}: {seen[key]} -> {lsn}")
        seen[key] = max(lsn, seen.get(key, 0))

    async def _reader(self, stub: history_grpc.HistoryServiceAsyncStub, number: int) -> None:
        rng = random.Random(self.seed * 1000 + number)
        seen: dict[str, int] = {}
        while not self.stopping.is_set():
            self.reads += 1
            by_token = bool(self.load.acks) and rng.random() >= 0.5
            try:
                if not by_token:
                    account = rng.choice(self.accounts)
                    reply = await stub.GetAccount(history_pb.GetAccountRequest(account_id=account), timeout=2)
                    self._saw(seen, f"account:{account}", reply.account.source_lsn)
                else:
                    recent = self.load.acks[-50:]
                    ack = rng.choice(recent)
                    payment = await stub.GetPayment(
                        history_pb.GetPaymentRequest(
                            payment_id=ack.payment_id, min_consistency_token=ack.token
                        ),
                        timeout=3,
                    )
                    view = payment.payment
                    if view.payment_id != ack.payment_id or view.status != ack.status:
                        self.wrong.append(f"{ack.payment_id}: read {view.payment_id} status {view.status}")
                    self._saw(seen, f"payment:{ack.payment_id}", view.source_lsn)
                self.answered += 1
            except grpc.aio.AioRpcError as error:
                if error.code() in RETRYABLE:
                    self.unavailable += 1
                elif by_token or error.code() != grpc.StatusCode.NOT_FOUND:
                    # Without a token an account may be missing while Redis is rebuilt; with its
                    # token an acknowledged payment must be found.
                    self.wrong.append(f"{error.code().name} (token read: {by_token}): {error.details()}")
            await asyncio.sleep(0.01)


def secret_free(texts: Iterable[str], secrets: Iterable[str]) -> list[str]:
    """The secrets that appear in any of the texts (empty when none leaks)."""
    joined = "\n".join(texts)
    return [secret for secret in secrets if secret in joined]


@contextlib.contextmanager
def stopped_on_exit(*processes: ServiceProcess) -> Iterator[None]:
    try:
        yield
    finally:
        for process in processes:
            process.stop(timeout=5)
