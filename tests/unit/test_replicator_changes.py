"""Decoded transactions gathered into row batches: positions, chunks, truncates."""

from __future__ import annotations

import struct

import pytest

from replicator.changes import ACCOUNTS, PAYMENTS, RowBatch, RowChange, Transaction, TruncateTables
from replicator.decoder import UNCHANGED, Begin, DecodeError, TupleData
from tests.support.rows import A, B, account_row, tuple_data


def _transaction(final_lsn: int) -> Transaction:
    return Transaction(Begin(final_lsn=final_lsn, commit_time_us=0, xid=7), skip=False)


def _rows(batch: RowBatch) -> list[RowChange]:
    return [change for segment in batch.segments for change in segment.rows()]


def test_every_change_takes_the_position_of_the_commit() -> None:
    transaction = _transaction(500)
    transaction.changes += [
        (ACCOUNTS, "insert", account_row(account_id=A)),
        (ACCOUNTS, "update", account_row(account_id=B)),
    ]
    batch = RowBatch()
    transaction.collect(batch)
    assert [(change.row["account_id"], change.lsn) for change in _rows(batch)] == [(A, 500), (B, 500)]
    assert batch.changes == 2


def test_a_chunk_collects_only_its_slice() -> None:
    transaction = _transaction(600)
    transaction.changes += [(ACCOUNTS, "insert", account_row(account_id=str(i))) for i in range(5)]
    first, second = RowBatch(), RowBatch()
    transaction.collect(first, 0, 3)
    transaction.collect(second, 3, 6)
    assert [change.row["account_id"] for change in _rows(first)] == ["0", "1", "2"]
    assert [change.row["account_id"] for change in _rows(second)] == ["3", "4"]


def test_a_truncate_ends_a_segment_and_keeps_only_published_tables() -> None:
    transaction = _transaction(700)
    transaction.changes += [
        (ACCOUNTS, "update", account_row(owner_name="Alice")),
        ((ACCOUNTS, "public.ledger_entries"), None, None),
        (ACCOUNTS, "insert", account_row(owner_name="Bob")),
        (("public.ledger_entries",), None, None),
    ]
    batch = RowBatch()
    transaction.collect(batch)
    assert [segment.truncate for segment in batch.segments] == [TruncateTables((ACCOUNTS,), 700), None]
    # The same row on both sides of the truncate: each side keeps its own change.
    assert [[change.row["owner_name"] for change in segment.rows()] for segment in batch.segments] == [
        ["Alice"],
        ["Bob"],
    ]


def test_rows_of_unpublished_tables_are_counted_but_not_kept() -> None:
    batch = RowBatch()
    batch.add("public.ledger_entries", "insert", {"entry_id": "1"}, 10)
    batch.add(PAYMENTS, "delete", {"payment_id": "p"}, 10)
    assert batch.changes == 2
    assert [change.table for change in _rows(batch)] == [PAYMENTS]


def test_a_deleted_row_inserted_again_keeps_the_delete_first() -> None:
    batch = RowBatch()
    batch.add(ACCOUNTS, "delete", {"account_id": A}, 10)
    batch.add(ACCOUNTS, "insert", account_row(), 20)
    batch.add(ACCOUNTS, "update", account_row(owner_name="Carol"), 30)
    assert [(change.kind, change.lsn) for change in _rows(batch)] == [("delete", 10), ("update", 30)]


def _arrived(*values: object) -> TupleData:
    """An accounts row change's tuple as the decoder hands it over, undecoded."""
    return TupleData(tuple_data(*values), 0, ("account_id", "owner_name", "status"))


def test_a_change_that_a_later_one_replaces_is_read_only_as_far_as_its_key() -> None:
    # The first change's status is not UTF-8: decoded, it would raise.
    first = TupleData(
        struct.pack(">h", 3) + tuple_data(A, "Alice")[2:] + b"t" + struct.pack(">I", 1) + b"\xff",
        0,
        ("account_id", "owner_name", "status"),
    )
    with pytest.raises(DecodeError):
        TupleData(first.data, 0, first.names).row()
    batch = RowBatch()
    batch.add(ACCOUNTS, "update", first, 10)
    batch.add(ACCOUNTS, "update", _arrived(A, "Alice", "FROZEN"), 20)
    assert [(change.row, change.lsn) for change in _rows(batch)] == [
        ({"account_id": A, "owner_name": "Alice", "status": "FROZEN"}, 20)
    ]


def test_unchanged_columns_of_changes_as_they_arrived_come_from_the_latest_change_that_sent_them() -> None:
    batch = RowBatch()
    batch.add(ACCOUNTS, "insert", _arrived(A, "Alice", "ACTIVE"), 10)
    batch.add(ACCOUNTS, "update", _arrived(A, "Alicia", UNCHANGED), 20)
    batch.add(ACCOUNTS, "update", _arrived(A, UNCHANGED, "FROZEN"), 30)
    batch.add(ACCOUNTS, "update", _arrived(A, UNCHANGED, UNCHANGED), 40)
    batch.add(ACCOUNTS, "update", _arrived(B, UNCHANGED, "ACTIVE"), 40)
    assert [(change.kind, change.row, change.lsn) for change in _rows(batch)] == [
        ("update", {"account_id": A, "owner_name": "Alicia", "status": "FROZEN"}, 40),
        # Nothing earlier in the batch to take it from: left to resolution against Redis.
        ("update", {"account_id": B, "owner_name": UNCHANGED, "status": "ACTIVE"}, 40),
    ]


def test_a_row_replaced_many_times_in_one_batch_is_merged_without_recursion() -> None:
    batch = RowBatch()
    batch.add(ACCOUNTS, "insert", _arrived(A, "Alice", "ACTIVE"), 1)
    for lsn in range(2, 5002):
        batch.add(ACCOUNTS, "update", _arrived(A, UNCHANGED, UNCHANGED), lsn)
    assert [change.row for change in _rows(batch)] == [
        {"account_id": A, "owner_name": "Alice", "status": "ACTIVE"}
    ]
