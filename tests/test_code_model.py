"""The committed code model (devtools/code_model/, what `make serve` serves by default) is what
devtools/code_model.py says it is: StarCoder's architecture, window and special tokens, small, and trained: it
continues Python, and copies from its prompt (what n-gram drafting bets on). No server: transformers loads it."""

from __future__ import annotations

import keyword
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from devtools.tiny_model import STARCODER_SPECIAL_TOKENS
from devtools.truss_local import CODE_MODEL_DIR

# Python's keywords, and the names the standard library uses most.
PYTHON_WORDS = frozenset(keyword.kwlist) | {"self", "cls", "len", "str", "int", "isinstance", "name", "value"}


def python_words(text: str) -> list[str]:
    return [word for word in re.findall(r"[A-Za-z_][A-Za-z_0-9]*", text) if word in PYTHON_WORDS]


def looks_like_python(completion: str) -> bool:
    """Whole UTF-8 characters, lines indented by 4s, and Python's own words."""
    lines = [line for line in completion.splitlines() if line.strip()]
    indents_by_four = all((len(line) - len(line.lstrip(" "))) % 4 == 0 for line in lines[:-1])  # last: may be cut
    return "\ufffd" not in completion and indents_by_four and len(python_words(completion)) >= 2


@pytest.fixture(scope="module")
def tokenizer():  # -> PreTrainedTokenizerFast
    return AutoTokenizer.from_pretrained(CODE_MODEL_DIR)


@pytest.fixture(scope="module")
def model():  # -> GPTBigCodeForCausalLM, as the server loads it on the CPU
    return AutoModelForCausalLM.from_pretrained(CODE_MODEL_DIR, dtype=torch.float32).eval()


def greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])


def test_the_checkpoint_is_small_and_complete() -> None:
    files = {path.name: path.stat().st_size for path in CODE_MODEL_DIR.iterdir()}
    expected = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert expected <= files.keys()
    assert sum(files.values()) < 8_000_000


def test_it_has_starcoders_architecture_and_window(model) -> None:
    config = model.config
    assert config.model_type == "gpt_bigcode"
    assert config.multi_query
    assert config.n_positions == 8192
    assert not config.tie_word_embeddings
    assert (config.bos_token_id, config.eos_token_id) == (0, 0)
    generation = GenerationConfig.from_pretrained(CODE_MODEL_DIR)
    assert (generation.eos_token_id, generation.pad_token_id) == (0, 0)


def test_special_tokens_sit_at_starcoders_ids(tokenizer) -> None:
    for token_id, token in enumerate(STARCODER_SPECIAL_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == token_id, token
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|endoftext|>", 0)
    ids = tokenizer("<fim_prefix>def f():<fim_suffix>\n<fim_middle>")["input_ids"]
    assert ids[0] == 1 and 3 in ids and ids[-1] == 2
    assert tokenizer.model_max_length == 8192


def test_a_greedy_completion_is_python(model, tokenizer) -> None:
    completion = greedy(model, tokenizer, "def compute_fib(n):", 32)
    assert looks_like_python(completion), repr(completion)


def test_a_greedy_completion_uses_a_name_the_prompt_defined(model, tokenizer) -> None:
    prompt = "class Counter:\n    def __init__(self, widget_count):\n        self.widget_count = widget_count\n\n"
    completion = greedy(model, tokenizer, prompt + "    def increment(self):", 24)
    assert "widget_count" in completion, repr(completion)


def test_it_copies_a_block_the_prompt_repeats(model, tokenizer) -> None:
    """Typing a block the prompt already holds, the next tokens come from it: what prompt-lookup drafting proposes.
    From six points in the block, greedy decoding goes on as the block was first written for 6.2 tokens of 12 on
    average (the random-weight tiny model: 0); under 3, it does not copy."""
    block = (
        "class Inventory:\n"
        "    def __init__(self, owner, capacity):\n"
        "        self.owner = owner\n"
        "        self.capacity = capacity\n"
        "        self.items = []\n"
        "\n"
        "    def add(self, item):\n"
        "        if len(self.items) >= self.capacity:\n"
        "            raise OverflowError(self.owner)\n"
        "        self.items.append(item)\n"
    )
    ids = tokenizer(block)["input_ids"]
    runs = []
    for cut in range(6, len(ids) - 12, 14):
        prompt = block + "\n\n" + tokenizer.decode(ids[:cut])
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1] :]
        expected = ids[cut : cut + 12]
        runs.append(next((i for i, (a, b) in enumerate(zip(expected, output.tolist())) if a != b), len(expected)))
    assert len(runs) == 6 and sum(runs) / len(runs) >= 3, runs
