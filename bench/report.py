"""The run's results as a pydantic document, a markdown table and a matplotlib plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydantic

from bench.loadgen import LevelResult, Percentiles, WarmupCheck
from bench.mixed import MixedLevel

# The mixed profile's targets, printed beside the numbers.
TARGET_CONCURRENCY = 16
MIXED_RATIO_TARGET = 3.0  # mixed output tok/s >= 3x the one-at-a-time server's at 16 clients
CLASS_P95_TARGET = 1.5  # no class's p95 latency above 1.5x the greedy profile's p95


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


class TargetCheck(pydantic.BaseModel):
    """One target of the mixed profile, checked at TARGET_CONCURRENCY clients."""

    name: str
    concurrency: int
    target: str  # e.g. ">= 3.0x"
    value: float | None  # None: not measured at that concurrency
    met: bool | None
    detail: str = ""


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
    # Added with the five-class mix; absent from older results.
    profile: str | None = None  # greedy, mixed or both
    mixed_classes: list[str] = pydantic.Field(default_factory=list)
    mixed_targets: list[TargetCheck] = pydantic.Field(default_factory=list)

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


def greedy_markdown_table(report: BenchReport) -> str:
    """The greedy profile: one row per (server, concurrency); latencies in milliseconds, p50 / p95."""
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
                f"| {level.output_tokens_per_s:.1f} | {_times(ratio)} "
                f"| {_pair(level.latency_s)} | {_pair(level.ttft_s)} | {_pair(level.inter_chunk_s)} "
                f"| {_pair(level.time_per_output_token_s)} |"
            )
    return "\n".join(rows)


def _rate(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _times(ratio: float | None) -> str:
    return "" if ratio is None else f"{ratio:.2f}×"


def mixed_markdown_table(report: BenchReport) -> str:
    """The mixed profile: per server and level, an "all" row, then one row per class."""
    ratio_by_c = {r.concurrency: r.ratio for r in report.mixed_ratios}
    header = (
        "| server | clients | class | requests (failed) | < L tokens | output tokens | output tok/s | × seed "
        "| tok/s per request p50 | latency ms p50 / p95 | TTFT ms p50 / p95 | p95 / greedy p95 |"
    )
    rows = [header, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for server, levels in report.mixed.items():
        for level in levels:
            ratio = ratio_by_c.get(level.concurrency) if server == "batched" else None
            reference = "" if level.greedy_p95_s is None else f"greedy p95 {_ms(level.greedy_p95_s)} ms"
            short = sum(c.short_requests for c in level.classes)
            rows.append(
                f"| {server} | {level.concurrency} | **all** | {level.requests} ({level.failures}) | {short} "
                f"| {level.output_tokens} | **{level.output_tokens_per_s:.1f}** | {_times(ratio)} | | | | {reference} |"
            )
            for c in level.classes:
                shown = "–" if c.p95_vs_greedy is None else f"{c.p95_vs_greedy:.2f}×"
                rows.append(
                    f"| {server} | {level.concurrency} | {c.request_class} | {c.requests} ({c.failures}) "
                    f"| {c.short_requests} | {c.output_tokens} | {c.output_tokens_per_s or 0.0:.1f} | "
                    f"| {_rate(c.request_tokens_per_s_p50)} | {_pair(c.latency_s)} | {_pair(c.ttft_s)} | {shown} |"
                )
    return "\n".join(rows)


def mixed_targets(mixed: dict[str, list[MixedLevel]], mixed_ratios: list[Ratio]) -> list[TargetCheck]:
    """The two mixed-profile targets at TARGET_CONCURRENCY clients, on the batched server (or the only one)."""
    c = TARGET_CONCURRENCY
    ratio = next((r for r in mixed_ratios if r.concurrency == c), None)
    throughput = TargetCheck(
        name="mixed output tok/s ÷ one-at-a-time server's",
        concurrency=c,
        target=f">= {MIXED_RATIO_TARGET:.1f}x",
        value=None if ratio is None else ratio.ratio,
        met=None if ratio is None or ratio.ratio is None else ratio.ratio >= MIXED_RATIO_TARGET,
        detail="" if ratio else f"needs both servers measured at {c} clients",
    )
    server = "batched" if "batched" in mixed else next(iter(mixed), "")
    level = next((lv for lv in mixed.get(server, []) if lv.concurrency == c), None)
    slowest = level.slowest_class() if level else None
    latency = TargetCheck(
        name="slowest class's p95 ÷ greedy profile's p95",
        concurrency=c,
        target=f"<= {CLASS_P95_TARGET:.1f}x",
        value=None if slowest is None else slowest.p95_vs_greedy,
        met=None if slowest is None or slowest.p95_vs_greedy is None else slowest.p95_vs_greedy <= CLASS_P95_TARGET,
        detail=f"{server}: {slowest.request_class}" if slowest else f"needs both profiles measured at {c} clients",
    )
    return [throughput, latency]


def target_lines(report: BenchReport) -> list[str]:
    lines: list[str] = []
    for t in report.mixed_targets:
        value = "n/a" if t.value is None else f"{t.value:.2f}x"
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t.met]
        detail = f" ({t.detail})" if t.detail else ""
        lines.append(f"target at {t.concurrency} clients: {t.name} {t.target}: {value}{detail} -> {verdict}")
    return lines


def markdown_table(report: BenchReport) -> str:
    """The greedy table; with the mixed profile, also its table and the targets."""
    parts: list[str] = []
    if any(run.levels for run in report.runs) or not report.mixed:
        parts.append(greedy_markdown_table(report))
    if report.mixed:
        parts.append(mixed_markdown_table(report))
        if report.mixed_targets:
            parts.append("\n".join(f"* {line}" for line in target_lines(report)))
    return "\n\n".join(parts)


def _ms_or_nan(values: list[float | None]) -> list[float]:
    return [v * 1000 if v is not None else float("nan") for v in values]


def _plot_greedy(report: BenchReport, ax_tps: Any, ax_lat: Any) -> None:
    for run in report.runs:
        if not run.levels:
            continue
        xs = [level.concurrency for level in run.levels]
        ax_tps.plot(xs, [level.output_tokens_per_s for level in run.levels], marker="o", label=f"{run.name} greedy")
        for field, style in (("latency_s", "-"), ("ttft_s", "--")):
            name = "request latency" if field == "latency_s" else "TTFT"
            p50 = _ms_or_nan([getattr(level, field).p50 for level in run.levels])
            p95 = _ms_or_nan([getattr(level, field).p95 for level in run.levels])
            ax_lat.plot(xs, p50, style, marker="o", label=f"{run.name} greedy {name} p50")
            ax_lat.plot(xs, p95, style, marker="x", alpha=0.5, label=f"{run.name} greedy {name} p95")


def _plot_mixed(report: BenchReport, ax_tps: Any, ax_lat: Any, ax_class: Any) -> None:
    for name, levels in report.mixed.items():
        xs = [level.concurrency for level in levels]
        ax_tps.plot(xs, [level.output_tokens_per_s for level in levels], ":", marker="s", label=f"{name} mixed")
        worst = [max((c.latency_s.p95 or 0.0) for c in level.classes) * 1000 for level in levels]
        ax_lat.plot(xs, worst, ":", marker="s", label=f"{name} mixed: slowest class p95")
        style = "-" if name in ("batched", "remote") else ":"  # the server by line style, the class by colour
        for i, request_class in enumerate([c.request_class for c in levels[0].classes] if levels else []):
            ratios = [
                next((c.p95_vs_greedy for c in level.classes if c.request_class == request_class), None)
                for level in levels
            ]
            ys = [float("nan") if r is None else r for r in ratios]
            ax_class.plot(xs, ys, style, marker=".", color=f"C{i}", label=f"{name} {request_class}")
    ax_class.axhline(CLASS_P95_TARGET, color="red", linewidth=0.8, label=f"target {CLASS_P95_TARGET}x")
    ax_class.set_ylabel("class p95 ÷ greedy profile p95")
    ax_class.set_title("Mixed profile: p95 per class vs greedy")
    ax_class.legend(fontsize=6, ncol=2)


def plot(report: BenchReport, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on CI or a server
    import matplotlib.pyplot as plt

    panels = 3 if report.mixed else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5))
    ax_tps, ax_lat = axes[0], axes[1]
    _plot_greedy(report, ax_tps, ax_lat)
    if report.mixed:
        _plot_mixed(report, ax_tps, ax_lat, axes[2])
    for ax in axes:
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
