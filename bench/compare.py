"""`make bench-peer` (``python -m bench.run --compare``): our server, transformers' own server and the seed,
on the same tiny checkpoint and the same CPU.

Servers (all on 127.0.0.1, ports 18080-18099; all started before the first request and stopped at the end,
also on error; an idle one costs no CPU):

* ``ours``: the real Truss server, continuous batching on (as ``make bench`` starts it);
* ``peer``: ``transformers serve --continuous-batching`` (bench/peer.py), from its own venv;
* ``seed``: the Truss server with STARCODER_CONTINUOUS_BATCHING=0 (one request at a time through generate());
* ``ours-noshare``: ours with STARCODER_PREFIX_SHARING=0, for the keystroke loop only.

Each round runs every measurement once, server after server (round r: ours at one level, the peer at
it, the seed at it, the next level, ...), so background load on a shared machine hits each server alike:

1. greedy ``/v1/completions`` at each client level (1, 4, 16), not streamed and streamed, L new tokens;
2. greedy streamed ``predict``, ours and the seed, at 1 and 16 clients (``make bench``'s measurement);
3. the keystroke loop: one client, a fill-in-the-middle prompt of ~6,000 tokens whose prefix grows by
   three characters a request (typing), 16 new tokens, not streamed.

Lengths: every greedy request must generate exactly L tokens. The prompt is the first P-token candidate
whose greedy completion on ours runs the full L tokens without an end-of-text (bench/loadgen.py), and
each server's own count (``usage.completion_tokens``; predict: its warm-up's) is checked on every request:
a request with another count is a failure. The peer has no ``min_tokens`` / ``ignore_eos`` (it answers
422 for unknown fields), so the length cannot be pinned otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import itertools
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from bench.compare_report import CompareReport, Measurement, markdown, summarise, write
from bench.loadgen import (
    BenchError,
    LoadSpec,
    RequestSample,
    StreamClock,
    WarmupCheck,
    build_prompt,
    closed_loop,
    full_length_prompt,
    make_client,
    run_level,
    summarize,
    warmup,
)
from bench.machine import loadavg, machine_info, prompts_for
from bench.peer import claim_port, ensure_peer_venv, running_peer, truss_server_on

# Our Truss servers: name, description, extra environment.
TRUSS_SERVERS: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("ours", "this server, continuous batching on, prefix sharing on", {"STARCODER_CONTINUOUS_BATCHING": "1"}),
    (
        "ours-noshare",
        "this server with STARCODER_PREFIX_SHARING=0 (keystroke loop only)",
        {"STARCODER_CONTINUOUS_BATCHING": "1", "STARCODER_PREFIX_SHARING": "0"},
    ),
    (
        "seed",
        "STARCODER_CONTINUOUS_BATCHING=0: one request at a time through plain generate()",
        {"STARCODER_CONTINUOUS_BATCHING": "0"},
    ),
)
GREEDY_SERVERS = ("ours", "peer", "seed")
PREDICT_SERVERS = ("ours", "seed")
KEYSTROKE_SERVERS = ("ours", "ours-noshare", "peer", "seed")
FIM = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")
# What the keystroke loop "types", three characters a request, at the end of the FIM prefix.
TYPED = "    total = sum(item.price * item.count for item in order.items if item.count > 0)\n"


# Where results go: an unlabelled run (`make bench`) writes under .cache/ (untracked), so it never overwrites the
# committed results; a run given --label is one for the docs and writes to docs/bench/ (either way --out-dir wins).
DOCS_RESULTS_DIR = Path(__file__).resolve().parent.parent / "docs" / "bench"
LOCAL_RESULTS_DIR = Path(__file__).resolve().parent.parent / ".cache" / "bench" / "results"


def results_dir(args: argparse.Namespace) -> Path:
    if args.out_dir is not None:
        return Path(args.out_dir)
    return DOCS_RESULTS_DIR if args.label else LOCAL_RESULTS_DIR


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("peer comparison (--compare)")
    group.add_argument(
        "--compare",
        action="store_true",
        help="ours vs transformers serve --continuous-batching vs the seed, locally (bench/compare.py); "
        "installs the peer into --peer-venv on first use",
    )
    group.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    group.add_argument(
        "--requests-per-level",
        type=int,
        default=64,
        help="requests per /v1/completions or predict level, spread over its clients (default 64)",
    )
    group.add_argument("--predict-levels", type=int, nargs="+", default=[1, 16], help="predict levels (default 1 16)")
    group.add_argument(
        "--keystrokes", type=int, default=25, help="keystroke requests per server per round (default 25)"
    )
    group.add_argument(
        "--keystroke-tokens",
        type=int,
        default=6000,
        help="the keystroke loop's first FIM prompt, in tokens (default 6000)",
    )
    group.add_argument("--keystroke-new-tokens", type=int, default=16, help="new tokens per keystroke (default 16)")
    group.add_argument("--peer-venv", type=Path, help="the peer's virtual environment (default WORK_DIR/peer-venv)")
    group.add_argument(
        "--quick",
        action="store_true",
        help="a fast check of the whole path: 1 round, levels 1 4, predict 1, 16 requests a level, 5 keystrokes",
    )


def apply_quick(args: argparse.Namespace) -> None:
    if args.quick:
        args.rounds, args.levels, args.predict_levels = 1, [1, 4], [1]
        args.requests_per_level, args.keystrokes = 16, 5


def completions_body(model: str, prompt: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    """One greedy /v1/completions request, the same body for every server.

    ``model`` is the checkpoint directory: the peer serves only the model it preloaded and refuses
    another name; ours accepts any. The peer ignores ``stream_options`` (it always ends a stream with
    ``usage``); ours needs it for ``usage``.
    """
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


async def one_completion(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> RequestSample:
    """One /v1/completions request: latency, streamed TTFT and chunk gaps, the text and the server's token count."""
    clock = StreamClock()
    try:
        if not body.get("stream"):
            response = await client.post(url, json=body)
            if response.status_code != 200:
                return clock.failed(f"HTTP {response.status_code}: {response.text[:200]}")
            payload = response.json()
            text, tokens = payload["choices"][0]["text"], int(payload["usage"]["completion_tokens"])
            return clock.done(text=text, completion_tokens=tokens)
        parts: list[str] = []
        usage: int | None = None
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                error = (await response.aread()).decode(errors="replace")[:200]
                return clock.failed(f"HTTP {response.status_code}: {error}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line.removeprefix("data: "))
                if "error" in event:
                    return clock.failed(f"stream error: {str(event['error'])[:200]}")
                text = "".join(choice.get("text") or "" for choice in event.get("choices") or [])
                if text:  # TTFT: the first event that carries generated text
                    clock.tick()
                    parts.append(text)
                if event.get("usage"):
                    usage = int(event["usage"]["completion_tokens"])
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        return clock.failed(f"{type(exc).__name__}: {exc}")
    if usage is None:
        return clock.failed("no usage in the stream")
    return clock.done(text="".join(parts), completion_tokens=usage)


async def completion_warmup(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> WarmupCheck:
    """One non-streamed request (also the peer's first: it builds its batch manager then); its check."""
    started = time.perf_counter()
    response = await client.post(url, json={**body, "stream": False})
    if response.status_code != 200:
        raise BenchError(f"warm-up of {url} got HTTP {response.status_code}: {response.text[:500]}")
    payload = response.json()
    try:
        return WarmupCheck(
            prompt_tokens=int(payload["usage"]["prompt_tokens"]),
            completion_tokens=int(payload["usage"]["completion_tokens"]),
            finish_reason=str(payload["choices"][0]["finish_reason"]),
            latency_s=time.perf_counter() - started,
            completion=str(payload["choices"][0]["text"]),
        )
    except (KeyError, IndexError, TypeError, ValueError):
        raise BenchError(f"warm-up of {url} got an unexpected body: {str(payload)[:500]}") from None


def keystroke_prompts(tokenizer: Any, prompt_tokens: int, count: int) -> list[str]:
    """``count`` raw FIM prompts, the first of about ``prompt_tokens`` tokens, each prefix 3 characters longer.

    Both servers get the same raw string on /v1/completions, so the model sees the same tokens on both:
    the peer's ``suffix`` is not fill-in-the-middle (it appends the suffix to the completion), so ours'
    ``prompt`` + ``suffix`` form is not used. The FIM markers are special tokens in the prompt on both.
    """
    suffix_tokens = max(1, prompt_tokens // 12)
    prefix = build_prompt(tokenizer, prompt_tokens - suffix_tokens - len(FIM))
    suffix = build_prompt(tokenizer, suffix_tokens, variant=5)
    typed = TYPED * math.ceil(3 * count / len(TYPED) + 1)
    return [f"{FIM[0]}{prefix}{typed[: 3 * k]}{FIM[1]}{suffix}{FIM[2]}" for k in range(count)]


class Comparison:
    """The servers, one HTTP client, and the measurements so far."""

    def __init__(self, args: argparse.Namespace, urls: dict[str, str], model: str, prompts: list[str]) -> None:
        self.args = args
        self.urls = urls
        self.model = model
        self.prompts = prompts
        self.measurements: list[Measurement] = []
        self.warmups: dict[str, WarmupCheck] = {}
        self.notes: list[str] = []
        self.spec = LoadSpec(
            predict_url=urls["ours"] + "/v1/models/model:predict",
            prompt=prompts[0],
            max_new_tokens=args.new_tokens,
            requests_per_client=1,
            timeout_s=args.timeout,
        )
        self.keystrokes: list[str] = []

    def per_client(self, concurrency: int) -> int:
        return max(1, math.ceil(self.args.requests_per_level / concurrency))

    def record(self, measurement: Measurement) -> None:
        self.measurements.append(measurement)
        level = measurement.level
        stream = "stream" if measurement.streamed else "      "
        ttft = f"  TTFT p50 {level.ttft_s.p50 * 1000:6.0f} ms" if level.ttft_s.p50 is not None else ""
        print(
            f"[r{measurement.round} {measurement.test:9} {measurement.server:12} c={measurement.concurrency:>2} {stream}] "
            f"{level.output_tokens_per_s:7.0f} tok/s  p50 {(level.latency_s.p50 or 0) * 1000:6.0f} ms{ttft}"
            f"  failed {level.failures}/{level.requests}" + (f" {level.errors}" if level.failures else ""),
            flush=True,
        )

    async def prepare(self, client: httpx.AsyncClient, tokenizer: Any) -> None:
        """Pick the prompt on ours, then warm every server up and check that each generates L tokens."""
        self.spec, self.warmups["ours predict"] = await full_length_prompt(client, self.spec, self.prompts)
        prompt_tokens = self.warmups["ours predict"].prompt_tokens
        for server in GREEDY_SERVERS:
            body = completions_body(self.model, self.spec.prompt, self.args.new_tokens, stream=False)
            check = await completion_warmup(client, self.urls[server] + "/v1/completions", body)
            self.warmups[f"{server} openai"] = check
            print(
                f"[{server}] warm-up: prompt_tokens={check.prompt_tokens} completion_tokens={check.completion_tokens} "
                f"finish_reason={check.finish_reason} ({check.latency_s:.2f} s)",
                flush=True,
            )
            if check.completion_tokens != self.args.new_tokens:
                raise BenchError(
                    f"{server} generated {check.completion_tokens} tokens for max_tokens={self.args.new_tokens} "
                    f"(finish_reason={check.finish_reason}); the comparison needs exactly that many"
                )
            if check.prompt_tokens != prompt_tokens:
                self.notes.append(f"{server} counts {check.prompt_tokens} prompt tokens, ours predict {prompt_tokens}")
            ours = self.warmups["ours openai"]
            if check.completion != ours.completion:
                self.notes.append(f"{server}'s greedy text differs from ours for the same prompt: {check.completion!r}")
            # One-off costs (thread pools, allocator growth) out of the first measured level.
            stream_body = completions_body(self.model, self.spec.prompt, self.args.new_tokens, stream=True)
            await asyncio.gather(
                *(one_completion(client, self.urls[server] + "/v1/completions", stream_body) for _ in range(4))
            )
        for server in PREDICT_SERVERS:
            self.warmups[f"{server} predict"] = await warmup(client, self.predict_spec(server, 1))
        await self.prepare_keystrokes(client, tokenizer)
        self.notes.append(
            f"greedy prompt: {prompt_tokens} tokens; keystroke prompt: "
            f"{self.warmups['ours keystroke'].prompt_tokens} tokens at first"
        )

    async def prepare_keystrokes(self, client: httpx.AsyncClient, tokenizer: Any) -> None:
        """The typing's prompts; every server opens the file (its first prompt, unmeasured, any length).

        Whether each measured keystroke generates the full length is checked request by request: the
        servers get the same prompts, so an early end-of-text would end each of them alike.
        """
        count = 1 + self.args.rounds * self.args.keystrokes
        self.keystrokes = keystroke_prompts(tokenizer, self.args.keystroke_tokens, count)
        body = completions_body(self.model, self.keystrokes[0], self.args.keystroke_new_tokens, stream=False)
        for server in KEYSTROKE_SERVERS:
            check = await completion_warmup(client, self.urls[server] + "/v1/completions", body)
            self.warmups[f"{server} keystroke"] = check

    def predict_spec(self, server: str, concurrency: int) -> LoadSpec:
        return self.spec.model_copy(
            update={
                "predict_url": self.urls[server] + "/v1/models/model:predict",
                "requests_per_client": self.per_client(concurrency),
            }
        )

    def bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, unit="req", leave=False, disable=None)  # None: off without a terminal

    async def greedy_level(
        self, client: httpx.AsyncClient, round_: int, server: str, concurrency: int, streamed: bool
    ) -> None:
        check = self.warmups[f"{server} openai"]
        url = self.urls[server] + "/v1/completions"
        body = completions_body(self.model, self.spec.prompt, self.args.new_tokens, stream=streamed)
        per_client = self.per_client(concurrency)
        with self.bar(concurrency * per_client, f"{server} c={concurrency}") as bar:
            samples, wall = await closed_loop(
                lambda: one_completion(client, url, body), concurrency, per_client, lambda _: bar.update(1)
            )
        level = summarize(concurrency, samples, wall, check)
        differing = [
            s.text
            for s in samples
            if s.ok and s.completion_tokens == check.completion_tokens and s.text != check.completion
        ]
        if differing and not any(note.startswith(f"{server} streamed text") for note in self.notes):
            self.notes.append(
                f"{server} streamed text (joined chunks) differs from its non-streamed text at the same token count, "
                f"e.g. {differing[0]!r} vs {check.completion!r}"
            )
        self.record(
            Measurement(
                round=round_,
                test="openai",
                server=server,
                streamed=streamed,
                concurrency=concurrency,
                level=level,
                text_mismatches=len(differing),
            )
        )

    async def predict_level(self, client: httpx.AsyncClient, round_: int, server: str, concurrency: int) -> None:
        spec = self.predict_spec(server, concurrency)
        with self.bar(concurrency * spec.requests_per_client, f"{server} predict c={concurrency}") as bar:
            level = await run_level(
                client, spec, concurrency, self.warmups[f"{server} predict"], lambda _: bar.update(1)
            )
        self.record(
            Measurement(
                round=round_, test="predict", server=server, streamed=True, concurrency=concurrency, level=level
            )
        )

    async def keystroke_run(self, client: httpx.AsyncClient, round_: int, server: str) -> None:
        """The round's stretch of typing: every server types the same characters."""
        count = self.args.keystrokes
        prompts = iter(self.keystrokes[1 + round_ * count : 1 + (round_ + 1) * count])
        url = self.urls[server] + "/v1/completions"
        new_tokens = self.args.keystroke_new_tokens

        def send() -> Any:
            return one_completion(client, url, completions_body(self.model, next(prompts), new_tokens, stream=False))

        with self.bar(count, f"{server} keystrokes") as bar:
            samples, wall = await closed_loop(send, 1, count, lambda _: bar.update(1))
        # A keystroke whose greedy completion ends (end-of-text) before the asked-for tokens is cheaper: it is
        # left out of the latencies, and counted. Every server gets the same prompts, so the same ones end
        # early on each (compare_report.checks holds the servers' counts against each other).
        counts = [s.completion_tokens if s.ok else None for s in samples]
        full = [s for s, n in zip(samples, counts) if n is None or n >= new_tokens]
        expected = self.warmups[f"{server} keystroke"].model_copy(update={"completion_tokens": new_tokens})
        level = summarize(1, full, wall, expected)
        self.record(
            Measurement(
                round=round_,
                test="keystroke",
                server=server,
                streamed=False,
                concurrency=1,
                level=level,
                latencies_s=[s.latency_s for s in full if s.ok and s.completion_tokens == new_tokens],
                ended_early=len(samples) - len(full),
                token_counts=counts,
            )
        )

    async def run(self, tokenizer: Any) -> None:
        levels = sorted(set(self.args.levels))
        async with make_client(self.spec, max(levels + self.args.predict_levels)) as client:
            await self.prepare(client, tokenizer)
            for round_ in range(self.args.rounds):
                for concurrency, streamed in itertools.product(levels, (False, True)):
                    for server in GREEDY_SERVERS:
                        await self.greedy_level(client, round_, server, concurrency, streamed)
                for concurrency in self.args.predict_levels:
                    for server in PREDICT_SERVERS:
                        await self.predict_level(client, round_, server, concurrency)
                for server in KEYSTROKE_SERVERS:
                    await self.keystroke_run(client, round_, server)


@contextlib.contextmanager
def local_servers(args: argparse.Namespace, model_dir: Path) -> Iterator[tuple[dict[str, str], dict[str, str]]]:
    """Start the peer and our three servers; their base URLs and descriptions. All stopped on exit."""
    env = {"STARCODER_CHECKPOINT": str(model_dir), "STARCODER_DTYPE": "float32", "STARCODER_DEVICE": "cpu"}
    venv = args.peer_venv or args.work_dir / "peer-venv"
    bin_dir = ensure_peer_venv(venv, args.work_dir / "peer-install.log")
    taken: set[int] = set()
    urls: dict[str, str] = {}
    descriptions: dict[str, str] = {}
    with contextlib.ExitStack() as running:
        for name, description, extra in TRUSS_SERVERS:
            work = args.work_dir / "compare" / name
            work.mkdir(parents=True, exist_ok=True)
            port = claim_port(taken)
            print(f"[{name}] starting the Truss server on port {port} (log {work / 'server.log'})", flush=True)
            urls[name] = truss_server_on(running, port, work, {**env, **extra}).base_url
            descriptions[name] = description
        work = args.work_dir / "compare" / "peer"
        work.mkdir(parents=True, exist_ok=True)
        port = claim_port(taken)
        print(f"[peer] starting transformers serve on port {port} (log {work / 'server.log'})", flush=True)
        peer = running.enter_context(running_peer(bin_dir, model_dir, port, work / "server.log"))
        urls["peer"] = peer.base_url
        descriptions["peer"] = " ".join(peer.command[1:]).replace(str(bin_dir) + "/", "")
        yield urls, descriptions


def main(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from devtools.tiny_model import build_tiny_model
    from devtools.truss_local import DEFAULT_TINY_MODEL_DIR

    if args.base_url:
        raise SystemExit("--compare runs local servers only")
    apply_quick(args)
    args.levels = args.levels or [1, 4, 16]
    started = time.monotonic()
    load_before = loadavg()
    machine = machine_info()  # the git state the servers are laid out from
    model_dir = build_tiny_model(DEFAULT_TINY_MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    try:
        with local_servers(args, model_dir) as (urls, descriptions):
            comparison = Comparison(args, urls, str(model_dir), prompts_for(args, args.tokenizer or model_dir))
            asyncio.run(comparison.run(tokenizer))
    except BenchError as error:
        print(f"bench failed: {error}", file=sys.stderr)
        return 1
    report = CompareReport(
        label=args.label or "peer-local-cpu",
        created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        machine={**machine, "loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": loadavg()},
        wall_s=time.monotonic() - started,
        settings={
            "rounds": args.rounds,
            "levels": sorted(set(args.levels)),
            "predict_levels": args.predict_levels,
            "new_tokens": args.new_tokens,
            "prompt_tokens_requested": args.prompt_tokens,
            "requests_per_level": args.requests_per_level,
            "keystrokes_per_round": args.keystrokes,
            "keystroke_prompt_tokens": comparison.warmups["ours keystroke"].prompt_tokens,
            "keystroke_new_tokens": args.keystroke_new_tokens,
            "quick": args.quick,
        },
        servers=descriptions,
        warmups=comparison.warmups,
        measurements=comparison.measurements,
        notes=comparison.notes,
    )
    report = summarise(report, ttft_clients=max(args.levels))
    json_path, md_path = write(report, results_dir(args))
    print()
    print(markdown(report))
    print(f"\nwall time {report.wall_s:.0f} s; wrote {json_path} and {md_path}")
    return 0
