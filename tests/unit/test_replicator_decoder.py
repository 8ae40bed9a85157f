"""The pgoutput decoder, on messages captured from a real PostgreSQL (see data/capture_pgoutput.py)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from replicator.decoder import (
    UNCHANGED,
    Begin,
    Commit,
    DecodeError,
    Decoder,
    Delete,
    Insert,
    LogicalMessage,
    Relation,
    Truncate,
    Update,
    as_row,
)
from tests.support.rows import tuple_data

CAPTURE = Path(__file__).parent / "data" / "pgoutput_capture.jsonl"
PAYMENT = "00000000-0000-4000-8000-000000000001"


def _decoded() -> list[object]:
    decoder = Decoder()
    return [
        decoder.decode(bytes.fromhex(json.loads(line)["hex"])) for line in CAPTURE.read_text().splitlines()
    ]


def test_every_captured_message_decodes_to_its_kind() -> None:
    lines = [json.loads(line) for line in CAPTURE.read_text().splitlines()]
    kinds = {"B": Begin, "C": Commit, "R": Relation, "I": Insert, "U": Update, "D": Delete, "T": Truncate}
    kinds["M"] = LogicalMessage
    for line, message in zip(lines, _decoded(), strict=True):
        assert isinstance(message, kinds[line["kind"]])


def test_transactions_are_framed_by_begin_and_commit() -> None:
    messages = _decoded()
    begins = [m for m in messages if isinstance(m, Begin)]
    commits = [m for m in messages if isinstance(m, Commit)]
    assert len(begins) == len(commits) == 7
    for begin, commit in zip(begins, commits, strict=True):
        assert commit.commit_lsn == begin.final_lsn
        assert commit.end_lsn > commit.commit_lsn
        assert commit.commit_time_us == begin.commit_time_us
        # A plausible Unix time in microseconds (after 2020).
        assert commit.commit_time_us > 1_577_836_800_000_000
    assert [c.end_lsn for c in commits] == sorted(c.end_lsn for c in commits)


def test_relation_carries_columns_and_key_flags() -> None:
    relation = next(m for m in _decoded() if isinstance(m, Relation) and m.name == "payments")
    assert relation.namespace == "public"
    assert relation.replica_identity == "d"
    assert relation.column_names[:3] == ("payment_id", "request_id", "payer_account_id")
    assert [c.name for c in relation.columns if c.is_key] == ["payment_id"]
    assert relation.columns[0].type_oid == 2950  # uuid


def test_insert_text_and_null_columns() -> None:
    insert = next(m for m in _decoded() if isinstance(m, Insert) and m.relation.name == "payments")
    row = as_row(insert.relation, insert.new)
    assert row["payment_id"] == PAYMENT
    assert row["amount_minor"] == "70000"
    assert row["decline_reason"] is None
    assert row["created_at"] == "2026-01-02 03:05:00+00"
    assert isinstance(row["reference"], str)
    assert len(row["reference"]) == 12000


def test_update_sends_an_untouched_toasted_column_as_unchanged() -> None:
    update = next(m for m in _decoded() if isinstance(m, Update) and m.relation.name == "payments")
    row = as_row(update.relation, update.new)
    assert update.old is None
    assert row["status"] == "DECLINED"
    assert row["reference"] is UNCHANGED


def test_a_relation_message_after_ddl_replaces_the_cached_one() -> None:
    decoder = Decoder()
    updates = []
    for line in CAPTURE.read_text().splitlines():
        message = decoder.decode(bytes.fromhex(json.loads(line)["hex"]))
        if isinstance(message, Update) and message.relation.name == "accounts":
            updates.append(message)
    added = updates[-1]
    assert added.relation.column_names[-1] == "nickname"
    assert as_row(added.relation, added.new)["nickname"] == "B"
    assert "nickname" not in updates[0].relation.column_names


def test_delete_sends_the_key() -> None:
    deletes = [m for m in _decoded() if isinstance(m, Delete)]
    assert [d.relation.name for d in deletes] == ["payment_events", "payment_events", "payments"]
    row = as_row(deletes[-1].relation, deletes[-1].old)
    assert row["payment_id"] == PAYMENT
    assert row["status"] is None


def test_truncate_lists_every_relation() -> None:
    truncate = next(m for m in _decoded() if isinstance(m, Truncate))
    assert sorted(r.name for r in truncate.relations) == ["accounts", "payment_events", "payments"]
    assert truncate.cascade
    assert not truncate.restart_identity


def test_logical_message() -> None:
    message = next(m for m in _decoded() if isinstance(m, LogicalMessage))
    assert message.prefix == "heartbeat"
    assert message.content == b"tick"
    assert message.transactional


def test_binary_column() -> None:
    decoder = Decoder()
    relation = struct.pack(">cI", b"R", 7) + b"public\0t\0d" + struct.pack(">h", 1)
    relation += b"\x01id\0" + struct.pack(">Ii", 17, -1)
    decoder.decode(relation)
    insert = decoder.decode(
        struct.pack(">cIch", b"I", 7, b"N", 1) + b"b" + struct.pack(">I", 3) + b"\x00\x01\x02"
    )
    assert isinstance(insert, Insert)
    assert insert.new == (b"\x00\x01\x02",)


def test_change_before_its_relation_is_an_error() -> None:
    with pytest.raises(DecodeError):
        Decoder().decode(struct.pack(">cIch", b"I", 99, b"N", 0))


@pytest.mark.parametrize("payload", [b"", b"Z", b"B\x00\x01", b"I\x00"])
def test_malformed_messages_raise_decode_error(payload: bytes) -> None:
    with pytest.raises(DecodeError):
        Decoder().decode(payload)


def test_row_change_matches_the_decoded_message() -> None:
    decoder = Decoder()
    seen = 0
    for line in CAPTURE.read_text().splitlines():
        payload = bytes.fromhex(json.loads(line)["hex"])
        message = decoder.decode(payload)
        found = decoder.row_change(payload)
        change = None if found is None else (found[0], found[1], found[2].row())
        if isinstance(message, Insert):
            assert change == ("insert", message.relation, as_row(message.relation, message.new))
        elif isinstance(message, Update):
            assert change == ("update", message.relation, as_row(message.relation, message.new))
        elif isinstance(message, Delete):
            assert change == ("delete", message.relation, as_row(message.relation, message.old))
        else:
            assert change is None
            continue
        seen += 1
    assert seen > 0


def test_row_change_of_a_malformed_message_raises_decode_error() -> None:
    decoder = Decoder()
    with pytest.raises(DecodeError):
        decoder.row_change(struct.pack(">cI", b"I", 99))


@pytest.mark.parametrize(
    "tuple_data",
    [
        struct.pack(">h", 2) + b"t" + struct.pack(">I", 40) + b"short",  # a value past the end
        # the last value past the end
        struct.pack(">h", 2) + b"t" + struct.pack(">I", 1) + b"1" + b"t" + struct.pack(">I", 40) + b"short",
        # a negative column count
        struct.pack(">h", -1) + b"t" + struct.pack(">I", 1) + b"1" + b"t" + struct.pack(">I", 1) + b"2",
        struct.pack(">h", 2) + b"t" + struct.pack(">I", 1) + b"1" + b"?",  # an unknown kind
        struct.pack(">h", 2) + b"t" + struct.pack(">I", 1),  # the value missing
        # not UTF-8
        struct.pack(">h", 2) + b"t" + struct.pack(">I", 1) + b"1" + b"t" + struct.pack(">I", 2) + b"\xff\xfe",
    ],
)
def test_a_malformed_tuple_raises_decode_error_when_it_is_read(tuple_data: bytes) -> None:
    """A row change's tuple is decoded when asked for, the row or one column: malformed, it raises then."""
    columns = b"".join(
        struct.pack(">b", 0) + name.encode() + b"\0" + struct.pack(">Ii", 25, -1) for name in ("id", "note")
    )
    decoder = Decoder()
    decoder.decode(struct.pack(">cI", b"R", 16384) + b"public\0t\0d" + struct.pack(">h", 2) + columns)
    payload = b"I" + struct.pack(">I", 16384) + b"N" + tuple_data
    whole, one = decoder.row_change(payload), decoder.row_change(payload)
    assert whole is not None
    assert one is not None
    with pytest.raises(DecodeError):
        whole[2].row()
    with pytest.raises(DecodeError):
        one[2].get("note")


@pytest.mark.parametrize(
    "values",
    [
        ("1", None, UNCHANGED),  # every column
        ("1", "é"),  # shorter than the relation: its first columns only
        ("1", b"\x00\x01", None, "extra"),  # longer: the values past the relation's columns dropped
        (),
    ],
)
@pytest.mark.parametrize(
    "kind",
    [
        "insert",
        "update",
        "update with the old key",
        "update with the old row",
        "delete by key",
        "delete by row",
    ],
)
def test_a_row_read_by_name_is_the_tuple_by_name(values: tuple[object, ...], kind: str) -> None:
    """The hot path's row (`row_change`) is what the decoded message's tuple gives by column name."""
    columns = b"".join(
        struct.pack(">b", int(name == "id")) + name.encode() + b"\0" + struct.pack(">Ii", 25, -1)
        for name in ("id", "name", "note")
    )
    decoder = Decoder()
    relation = decoder.decode(
        struct.pack(">cI", b"R", 16384) + b"public\0t\0d" + struct.pack(">h", 3) + columns
    )
    assert isinstance(relation, Relation)
    oid = struct.pack(">I", relation.oid)
    old_key = tuple_data("0", None, None)  # another key, and a tuple of another length than the new one
    old_row = tuple_data("0", "before", UNCHANGED, "x")
    payload = {
        "insert": b"I" + oid + b"N" + tuple_data(*values),
        "update": b"U" + oid + b"N" + tuple_data(*values),
        "update with the old key": b"U" + oid + b"K" + old_key + b"N" + tuple_data(*values),
        "update with the old row": b"U" + oid + b"O" + old_row + b"N" + tuple_data(*values),
        "delete by key": b"D" + oid + b"K" + tuple_data(*values),
        "delete by row": b"D" + oid + b"O" + tuple_data(*values),
    }[kind]
    message = decoder.decode(payload)
    if isinstance(message, Delete):
        expected = ("delete", relation, as_row(relation, message.old))
    else:
        assert isinstance(message, Insert | Update)
        expected = (kind.split()[0], relation, as_row(relation, message.new))
    change = decoder.row_change(payload)
    assert change is not None
    assert (change[0], change[1], change[2].row()) == expected
    assert list(expected[2].values()) == list(values[:3])
    # One column read alone, before the row is decoded, is the row's.
    for name in ("id", "name", "note", "absent"):
        fresh = decoder.row_change(payload)
        assert fresh is not None
        assert fresh[2].get(name) == expected[2].get(name)
