"""Replays every transcript of the core (``tests/core/transcripts/*.txt``, interpreted by
``helpers.transcript``) and compares its output with the file; ``pytest --rewrite`` writes the
actual output into the files instead (then review ``git diff tests/transcripts``)."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

from helpers.transcript import SEPARATOR, parse, run_transcript

FILES = sorted(Path(__file__).parent.glob("*.txt"))


def test_there_are_transcripts():
    assert {f.stem for f in FILES} >= {"normal_case", "view_change", "checkpoint"}


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_transcript(path, rewrite):
    expected, actual = run_transcript(path)
    if rewrite:
        path.write_text(actual)
        return
    assert "error:" not in actual, "a command failed:\n" + actual
    if actual != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), actual.splitlines(True),
                                            str(path.name), "actual"))
        pytest.fail(f"{path.name} differs from the replay (pytest --rewrite regenerates it):\n{diff}")


def test_parser_round_trips_its_output():
    text = "# c\ncluster n=4\n----\nok\n\nstatus\n----\na\nb\n"
    assert parse(text) == [(["# c"], "cluster n=4", ["ok"]), ([], "status", ["a", "b"])]
    assert SEPARATOR == "----"
