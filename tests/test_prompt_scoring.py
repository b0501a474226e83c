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


# ---- a bounded workload (issue 22): chunked, cancellable, admitted, fair to the other paths ----


def _reference_logprobs(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), dim=-1)


def _check_scores(scores: Any, ids: list[int], reference: torch.Tensor, top: int) -> None:
    entries = list(scores)
    assert [e.token_id for e in entries] == ids[1:]
    chosen = reference.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor([e.logprob for e in entries]), chosen, atol=1e-4, rtol=0)
    values, indices = reference.topk(top, dim=-1)
    assert [[t for t, _ in e.top] for e in entries] == indices.tolist()
    torch.testing.assert_close(torch.tensor([[lp for _, lp in e.top] for e in entries]), values, atol=1e-4, rtol=0)


def test_a_prompt_scored_in_chunks_equals_one_forward_pass(engine: Any) -> None:
    import asyncio

    ids = [(i * 37 + 11) % engine.model.config.vocab_size for i in range(300)]
    reference = _reference_logprobs(engine.model, ids)
    for chunk in (64, 300):  # five chunks (the last one short), and one
        scores = asyncio.run(engine.score_prompt(ids, 3, chunk_tokens=chunk))
        assert len(scores) == len(ids) - 1 and scores[-1].token_id == ids[-1]
        _check_scores(scores, ids, reference, 3)


def test_starcoder2_chunks_cross_its_sliding_window(tiny_starcoder2_dir: Path) -> None:
    """StarCoder2's cache keeps a 512-token window: chunks of 200 over 900 positions attend across it as one pass."""
    from starcoder_serving.engine.generate_worker import PromptScorer

    model = AutoModelForCausalLM.from_pretrained(tiny_starcoder2_dir, dtype=torch.float32).eval()
    ids = [(i * 53 + 7) % model.config.vocab_size for i in range(900)]
    scorer = PromptScorer(ids, 2, chunk_tokens=200)
    with torch.inference_mode():
        while not scorer.done:
            scorer.step(model)
    assert scorer.chunks_run == scorer.chunks == 5
    _check_scores(scorer.result(), ids, _reference_logprobs(model, ids), 2)


def _token_prompts(count: int, tokens: int) -> list[list[int]]:
    """``count`` distinct token-id prompts (each is scored: copies of one prompt are scored once)."""
    return [[(p * 31 + i * 7) % 500 + 1 for i in range(tokens)] for p in range(count)]


def _scoring(prompt: Any) -> dict[str, Any]:
    return {"model": "starcoder", "prompt": prompt, "echo": True, "logprobs": 5, "max_tokens": 0}


def test_scoring_past_capacity_gets_503_and_a_hang_up_frees_it(server: RunningServer) -> None:
    """The server scores at most 16 context windows of prompt tokens at once (8,192 tokens each here): a request
    that fills that holds it, another one is refused at once, one that could never fit is a 400; a client that hangs
    up stops its scoring within a chunk, and its capacity is free again."""
    import asyncio
    import time

    url = server.base_url + "/v1/completions"
    window = 8192

    async def scenario() -> tuple[httpx.Response, httpx.Response, float]:
        async with httpx.AsyncClient(timeout=60) as client:
            # 16 distinct prompts of 8,190 tokens: 131,040 of the 131,072 tokens the server scores at once.
            holding = _scoring(_token_prompts(16, window - 2))
            holder = asyncio.create_task(client.post(url, json=holding))
            probe = _scoring([[5] * 40])  # 40 more tokens do not fit while the holder is scored
            deadline = time.monotonic() + 30
            while (refused := await client.post(url, json=probe)).status_code == 200 and time.monotonic() < deadline:
                if holder.done():  # refused while a probe was scored: the two did not fit together either
                    holder = asyncio.create_task(client.post(url, json=holding))
                await asyncio.sleep(0.02)  # the holder is not admitted yet
            too_big = await client.post(url, json=_scoring(_token_prompts(17, 8000)))
            holder.cancel()  # hang up
            await asyncio.gather(holder, return_exceptions=True)
            left = time.monotonic()
            while (await client.post(url, json=probe)).status_code != 200 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            return refused, too_big, time.monotonic() - left

    refused, too_big, freed_after = asyncio.run(scenario())
    assert refused.status_code == 503, refused.text
    assert "at capacity" in refused.json()["error"]["message"]
    assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "prompt", too_big.text
    assert "131072" in too_big.json()["error"]["message"]
    assert freed_after < 1.0
    # The hang-up stopped the scoring in progress early: not all 16 chunks of its first prompt ran.
    cancelled = [line for line in server.log().splitlines() if "prompt scoring cancelled: prompt_tokens=8190" in line]
    assert cancelled and "chunks=16/16" not in cancelled[-1]


def test_a_short_scoring_is_served_while_a_long_beam_search_runs(server: RunningServer) -> None:
    """Scoring (OpenAI's echo, TGI's decoder_input_details) and beam search share the generate() worker: a scoring
    takes its turn between two beam-search steps instead of waiting for the search to end."""
    import asyncio
    import time

    beam = {"prompt": "def", "num_beams": 8, "max_new_tokens": 2000, "min_new_tokens": 2000}
    tgi = {"inputs": "def add(a, b): return a", "parameters": {"details": True, "decoder_input_details": True}}
    tgi["parameters"]["max_new_tokens"] = 1

    async def scenario() -> tuple[list[httpx.Response], float, bool]:
        async with httpx.AsyncClient(timeout=60) as client:
            search = asyncio.create_task(client.post(server.predict_url, json=beam))
            await asyncio.sleep(0.3)  # the search is under way
            started = time.monotonic()
            answers = await asyncio.gather(
                client.post(server.base_url + "/v1/completions", json=_scoring(CONTEXT + CONTINUATION)),
                client.post(server.predict_url, json=tgi),
            )
            waited = time.monotonic() - started
            still_searching = not search.done()
            search.cancel()
            await asyncio.gather(search, return_exceptions=True)
            return answers, waited, still_searching

    (completion, tgi_answer), waited, still_searching = asyncio.run(scenario())
    assert completion.status_code == 200 and tgi_answer.status_code == 200, (completion.text, tgi_answer.text)
    assert still_searching and waited < 1.0
    assert len(completion.json()["choices"][0]["logprobs"]["tokens"]) > 1
    assert tgi_answer.json()[0]["details"]["prefill"][1]["logprob"] is not None


def test_a_large_answer_is_sent_a_choice_at_a_time_and_reads_as_one(
    server: RunningServer, tiny_model_dir: Path
) -> None:
    """Past ANSWER_ON_LOOP_TOKENS the answer is streamed a choice at a time (memory holds one choice, not ~100 MB for
    the largest requests): it is still one JSON document, the same as a small answer's."""
    prompts = _token_prompts(2, 1200)
    response = httpx.post(server.base_url + "/v1/completions", json={**_scoring(prompts), "n": 2}, timeout=60)
    assert response.status_code == 200 and "content-length" not in response.headers  # sent in pieces
    answer = response.json()
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2, 3]
    assert answer["usage"]["prompt_tokens"] == 2400 and answer["object"] == "text_completion"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for choice, ids in zip(answer["choices"][::2], prompts):
        reference = _reference_logprobs(model, ids)
        chosen = reference.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        got = torch.tensor(choice["logprobs"]["token_logprobs"][1:])
        torch.testing.assert_close(got, chosen, atol=1e-4, rtol=0)
    assert answer["choices"][0]["logprobs"] == answer["choices"][1]["logprobs"]  # one prompt, scored once
