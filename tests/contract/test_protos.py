"""The contracts: every RPC implemented, messages round-trip through the published .proto files, buf guards breaks."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import descriptor_pb2, json_format, message_factory, unknown_fields
from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf.message import Message

from payments.approval.v1 import approval_service_pb2, approval_service_pb2_grpc
from payments.history.v1 import history_service_pb2, history_service_pb2_grpc
from payments.readmodel.v1 import read_model_pb2
from tests.support import ROOT

BUF = str(Path(sys.executable).parent / "buf")

SERVICES = [
    (approval_service_pb2, approval_service_pb2_grpc.ApprovalServiceServicer, "approval_svc.servicer"),
    (history_service_pb2, history_service_pb2_grpc.HistoryServiceServicer, "history_svc.servicer"),
]


@pytest.mark.parametrize(("module", "base", "implementation"), SERVICES)
def test_every_rpc_is_implemented(module: ModuleType, base: type[object], implementation: str) -> None:
    importlib.import_module(implementation)
    subclasses = [c for c in base.__subclasses__() if c.__module__ == implementation]
    assert subclasses, f"no servicer in {implementation}"
    service: ServiceDescriptor = next(iter(module.DESCRIPTOR.services_by_name.values()))
    for servicer in subclasses:
        missing = [m.name for m in service.methods if getattr(servicer, m.name) is getattr(base, m.name)]
        assert not missing, f"{servicer.__name__} does not implement {missing}"


@pytest.fixture(scope="module")
def published_pool(tmp_path_factory: pytest.TempPathFactory) -> DescriptorPool:
    """The descriptors compiled afresh from protos/, independent of the generated code."""
    out = tmp_path_factory.mktemp("descriptors") / "set.binpb"
    protos = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'protos'}",
            "--include_imports",
            f"--descriptor_set_out={out}",
            *protos,
        ],
        check=True,
    )
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = DescriptorPool()
    for file in files.file:
        pool.Add(file)
    return pool


def _fill(message: Message, depth: int = 0) -> None:
    """Sets every field of a message to a distinctive value, recursing into sub-messages."""
    if message.DESCRIPTOR.full_name == "google.protobuf.Timestamp":
        message.seconds, message.nanos = 1_790_000_000 + depth, 123_456_000  # type: ignore[attr-defined]
        return
    for field in message.DESCRIPTOR.fields:
        repeated = field.is_repeated
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth > 3:
                continue
            if repeated:
                for _ in range(2):
                    _fill(getattr(message, field.name).add(), depth + 1)
            else:
                _fill(getattr(message, field.name), depth + 1)
            continue
        if field.type == FieldDescriptor.TYPE_ENUM:
            assert field.enum_type is not None
            value: object = field.enum_type.values[-1].number
        elif field.type == FieldDescriptor.TYPE_STRING:
            value = f"{field.name} ✓ 'quoted' \r\n"
        elif field.type == FieldDescriptor.TYPE_BOOL:
            value = True
        elif field.type in (
            FieldDescriptor.TYPE_INT64,
            FieldDescriptor.TYPE_SINT64,
            FieldDescriptor.TYPE_SFIXED64,
        ):
            value = -(2**63) + field.number
        elif field.type in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
            value = 2**64 - field.number
        elif field.type in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32):
            value = 2**31 - field.number
        elif field.type == FieldDescriptor.TYPE_BYTES:
            value = b"\x00\xff"
        else:
            value = field.number
        if repeated:
            getattr(message, field.name).extend([value, value])
        else:
            setattr(message, field.name, value)


def _messages() -> list[Descriptor]:
    found = []
    for module in (approval_service_pb2, history_service_pb2, read_model_pb2):
        found += list(module.DESCRIPTOR.message_types_by_name.values())
    return found


@pytest.mark.parametrize("descriptor", _messages(), ids=lambda d: d.full_name)
def test_messages_round_trip_through_the_published_protos(
    published_pool: DescriptorPool, descriptor: Descriptor
) -> None:
    generated_class = message_factory.GetMessageClass(descriptor)
    original = generated_class()
    _fill(original)
    published_class = message_factory.GetMessageClass(
        published_pool.FindMessageTypeByName(descriptor.full_name)
    )
    published = published_class.FromString(original.SerializeToString())
    assert len(unknown_fields.UnknownFieldSet(published)) == 0, (
        "the generated code has fields the .proto files lack"
    )
    assert json_format.MessageToDict(published) == json_format.MessageToDict(original)
    assert generated_class.FromString(published.SerializeToString()) == original


def test_buf_breaking_accepts_the_working_tree_and_refuses_a_renumbered_field(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "protos", repo / "protos")
    shutil.copy(ROOT / "buf.yaml", repo / "buf.yaml")

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)

    git("init", "-q")
    git("-c", "user.email=ci@example.com", "-c", "user.name=ci", "commit", "-qm", "base", "--allow-empty")
    git("add", ".")
    git("-c", "user.email=ci@example.com", "-c", "user.name=ci", "commit", "-qm", "protos")

    same = subprocess.run(
        [BUF, "breaking", "--against", ".git#ref=HEAD"], cwd=repo, capture_output=True, text=True
    )
    assert same.returncode == 0, same.stdout + same.stderr

    proto = repo / "protos/payments/approval/v1/approval_service.proto"
    text = proto.read_text()
    assert "string reference = 5;" in text
    proto.write_text(text.replace("string reference = 5;", "string reference = 15;", 1))
    broken = subprocess.run(
        [BUF, "breaking", "--against", ".git#ref=HEAD"], cwd=repo, capture_output=True, text=True
    )
    assert broken.returncode != 0
    assert "reference" in broken.stdout + broken.stderr
