"""Unit tests of ``engine/batch_sampler.py`` without a model.

* ``gumbel_noise``: deterministic, a function of (seed, step, token) only, Gumbel(0, 1) distributed, and
  argmax(logits + noise) samples softmax(logits).
* ``banned_by_ngrams`` / ``banned_by_bad_words`` ban exactly what transformers' own processors ban.
* ``BatchSampler`` driven step by step as the manager drives it (``prepare_tensor_args`` then ``__call__``
  on real transformers ``RequestState``s): each row equals transformers' processors for that row's
  parameters alone, whatever the other rows ask for; slots are reused without leaking state.

The noise is a hash, not a random generator: every statistical check below is deterministic (it either
always passes or always fails), and the bounds are loose.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from starcoder_serving.engine.batch_sampler import BatchSampler, banned_by_bad_words, banned_by_ngrams, gumbel_noise
from starcoder_serving.engine.generate_worker import AdditivePenalties, LogitBias
from starcoder_serving.engine.jobs import GenerationPlan
from starcoder_serving.engine.sampling_params import SamplingParams
from starcoder_serving.engine.transformers_compat import BatchRequest
from starcoder_serving.errors import Overloaded
from transformers.generation.continuous_batching.requests import RequestState
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    ExponentialDecayLengthPenalty,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

EULER_GAMMA = 0.5772156649
GUMBEL_VARIANCE = math.pi**2 / 6
VOCAB = 32
EOS = 0
CPU = torch.device("cpu")


def sampler(max_requests: int = 8, logits_width: int = VOCAB) -> BatchSampler:
    return BatchSampler(logits_width=logits_width, max_requests=max_requests, eos_token_ids=[EOS], device=CPU)


def token_mix(vocab_size: int) -> torch.Tensor:
    """The hashed token ids exactly as the sampler feeds them to ``gumbel_noise``."""
    return sampler(max_requests=1, logits_width=vocab_size)._token_mix


def noise(seeds: Sequence[int], steps: Sequence[int], vocab_size: int = 64) -> torch.Tensor:
    return gumbel_noise(
        torch.tensor(seeds, dtype=torch.long), torch.tensor(steps, dtype=torch.long), token_mix(vocab_size)
    )


# ---- gumbel_noise ----


def test_gumbel_noise_is_a_pure_function_of_seed_step_and_token() -> None:
    first = noise([7, 7, 8, 2**63 - 1], [0, 1, 0, 5])
    assert first.shape == (4, 64) and first.dtype == torch.float32
    assert torch.isfinite(first).all()
    assert torch.equal(first, noise([7, 7, 8, 2**63 - 1], [0, 1, 0, 5]))  # deterministic
    # A row's noise does not depend on the other rows (the batch it is in) or on its position.
    assert torch.equal(noise([8], [0])[0], first[2])
    assert torch.equal(noise([2**63 - 1, 3, 7], [5, 9, 1])[0], first[3])
    assert torch.equal(noise([3, 7], [9, 1])[1], first[1])

    def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
        return bool((a != b).float().mean() > 0.99)

    assert differs(first[0], first[1]), "the step does not change the noise"
    assert differs(first[0], first[2]), "the seed does not change the noise"
    # Both 32-bit halves of a 63-bit seed matter.
    assert differs(noise([5 + 2**32], [0])[0], noise([5], [0])[0])
    assert differs(noise([2**62], [0])[0], noise([0], [0])[0])
    # Across the vocabulary it is noise, not a constant per row.
    assert first[0].std() > 0.5
    # It touches no global random state.
    state = torch.get_rng_state()
    noise([1, 2, 3], [4, 5, 6])
    assert torch.equal(state, torch.get_rng_state())


def test_gumbel_noise_has_the_gumbel_mean_variance_and_cdf() -> None:
    rows = 512
    values = noise([1000 + i for i in range(rows)], [i % 7 for i in range(rows)], vocab_size=1024).double().flatten()
    assert values.numel() == rows * 1024
    assert abs(values.mean().item() - EULER_GAMMA) < 0.02, values.mean().item()
    assert abs(values.var().item() - GUMBEL_VARIANCE) < 0.06, values.var().item()
    # The CDF exp(-exp(-x)) at a few points.
    for x in (-1.0, 0.0, 1.0, 3.0):
        empirical = (values <= x).double().mean().item()
        assert abs(empirical - math.exp(-math.exp(-x))) < 0.01, (x, empirical)


def chi_square(counts: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("probabilities", [(0.1, 0.2, 0.3, 0.4), (0.85, 0.05, 0.07, 0.03), (0.25, 0.25, 0.25, 0.25)])
@pytest.mark.parametrize("vary", ["step", "seed"])
def test_argmax_of_logits_plus_gumbel_samples_the_softmax(probabilities: tuple[float, ...], vary: str) -> None:
    draws = 20_000
    probs = torch.tensor(probabilities, dtype=torch.float64)
    logits = probs.log().float() + 3.0  # softmax is shift-invariant; the noise must not care either
    index = list(range(draws))
    # Over the steps of one seeded request, and over the seeds of n sequences (seed, seed + 1, ...) at one step.
    seeds, steps = ([7] * draws, index) if vary == "step" else ([2**40 + i for i in index], [0] * draws)
    chosen = (logits + noise(seeds, steps, vocab_size=4)).argmax(dim=-1)
    counts = torch.bincount(chosen, minlength=4).double()
    # chi-square with 3 degrees of freedom: P(> 16.3) = 0.001.
    assert chi_square(counts, probs * draws) < 16.3, (counts / draws).tolist()


@pytest.mark.parametrize("neighbour", ["next step", "next seed"])
def test_consecutive_draws_are_independent(neighbour: str) -> None:
    """Draws of consecutive steps (one request) and of consecutive seeds (n sequences) are not correlated."""
    draws = 16_000
    uniform = torch.zeros(4)
    first = (uniform + noise([99] * draws, range(0, 2 * draws, 2), vocab_size=4)).argmax(dim=-1)
    if neighbour == "next step":
        second = (uniform + noise([99] * draws, range(1, 2 * draws, 2), vocab_size=4)).argmax(dim=-1)
    else:
        second = (uniform + noise([100] * draws, range(0, 2 * draws, 2), vocab_size=4)).argmax(dim=-1)
    joint = torch.bincount(first * 4 + second, minlength=16).double()
    # 15 degrees of freedom: P(> 37.7) = 0.001.
    assert chi_square(joint, torch.full((16,), draws / 16, dtype=torch.float64)) < 37.7, joint.tolist()


# ---- host-side bans against transformers ----


def banned_by_transformers(processor: Any, tokens: Sequence[int], vocab_size: int) -> set[int]:
    scores = processor(torch.tensor([list(tokens)], dtype=torch.long), torch.zeros((1, vocab_size)))
    return set(torch.isinf(scores[0]).nonzero().flatten().tolist())


def test_banned_by_ngrams_matches_no_repeat_ngram_logits_processor() -> None:
    rng = random.Random(1234)
    vocab_size, banning = 5, 0
    for _ in range(400):
        size = rng.randint(1, 4)
        tokens = [rng.randrange(vocab_size) for _ in range(rng.randint(1, 24))]
        want = banned_by_transformers(NoRepeatNGramLogitsProcessor(size), tokens, vocab_size)
        assert set(banned_by_ngrams(tokens, size)) == want, (tokens, size)
        banning += bool(want)
    assert banning > 200, "too few sequences banned anything: the comparison proves little"
    assert banned_by_ngrams([], 2) == [] and banned_by_ngrams([1, 2, 1, 2], 0) == []


def test_banned_by_bad_words_matches_no_bad_words_logits_processor() -> None:
    """Single-token words are the sampler's static ban; banned_by_bad_words adds the multi-token ones."""
    rng = random.Random(4321)
    vocab_size, multi_token_bans = 5, 0
    for _ in range(400):
        # Token ids from 1: transformers drops a lone end-token word when told the end tokens (not here).
        words = [
            tuple(rng.randrange(1, vocab_size) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 4))
        ]
        tokens = [rng.randrange(vocab_size) for _ in range(rng.randint(1, 16))]
        processor = NoBadWordsLogitsProcessor([list(word) for word in words], eos_token_id=None)
        want = banned_by_transformers(processor, tokens, vocab_size)
        single = {word[0] for word in words if len(word) == 1}
        dynamic = set(banned_by_bad_words(tokens, words))
        assert single | dynamic == want, (tokens, words)
        multi_token_bans += bool(dynamic - single)
    assert multi_token_bans > 50, "too few multi-token words matched: the comparison proves little"
    assert banned_by_bad_words([3, 4], [(4,)]) == []  # single-token words are not its business
    assert banned_by_bad_words([3, 4], [(3, 4, 5), (4, 6), (9, 4, 7)]) == [5, 6]


# ---- BatchSampler rows against transformers' processors ----


def make_plan(prompt: Sequence[int], **parameters: Any) -> GenerationPlan:
    sampling = SamplingParams.model_validate({"max_new_tokens": 16, **parameters}).for_sequence(0)
    return GenerationPlan(list(prompt), sampling)


class Row:
    """One request as the manager hands it to the processor: a real transformers RequestState."""

    def __init__(self, request_id: str, plan: GenerationPlan) -> None:
        self.plan = plan
        self.state = RequestState(
            request_id=request_id, initial_tokens=list(plan.prompt_ids), logit_processor_kwargs={"plan": plan}
        )
        self.request = BatchRequest(self.state, True, {}, 1)
        self.finished = False

    @property
    def tokens(self) -> list[int]:
        return [*self.state.initial_tokens, *self.state.generated_tokens]


def transformers_row(plan: GenerationPlan, tokens: Sequence[int], scores: torch.Tensor) -> torch.Tensor:
    """The row as generate() processes it (vLLM's order): the generate path's own logit bias, transformers'
    repetition penalty, our presence/frequency penalties, transformers' bans and lengths, then its warpers
    (temperature, then the truncations)."""
    p = plan.sampling
    prompt_length = len(plan.prompt_ids)
    processors = LogitsProcessorList()
    if p.logit_bias:
        processors.append(LogitBias(dict(p.logit_bias)))
    if p.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty=float(p.repetition_penalty)))
    if p.presence_penalty or p.frequency_penalty:
        processors.append(AdditivePenalties(prompt_length, p.presence_penalty, p.frequency_penalty))
    if p.no_repeat_ngram_size:
        processors.append(NoRepeatNGramLogitsProcessor(p.no_repeat_ngram_size))
    if p.bad_words_ids:
        processors.append(NoBadWordsLogitsProcessor([list(w) for w in p.bad_words_ids], eos_token_id=[EOS]))
    if p.min_new_tokens:
        processors.append(MinNewTokensLengthLogitsProcessor(prompt_length, p.min_new_tokens, [EOS]))
    if p.exponential_decay_length_penalty is not None:
        processors.append(ExponentialDecayLengthPenalty(p.exponential_decay_length_penalty, [EOS], prompt_length))
    if p.suppress_tokens:
        processors.append(SuppressTokensLogitsProcessor(list(p.suppress_tokens)))
    if p.begin_suppress_tokens:
        processors.append(SuppressTokensAtBeginLogitsProcessor(list(p.begin_suppress_tokens), prompt_length))
    if not p.greedy:
        if p.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(float(p.temperature)))
        if p.top_k:
            processors.append(TopKLogitsWarper(p.top_k))
        if p.top_p < 1.0:
            processors.append(TopPLogitsWarper(p.top_p))
        if p.min_p:
            processors.append(MinPLogitsWarper(p.min_p))
        if p.typical_p < 1.0:
            processors.append(TypicalLogitsWarper(p.typical_p))
        if p.epsilon_cutoff:
            processors.append(EpsilonLogitsWarper(p.epsilon_cutoff))
        if p.eta_cutoff:
            processors.append(EtaLogitsWarper(p.eta_cutoff))
    return processors(torch.tensor([list(tokens)], dtype=torch.long), scores.unsqueeze(0).clone())[0]


def run_steps(
    batch: BatchSampler, rows: list[Row], steps: int, seed: int
) -> dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Drive the sampler as the manager does; per row and step: (raw scores, the sampler's row, transformers' row)."""
    generator = torch.Generator().manual_seed(seed)
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {row.state.request_id: [] for row in rows}
    for _ in range(steps):
        live = [row for row in rows if not row.finished]
        if not live:
            break
        scores = torch.randn((len(live), VOCAB), generator=generator) * 3.0
        tensor_arg = batch.prepare_tensor_args([row.request for row in live])
        assert tensor_arg.dtype == torch.int32 and tensor_arg.shape == (len(live),)
        out = batch(scores.clone(), tensor_arg)
        assert out.shape == scores.shape and not torch.isnan(out).any()
        for row, raw, got in zip(live, scores, out):
            seen[row.state.request_id].append((raw, got, transformers_row(row.plan, row.tokens, raw)))
            chosen = int(got.argmax())  # the manager's own argmax
            row.state.generated_tokens.append(chosen)
            if chosen == EOS:
                row.finished = True
                batch.release(row.state.request_id)
    return seen


GREEDY_ROWS: dict[str, GenerationPlan] = {
    "plain": make_plan([1, 2, 3]),
    "repetition_penalty": make_plan([5, 6, 7, 5, 6], repetition_penalty=1.7),
    "repetition_penalty_below_1": make_plan([5, 6, 7], repetition_penalty=0.6),
    "presence_frequency": make_plan([1, 2, 3], presence_penalty=1.5, frequency_penalty=0.7),
    "no_repeat_ngram_size": make_plan([3, 4, 3, 4, 3], no_repeat_ngram_size=2),
    "bad_words_ids": make_plan([9, 10, 11], bad_words_ids=[[12], [11, 13], [13, 14, 15], [10, 11, 16]]),
    "min_new_tokens": make_plan([1, 1], min_new_tokens=5),
    "exponential_decay": make_plan([2, 3], exponential_decay_length_penalty=(2, 1.6)),
    "suppress_tokens": make_plan([4], suppress_tokens=[5, 6, 7, 8], begin_suppress_tokens=[9, 10]),
    "logit_bias": make_plan([7, 8], logit_bias={3: 5.0, 4: -100.0, 20: 1.5}),
    "temperature_below_epsilon": make_plan([1, 2], do_sample=True, temperature=1e-46),
}
SAMPLED_ROWS: dict[str, GenerationPlan] = {
    "temperature_top_k": make_plan([1], do_sample=True, temperature=0.7, top_k=10, seed=1),
    "top_p": make_plan([1], do_sample=True, top_p=0.8, seed=2),
    "min_p": make_plan([1], do_sample=True, min_p=0.2, seed=3),
    "typical_p": make_plan([1], do_sample=True, typical_p=0.7, seed=4),
    "epsilon": make_plan([1], do_sample=True, epsilon_cutoff=0.05, seed=5),
    "eta": make_plan([1], do_sample=True, eta_cutoff=0.05, seed=6),
    "all_warpers": make_plan([1], do_sample=True, temperature=1.5, top_k=12, top_p=0.9, min_p=0.05, seed=7),
    "extremes": make_plan([1], do_sample=True, top_p=1e-9, min_p=1.0, typical_p=1e-9, epsilon_cutoff=0.999, seed=8),
}


def test_each_row_is_processed_as_transformers_would_alone() -> None:
    """Greedy rows equal transformers' processors (values); sampled rows keep the tokens transformers' warpers
    keep (the noise is finite, so the sampler's -inf are the warpers'). All in one batch, for 12 steps."""
    batch = sampler(max_requests=12)
    rows = [Row(f"greedy-{name}", plan) for name, plan in GREEDY_ROWS.items()]
    rows += [Row(f"sampled-{name}", plan) for name, plan in SAMPLED_ROWS.items()]
    seen = run_steps(batch, rows, steps=12, seed=0)
    for request_id, steps in seen.items():
        assert steps, request_id
        acted = False
        for step, (raw, got, want) in enumerate(steps):
            where = f"{request_id} step {step}"
            assert torch.equal(torch.isfinite(got), torch.isfinite(want)), (
                f"{where}: kept {torch.isfinite(got).nonzero().flatten().tolist()}, transformers {torch.isfinite(want).nonzero().flatten().tolist()}"
            )
            if request_id.startswith("greedy"):
                finite = torch.isfinite(want)
                assert torch.allclose(got[finite], want[finite], rtol=1e-5, atol=1e-5), where
            else:
                assert torch.isfinite(got).any(), where
            acted |= not torch.equal(want, raw)
        if request_id not in ("greedy-plain", "greedy-temperature_below_epsilon"):
            assert acted, f"{request_id}: its parameters never changed a score; the comparison proves nothing"
    # Sampled rows really sampled: not every choice was the most likely kept token.
    sampled_choices = [
        (int(got.argmax()), int(want.argmax()))
        for request_id, steps in seen.items()
        if request_id.startswith("sampled")
        for _, got, want in steps
    ]
    assert sum(a != b for a, b in sampled_choices) > 5


def test_a_seeded_row_draws_the_same_tokens_whatever_its_neighbours() -> None:
    plan = make_plan([1, 2], do_sample=True, temperature=1.3, seed=42)
    generator = torch.Generator().manual_seed(3)
    scores = [torch.randn(VOCAB, generator=generator) for _ in range(10)]

    def draws(neighbours: list[GenerationPlan]) -> list[int]:
        batch = sampler(max_requests=8)
        rows = [Row("me", plan), *(Row(f"n{i}", p) for i, p in enumerate(neighbours))]
        chosen = []
        for step in range(10):
            tensor_arg = batch.prepare_tensor_args([row.request for row in rows])
            others = torch.randn((len(rows) - 1, VOCAB))
            out = batch(torch.cat([scores[step].unsqueeze(0), others]), tensor_arg)
            chosen.append(int(out[0].argmax()))
            for row, token in zip(rows, out.argmax(dim=-1).tolist()):
                row.state.generated_tokens.append(token)
        return chosen

    alone = draws([])
    assert (
        draws(
            [make_plan([3], do_sample=True, seed=1), make_plan([4], repetition_penalty=2.0), make_plan([5], logprobs=5)]
        )
        == alone
    )
    assert draws([make_plan([6], do_sample=True, top_k=2, seed=42)] * 3) == alone
    assert len(set(alone)) > 3, "ten draws at temperature 1.3 from random logits should vary"


def test_a_reused_slot_starts_clean() -> None:
    batch = sampler(max_requests=1)
    heavy = Row(
        "heavy",
        make_plan(
            [1, 2, 3],
            repetition_penalty=3.0,
            presence_penalty=2.0,
            frequency_penalty=2.0,
            logit_bias={5: 50.0},
            suppress_tokens=[6, 7],
            begin_suppress_tokens=[8],
            no_repeat_ngram_size=1,
            min_new_tokens=10,
            exponential_decay_length_penalty=(0, 3.0),
        ),
    )
    run_steps(batch, [heavy], steps=4, seed=1)
    slot = batch.slot_of("heavy")
    assert slot is not None
    batch.release("heavy")
    # The next request uses the same operations with other values: any leftover state would show.
    light = Row(
        "light",
        make_plan(
            [9, 10],
            repetition_penalty=1.1,
            presence_penalty=0.1,
            logit_bias={11: 0.5},
            suppress_tokens=[12],
            begin_suppress_tokens=[13],
            no_repeat_ngram_size=3,
            min_new_tokens=1,
            exponential_decay_length_penalty=(5, 1.01),
        ),
    )
    seen = run_steps(batch, [light], steps=4, seed=2)
    assert batch.slot_of("heavy") is None and batch.slot_of("light") == slot, "the freed slot was not the one reused"
    for step, (_, got, want) in enumerate(seen["light"]):
        assert torch.equal(torch.isfinite(got), torch.isfinite(want)), f"step {step}: bans leaked into the slot"
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), f"step {step}: penalties or bias leaked into the slot"
    batch.release("light")
    plain = Row("plain", make_plan([1, 2, 3]))
    for raw, got, _ in run_steps(batch, [plain], steps=2, seed=3)["plain"]:
        assert torch.equal(got, raw)


def test_more_requests_than_slots_are_rejected_one_by_one() -> None:
    batch = sampler(max_requests=1)  # 2 slots and the padding rows' spare
    rows = [Row(f"r{i}", make_plan([1], logit_bias={3: 40.0})) for i in range(3)]
    scores = torch.randn((3, VOCAB))
    out = batch(scores.clone(), batch.prepare_tensor_args([row.request for row in rows]))
    assert set(batch.rejected) == {"r2"} and isinstance(batch.rejected["r2"], Overloaded)
    assert int(out[0].argmax()) == int(out[1].argmax()) == 3  # served: their bias applies
    assert torch.equal(out[2], scores[2])  # the spare slot processes nothing


def test_a_row_with_no_token_left_ends_alone_and_is_marked_faulted() -> None:
    batch = sampler(max_requests=2)
    doomed = Row("doomed", make_plan([1], suppress_tokens=list(range(VOCAB))))
    fine = Row("fine", make_plan([1], repetition_penalty=1.5))
    scores = torch.randn((2, VOCAB))
    out = batch(scores.clone(), batch.prepare_tensor_args([doomed.request, fine.request]))
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [EOS]
    assert batch.faulted(batch.slot_of("doomed"))  # type: ignore[arg-type]
    assert not batch.faulted(batch.slot_of("fine"))  # type: ignore[arg-type]
    assert torch.allclose(out[1], transformers_row(fine.plan, fine.tokens, scores[1]))


def test_a_step_of_plain_greedy_rows_leaves_the_logits_untouched() -> None:
    """Plain greedy rows need no operation: the manager's argmax of the model's own logits is generate()'s
    choice. A step that also holds a row with parameters processes every row; the plain ones still come out
    unchanged (every operation is the identity for them), and their slots' step counters never drift."""
    batch = sampler()
    plain = [Row(f"plain-{i}", make_plan([1, 2, 3])) for i in range(3)]
    scores = torch.randn((3, VOCAB))
    assert batch(scores, batch.prepare_tensor_args([row.request for row in plain])) is scores

    penalised = Row("penalised", make_plan([1, 2], repetition_penalty=1.5, seed=1))
    rows = [*plain, penalised]
    scores = torch.randn((4, VOCAB))
    out = batch(scores.clone(), batch.prepare_tensor_args([row.request for row in rows]))
    assert torch.equal(out[:3], scores[:3])
    assert not torch.equal(out[3], scores[3])


def test_logprobs_are_the_raw_distribution_for_the_rows_that_ask() -> None:
    """vLLM's default logprobs: log_softmax of the model's raw logits, whatever the row's processing (bias,
    penalties, temperature, a truncation that leaves one token), read for the rows that asked, each with its own
    number of top entries, beside rows that did not ask; the chosen token is the one the manager picks."""
    asking = {
        "greedy": make_plan([1, 2], logprobs=2),
        "processed": make_plan(
            [3, 4],
            do_sample=True,
            temperature=0.5,
            top_k=1,
            logit_bias={5: 30.0},
            repetition_penalty=1.5,
            presence_penalty=1.0,
            logprobs=5,
            seed=3,
        ),
        "nucleus": make_plan([6], do_sample=True, top_p=1e-9, seed=4, logprobs=0),
    }
    quiet = {"penalised": make_plan([1], repetition_penalty=2.0), "sampled": make_plan([2], do_sample=True, seed=5)}
    for static in (False, True):  # with CUDA graphs every row's logprobs are computed; the same ones are read
        batch = sampler()
        batch.static_graph = static
        rows = [Row(name, plan) for name, plan in [*asking.items(), *quiet.items()]]
        order = [1, 3, 0, 4, 2]  # the rows that ask are not the first ones
        generator = torch.Generator().manual_seed(11)
        for step in range(4):
            scores = torch.randn((len(rows), VOCAB), generator=generator) * 3.0
            scores[order.index(0), 7] = float("nan")  # cleaned as the processing cleans it: never chosen
            stepped = [rows[i] for i in order]
            out = batch(scores.clone(), batch.prepare_tensor_args([row.request for row in stepped]))
            slots = [batch.slot_of(row.state.request_id) for row in stepped]
            entries = batch.read_logprobs(
                [slot for slot, row in zip(slots, stepped) if row.plan.top_logprobs is not None]
            )
            for i, (row, slot) in enumerate(zip(stepped, slots)):
                chosen = int(out[i].argmax())
                row.state.generated_tokens.append(chosen)
                if row.plan.top_logprobs is None:
                    continue
                raw = torch.nan_to_num(scores[i], nan=float("-inf")).log_softmax(dim=-1)
                entry = entries[slot]
                where = f"{row.state.request_id} step {step} (static {static})"
                assert entry.logprob == pytest.approx(float(raw[chosen]), abs=1e-5), where
                top = raw.topk(row.plan.top_logprobs)
                assert [t for t, _ in entry.top] == top.indices.tolist(), where
                assert [v for _, v in entry.top] == pytest.approx(top.values.tolist(), abs=1e-5), where
            if step == 0:  # the processing did act: the biased row chose a token the raw distribution does not favour
                processed = order.index(1)
                assert int(out[processed].argmax()) == 5 and int(scores[processed].argmax()) != 5
