"""The peer comparison's results (bench/compare.py): every measurement, the per-round ratios, and markdown.

Each measurement is one (round, test, server, streamed, clients) level. Ratios are taken within a round
(ours and the other server ran back to back there), then summarised over rounds as the median and the
spread (the smallest and largest of the per-round ratios).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

import pydantic

from bench.loadgen import LevelResult, Percentiles, WarmupCheck

OURS = "ours"
# Which server each of ours is divided by, per test: the predict route is ours and the seed's alone.
BASELINES = {"openai": ("peer", "seed"), "predict": ("seed",)}
KEYSTROKE_ORDER = ("ours", "ours-noshare", "peer", "seed")


class Measurement(pydantic.BaseModel):
    round: int
    test: str  # "openai" (/v1/completions), "predict" (streamed predict), "keystroke"
    server: str
    streamed: bool
    concurrency: int
    level: LevelResult
    # Successful requests whose text differs from the server's own warm-up completion (token count equal).
    text_mismatches: int = 0
    # keystroke only: every full-length request's latency, so percentiles pool over rounds; requests that
    # ended (end-of-text) before the asked-for tokens, left out of the level; each request's token count.
    latencies_s: list[float] = pydantic.Field(default_factory=list)
    ended_early: int = 0
    token_counts: list[int | None] = pydantic.Field(default_factory=list)


class Spread(pydantic.BaseModel):
    """A per-round figure summarised over rounds."""

    per_round: list[float | None]
    median: float | None
    low: float | None
    high: float | None

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Spread:
        known = [v for v in values if v is not None]
        if not known:
            return cls(per_round=list(values), median=None, low=None, high=None)
        return cls(per_round=list(values), median=statistics.median(known), low=min(known), high=max(known))


class RatioRow(pydantic.BaseModel):
    test: str
    streamed: bool
    concurrency: int
    baseline: str
    ours_tokens_per_s: Spread
    baseline_tokens_per_s: Spread
    ratio: Spread  # ours / baseline output tok/s, per round


class ServerFigure(pydantic.BaseModel):
    server: str
    requests: int
    failures: int
    p50_s: Spread  # per-round p50
    pooled: Percentiles  # over every round's requests (keystroke) or None
    ended_early: int = 0  # keystroke: requests left out, their completion ended before the asked-for tokens


class CompareReport(pydantic.BaseModel):
    label: str
    created_at: str
    machine: dict[str, str]
    wall_s: float
    settings: dict[str, object]
    servers: dict[str, str]  # name -> what it is (the peer: its command line)
    warmups: dict[str, WarmupCheck]  # "<server> <test>" -> the warm-up request's check
    measurements: list[Measurement]
    ratios: list[RatioRow] = pydantic.Field(default_factory=list)
    ttft: list[ServerFigure] = pydantic.Field(default_factory=list)  # streamed /v1/completions at the top level
    keystroke: list[ServerFigure] = pydantic.Field(default_factory=list)
    notes: list[str] = pydantic.Field(default_factory=list)


def _select(measurements: Sequence[Measurement], **fields: object) -> list[Measurement]:
    return [m for m in measurements if all(getattr(m, k) == v for k, v in fields.items())]


def _by_round(measurements: Sequence[Measurement], rounds: Sequence[int], **fields: object) -> list[Measurement | None]:
    found = {m.round: m for m in _select(measurements, **fields)}
    return [found.get(r) for r in rounds]


def _tps(m: Measurement | None) -> float | None:
    return None if m is None or not m.level.output_tokens_per_s else m.level.output_tokens_per_s


def ratio_rows(measurements: Sequence[Measurement]) -> list[RatioRow]:
    """Ours over each baseline, per (test, streamed, clients), ratio per round then median and spread."""
    rounds = sorted({m.round for m in measurements})
    keys = sorted({(m.test, m.streamed, m.concurrency) for m in measurements if m.test in BASELINES})
    rows: list[RatioRow] = []
    for test, streamed, concurrency in keys:
        ours = [
            _tps(m)
            for m in _by_round(measurements, rounds, test=test, streamed=streamed, concurrency=concurrency, server=OURS)
        ]
        for baseline in BASELINES[test]:
            other = [
                _tps(m)
                for m in _by_round(
                    measurements, rounds, test=test, streamed=streamed, concurrency=concurrency, server=baseline
                )
            ]
            if all(v is None for v in other):
                continue
            ratios = [a / b if a is not None and b else None for a, b in zip(ours, other)]
            rows.append(
                RatioRow(
                    test=test,
                    streamed=streamed,
                    concurrency=concurrency,
                    baseline=baseline,
                    ours_tokens_per_s=Spread.of(ours),
                    baseline_tokens_per_s=Spread.of(other),
                    ratio=Spread.of(ratios),
                )
            )
    return rows


def figures(
    measurements: Sequence[Measurement], field: str, servers: Sequence[str], **fields: object
) -> list[ServerFigure]:
    """Per server: the per-round p50 of ``field`` ("ttft_s" or "latency_s") and, where the measurements
    kept every latency, percentiles pooled over rounds."""
    rounds = sorted({m.round for m in measurements})
    rows: list[ServerFigure] = []
    for server in servers:
        mine = _select(measurements, server=server, **fields)
        if not mine:
            continue
        per_round = [None if m is None else getattr(m.level, field).p50 for m in _by_round(mine, rounds)]
        rows.append(
            ServerFigure(
                server=server,
                requests=sum(m.level.requests for m in mine),
                failures=sum(m.level.failures for m in mine),
                p50_s=Spread.of(per_round),
                pooled=Percentiles.of([x for m in mine for x in m.latencies_s]),
                ended_early=sum(m.ended_early for m in mine),
            )
        )
    return rows


def checks(measurements: Sequence[Measurement]) -> list[str]:
    """One line per server and test with failed requests or texts that differ from the warm-up's."""
    lines: list[str] = []
    for server in sorted({m.server for m in measurements}):
        for test in sorted({m.test for m in measurements}):
            mine = _select(measurements, server=server, test=test)
            failures = sum(m.level.failures for m in mine)
            mismatches = sum(m.text_mismatches for m in mine)
            if failures:
                errors = sorted({e for m in mine for e in m.level.errors})[:3]
                lines.append(f"{server} {test}: {failures} of {sum(m.level.requests for m in mine)} failed: {errors}")
            if mismatches:
                lines.append(
                    f"{server} {test}: {mismatches} streamed texts differ from the non-streamed warm-up text "
                    "(token counts equal)"
                )
    for round_ in sorted({m.round for m in measurements}):
        counts = {m.server: m.token_counts for m in _select(measurements, test="keystroke", round=round_)}
        if len({tuple(c) for c in counts.values()}) > 1:
            lines.append(f"round {round_}: the servers' keystroke token counts differ: {counts}")
    return lines


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value * 1000:.0f}"


def _x(spread: Spread) -> str:
    if spread.median is None:
        return "–"
    return f"{spread.median:.2f}× ({spread.low:.2f}–{spread.high:.2f})"


def _tok(spread: Spread) -> str:
    return "–" if spread.median is None else f"{spread.median:.0f}"


def markdown(report: CompareReport) -> str:
    """Throughput ratios, TTFT at the top level, and the keystroke loop, as markdown tables."""
    rounds = report.settings.get("rounds")
    lines = [
        (
            f"Output tok/s: median over {rounds} rounds; × = ours / other, median of the per-round ratios "
            "(min–max over rounds)."
        ),
        "",
        "| route | clients | streamed | ours tok/s | peer tok/s | seed tok/s | ours / peer | ours / seed |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    keys = sorted(
        {(r.test, r.concurrency, r.streamed) for r in report.ratios}, key=lambda k: (k[0] != "openai", k[1], k[2])
    )
    for test, concurrency, streamed in keys:
        rows = {
            r.baseline: r for r in report.ratios if (r.test, r.concurrency, r.streamed) == (test, concurrency, streamed)
        }
        ours = next(iter(rows.values())).ours_tokens_per_s
        peer, seed = rows.get("peer"), rows.get("seed")
        route = "/v1/completions" if test == "openai" else "predict"
        lines.append(
            f"| {route} | {concurrency} | {'yes' if streamed else 'no'} | {_tok(ours)} "
            f"| {_tok(peer.baseline_tokens_per_s) if peer else '–'} | {_tok(seed.baseline_tokens_per_s) if seed else '–'} "
            f"| {_x(peer.ratio) if peer else '–'} | {_x(seed.ratio) if seed else '–'} |"
        )
    if report.ttft:
        lines += [
            "",
            (
                f"TTFT of streamed /v1/completions at {report.settings.get('ttft_clients')} clients: p50 per round, "
                "median (min–max) in ms."
            ),
            "",
            "| server | requests (failed) | TTFT p50 ms |",
            "|---|---:|---:|",
        ]
        for row in report.ttft:
            spread = row.p50_s
            lines.append(
                f"| {row.server} | {row.requests} ({row.failures}) | {_ms(spread.median)} "
                f"({_ms(spread.low)}–{_ms(spread.high)}) |"
            )
    if report.keystroke:
        lines += [
            "",
            (
                f"Keystroke loop: 1 client, FIM prompt of {report.settings.get('keystroke_prompt_tokens')} tokens growing by "
                f"3 characters a request, {report.settings.get('keystroke_new_tokens')} new tokens, not streamed; "
                "latency pooled over rounds, and the per-round p50 (min–max). Requests whose completion ended "
                "(end-of-text) before then are left out, on every server alike."
            ),
            "",
            "| server | requests (failed) | ended early, left out | p50 ms | p95 ms | per-round p50 ms |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row in report.keystroke:
            lines.append(
                f"| {row.server} | {row.requests} ({row.failures}) | {row.ended_early} | {_ms(row.pooled.p50)} "
                f"| {_ms(row.pooled.p95)} | {_ms(row.p50_s.low)}–{_ms(row.p50_s.high)} |"
            )
    if report.notes:
        lines += ["", *(f"- {note}" for note in report.notes)]
    return "\n".join(lines)


def summarise(report: CompareReport, ttft_clients: int) -> CompareReport:
    """The report with its ratios, TTFT figures, keystroke figures and checks filled in from its measurements."""
    ms = report.measurements
    servers = ("ours", "peer", "seed")
    return report.model_copy(
        update={
            "ratios": ratio_rows(ms),
            "ttft": figures(ms, "ttft_s", servers, test="openai", streamed=True, concurrency=ttft_clients),
            "keystroke": figures(ms, "latency_s", KEYSTROKE_ORDER, test="keystroke"),
            "notes": report.notes + checks(ms),
            "settings": {**report.settings, "ttft_clients": ttft_clients},
        }
    )


def write(report: CompareReport, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"results-{report.label}.json"
    json_path.write_text(report.model_dump_json(indent=2) + "\n")
    md_path = out_dir / f"table-{report.label}.md"
    md_path.write_text(markdown(report) + "\n")
    return json_path, md_path
