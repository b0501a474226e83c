"""A model on the CPU uses every core for a large forward pass (a prefill chunk) and all but one for a small
one (a decode step), chosen per pass (engine/cpu_threads.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from starcoder_serving.engine import cpu_threads
from transformers import AutoModelForCausalLM


def test_threads_follow_the_size_of_each_forward_pass(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    before = torch.get_num_threads()
    try:
        small = cpu_threads.install(model, small_step_threads=None)
        every_core = cpu_threads.available_cores()
        assert small == max(1, every_core - 1) and torch.get_num_threads() == small
        with torch.no_grad():
            model(input_ids=torch.ones((1, cpu_threads.PARALLEL_TOKENS), dtype=torch.long))
            assert torch.get_num_threads() == every_core
            model(input_ids=torch.ones((1, 1), dtype=torch.long))
            assert torch.get_num_threads() == small
            model(torch.ones((1, 2 * cpu_threads.PARALLEL_TOKENS), dtype=torch.long))  # positional, as well
            assert torch.get_num_threads() == every_core
    finally:
        torch.set_num_threads(before)


def test_an_explicit_setting_is_the_small_step_thread_count(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    before = torch.get_num_threads()
    try:
        assert cpu_threads.install(model, small_step_threads=3) == 3
        with torch.no_grad():
            model(input_ids=torch.ones((1, 4), dtype=torch.long))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
