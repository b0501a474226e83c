"""The load generator against the session's real server: structure and counts only, never speed."""

from __future__ import annotations

import asyncio
from pathlib import Path

from transformers import AutoTokenizer

from bench.compare import DOCS_RESULTS_DIR, LOCAL_RESULTS_DIR, results_dir
from bench.loadgen import LoadSpec, build_prompt, make_client, run_level, warmup
from bench.mixed import CLASSES, MixedLevel, MixedSpec, mixed_table, run_mixed_level
from bench.report import BenchReport, ServerRun, compute_ratios, markdown_table, write
from bench.run import concurrency_levels, parse_args
from tests.conftest import RunningServer


def test_concurrency_levels() -> None:
    assert concurrency_levels(16) == [1, 2, 4, 8, 16]
    assert concurrency_levels(12) == [1, 2, 4, 8, 12]
    assert concurrency_levels(1) == [1]


def test_results_go_to_the_docs_only_when_labelled(tmp_path: Path) -> None:
    # `make bench` never overwrites the committed results: unlabelled runs write under .cache/ (untracked).
    assert results_dir(parse_args([])) == LOCAL_RESULTS_DIR
    assert LOCAL_RESULTS_DIR.parts[-3:] == (".cache", "bench", "results")
    assert results_dir(parse_args(["--compare"])) == LOCAL_RESULTS_DIR
    assert results_dir(parse_args(["--label", "local-cpu"])) == DOCS_RESULTS_DIR
    assert DOCS_RESULTS_DIR.parts[-2:] == ("docs", "bench")
    assert results_dir(parse_args(["--label", "x", "--out-dir", str(tmp_path)])) == tmp_path


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


def test_mixed_profile_against_the_server(server: RunningServer, tiny_model_dir: Path) -> None:
    prompt = build_prompt(AutoTokenizer.from_pretrained(tiny_model_dir), 8)
    spec = MixedSpec(
        base_url=server.base_url,
        predict_path="/v1/models/model:predict",
        prompt=prompt,
        new_tokens=4,
        requests_per_client=1,
    )

    async def drive() -> MixedLevel:
        async with make_client(
            LoadSpec(predict_url=server.predict_url, prompt=prompt, max_new_tokens=4, requests_per_client=1), 6
        ) as client:
            return await run_mixed_level(client, spec, 6)

    level = asyncio.run(drive())
    assert level.requests == 6 and level.failures == 0, level.errors
    assert [c.request_class for c in level.classes] == list(CLASSES)
    assert all(c.requests == 1 and c.failures == 0 for c in level.classes)  # client c's first request is of class c
    # Every class pins its length (min tokens): 4 tokens each, as the server counted them.
    assert [c.output_tokens for c in level.classes] == [4] * len(CLASSES)
    assert level.output_tokens == sum(c.output_tokens for c in level.classes) == 24
    streamed = {"nvidia", "chat", "logprobs"}
    assert all((c.ttft_s.p50 is not None) == (c.request_class in streamed) for c in level.classes)
    greedy = next(c for c in level.classes if c.request_class == "greedy")
    assert greedy.p95_vs_greedy == 1.0
    table = mixed_table({"batched": [level]})
    assert table.count("\n") == 1 + 1 + len(CLASSES)


def test_gpu_suite_runs_every_phase_on_a_cpu_stand_in(tmp_path: Path) -> None:
    """bench/gpu_suite.py is run on a lent GPU with no second chance: its every phase must work here first, at
    the tiny shape (figures mean nothing on a CPU; the phases that need CUDA must fail with their reason)."""
    from bench import gpu_suite

    args = ["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--out-dir", str(tmp_path), "--label", "t"]
    args += ["--new-tokens", "6", "--prompt-tokens", "32", "--levels", "1", "3", "--seed-levels", "1", "3"]
    args += ["--variant-levels", "2", "--check-prompts", "3", "--check-tokens", "6", "--ttft-trials", "1"]
    args += ["--fim-tokens", "200", "--copy-gib", "0.02", "--repeats", "1", "--variants", "graphs-both", "async"]
    args += ["--speculation-levels", "1", "2", "--speculation-prompts", "2"]
    assert gpu_suite.main(args) == 0
    report = gpu_suite.SuiteReport.model_validate_json((tmp_path / "results-t.json").read_text())
    status = {phase.name: phase.status for phase in report.phases}
    assert status == {
        "bandwidth": "done",
        "decode_generate": "done",
        "reference": "done",
        "baseline": "done",
        "seed": "done",
        "speculation": "done",
        "variant:graphs-both": "done",
        "variant:async": "done",
        "memory_80gb": "failed",  # needs CUDA
    }, report.phases
    assert report.reference_prompts == 3
    assert set(report.speculation) == {"off", "fixed-k8 100%", "fixed-k8 0%", "fixed-k8 50%", "policy 0%"}
    assert all(set(rates) == {"1", "2"} and min(rates.values()) > 0 for rates in report.speculation.values())
    for run in report.runs:
        assert run.equality is not None and run.equality.identical == 3 and run.equality.failures == 0, run
        assert all(level.failures == 0 and level.output_tokens_per_s > 0 for level in run.levels), run
        assert run.kv_cache_tokens and run.kv_cache_tokens > 0
    baseline = report.runs[0]
    assert baseline.name == "baseline" and [level.concurrency for level in baseline.levels] == [1, 3]
    assert baseline.ttft is not None and baseline.ttft.prompt_tokens > 200
    assert baseline.profile is not None
    # The batch loop is transformers' thread: its stacks must show the forward pass.
    loops = [thread for thread in baseline.profile.threads if "generation_loop" in thread.thread]
    assert loops, [thread.thread for thread in baseline.profile.threads]
    assert any(name.endswith("_forward_process_and_sample") for name, _share in loops[0].inclusive), loops[0]
    assert report.seed is not None and set(report.speedup) == {1, 3}
    assert report.concurrency_target in (1, 3)
    assert (tmp_path / "profile-t.txt").exists()
    # The verdicts for docs/benchmarks.md: every target named, met or missed or not measured, and the runs' table.
    from bench import gpu_targets

    table = gpu_targets.markdown(report)
    assert "| baseline | " in table and "| graphs-both | " in table and "| seed | " in table
    verdicts = {v.target: v.met for v in gpu_targets.verdicts(report)}
    assert verdicts["config.yaml fits an 80 GB card: 64 clients x 8k-token prompts"] is None  # no CUDA here
    assert verdicts["greedy on the batch equals generate()"] is True
    assert verdicts["batched path, 1 client: >= 80% of the roofline"] in (True, False)
