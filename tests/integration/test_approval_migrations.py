"""The approval schema's migrations against a private PostgreSQL: what each keeps, and the way back down."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import psycopg2
import pytest
from alembic.script import ScriptDirectory
from psycopg2.extensions import connection as Connection

from approval_svc.adapters.repository import IdempotencyKey, StoredRequest
from approval_svc.adapters.unit_of_work import SqlUnitOfWork
from approval_svc.migrate import alembic_config, current, downgrade, upgrade
from tests.support import ROOT
from tests.support.approval import engine_for

# The latest revision: the one `migrate` goes to.
HEAD = ScriptDirectory.from_config(alembic_config("postgresql://unused")).get_current_head()

ANONYMOUS = "none:anonymous"


@pytest.fixture
def db(database_dsn: str) -> Iterator[Connection]:
    connection = psycopg2.connect(database_dsn)
    connection.autocommit = True
    try:
        yield connection
    finally:
        connection.close()


def rows(db: Connection, query: str, *args: object) -> list[tuple[object, ...]]:
    with db.cursor() as cursor:
        cursor.execute(query, args)
        return list(cursor.fetchall())


def primary_key(db: Connection) -> list[str]:
    """The columns of idempotency_keys' primary key, in order."""
    return [
        str(name)
        for (name,) in rows(
            db,
            """
            SELECT a.attname FROM pg_index AS i
            JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) ON true
            JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
            WHERE i.indrelid = 'idempotency_keys'::regclass AND i.indisprimary
            ORDER BY k.n
            """,
        )
    ]


def indexes(db: Connection) -> list[str]:
    found = rows(db, "SELECT indexname FROM pg_indexes WHERE tablename = 'idempotency_keys' ORDER BY 1")
    return [str(name) for (name,) in found]


_COLUMNS = "SELECT column_name FROM information_schema.columns WHERE table_name = 'idempotency_keys'"


def keys(db: Connection) -> list[tuple[object, ...]]:
    """Every record, without its time: caller (when there is one), request_id, method, fingerprint, response."""
    columns = [str(c) for (c,) in rows(db, _COLUMNS)]
    listed = ", ".join(c for c in ("caller", "request_id") if c in columns)
    found = rows(
        db,
        f"SELECT {listed}, method, request_fingerprint, response FROM idempotency_keys ORDER BY {listed}",
    )
    return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row) for row in found]


def record(db: Connection, request_id: str, caller: str | None = None) -> None:
    """Records a request as a server would, under `caller` (or, before 0002, under no caller)."""
    columns = ["request_id", "method", "request_fingerprint", "response"]
    values: list[object] = [request_id, "SubmitPayment", b"fp", request_id.encode()]
    if caller is not None:
        columns.insert(0, "caller")
        values.insert(0, caller)
    placeholders = ", ".join(["%s"] * len(values))
    with db.cursor() as cursor:
        cursor.execute(f"INSERT INTO idempotency_keys ({', '.join(columns)}) VALUES ({placeholders})", values)


async def test_keys_recorded_before_0002_are_the_anonymous_callers_and_the_table_is_not_rewritten(
    database_dsn: str, db: Connection
) -> None:
    assert upgrade(database_dsn, "0001") == "0001"
    record(db, "before")
    (file_before,) = rows(db, "SELECT pg_relation_filenode('idempotency_keys')")
    assert upgrade(database_dsn, "0002") == "0002"
    # The column came with a constant default: the rows were not rewritten.
    assert rows(db, "SELECT pg_relation_filenode('idempotency_keys')") == [file_before]
    assert primary_key(db) == ["caller", "request_id"]
    assert indexes(db) == ["idempotency_keys_pkey"]
    assert keys(db) == [(ANONYMOUS, "before", "SubmitPayment", b"fp", b"before")]
    # No default is left: a write that names no caller fails rather than become anonymous.
    assert rows(db, "SELECT column_default FROM information_schema.columns WHERE column_name = 'caller'") == [
        (None,)
    ]
    with pytest.raises(psycopg2.errors.NotNullViolation):
        record(db, "no caller")
    # The record is the anonymous caller's: replayed to it (authentication disabled), not to others,
    # by this release on its schema.
    upgrade(database_dsn)
    async with engine_for(database_dsn, pool_size=1) as engine, SqlUnitOfWork(engine) as uow:
        mine, _ = await uow.repo.begin_submission(IdempotencyKey(ANONYMOUS, "before"), [])
        assert mine.stored == StoredRequest("SubmitPayment", b"fp", b"before")
        theirs, _ = await uow.repo.begin_submission(IdempotencyKey("token:alice", "before"), [])
        assert theirs.stored is None


def test_an_upgrade_interrupted_after_its_first_step_runs_again(database_dsn: str, db: Connection) -> None:
    """A failed index build leaves the column and an index behind; the next run replaces that index."""
    upgrade(database_dsn, "0001")
    record(db, "before")
    with db.cursor() as cursor:
        cursor.execute(f"ALTER TABLE idempotency_keys ADD COLUMN caller text NOT NULL DEFAULT '{ANONYMOUS}'")
        cursor.execute("CREATE INDEX idempotency_keys_caller_request_id ON idempotency_keys (caller)")
    assert upgrade(database_dsn, "0002") == "0002"
    assert primary_key(db) == ["caller", "request_id"]
    assert indexes(db) == ["idempotency_keys_pkey"]
    assert keys(db) == [(ANONYMOUS, "before", "SubmitPayment", b"fp", b"before")]


def test_a_downgrade_keys_the_records_by_request_id_again(database_dsn: str, db: Connection) -> None:
    upgrade(database_dsn)
    record(db, "alice's", "token:alice")
    record(db, "bob's", "token:bob")
    assert downgrade(database_dsn, "0001") == "0001"
    assert primary_key(db) == ["request_id"]
    assert indexes(db) == ["idempotency_keys_pkey"]
    assert keys(db) == [
        ("alice's", "SubmitPayment", b"fp", b"alice's"),
        ("bob's", "SubmitPayment", b"fp", b"bob's"),
    ]
    # Up again, the callers are forgotten: the records are the anonymous caller's.
    assert upgrade(database_dsn, "0002") == "0002"
    assert [row[:2] for row in keys(db)] == [(ANONYMOUS, "alice's"), (ANONYMOUS, "bob's")]


def test_a_downgrade_is_refused_while_a_request_id_has_two_callers(database_dsn: str, db: Connection) -> None:
    upgrade(database_dsn, "0002")
    record(db, "shared", "token:alice")
    record(db, "shared", "token:bob")
    before = keys(db)
    with pytest.raises(RuntimeError, match="1 request_ids are recorded for more than one caller"):
        downgrade(database_dsn, "0001")
    refused = _cli("downgrade", "--revision", "0001", dsn=database_dsn)
    assert refused.returncode == 1
    assert "1 request_ids are recorded for more than one caller" in refused.stdout
    assert current(database_dsn) == "0002"
    assert primary_key(db) == ["caller", "request_id"]
    assert keys(db) == before


def _cli(*args: str, dsn: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPROVAL_")}
    return subprocess.run(
        [sys.executable, "-m", "approval_svc", *args],
        env={**env, "APPROVAL_DATABASE_URL": dsn},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _reached(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stdout.splitlines() if '"schema is at' in line]


def test_the_command_line_says_which_revision_the_schema_reached_and_goes_back_down(
    database_dsn: str,
) -> None:
    up = _cli("migrate", dsn=database_dsn)
    assert up.returncode == 0, up.stderr
    assert len(_reached(up)) == 1
    assert f'"schema is at {HEAD}"' in _reached(up)[0]
    # migrate only moves up: asked for an older revision, it says where the schema is.
    older = _cli("migrate", "--revision", "0001", dsn=database_dsn)
    assert older.returncode == 0, older.stderr
    assert f'"schema is at {HEAD}"' in _reached(older)[0]
    down = _cli("downgrade", "--revision", "0001", dsn=database_dsn)
    assert down.returncode == 0, down.stderr
    assert '"schema is at 0001"' in _reached(down)[0]
    assert current(database_dsn) == "0001"
    # Below the first revision there is no schema: not a downgrade.
    assert _cli("downgrade", "--revision", "base", dsn=database_dsn).returncode == 2
    assert current(database_dsn) == "0001"
    assert _cli("migrate", dsn=database_dsn).returncode == 0
    assert current(database_dsn) == HEAD
