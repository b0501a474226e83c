"""`make eval` end to end against the real Truss server serving the tiny model, through both routes.

The tiny model's weights are random, so its pass@1 is about 0; these tests check the run, not the figure."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse

import pytest

from devtools.truss_local import RunningServer
from evals.humaneval import main


@pytest.mark.parametrize("route", ["completions", "predict"])
def test_a_limited_run_scores_and_writes_results(
    server: RunningServer, route: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "results.json"
    port = urlparse(server.base_url).port
    argv = ["--port", str(port), "--route", route, "--limit", "3", "--n", "2", "--max-new-tokens", "32"]
    assert main([*argv, "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "pass@1 = " in printed and "request errors" in printed
    if route == "completions":  # the OpenAI route names the served model: a local folder, with no model card
        assert "model card: none for tiny-starcoder" in printed
    results = json.loads(output.read_text())
    assert [p["task_id"] for p in results["problems"]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert all(len(p["samples"]) == 2 for p in results["problems"])
    assert results["counts"]["request failed"] == 0
    assert sum(results["counts"].values()) == 6
    assert 0.0 <= results["pass_at_k"]["pass@1"] <= 1.0
    # Seeds make a sample reproducible: sample i of each problem used seed 1234 + i.
    assert results["seed"] == 1234
    assert "api_key" not in results["endpoint"]
