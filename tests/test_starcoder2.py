"""StarCoder2's architecture end to end, on the tiny starcoder2 checkpoint (no download): grouped-query
attention, RoPE, a 16,384-token context and a sliding window (512 tokens in the tiny model, so prompts of a
few hundred tokens already cross it), and generation that ends at ``<file_sep>``."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from starcoder_serving.engine.engine import Engine
from starcoder_serving.engine.sampling_params import SamplingParams
from starcoder_serving.errors import InvalidRequest
from transformers import AutoModelForCausalLM, AutoTokenizer

from devtools.tiny_model import STARCODER2_POSITIONS, STARCODER2_SLIDING_WINDOW
from devtools.truss_local import RunningServer
from tests.conftest import DATA_DIR, tiny_settings

PREDICT = "/v1/models/model:predict"
# Short and long prompts; most cross the sliding window, with or without their completion.
PROMPTS = (
    "def compute_fib(n):",
    "import os\n",
    "class Stack:\n" * 40,
    "for i in range(10):\n" * 120,
    "x = 1\n" * 300,
    "héllo wörld " * 150,
    "SELECT name FROM users;\n" * 60,
    "fn main() {}\n" * 100,
)


@pytest.fixture(scope="module")
def batched(tiny_starcoder2_dir: Path) -> Iterator[Engine]:
    engine = Engine.load(tiny_settings(tiny_starcoder2_dir), DATA_DIR)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def solo(tiny_starcoder2_dir: Path) -> Iterator[Engine]:
    engine = Engine.load(tiny_settings(tiny_starcoder2_dir, continuous_batching=False), DATA_DIR)
    yield engine
    engine.shutdown()


def prompt_of(engine: Engine, tokens: int) -> str:
    """A prompt of exactly ``tokens`` tokens (each "x = 1\\n" is 4 of the tiny tokenizer's tokens)."""
    text = "x = 1\n" * (tokens // 4 + 1)
    ids = engine.tokenize(text)[:tokens]
    prompt = engine.tokenizer.decode(ids)
    assert len(engine.tokenize(prompt)) == tokens
    return prompt


@functools.cache  # the engine test and the server test both ask for the 8 prompts' answers
def greedy_reference(model_dir: Path, prompt: str, max_new_tokens: int) -> tuple[int, ...]:
    """transformers' own generate() on the checkpoint, ending at StarCoder2's end tokens."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    end = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<file_sep>")]
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end, pad_token_id=0)
    return tuple(out[0, ids.shape[1] :].tolist())


# ---- the profile is read from the checkpoint ----


def test_profile_reads_starcoder2_facts_from_the_checkpoint(batched: Engine) -> None:
    profile = batched.profile
    assert profile.shape.model_type == "starcoder2"
    assert batched.context_window == STARCODER2_POSITIONS == 16384  # not StarCoder's 8192
    assert profile.shape.attention == "grouped-query"
    assert (profile.shape.num_query_heads, profile.shape.num_kv_heads) == (4, 2)
    assert profile.shape.sliding_window == STARCODER2_SLIDING_WINDOW
    file_sep = batched.tokenizer.convert_tokens_to_ids("<file_sep>")
    assert file_sep == 6  # StarCoder2's id
    assert batched.eos_token_ids == {0, file_sep}
    assert profile.fim is not None


def test_profile_reads_starcoder_facts_from_the_checkpoint(engine: Engine) -> None:
    profile = engine.profile
    assert (profile.shape.model_type, engine.context_window) == ("gpt_bigcode", 8192)
    assert profile.shape.attention == "multi-query" and profile.shape.sliding_window is None
    assert engine.eos_token_ids == {0}  # StarCoder's vocabulary has no <file_sep>


def test_a_smaller_context_window_setting_caps_the_checkpoints(tiny_starcoder2_dir: Path) -> None:
    engine = Engine.load(tiny_settings(tiny_starcoder2_dir, context_window=4096, continuous_batching=False), DATA_DIR)
    try:
        assert engine.context_window == 4096
        with pytest.raises(InvalidRequest, match="4096-token context window"):
            engine.plan(engine.tokenize(prompt_of(engine, 4000)), SamplingParams(max_new_tokens=200))
    finally:
        engine.shutdown()


@pytest.mark.parametrize("model_dir_fixture", ["tiny_model_dir", "tiny_starcoder2_dir"])
def test_kv_bytes_per_token_match_the_cache_transformers_allocates(
    model_dir_fixture: str, request: pytest.FixtureRequest
) -> None:
    """The arithmetic that sizes every variant's cache, checked against a real forward pass's cache."""
    from starcoder_serving.family.shape import ModelShape

    model_dir: Path = request.getfixturevalue(model_dir_fixture)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens = 64  # inside the sliding window: the cache then holds every token
    with torch.no_grad():
        cache = model(torch.arange(1, tokens + 1)[None], use_cache=True).past_key_values
    allocated = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert ModelShape.from_config(model.config).kv_bytes_per_token(dtype_bytes=4) * tokens == allocated


# ---- the engine ----


def test_a_prompt_longer_than_8192_tokens_is_served_within_16384(batched: Engine, solo: Engine) -> None:
    prompt = prompt_of(batched, 9000)
    for engine in (batched, solo):
        plan = engine.plan(engine.tokenize(prompt), SamplingParams(max_new_tokens=16))[0]
        assert asyncio.run(engine.complete(plan)).completion_tokens >= 1
    # The limit is StarCoder2's window, with its numbers.
    with pytest.raises(InvalidRequest, match=r"16384-token context window.*max_new_tokens <= 384"):
        batched.plan(batched.tokenize(prompt_of(batched, 16000)), SamplingParams(max_new_tokens=500))


def test_fill_in_the_middle_uses_the_vocabularys_fim_tokens(batched: Engine) -> None:
    assert batched.profile.fim is not None
    rendered = batched.profile.fim.render("def f(x):\n    ", "\n    return y\n")
    ids = batched.tokenize(rendered.text)
    fim_ids = [batched.tokenizer.convert_tokens_to_ids(t) for t in ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")]
    assert fim_ids == [1, 3, 2]  # StarCoder2's ids
    assert ids[0] == fim_ids[0] and fim_ids[1] in ids and ids[-1] == fim_ids[2]
    completion = asyncio.run(batched.complete(batched.plan(ids, SamplingParams(max_new_tokens=16))[0]))
    assert completion.completion_tokens >= 1


def test_generation_ends_at_file_sep_on_both_paths(tiny_starcoder2_dir: Path, batched: Engine, solo: Engine) -> None:
    file_sep = batched.tokenizer.convert_tokens_to_ids("<file_sep>")
    ended = 0
    for prompt in PROMPTS:
        reference = greedy_reference(tiny_starcoder2_dir, prompt, 64)
        for engine in (batched, solo):
            result = asyncio.run(
                engine.complete(engine.plan(engine.tokenize(prompt), SamplingParams(max_new_tokens=64))[0])
            )
            assert "<file_sep>" not in result.text
            if reference[-1] == file_sep:
                assert result.finish_reason.value == "eos"
                assert result.completion_tokens == len(reference)
            else:
                assert result.completion_tokens == 64
        ended += reference[-1] == file_sep
    assert ended >= 2, "the tiny model no longer ends files with <file_sep>: its recipe changed"


def test_batch_with_sliding_window_equals_generate_for_8_concurrent_requests(batched: Engine, solo: Engine) -> None:
    """8 requests share the batch's paged, sliding-window cache; each gets generate()'s greedy answer."""
    crossing = 0

    async def run_all(engine: Engine) -> list[Any]:
        plans = [engine.plan(engine.tokenize(p), SamplingParams(max_new_tokens=96))[0] for p in PROMPTS]
        return list(await asyncio.gather(*(engine.complete(plan) for plan in plans)))

    together, alone = asyncio.run(run_all(batched)), asyncio.run(run_all(solo))
    for prompt, mixed, reference in zip(PROMPTS, together, alone, strict=True):
        assert (mixed.text, mixed.finish_reason) == (reference.text, reference.finish_reason), prompt[:40]
        crossing += len(batched.tokenize(prompt)) + mixed.completion_tokens > STARCODER2_SLIDING_WINDOW
    assert crossing >= 4, "too few sequences cross the sliding window to test it"


# ---- the real server ----


def test_server_serves_a_long_prompt_and_names_starcoder2s_window(
    starcoder2_server: RunningServer, batched: Engine
) -> None:
    with httpx.Client(base_url=starcoder2_server.base_url, timeout=120) as client:
        answer = client.post(PREDICT, json={"prompt": prompt_of(batched, 9000), "max_new_tokens": 8})
        assert answer.status_code == 200, answer.text
        assert answer.json()["data"]["prompt_tokens"] == 9000
        refused = client.post(PREDICT, json={"prompt": prompt_of(batched, 16380), "max_new_tokens": 8})
        assert refused.status_code == 400
        assert "16384-token context window" in refused.json()["message"]


def test_server_fim_and_file_sep_end(starcoder2_server: RunningServer, tiny_starcoder2_dir: Path) -> None:
    with httpx.Client(base_url=starcoder2_server.base_url, timeout=120) as client:
        fim = client.post(
            PREDICT, json={"prefix": "def f(x):\n    ", "suffix": "\n    return y\n", "max_new_tokens": 8}
        )
        assert fim.status_code == 200, fim.text
        assert fim.json()["data"]["prompt"].startswith("<fim_prefix>def f(x):")
        # A prompt whose greedy completion ends with <file_sep> (found with transformers itself).
        prompt = next(p for p in PROMPTS if greedy_reference(tiny_starcoder2_dir, p, 64)[-1] == 6)
        data = client.post(PREDICT, json={"prompt": prompt, "max_new_tokens": 64}).json()["data"]
        assert data["finish_reason"] == "eos" and "<file_sep>" not in data["completion"]
    completion = openai.OpenAI(base_url=starcoder2_server.base_url + "/v1", api_key="unused").completions.create(
        model="tiny-starcoder2", prompt="def f(x):\n    ", suffix="\n    return y\n", max_tokens=8
    )
    assert completion.choices[0].finish_reason in {"stop", "length"}
