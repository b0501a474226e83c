"""What every benchmark report records besides its numbers: the machine, its load, and the prompts sent."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
from pathlib import Path

from bench.loadgen import build_prompt

REPO_ROOT = Path(__file__).resolve().parent.parent
# Candidate prompts (different starting lines) the warm-up tries in order.
PROMPT_CANDIDATES = 16


def machine_info() -> dict[str, str]:
    import torch

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": str(os.cpu_count()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        info["git"] = commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        info["git"] = "unknown"
    return info


def loadavg() -> str:
    # Other work on the machine (another test run, say) competes for the CPU and skews every number.
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def prompts_for(args: argparse.Namespace, tokenizer_dir: Path | str) -> list[str]:
    """Candidate P-token prompts (different starting lines), tried in order by the warm-up."""
    from transformers import AutoTokenizer

    # Another tokenizer (a deployment's) may count this text differently: the warm-up records the
    # server's own count, which is what the report shows.
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    candidates = [build_prompt(tokenizer, args.prompt_tokens, variant) for variant in range(PROMPT_CANDIDATES)]
    return list(dict.fromkeys(candidates))  # unique, in order
