"""`make eval` fails fast and says what to do when no server answers, and never reuses a results file."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import pytest

from devtools.truss_local import free_port
from evals import humaneval
from evals.humaneval import main, write_unique


def test_no_server_fails_fast_naming_the_url(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()  # nothing listens there
    output = tmp_path / "results.json"
    started = time.monotonic()
    assert main(["--port", str(port), "--limit", "1", "--output", str(output)]) == 2
    assert time.monotonic() - started < 2
    err = capsys.readouterr().err
    assert f"http://127.0.0.1:{port}/v1/models/model" in err and "make serve" in err
    assert not output.exists()


def test_results_files_are_unique_within_the_same_instant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    instant = datetime.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=datetime.UTC)

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz: datetime.tzinfo | None = None) -> datetime.datetime:  # type: ignore[override]
            return instant

    monkeypatch.setattr(humaneval.datetime, "datetime", Frozen)
    paths = [write_unique(tmp_path, f"run {i}") for i in range(3)]
    assert len(set(paths)) == 3
    assert paths[0].name == "humaneval-20260102T030405.678901Z.json"
    assert [p.read_text() for p in paths] == ["run 0", "run 1", "run 2"]
