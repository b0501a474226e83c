"""The run's results as a pydantic document, a markdown table and a matplotlib plot."""

from __future__ import annotations

from pathlib import Path

import pydantic

from bench.loadgen import LevelResult, Percentiles, WarmupCheck
from bench.mixed import MixedLevel


class ServerRun(pydantic.BaseModel):
    """All concurrency levels against one server (``batched`` or ``seed``)."""

    name: str
    description: str
    warmup: WarmupCheck
    levels: list[LevelResult]

    def at(self, concurrency: int) -> LevelResult | None:
        return next((level for level in self.levels if level.concurrency == concurrency), None)


class Ratio(pydantic.BaseModel):
    concurrency: int
    batched_tokens_per_s: float
    seed_tokens_per_s: float
    ratio: float | None


class BenchReport(pydantic.BaseModel):
    label: str
    mode: str  # "local" or "remote"
    created_at: str
    machine: dict[str, str]
    target: str  # the base URL driven (never the API key)
    predict_path: str
    prompt_tokens_requested: int | None
    new_tokens: int
    requests_per_client: int
    runs: list[ServerRun]
    ratios: list[Ratio] = pydantic.Field(default_factory=list)
    # The mixed-traffic profile (bench/mixed.py), per server, and its batched / seed ratios.
    mixed: dict[str, list[MixedLevel]] = pydantic.Field(default_factory=dict)
    mixed_ratios: list[Ratio] = pydantic.Field(default_factory=list)

    def run(self, name: str) -> ServerRun | None:
        return next((run for run in self.runs if run.name == name), None)


def compute_mixed_ratios(batched: list[MixedLevel], seed: list[MixedLevel]) -> list[Ratio]:
    seed_by_level = {level.concurrency: level for level in seed}
    ratios: list[Ratio] = []
    for level in batched:
        other = seed_by_level.get(level.concurrency)
        if other is None:
            continue
        ratio = level.output_tokens_per_s / other.output_tokens_per_s if other.output_tokens_per_s else None
        ratios.append(
            Ratio(
                concurrency=level.concurrency,
                batched_tokens_per_s=level.output_tokens_per_s,
                seed_tokens_per_s=other.output_tokens_per_s,
                ratio=ratio,
            )
        )
    return ratios


def compute_ratios(batched: ServerRun, seed: ServerRun) -> list[Ratio]:
    ratios: list[Ratio] = []
    for level in batched.levels:
        other = seed.at(level.concurrency)
        if other is None:
            continue
        b, s = level.output_tokens_per_s, other.output_tokens_per_s
        ratios.append(
            Ratio(
                concurrency=level.concurrency,
                batched_tokens_per_s=b,
                seed_tokens_per_s=s,
                ratio=b / s if s > 0 else None,
            )
        )
    return ratios


def _ms(p: float | None) -> str:
    return "–" if p is None else f"{p * 1000:.0f}"


def _pair(p: Percentiles) -> str:
    return f"{_ms(p.p50)} / {_ms(p.p95)}"


def markdown_table(report: BenchReport) -> str:
    """One row per (server, concurrency); latencies in milliseconds, p50 / p95."""
    ratio_by_c = {r.concurrency: r.ratio for r in report.ratios}
    header = (
        "| server | clients | requests (failed) | output tok/s | × seed | latency ms p50 / p95 | TTFT ms p50 / p95 "
        "| inter-chunk ms p50 / p95 | ms per output token p50 / p95 |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows: list[str] = [header]
    for run in report.runs:
        for level in run.levels:
            ratio = ratio_by_c.get(level.concurrency) if run.name == "batched" else None
            rows.append(
                f"| {run.name} | {level.concurrency} | {level.requests} ({level.failures}) "
                f"| {level.output_tokens_per_s:.1f} | {'' if ratio is None else f'{ratio:.2f}×'} "
                f"| {_pair(level.latency_s)} | {_pair(level.ttft_s)} | {_pair(level.inter_chunk_s)} "
                f"| {_pair(level.time_per_output_token_s)} |"
            )
    return "\n".join(rows)


def plot(report: BenchReport, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on CI or a server
    import matplotlib.pyplot as plt

    fig, (ax_tps, ax_lat) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in report.runs:
        xs = [level.concurrency for level in run.levels]
        ax_tps.plot(xs, [level.output_tokens_per_s for level in run.levels], marker="o", label=f"{run.name} greedy")
        for field, style in (("latency_s", "-"), ("ttft_s", "--")):
            p50 = [getattr(level, field).p50 for level in run.levels]
            p95 = [getattr(level, field).p95 for level in run.levels]
            name = "request latency" if field == "latency_s" else "TTFT"
            ax_lat.plot(
                xs,
                [v * 1000 if v is not None else float("nan") for v in p50],
                style,
                marker="o",
                label=f"{run.name} {name} p50",
            )
            ax_lat.plot(
                xs,
                [v * 1000 if v is not None else float("nan") for v in p95],
                style,
                marker="x",
                alpha=0.5,
                label=f"{run.name} {name} p95",
            )
    for name, levels in report.mixed.items():  # the mixed-traffic profile: throughput and per-class p95
        xs = [level.concurrency for level in levels]
        ax_tps.plot(xs, [level.output_tokens_per_s for level in levels], ":", marker="s", label=f"{name} mixed")
        worst = [max((c.latency_s.p95 or 0.0) for c in level.classes) * 1000 for level in levels]
        ax_lat.plot(xs, worst, ":", marker="s", label=f"{name} mixed: slowest class p95")
    for ax in (ax_tps, ax_lat):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.grid(True, alpha=0.3)
    ax_tps.set_ylabel("output tokens / s (all clients)")
    ax_tps.set_title("Throughput")
    ax_tps.legend()
    ax_lat.set_ylabel("ms")
    ax_lat.set_yscale("log")
    ax_lat.set_title("Latency")
    ax_lat.legend(fontsize=7)
    fig.suptitle(
        f"{report.label}: prompt {report.prompt_tokens_requested} tok, {report.new_tokens} new tok/request, "
        f"{report.requests_per_client} requests/client"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(report: BenchReport, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"results-{report.label}.json"
    json_path.write_text(report.model_dump_json(indent=2) + "\n")
    return json_path, plot(report, out_dir / f"plot-{report.label}.png")
