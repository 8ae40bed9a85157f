import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from payments.readmodel.v1 import read_model_pb2 as _read_model_pb2
from payments.type.v1 import payment_pb2 as _payment_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PaymentDirection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAYMENT_DIRECTION_UNSPECIFIED: _ClassVar[PaymentDirection]
    PAYMENT_DIRECTION_SENT: _ClassVar[PaymentDirection]
    PAYMENT_DIRECTION_RECEIVED: _ClassVar[PaymentDirection]
    PAYMENT_DIRECTION_ALL: _ClassVar[PaymentDirection]
PAYMENT_DIRECTION_UNSPECIFIED: PaymentDirection
PAYMENT_DIRECTION_SENT: PaymentDirection
PAYMENT_DIRECTION_RECEIVED: PaymentDirection
PAYMENT_DIRECTION_ALL: PaymentDirection

class GetPaymentRequest(_message.Message):
    __slots__ = ("payment_id", "min_consistency_token")
    PAYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    MIN_CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    payment_id: str
    min_consistency_token: str
    def __init__(self, payment_id: _Optional[str] = ..., min_consistency_token: _Optional[str] = ...) -> None: ...

class GetPaymentResponse(_message.Message):
    __slots__ = ("payment",)
    PAYMENT_FIELD_NUMBER: _ClassVar[int]
    payment: _read_model_pb2.PaymentView
    def __init__(self, payment: _Optional[_Union[_read_model_pb2.PaymentView, _Mapping]] = ...) -> None: ...

class ListPaymentsRequest(_message.Message):
    __slots__ = ("account_id", "direction", "status", "start_time", "end_time", "page_size", "page_token", "min_consistency_token")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MIN_CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    direction: PaymentDirection
    status: _payment_pb2.PaymentStatus
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    page_size: int
    page_token: str
    min_consistency_token: str
    def __init__(self, account_id: _Optional[str] = ..., direction: _Optional[_Union[PaymentDirection, str]] = ..., status: _Optional[_Union[_payment_pb2.PaymentStatus, str]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., min_consistency_token: _Optional[str] = ...) -> None: ...

class ListPaymentsResponse(_message.Message):
    __slots__ = ("payments", "next_page_token")
    PAYMENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    payments: _containers.RepeatedCompositeFieldContainer[_read_model_pb2.PaymentView]
    next_page_token: str
    def __init__(self, payments: _Optional[_Iterable[_Union[_read_model_pb2.PaymentView, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetAccountRequest(_message.Message):
    __slots__ = ("account_id", "min_consistency_token")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    MIN_CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    min_consistency_token: str
    def __init__(self, account_id: _Optional[str] = ..., min_consistency_token: _Optional[str] = ...) -> None: ...

class GetAccountResponse(_message.Message):
    __slots__ = ("account",)
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    account: _read_model_pb2.AccountView
    def __init__(self, account: _Optional[_Union[_read_model_pb2.AccountView, _Mapping]] = ...) -> None: ...

class WatchPaymentsRequest(_message.Message):
    __slots__ = ("account_id", "start_after_consistency_token", "start_after_resume_token")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    START_AFTER_CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    START_AFTER_RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    start_after_consistency_token: str
    start_after_resume_token: str
    def __init__(self, account_id: _Optional[str] = ..., start_after_consistency_token: _Optional[str] = ..., start_after_resume_token: _Optional[str] = ...) -> None: ...

class ListHeldPaymentsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "min_consistency_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MIN_CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    min_consistency_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., min_consistency_token: _Optional[str] = ...) -> None: ...

class ListHeldPaymentsResponse(_message.Message):
    __slots__ = ("payments", "next_page_token", "consistency_token")
    PAYMENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    payments: _containers.RepeatedCompositeFieldContainer[_read_model_pb2.PaymentView]
    next_page_token: str
    consistency_token: str
    def __init__(self, payments: _Optional[_Iterable[_Union[_read_model_pb2.PaymentView, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., consistency_token: _Optional[str] = ...) -> None: ...

class WatchPaymentsResponse(_message.Message):
    __slots__ = ("payment", "consistency_token", "resume_token")
    PAYMENT_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    payment: _read_model_pb2.PaymentView
    consistency_token: str
    resume_token: str
    def __init__(self, payment: _Optional[_Union[_read_model_pb2.PaymentView, _Mapping]] = ..., consistency_token: _Optional[str] = ..., resume_token: _Optional[str] = ...) -> None: ...
