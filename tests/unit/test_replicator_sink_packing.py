"""The sink's own EVALSHA packing sends exactly the bytes redis-py would send."""

from __future__ import annotations

from redis._parsers.encoders import Encoder
from redis.connection import PythonRespSerializer

from replicator.sink import pack_evalsha


def _redis_py(*args: object) -> bytes:
    encoder = Encoder("utf-8", "strict", False)  # type: ignore[no-untyped-call]
    serializer = PythonRespSerializer(6000, encoder.encode)
    return b"".join(serializer.pack(*args))  # type: ignore[no-untyped-call]


def test_packed_evalsha_is_byte_identical_to_redis_py() -> None:
    keys = ["rm:v1:lock:{slot}", "rm:v1:checkpoint:{slot}", "rm:v1:payment:{p-é}"]
    args: list[str | bytes | int] = [
        "host:1:abcd",
        123_456_789_012_345_678,
        "",
        10_000,
        b"\x00\r\n\xff" * 3000,  # larger than redis-py's buffer cutoff
        "V",
        18_446_744_073_709_551_615,
        b"",
        "T",
        0,
        -1,
    ]
    assert pack_evalsha("f" * 40, keys, args) == _redis_py("EVALSHA", "f" * 40, len(keys), *keys, *args)


def test_packed_evalsha_without_keys_or_args() -> None:
    assert pack_evalsha("abc", [], []) == _redis_py("EVALSHA", "abc", 0)
