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

class PaymentView(_message.Message):
    __slots__ = ("payment_id", "payer_account_id", "payer_name", "payee_account_id", "payee_name", "amount", "reference", "status", "decline_reason", "create_time", "update_time", "timeline", "source_lsn", "hold_reason")
    PAYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    PAYER_ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    PAYER_NAME_FIELD_NUMBER: _ClassVar[int]
    PAYEE_ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    PAYEE_NAME_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DECLINE_REASON_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    TIMELINE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_LSN_FIELD_NUMBER: _ClassVar[int]
    HOLD_REASON_FIELD_NUMBER: _ClassVar[int]
    payment_id: str
    payer_account_id: str
    payer_name: str
    payee_account_id: str
    payee_name: str
    amount: _money_pb2.Money
    reference: str
    status: _payment_pb2.PaymentStatus
    decline_reason: _payment_pb2.DeclineReason
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    timeline: _containers.RepeatedCompositeFieldContainer[TimelineEntry]
    source_lsn: int
    hold_reason: _payment_pb2.HoldReason
    def __init__(self, payment_id: _Optional[str] = ..., payer_account_id: _Optional[str] = ..., payer_name: _Optional[str] = ..., payee_account_id: _Optional[str] = ..., payee_name: _Optional[str] = ..., amount: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., reference: _Optional[str] = ..., status: _Optional[_Union[_payment_pb2.PaymentStatus, str]] = ..., decline_reason: _Optional[_Union[_payment_pb2.DeclineReason, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., timeline: _Optional[_Iterable[_Union[TimelineEntry, _Mapping]]] = ..., source_lsn: _Optional[int] = ..., hold_reason: _Optional[_Union[_payment_pb2.HoldReason, str]] = ...) -> None: ...

class TimelineEntry(_message.Message):
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

class PaymentCounts(_message.Message):
    __slots__ = ("sent_approved", "sent_declined", "sent_pending_review", "received_approved", "received_declined", "received_pending_review")
    SENT_APPROVED_FIELD_NUMBER: _ClassVar[int]
    SENT_DECLINED_FIELD_NUMBER: _ClassVar[int]
    SENT_PENDING_REVIEW_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_APPROVED_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_DECLINED_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_PENDING_REVIEW_FIELD_NUMBER: _ClassVar[int]
    sent_approved: int
    sent_declined: int
    sent_pending_review: int
    received_approved: int
    received_declined: int
    received_pending_review: int
    def __init__(self, sent_approved: _Optional[int] = ..., sent_declined: _Optional[int] = ..., sent_pending_review: _Optional[int] = ..., received_approved: _Optional[int] = ..., received_declined: _Optional[int] = ..., received_pending_review: _Optional[int] = ...) -> None: ...

class AccountView(_message.Message):
    __slots__ = ("account_id", "owner_name", "currency_code", "status", "ledger_balance", "available_balance", "total_sent", "total_received", "counts", "per_payment_limit", "daily_limit", "create_time", "update_time", "source_lsn")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_NAME_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_CODE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LEDGER_BALANCE_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_BALANCE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SENT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    PER_PAYMENT_LIMIT_FIELD_NUMBER: _ClassVar[int]
    DAILY_LIMIT_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_LSN_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    owner_name: str
    currency_code: str
    status: _payment_pb2.AccountStatus
    ledger_balance: _money_pb2.Money
    available_balance: _money_pb2.Money
    total_sent: _money_pb2.Money
    total_received: _money_pb2.Money
    counts: PaymentCounts
    per_payment_limit: _money_pb2.Money
    daily_limit: _money_pb2.Money
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    source_lsn: int
    def __init__(self, account_id: _Optional[str] = ..., owner_name: _Optional[str] = ..., currency_code: _Optional[str] = ..., status: _Optional[_Union[_payment_pb2.AccountStatus, str]] = ..., ledger_balance: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., available_balance: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., total_sent: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., total_received: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., counts: _Optional[_Union[PaymentCounts, _Mapping]] = ..., per_payment_limit: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., daily_limit: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., source_lsn: _Optional[int] = ...) -> None: ...

class ChangeBatch(_message.Message):
    __slots__ = ("checkpoint_lsn", "commit_time", "payments", "previous_checkpoint_lsn", "omits_payments", "traced", "source_time")
    CHECKPOINT_LSN_FIELD_NUMBER: _ClassVar[int]
    COMMIT_TIME_FIELD_NUMBER: _ClassVar[int]
    PAYMENTS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_CHECKPOINT_LSN_FIELD_NUMBER: _ClassVar[int]
    OMITS_PAYMENTS_FIELD_NUMBER: _ClassVar[int]
    TRACED_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TIME_FIELD_NUMBER: _ClassVar[int]
    checkpoint_lsn: int
    commit_time: _timestamp_pb2.Timestamp
    payments: _containers.RepeatedCompositeFieldContainer[PaymentView]
    previous_checkpoint_lsn: int
    omits_payments: bool
    traced: _containers.RepeatedCompositeFieldContainer[TracedTransaction]
    source_time: _timestamp_pb2.Timestamp
    def __init__(self, checkpoint_lsn: _Optional[int] = ..., commit_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., payments: _Optional[_Iterable[_Union[PaymentView, _Mapping]]] = ..., previous_checkpoint_lsn: _Optional[int] = ..., omits_payments: _Optional[bool] = ..., traced: _Optional[_Iterable[_Union[TracedTransaction, _Mapping]]] = ..., source_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class TracedTransaction(_message.Message):
    __slots__ = ("traceparent", "commit_lsn", "payment_ids")
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    COMMIT_LSN_FIELD_NUMBER: _ClassVar[int]
    PAYMENT_IDS_FIELD_NUMBER: _ClassVar[int]
    traceparent: str
    commit_lsn: int
    payment_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, traceparent: _Optional[str] = ..., commit_lsn: _Optional[int] = ..., payment_ids: _Optional[_Iterable[str]] = ...) -> None: ...
