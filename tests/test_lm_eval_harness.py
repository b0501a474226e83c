"""EleutherAI's lm-evaluation-harness, unchanged, against the real server's ``/v1/completions``.

Its ``local-completions`` model is how users evaluate an OpenAI-style endpoint: loglikelihood tasks send
token-id prompts with ``echo``, ``logprobs=1`` and ``max_tokens=1`` and read the prompt's logprobs back;
generation tasks send ``stop`` and ``seed``. Two small local tasks (no dataset download) exercise both,
several prompts per HTTP request. The numbers the harness computes from our responses are checked against
the tiny model itself, run directly with transformers: the same log-likelihoods and the same greedy texts.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import RunningServer

# The tasks read local JSON lines; nothing is fetched (datasets reads this when it is first imported).
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

MULTIPLE_CHOICE = [
    {"question": "def add(a, b):\n    return", "choices": [" a + b", " a - b", " None"], "answer": 0},
    {"question": "import", "choices": [" os", " sys", " numpy as np"], "answer": 1},
    {"question": "for i in range(10):\n   ", "choices": [" print(i)", " pass"], "answer": 0},
    {"question": "class Stack:", "choices": ["\n    pass", "\n    def __init__(self):"], "answer": 1},
]
GENERATION = [{"prompt": "def compute_fib(n):", "target": "x"}, {"prompt": "SELECT name", "target": "y"}]
UNTIL = ["\n\n", "def "]
MAX_GEN_TOKS = 12


def write_tasks(directory: Path) -> None:
    """Two task configs in the harness's own YAML, reading JSON lines from this folder."""
    for name, rows in (("mc", MULTIPLE_CHOICE), ("gen", GENERATION)):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = "dataset_path: json\ntest_split: test\n"
    (directory / "mc.yaml").write_text(
        f"task: starcoder_tiny_mc\n{common}"
        f"dataset_kwargs:\n  data_files:\n    test: {directory / 'mc.jsonl'}\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    (directory / "gen.yaml").write_text(
        f"task: starcoder_tiny_gen\n{common}"
        f"dataset_kwargs:\n  data_files:\n    test: {directory / 'gen.jsonl'}\n"
        "output_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{target}}"\n'
        f"generation_kwargs:\n  until: {json.dumps(UNTIL)}\n  max_gen_toks: {MAX_GEN_TOKS}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )


@pytest.fixture(scope="module")
def harness_results(server: RunningServer, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks = tmp_path_factory.mktemp("lm-eval-tasks")
    write_tasks(tasks)
    return simple_evaluate(
        model="local-completions",
        model_args={
            "base_url": f"{server.base_url}/v1/completions",
            "model": "starcoder",
            "tokenizer_backend": "huggingface",
            "tokenizer": str(tiny_model_dir),
            "tokenized_requests": True,  # the harness's default: prompts as token ids
            "batch_size": 3,  # several prompts per request
            "max_retries": 1,
        },
        tasks=["starcoder_tiny_mc", "starcoder_tiny_gen"],
        # Only these two tasks: indexing the harness's ~14,000 built-in task files as well takes 6 s.
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        num_fewshot=0,
        log_samples=True,
    )


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def loglikelihood(model: Any, tokenizer: Any, context: str, continuation: str) -> float:
    """log p(continuation | context), split into tokens as the harness splits them: the context's trailing
    whitespace moved to the continuation, the whole string encoded, the context's tokens cut off the front."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    with torch.inference_mode():
        logits = model(torch.tensor([whole])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(float(logprobs[i - 1, whole[i]]) for i in range(len(context_ids), len(whole)))


def greedy_text(model: Any, tokenizer: Any, prompt: str, stops: list[str]) -> str:
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_GEN_TOKS, do_sample=False, pad_token_id=0
        )
    text = str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=False))
    cuts = [text.index(stop) for stop in stops if stop in text]
    return text[: min(cuts)] if cuts else text


def test_loglikelihoods_the_harness_reads_from_the_server_are_the_models(
    harness_results: Any, model: Any, tokenizer: Any
) -> None:
    samples = harness_results["samples"]["starcoder_tiny_mc"]
    assert len(samples) == len(MULTIPLE_CHOICE)
    for sample in samples:
        context = sample["arguments"][0][0]
        for (ctx, continuation), response in zip(
            (argument[:2] for argument in sample["arguments"]), (r[0] for r in sample["resps"])
        ):
            assert ctx == context
            served, _is_greedy = response
            wanted = loglikelihood(model, tokenizer, ctx, continuation)
            assert math.isfinite(served) and served < 0
            assert served == pytest.approx(wanted, abs=2e-3), (ctx, continuation)
    accuracy = harness_results["results"]["starcoder_tiny_mc"]["acc,none"]
    assert 0.0 <= accuracy <= 1.0


def test_greedy_generations_the_harness_gets_are_the_models(harness_results: Any, model: Any, tokenizer: Any) -> None:
    samples = harness_results["samples"]["starcoder_tiny_gen"]
    assert len(samples) == len(GENERATION)
    stops = [*UNTIL, tokenizer.eos_token]  # the harness adds the end-of-text token to the stop list
    for sample in samples:
        prompt = sample["arguments"][0][0]
        [served] = sample["resps"][0]
        assert served == greedy_text(model, tokenizer, prompt, stops), prompt
    assert "exact_match,none" in harness_results["results"]["starcoder_tiny_gen"]
