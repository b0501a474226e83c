"""Same answers: the continuous batch gives what plain ``generate()`` gives, for every parameter it serves.

The reference is an engine with continuous batching off: each request alone through ``model.generate()``
and transformers' own logits processors. A greedy request served in the batch (our ``BatchSampler``)
must equal it token for token (text, token count, finish reason, logprobs), alone and amid twelve other
requests of every kind; seeded sampling must not depend on what else is in the batch.

Each case is checked to matter: its reference answer differs from plain greedy decoding for at least one
of its prompts, so a batch that silently dropped the parameter fails here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from starcoder_serving.engine.engine import Completion, Engine
from starcoder_serving.engine.jobs import GenerationPlan
from starcoder_serving.engine.path_choice import GenerationPath
from starcoder_serving.engine.sampling_params import SamplingParams

from tests.conftest import DATA_DIR, tiny_settings

MAX_NEW_TOKENS = 24
PROMPTS: dict[str, str] = {
    # Plain greedy runs these to the length limit, so penalties and bans have 24 tokens to act on.
    "fib": "def compute_fib(n):",
    "fn": "fn main() {\n",
    # Plain greedy ends these with <|endoftext|> after 13, 11 and 18 tokens: min lengths matter.
    "for": "for i in range(10):",
    "squares": "x = [i * i for i in",
    "select": "SELECT name",
}
LONG = ("fib", "fn")
ENDING = ("for", "squares", "select")
# The tiny model's greedy text never repeats an n-gram, so for no_repeat_ngram_size > 1 these prompts are
# built to make it: "repeat_<n>" is the last n-1 tokens of a base prompt, then the base prompt's first greedy
# token, then the base prompt again. Greedy decoding wants that token again and the ban must refuse it.
REPEAT_BASES = {"repeat_2": "while True:\n", "repeat_3": "import os\n"}

Greedy = dict[str, list[int]]  # prompt name -> the plain greedy tokens generate() produces for it


@dataclasses.dataclass(frozen=True)
class Case:
    parameters: Callable[[Greedy], dict[str, Any]]
    prompts: tuple[str, ...] = LONG
    changes: bool = True  # False: the parameter must not change the text (logprobs, a greedy temperature)


def fixed(values: dict[str, Any]) -> Callable[[Greedy], dict[str, Any]]:
    return lambda _: values


# Every sampling parameter the batch serves, greedy, each alone (token-dependent values are taken from
# the plain greedy output, so they are sure to be in the way).
CASES: dict[str, Case] = {
    "repetition_penalty": Case(fixed({"repetition_penalty": 1.5})),
    "repetition_penalty_below_1": Case(fixed({"repetition_penalty": 0.7})),
    "presence_penalty": Case(fixed({"presence_penalty": 1.5})),
    "presence_penalty_negative": Case(fixed({"presence_penalty": -1.0})),
    "frequency_penalty": Case(fixed({"frequency_penalty": 1.2})),
    "frequency_penalty_negative": Case(fixed({"frequency_penalty": -1.0})),
    "min_new_tokens": Case(fixed({"min_new_tokens": 20}), ENDING),
    "min_length": Case(fixed({"min_length": 24}), ENDING),  # counts the prompt (7 to 9 tokens here)
    "logit_bias": Case(lambda g: {"logit_bias": {g["fib"][0]: -100.0, g["fn"][1]: -100.0, g["fn"][5]: -7.5, 300: 4.0}}),
    "no_repeat_ngram_size_1": Case(fixed({"no_repeat_ngram_size": 1})),
    "no_repeat_ngram_size_2": Case(fixed({"no_repeat_ngram_size": 2}), ("repeat_2", "fib")),
    "no_repeat_ngram_size_3": Case(fixed({"no_repeat_ngram_size": 3}), ("repeat_3", "fn")),
    "bad_words_ids_single": Case(lambda g: {"bad_words_ids": [[g["fib"][1]], [g["fn"][2]], [g["fn"][9]]]}),
    "bad_words_ids_multi": Case(lambda g: {"bad_words_ids": [g["fib"][3:5], g["fn"][5:8], [10, 11, 12]]}),
    "bad_words_ids_mixed": Case(lambda g: {"bad_words_ids": [[g["fib"][6]], g["fn"][1:3], [g["fn"][10]]]}),
    "suppress_tokens": Case(lambda g: {"suppress_tokens": [g["fib"][2], g["fn"][4], g["fn"][12]]}),
    "begin_suppress_tokens": Case(lambda g: {"begin_suppress_tokens": sorted({g[name][0] for name in LONG})}),
    "exponential_decay_length_penalty": Case(fixed({"exponential_decay_length_penalty": (4, 1.5)})),
    "logprobs": Case(fixed({"logprobs": 5}), LONG + ENDING[:1], changes=False),
    "logprobs_chosen_only": Case(fixed({"logprobs": 0}), ENDING[:1], changes=False),
    "max_length": Case(fixed({"max_length": 20})),  # counts the prompt: 13 to 15 new tokens instead of 24
    "do_sample_with_greedy_temperature": Case(fixed({"do_sample": True, "temperature": 1e-30}), changes=False),
    "renormalize_and_remove_invalid": Case(
        fixed({"renormalize_logits": True, "remove_invalid_values": True}), changes=False
    ),
    "penalties_and_bans_together": Case(
        lambda g: {
            "repetition_penalty": 1.3,
            "presence_penalty": 0.5,
            "frequency_penalty": 0.3,
            "no_repeat_ngram_size": 3,
            "suppress_tokens": [g["fib"][2]],
            "bad_words_ids": [g["fn"][5:7]],
            "min_new_tokens": 20,
            "logprobs": 3,
        },
        LONG + ENDING[:1],
    ),
}

# Where the two paths once disagreed: generate() ran our logit bias and penalties after transformers' own
# processors and dropped a single-token bad word that is an end token. It now builds them in the batch's order.
CASES |= {
    # A bad word that is the end token is banned, like suppress_tokens: the answer runs to its length limit.
    "bad_words_ids_eos": Case(fixed({"bad_words_ids": [[0]]}), ENDING),
    "logit_bias_with_repetition_penalty": Case(
        lambda g: {"repetition_penalty": 3.0, "logit_bias": {g["fib"][0]: 2.0, g["fn"][0]: 2.0, 295: 3.0}}
    ),
    # The decay applies to the end token's biased score.
    "logit_bias_on_eos_with_exponential_decay": Case(
        fixed({"exponential_decay_length_penalty": (2, 1.5), "logit_bias": {0: -3.0}})
    ),
}

ALL_CASES = [pytest.param(name, case, id=name) for name, case in CASES.items()]


def parameters_key(parameters: dict[str, Any]) -> str:
    return json.dumps(parameters, sort_keys=True, default=str)


class Bench:
    """The batch engine, the generate() reference engine, the prompts, and the reference answers (cached)."""

    def __init__(self, batch: Engine, reference: Engine) -> None:
        self.batch = batch
        self.reference = reference
        self._answers: dict[tuple[str, str], Completion] = {}
        self._ids: dict[str, list[int]] = {}
        self.greedy: Greedy = {name: self.greedy_tokens(name) for name in PROMPTS}

    def prompt_ids(self, name: str) -> list[int]:
        if name not in self._ids:
            if name in REPEAT_BASES:
                n = int(name.rsplit("_", 1)[1])
                base = self.batch.tokenize(REPEAT_BASES[name])
                first = self.tokens_of(self.reference_answer_for_ids(base, {"logprobs": 0}))[0]
                self._ids[name] = [*base[-(n - 1) :], first, *base]
            else:
                self._ids[name] = self.batch.tokenize(PROMPTS[name])
        return self._ids[name]

    @staticmethod
    def tokens_of(completion: Completion) -> list[int]:
        return [entry.token_id for entry in completion.token_logprobs]

    def greedy_tokens(self, name: str) -> list[int]:
        return self.tokens_of(self.reference_answer(name, {"logprobs": 0}))

    def plan(self, engine: Engine, name: str, parameters: dict[str, Any]) -> GenerationPlan:
        return plan_for(engine, self.prompt_ids(name), parameters)

    def reference_answer_for_ids(self, ids: list[int], parameters: dict[str, Any]) -> Completion:
        return one(self.reference, plan_for(self.reference, ids, parameters))

    def reference_answer(self, name: str, parameters: dict[str, Any]) -> Completion:
        """The request alone through generate() (continuous batching off)."""
        key = (name, parameters_key(parameters))
        if key not in self._answers:
            plan = self.plan(self.reference, name, parameters)
            assert self.reference.route(plan).path is GenerationPath.GENERATE
            self._answers[key] = one(self.reference, plan)
        return self._answers[key]


def plan_for(engine: Engine, ids: list[int], parameters: dict[str, Any]) -> GenerationPlan:
    if "max_length" not in parameters:
        parameters = {"max_new_tokens": MAX_NEW_TOKENS, **parameters}
    return engine.plan(list(ids), SamplingParams.model_validate(parameters))[0]


def one(engine: Engine, plan: GenerationPlan) -> Completion:
    return asyncio.run(engine.complete(plan))


def together(engine: Engine, plans: Sequence[GenerationPlan]) -> list[Completion]:
    async def run() -> list[Completion]:
        return list(await asyncio.gather(*(engine.complete(plan) for plan in plans)))

    return asyncio.run(run())


def assert_same(got: Completion, want: Completion, label: str) -> None:
    assert (got.text, got.completion_tokens, got.finish_reason) == (
        want.text,
        want.completion_tokens,
        want.finish_reason,
    ), (
        f"{label}: the batch answered {got.text!r} ({got.completion_tokens} tokens, {got.finish_reason.value}); "
        f"generate() answered {want.text!r} ({want.completion_tokens} tokens, {want.finish_reason.value})"
    )
    assert len(got.token_logprobs) == len(want.token_logprobs), f"{label}: logprob entries differ in number"
    for step, (g, w) in enumerate(zip(got.token_logprobs, want.token_logprobs)):
        where = f"{label}, token {step}"
        assert g.token_id == w.token_id, where
        assert g.logprob == pytest.approx(w.logprob, abs=1e-4), f"{where}: logprob {g.logprob} != {w.logprob}"
        assert [t for t, _ in g.top] == [t for t, _ in w.top], f"{where}: top ids {g.top} != {w.top}"
        assert [v for _, v in g.top] == pytest.approx([v for _, v in w.top], abs=1e-4), f"{where}: top logprobs"


@pytest.fixture(scope="module")
def reference_engine(tiny_model_dir: Path) -> Iterator[Engine]:
    engine = Engine.load(tiny_settings(tiny_model_dir, continuous_batching=False), DATA_DIR)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def bench(engine: Engine, reference_engine: Engine) -> Bench:
    return Bench(engine, reference_engine)


# Twelve other requests of every kind: plain greedy, greedy with parameters, seeded sampling.
NEIGHBOURS: list[tuple[str, dict[str, Any]]] = [
    ("fib", {}),
    ("fn", {"do_sample": True, "temperature": 0.9, "seed": 5}),
    ("fib", {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "seed": 11}),
    ("for", {"repetition_penalty": 1.3}),
    ("squares", {"logprobs": 2}),
    ("select", {"min_new_tokens": 20}),
    ("fib", {"do_sample": True, "top_k": 5, "seed": 3}),
    ("fn", {"no_repeat_ngram_size": 1}),
    ("fn", {"presence_penalty": 2.0, "frequency_penalty": 0.5}),
    ("for", {}),
    ("squares", {"suppress_tokens": [1, 2, 3], "bad_words_ids": [[5, 6]]}),
    ("select", {"do_sample": True, "temperature": 1.5, "min_p": 0.05, "typical_p": 0.95, "seed": 9}),
]


@dataclasses.dataclass(frozen=True)
class Neighbours:
    plans: list[GenerationPlan]
    answers: list[Completion]  # greedy: generate() alone; sampled: the batch alone (same seed, same sample)


@pytest.fixture(scope="module")
def neighbours(bench: Bench) -> Neighbours:
    plans = [bench.plan(bench.batch, name, parameters) for name, parameters in NEIGHBOURS]
    assert sum(not plan.sampling.greedy for plan in plans) == 4
    answers = [
        bench.reference_answer(name, parameters) if plan.sampling.greedy else one(bench.batch, plan)
        for (name, parameters), plan in zip(NEIGHBOURS, plans)
    ]
    return Neighbours(plans, answers)


def check_neighbours(results: Sequence[Completion], neighbours: Neighbours, beside: str) -> None:
    for (name, parameters), got, want in zip(NEIGHBOURS, results, neighbours.answers):
        assert_same(got, want, f"neighbour {name} {parameters} beside {beside}")


@pytest.mark.parametrize(("name", "case"), ALL_CASES)
def test_a_greedy_request_on_the_batch_equals_generate_alone(bench: Bench, name: str, case: Case) -> None:
    parameters = case.parameters(bench.greedy)
    plans = [bench.plan(bench.batch, prompt, parameters) for prompt in case.prompts]
    assert [bench.batch.route(plan).path for plan in plans] == [GenerationPath.BATCHED] * len(plans), name
    routed = dict(bench.batch.routed)
    for prompt, plan in zip(case.prompts, plans):
        assert_same(one(bench.batch, plan), bench.reference_answer(prompt, parameters), f"{name} on {prompt!r}")
    # They really were served by the batch, not handed to generate().
    assert bench.batch.routed[GenerationPath.BATCHED] - routed[GenerationPath.BATCHED] == len(plans)
    assert bench.batch.routed[GenerationPath.GENERATE] == routed[GenerationPath.GENERATE]


@pytest.mark.parametrize(("name", "case"), ALL_CASES)
def test_a_greedy_request_amid_twelve_others_equals_generate_alone(
    bench: Bench, neighbours: Neighbours, name: str, case: Case
) -> None:
    parameters = case.parameters(bench.greedy)
    plans = [bench.plan(bench.batch, prompt, parameters) for prompt in case.prompts]
    wanted = [bench.reference_answer(prompt, parameters) for prompt in case.prompts]
    # The case's requests in the middle of the others, all submitted together.
    half = len(neighbours.plans) // 2
    results = together(bench.batch, [*neighbours.plans[:half], *plans, *neighbours.plans[half:]])
    mine = results[half : half + len(plans)]
    others = results[:half] + results[half + len(plans) :]
    for prompt, got, want in zip(case.prompts, mine, wanted):
        assert_same(got, want, f"{name} on {prompt!r} amid 12 others")
    check_neighbours(others, neighbours, name)
    assert bench.batch.requests_in_progress == 0


@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case.changes])
def test_each_case_changes_some_answer(bench: Bench, name: str) -> None:
    """Guards the tests above: a parameter that never changed generate()'s answer would prove nothing."""
    case = CASES[name]
    parameters = case.parameters(bench.greedy)
    changed = [
        prompt
        for prompt in case.prompts
        if (
            bench.reference_answer(prompt, parameters).text,
            bench.reference_answer(prompt, parameters).completion_tokens,
        )
        != (bench.reference_answer(prompt, {}).text, bench.reference_answer(prompt, {}).completion_tokens)
    ]
    assert changed, f"{name} changed none of {case.prompts}' answers: pick prompts where it matters"


@pytest.mark.parametrize("name", [name for name, case in CASES.items() if not case.changes])
def test_cases_that_must_not_change_the_text_do_not(bench: Bench, name: str) -> None:
    case = CASES[name]
    parameters = case.parameters(bench.greedy)
    for prompt in case.prompts:
        got, plain = bench.reference_answer(prompt, parameters), bench.reference_answer(prompt, {})
        assert (got.text, got.completion_tokens) == (plain.text, plain.completion_tokens), (name, prompt)
        if "logprobs" in parameters:
            assert len(got.token_logprobs) == got.completion_tokens > 0
            assert all(len(entry.top) == parameters["logprobs"] for entry in got.token_logprobs)


# ---- seeded sampling ----

SAMPLED: dict[str, dict[str, Any]] = {
    "temperature_top_p": {"temperature": 0.8, "top_p": 0.9},
    "top_k": {"top_k": 20},
    "min_p": {"min_p": 0.1},
    "typical_p": {"typical_p": 0.9},
    "epsilon_cutoff": {"epsilon_cutoff": 0.01},
    "eta_cutoff": {"eta_cutoff": 0.01},
    "penalised": {"repetition_penalty": 1.3, "presence_penalty": 0.5},
}
SAMPLED_PROMPTS = ("fib", "fn", "for")


@pytest.mark.parametrize("name", list(SAMPLED))
def test_a_seeded_sample_is_the_same_alone_and_under_load(bench: Bench, neighbours: Neighbours, name: str) -> None:
    engine = bench.batch
    parameters = {"do_sample": True, "seed": 7, **SAMPLED[name]}
    plans = [bench.plan(engine, prompt, parameters) for prompt in SAMPLED_PROMPTS]
    assert all(engine.route(plan).path is GenerationPath.BATCHED for plan in plans)
    alone = [one(engine, plan).text for plan in plans]
    results = together(engine, [*plans, *neighbours.plans])
    assert [c.text for c in results[: len(plans)]] == alone, f"{name}: the sample depends on its neighbours"
    check_neighbours(results[len(plans) :], neighbours, name)
    # The samples are samples: another seed changes some, and they are not all the greedy answer.
    other_seed = [
        c.text for c in together(engine, [bench.plan(engine, p, {**parameters, "seed": 8}) for p in SAMPLED_PROMPTS])
    ]
    assert other_seed != alone, f"{name}: seeds 7 and 8 gave the same texts for every prompt"
    greedy = [bench.reference_answer(prompt, {}).text for prompt in SAMPLED_PROMPTS]
    assert alone != greedy, f"{name}: sampling gave the greedy answer for every prompt"


def test_n_sequences_are_all_on_the_batch_and_seeded_ones_repeat(engine: Engine) -> None:
    prompt_ids = engine.tokenize(PROMPTS["fn"])
    seeded = SamplingParams(max_new_tokens=16, do_sample=True, temperature=0.9, n=4, seed=21)
    plans = engine.plan(prompt_ids, seeded)
    assert len(plans) == 4 and [p.sampling.seed for p in plans] == [21, 22, 23, 24]
    assert all(p.sampling.n == 1 for p in plans)
    assert [engine.route(p).path for p in plans] == [GenerationPath.BATCHED] * 4
    first = [c.text for c in together(engine, plans)]
    assert [c.text for c in together(engine, engine.plan(prompt_ids, seeded))] == first
    assert len(set(first)) > 1, "the four sequences are one sample four times"
    # Sequence i is the request with seed 21 + i on its own.
    single = SamplingParams(max_new_tokens=16, do_sample=True, temperature=0.9, seed=23)
    assert one(engine, engine.plan(prompt_ids, single)[0]).text == first[2]
    # Unseeded: every sequence still gets its own seed, so each can be reproduced.
    unseeded = engine.plan(prompt_ids, SamplingParams(max_new_tokens=16, do_sample=True, n=4))
    seeds = [p.sampling.seed for p in unseeded]
    assert None not in seeds and len(set(seeds)) == 4
    assert [engine.route(p).path for p in unseeded] == [GenerationPath.BATCHED] * 4


# ---- logprobs: the model's own distribution (vLLM's default) ----

LOGPROB_TOKENS = 12


def model_logprobs(engine: Engine, prompt_ids: list[int], tokens: list[int]) -> torch.Tensor:
    """log_softmax of the tiny model's raw logits at each generated position, computed here directly."""
    with torch.inference_mode():
        ids = torch.tensor([[*prompt_ids, *tokens]], dtype=torch.long)
        logits = engine.model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1)


def assert_raw(completion: Completion, engine: Engine, prompt_ids: list[int], k: int, label: str) -> None:
    tokens = Bench.tokens_of(completion)
    raw = model_logprobs(engine, prompt_ids, tokens)
    assert len(tokens) == completion.completion_tokens > 0, label
    for step, entry in enumerate(completion.token_logprobs):
        where = f"{label}, token {step}"
        assert entry.logprob == pytest.approx(float(raw[step, entry.token_id]), abs=1e-4), where
        top = raw[step].topk(k)
        assert [t for t, _ in entry.top] == top.indices.tolist(), where
        assert [v for _, v in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4), where


@pytest.mark.parametrize("truncation", [{"top_k": 1}, {"top_p": 1e-9}], ids=["top_k_1", "top_p_1e-9"])
def test_logprobs_are_the_raw_distribution_on_both_paths(bench: Bench, truncation: dict[str, Any]) -> None:
    """A token's logprob and its top alternatives are log_softmax of the model's raw logits, before logit bias,
    penalties, temperature and truncation: the same on the batch and on generate(), and the same whatever the
    sampling parameters (a truncation to one token does not make every logprob 0)."""
    prompt_ids = bench.prompt_ids("fib")
    parameters = {
        "max_new_tokens": LOGPROB_TOKENS,
        "do_sample": True,
        "temperature": 0.5,
        **truncation,
        # Bans the plain greedy answer's first token, and favours another one.
        "logit_bias": {bench.greedy["fib"][0]: -100.0, 300: 4.0},
        "repetition_penalty": 1.3,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.5,
        "logprobs": 3,
        "seed": 7,
    }
    plan = bench.plan(bench.batch, "fib", parameters)
    assert bench.batch.route(plan).path is GenerationPath.BATCHED
    batched = one(bench.batch, plan)
    alone = bench.reference_answer("fib", parameters)  # generate(), continuous batching off
    assert_same(batched, alone, f"sampled with {truncation}")
    assert_raw(batched, bench.reference, prompt_ids, 3, f"sampled with {truncation}")
    # The processing chose tokens the raw distribution does not favour: their logprobs are below the top one.
    assert any(entry.logprob < entry.top[0][1] - 1e-3 for entry in batched.token_logprobs)
    # Greedy with no other parameter: the first step sees the same context, so the same distribution.
    greedy = one(bench.batch, bench.plan(bench.batch, "fib", {"max_new_tokens": LOGPROB_TOKENS, "logprobs": 3}))
    assert_raw(greedy, bench.reference, prompt_ids, 3, "greedy")
    first, first_greedy = batched.token_logprobs[0], greedy.token_logprobs[0]
    assert first.token_id != first_greedy.token_id  # the bias changed the choice, not the distribution
    assert [t for t, _ in first.top] == [t for t, _ in first_greedy.top]
    assert [v for _, v in first.top] == pytest.approx([v for _, v in first_greedy.top], abs=1e-5)
    assert first_greedy.logprob == pytest.approx(first_greedy.top[0][1], abs=1e-5)


def test_beam_search_logprobs_are_each_token_s_raw_distribution(bench: Bench) -> None:
    """Beam search cannot stream its steps' rows (they are beams): each token of the best beam is scored once the
    search is done, with the same raw distribution as every other request."""
    parameters = {"num_beams": 3, "max_new_tokens": 8, "logprobs": 2, "repetition_penalty": 1.3}
    plan = bench.plan(bench.batch, "fn", parameters)
    assert bench.batch.route(plan).path is GenerationPath.GENERATE
    beams = one(bench.batch, plan)
    assert len(beams.token_logprobs) == beams.completion_tokens
    assert_raw(beams, bench.reference, bench.prompt_ids("fn"), 2, "beam search")
    without = one(bench.batch, bench.plan(bench.batch, "fn", {**parameters, "logprobs": None}))
    assert (without.text, without.completion_tokens) == (beams.text, beams.completion_tokens)


# ---- routing ----


def test_only_beam_search_leaves_the_synchronous_batch(bench: Bench) -> None:
    """With async_batching on, requests that need their latest token on the host leave it too (test_batching.py)."""
    engine = bench.batch
    every = [
        *(case.parameters(bench.greedy) for case in CASES.values()),
        *({"do_sample": True, "seed": 7, **values} for values in SAMPLED.values()),
        {"do_sample": True, "n": 4, "seed": 1},
        {"do_sample": True, "max_time": 5.0},
        {"stop": ["\n"]},
        {"renormalize_logits": True, "remove_invalid_values": True},
    ]
    for parameters in every:
        plan = bench.plan(engine, "fib", parameters)
        assert engine.route(plan).path is GenerationPath.BATCHED, parameters
    beams = bench.plan(engine, "fib", {"num_beams": 2, "max_new_tokens": 6})
    assert engine.route(beams).path is GenerationPath.GENERATE
    assert (
        engine.route(bench.plan(engine, "fib", {"num_beams": 2, "length_penalty": 0.5})).path is GenerationPath.GENERATE
    )
    routed = dict(engine.routed)
    assert one(engine, beams).completion_tokens > 0
    assert engine.routed[GenerationPath.GENERATE] == routed[GenerationPath.GENERATE] + 1
    assert engine.routed[GenerationPath.BATCHED] == routed[GenerationPath.BATCHED]
    # The reference engine really is generate() alone, for everything.
    assert bench.reference.route(bench.plan(bench.reference, "fib", {})).path is GenerationPath.GENERATE


# ---- isolation ----

# Values at and past every bound a client may send; none may change, fail or stall another request.
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
    # Two tokens left, each usable once: the third step has none (validation refuses bans that leave none at once).
    "everything_banned": {"suppress_tokens": [t for t in range(694) if t not in (300, 301)], "no_repeat_ngram_size": 1},
}


def test_hostile_values_never_change_fail_or_stall_their_neighbours(bench: Bench, neighbours: Neighbours) -> None:
    engine = bench.batch
    hostile = [bench.plan(engine, "fib", values) for values in HOSTILE.values()]

    async def run() -> list[Completion | BaseException]:
        plans = [*neighbours.plans, *hostile]
        return list(await asyncio.gather(*(engine.complete(plan) for plan in plans), return_exceptions=True))

    for _ in range(2):
        results = asyncio.run(run())
        innocent = results[: len(neighbours.plans)]
        assert all(isinstance(r, Completion) for r in innocent), innocent
        check_neighbours(innocent, neighbours, "hostile values")  # type: ignore[arg-type]
        for name, outcome in zip(HOSTILE, results[len(neighbours.plans) :]):
            if name == "everything_banned":  # no token left at its third step: that request alone fails, with a 400
                assert getattr(outcome, "status_code", None) == 400, outcome
            else:
                assert isinstance(outcome, Completion), (name, outcome)
    assert engine.requests_in_progress == 0


# ---- graph mode ----

GRAPH_MODE_CASES = ("repetition_penalty", "presence_penalty", "min_new_tokens", "no_repeat_ngram_size_1", "logprobs")


def test_graph_mode_runs_every_operation_every_step_with_the_same_answers(tiny_model_dir: Path, bench: Bench) -> None:
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
        for name in GRAPH_MODE_CASES:
            parameters = CASES[name].parameters(bench.greedy)
            for prompt in CASES[name].prompts:
                got = one(engine, bench.plan(engine, prompt, parameters))
                assert_same(got, bench.reference_answer(prompt, parameters), f"{name} on {prompt!r} in graph mode")
        seeded = bench.plan(engine, "fn", {"do_sample": True, "temperature": 0.8, "top_p": 0.9, "seed": 3})
        assert one(engine, seeded).text == one(engine, seeded).text
    finally:
        engine.shutdown()
