"""`make bench`: drive the real Truss server over HTTP at rising concurrency, and compare with the seed.

    make bench                                             # local: batched server vs seed server, tiny model on CPU
    make bench BENCH_ARGS="--base-url https://model-xxxx.api.baseten.co/environments/production --api-key KEY"
    make bench BENCH_ARGS="--gpu"                          # StarCoder-15.5B-shaped random weights on a CUDA GPU
    make bench BENCH_ARGS="--speculation"                  # speculative decoding on code workloads (bench/speculation.py)
    make bench-peer                                        # ours vs transformers serve vs seed (bench/compare.py)

Locally it starts two servers, both running at once on two ports but only one ever under load (an idle
server costs no CPU; the levels alternate between them): the server as configured (continuous batching)
and the same server with STARCODER_CONTINUOUS_BATCHING=0, which routes every request through the seed's
one-at-a-time ``generate()``. Both get the same load, and the throughput ratio at each concurrency level
is printed.

Results: without --label, .cache/bench/results/ (untracked: `make bench` never overwrites the committed
ones); with --label NAME, docs/bench/results-NAME.json and plot-NAME.png, for the docs. --out-dir overrides.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import os
import sys
from pathlib import Path

import httpx
from tqdm import tqdm

from bench import compare
from bench.loadgen import (
    BenchError,
    LevelResult,
    LoadSpec,
    RequestSample,
    WarmupCheck,
    full_length_prompt,
    make_client,
    one_request,
    run_level,
    warmup,
)
from bench.machine import loadavg, machine_info, prompts_for
from bench.mixed import MixedLevel, MixedSpec, mixed_table, run_mixed_level
from bench.peer import claim_port, truss_server_on
from bench.report import BenchReport, ServerRun, compute_mixed_ratios, compute_ratios, markdown_table, write

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCAL_PREDICT_PATH = "/v1/models/model:predict"
BASETEN_PREDICT_PATH = "/predict"
# name, description, extra environment for the server
LOCAL_SERVERS: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("batched", "this server, continuous batching on", {"STARCODER_CONTINUOUS_BATCHING": "1"}),
    (
        "seed",
        "STARCODER_CONTINUOUS_BATCHING=0: one request at a time through plain generate()",
        {"STARCODER_CONTINUOUS_BATCHING": "0"},
    ),
)


def concurrency_levels(max_concurrency: int) -> list[int]:
    """1, 2, 4, ... and always max_concurrency itself."""
    levels: list[int] = []
    level = 1
    while level < max_concurrency:
        levels.append(level)
        level *= 2
    levels.append(max_concurrency)
    return levels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_argument_group("target")
    target.add_argument("--base-url", help="drive this deployment instead of starting local servers")
    target.add_argument(
        "--api-key",
        default=os.environ.get("BASETEN_API_KEY"),
        help="sent as 'Authorization: Api-Key KEY' (default: $BASETEN_API_KEY)",
    )
    target.add_argument(
        "--predict-path", help=f"default {LOCAL_PREDICT_PATH} locally, {BASETEN_PREDICT_PATH} with --base-url"
    )
    target.add_argument("--no-seed", action="store_true", help="local: skip the seed (one-at-a-time) server")
    target.add_argument(
        "--gpu",
        action="store_true",
        help="in-process StarCoder-15.5B-shaped bench on CUDA (see python -m bench.gpu --help for its own options)",
    )
    load = parser.add_argument_group("load")
    load.add_argument(
        "--profile",
        choices=("greedy", "mixed", "both"),
        default="both",
        help="greedy: identical greedy requests; mixed: what real clients send (bench/mixed.py); both (default)",
    )
    load.add_argument("--prompt-tokens", type=int, default=32, help="prompt length P in tokens (default 32)")
    load.add_argument("--new-tokens", type=int, default=32, help="output length L per request (default 32)")
    load.add_argument(
        "--pin-length",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also send min_new_tokens = L; off: "
        "greedy requests, each verified to repeat the warm-up completion and counted at its length",
    )
    load.add_argument("--max-concurrency", type=int, default=16, help="levels 1, 2, 4, ... up to this (default 16)")
    load.add_argument("--levels", type=int, nargs="+", help="explicit concurrency levels instead")
    # Enough that the 16-client level lasts seconds, not a fraction of one: short levels are noisy.
    load.add_argument("--requests-per-client", type=int, default=20, help="requests each client sends (default 20)")
    load.add_argument(
        "--warmup-requests",
        type=int,
        default=4,
        help="unmeasured streamed requests, sent together, before the first level (default 4)",
    )
    load.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    load.add_argument(
        "--tokenizer",
        type=Path,
        help="tokenizer used to build the P-token prompt (default: the "
        "tiny model's, the server's own tokenizer locally); the server-reported count is recorded",
    )
    compare.add_arguments(parser)
    out = parser.add_argument_group("output")
    out.add_argument(
        "--label",
        help="results-<label>.json / plot-<label>.png (default local-cpu or remote; --compare: peer-local-cpu). "
        "A labelled run is one for the docs: it writes to docs/bench/ (committed); without --label the results "
        "go to .cache/bench/results/ (untracked)",
    )
    out.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="where to write (default: docs/bench with --label, else .cache/bench/results)",
    )
    out.add_argument(
        "--work-dir", type=Path, default=REPO_ROOT / ".cache" / "bench", help="server layouts and logs (local mode)"
    )
    return parser.parse_args(argv)


@dataclasses.dataclass
class Target:
    """One server under test and what has been measured against it so far."""

    name: str
    description: str
    spec: LoadSpec
    base_url: str = ""
    predict_path: str = LOCAL_PREDICT_PATH
    openai_path: str = "/v1"  # a Baseten deployment: "/sync/v1"
    check: WarmupCheck | None = None
    levels: list[LevelResult] = dataclasses.field(default_factory=list)
    mixed: list[MixedLevel] = dataclasses.field(default_factory=list)

    def result(self) -> ServerRun:
        assert self.check is not None
        return ServerRun(name=self.name, description=self.description, warmup=self.check, levels=self.levels)


async def drive(
    targets: list[Target], prompts: list[str], levels: list[int], warmup_requests: int, profile: str = "greedy"
) -> tuple[list[ServerRun], dict[str, list[MixedLevel]]]:
    """Warm every target up, then run each level against each target in turn.

    Interleaving per level (batched c=1, seed c=1, batched c=2, ...) rather than one server after
    the other spreads any background load on a shared machine over both servers alike.
    """
    clients = [make_client(t.spec, max(levels)) for t in targets]
    try:
        # One prompt for every target: the first whose greedy completion runs the full L tokens.
        first = targets[0]
        first.spec, first.check = await full_length_prompt(clients[0], first.spec, prompts)
        for target in targets[1:]:
            target.spec = target.spec.model_copy(update={"prompt": first.spec.prompt})
        for target, client in zip(targets, clients):
            target.check = await warmup(client, target.spec)
            print(
                f"[{target.name}] warm-up: prompt_tokens={target.check.prompt_tokens} "
                f"completion_tokens={target.check.completion_tokens} finish_reason={target.check.finish_reason} "
                f"({target.check.latency_s:.2f} s)",
                flush=True,
            )
            # The first requests pay one-off costs (allocator growth, thread pools, lazy imports); a
            # few streamed ones, sent together, keep those out of the first measured level.
            if warmup_requests:
                await asyncio.gather(*(one_request(client, target.spec) for _ in range(warmup_requests)))
        for concurrency in levels if profile in ("greedy", "both") else []:
            for target, client in zip(targets, clients):
                total = concurrency * target.spec.requests_per_client
                with tqdm(total=total, desc=f"{target.name} c={concurrency}", unit="req", leave=False) as bar:

                    def done(sample: RequestSample, bar: tqdm = bar) -> None:
                        bar.update(1)

                    level = await run_level(client, target.spec, concurrency, target.check, on_done=done)
                target.levels.append(level)
                print(
                    f"[{target.name}] c={concurrency:>3}: {level.output_tokens_per_s:8.1f} tok/s  "
                    f"p50 latency {level.latency_s.p50 or 0:.2f} s  failures {level.failures}",
                    flush=True,
                )
                if level.failures:
                    print(f"[{target.name}]   errors: {level.errors}", flush=True)
        for concurrency in levels if profile in ("mixed", "both") else []:
            for target, client in zip(targets, clients):
                await drive_mixed_level(target, client, concurrency)
    finally:
        for client in clients:
            await client.aclose()
    return [t.result() for t in targets], {t.name: t.mixed for t in targets if t.mixed}


async def drive_mixed_level(target: Target, client: httpx.AsyncClient, concurrency: int) -> None:
    spec = MixedSpec(
        base_url=target.base_url,
        predict_path=target.predict_path,
        openai_path=target.openai_path,
        prompt=target.spec.prompt,
        new_tokens=target.spec.max_new_tokens,
        requests_per_client=target.spec.requests_per_client,
        timeout_s=target.spec.timeout_s,
        headers=target.spec.headers,
    )
    total = concurrency * spec.requests_per_client
    with tqdm(total=total, desc=f"{target.name} mixed c={concurrency}", unit="req", leave=False) as bar:
        level = await run_mixed_level(client, spec, concurrency, on_done=lambda _: bar.update(1))
    target.mixed.append(level)
    print(
        f"[{target.name}] mixed c={concurrency:>3}: {level.output_tokens_per_s:8.1f} tok/s  failures {level.failures}",
        flush=True,
    )
    if level.failures:
        print(f"[{target.name}]   errors: {level.errors}", flush=True)


Runs = tuple[list[ServerRun], dict[str, list[MixedLevel]]]


def run_local(args: argparse.Namespace, levels: list[int]) -> tuple[Runs, str]:
    from devtools.tiny_model import build_tiny_model
    from devtools.truss_local import DEFAULT_TINY_MODEL_DIR

    model_dir = build_tiny_model(DEFAULT_TINY_MODEL_DIR)
    prompts = prompts_for(args, args.tokenizer or model_dir)
    env = {"STARCODER_CHECKPOINT": str(model_dir), "STARCODER_DTYPE": "float32", "STARCODER_DEVICE": "cpu"}
    servers = LOCAL_SERVERS[:1] if args.no_seed else LOCAL_SERVERS
    targets: list[Target] = []
    ports: set[int] = set()
    # Both run at once but only one is ever under load; an idle server costs no CPU.
    with contextlib.ExitStack() as running:
        for name, description, extra in servers:
            work = args.work_dir / name
            work.mkdir(parents=True, exist_ok=True)
            port = claim_port(ports)
            print(f"[{name}] starting the Truss server on port {port} (log {work / 'server.log'})", flush=True)
            server = truss_server_on(running, port, work, {**env, **extra})
            spec = LoadSpec(
                predict_url=server.base_url + (args.predict_path or LOCAL_PREDICT_PATH),
                prompt=prompts[0],
                max_new_tokens=args.new_tokens,
                requests_per_client=args.requests_per_client,
                timeout_s=args.timeout,
                pin_length=args.pin_length,
            )
            targets.append(Target(name, description, spec, server.base_url, args.predict_path or LOCAL_PREDICT_PATH))
        runs = asyncio.run(drive(targets, prompts, levels, args.warmup_requests, args.profile))
        return runs, "http://127.0.0.1 (local Truss servers)"


def run_remote(args: argparse.Namespace, levels: list[int]) -> tuple[Runs, str]:
    from devtools.tiny_model import build_tiny_model
    from devtools.truss_local import DEFAULT_TINY_MODEL_DIR

    base_url = args.base_url.rstrip("/")
    headers = {"Authorization": f"Api-Key {args.api_key}"} if args.api_key else {}
    prompts = prompts_for(args, args.tokenizer or build_tiny_model(DEFAULT_TINY_MODEL_DIR))
    spec = LoadSpec(
        predict_url=base_url + (args.predict_path or BASETEN_PREDICT_PATH),
        prompt=prompts[0],
        max_new_tokens=args.new_tokens,
        requests_per_client=args.requests_per_client,
        timeout_s=args.timeout,
        headers=headers,
        pin_length=args.pin_length,
    )
    target = Target(
        "remote", f"deployment at {base_url}", spec, base_url, args.predict_path or BASETEN_PREDICT_PATH, "/sync/v1"
    )
    return asyncio.run(drive([target], prompts, levels, args.warmup_requests, args.profile)), base_url


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--speculation" in argv:  # its own options: python -m bench.speculation --help
        from bench import speculation

        return speculation.main([arg for arg in argv if arg != "--speculation"])
    args = parse_args(argv)
    if args.gpu:
        from bench import gpu

        return gpu.main(argv)
    if args.compare:
        return compare.main(args)
    levels = sorted(set(args.levels)) if args.levels else concurrency_levels(args.max_concurrency)
    if min(levels) < 1:
        raise SystemExit("concurrency levels must be >= 1")
    remote = args.base_url is not None
    load_before = loadavg()
    try:
        (runs, mixed), target = run_remote(args, levels) if remote else run_local(args, levels)
    except BenchError as error:
        print(f"bench failed: {error}", file=sys.stderr)
        return 1
    batched, seed = (runs[0], runs[1]) if len(runs) == 2 else (None, None)
    report = BenchReport(
        label=args.label or ("remote" if remote else "local-cpu"),
        mode="remote" if remote else "local",
        created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        machine={
            **machine_info(),
            "loadavg_1_5_15_before": load_before,
            "loadavg_1_5_15_after": loadavg(),
            **({"note": "the load generator's machine, not the server's"} if remote else {}),
        },
        target=target,
        predict_path=args.predict_path or (BASETEN_PREDICT_PATH if remote else LOCAL_PREDICT_PATH),
        prompt_tokens_requested=args.prompt_tokens,
        new_tokens=args.new_tokens,
        requests_per_client=args.requests_per_client,
        runs=runs,
        ratios=compute_ratios(batched, seed) if batched and seed and batched.levels else [],
        mixed=mixed,
        mixed_ratios=compute_mixed_ratios(mixed["batched"], mixed["seed"]) if {"batched", "seed"} <= set(mixed) else [],
    )
    json_path, png_path = write(report, compare.results_dir(args))
    print()
    print(markdown_table(report))
    if report.ratios:
        print()
        for ratio in report.ratios:
            shown = "n/a" if ratio.ratio is None else f"{ratio.ratio:.2f}x"
            print(
                f"c={ratio.concurrency:>3}: batched {ratio.batched_tokens_per_s:8.1f} tok/s / seed "
                f"{ratio.seed_tokens_per_s:8.1f} tok/s = {shown}"
            )
    if report.mixed:
        print()
        print(mixed_table(report.mixed))
        for ratio in report.mixed_ratios:
            shown = "n/a" if ratio.ratio is None else f"{ratio.ratio:.2f}x"
            print(
                f"mixed c={ratio.concurrency:>3}: batched {ratio.batched_tokens_per_s:8.1f} tok/s / seed "
                f"{ratio.seed_tokens_per_s:8.1f} tok/s = {shown}"
            )
    print(
        f"\nwrote {json_path.relative_to(REPO_ROOT) if json_path.is_relative_to(REPO_ROOT) else json_path} and "
        f"{png_path.relative_to(REPO_ROOT) if png_path.is_relative_to(REPO_ROOT) else png_path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
