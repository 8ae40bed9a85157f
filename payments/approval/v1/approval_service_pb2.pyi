import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from payments.type.v1 import money_pb2 as _money_pb2
from payments.type.v1 import payment_pb2 as _payment_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Account(_message.Message):
    __slots__ = ("account_id", "owner_name", "currency_code", "ledger_balance", "available_balance", "per_payment_limit", "daily_limit", "status", "create_time", "update_time")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_NAME_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_CODE_FIELD_NUMBER: _ClassVar[int]
    LEDGER_BALANCE_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_BALANCE_FIELD_NUMBER: _ClassVar[int]
    PER_PAYMENT_LIMIT_FIELD_NUMBER: _ClassVar[int]
    DAILY_LIMIT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    owner_name: str
    currency_code: str
    ledger_balance: _money_pb2.Money
    available_balance: _money_pb2.Money
    per_payment_limit: _money_pb2.Money
    daily_limit: _money_pb2.Money
    status: _payment_pb2.AccountStatus
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, account_id: _Optional[str] = ..., owner_name: _Optional[str] = ..., currency_code: _Optional[str] = ..., ledger_balance: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., available_balance: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., per_payment_limit: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., daily_limit: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., status: _Optional[_Union[_payment_pb2.AccountStatus, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Payment(_message.Message):
    __slots__ = ("payment_id", "payer_account_id", "payee_account_id", "amount", "reference", "status", "decline_reason", "create_time", "update_time", "hold_reason")
    PAYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    PAYER_ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    PAYEE_ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DECLINE_REASON_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    HOLD_REASON_FIELD_NUMBER: _ClassVar[int]
    payment_id: str
    payer_account_id: str
    payee_account_id: str
    amount: _money_pb2.Money
    reference: str
    status: _payment_pb2.PaymentStatus
    decline_reason: _payment_pb2.DeclineReason
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    hold_reason: _payment_pb2.HoldReason
    def __init__(self, payment_id: _Optional[str] = ..., payer_account_id: _Optional[str] = ..., payee_account_id: _Optional[str] = ..., amount: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., reference: _Optional[str] = ..., status: _Optional[_Union[_payment_pb2.PaymentStatus, str]] = ..., decline_reason: _Optional[_Union[_payment_pb2.DeclineReason, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., hold_reason: _Optional[_Union[_payment_pb2.HoldReason, str]] = ...) -> None: ...

class PaymentEvent(_message.Message):
    __slots__ = ("sequence", "status", "decline_reason", "actor", "note", "event_time")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DECLINE_REASON_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    status: _payment_pb2.PaymentStatus
    decline_reason: _payment_pb2.DeclineReason
    actor: str
    note: str
    event_time: _timestamp_pb2.Timestamp
    def __init__(self, sequence: _Optional[int] = ..., status: _Optional[_Union[_payment_pb2.PaymentStatus, str]] = ..., decline_reason: _Optional[_Union[_payment_pb2.DeclineReason, str]] = ..., actor: _Optional[str] = ..., note: _Optional[str] = ..., event_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateAccountRequest(_message.Message):
    __slots__ = ("request_id", "owner_name", "currency_code", "opening_balance_minor", "per_payment_limit_minor", "daily_limit_minor")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_NAME_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_CODE_FIELD_NUMBER: _ClassVar[int]
    OPENING_BALANCE_MINOR_FIELD_NUMBER: _ClassVar[int]
    PER_PAYMENT_LIMIT_MINOR_FIELD_NUMBER: _ClassVar[int]
    DAILY_LIMIT_MINOR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    owner_name: str
    currency_code: str
    opening_balance_minor: int
    per_payment_limit_minor: int
    daily_limit_minor: int
    def __init__(self, request_id: _Optional[str] = ..., owner_name: _Optional[str] = ..., currency_code: _Optional[str] = ..., opening_balance_minor: _Optional[int] = ..., per_payment_limit_minor: _Optional[int] = ..., daily_limit_minor: _Optional[int] = ...) -> None: ...

class CreateAccountResponse(_message.Message):
    __slots__ = ("account", "consistency_token")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    account: Account
    consistency_token: str
    def __init__(self, account: _Optional[_Union[Account, _Mapping]] = ..., consistency_token: _Optional[str] = ...) -> None: ...

class SubmitPaymentRequest(_message.Message):
    __slots__ = ("request_id", "payer_account_id", "payee_account_id", "amount", "reference")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PAYER_ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    PAYEE_ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    payer_account_id: str
    payee_account_id: str
    amount: _money_pb2.Money
    reference: str
    def __init__(self, request_id: _Optional[str] = ..., payer_account_id: _Optional[str] = ..., payee_account_id: _Optional[str] = ..., amount: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., reference: _Optional[str] = ...) -> None: ...

class SubmitPaymentResponse(_message.Message):
    __slots__ = ("payment", "consistency_token")
    PAYMENT_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    payment: Payment
    consistency_token: str
    def __init__(self, payment: _Optional[_Union[Payment, _Mapping]] = ..., consistency_token: _Optional[str] = ...) -> None: ...

class ApprovePaymentRequest(_message.Message):
    __slots__ = ("request_id", "payment_id", "reviewer", "note")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PAYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    payment_id: str
    reviewer: str
    note: str
    def __init__(self, request_id: _Optional[str] = ..., payment_id: _Optional[str] = ..., reviewer: _Optional[str] = ..., note: _Optional[str] = ...) -> None: ...

class ApprovePaymentResponse(_message.Message):
    __slots__ = ("payment", "consistency_token")
    PAYMENT_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    payment: Payment
    consistency_token: str
    def __init__(self, payment: _Optional[_Union[Payment, _Mapping]] = ..., consistency_token: _Optional[str] = ...) -> None: ...

class DeclinePaymentRequest(_message.Message):
    __slots__ = ("request_id", "payment_id", "reviewer", "note")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PAYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    payment_id: str
    reviewer: str
    note: str
    def __init__(self, request_id: _Optional[str] = ..., payment_id: _Optional[str] = ..., reviewer: _Optional[str] = ..., note: _Optional[str] = ...) -> None: ...

class DeclinePaymentResponse(_message.Message):
    __slots__ = ("payment", "consistency_token")
    PAYMENT_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    payment: Payment
    consistency_token: str
    def __init__(self, payment: _Optional[_Union[Payment, _Mapping]] = ..., consistency_token: _Optional[str] = ...) -> None: ...

class FreezeAccountRequest(_message.Message):
    __slots__ = ("request_id", "account_id", "reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    account_id: str
    reason: str
    def __init__(self, request_id: _Optional[str] = ..., account_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class FreezeAccountResponse(_message.Message):
    __slots__ = ("account", "consistency_token")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    account: Account
    consistency_token: str
    def __init__(self, account: _Optional[_Union[Account, _Mapping]] = ..., consistency_token: _Optional[str] = ...) -> None: ...

class UnfreezeAccountRequest(_message.Message):
    __slots__ = ("request_id", "account_id", "reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    account_id: str
    reason: str
    def __init__(self, request_id: _Optional[str] = ..., account_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class UnfreezeAccountResponse(_message.Message):
    __slots__ = ("account", "consistency_token")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    account: Account
    consistency_token: str
    def __init__(self, account: _Optional[_Union[Account, _Mapping]] = ..., consistency_token: _Optional[str] = ...) -> None: ...

class GetPaymentRequest(_message.Message):
    __slots__ = ("payment_id",)
    PAYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    payment_id: str
    def __init__(self, payment_id: _Optional[str] = ...) -> None: ...

class GetPaymentResponse(_message.Message):
    __slots__ = ("payment", "events")
    PAYMENT_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    payment: Payment
    events: _containers.RepeatedCompositeFieldContainer[PaymentEvent]
    def __init__(self, payment: _Optional[_Union[Payment, _Mapping]] = ..., events: _Optional[_Iterable[_Union[PaymentEvent, _Mapping]]] = ...) -> None: ...
