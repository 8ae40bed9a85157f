"""The profile summary: inclusive and self shares of py-spy's collapsed stacks, by function."""

from __future__ import annotations

import pytest

from bench.profile import summarize


def test_shares_are_per_function_with_line_numbers_folded() -> None:
    stacks = [
        "main (app.py:10);handle (app.py:20);parse (codec.py:5) 6",
        "main (app.py:10);handle (app.py:21);send (net.py:7) 3",
        "main (app.py:11) 1",
        "",
    ]
    inclusive, own = summarize(stacks)
    assert dict(inclusive) == pytest.approx(
        {"main (app.py)": 100.0, "handle (app.py)": 90.0, "parse (codec.py)": 60.0, "send (net.py)": 30.0}
    )
    assert dict(own) == pytest.approx(
        {"parse (codec.py)": 60.0, "send (net.py)": 30.0, "main (app.py)": 10.0}
    )


def test_recursion_counts_once_per_sample() -> None:
    inclusive, _ = summarize(["f (a.py:1);f (a.py:2) 4"])
    assert inclusive == [("f (a.py)", 100.0)]


def test_a_coroutine_resumed_from_c_is_its_own_root() -> None:
    inclusive, own = summarize(["main (m.py:1) 1", "handler (h.py:3);read (r.py:9) 3"])
    assert dict(inclusive) == pytest.approx(
        {"handler (h.py)": 75.0, "read (r.py)": 75.0, "main (m.py)": 25.0}
    )
    assert dict(own) == pytest.approx({"read (r.py)": 75.0, "main (m.py)": 25.0})


def test_no_samples() -> None:
    assert summarize([]) == ([], [])
