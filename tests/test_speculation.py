"""Speculative decoding in the batch (engine/speculation.py, drafting.py, BatchSampler's verification).

The random tiny models never repeat themselves, so n-gram drafts would never be tried on them: most tests here
draft with ``OracleDrafter`` from the output without speculation, with every draft right, half of them, or none,
and check that what a request gets is exactly what it gets without speculation.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
from starcoder_serving.engine.batch_worker import BatchedWorker
from starcoder_serving.engine.drafting import Drafter, NgramDrafter, OracleDrafter, TokenHistory
from starcoder_serving.engine.engine import Completion, Engine
from starcoder_serving.engine.jobs import GenerationPlan, Job
from starcoder_serving.engine.sampling_params import SamplingParams
from starcoder_serving.engine.speculation import Speculator
from starcoder_serving.engine.transformers_compat import DecodingRow
from starcoder_serving.events import DoneEvent, FinishReason, TokenEvent
from transformers import AutoModelForCausalLM

from devtools.truss_local import CODE_MODEL_DIR
from tests.conftest import DATA_DIR, tiny_settings
from tests.test_batch_sampler import VOCAB, Row, make_plan, sampler

PROMPTS = [
    [5, 9, 17, 3, 44, 2, 8, 101, 7],
    [300, 12, 12, 45, 600, 3],
    [77, 78, 79],
]


def load(directory: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Any:
    return load(tiny_model_dir)


class Outcome:
    def __init__(self) -> None:
        self.events: list[TokenEvent] = []
        self.done: DoneEvent | None = None

    @property
    def tokens(self) -> list[int]:
        return [token for event in self.events for token in event.token_ids]

    @property
    def logprobs(self) -> list[float]:
        return [entry.logprob for event in self.events for entry in event.logprobs]

    def same_as(self, other: Outcome) -> bool:
        """Same tokens, end and logprob entries (values to float32 precision: a forward pass over several
        positions rounds differently from one over one)."""
        assert self.done is not None and other.done is not None
        return (
            self.tokens == other.tokens
            and self.done.reason == other.done.reason
            and len(self.logprobs) == len(other.logprobs)
            and all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(self.logprobs, other.logprobs))
        )


def worker(model: Any, speculative_tokens: int, drafter: Drafter | None = None, **options: Any) -> BatchedWorker:
    settings: dict[str, Any] = {
        "eos_token_ids": {0},
        "logits_width": model.config.vocab_size,
        "max_requests": 16,
        "max_batch_sequences": 16,
        "max_batch_tokens": 256,
        "kv_num_blocks": 96,
        "kv_page_size": 16,
        "kv_memory_fraction": None,
        "prefix_sharing": True,
        "stream_interval_s": 0.0,
    }
    settings.update(options)
    return BatchedWorker(model, speculative_tokens=speculative_tokens, drafter=drafter, **settings)


def run(
    batch: BatchedWorker,
    prompts: Sequence[Sequence[int]],
    quiet: bool = False,
    cancel_after: int | None = None,
    **params: Any,
) -> list[Outcome]:
    """Submits every prompt at once and collects each one's events."""
    loop = asyncio.new_event_loop()

    async def collect() -> list[Outcome]:
        jobs = []
        for prompt in prompts:
            job = Job(
                GenerationPlan(list(prompt), SamplingParams(**{"max_new_tokens": 40, **params})), loop, quiet=quiet
            )
            jobs.append(job)
            batch.submit(job)
        outcomes = []
        for job in jobs:
            outcome = Outcome()
            while outcome.done is None:
                for event in await job.next_events():
                    if isinstance(event, TokenEvent):
                        outcome.events.append(event)
                        if cancel_after is not None and len(outcome.tokens) >= cancel_after:
                            job.cancelled.set()
                    else:
                        outcome.done = event
            outcomes.append(outcome)
        return outcomes

    try:
        return loop.run_until_complete(collect())
    finally:
        loop.close()


def reference(model: Any, prompts: Sequence[Sequence[int]], **params: Any) -> list[Outcome]:
    batch = worker(model, 0)
    try:
        return run(batch, prompts, **params)
    finally:
        batch.shutdown()


def speculating(
    model: Any, prompts: Sequence[Sequence[int]], expected: list[Outcome], acceptance: float, **params: Any
) -> tuple[list[Outcome], Any]:
    drafter = OracleDrafter(
        [[*prompt, *outcome.tokens] for prompt, outcome in zip(prompts, expected)], acceptance, model.config.vocab_size
    )
    batch = worker(model, 6, drafter)
    try:
        return run(batch, prompts, **params), batch.speculation
    finally:
        batch.shutdown()


# ---- drafting ----


def drafts(tokens: list[int], k: int, grown: list[int] | None = None) -> list[int]:
    history = TokenHistory(tokens)
    if grown is not None:  # the index built for ``tokens``, then extended token by token
        history.lookup(1)
        for token in grown:
            history.extend([token])
            history.lookup(1)
    return NgramDrafter().propose("r", history, k)


@pytest.mark.parametrize("grow", [False, True], ids=["built-at-once", "grown"])
def test_lookup_drafts_what_followed_the_latest_longest_match(grow: bool) -> None:
    def check(tokens: list[int], k: int, expected: list[int]) -> None:
        split = 3 if grow and len(tokens) > 3 else len(tokens)
        assert drafts(tokens[:split], k, tokens[split:] if grow else None) == expected, tokens

    # [1, 2] occurs at 0 and 6: the latest (6) wins, and what followed it is drafted.
    check([1, 2, 3, 4, 5, 9, 1, 2, 7, 8, 0, 1, 2], 3, [7, 8, 0])
    # A longer match beats a later, shorter one: [4, 1, 2] occurred at 0..2, [1, 2] later at 5..6.
    check([4, 1, 2, 3, 6, 1, 2, 5, 4, 1, 2], 2, [3, 6])
    check([1, 2, 3, 4], 3, [])  # no earlier occurrence
    check([7, 7, 7, 7], 5, [7])  # what follows runs into the sequence's own end
    check([1, 2, 1, 2], 0, [])
    check([3], 2, [])


def test_token_history_matches_a_brute_force_search() -> None:
    """On random sequences of a small alphabet, token by token: the lookup is the latest longest earlier match."""
    generator = numpy.random.default_rng(3)
    tokens = generator.integers(0, 6, size=300).tolist()
    history = TokenHistory(tokens[:5])
    for end in range(5, len(tokens)):
        seen = tokens[:end]
        expected: list[int] = []
        for n in (4, 3, 2):
            starts = [i for i in range(len(seen) - n) if seen[i : i + n] == seen[-n:]]
            if starts:
                expected = seen[starts[-1] + n : starts[-1] + n + 3]
                break
        assert history.lookup(3) == expected, end
        history.extend([tokens[end]])


# ---- the policy ----


def rows(count: int, left: int = 100, position: int = 40) -> list[DecodingRow]:
    return [DecodingRow(f"r{i}", [1, 2, 3, 4] * 8, [1, 2, 3], position, left) for i in range(count)]


class FixedDrafter:
    def __init__(self) -> None:
        self.asked: list[int] = []

    def propose(self, request_id: str, tokens: TokenHistory, k: int) -> list[int]:
        self.asked.append(k)
        return [9] * k

    def forget(self, request_id: str) -> None:
        pass


def test_drafts_take_only_the_room_left_and_the_step_limit() -> None:
    drafter = FixedDrafter()
    speculator = Speculator(max_tokens=8, step_token_limit=20, drafter=drafter)
    drafts = speculator.propose(rows(4), token_room=100)
    assert sum(map(len, drafts.values())) == 20 - 4  # the step holds 20 tokens: 4 rows' own, 16 drafts
    drafts = speculator.propose(rows(4), token_room=5)
    assert sum(map(len, drafts.values())) == 5
    # Never past the request's remaining tokens (the last one is always the model's own), nor past a sliding
    # window's first pass (a rejected draft would overwrite an entry the window still needs).
    assert Speculator(max_tokens=8, step_token_limit=64, drafter=drafter).propose(rows(1, left=3), 100) == {
        "r0": [9, 9]
    }
    windowed = Speculator(max_tokens=8, step_token_limit=64, sliding_window=44, drafter=drafter)
    assert windowed.propose(rows(1, position=40), 100) == {"r0": [9, 9, 9]}
    assert windowed.propose(rows(1, position=43), 100) == {}


def test_k_adapts_to_what_was_kept_and_backs_off_after_failures() -> None:
    drafter = FixedDrafter()
    speculator = Speculator(max_tokens=8, step_token_limit=64, drafter=drafter)
    kept: dict[str, int] = {}
    speculator.attach(list, lambda picks: kept)

    def step(keep: int | None) -> int:
        """One step: the drafts' length (0: none), then the model keeps ``keep`` of them."""
        drafts = speculator.propose(rows(1), 100)
        speculator.scheduled(drafts)
        length = len(drafts.get("r0", []))
        kept.clear()
        if length:
            kept["r0"] = length if keep is None else keep
            speculator.verified([])
        return length

    assert step(None) == 8  # starts at the most, all kept
    assert step(2) == 8
    assert step(None) == 3  # what was kept, plus one; then grows by 2
    assert step(None) == 5
    # No draft kept: one token next time, after a pause that doubles with each failure (1, 2, 4 ... 16 steps).
    assert step(0) == 7
    assert step(0) == 0
    assert step(0) == 1
    assert [step(0) for _ in range(3)] == [0, 0, 1]
    assert [step(0) for _ in range(5)] == [0, 0, 0, 0, 1]
    stats = speculator.snapshot()
    assert stats.drafted == 8 + 8 + 3 + 5 + 7 + 1 + 1 + 1
    assert stats.accepted == 8 + 2 + 3 + 5
    assert stats.verified_steps == 8


def test_a_new_request_starts_from_the_recent_acceptance() -> None:
    """After drafts have mostly missed, a new request starts backed off (it probes one token after 4 steps) instead
    of paying a full first draft; after they have mostly been kept, it starts at the most again."""
    speculator = Speculator(max_tokens=8, step_token_limit=64, drafter=FixedDrafter())
    kept: dict[str, int] = {}
    speculator.attach(list, lambda picks: kept)

    def step(request: DecodingRow, keep_all: bool) -> int:
        drafts = speculator.propose([request], 100)
        speculator.scheduled(drafts)
        length = len(drafts.get(request.request_id, []))
        kept.clear()
        if length:
            kept[request.request_id] = length if keep_all else 0
            speculator.verified([])
        return length

    for i in range(30):  # one step each of many requests whose drafts miss
        step(rows(1)[0]._replace(request_id=f"miss-{i}"), keep_all=False)
    fresh = rows(1)[0]._replace(request_id="fresh")
    assert [step(fresh, keep_all=True) for _ in range(5)] == [0, 0, 0, 0, 1]
    for i in range(40):
        step(rows(1)[0]._replace(request_id=f"hit-{i}"), keep_all=True)
    assert step(rows(1)[0]._replace(request_id="later"), keep_all=True) == 8


# ---- exact: the output is the one without speculation ----

PARAMETERS: dict[str, dict[str, Any]] = {
    "greedy": {},
    "penalties": {"repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.4},
    "bans": {"no_repeat_ngram_size": 2, "bad_words_ids": [[5, 6], [7]], "suppress_tokens": [11]},
    "min-length-and-bias": {"min_new_tokens": 30, "logit_bias": {12: 3.0, 0: -2.0}},
    "decay": {"exponential_decay_length_penalty": (10, 1.2)},
    "logprobs": {"logprobs": 3},
    "sampled": {"do_sample": True, "seed": 11, "temperature": 0.9, "top_k": 40, "top_p": 0.95},
    "sampled-everything": {
        "do_sample": True,
        "seed": 3,
        "min_p": 0.01,
        "typical_p": 0.9,
        "repetition_penalty": 1.1,
        "no_repeat_ngram_size": 3,
        "logprobs": 1,
    },
}


@pytest.mark.parametrize("acceptance", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("name", list(PARAMETERS))
def test_output_is_the_same_with_speculation(model: Any, name: str, acceptance: float) -> None:
    params = PARAMETERS[name]
    expected = reference(model, PROMPTS, **params)
    got, stats = speculating(model, PROMPTS, expected, acceptance, **params)
    for prompt, want, have in zip(PROMPTS, expected, got):
        assert have.same_as(want), f"{name} at acceptance {acceptance}: {prompt}\n{want.tokens}\n{have.tokens}"
    assert stats.drafted > 0
    if acceptance == 1.0:  # but a drafted end token: it ends the request as the model's own pick, not as a draft
        assert stats.drafted - len(PROMPTS) <= stats.accepted <= stats.drafted
    elif acceptance == 0.0:
        assert stats.accepted == 0
    else:
        assert 0 < stats.accepted < stats.drafted


def test_a_stream_gets_several_tokens_at_once_each_with_its_logprob(model: Any) -> None:
    expected = reference(model, PROMPTS[:1], logprobs=2)
    got, _stats = speculating(model, PROMPTS[:1], expected, 1.0, logprobs=2)
    (outcome,) = got
    assert max(len(event.token_ids) for event in outcome.events) > 1
    for event in outcome.events:
        assert [entry.token_id for entry in event.logprobs] == list(event.token_ids)
    assert outcome.same_as(expected[0])


def test_a_cancelled_request_stops_and_the_batch_goes_on(model: Any) -> None:
    expected = reference(model, PROMPTS)
    drafter = OracleDrafter([[*p, *o.tokens] for p, o in zip(PROMPTS, expected)], 1.0, model.config.vocab_size)
    batch = worker(model, 6, drafter)
    try:
        (cancelled,) = run(batch, PROMPTS[:1], cancel_after=3)
        assert cancelled.done is not None and cancelled.done.reason is FinishReason.CANCELLED
        assert cancelled.tokens == expected[0].tokens[: len(cancelled.tokens)]
        again = run(batch, PROMPTS, quiet=True)
    finally:
        batch.shutdown()
    assert [outcome.tokens for outcome in again] == [outcome.tokens for outcome in expected]


def test_pages_completed_by_kept_drafts_are_shared_with_the_right_content(model: Any) -> None:
    """Prefix sharing hashes the pages a step completes: with drafts, only the kept tokens' pages. A later request
    whose prompt is an earlier one's prompt and output reuses those pages and must decode as with its own."""
    prompt = PROMPTS[0]
    first = reference(model, [prompt], max_new_tokens=60)[0]
    follow_up = [*prompt, *first.tokens[:45]]
    alone = reference(model, [follow_up], max_new_tokens=20)[0]
    drafter = OracleDrafter([[*prompt, *first.tokens]], 0.5, model.config.vocab_size)
    batch = worker(model, 6, drafter)
    try:
        (drafted,) = run(batch, [prompt], max_new_tokens=60)
        (shared,) = run(batch, [follow_up], max_new_tokens=20)
    finally:
        batch.shutdown()
    assert drafted.tokens == first.tokens
    assert shared.tokens == alone.tokens


def test_a_sliding_window_model_stops_drafting_at_its_window(tiny_starcoder2_dir: Path) -> None:
    """StarCoder2's sliding window (512 tokens on the tiny one) is a ring buffer: past it a rejected draft would
    overwrite an entry still in the window, so drafting stops there, and the output stays exact."""
    model = load(tiny_starcoder2_dir)
    window = model.config.sliding_window
    prompt = [(i * 7) % 500 + 40 for i in range(window - 30)]
    expected = reference(model, [prompt], max_new_tokens=60)
    for acceptance in (1.0, 0.0):
        got, stats = speculating(model, [prompt], expected, acceptance, max_new_tokens=60)
        assert got[0].tokens == expected[0].tokens
        assert 0 < stats.drafted < 60


# ---- sampled rows: speculative sampling with a point-mass draft ----


def test_a_draft_is_kept_with_its_probability_and_otherwise_the_rest_is_sampled() -> None:
    """Over many seeds, a draft ``t`` at the first position is kept with probability p(t), where p is the row's
    distribution after every processor and warper; when it is not, the token emitted follows p without t,
    renormalised; so every emitted token follows p."""
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(VOCAB, generator=generator) * 1.5
    temperature, top_k = 0.8, 12
    warped = logits / temperature
    kth = warped.topk(top_k).values[-1]
    p = torch.where(warped >= kth, warped, torch.tensor(float("-inf"))).softmax(dim=-1)
    draft = int(p.argsort(descending=True)[1])  # a likely token, not the likeliest
    chunk, samples = 500, 3000
    batch = sampler(max_requests=chunk)
    kept = 0
    emitted = torch.zeros(VOCAB)
    emitted_when_rejected = torch.zeros(VOCAB)
    for first_seed in range(0, samples, chunk):  # a step of 500 requests, each with its own seed
        rows = [
            Row(f"r{seed}", make_plan([1, 2], do_sample=True, temperature=temperature, top_k=top_k, seed=seed))
            for seed in range(first_seed, first_seed + chunk)
        ]
        for row in rows:
            row.state.generated_tokens.append(3)
        batch.step_drafts = lambda rows=rows: {row.state.request_id: [draft, 5] for row in rows}
        args = batch.prepare_tensor_args([row.request for row in rows])
        # The usual rows (position 2) first, then each request's positions 0 and 1: the draft is checked against
        # position 0's logits.
        scores = torch.cat([torch.zeros(chunk, VOCAB), torch.stack([logits, torch.zeros(VOCAB)]).repeat(chunk, 1)])
        picks = batch(scores, args).argmax(dim=-1).tolist()  # the manager's argmax of every row
        accepted = batch.verify(picks)
        for index, row in enumerate(rows):
            first = draft if accepted[row.state.request_id] >= 1 else picks[chunk + 2 * index]
            kept += accepted[row.state.request_id] >= 1
            emitted[first] += 1
            if accepted[row.state.request_id] == 0:
                emitted_when_rejected[first] += 1
            batch.release(row.state.request_id)
    rate = kept / samples
    sigma = math.sqrt(float(p[draft]) * (1 - float(p[draft])) / samples)
    assert abs(rate - float(p[draft])) < 4 * sigma, (rate, float(p[draft]))
    assert chi_square(emitted, p * samples) < critical(int((p > 0).sum()) - 1)
    rest = p.clone()
    rest[draft] = 0.0
    rest /= rest.sum()
    rejected = emitted_when_rejected.sum()
    assert emitted_when_rejected[draft] == 0
    assert chi_square(emitted_when_rejected, rest * rejected) < critical(int((rest > 0).sum()) - 1)


def chi_square(counts: torch.Tensor, expected: torch.Tensor) -> float:
    mask = expected > 0
    assert float(counts[~mask].sum()) == 0.0, "a token of probability 0 was emitted"
    return float(((counts[mask] - expected[mask]) ** 2 / expected[mask]).sum())


def critical(degrees: int) -> float:
    """The chi-square statistic's 0.999 quantile (Wilson-Hilferty): a false failure once in a thousand runs at most
    (the seeds are fixed, so a run is deterministic)."""
    z = 3.09
    return degrees * (1 - 2 / (9 * degrees) + z * math.sqrt(2 / (9 * degrees))) ** 3


def test_a_full_cache_serves_everyone_the_same_tokens(model: Any) -> None:
    """With a cache too small for every request and its drafts (10 pages of 16 tokens for three requests of about
    50 tokens), requests are starved, offloaded and restored; each still gets the tokens it gets alone."""
    prompts = [[*prompt, *prompt] for prompt in PROMPTS]
    alone = [reference(model, [prompt], max_new_tokens=40)[0] for prompt in prompts]
    drafter = OracleDrafter([[*p, *o.tokens] for p, o in zip(prompts, alone)], 0.5, model.config.vocab_size)
    batch = worker(model, 6, drafter, kv_num_blocks=10)
    try:
        got = run(batch, prompts, max_new_tokens=40)
    finally:
        batch.shutdown()
    assert [outcome.tokens for outcome in got] == [outcome.tokens for outcome in alone]


# ---- the embedded code model, with the real drafter, through the engine ----

EDIT_PROMPT = '''def merge_intervals(intervals):
    """Merge overlapping intervals."""
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


# The same function, rewritten:
def merge_intervals(intervals):
'''


@pytest.fixture(scope="module")
def code_engines() -> Iterator[dict[int, Engine]]:
    """The embedded code model (make serve's default) with speculation on (8 tokens) and off."""
    engines = {k: Engine.load(tiny_settings(CODE_MODEL_DIR, speculative_tokens=k), DATA_DIR) for k in (8, 0)}
    yield engines
    for engine in engines.values():
        engine.shutdown()


def streamed(engine: Engine, prompt: str, **params: Any) -> tuple[list[str], Completion]:
    plan = engine.plan(engine.tokenize(prompt), SamplingParams(**{"max_new_tokens": 96, **params}))[0]
    finished: list[Completion] = []

    async def collect() -> list[str]:
        return [delta.text async for delta in engine.stream(plan, finished.append)]

    deltas = asyncio.run(collect())
    return deltas, finished[0]


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"stop": ()},  # a stop sequence taken from the middle of the greedy text
        {"logprobs": 2, "repetition_penalty": 1.1},
        {"do_sample": True, "seed": 4, "temperature": 0.7, "top_p": 0.9},
    ],
    ids=["greedy", "stop", "logprobs-penalty", "seeded"],
)
def test_the_code_model_drafts_from_its_prompt_and_says_the_same(code_engines: dict[int, Engine], params: Any) -> None:
    """The real drafter on an edit (the embedded code model repeats what it was shown, and its own loops): drafts
    are kept, and the text, finish reason, token count and logprobs are the ones without speculation."""
    if "stop" in params:
        _, whole = streamed(code_engines[0], EDIT_PROMPT)
        params = {"stop": (whole.text[len(whole.text) // 2 :][:4],)}
    before = code_engines[8].speculation
    on_deltas, on = streamed(code_engines[8], EDIT_PROMPT, **params)
    _, off = streamed(code_engines[0], EDIT_PROMPT, **params)
    after = code_engines[8].speculation
    assert (on.text, on.finish_reason, on.completion_tokens) == (off.text, off.finish_reason, off.completion_tokens)
    assert [entry.token_id for entry in on.token_logprobs] == [entry.token_id for entry in off.token_logprobs]
    assert all(math.isclose(a.logprob, b.logprob, abs_tol=1e-4) for a, b in zip(on.token_logprobs, off.token_logprobs))
    assert "".join(on_deltas) == on.text
    assert after.accepted > before.accepted, "the code model's edit kept no draft"
    if "stop" in params:
        assert on.finish_reason is FinishReason.STOP and params["stop"][0] not in on.text
