"""HumanEval scoring as the BigCode evaluation harness does it: truncate at the stop sequences, run the
problem's tests on prompt + completion, and estimate pass@k without bias (Chen et al. 2021, the Codex paper)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# The harness's stop sequences for HumanEval: a new top-level statement ends the function body.
STOP_SEQUENCES: tuple[str, ...] = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def truncate(completion: str, stop: Sequence[str] = STOP_SEQUENCES) -> str:
    """Cut at the first stop sequence (the server does too; this scores an endpoint that ignores `stop`
    the same way)."""
    cut = min((i for i in (completion.find(s) for s in stop) if i != -1), default=len(completion))
    return completion[:cut]


def program(problem: Mapping[str, Any], completion: str) -> str:
    """What runs: the prompt, the completion, the tests, and the call of the tests on the entry point."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def pass_at_k(samples: int, correct: int, k: int) -> float:
    """1 - C(n - c, k) / C(n, k), as a product so large n stays exact in floating point."""
    if samples - correct < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(samples - correct + 1, samples + 1)))


def mean_pass_at_k(correct_per_problem: Sequence[int], samples: int, k: int) -> float:
    return float(np.mean([pass_at_k(samples, correct, k) for correct in correct_per_problem]))


def reported_ks(samples: int) -> list[int]:
    """pass@1 always; pass@10 and pass@100 when there are enough samples to estimate them."""
    return [k for k in (1, 10, 100) if k <= samples]
