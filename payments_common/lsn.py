"""PostgreSQL WAL positions (LSNs) between their text form and integers."""

from __future__ import annotations


def parse_lsn(text: str) -> int:
    """Turns "16/B374D848" into an integer; raises ValueError when malformed."""
    high, sep, low = text.partition("/")
    if not sep or not high or not low or len(high) > 8 or len(low) > 8:
        raise ValueError(f"not an LSN: {text!r}")
    try:
        return (int(high, 16) << 32) | int(low, 16)
    except ValueError:
        raise ValueError(f"not an LSN: {text!r}") from None


def format_lsn(value: int) -> str:
    """Turns an integer position into PostgreSQL's "X/Y" text form."""
    if not 0 <= value < 1 << 64:
        raise ValueError(f"LSN out of range: {value}")
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"
