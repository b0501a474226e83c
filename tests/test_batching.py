"""Continuous batching: concurrent requests share the model and get exactly what they would alone."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from starcoder_serving.engine.engine import Completion, Engine
from starcoder_serving.engine.jobs import GenerationPlan
from starcoder_serving.engine.path_choice import GenerationPath, choose_path
from starcoder_serving.engine.sampling_params import SamplingParams
from starcoder_serving.errors import GenerationFailed, Overloaded
from starcoder_serving.events import FinishReason
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
    return engine.plan(engine.tokenize(prompt), SamplingParams(max_new_tokens=max_new_tokens, **extra))[0]


def _gather(engine: Engine, plans: list[GenerationPlan]) -> list[Completion]:
    async def run() -> list[Completion]:
        return list(await asyncio.gather(*(engine.complete(plan) for plan in plans)))

    return asyncio.run(run())


def _one(engine: Engine, plan: GenerationPlan) -> Completion:
    return asyncio.run(engine.complete(plan))


# ---- routing (pure) ----


def test_routing_table_only_beam_search_leaves_the_batch() -> None:
    batched_cases = [
        {},
        {"seed": 3},
        {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "seed": 1},
        {"do_sample": True, "n": 4},
        {"logprobs": 0},
        {"no_repeat_ngram_size": 2},
        {"bad_words_ids": [[5]]},
        {"suppress_tokens": [1], "begin_suppress_tokens": [1]},
        {"exponential_decay_length_penalty": (4, 1.5)},
        {"do_sample": True, "typical_p": 0.5, "epsilon_cutoff": 0.01, "eta_cutoff": 0.01, "min_p": 0.1},
        {"min_new_tokens": 3},
        {"repetition_penalty": 1.3, "presence_penalty": 1.0, "frequency_penalty": -1.0},
        {"logit_bias": {5: 2.0}},
        {"max_time": 1.0},
        {"renormalize_logits": True, "remove_invalid_values": True},
    ]
    for params in batched_cases:
        assert choose_path(SamplingParams.model_validate(params)).path is GenerationPath.BATCHED, params
    assert choose_path(SamplingParams(num_beams=4)).path is GenerationPath.GENERATE
    assert choose_path(SamplingParams(), continuous_batching=False).path is GenerationPath.GENERATE


def test_asynchronous_batching_sends_only_host_side_parameters_to_generate() -> None:
    """With the host a step behind, n-gram and multi-token bans and logprobs cannot be served in the batch."""
    host_side = [{"no_repeat_ngram_size": 2}, {"bad_words_ids": [[5, 6]]}, {"logprobs": 0}]
    for params in host_side:
        sampling = SamplingParams.model_validate(params)
        assert choose_path(sampling, async_batching=True).path is GenerationPath.GENERATE, params
        assert choose_path(sampling).path is GenerationPath.BATCHED, params
    device_side = [{}, {"bad_words_ids": [[5]]}, {"repetition_penalty": 1.3, "seed": 2}, {"min_new_tokens": 3}]
    for params in device_side:
        assert choose_path(SamplingParams.model_validate(params), async_batching=True).path is GenerationPath.BATCHED, (
            params
        )


def test_asynchronous_batching_is_ignored_without_a_gpu(tiny_model_dir: Path) -> None:
    """transformers' double buffering needs CUDA streams: on a CPU the setting must not fail every request."""
    engine = Engine.load(tiny_settings(tiny_model_dir, async_batching=True), DATA_DIR)
    try:
        assert not engine.async_batching
        plan = _greedy(engine, "def f(x):", max_new_tokens=4, logprobs=0)
        assert engine.route(plan).path is GenerationPath.BATCHED
        assert _one(engine, plan).completion_tokens == 4
    finally:
        engine.shutdown()


def test_model_defaults_apply_to_what_the_client_did_not_send() -> None:
    defaults = SamplingParams.inheritable(
        {"do_sample": False, "top_k": 50, "temperature": 0.2, "repetition_penalty": 1.2, "max_length": 20, "x": 1}
    )
    assert "max_length" not in defaults and "x" not in defaults  # lengths are the planner's
    sent = SamplingParams(do_sample=True, temperature=0.5)
    merged = sent.with_model_defaults(defaults)
    assert (merged.temperature, merged.top_k, merged.repetition_penalty) == (0.5, 50, 1.2)
    assert SamplingParams.inheritable({"temperature": -1.0, "top_p": 7}) == {}  # invalid checkpoint values ignored


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
    assert all(engine.route(plan).path is GenerationPath.BATCHED for plan in plans)
    before = engine.routed[GenerationPath.BATCHED]
    alone = [_one(engine, plan) for plan in plans]
    together = _gather(engine, plans)
    reference = [_one(solo_engine, plan) for plan in plans]
    assert engine.routed[GenerationPath.BATCHED] - before == 2 * len(plans)
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
    seeded = _greedy(engine, "import os\n", max_new_tokens=16, do_sample=True, seed=7)
    logprobs = _greedy(engine, "for i in", max_new_tokens=8, logprobs=2)
    sampled = _greedy(engine, "while True:\n", max_new_tokens=16, do_sample=True, temperature=0.8, top_k=20)
    assert engine.route(beam).path is GenerationPath.GENERATE
    assert [engine.route(p).path for p in (ngram, seeded, logprobs, sampled)] == [GenerationPath.BATCHED] * 4

    seeded_alone = _one(engine, seeded)
    references = [_one(solo_engine, plan) for plan in [*greedy, beam, ngram, logprobs]]
    before = dict(engine.routed)
    results = _gather(engine, [*greedy, beam, ngram, logprobs, sampled, seeded])
    seeded_result, sampled_result = results.pop(), results.pop()
    assert [r.text for r in results] == [r.text for r in references]
    for got, want in zip(results[-1].token_logprobs, references[-1].token_logprobs):
        assert got.token_id == want.token_id and [t for t, _ in got.top] == [t for t, _ in want.top]
        assert abs(got.logprob - want.logprob) < 1e-4
    assert seeded_result.text == seeded_alone.text  # a seeded sample does not depend on its neighbours
    assert engine.routed[GenerationPath.GENERATE] - before[GenerationPath.GENERATE] == 1
    assert engine.routed[GenerationPath.BATCHED] - before[GenerationPath.BATCHED] == len(greedy) + 4
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
    assert solo_engine.routed[GenerationPath.GENERATE] - before[GenerationPath.GENERATE] == 3
    assert solo_engine.routed[GenerationPath.BATCHED] == before[GenerationPath.BATCHED]


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
        assert all(engine.route(plan).path is GenerationPath.BATCHED for plan in plans)
        assert [c.completion_tokens for c in _gather(engine, plans)] == [6] * 4
        assert engine.requests_in_progress == 0
    finally:
        model.forward = original
        engine.shutdown()


def test_a_request_the_sampler_rejects_fails_at_once_even_unstreamed(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A non-streamed request hears from the manager only at its end; one whose parameters the sampler could
    not take (here: an injected fault) must still fail within a poll of the watcher, not at its end: before a
    100-token neighbour that started with it finishes (unserved, it decodes plain greedy: 210 tokens here)."""
    from starcoder_serving.engine.batch_sampler import BatchSampler

    original = BatchSampler._start

    def failing_start(self: BatchSampler, slot: int, plan: GenerationPlan) -> None:
        if plan.sampling.max_new_tokens == 400:
            raise RuntimeError("injected")
        original(self, slot, plan)

    monkeypatch.setattr(BatchSampler, "_start", failing_start)

    async def run() -> list[str]:
        order: list[str] = []

        async def one(name: str, plan: GenerationPlan) -> None:
            try:
                await engine.complete(plan)
                order.append(f"{name} done")
            except GenerationFailed:
                order.append(f"{name} failed")

        doomed = _greedy(engine, "x = 1", max_new_tokens=400)
        neighbour = _greedy(engine, "class A:", max_new_tokens=100, min_new_tokens=100)
        await asyncio.gather(one("doomed", doomed), one("neighbour", neighbour))
        return order

    assert asyncio.run(run()) == ["doomed failed", "neighbour done"]
    assert engine.requests_in_progress == 0
