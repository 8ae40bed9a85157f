"""The field tags taken from the descriptors, against the bytes that protobuf itself serialises."""

from __future__ import annotations

import re
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, message_factory, wrappers_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st

from history_svc import wire
from history_svc.queries import HELD_SCRIPT, PAGE_SCRIPT, PAYMENT_SCRIPT
from payments.history.v1 import history_service_pb2 as pb
from payments.readmodel.v1 import read_model_pb2
from payments.type.v1 import payment_pb2

_SAMPLES: dict[int, object] = {
    FieldDescriptor.TYPE_STRING: "x",
    FieldDescriptor.TYPE_BYTES: b"x",
    FieldDescriptor.TYPE_BOOL: True,
    FieldDescriptor.TYPE_DOUBLE: 1.5,
    FieldDescriptor.TYPE_FLOAT: 1.5,
}


def _set_one_value(message: Message, field: wire.Field) -> None:
    """Gives `field` one value that protobuf writes (not a default it would leave out)."""
    value: Any = getattr(message, field.name)
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if field.is_repeated:
            value.add()
        else:
            value.SetInParent()
        return
    sample = _SAMPLES.get(field.type, 1)
    if field.is_repeated:
        value.append(sample)
    else:
        setattr(message, field.name, sample)


def _every_scalar_type() -> list[type[Message]]:
    """A message with one singular field of each scalar type, and one packed repeated field of each numeric one."""
    scalar = descriptor_pb2.FieldDescriptorProto
    types = [
        number
        for name, number in scalar.Type.items()
        if name not in ("TYPE_GROUP", "TYPE_MESSAGE", "TYPE_ENUM")
    ]
    message = descriptor_pb2.DescriptorProto(name="EveryScalar")
    for n, kind in enumerate(types, start=1):
        message.field.add(name=f"one_{n}", number=n, type=kind, label=scalar.LABEL_OPTIONAL)
        if kind not in (scalar.TYPE_STRING, scalar.TYPE_BYTES):
            message.field.add(name=f"many_{n}", number=100 + n, type=kind, label=scalar.LABEL_REPEATED)
    proto = descriptor_pb2.FileDescriptorProto(
        name="every_scalar.proto", package="wire.test", syntax="proto3", message_type=[message]
    )
    pool = DescriptorPool()
    pool.Add(proto)
    return [message_factory.GetMessageClass(pool.FindMessageTypeByName("wire.test.EveryScalar"))]


MESSAGES: list[type[Message]] = [
    *(getattr(pb, name) for name in pb.DESCRIPTOR.message_types_by_name),
    *(getattr(read_model_pb2, name) for name in read_model_pb2.DESCRIPTOR.message_types_by_name),
    *(getattr(payment_pb2, name) for name in payment_pb2.DESCRIPTOR.message_types_by_name),
    wrappers_pb2.DoubleValue,
    wrappers_pb2.FloatValue,
    wrappers_pb2.UInt64Value,
    descriptor_pb2.SourceCodeInfo.Location,  # proto2, `path` explicitly packed
    *_every_scalar_type(),
]


@pytest.mark.parametrize("message_class", MESSAGES, ids=lambda m: m.DESCRIPTOR.full_name)
def test_each_field_is_written_after_its_computed_tag(message_class: type[Message]) -> None:
    for field in message_class.DESCRIPTOR.fields:
        message = message_class()
        _set_one_value(message, field)
        written = message.SerializeToString()
        assert written.startswith(wire.tag(field)), field.full_name
        assert wire.tag(field) == wire.varint(field.number << 3 | wire.wire_type(field))


def test_packed_and_unpacked_repeated_fields_have_their_own_wire_types() -> None:
    location = descriptor_pb2.SourceCodeInfo.Location.DESCRIPTOR
    assert wire.wire_type(location.fields_by_name["path"]) == wire.LEN
    assert wire.wire_type(location.fields_by_name["leading_detached_comments"]) == wire.LEN
    every = _every_scalar_type()[0].DESCRIPTOR
    assert {wire.wire_type(f) for f in every.fields if f.name.startswith("many_")} == {wire.LEN}
    assert {wire.wire_type(f) for f in every.fields if f.name.startswith("one_")} == {
        wire.VARINT,
        wire.I64,
        wire.LEN,
        wire.I32,
    }


def test_the_response_tags_are_the_ones_protobuf_writes() -> None:
    empty = read_model_pb2.PaymentView()
    # Each message holds one field: an empty message (length 0), or the token "t" (length 1).
    written: list[tuple[bytes, Message, bytes]] = [
        (wire.GET_PAYMENT_RESPONSE_PAYMENT, pb.GetPaymentResponse(payment=empty), b"\0"),
        (
            wire.PAYMENT_VIEW_TIMELINE,
            read_model_pb2.PaymentView(timeline=[read_model_pb2.TimelineEntry()]),
            b"\0",
        ),
        (wire.LIST_PAYMENTS_RESPONSE_PAYMENTS, pb.ListPaymentsResponse(payments=[empty]), b"\0"),
        (wire.LIST_PAYMENTS_RESPONSE_NEXT_PAGE_TOKEN, pb.ListPaymentsResponse(next_page_token="t"), b"\1t"),
        (wire.LIST_HELD_PAYMENTS_RESPONSE_PAYMENTS, pb.ListHeldPaymentsResponse(payments=[empty]), b"\0"),
        (
            wire.LIST_HELD_PAYMENTS_RESPONSE_NEXT_PAGE_TOKEN,
            pb.ListHeldPaymentsResponse(next_page_token="t"),
            b"\1t",
        ),
        (
            wire.LIST_HELD_PAYMENTS_RESPONSE_CONSISTENCY_TOKEN,
            pb.ListHeldPaymentsResponse(consistency_token="t"),
            b"\1t",
        ),
    ]
    for tag, message, rest in written:
        assert message.SerializeToString() == tag + rest


def _view(n: int, entries: int) -> read_model_pb2.PaymentView:
    return read_model_pb2.PaymentView(
        payment_id=f"p{n}",
        payer_name="Ann " * n,
        reference="r" * (60 * n),
        timeline=[read_model_pb2.TimelineEntry(sequence=s, note="n" * (50 * s)) for s in range(entries)],
    )


@given(st.integers(min_value=0, max_value=6), st.integers(min_value=0, max_value=5))
def test_a_payment_built_from_its_stored_view_is_what_protobuf_writes(n: int, entries: int) -> None:
    view = _view(n, entries)
    stored = read_model_pb2.PaymentView()
    stored.CopyFrom(view)
    del stored.timeline[:]
    built = stored.SerializeToString() + b"".join(
        wire.length_delimited(wire.PAYMENT_VIEW_TIMELINE, entry.SerializeToString())
        for entry in view.timeline
    )
    response = wire.length_delimited(wire.GET_PAYMENT_RESPONSE_PAYMENT, built)
    assert response == pb.GetPaymentResponse(payment=view).SerializeToString()


@given(st.integers(min_value=0, max_value=5), st.text(max_size=300))
def test_a_page_built_from_stored_views_is_what_protobuf_writes(count: int, token: str) -> None:
    views = [_view(n, 0) for n in range(count)]
    payments = b"".join(
        wire.length_delimited(wire.LIST_PAYMENTS_RESPONSE_PAYMENTS, view.SerializeToString())
        for view in views
    )
    built = wire.list_payments_response(payments, token)
    expected = pb.ListPaymentsResponse(payments=views, next_page_token=token).SerializeToString()
    assert built == expected


@given(st.integers(min_value=0, max_value=5), st.text(max_size=300), st.text(max_size=40))
def test_a_page_of_the_queue_built_from_stored_views_is_what_protobuf_writes(
    count: int, token: str, position: str
) -> None:
    views = [_view(n, 0) for n in range(count)]
    payments = b"".join(
        wire.length_delimited(wire.LIST_HELD_PAYMENTS_RESPONSE_PAYMENTS, view.SerializeToString())
        for view in views
    )
    built = wire.list_held_payments_response(payments, token, position)
    expected = pb.ListHeldPaymentsResponse(
        payments=views, next_page_token=token, consistency_token=position
    ).SerializeToString()
    assert built == expected


@given(st.integers(min_value=1, max_value=2**64 - 1))
def test_varints_are_protobufs(value: int) -> None:
    field = wrappers_pb2.UInt64Value.DESCRIPTOR.fields_by_name["value"]
    assert wire.tag(field) + wire.varint(value) == wrappers_pb2.UInt64Value(value=value).SerializeToString()
    assert wire.varint(0) == bytes(1)


def test_the_scripts_hold_no_field_tag_of_their_own() -> None:
    for script in (PAYMENT_SCRIPT, PAGE_SCRIPT, HELD_SCRIPT):
        assert not re.search(r"\\\d", script.source), "a byte escape in a script"
        assert "field(ARGV[" in script.source
