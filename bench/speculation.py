"""Speculative decoding on the workloads a code tool sends: `make bench BENCH_ARGS="--speculation"`.

Three workloads, each built from functions of this repository's own source (code the embedded model never saw:
it was trained on the standard library), all greedy, as editors ask:

* **edit**: a prompt that holds a function, answered by its rewrite (the function, then its first line again);
* **fim**: fill-in-the-middle, the function's head as prefix and its last lines as suffix;
* **fresh**: a function's signature and docstring, answered by a new body.

Measured, each on the real Truss server with speculation on (``STARCODER_SPECULATIVE_TOKENS``, default) and off
(``=0``), 3 runs: tokens/s, p50/p95 latency, acceptance rate and tokens per step (from the server's
``starcoder_speculative_*`` gauges) at 1 client, and tokens/s at 16 clients. In process, on the same model and
prompts: transformers' own prompt lookup (``generate(prompt_lookup_num_tokens=8)``) and plain ``generate()``;
and the batch with *oracle* drafts (``drafting.OracleDrafter``: every draft right, half of them, none) against
speculation off, at 1 and 16 clients, with the policy (what a deployment does) and with a fixed ``k``
(the raw cost of checking a wrong draft).

Results: ``.cache/bench/speculation.json``; with ``--label NAME``, ``docs/bench/results-NAME.json``.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import json
import re
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.machine import loadavg, machine_info
from bench.peer import claim_port, truss_server_on

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIR = REPO_ROOT / "packages" / "starcoder_serving"
CODE_MODEL_DIR = REPO_ROOT / "devtools" / "code_model"
WORKLOADS = ("edit", "fim", "fresh")
SPECULATIVE_TOKENS = 8


def source_functions(count: int, min_lines: int = 8, max_lines: int = 24) -> list[str]:
    """Functions of this repository's package, in a fixed order, each 8-24 lines."""
    functions: list[str] = []
    for path in sorted(SOURCE_DIR.rglob("*.py")):
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno is not None:
                body = lines[node.lineno - 1 : node.end_lineno]
                indent = len(body[0]) - len(body[0].lstrip())
                if min_lines <= len(body) <= max_lines and node.decorator_list == []:
                    functions.append("\n".join(line[indent:] for line in body) + "\n")
    # Spread over the package, not the first file's functions only.
    step = max(1, len(functions) // count)
    return functions[::step][:count]


def workload_requests(name: str, functions: Sequence[str], max_tokens: int) -> list[dict[str, Any]]:
    """/v1/completions bodies (greedy) for one workload."""
    requests = []
    for function in functions:
        lines = function.splitlines(keepends=True)
        body: dict[str, Any] = {"model": "starcoder", "max_tokens": max_tokens, "temperature": 0}
        if name == "edit":
            body["prompt"] = f"{function}\n\n# The same function, rewritten:\n{lines[0]}"
        elif name == "fim":
            cut = max(2, len(lines) // 2)
            body["prompt"] = "".join(lines[:cut])
            body["suffix"] = "".join(lines[-2:])
        else:
            signature = lines[0]
            docstring = re.match(r'\s*("""[\s\S]*?""")', "".join(lines[1:]))
            body["prompt"] = signature + (f"    {docstring.group(1)}\n" if docstring else "")
        requests.append(body)
    return requests


async def metrics(client: httpx.AsyncClient, base_url: str) -> tuple[float, float]:
    """(draft tokens fed, kept) from the server's Prometheus gauges."""
    text = (await client.get(f"{base_url}/metrics/")).text

    def value(name: str) -> float:
        found = re.search(rf"^{name} (\S+)$", text, flags=re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    return value("starcoder_speculative_draft_tokens"), value("starcoder_speculative_accepted_tokens")


async def one_client(client: httpx.AsyncClient, url: str, bodies: Sequence[dict[str, Any]]) -> list[tuple[float, int]]:
    samples = []
    for body in bodies:
        started = time.perf_counter()
        response = await client.post(url, json=body)
        response.raise_for_status()
        samples.append((time.perf_counter() - started, int(response.json()["usage"]["completion_tokens"])))
    return samples


async def measure_server(base_url: str, bodies: list[dict[str, Any]], clients: int) -> dict[str, Any]:
    url = f"{base_url}/v1/completions"
    async with httpx.AsyncClient(timeout=600) as client:
        await one_client(client, url, bodies[:1])  # warm
        drafted0, kept0 = await metrics(client, base_url)
        started = time.perf_counter()
        per_client = await asyncio.gather(*(one_client(client, url, share) for share in rotations(bodies, clients)))
        wall = time.perf_counter() - started
        drafted1, kept1 = await metrics(client, base_url)
    samples = [sample for samples in per_client for sample in samples]
    tokens = sum(count for _, count in samples)
    latencies = sorted(latency for latency, _ in samples)
    kept = kept1 - kept0
    return {
        "clients": clients,
        "requests": len(samples),
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p95_ms": 1000 * latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
        "drafted": drafted1 - drafted0,
        "accepted": kept,
        "acceptance": kept / (drafted1 - drafted0) if drafted1 > drafted0 else 0.0,
        # Each step gives the model's own token plus the drafts it kept.
        "tokens_per_step": tokens / max(1.0, tokens - kept),
    }


def rotations(items: list[Any], clients: int) -> list[list[Any]]:
    """What each of ``clients`` closed-loop clients sends: every item, client i starting at item i (the first client
    in the given order), so the batch stays full and no two clients ask for the same thing at once."""
    return [items[i % len(items) :] + items[: i % len(items)] for i in range(clients)]


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_servers(args: argparse.Namespace, requests: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    env = {"STARCODER_CHECKPOINT": str(args.model.resolve()), "STARCODER_DTYPE": "float32", "STARCODER_DEVICE": "cpu"}
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as running:
        servers = {}
        ports: set[int] = set()
        for name, tokens in (("on", args.speculative_tokens), ("off", 0)):
            work = args.work_dir / f"speculation-{name}"
            work.mkdir(parents=True, exist_ok=True)
            port = claim_port(ports)
            print(f"[speculation {name}] starting the Truss server on port {port} (log {work / 'server.log'})")
            extra = {"STARCODER_SPECULATIVE_TOKENS": str(tokens), **dict(kv.split("=", 1) for kv in args.server_env)}
            servers[name] = truss_server_on(running, port, work, {**env, **extra}).base_url
        levels = [(workload, 1) for workload in WORKLOADS] + [("mixed", args.clients)]
        levels = [level for level in levels if not args.levels or level[0] in args.levels]
        for workload, clients in levels:
            bodies = (
                [body for name in WORKLOADS for body in requests[name]] if workload == "mixed" else requests[workload]
            )
            runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
            for _ in range(args.runs):  # alternate, so a slow spell of the machine hits both
                for name in ("off", "on"):
                    runs[name].append(asyncio.run(measure_server(servers[name], bodies, clients)))
            key = f"{workload}@{clients}"
            results[key] = {name: runs[name] for name in runs}
            on = [r["tokens_per_s"] for r in runs["on"]]
            off = [r["tokens_per_s"] for r in runs["off"]]
            results[key]["speedup"] = spread([a / b for a, b in zip(on, off)])
            print(
                f"{key:10s} on {spread(on)['median']:7.1f} tok/s  off {spread(off)['median']:7.1f} tok/s  "
                f"speedup {results[key]['speedup']['median']:.2f}x "
                f"({results[key]['speedup']['min']:.2f}-{results[key]['speedup']['max']:.2f})  "
                f"acceptance {statistics.median(r['acceptance'] for r in runs['on']):.2f}  "
                f"tokens/step {statistics.median(r['tokens_per_step'] for r in runs['on']):.2f}",
                flush=True,
            )
    return results


def run_in_process(args: argparse.Namespace, requests: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """transformers' prompt lookup and plain generate(), and the batch with oracle drafts (no HTTP)."""
    import torch
    from starcoder_serving.engine import cpu_threads
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa").eval()
    cpu_threads.install(model, None)  # the server's thread policy
    eos = tokenizer.eos_token_id
    results: dict[str, Any] = {}
    prompts = {name: [tokenizer(_prompt_text(body))["input_ids"] for body in requests[name]] for name in WORKLOADS}
    for name in WORKLOADS:
        rows = {}
        for label, extra in (
            ("generate", {}),
            ("prompt_lookup", {"prompt_lookup_num_tokens": args.speculative_tokens}),
        ):
            rates = []
            for _ in range(args.runs):
                tokens = 0
                started = time.perf_counter()
                for ids in prompts[name]:
                    with torch.no_grad():
                        out = model.generate(
                            torch.tensor([ids]),
                            max_new_tokens=args.max_tokens,
                            do_sample=False,
                            eos_token_id=eos,
                            pad_token_id=eos,
                            **extra,
                        )
                    tokens += out.shape[1] - len(ids)
                rates.append(tokens / (time.perf_counter() - started))
            rows[label] = spread(rates)
        # The same prompts through the batch in process (no HTTP): speculation's own efficiency against prompt lookup's.
        for label, tokens in (("batch_off", 0), ("batch_ngram", args.speculative_tokens)):
            batch = worker(model, tokens, None, eos)
            try:
                generate_all(batch, prompts[name][:1], args.max_tokens, 1)  # warm
                rows[label] = spread(
                    [generate_all(batch, prompts[name], args.max_tokens, 1)[1] for _ in range(args.runs)]
                )
            finally:
                batch.shutdown()
        results[name] = rows
        print(
            f"{name:6s} generate() {rows['generate']['median']:7.1f} tok/s   "
            f"generate(prompt_lookup_num_tokens={args.speculative_tokens}) {rows['prompt_lookup']['median']:7.1f} tok/s   "
            f"batch in process: off {rows['batch_off']['median']:7.1f}, n-gram {rows['batch_ngram']['median']:7.1f} tok/s",
            flush=True,
        )
    if not args.skip_oracle:
        results["oracle"] = oracle(args, model, [ids for name in WORKLOADS for ids in prompts[name]], eos)
    return results


def _prompt_text(body: dict[str, Any]) -> str:
    if "suffix" in body:
        return f"<fim_prefix>{body['prompt']}<fim_suffix>{body['suffix']}<fim_middle>"
    return str(body["prompt"])


def oracle(args: argparse.Namespace, model: Any, prompts: list[list[int]], eos: int) -> dict[str, Any]:
    """Tokens/s of the batch with drafts of a set acceptance, against speculation off, at 1 and 16 clients."""
    from starcoder_serving.engine.drafting import OracleDrafter

    baseline_worker = worker(model, 0, None, eos)
    try:
        references = generate_all(baseline_worker, prompts, args.max_tokens, 1)[0]
        off = {
            clients: [generate_all(baseline_worker, prompts, args.max_tokens, clients)[1] for _ in range(args.runs)]
            for clients in (1, args.clients)
        }
    finally:
        baseline_worker.shutdown()
    sequences = [[*prompt, *tokens] for prompt, tokens in zip(prompts, references)]
    results: dict[str, Any] = {}
    for policy in ("adaptive", "fixed"):
        for acceptance in (0.0, 0.5, 1.0):
            drafter = OracleDrafter(sequences, acceptance, model.config.vocab_size)
            batch = worker(model, args.speculative_tokens, drafter, eos, adaptive=policy == "adaptive")
            try:
                for clients in (1, args.clients):
                    rates = [generate_all(batch, prompts, args.max_tokens, clients)[1] for _ in range(args.runs)]
                    ratio = spread([a / b for a, b in zip(rates, off[clients])])
                    results[f"{policy}/{acceptance:.0%}@{clients}"] = {"tokens_per_s": spread(rates), "vs_off": ratio}
                    print(
                        f"oracle {policy:8s} {acceptance:4.0%} @{clients:2d}: {spread(rates)['median']:7.1f} tok/s, "
                        f"{ratio['median']:.2f}x off ({ratio['min']:.2f}-{ratio['max']:.2f})",
                        flush=True,
                    )
            finally:
                batch.shutdown()
    results["off"] = {f"@{clients}": spread(rates) for clients, rates in off.items()}
    return results


def worker(model: Any, speculative_tokens: int, drafter: Any, eos: int, adaptive: bool = True, **sizing: Any) -> Any:
    """The batch as a CPU server builds it (engine.py: 512-token steps, 256 pages of 256 tokens); ``sizing``
    overrides (a GPU's: kv_num_blocks None and a kv_memory_fraction)."""
    from starcoder_serving.engine.batch_worker import BatchedWorker

    options: dict[str, Any] = {
        "max_requests": 64,
        "max_batch_sequences": 64,
        "max_batch_tokens": 512,
        "kv_num_blocks": 256,
        "kv_page_size": 256,
        "kv_memory_fraction": None,
        "prefix_sharing": True,
        **sizing,
    }
    return BatchedWorker(
        model,
        eos_token_ids={eos},
        logits_width=model.config.vocab_size,
        speculative_tokens=speculative_tokens,
        drafter=drafter,
        adaptive_speculation=adaptive,
        **options,
    )


def generate_all(batch: Any, prompts: list[list[int]], max_tokens: int, clients: int) -> tuple[list[list[int]], float]:
    """Every prompt through ``batch`` by ``clients`` closed-loop clients (each sends every prompt, starting at its own
    offset); the first client's outputs by prompt, and tokens/s over all of them."""
    from starcoder_serving.engine.jobs import GenerationPlan, Job
    from starcoder_serving.engine.sampling_params import SamplingParams
    from starcoder_serving.events import TokenEvent

    loop = asyncio.new_event_loop()

    async def one(prompt: list[int]) -> list[int]:
        job = Job(GenerationPlan(prompt, SamplingParams(max_new_tokens=max_tokens)), loop, quiet=True)
        batch.submit(job)
        tokens: list[int] = []
        while True:
            for event in await job.next_events():
                if isinstance(event, TokenEvent):
                    tokens.extend(event.token_ids)
                else:
                    return tokens

    async def client(order: list[list[int]]) -> list[list[int]]:
        return [await one(prompt) for prompt in order]

    async def everyone() -> list[list[list[int]]]:
        return list(await asyncio.gather(*(client(order) for order in rotations(prompts, clients))))

    started = time.perf_counter()
    outputs = loop.run_until_complete(everyone())
    wall = time.perf_counter() - started
    loop.close()
    return outputs[0], sum(len(tokens) for out in outputs for tokens in out) / wall


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=CODE_MODEL_DIR, help="checkpoint (default: the embedded one)")
    parser.add_argument("--prompts", type=int, default=8, help="functions per workload")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--speculative-tokens", type=int, default=SPECULATIVE_TOKENS, help="k for 'on' (default 8)")
    parser.add_argument("--skip-server", action="store_true", help="only the in-process measurements")
    parser.add_argument("--levels", nargs="*", default=[], help="only these server levels (edit, fim, fresh, mixed)")
    parser.add_argument("--server-env", nargs="*", default=[], help="KEY=VALUE for both servers (experiments)")
    parser.add_argument("--skip-in-process", action="store_true", help="only the servers")
    parser.add_argument("--skip-oracle", action="store_true", help="in process: only generate() and prompt lookup")
    parser.add_argument("--label", help="write docs/bench/results-LABEL.json")
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / ".cache" / "bench")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    functions = source_functions(args.prompts)
    requests = {name: workload_requests(name, functions, args.max_tokens) for name in WORKLOADS}
    report: dict[str, Any] = {
        "command": 'make bench BENCH_ARGS="--speculation"',
        "machine": machine_info(),
        "loadavg_before": loadavg(),
        "model": str(args.model.relative_to(REPO_ROOT)) if args.model.is_relative_to(REPO_ROOT) else str(args.model),
        "speculative_tokens": args.speculative_tokens,
        "max_tokens": args.max_tokens,
        "prompts_per_workload": len(functions),
        "runs": args.runs,
    }
    if not args.skip_server:
        report["server"] = run_servers(args, requests)
    if not args.skip_in_process:
        report["in_process"] = run_in_process(args, requests)
    report["loadavg_after"] = loadavg()
    out = (
        REPO_ROOT / "docs" / "bench" / f"results-{args.label}.json"
        if args.label
        else args.work_dir / "speculation.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
