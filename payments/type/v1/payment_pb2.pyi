from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor

class PaymentStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAYMENT_STATUS_UNSPECIFIED: _ClassVar[PaymentStatus]
    PAYMENT_STATUS_APPROVED: _ClassVar[PaymentStatus]
    PAYMENT_STATUS_DECLINED: _ClassVar[PaymentStatus]
    PAYMENT_STATUS_PENDING_REVIEW: _ClassVar[PaymentStatus]

class DeclineReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECLINE_REASON_UNSPECIFIED: _ClassVar[DeclineReason]
    DECLINE_REASON_INSUFFICIENT_FUNDS: _ClassVar[DeclineReason]
    DECLINE_REASON_PER_PAYMENT_LIMIT_EXCEEDED: _ClassVar[DeclineReason]
    DECLINE_REASON_DAILY_LIMIT_EXCEEDED: _ClassVar[DeclineReason]
    DECLINE_REASON_ACCOUNT_FROZEN: _ClassVar[DeclineReason]
    DECLINE_REASON_CURRENCY_MISMATCH: _ClassVar[DeclineReason]
    DECLINE_REASON_DECLINED_BY_REVIEWER: _ClassVar[DeclineReason]

class HoldReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HOLD_REASON_UNSPECIFIED: _ClassVar[HoldReason]
    HOLD_REASON_AMOUNT_AT_OR_ABOVE_REVIEW_THRESHOLD: _ClassVar[HoldReason]

class AccountStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACCOUNT_STATUS_UNSPECIFIED: _ClassVar[AccountStatus]
    ACCOUNT_STATUS_ACTIVE: _ClassVar[AccountStatus]
    ACCOUNT_STATUS_FROZEN: _ClassVar[AccountStatus]
PAYMENT_STATUS_UNSPECIFIED: PaymentStatus
PAYMENT_STATUS_APPROVED: PaymentStatus
PAYMENT_STATUS_DECLINED: PaymentStatus
PAYMENT_STATUS_PENDING_REVIEW: PaymentStatus
DECLINE_REASON_UNSPECIFIED: DeclineReason
DECLINE_REASON_INSUFFICIENT_FUNDS: DeclineReason
DECLINE_REASON_PER_PAYMENT_LIMIT_EXCEEDED: DeclineReason
DECLINE_REASON_DAILY_LIMIT_EXCEEDED: DeclineReason
DECLINE_REASON_ACCOUNT_FROZEN: DeclineReason
DECLINE_REASON_CURRENCY_MISMATCH: DeclineReason
DECLINE_REASON_DECLINED_BY_REVIEWER: DeclineReason
HOLD_REASON_UNSPECIFIED: HoldReason
HOLD_REASON_AMOUNT_AT_OR_ABOVE_REVIEW_THRESHOLD: HoldReason
ACCOUNT_STATUS_UNSPECIFIED: AccountStatus
ACCOUNT_STATUS_ACTIVE: AccountStatus
ACCOUNT_STATUS_FROZEN: AccountStatus
