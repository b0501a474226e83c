"""Every parameter but beam search is served in the continuous batch, with the answers generate() gives.

The reference is an engine with continuous batching off: each request alone through plain
``model.generate()`` (transformers' own logits processors). Greedy output on the batch must equal it
token for token, alone and amid other requests; seeded sampling must not depend on its neighbours.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from starcoder_serving.engine.engine import Completion, Engine
from starcoder_serving.engine.jobs import GenerationPlan
from starcoder_serving.engine.path_choice import Path as Route
from starcoder_serving.engine.sampling_params import SamplingParams

from tests.conftest import DATA_DIR, tiny_settings

PROMPTS = ["def compute_fib(n):", "import os\n", "class Stack:\n", "for i in range(10):", "x = [i * i for i in"]

# Each parameter alone, greedy; every one must leave the batch's answer equal to generate()'s.
GREEDY_CASES: dict[str, dict[str, Any]] = {
    "repetition_penalty": {"repetition_penalty": 1.6},
    "repetition_penalty_below_1": {"repetition_penalty": 0.7},
    "presence_penalty": {"presence_penalty": 1.5},
    "frequency_penalty": {"frequency_penalty": 1.2},
    "negative_penalties": {"presence_penalty": -1.0, "frequency_penalty": -0.5},
    "min_new_tokens": {"min_new_tokens": 24},
    "min_length": {"min_length": 20},
    "max_length": {"max_length": 20},
    "logit_bias": {"logit_bias": {100: 8.0, 5: -100.0, 300: 3.5}},
    "no_repeat_ngram_size": {"no_repeat_ngram_size": 1},
    # no_repeat_ngram_size 2 and 3 need prompts that repeat: test_batch_equivalence.py has them.
    "bad_words_single": {"bad_words_ids": [[5], [17], [42]]},
    "bad_words_multi": {"bad_words_ids": "two tokens the plain greedy output contains"},
    "suppress_tokens": {"suppress_tokens": [0, 5, 6, 7, 8]},
    "begin_suppress_tokens": {"begin_suppress_tokens": "the first token of each plain greedy output"},
    "exponential_decay_length_penalty": {"exponential_decay_length_penalty": (3, 1.8)},
    "logprobs": {"logprobs": 3},
    "temperature_below_epsilon_is_greedy": {"do_sample": True, "temperature": 1e-30},
    "renormalize_and_remove_invalid": {"renormalize_logits": True, "remove_invalid_values": True},
}


def greedy_tokens(engine: Engine, prompt: str, count: int = 8) -> list[int]:
    ids = torch.tensor([engine.tokenize(prompt)])
    with torch.inference_mode():
        out = engine.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=count, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


def parameters_for(engine: Engine, case: str) -> dict[str, Any]:
    """The case's parameters; token-dependent ones are taken from the plain greedy output, so they matter."""
    if case == "bad_words_multi":
        return {"bad_words_ids": [greedy_tokens(engine, PROMPTS[0])[3:5], [10, 11, 12]]}
    if case == "begin_suppress_tokens":
        return {"begin_suppress_tokens": sorted({greedy_tokens(engine, p, 1)[0] for p in PROMPTS})}
    return GREEDY_CASES[case]


@pytest.fixture(scope="module")
def solo(tiny_model_dir: Path) -> Iterator[Engine]:
    engine = Engine.load(tiny_settings(tiny_model_dir, continuous_batching=False), DATA_DIR)
    yield engine
    engine.shutdown()


def plan(engine: Engine, prompt: str, **parameters: Any) -> GenerationPlan:
    if "max_length" not in parameters:
        parameters = {"max_new_tokens": 24, **parameters}
    return engine.plan(engine.tokenize(prompt), SamplingParams.model_validate(parameters))[0]


def one(engine: Engine, plan_: GenerationPlan) -> Completion:
    return asyncio.run(engine.complete(plan_))


def together(engine: Engine, plans: list[GenerationPlan]) -> list[Completion]:
    async def run() -> list[Completion]:
        return list(await asyncio.gather(*(engine.complete(p) for p in plans)))

    return asyncio.run(run())


def assert_same(got: Completion, want: Completion, label: str) -> None:
    assert (got.text, got.completion_tokens, got.finish_reason) == (
        want.text,
        want.completion_tokens,
        want.finish_reason,
    ), label
    assert len(got.token_logprobs) == len(want.token_logprobs), label
    for g, w in zip(got.token_logprobs, want.token_logprobs):
        assert g.token_id == w.token_id and [t for t, _ in g.top] == [t for t, _ in w.top], label
        assert abs(g.logprob - w.logprob) < 1e-4 and all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(g.top, w.top))


def neighbours(engine: Engine) -> list[GenerationPlan]:
    """Twelve other requests of every kind: greedy, sampled, seeded, penalised, logprobs."""
    kinds: list[dict[str, Any]] = [
        {},
        {"do_sample": True, "temperature": 0.9},
        {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "seed": 11},
        {"repetition_penalty": 1.3},
        {"logprobs": 2},
        {"min_new_tokens": 20},
        {"do_sample": True, "top_k": 5, "seed": 3},
        {"no_repeat_ngram_size": 3},
        {"presence_penalty": 2.0},
        {},
        {"suppress_tokens": [0]},
        {"do_sample": True, "temperature": 1.5, "min_p": 0.05},
    ]
    return [plan(engine, PROMPTS[i % len(PROMPTS)], **kind) for i, kind in enumerate(kinds)]


@pytest.mark.parametrize("case", list(GREEDY_CASES))
def test_greedy_on_the_batch_equals_generate_alone_and_amid_twelve(engine: Engine, solo: Engine, case: str) -> None:
    parameters = parameters_for(engine, case)
    plans = [plan(engine, prompt, **parameters) for prompt in PROMPTS[:3]]
    assert all(engine.route(p).path is Route.BATCHED for p in plans), case
    references = [one(solo, p) for p in plans]
    for p, want in zip(plans, references):
        assert_same(one(engine, p), want, f"{case} alone: {engine.tokenizer.decode(p.prompt_ids)!r}")
    others = neighbours(engine)
    greedy_others = [i for i, p in enumerate(others) if p.sampling.greedy]
    other_references = {i: one(solo, others[i]) for i in greedy_others}
    results = together(engine, [*plans, *others])
    for p, got, want in zip(plans, results, references):
        assert_same(got, want, f"{case} amid 12: {engine.tokenizer.decode(p.prompt_ids)!r}")
    for i in greedy_others:  # and the neighbours are unchanged by it
        assert_same(results[len(plans) + i], other_references[i], f"neighbour {i} beside {case}")
    assert engine.requests_in_progress == 0


def test_every_case_changes_something(engine: Engine) -> None:
    """Guards the test above: a parameter that never changed the output would prove nothing."""
    plain = [one(engine, plan(engine, prompt)) for prompt in PROMPTS]
    for case in GREEDY_CASES:
        parameters = parameters_for(engine, case)
        if case in ("temperature_below_epsilon_is_greedy", "renormalize_and_remove_invalid", "logprobs"):
            continue  # these must change nothing
        results = [one(engine, plan(engine, prompt, **parameters)) for prompt in PROMPTS]
        assert any((r.text, r.completion_tokens) != (p.text, p.completion_tokens) for r, p in zip(results, plain)), (
            f"{case} changed no output: the batch may have dropped it"
        )


SAMPLED_CASES: dict[str, dict[str, Any]] = {
    "temperature_top_p": {"temperature": 0.8, "top_p": 0.9},
    "top_k": {"top_k": 20},
    "min_p": {"min_p": 0.1},
    "typical_p": {"typical_p": 0.9},
    "epsilon_cutoff": {"epsilon_cutoff": 0.01},
    "eta_cutoff": {"eta_cutoff": 0.01},
    "penalised": {"repetition_penalty": 1.3, "presence_penalty": 0.5},
}


@pytest.mark.parametrize("case", list(SAMPLED_CASES))
def test_a_seeded_sample_is_the_same_alone_and_under_load(engine: Engine, case: str) -> None:
    parameters = {"do_sample": True, "seed": 7, "max_new_tokens": 20, **SAMPLED_CASES[case]}
    plans = [plan(engine, prompt, **parameters) for prompt in PROMPTS]
    assert all(engine.route(p).path is Route.BATCHED for p in plans)
    alone = [one(engine, p).text for p in plans]
    loaded = together(engine, [*plans, *neighbours(engine)])[: len(plans)]
    assert [c.text for c in loaded] == alone, case
    other_seed = [one(engine, plan(engine, prompt, **{**parameters, "seed": 8})).text for prompt in PROMPTS]
    assert other_seed != alone, f"{case}: the seed changes nothing"


def test_n_sequences_share_the_batch_with_their_own_seeds(engine: Engine) -> None:
    sampling = SamplingParams(max_new_tokens=16, do_sample=True, temperature=0.9, n=4, seed=21)
    plans = engine.plan(engine.tokenize("import os\n"), sampling)
    assert [p.sampling.seed for p in plans] == [21, 22, 23, 24]
    assert all(engine.route(p).path is Route.BATCHED for p in plans)
    first = [c.text for c in together(engine, plans)]
    assert first == [c.text for c in together(engine, plans)]
    assert len(set(first)) > 1
    # Sequence i is the seed + i request on its own.
    single = SamplingParams(max_new_tokens=16, do_sample=True, temperature=0.9, seed=23)
    assert one(engine, engine.plan(engine.tokenize("import os\n"), single)[0]).text == first[2]


def test_only_beam_search_leaves_the_batch(engine: Engine) -> None:
    greedy = [parameters_for(engine, case) for case in GREEDY_CASES]
    for parameters in [*greedy, *({"do_sample": True, **c} for c in SAMPLED_CASES.values())]:
        assert engine.route(plan(engine, "x = 1", **parameters)).path is Route.BATCHED, parameters
    assert engine.route(plan(engine, "x = 1", num_beams=2)).path is Route.GENERATE


HOSTILE: dict[str, dict[str, Any]] = {
    "tiny_temperature": {"do_sample": True, "temperature": 1e-46},
    "tiny_repetition_penalty": {"do_sample": True, "repetition_penalty": 1e-300},
    "huge_repetition_penalty": {"do_sample": True, "repetition_penalty": 1e300},
    "knobs_at_bounds": {
        "do_sample": True,
        "temperature": 100.0,
        "top_k": 1,
        "top_p": 1e-9,
        "min_p": 1.0,
        "typical_p": 1e-9,
        "epsilon_cutoff": 0.999,
        "eta_cutoff": 0.999,
    },
    "penalties_at_bounds": {"presence_penalty": 2.0, "frequency_penalty": -2.0, "logit_bias": {7: 100.0, 8: -100.0}},
    "huge_decay": {"exponential_decay_length_penalty": (0, 1e300)},
    "everything_banned": {"suppress_tokens": list(range(694))},
}


def test_hostile_values_never_change_fail_or_stall_their_neighbours(engine: Engine, solo: Engine) -> None:
    innocent = [plan(engine, PROMPTS[i % len(PROMPTS)], max_new_tokens=20) for i in range(12)]
    solo_answers = [one(solo, p).text for p in innocent]
    hostile = [plan(engine, "def f():", **values) for values in HOSTILE.values()]

    async def run() -> list[Completion | BaseException]:
        return list(await asyncio.gather(*(engine.complete(p) for p in [*innocent, *hostile]), return_exceptions=True))

    for _ in range(2):
        results = asyncio.run(run())
        got = [r.text if isinstance(r, Completion) else repr(r) for r in results[: len(innocent)]]
        assert got == solo_answers
        outcomes = dict(zip(HOSTILE, results[len(innocent) :]))
        for name, outcome in outcomes.items():
            if name == "everything_banned":
                assert getattr(outcome, "status_code", None) == 400, outcome
            else:
                assert isinstance(outcome, Completion), (name, outcome)
    assert engine.requests_in_progress == 0


def test_graph_mode_runs_every_operation_every_step_with_the_same_answers(tiny_model_dir: Path, solo: Engine) -> None:
    """With CUDA graphs or torch.compile the sampler cannot skip operations per step; the answers must not change.
    On a CPU transformers turns the graphs themselves off, but the sampler still runs as it would under them,
    and transformers' warm-up steps (dummy rows that carry no request) run through it."""
    engine = Engine.load(tiny_settings(tiny_model_dir, cuda_graphs="both"), DATA_DIR)
    try:
        assert engine._batched is not None
        assert not engine._batched.sampler.static_graph  # no graph backend here: transformers turned them off
        engine._batched.sampler.static_graph = True  # as on a GPU
        with engine._batched.exclusive(), torch.no_grad():  # as manager.warmup() runs them
            runner = engine._batched._manager.batch_processor.model_runner
            # transformers catches a failed warm-up step and returns 0 s: these must really run.
            assert runner.run_one_warmup(engine.model, num_q_tokens=4, max_kv_read=None) > 0  # four decoding rows
            assert runner.run_one_warmup(engine.model, num_q_tokens=32, max_kv_read=16) > 0  # a prefill chunk
        cases = ["repetition_penalty", "presence_penalty", "min_new_tokens", "no_repeat_ngram_size", "logprobs"]
        for case in cases:
            p = plan(engine, PROMPTS[0], **GREEDY_CASES[case])
            assert_same(one(engine, p), one(solo, p), f"{case} in graph mode")
        seeded = plan(engine, PROMPTS[1], do_sample=True, temperature=0.8, top_p=0.9, typical_p=0.9, seed=3)
        assert one(engine, seeded).text == one(engine, seeded).text
    finally:
        engine.shutdown()
