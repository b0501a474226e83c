"""How many cores torch uses for a model on the CPU, chosen per forward pass by its size.

A decode step of a small model is hundreds of tiny operations: spread over every core, each one waits for
the slowest thread, and one busy core (the HTTP event loop, a client on the same machine) stalls them all.
A prefill chunk is a few large matrix products that every core speeds up. So a forward pass of at least
``PARALLEL_TOKENS`` tokens runs on every core, and a smaller one on ``small_step_threads`` (by default all
cores but one, which stays free for the event loop). Measured on 2 cores with the tiny model
(docs/benchmarks.md, "Per-token costs"): a decode step 1.3 ms on two threads, 0.75 ms on one; a cold
6,000-token prompt 116 ms through generate() on two threads, 177 ms on one.
"""

from __future__ import annotations

import os
from typing import Any

import torch

# Tokens in one forward pass from which every core is used (a prefill chunk; decode steps of up to this many
# sequences stay on the small-step threads).
PARALLEL_TOKENS = 64


def available_cores() -> int:
    return len(os.sched_getaffinity(0))


def install(model: Any, small_step_threads: int | None) -> int:
    """Set the policy on ``model`` (on the CPU); returns the small-step thread count."""
    every_core = available_cores()
    small = small_step_threads or max(1, every_core - 1)

    def choose(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        tokens = kwargs.get("input_ids")
        if tokens is None and args:
            tokens = args[0]
        wanted = every_core if tokens is not None and tokens.numel() >= PARALLEL_TOKENS else small
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)

    model.register_forward_pre_hook(choose, with_kwargs=True)
    torch.set_num_threads(small)
    return small
