"""The engine on the tiny StarCoder-shaped model: what the client asks for is what generate() does."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from starcoder_serving.engine.engine import Completion, Engine
from starcoder_serving.engine.generate_worker import AdditivePenalties
from starcoder_serving.engine.jobs import GenerationPlan
from starcoder_serving.engine.request import GenerationRequest, TextPrompt
from starcoder_serving.engine.sampling_params import SamplingParams
from starcoder_serving.errors import InvalidRequest, Overloaded
from starcoder_serving.events import FinishReason
from starcoder_serving.text.prompts import ChatRenderer
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import DATA_DIR, tiny_settings

PROMPTS = ["def compute_fib(n):", "import os\n", "hello", "class A:", "x = 1", "SELECT", "fn main", "// comment"]


def run(
    engine: Engine, prompt: str, stop: tuple[str, ...] = (), seed: int | None = None, **parameters: Any
) -> Completion:
    return asyncio.run(engine.complete(plan_one(engine, engine.tokenize(prompt), stop=stop, seed=seed, **parameters)))


def plan_one(engine: Engine, prompt_ids: list[int], **parameters: Any) -> GenerationPlan:
    return engine.plan(prompt_ids, SamplingParams.model_validate(parameters))[0]


def direct_generate(engine: Engine, prompt: str, **kwargs: Any) -> list[int]:
    """Plain transformers, as the seed Truss called it: the reference our engine must match."""
    ids = torch.tensor([engine.tokenize(prompt)])
    with torch.inference_mode():
        out = engine.model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, **kwargs)
    return out[0, ids.shape[1] :].tolist()


def test_greedy_is_deterministic_and_matches_plain_generate(engine: Engine) -> None:
    for prompt in PROMPTS[:4]:
        first, second = run(engine, prompt, max_new_tokens=24), run(engine, prompt, max_new_tokens=24)
        assert first == second
        reference = direct_generate(engine, prompt, max_new_tokens=24, do_sample=False)
        assert first.text == engine.tokenizer.decode(reference, skip_special_tokens=True)
        assert first.completion_tokens == len(reference)


def test_max_new_tokens_is_honoured(engine: Engine) -> None:
    for n in (1, 5, 17):
        result = run(engine, "import os\n", max_new_tokens=n, min_new_tokens=n)
        assert (result.completion_tokens, result.finish_reason) == (n, FinishReason.LENGTH)


def test_generation_stops_at_endoftext(engine: Engine) -> None:
    # Pick, with plain generate(), the prompts whose greedy continuation reaches token 0.
    ending = [p for p in PROMPTS if 0 in direct_generate(engine, p, max_new_tokens=100, do_sample=False)]
    assert ending, "the tiny model is built so that some greedy completions end with <|endoftext|>"
    for prompt in ending:
        reference = direct_generate(engine, prompt, max_new_tokens=100, do_sample=False)
        result = run(engine, prompt, max_new_tokens=100)
        assert result.finish_reason == FinishReason.EOS
        assert result.completion_tokens == reference.index(0) + 1 < 100
        assert "<|endoftext|>" not in result.text


def test_min_new_tokens_and_suppress_tokens_reach_generate(engine: Engine) -> None:
    prompt = next(p for p in PROMPTS if 0 in direct_generate(engine, p, max_new_tokens=100, do_sample=False))
    assert run(engine, prompt, max_new_tokens=100, suppress_tokens=[0]).finish_reason == FinishReason.LENGTH
    assert run(engine, prompt, max_new_tokens=100, min_new_tokens=100).completion_tokens == 100


@pytest.mark.parametrize(
    "kwargs",
    [
        {"no_repeat_ngram_size": 1},
        {"repetition_penalty": 1.8},
        {"num_beams": 3},
        {"do_sample": True, "top_k": 5, "temperature": 0.9},
    ],
)
def test_request_kwargs_really_reach_generate(engine: Engine, kwargs: dict[str, Any]) -> None:
    length = {"max_new_tokens": 20, "min_new_tokens": 20}
    seed = 7 if kwargs.get("do_sample") else None
    changed = 0
    for prompt in PROMPTS[:5]:
        result = run(engine, prompt, seed=seed, **length, **kwargs)
        if seed is None:
            reference = direct_generate(engine, prompt, **length, **kwargs)
            assert result.text == engine.tokenizer.decode(reference, skip_special_tokens=True)
        else:
            # A seeded sample in the batch uses its own noise, not torch's RNG: it need not equal generate()'s
            # sample, but it is reproducible (test_batch_equivalence.py checks it under load).
            assert result.text == run(engine, prompt, seed=seed, **length, **kwargs).text
        changed += result.text != run(engine, prompt, **length).text
    assert changed, f"{kwargs} never changed the output: it was dropped on the way to generate()"


def test_same_seed_same_sample_different_seed_different_sample(engine: Engine) -> None:
    sample = {"do_sample": True, "temperature": 1.0, "max_new_tokens": 16, "min_new_tokens": 16}
    a, b = run(engine, "x = 1", seed=3, **sample), run(engine, "x = 1", seed=3, **sample)
    c = run(engine, "x = 1", seed=4, **sample)
    assert a.text == b.text and a.text != c.text


def test_concurrent_seeded_requests_do_not_disturb_each_other(engine: Engine) -> None:
    sample = {"do_sample": True, "temperature": 1.0, "max_new_tokens": 12, "min_new_tokens": 12}
    alone = {seed: run(engine, "x = 1", seed=seed, **sample).text for seed in range(6)}

    async def together() -> list[Completion]:
        plans = [plan_one(engine, engine.tokenize("x = 1"), seed=seed, **sample) for seed in range(6)]
        return list(await asyncio.gather(*(engine.complete(p) for p in plans)))

    assert [c.text for c in asyncio.run(together())] == [alone[seed] for seed in range(6)]


def test_stop_sequence_ends_generation_and_is_excluded(engine: Engine) -> None:
    full = run(engine, "fn main", max_new_tokens=40, min_new_tokens=40).text
    stop = full[10:13]
    result = run(engine, "fn main", stop=(stop,), max_new_tokens=40, min_new_tokens=40)
    assert result.finish_reason == FinishReason.STOP
    assert result.text == full[: full.find(stop)]
    assert result.completion_tokens < 40


def test_context_window_and_cap_are_enforced_with_numbers(engine: Engine) -> None:
    long_prompt = engine.tokenize("x = 1\n" * 3000)
    assert len(long_prompt) > engine.context_window
    with pytest.raises(InvalidRequest, match=rf"{len(long_prompt)} tokens.*8192-token context window"):
        plan_one(engine, long_prompt)
    near_full = long_prompt[:8000]
    with pytest.raises(InvalidRequest, match=r"8000 tokens and 500 new tokens.*8500 > the 8192.*<= 192"):
        plan_one(engine, near_full, max_new_tokens=500)
    assert plan_one(engine, near_full).max_new_tokens == 192  # the default shrinks to fit the window
    with pytest.raises(InvalidRequest, match="cap of 2048"):
        plan_one(engine, [1, 2, 3], max_new_tokens=4096)
    with pytest.raises(InvalidRequest, match=r"max_length.*\(2\).*3 tokens"):
        plan_one(engine, [5, 6, 7], max_length=2)
    assert plan_one(engine, [5, 6, 7], max_length=10).max_new_tokens == 7
    with pytest.raises(InvalidRequest, match=r"bad_words_ids.*outside the vocabulary"):
        plan_one(engine, [5], bad_words_ids=[[10**6]])
    with pytest.raises(InvalidRequest, match="do_sample"):
        plan_one(engine, [5], temperature=0.5)


def test_a_fault_while_generating_is_reported_and_the_next_request_succeeds(engine: Engine) -> None:
    original = engine.model.generate

    def out_of_memory(*args: Any, **kwargs: Any) -> Any:
        engine.model.generate = original  # fail once, as a transient OOM would
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    # Beam search is served by plain generate() (the batched path's faults: test_batching.py).
    generate_path = {"max_new_tokens": 4, "min_new_tokens": 4, "num_beams": 2}
    engine.model.generate = out_of_memory
    try:
        with pytest.raises(Overloaded, match="ran out of memory"):
            run(engine, "hello", **generate_path)
    finally:
        engine.model.generate = original
    assert run(engine, "hello", **generate_path).completion_tokens == 4
    assert engine.requests_in_progress == 0


def test_closing_a_stream_cancels_the_generation(engine: Engine) -> None:
    async def read_two_then_leave() -> None:
        plan = plan_one(engine, engine.tokenize("import os\n"), max_new_tokens=2000, min_new_tokens=2000)
        stream = engine.stream(plan)
        seen = 0
        async for delta in stream:
            seen += len(delta.text) > 0
            if seen == 2:
                break
        await stream.aclose()  # what the HTTP layer does when the client disconnects

    asyncio.run(read_two_then_leave())
    assert engine.requests_in_progress == 0
    # The worker is free again: a short request completes (it would queue behind 2000 tokens otherwise).
    assert run(engine, "hello", max_new_tokens=3).completion_tokens == 3


@pytest.fixture(scope="module")
def starcoder2_like_engine(tiny_model_dir: Path) -> Iterator[Engine]:
    """The tiny model with StarCoder2's <file_sep> added, and made likely to be generated."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<file_sep>"]}, replace_extra_special_tokens=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    file_sep = tokenizer.convert_tokens_to_ids("<file_sep>")
    with torch.no_grad():
        # <file_sep>'s logit: 1.5x that of token 68, which greedy picks now and then: so it wins there.
        model.lm_head.weight[file_sep] = 1.5 * model.lm_head.weight[68]
    engine = Engine(model, tokenizer, tiny_settings(tiny_model_dir), DATA_DIR)
    yield engine
    engine.shutdown()


@pytest.mark.parametrize("path_kwargs", [{}, {"no_repeat_ngram_size": 8}], ids=["batched", "generate"])
def test_generation_stops_at_starcoder2_file_separator(
    starcoder2_like_engine: Engine, path_kwargs: dict[str, Any]
) -> None:
    engine = starcoder2_like_engine
    file_sep = engine.tokenizer.convert_tokens_to_ids("<file_sep>")
    assert file_sep in engine.eos_token_ids
    stopped = []
    for prompt in PROMPTS:
        reference = direct_generate(engine, prompt, max_new_tokens=60, do_sample=False, eos_token_id=[])
        if file_sep in reference:
            result = run(engine, prompt, max_new_tokens=60, **path_kwargs)
            assert result.finish_reason == FinishReason.EOS
            assert result.completion_tokens <= reference.index(file_sep) + 1
            assert "<file_sep>" not in result.text
            stopped.append(prompt)
    assert stopped, "no prompt generated <file_sep>: the fixture no longer makes it likely"


def test_additive_penalties_follow_openai_arithmetic() -> None:
    # Prompt [7, 8], then generated [3, 3, 5]: token 3 was generated twice, 5 once; prompt tokens don't count.
    input_ids = torch.tensor([[7, 8, 3, 3, 5]])
    scores = torch.zeros((1, 10))
    penalized = AdditivePenalties(prompt_length=2, presence=0.5, frequency=0.25)(input_ids, scores)
    expected = torch.zeros((1, 10))
    expected[0, 3] = -(0.5 + 2 * 0.25)
    expected[0, 5] = -(0.5 + 1 * 0.25)
    assert torch.equal(penalized, expected)


def test_penalized_requests_run_in_the_batch_and_change_the_output(engine: Engine) -> None:
    plan = plan_one(engine, engine.tokenize("x = 1"), max_new_tokens=30, frequency_penalty=2.0)
    assert engine.route(plan).path.value == "batched"
    penalized = asyncio.run(engine.complete(plan))
    plain = run(engine, "x = 1", max_new_tokens=30)
    assert penalized.text != plain.text


def test_a_chat_template_that_refuses_the_conversation_is_a_client_error(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # As many chat models' templates do: insist on alternating roles.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    renderer = ChatRenderer(tokenizer, default_template="unused", default_stop=("\nHuman:",))
    assert renderer.render([{"role": "user", "content": "hi"}]).text == "hi"
    with pytest.raises(InvalidRequest, match="roles must alternate"):
        renderer.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_when_one_of_several_plans_fails_the_others_are_stopped(engine: Engine) -> None:
    original = engine.model.generate

    def out_of_memory(*args: Any, **kwargs: Any) -> Any:
        engine.model.generate = original
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    # Beam search is served one at a time by generate(): the first fails, the others must not run on for nobody.
    plans = [
        plan_one(engine, engine.tokenize(p), max_new_tokens=500, min_new_tokens=500, num_beams=2) for p in PROMPTS[:3]
    ]
    engine.model.generate = out_of_memory
    try:
        with pytest.raises(Overloaded):
            asyncio.run(engine.complete_all(plans))
    finally:
        engine.model.generate = original
    assert engine.requests_in_progress == 0
    assert run(engine, "hello", max_new_tokens=3, no_repeat_ngram_size=9).completion_tokens == 3


@pytest.mark.parametrize(
    "extreme",
    [
        {"do_sample": True, "repetition_penalty": 1e-300},
        {"repetition_penalty": 1e300},
        {"do_sample": True, "temperature": 1e-46},
        {"exponential_decay_length_penalty": (0, 1e300)},
    ],
)
def test_extreme_values_are_served_on_the_beam_search_path_too(engine: Engine, extreme: dict[str, Any]) -> None:
    """Beam search runs through generate(): its rows are cleaned like the batch's, so valid values never fail."""
    plan = plan_one(engine, engine.tokenize("def f():"), max_new_tokens=8, num_beams=2, **extreme)
    assert engine.route(plan).path.value == "generate"
    result = asyncio.run(engine.complete(plan))
    assert 1 <= result.completion_tokens <= 8


def test_a_non_streamed_request_gets_the_streamed_text_in_one_piece(engine: Engine) -> None:
    """``complete`` runs quiet (no stop sequences): the batch sends its tokens in one event at the end."""
    prompt_ids = engine.tokenize("def compute_fib(n):")

    async def both() -> tuple[Completion, Completion, str, list[str]]:
        plan = plan_one(engine, prompt_ids, max_new_tokens=24)
        streamed: list[Completion] = []
        pieces = [delta.text async for delta in engine.stream(plan, on_complete=streamed.append)]
        quiet_pieces = [delta.text async for delta in engine.stream(plan, quiet=True)]
        return await engine.complete(plan), streamed[0], "".join(pieces), quiet_pieces

    quiet, streamed, joined, quiet_pieces = asyncio.run(both())
    assert len(quiet_pieces) == 1, quiet_pieces  # one event, one delta
    assert quiet == streamed and quiet.text == joined == quiet_pieces[0]
    assert quiet.completion_tokens == 24


def test_a_quiet_request_past_its_max_time_keeps_what_it_generated(engine: Engine) -> None:
    completion = run(engine, "import os\n", max_new_tokens=2000, min_new_tokens=2000, max_time=0.3)
    assert completion.finish_reason is FinishReason.LENGTH
    assert 0 < completion.completion_tokens < 2000 and completion.text


def test_a_stream_whose_client_left_ends_without_a_completion(engine: Engine) -> None:
    """``client_gone`` is polled by one watcher per stream: the generation is cancelled and the stream ends,
    even between two tokens."""
    gone = asyncio.Event()

    async def client_gone() -> bool:
        return gone.is_set()

    async def leave_mid_stream() -> tuple[int, list[Completion]]:
        plan = plan_one(engine, engine.tokenize("import os\n"), max_new_tokens=2000, min_new_tokens=2000)
        finished: list[Completion] = []
        seen = 0
        async for _delta in engine.stream(plan, on_complete=finished.append, client_gone=client_gone):
            seen += 1
            if seen == 3:
                gone.set()
        return seen, finished

    seen, finished = asyncio.run(leave_mid_stream())
    assert finished == [] and seen < 2000
    assert engine.requests_in_progress == 0
    assert run(engine, "hello", max_new_tokens=3).completion_tokens == 3


def test_prompts_tokenize_on_many_threads_at_once(engine: Engine) -> None:
    """Small requests are planned on the event loop while long ones are planned in threads: every thread
    encodes with its own tokenizer, so none waits for another and none trips the Rust tokenizer's borrow check."""
    import concurrent.futures

    texts = [("def f(x):\n    return x\n" * (1 + 40 * (i % 3))) + str(i) for i in range(24)]
    expected = [list(engine.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        got = list(pool.map(engine.tokenize, texts * 4))
    assert got == expected * 4


def test_a_long_prompt_is_refused_after_tokenizing_about_one_window(engine: Engine) -> None:
    """The validation stage counts a text far longer than the window piece by piece and stops past the window."""
    tokenized: list[int] = []

    def counting(text: str) -> list[int]:
        tokenized.append(len(text))
        return engine.tokenize(text)

    validator = copy.copy(engine.validator)
    validator._tokenize = counting
    huge = "x = 1\n" * 200_000
    with pytest.raises(InvalidRequest, match="over 8192 tokens"):
        validator.validate(GenerationRequest((TextPrompt(huge),), SamplingParams()))
    assert sum(tokenized) <= 2 * 4 * engine.context_window < len(huge) / 10
    # A long text that fits (5 characters a token here) is counted, then tokenized whole, to the same ids.
    validator.context_window = 64
    fits = "héllo" * 60
    tokenized.clear()
    valid = validator.validate(GenerationRequest((TextPrompt(fits),), SamplingParams(max_new_tokens=2)))
    assert valid.prompts[0].prompt_ids == engine.tokenize(fits) and len(tokenized) == 3  # two pieces, then whole
