"""Streaming, fill-in-the-middle, chat, instructions, stop sequences and seeds through the real server."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import httpx
import pytest

from tests.conftest import RunningServer


def complete(server: RunningServer, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(server.predict_url, json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["data"]


def stream_chunks(server: RunningServer, body: dict[str, Any]) -> list[bytes]:
    with httpx.stream("POST", server.predict_url, json={**body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/plain; charset=utf-8"
        return list(response.iter_bytes())


def test_stream_concatenates_to_the_non_streamed_completion(server: RunningServer) -> None:
    for prompt in ("def compute_fib(n):", "héllo 🙂", "SELECT"):
        body = {"prompt": prompt, "max_new_tokens": 60}
        chunks = stream_chunks(server, body)
        assert len(chunks) > 1  # really streamed, not one blob
        pieces = [chunk.decode("utf-8") for chunk in chunks]  # strict: no chunk splits a character
        assert "".join(pieces) == complete(server, body)["completion"]


def test_stream_default_is_off_and_envelope_unchanged(server: RunningServer) -> None:
    response = httpx.post(server.predict_url, json={"prompt": "x", "max_new_tokens": 2}, timeout=60)
    assert set(response.json()) == {"status", "data", "message"}


# The request's log line (api/metrics.py) when its client left.
LEFT_LINE = (
    r"request id=\d+ route=predict path=\w+ status=499 prompt_tokens=\d+ completion_tokens=(\d+) ttft=\S+ "
    r"duration=\S+ finish_reason=(\w+)"
)


def test_disconnect_mid_stream_stops_generation(server: RunningServer) -> None:
    body = {"prompt": "import os\n", "max_new_tokens": 2000, "min_new_tokens": 2000, "stream": True}
    done_lines_before = len(re.findall(LEFT_LINE, server.log()))
    with httpx.stream("POST", server.predict_url, json=body, timeout=60) as response:
        chunks = response.iter_bytes()
        next(chunks), next(chunks)  # generation is under way; now hang up
    deadline = time.monotonic() + 30
    while True:
        done = re.findall(LEFT_LINE, server.log())
        if len(done) > done_lines_before:
            break
        assert time.monotonic() < deadline, "the generation did not stop after the client left"
        time.sleep(0.1)
    completion_tokens, finish_reason = done[-1]
    assert finish_reason == "cancelled" and int(completion_tokens) < 2000
    # The engine is idle again: the next request is answered rather than queued behind 2000 tokens.
    assert complete(server, {"prompt": "hello", "max_new_tokens": 3})["completion_tokens"] == 3


def test_fill_in_the_middle(server: RunningServer) -> None:
    prefix, suffix = "def add(a, b):\n    ", "\n    return result\n"
    data = complete(server, {"prefix": prefix, "suffix": suffix, "max_new_tokens": 30})
    assert (data["prefix"], data["suffix"]) == (prefix, suffix)  # echoes what was sent
    assert data["prompt"] == f"<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>"
    assert not re.search(r"<fim_\w+>|<\|endoftext\|>", data["completion"])
    # A raw prompt that already holds the FIM tokens is the same request.
    raw = complete(server, {"prompt": data["prompt"], "max_new_tokens": 30})
    assert raw["completion"] == data["completion"]
    assert raw["prompt_tokens"] == data["prompt_tokens"]


def test_chat_messages_use_the_default_dialogue_template(server: RunningServer) -> None:
    messages = [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "Reverse a list."},
    ]
    data = complete(server, {"messages": messages, "max_new_tokens": 40})
    assert data["messages"] == messages
    assert data["prompt"] == "You write Python.\n\nHuman: Reverse a list.\n\nAssistant:"
    assert "\nHuman:" not in data["completion"]


def test_instruction_uses_the_alpaca_template(server: RunningServer) -> None:
    data = complete(server, {"instruction": "Explain this.", "input": "x = {}", "max_new_tokens": 8})
    assert data["prompt"].endswith("### Instruction:\nExplain this.\n\n### Input:\nx = {}\n\n### Response:")
    assert (data["instruction"], data["input"]) == ("Explain this.", "x = {}")
    data = complete(server, {"instruction": "Write a sort.", "max_new_tokens": 8})
    assert "### Input:" not in data["prompt"] and data["prompt"].endswith("Write a sort.\n\n### Response:")


def test_stop_sequences_streamed_and_not(server: RunningServer) -> None:
    base = {"prompt": "fn main", "max_new_tokens": 40, "min_new_tokens": 40}
    full = complete(server, base)["completion"]
    stop = full[12:15]
    data = complete(server, {**base, "stop": [stop, "never-generated"]})
    assert data["completion"] == full[: full.find(stop)]
    assert data["finish_reason"] == "stop" and data["completion_tokens"] < 40
    streamed = b"".join(stream_chunks(server, {**base, "stop": stop})).decode()
    assert streamed == data["completion"]


def test_seeded_sampling_is_reproducible_even_under_concurrency(server: RunningServer) -> None:
    sample = {"prompt": "x = 1", "do_sample": True, "temperature": 1.0, "max_new_tokens": 12, "min_new_tokens": 12}
    alone = [complete(server, {**sample, "seed": seed})["completion"] for seed in range(4)]
    assert len(set(alone)) > 1

    async def together() -> list[str]:
        async with httpx.AsyncClient(timeout=120) as client:
            bodies = [{**sample, "seed": seed} for seed in range(4)] * 2
            responses = await asyncio.gather(*(client.post(server.predict_url, json=b) for b in bodies))
        return [r.json()["data"]["completion"] for r in responses]

    assert asyncio.run(together()) == alone * 2


def test_finish_reasons_and_token_counts(server: RunningServer) -> None:
    data = complete(server, {"prompt": "import os\n", "max_new_tokens": 7, "min_new_tokens": 7})
    assert (data["finish_reason"], data["completion_tokens"]) == ("length", 7)
    data = complete(server, {"prompt": "def compute_fib(n):", "max_new_tokens": 200})
    assert data["finish_reason"] == "eos" and data["completion_tokens"] < 200
    # vLLM's ignore_eos: the same prompt, generated to its limit.
    data = complete(server, {"prompt": "def compute_fib(n):", "max_new_tokens": 200, "ignore_eos": True})
    assert (data["finish_reason"], data["completion_tokens"]) == ("length", 200)


def test_num_return_sequences_returns_each_sample(server: RunningServer) -> None:
    body = {"prompt": "x = 1", "do_sample": True, "num_return_sequences": 3, "seed": 11, "max_new_tokens": 6}
    data = complete(server, body)
    assert len(data["completions"]) == 3 and data["completion"] == data["completions"][0]["completion"]
    assert len({c["completion"] for c in data["completions"]}) > 1


def test_a_stream_that_an_error_ends_early_is_visibly_truncated(server: RunningServer) -> None:
    """After a 200 a text stream cannot carry an error: the server aborts it instead of ending it cleanly."""
    # Every token but one is suppressed and no token may repeat: after one token nothing is left.
    only = 100
    body = {
        "prompt": "def f():",
        "max_new_tokens": 10,
        "stream": True,
        "suppress_tokens": [i for i in range(694) if i != only],
        "no_repeat_ngram_size": 1,
    }
    with (
        pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"),
        httpx.stream("POST", server.predict_url, json=body, timeout=60) as response,
    ):
        assert response.status_code == 200
        response.read()
    assert "predict stream aborted (truncated)" in server.log()
    assert complete(server, {"prompt": "hello", "max_new_tokens": 3})["completion_tokens"] == 3
