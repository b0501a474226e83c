"""Issue 12's targets, judged from a GPU suite report, as the markdown that goes into docs/benchmarks.md.

    python -m bench.gpu_targets docs/bench/results-gpu-suite.json >> docs/benchmarks.md

Each target says met or missed with the measured figure, so a run's verdict needs no hand arithmetic.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.gpu_suite import EngineRun, Level, SuiteReport


@dataclasses.dataclass(frozen=True)
class Verdict:
    target: str
    measured: str
    met: bool | None  # None: not measured in this run


def _level(run: EngineRun | None, concurrency: int) -> Level | None:
    if run is None:
        return None
    return next((level for level in run.levels if level.concurrency == concurrency), None)


def verdicts(report: SuiteReport) -> list[Verdict]:
    baseline = report.run_named("baseline")
    roofline = report.roofline_tokens_per_s or 0.0
    out: list[Verdict] = []

    one = _level(baseline, 1)
    stream = one.per_stream_tokens_per_s if one else None
    if stream is not None and roofline:
        out.append(
            Verdict(
                "batched path, 1 client: >= 80% of the roofline",
                f"{stream:.1f} tok/s = {stream / roofline:.0%}",
                stream / roofline >= 0.8,
            )
        )
    else:
        out.append(Verdict("batched path, 1 client: >= 80% of the roofline", "not measured", None))

    many = _level(baseline, 64)
    if many is not None:
        out.append(
            Verdict(
                "64 clients: >= 70% of the batched roofline",
                f"{many.output_tokens_per_s:.0f} tok/s = {many.fraction_of_batched_roofline:.0%}",
                many.fraction_of_batched_roofline >= 0.7,
            )
        )
    else:
        out.append(Verdict("64 clients: >= 70% of the batched roofline", "not measured", None))

    # The one-at-a-time approach serves one request at a time: its throughput is the same at any level.
    seed = max((level.output_tokens_per_s for level in report.seed.levels), default=0.0) if report.seed else 0.0
    if many is not None and seed:
        ratio = many.output_tokens_per_s / seed
        out.append(
            Verdict("64 clients: about 40x one at a time", f"{ratio:.1f}x ({seed:.0f} tok/s alone)", ratio >= 40)
        )
    else:
        out.append(Verdict("64 clients: about 40x one at a time", "not measured", None))

    ttft = baseline.ttft if baseline else None
    if ttft is not None and ttft.cold_s.p50 is not None and ttft.cached_prefix_s.p50 is not None:
        cold, cached = ttft.cold_s.p50, ttft.cached_prefix_s.p50
        out.append(
            Verdict(
                f"TTFT, {ttft.prompt_tokens}-token FIM prompt, cold: <= 100 ms", f"{cold * 1000:.0f} ms", cold <= 0.1
            )
        )
        out.append(
            Verdict("TTFT, same prompt with its prefix cached: <= 30 ms", f"{cached * 1000:.0f} ms", cached <= 0.03)
        )
    else:
        out.append(Verdict("TTFT, 1,500-token FIM prompt: <= 100 ms cold, <= 30 ms cached", "not measured", None))

    memory = report.memory_80gb
    if memory is not None:
        out.append(
            Verdict(
                "config.yaml fits an 80 GB card: 64 clients x 8k-token prompts",
                f"{memory.failures} failures, peak {memory.peak_reserved_bytes / 1e9:.1f} GB reserved",
                memory.fits,
            )
        )
    else:
        out.append(Verdict("config.yaml fits an 80 GB card: 64 clients x 8k-token prompts", "not measured", None))

    if baseline is not None and baseline.equality is not None:
        eq = baseline.equality
        out.append(
            Verdict(
                "greedy on the batch equals generate()",
                f"{eq.identical}/{eq.prompts} identical; first differences at characters {eq.first_difference_at}",
                eq.identical == eq.prompts and eq.failures == 0,
            )
        )

    # Speculation's cost at this shape (phase "speculation"): oracle drafts of 8 tokens against speculation off.
    off = report.speculation.get("off", {}).get("1")
    for name, target, floor in (
        ("fixed-k8 100%", "speculation, 100% oracle acceptance, 1 client: >= 2.5x off", 2.5),
        ("fixed-k8 0%", "speculation, 0% acceptance (fixed k = 8), 1 client: >= 0.9x off", 0.9),
        ("policy 0%", "speculation, 0% acceptance (the policy), 1 client: >= 0.9x off", 0.9),
    ):
        rate = report.speculation.get(name, {}).get("1")
        if off and rate is not None:
            out.append(Verdict(target, f"{rate:.1f} vs {off:.1f} tok/s = {rate / off:.2f}x", rate / off >= floor))
        else:
            out.append(Verdict(target, "not measured", None))
    return out


def markdown(report: SuiteReport) -> str:
    lines = [
        (
            f"### {report.device}: {report.shape} shape, random {report.weight_bytes / 1e9:.1f} GB of weights "
            f"({report.created_at})"
        ),
        "",
        (
            f"Command: `{report.command}`; torch {report.torch}, transformers {report.transformers}; copy bandwidth "
            f"{report.copy_bandwidth_gb_s or 0:.0f} GB/s, single-stream roofline {report.roofline_tokens_per_s or 0:.1f} tok/s."
        ),
        "",
        "| target | measured | verdict |",
        "| --- | --- | --- |",
    ]
    verdict_word = {True: "**met**", False: "**missed**", None: "not measured"}
    lines += [f"| {v.target} | {v.measured} | {verdict_word[v.met]} |" for v in verdicts(report)]
    lines += ["", "| run | start-up | greedy equal | " + " | ".join(_level_headers(report)) + " |"]
    lines.append("| --- | ---: | --- | " + " | ".join("---:" for _ in _level_headers(report)) + " |")
    for run in [*report.runs, *([report.seed] if report.seed else [])]:
        by_level = {level.concurrency: level for level in run.levels}
        cells = [
            f"{by_level[c].output_tokens_per_s:.0f} ({by_level[c].fraction_of_batched_roofline:.0%})"
            if c in by_level
            else ""
            for c in _levels(report)
        ]
        equal = f"{run.equality.identical}/{run.equality.prompts}" if run.equality else ""
        lines.append(f"| {run.name} | {run.startup_s:.1f} s | {equal} | " + " | ".join(cells) + " |")
    lines += [
        "",
        (
            "Cells: output tok/s (fraction of the batched roofline). "
            f"Autoscaling concurrency target (p95 within 1.25x of one client's): {report.concurrency_target}."
        ),
    ]
    skipped = [f"{p.name} ({p.status}: {p.why})" for p in report.phases if p.status != "done"]
    if skipped:
        lines += ["", "Not done: " + "; ".join(skipped) + "."]
    return "\n".join(lines) + "\n"


def _levels(report: SuiteReport) -> list[int]:
    runs = [*report.runs, *([report.seed] if report.seed else [])]
    return sorted({level.concurrency for run in runs for level in run.levels})


def _level_headers(report: SuiteReport) -> list[str]:
    return [f"c={c}" for c in _levels(report)]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m bench.gpu_targets <results-gpu-suite.json>", file=sys.stderr)
        return 2
    print(markdown(SuiteReport.model_validate_json(Path(args[0]).read_text())), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
