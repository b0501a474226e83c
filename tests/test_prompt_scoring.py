"""Prompt scoring for evaluation harnesses: ``echo`` with ``logprobs`` returns the prompt's own logprobs.

The request is lm-evaluation-harness's ``local-completions`` loglikelihood payload (its
``_create_payload`` for a loglikelihood request: context + continuation as the prompt, ``echo``,
``logprobs: 1``, ``max_tokens`` 1, ``temperature`` 0, ``seed``); some harnesses send ``max_tokens: 0``.
The numbers are checked against a direct forward pass of the tiny model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import RunningServer

CONTEXT = "def add(a, b):\n"
CONTINUATION = "    return a + b"


def lm_eval_payload(max_tokens: int) -> dict[str, Any]:
    return {
        "model": "starcoder",
        "prompt": [CONTEXT + CONTINUATION],
        "temperature": 0,
        "max_tokens": max_tokens,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }


def reference(tiny_model_dir: Path, text: str) -> tuple[list[int], list[float], list[int]]:
    """Token ids, each token's logprob after the ones before it, and the argmax at each position."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], dim=-1)
    return ids, [logprobs[i, ids[i + 1]].item() for i in range(len(ids) - 1)], logprobs.argmax(-1).tolist()


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_lm_eval_loglikelihood_request_scores_the_prompt(
    server: RunningServer, tiny_model_dir: Path, max_tokens: int
) -> None:
    response = httpx.post(server.base_url + "/v1/completions", json=lm_eval_payload(max_tokens), timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    choice = body["choices"][0]
    logprobs = choice["logprobs"]
    ids, expected, argmax = reference(tiny_model_dir, CONTEXT + CONTINUATION)
    assert len(logprobs["tokens"]) == len(ids) + max_tokens
    assert body["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": max_tokens,
        "total_tokens": len(ids) + max_tokens,
    }
    # The first prompt token has nothing before it: null, as OpenAI and vLLM show it.
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["token_logprobs"][1 : len(ids)] == pytest.approx(expected, abs=1e-4)
    # What a harness computes for "is the continuation greedy": the top alternative at each position.
    tops = logprobs["top_logprobs"][1 : len(ids)]
    assert all(max(top.values()) >= lp - 1e-6 for top, lp in zip(tops, logprobs["token_logprobs"][1 : len(ids)]))
    assert choice["text"].startswith(CONTEXT + CONTINUATION)
    assert "".join(logprobs["tokens"][: len(ids)]) == CONTEXT + CONTINUATION
    assert logprobs["text_offset"][: len(ids)] == [len("".join(logprobs["tokens"][:i])) for i in range(len(ids))]
    if max_tokens:
        assert logprobs["token_logprobs"][-1] is not None and choice["text"] != CONTEXT + CONTINUATION
        assert len(argmax) == len(ids) - 1


def test_prompt_scoring_needs_echo_and_is_not_streamed(server: RunningServer) -> None:
    url = server.base_url + "/v1/completions"
    no_echo = httpx.post(url, json={"prompt": "x", "max_tokens": 0}, timeout=60)
    assert no_echo.status_code == 400 and no_echo.json()["error"]["param"] == "max_tokens"
    streamed = httpx.post(url, json={**lm_eval_payload(1), "stream": True}, timeout=60)
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "stream"
