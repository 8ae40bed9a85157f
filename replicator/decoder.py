"""Decodes pgoutput (protocol version 1) messages into typed values, with a relation cache.

The format is described in the PostgreSQL manual, "Logical Replication Message Formats".
Integers are big-endian; strings are NUL-terminated; timestamps are microseconds since
2000-01-01 UTC.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal, TypeVar

# Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
PG_EPOCH_OFFSET_US: Final = 946_684_800_000_000


class _Unchanged:
    """A TOASTed column that an UPDATE left untouched: the server sent no value."""

    _instance: _Unchanged | None = None

    def __new__(cls) -> _Unchanged:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = _Unchanged()

# A column value: None for NULL, text, bytes (binary format), or UNCHANGED.
Value = str | bytes | None | _Unchanged
K = TypeVar("K")  # the keys of a row read from a tuple: column names, or positions


RowKind = Literal["insert", "update", "delete"]
_ROW_KINDS: Final[dict[int, RowKind]] = {0x49: "insert", 0x55: "update", 0x44: "delete"}  # 'I', 'U', 'D'


class DecodeError(ValueError):
    """A message that is not valid pgoutput, or refers to an unknown relation."""


@dataclass(slots=True)
class Begin:
    final_lsn: int
    commit_time_us: int
    xid: int


@dataclass(slots=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time_us: int


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type_oid: int
    type_modifier: int
    is_key: bool


@dataclass(frozen=True, slots=True)
class Relation:
    oid: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[Column, ...]
    # Derived once here, since every change needs them.
    column_names: tuple[str, ...] = ()
    qualified_name: str = ""

    @classmethod
    def build(
        cls, oid: int, namespace: str, name: str, replica_identity: str, columns: tuple[Column, ...]
    ) -> Relation:
        names = tuple(column.name for column in columns)
        return cls(oid, namespace, name, replica_identity, columns, names, f"{namespace}.{name}")


@dataclass(slots=True)
class Insert:
    relation: Relation
    new: tuple[Value, ...]


@dataclass(slots=True)
class Update:
    relation: Relation
    # The old key ('K') or the whole old row ('O'), when the server sent one.
    old: tuple[Value, ...] | None
    new: tuple[Value, ...]


@dataclass(slots=True)
class Delete:
    relation: Relation
    # The old key ('K') or the whole old row ('O').
    old: tuple[Value, ...]


@dataclass(frozen=True, slots=True)
class Truncate:
    cascade: bool
    restart_identity: bool
    relations: tuple[Relation, ...]


@dataclass(frozen=True, slots=True)
class Origin:
    commit_lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class TypeInfo:
    oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


# The per-change messages above are plain (not frozen) dataclasses: a frozen dataclass's
# __init__ sets every field through object.__setattr__, which costs measurably at one
# message per row change. Nothing mutates or hashes them.
Message = Begin | Commit | Relation | Insert | Update | Delete | Truncate | Origin | TypeInfo | LogicalMessage

_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")
_BEGIN = struct.Struct(">QqI")
_COMMIT = struct.Struct(">BQQq")


class Decoder:
    """Turns pgoutput payloads into messages; remembers every Relation it has seen.

    A Relation message comes before the first change of a table in each session and
    again after DDL, so a cached entry is always overwritten.
    """

    def __init__(self) -> None:
        self.relations: dict[int, Relation] = {}

    def decode(self, payload: bytes | memoryview) -> Message:
        data = payload if type(payload) is bytes else bytes(payload)
        if not data:
            raise DecodeError("empty message")
        kind = data[0]
        try:
            if kind == 0x42:  # 'B'
                final_lsn, time_us, xid = _BEGIN.unpack_from(data, 1)
                return Begin(final_lsn, time_us + PG_EPOCH_OFFSET_US, xid)
            if kind == 0x43:  # 'C'
                flags, commit_lsn, end_lsn, time_us = _COMMIT.unpack_from(data, 1)
                return Commit(flags, commit_lsn, end_lsn, time_us + PG_EPOCH_OFFSET_US)
            if kind == 0x49:  # 'I'
                relation, _, at = self._located(data)
                return Insert(relation, _tuple(data, at)[0])
            if kind == 0x55:  # 'U'
                relation, old, at = self._located(data)
                return Update(relation, old, _tuple(data, at)[0])
            if kind == 0x44:  # 'D'
                relation, _, at = self._located(data)
                return Delete(relation, _tuple(data, at)[0])
            if kind == 0x52:  # 'R'
                relation = _parse_relation(data)
                self.relations[relation.oid] = relation
                return relation
            if kind == 0x54:  # 'T'
                (count,) = _U32.unpack_from(data, 1)
                options = data[5]
                relations = tuple(self._relation(data, 6 + 4 * i) for i in range(count))
                return Truncate(bool(options & 1), bool(options & 2), relations)
            if kind == 0x4F:  # 'O'
                (commit_lsn,) = struct.unpack_from(">Q", data, 1)
                name, _ = _cstring(data, 9)
                return Origin(commit_lsn, name)
            if kind == 0x59:  # 'Y'
                (oid,) = _U32.unpack_from(data, 1)
                namespace, offset = _cstring(data, 5)
                name, _ = _cstring(data, offset)
                return TypeInfo(oid, namespace, name)
            if kind == 0x4D:  # 'M'
                flags = data[1]
                (lsn,) = struct.unpack_from(">Q", data, 2)
                prefix, offset = _cstring(data, 10)
                (length,) = _U32.unpack_from(data, offset)
                content = data[offset + 4 : offset + 4 + length]
                return LogicalMessage(bool(flags & 1), lsn, prefix, content)
        except (struct.error, IndexError, UnicodeDecodeError) as exc:
            raise DecodeError(f"truncated or malformed {chr(kind)!r} message: {exc}") from exc
        raise DecodeError(f"unknown message type {chr(kind)!r}")

    def _relation(self, data: bytes, offset: int) -> Relation:
        (oid,) = _U32.unpack_from(data, offset)
        try:
            return self.relations[oid]
        except KeyError:
            raise DecodeError(f"change for relation {oid} before its Relation message") from None

    def row_change(self, payload: bytes) -> tuple[RowKind, Relation, TupleData] | None:
        """An insert, update or delete as ("insert" | "update" | "delete", relation, tuple), else None.

        The tuple is the new row's, or a delete's old key (or row), its values decoded by
        column name when first asked for (`TupleData.row`), as `as_row` gives them from the
        decoded message. The same parsing as `decode` without building a message object or a
        tuple of values, for the per-change hot path.
        """
        kind = _ROW_KINDS.get(payload[0]) if payload else None
        if kind is None:
            return None
        try:
            relation, _, at = self._located(payload)
        except (struct.error, IndexError, UnicodeDecodeError) as exc:
            raise DecodeError(f"truncated or malformed {chr(payload[0])!r} message: {exc}") from exc
        return kind, relation, TupleData(payload, at, relation.column_names)

    def _located(self, data: bytes) -> tuple[Relation, tuple[Value, ...] | None, int]:
        """An insert's, update's or delete's relation, an update's old tuple (None otherwise),
        and where its row's tuple starts: the new row, or a delete's old key (or row)."""
        relation = self._relation(data, 1)
        kind = data[0]
        if kind == 0x44:  # 'D'
            if data[5] not in (0x4B, 0x4F):  # 'K', 'O'
                raise DecodeError(f"delete without an old tuple: {data[5:6]!r}")
            return relation, None, 6
        offset = 5
        old: tuple[Value, ...] | None = None
        if kind == 0x55 and data[offset] in (0x4B, 0x4F):  # an update's 'K', 'O'
            old, offset = _tuple(data, offset + 1)
        if data[offset] != 0x4E:  # 'N'
            what = "update" if kind == 0x55 else "insert"
            raise DecodeError(f"{what} without a new tuple: {data[offset : offset + 1]!r}")
        return relation, old, offset + 1


def _cstring(data: bytes, offset: int) -> tuple[str, int]:
    end = data.index(0, offset)
    return data[offset:end].decode(), end + 1


def _parse_relation(data: bytes) -> Relation:
    (oid,) = _U32.unpack_from(data, 1)
    namespace, offset = _cstring(data, 5)
    name, offset = _cstring(data, offset)
    replica_identity = chr(data[offset])
    (count,) = _I16.unpack_from(data, offset + 1)
    offset += 3
    columns = []
    for _ in range(count):
        flags = data[offset]
        column_name, offset = _cstring(data, offset + 1)
        (type_oid,) = _U32.unpack_from(data, offset)
        (modifier,) = _I32.unpack_from(data, offset + 4)
        offset += 8
        columns.append(Column(column_name, type_oid, modifier, bool(flags & 1)))
    return Relation.build(oid, namespace or "pg_catalog", name, replica_identity, tuple(columns))


def _tuple(data: bytes, offset: int) -> tuple[tuple[Value, ...], int]:
    """The TupleData at `offset`, its values in order, and the offset after it."""
    (count,) = _I16.unpack_from(data, offset)
    by_position, end = _row(data, offset, range(count))
    return tuple(by_position.values()), end


def _row(data: bytes, offset: int, names: Sequence[K]) -> tuple[dict[K, Value], int]:
    """The TupleData at `offset` by column name, and the offset after it.

    A tuple shorter than `names` (the relation's columns) has only its first columns;
    values past them are read and dropped. The row is built as the tuple is read: the
    per-change hot path makes no tuple of values first.
    """
    (count,) = _I16.unpack_from(data, offset)
    if count < 0:
        raise DecodeError(f"tuple of {count} columns")
    offset += 2
    row: dict[K, Value] = {}
    unpack = _U32.unpack_from
    # The common case, a value for every column, is read without counting positions.
    named = names if count == len(names) else names[:count]
    for name in named:
        kind = data[offset]
        if kind == 0x74:  # 't'
            start = offset + 5
            offset = start + unpack(data, offset + 1)[0]
            row[name] = data[start:offset].decode()
        elif kind == 0x6E:  # 'n'
            row[name] = None
            offset += 1
        elif kind == 0x75:  # 'u'
            row[name] = UNCHANGED
            offset += 1
        elif kind == 0x62:  # 'b'
            start = offset + 5
            offset = start + unpack(data, offset + 1)[0]
            row[name] = data[start:offset]
        else:
            raise DecodeError(f"unknown tuple column kind {chr(kind)!r}")
    for _ in range(count - len(named)):
        offset = _past_value(data, offset)
    if offset > len(data):
        # A value ran past the end of the message: its slice came out short.
        raise IndexError("value past the end of the message")
    return row, offset


def _past_value(data: bytes, offset: int) -> int:
    """The offset after the TupleData value at `offset`, which is not decoded."""
    kind = data[offset]
    if kind in (0x74, 0x62):  # 't', 'b'
        length: int = _U32.unpack_from(data, offset + 1)[0]
        if offset + 5 + length > len(data):
            raise IndexError("value past the end of the message")
        return offset + 5 + length
    if kind in (0x6E, 0x75):  # 'n', 'u'
        return offset + 1
    raise DecodeError(f"unknown tuple column kind {chr(kind)!r}")


class TupleData:
    """A row change's TupleData as it arrived, its values decoded when first asked for.

    A batch keeps only the last change of each row (`changes.RowBatch`): the changes that
    a later one replaces are read no further than their key's columns.
    """

    __slots__ = ("_row", "data", "names", "offset")

    def __init__(self, data: bytes, offset: int, names: tuple[str, ...]) -> None:
        self.data = data
        self.offset = offset  # where the tuple starts: its column count
        self.names = names  # the relation's columns
        self._row: dict[str, Value] | None = None

    def row(self) -> dict[str, Value]:
        """The values by column name; a tuple shorter than the relation has only its first columns."""
        row = self._row
        if row is None:
            try:
                row = self._row = _row(self.data, self.offset, self.names)[0]
            except (struct.error, IndexError, UnicodeDecodeError) as exc:
                raise DecodeError(f"truncated or malformed tuple: {exc}") from exc
        return row

    def get(self, column: str) -> Value:
        """The value of one column, as `row().get(column)`: the ones before it are read past, not decoded."""
        if self._row is not None:
            return self._row.get(column)
        try:
            position = self.names.index(column)
        except ValueError:
            return None  # not a column of the relation
        data = self.data
        try:
            (count,) = _I16.unpack_from(data, self.offset)
            if count < 0:
                raise DecodeError(f"tuple of {count} columns")
            if position >= count:
                return None
            offset = self.offset + 2
            for _ in range(position):
                offset = _past_value(data, offset)
            kind = data[offset]
            if kind == 0x74:  # 't'
                (length,) = _U32.unpack_from(data, offset + 1)
                if offset + 5 + length > len(data):
                    raise IndexError("value past the end of the message")
                return data[offset + 5 : offset + 5 + length].decode()
        except (struct.error, IndexError, UnicodeDecodeError) as exc:
            raise DecodeError(f"truncated or malformed tuple: {exc}") from exc
        # NULL, unchanged, or binary: as the whole row has it (rare for a key).
        return self.row().get(column)


def as_row(relation: Relation, values: tuple[Value, ...]) -> dict[str, Value]:
    """The values of a tuple by column name; a tuple shorter than the relation has only its first columns."""
    return dict(zip(relation.column_names, values, strict=False))
