"""Continuous batching: concurrent requests share the model and get exactly what they would alone."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from starcoder_serving.engine.engine import Completion, Engine
from starcoder_serving.errors import Overloaded
from starcoder_serving.engine.jobs import FinishReason, GenerationPlan
from starcoder_serving.engine.path_choice import Path as Route
from starcoder_serving.engine.path_choice import batched_sampling_kwargs, choose_path, effective_parameters
from starcoder_serving.settings import ServingSettings

from tests.conftest import DATA_DIR, tiny_settings

PROMPTS = [
    "def compute_fib(n):",
    "import os\n",
    "class Stack:\n",
    "for i in range(10):",
    "while True:\n",
    "function add(a, b) {",
    "def main():\n    print(",
    "from typing import List",
    "# sort a list\n",
    "return a + b",
    "    if n < 2:",
    "console.log(",
    "self.items = []",
    "x = [i * i for i in",
]


@pytest.fixture(scope="module")
def solo_engine(tiny_model_dir: Path) -> Iterator[Engine]:
    """One request at a time through plain generate(): the reference."""
    engine = Engine.load(tiny_settings(tiny_model_dir, continuous_batching=False), DATA_DIR)
    yield engine
    engine.shutdown()


def _greedy(engine: Engine, prompt: str, max_new_tokens: int = 24, **extra: object) -> GenerationPlan:
    return engine.plan(engine.tokenize(prompt), {"max_new_tokens": max_new_tokens, **extra})


def _gather(engine: Engine, plans: list[GenerationPlan]) -> list[Completion]:
    async def run() -> list[Completion]:
        return list(await asyncio.gather(*(engine.complete(plan) for plan in plans)))

    return asyncio.run(run())


def _one(engine: Engine, plan: GenerationPlan) -> Completion:
    return asyncio.run(engine.complete(plan))


# ---- routing (pure) ----


def test_routing_table() -> None:
    greedy = {"do_sample": False, "num_beams": 1, "top_k": 50}
    assert choose_path(greedy).path is Route.BATCHED
    assert choose_path({**greedy, "max_new_tokens": 5}, seed=3).path is Route.BATCHED  # greedy ignores the seed
    assert choose_path({"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 20}).path is Route.BATCHED
    generate_cases = [
        ({"num_beams": 4}, {}),
        ({"num_return_sequences": 2, "do_sample": True}, {}),
        ({"do_sample": True}, {"seed": 1}),
        ({}, {"top_logprobs": 0}),
        ({"no_repeat_ngram_size": 2}, {}),
        ({"bad_words_ids": [[5]]}, {}),
        ({"suppress_tokens": [1]}, {}),
        ({"begin_suppress_tokens": [1]}, {}),
        ({"exponential_decay_length_penalty": (4, 1.5)}, {}),
        ({"do_sample": True, "typical_p": 0.5}, {}),
        ({"do_sample": True, "epsilon_cutoff": 0.01}, {}),
        ({"do_sample": True, "eta_cutoff": 0.01}, {}),
        ({"do_sample": True, "min_p": 0.1}, {}),
        ({"min_new_tokens": 3}, {}),
        ({"repetition_penalty": 1.3}, {}),
        ({"max_time": 1.0}, {}),
        ({"renormalize_logits": True}, {}),
        ({"some_future_parameter": 1}, {}),
    ]
    for params, extra in generate_cases:
        assert choose_path(params, **extra).path is Route.GENERATE, params
    # Inactive values stay batched.
    assert choose_path({"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "typical_p": 1.0}).path is Route.BATCHED
    assert choose_path(greedy, continuous_batching=False).path is Route.GENERATE


def test_effective_parameters_and_sampling_kwargs() -> None:
    defaults = {"do_sample": False, "top_k": 50, "top_p": 1.0, "temperature": 1.0, "repetition_penalty": 1.2}
    params = effective_parameters(defaults, {"do_sample": True, "temperature": 0.5})
    # A checkpoint default the client never sent still decides the path.
    assert choose_path(params, request_keys={"do_sample", "temperature"}).path is Route.GENERATE
    assert batched_sampling_kwargs({"do_sample": False, "temperature": 0.3}, 1000) == {
        "temperature": 1.0,
        "top_k": 1,
        "top_p": 1.0,
    }
    assert batched_sampling_kwargs({"do_sample": True, "temperature": 0.5, "top_k": 50}, 1000) == {
        "temperature": 0.5,
        "top_k": 50,
        "top_p": 1.0,
    }
    assert batched_sampling_kwargs({"do_sample": True, "top_k": 0, "top_p": 0.9}, 1000)["top_k"] == 1000
    assert batched_sampling_kwargs({"do_sample": True, "top_k": 5000}, 1000)["top_k"] == 1000


def test_settings_env_override_disables_batching() -> None:
    assert ServingSettings().continuous_batching is True
    for off in ("0", "false"):
        settings = ServingSettings.from_sources({}, {"STARCODER_CONTINUOUS_BATCHING": off})
        assert settings.continuous_batching is False
    settings = ServingSettings.from_sources({"max_batch_sequences": 8}, {"STARCODER_KV_NUM_BLOCKS": "32"})
    assert (settings.max_batch_sequences, settings.kv_num_blocks) == (8, 32)


# ---- the engine ----


def test_batched_greedy_equals_solo_and_generate(engine: Engine, solo_engine: Engine) -> None:
    plans = [_greedy(engine, prompt) for prompt in PROMPTS]
    assert all(engine.route(plan).path is Route.BATCHED for plan in plans)
    before = engine.routed[Route.BATCHED]
    alone = [_one(engine, plan) for plan in plans]
    together = _gather(engine, plans)
    reference = [_one(solo_engine, plan) for plan in plans]
    assert engine.routed[Route.BATCHED] - before == 2 * len(plans)
    assert [c.text for c in together] == [c.text for c in alone] == [c.text for c in reference]
    assert [c.finish_reason for c in together] == [c.finish_reason for c in reference]
    assert [c.completion_tokens for c in together] == [c.completion_tokens for c in reference]
    # And the reference is plain model.generate() greedy.
    for plan, completion in zip(plans[:3], reference):
        with torch.inference_mode():
            output = solo_engine.model.generate(
                torch.tensor([plan.prompt_ids]),
                max_new_tokens=plan.max_new_tokens,
                do_sample=False,
                pad_token_id=solo_engine.tokenizer.eos_token_id,
            )
        ids = output[0, plan.prompt_tokens :].tolist()
        assert completion.text == solo_engine.tokenizer.decode(ids, skip_special_tokens=True)
    assert engine.requests_in_progress == 0


def test_max_new_tokens_per_request_in_a_batch(engine: Engine) -> None:
    limits = [1, 3, 7, 12, 20, 33]
    plans = [_greedy(engine, prompt, max_new_tokens=n) for prompt, n in zip(PROMPTS, limits)]
    alone = [_one(engine, plan) for plan in plans]
    together = _gather(engine, plans)
    for limit, solo, batched in zip(limits, alone, together):
        assert batched.text == solo.text
        assert batched.completion_tokens == solo.completion_tokens
        if batched.finish_reason is FinishReason.LENGTH:
            assert batched.completion_tokens == limit
        else:
            assert batched.completion_tokens <= limit


def test_mixed_traffic_each_on_its_path_and_exact(engine: Engine, solo_engine: Engine) -> None:
    greedy = [_greedy(engine, prompt, max_new_tokens=20) for prompt in PROMPTS[:8]]
    beam = _greedy(engine, "def compute_fib(n):", max_new_tokens=16, num_beams=3)
    ngram = _greedy(engine, "class Stack:\n", max_new_tokens=24, no_repeat_ngram_size=2)
    seeded = engine.plan(engine.tokenize("import os\n"), {"max_new_tokens": 16, "do_sample": True}, seed=7)
    logprobs = engine.plan(engine.tokenize("for i in"), {"max_new_tokens": 8}, top_logprobs=2)
    sampled = _greedy(engine, "while True:\n", max_new_tokens=16, do_sample=True, temperature=0.8, top_k=20)
    assert [engine.route(p).path for p in (beam, ngram, seeded, logprobs)] == [Route.GENERATE] * 4
    assert engine.route(sampled).path is Route.BATCHED

    others = [beam, ngram, seeded, logprobs]
    references = [_one(solo_engine, plan) for plan in greedy + others]
    before = dict(engine.routed)
    results = _gather(engine, [*greedy, beam, sampled, ngram, seeded, logprobs])
    sampled_result = results.pop(len(greedy) + 1)
    assert [r.text for r in results] == [r.text for r in references]
    assert [r.token_logprobs for r in results[-1:]] == [references[-1].token_logprobs]
    assert engine.routed[Route.GENERATE] - before[Route.GENERATE] == 4
    assert engine.routed[Route.BATCHED] - before[Route.BATCHED] == len(greedy) + 1
    assert 1 <= sampled_result.completion_tokens <= 16
    assert engine.requests_in_progress == 0


def test_cancelling_a_batched_request_frees_it(engine: Engine) -> None:
    async def run() -> tuple[int, list[Completion]]:
        long = _greedy(engine, "def main():\n    print(", max_new_tokens=400)
        others = [_greedy(engine, prompt, max_new_tokens=30) for prompt in PROMPTS[:4]]
        stream = engine.stream(long)
        seen = 0
        tasks = [asyncio.ensure_future(engine.complete(plan)) for plan in others]
        async for delta in stream:
            seen += 1
            if seen == 3:
                break
        await stream.aclose()  # the client went away
        results = list(await asyncio.gather(*tasks))
        return seen, results

    seen, results = asyncio.run(run())
    assert seen == 3 and all(r.completion_tokens > 0 for r in results)
    assert engine.requests_in_progress == 0
    # The batch frees the cancelled sequence; nothing stays behind, and new work completes.
    batched = engine._batched
    assert batched is not None
    done = _one(engine, _greedy(engine, "return a + b", max_new_tokens=5))
    assert done.completion_tokens >= 1
    assert batched.active_requests == 0


def test_queue_full_is_overloaded(tiny_model_dir: Path) -> None:
    engine = Engine.load(tiny_settings(tiny_model_dir, max_queued_requests=2), DATA_DIR)
    try:

        async def run() -> tuple[str, list[Completion]]:
            plans = [_greedy(engine, prompt, max_new_tokens=40) for prompt in PROMPTS[:2]]
            streams = [engine.stream(plan) for plan in plans]
            firsts = [await stream.__anext__() for stream in streams]  # both admitted and running
            assert len(firsts) == 2 and engine.requests_in_progress == 2
            with pytest.raises(Overloaded) as refused:
                await engine.complete(_greedy(engine, PROMPTS[2]))
            for stream in streams:
                await stream.aclose()
            return str(refused.value), [await engine.complete(_greedy(engine, PROMPTS[3], max_new_tokens=4))]

        message, after = asyncio.run(run())
        assert "capacity" in message
        assert after[0].completion_tokens >= 1 and engine.requests_in_progress == 0
    finally:
        engine.shutdown()


def test_batched_path_disabled_serves_everything_through_generate(solo_engine: Engine) -> None:
    before = dict(solo_engine.routed)
    _gather(solo_engine, [_greedy(solo_engine, prompt, max_new_tokens=4) for prompt in PROMPTS[:3]])
    assert solo_engine.routed[Route.GENERATE] - before[Route.GENERATE] == 3
    assert solo_engine.routed[Route.BATCHED] == before[Route.BATCHED]


def test_a_fault_in_a_batch_step_is_reported_and_batching_recovers(tiny_model_dir: Path) -> None:
    engine = Engine.load(tiny_settings(tiny_model_dir), DATA_DIR)
    model = engine.model
    original = model.forward

    def out_of_memory(*args: object, **kwargs: object) -> object:
        model.forward = original  # fail once, as a transient OOM would
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    try:
        model.forward = out_of_memory
        with pytest.raises(Overloaded, match="ran out of memory"):
            _one(engine, _greedy(engine, "hello", max_new_tokens=4))
        model.forward = original
        plans = [_greedy(engine, prompt, max_new_tokens=6) for prompt in PROMPTS[:4]]
        assert all(engine.route(plan).path is Route.BATCHED for plan in plans)
        assert [c.completion_tokens for c in _gather(engine, plans)] == [6] * 4
        assert engine.requests_in_progress == 0
    finally:
        model.forward = original
        engine.shutdown()
