"""The protobuf wire format of the responses built from stored bytes: field tags from the descriptors."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, TypeAlias

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from payments.history.v1 import history_service_pb2
from payments.readmodel.v1 import read_model_pb2

if TYPE_CHECKING:
    from google._upb._message import FieldDescriptor as UpbFieldDescriptor

    # The stubs type a generated message's descriptors as either implementation's.
    Field: TypeAlias = FieldDescriptor | UpbFieldDescriptor

VARINT: Final = 0
I64: Final = 1
LEN: Final = 2
SGROUP: Final = 3
I32: Final = 5

_WIRE_TYPES: Final[dict[int, int]] = {
    FieldDescriptor.TYPE_INT32: VARINT,
    FieldDescriptor.TYPE_INT64: VARINT,
    FieldDescriptor.TYPE_UINT32: VARINT,
    FieldDescriptor.TYPE_UINT64: VARINT,
    FieldDescriptor.TYPE_SINT32: VARINT,
    FieldDescriptor.TYPE_SINT64: VARINT,
    FieldDescriptor.TYPE_BOOL: VARINT,
    FieldDescriptor.TYPE_ENUM: VARINT,
    FieldDescriptor.TYPE_FIXED64: I64,
    FieldDescriptor.TYPE_SFIXED64: I64,
    FieldDescriptor.TYPE_DOUBLE: I64,
    FieldDescriptor.TYPE_STRING: LEN,
    FieldDescriptor.TYPE_BYTES: LEN,
    FieldDescriptor.TYPE_MESSAGE: LEN,
    FieldDescriptor.TYPE_GROUP: SGROUP,
    FieldDescriptor.TYPE_FIXED32: I32,
    FieldDescriptor.TYPE_SFIXED32: I32,
    FieldDescriptor.TYPE_FLOAT: I32,
}


def varint(value: int) -> bytes:
    """A non-negative integer as a protobuf base-128 varint."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def wire_type(field: Field) -> int:
    """How the field's values are encoded: packed repeated scalars are one length-delimited run."""
    return LEN if field.is_packed else _WIRE_TYPES[field.type]


def tag(field: Field) -> bytes:
    """The bytes that open each of the field's values on the wire: its number and wire type."""
    return varint(field.number << 3 | wire_type(field))


def length_delimited(field_tag: bytes, value: bytes) -> bytes:
    """One length-delimited field: the tag, the value's length, the value."""
    return field_tag + varint(len(value)) + value


def _length_delimited_tag(message: type[Message], name: str) -> bytes:
    field = message.DESCRIPTOR.fields_by_name[name]
    if wire_type(field) != LEN:
        raise TypeError(f"{field.full_name} is not length-delimited")
    return tag(field)


# The fields that GetPayment, ListPayments and ListHeldPayments write around the stored views,
# computed once here.
GET_PAYMENT_RESPONSE_PAYMENT: Final = _length_delimited_tag(history_service_pb2.GetPaymentResponse, "payment")
PAYMENT_VIEW_TIMELINE: Final = _length_delimited_tag(read_model_pb2.PaymentView, "timeline")
LIST_PAYMENTS_RESPONSE_PAYMENTS: Final = _length_delimited_tag(
    history_service_pb2.ListPaymentsResponse, "payments"
)
LIST_PAYMENTS_RESPONSE_NEXT_PAGE_TOKEN: Final = _length_delimited_tag(
    history_service_pb2.ListPaymentsResponse, "next_page_token"
)


LIST_HELD_PAYMENTS_RESPONSE_PAYMENTS: Final = _length_delimited_tag(
    history_service_pb2.ListHeldPaymentsResponse, "payments"
)
LIST_HELD_PAYMENTS_RESPONSE_NEXT_PAGE_TOKEN: Final = _length_delimited_tag(
    history_service_pb2.ListHeldPaymentsResponse, "next_page_token"
)
LIST_HELD_PAYMENTS_RESPONSE_CONSISTENCY_TOKEN: Final = _length_delimited_tag(
    history_service_pb2.ListHeldPaymentsResponse, "consistency_token"
)


def _text_field(field_tag: bytes, text: str) -> bytes:
    """A string field, left out when empty, as protobuf leaves out an empty string."""
    return length_delimited(field_tag, text.encode()) if text else b""


def list_held_payments_response(payments: bytes, next_page_token: str, consistency_token: str) -> bytes:
    """A ListHeldPaymentsResponse: its `payments` fields as the queue script wrote them, then the tokens."""
    return (
        payments
        + _text_field(LIST_HELD_PAYMENTS_RESPONSE_NEXT_PAGE_TOKEN, next_page_token)
        + _text_field(LIST_HELD_PAYMENTS_RESPONSE_CONSISTENCY_TOKEN, consistency_token)
    )


def list_payments_response(payments: bytes, next_page_token: str) -> bytes:
    """A ListPaymentsResponse: its `payments` fields as the page script wrote them, then the token.

    An empty token (the last page) is left out, as protobuf leaves out an empty string.
    """
    if not next_page_token:
        return payments
    return payments + length_delimited(LIST_PAYMENTS_RESPONSE_NEXT_PAGE_TOKEN, next_page_token.encode())
