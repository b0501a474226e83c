"""The load generator against the session's real server: structure and counts only, never speed."""

from __future__ import annotations

import asyncio
from pathlib import Path

from transformers import AutoTokenizer

from bench.loadgen import LevelResult, LoadSpec, WarmupCheck, build_prompt, make_client, run_level, warmup
from bench.mixed import (
    CLASSES,
    MixedLevel,
    MixedSpec,
    class_of,
    mixed_warmup,
    request_for,
    run_mixed_level,
    with_greedy_reference,
)
from bench.report import (
    BenchReport,
    ServerRun,
    compute_mixed_ratios,
    compute_ratios,
    markdown_table,
    mixed_targets,
    write,
)
from bench.run import REPO_ROOT, concurrency_levels
from tests.conftest import RunningServer


def test_concurrency_levels() -> None:
    assert concurrency_levels(16) == [1, 2, 4, 8, 16]
    assert concurrency_levels(12) == [1, 2, 4, 8, 12]
    assert concurrency_levels(1) == [1]


def test_load_generator_against_the_server(server: RunningServer, tiny_model_dir: Path, tmp_path: Path) -> None:
    prompt = build_prompt(AutoTokenizer.from_pretrained(tiny_model_dir), 8)
    spec = LoadSpec(
        predict_url=server.predict_url, prompt=prompt, max_new_tokens=4, requests_per_client=2, pin_length=True
    )

    async def drive() -> ServerRun:
        async with make_client(spec, 2) as client:
            check = await warmup(client, spec)
            levels = [await run_level(client, spec, c, check) for c in (1, 2)]
        return ServerRun(name="batched", description="smoke", warmup=check, levels=levels)

    run = asyncio.run(drive())
    assert run.warmup.prompt_tokens == 8 and run.warmup.completion_tokens == 4
    for level, concurrency in zip(run.levels, (1, 2)):
        assert level.concurrency == concurrency
        assert level.requests == 2 * concurrency and level.failures == 0, level.errors
        assert level.output_tokens == 4 * level.requests
        assert level.output_tokens_per_s > 0
        assert level.latency_s.p50 is not None and level.ttft_s.p50 is not None
        assert level.ttft_s.p50 <= level.latency_s.p50 + 1e-9

    # The same run as the seed: the report machinery (ratios, table, JSON, plot) end to end.
    seed = run.model_copy(update={"name": "seed"})
    report = BenchReport(
        label="smoke",
        mode="local",
        created_at="now",
        machine={},
        target=server.base_url,
        predict_path="/v1/models/model:predict",
        prompt_tokens_requested=8,
        new_tokens=4,
        requests_per_client=2,
        runs=[run, seed],
        ratios=compute_ratios(run, seed),
    )
    assert [r.ratio for r in report.ratios] == [1.0, 1.0]
    assert markdown_table(report).count("\n") == 1 + 2 * 2
    json_path, png_path = write(report, tmp_path)
    assert BenchReport.model_validate_json(json_path.read_text()) == report
    assert png_path.stat().st_size > 0


L = 4  # new tokens per request in the smoke runs


def test_mixed_request_shapes() -> None:
    """Each class sends what its clients send (plus the length pin), to the route they use."""
    spec = MixedSpec(
        base_url="http://h",
        predict_path="/predict",
        prompt="def f(x):\n    return x\n",
        new_tokens=L,
        requests_per_client=5,
    )
    requests = {c: request_for(spec, c, 7) for c in CLASSES}
    fim = requests["fim"].body
    assert requests["fim"].url == "http://h/predict" and not requests["fim"].sse
    assert fim["prefix"] + fim["suffix"] == spec.prompt and fim["stop"] == ["\n\n"] and fim["stream"] is True
    assert (fim["do_sample"], fim["temperature"], fim["top_p"], fim["min_new_tokens"]) == (True, 0.2, 0.95, L)
    nvidia = requests["nvidia"].body
    assert requests["nvidia"].url == "http://h/v1/completions" and requests["nvidia"].sse
    assert (nvidia["seed"], nvidia["temperature"], nvidia["presence_penalty"], nvidia["frequency_penalty"]) == (
        7,
        0.1,
        0,
        0,
    )
    assert requests["chat"].url == "http://h/v1/chat/completions" and requests["chat"].body["presence_penalty"] == 0.5
    assert requests["logprobs"].body["logprobs"] == 2 and "temperature" not in requests["logprobs"].body
    for c in ("nvidia", "chat", "logprobs"):
        body = requests[c].body
        assert body["stream"] and body["stream_options"] == {"include_usage": True}
        assert body["max_tokens"] == body["min_tokens"] == L
    assert requests["min_tokens"].body == {
        "prompt": spec.prompt,
        "min_new_tokens": L,
        "max_new_tokens": L,
        "stream": True,
    }
    # Round-robin: over 5 requests each client sends every class once, and clients start at different classes.
    assert sorted(class_of(1, k) for k in range(5)) == sorted(CLASSES)
    assert class_of(0, 0) != class_of(1, 0)


def test_mixed_profile_against_the_server(server: RunningServer, tiny_model_dir: Path, tmp_path: Path) -> None:
    prompt = build_prompt(AutoTokenizer.from_pretrained(tiny_model_dir), 8)
    greedy_spec = LoadSpec(predict_url=server.predict_url, prompt=prompt, max_new_tokens=L, requests_per_client=5)
    spec = MixedSpec(
        base_url=server.base_url,
        predict_path="/v1/models/model:predict",
        prompt=prompt,
        new_tokens=L,
        requests_per_client=5,
    )

    async def drive() -> tuple[WarmupCheck, LevelResult, MixedLevel]:
        async with make_client(greedy_spec, 2) as client:
            assert await mixed_warmup(client, spec) == []  # the tiny model runs every predict class to L tokens
            check = await warmup(client, greedy_spec)
            greedy = await run_level(client, greedy_spec, 2, check)
            return check, greedy, await run_mixed_level(client, spec, 2)

    check, greedy, raw = asyncio.run(drive())
    level = with_greedy_reference(raw, greedy.latency_s.p95)
    # 2 clients x 5 requests, round-robin over 5 classes: 2 requests of each, all answered 200.
    assert level.requests == 10 == sum(c.requests for c in level.classes)
    assert level.failures == 0, level.errors
    assert [c.request_class for c in level.classes] == list(CLASSES)
    for c in level.classes:
        assert c.requests == 2 and c.failures == 0 and c.http_statuses == {"200": 2}, c
        assert 0 < c.output_tokens <= 2 * L
        assert c.tokens_counted_by == (["pinned"] if c.request_class in ("fim", "min_tokens") else ["usage"])
        assert c.latency_s.p95 is not None and c.ttft_s.p50 is not None  # every class streams
        assert c.p95_vs_greedy is not None
    # No stop sequence in these classes: the server's own count is exactly the pinned length.
    by_class = {c.request_class: c for c in level.classes}
    assert all(by_class[c].output_tokens == 2 * L for c in ("nvidia", "logprobs", "min_tokens"))
    assert level.output_tokens == sum(c.output_tokens for c in level.classes)
    assert level.greedy_p95_s == greedy.latency_s.p95

    # The report machinery with both profiles: ratios, targets, table, JSON, plot.
    runs = [ServerRun(name=name, description="smoke", warmup=check, levels=[greedy]) for name in ("batched", "seed")]
    mixed = {"batched": [level], "seed": [level]}
    ratios = compute_mixed_ratios(mixed["batched"], mixed["seed"])
    report = BenchReport(
        label="smoke-mixed",
        mode="local",
        created_at="now",
        machine={},
        target=server.base_url,
        predict_path="/v1/models/model:predict",
        prompt_tokens_requested=8,
        new_tokens=L,
        requests_per_client=5,
        runs=runs,
        ratios=compute_ratios(runs[0], runs[1]),
        mixed=mixed,
        mixed_ratios=ratios,
        profile="both",
        mixed_classes=list(CLASSES),
        mixed_targets=mixed_targets(mixed, ratios),
    )
    assert [r.ratio for r in ratios] == [1.0]
    assert [t.met for t in report.mixed_targets] == [None, None]  # nothing measured at 16 clients here
    table = markdown_table(report)
    assert table.count("| batched | 2 | ") == 1 + 1 + len(CLASSES)  # greedy row, "all" row, one per class
    assert table.count("target at 16 clients") == 2
    json_path, png_path = write(report, tmp_path)
    assert BenchReport.model_validate_json(json_path.read_text()) == report
    assert png_path.stat().st_size > 0


def test_older_results_still_load() -> None:
    """Fields were only added: results written before the five-class mix still validate."""
    for path in sorted((REPO_ROOT / "docs" / "bench").glob("results-*.json")):
        BenchReport.model_validate_json(path.read_text())
