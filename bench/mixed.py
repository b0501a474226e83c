"""The mixed-traffic profile: what real clients send, side by side on one server.

Six classes, assigned round-robin over clients and requests so every level carries all of them:

* ``greedy``     predict, greedy (the greedy profile's request);
* ``fim``        predict fill-in-the-middle as IDE plugins send it: temperature 0.2, top_p 0.95, stop sequences;
* ``nvidia``     /v1/completions shaped like NVIDIA's StarCoder2 endpoint (seed 003): seed, temperature 0.1,
                 top_p, presence/frequency penalties 0;
* ``chat``       /v1/chat/completions with presence_penalty 0.5;
* ``logprobs``   /v1/completions with logprobs 2;
* ``min_tokens`` predict in the seed Truss's style: min_new_tokens = max_new_tokens.

Every request asks for at least L new tokens (min_new_tokens / vLLM's min_tokens), so both servers do the
same work; token counts come from the server (predict's ``completion_tokens``, OpenAI's ``usage``), so a
stop sequence that ends a FIM completion early is counted as it is. OpenAI requests are streamed (TTFT is
measured); predict requests are not (their answer carries the count).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pydantic

from bench.loadgen import Percentiles

CLASSES = ("greedy", "fim", "nvidia", "chat", "logprobs", "min_tokens")


class MixedSample(pydantic.BaseModel):
    request_class: str
    ok: bool
    latency_s: float
    ttft_s: float | None = None
    completion_tokens: int = 0
    error: str | None = None


class ClassResult(pydantic.BaseModel):
    request_class: str
    requests: int
    failures: int
    output_tokens: int
    latency_s: Percentiles
    ttft_s: Percentiles
    # p95 latency over the greedy class's p95 in the same run (target: <= 1.5).
    p95_vs_greedy: float | None = None


class MixedLevel(pydantic.BaseModel):
    concurrency: int
    requests: int
    failures: int
    wall_s: float
    output_tokens: int
    output_tokens_per_s: float
    classes: list[ClassResult]
    errors: list[str] = pydantic.Field(default_factory=list)


class MixedSpec(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True)

    base_url: str
    predict_path: str
    # "/v1" on the local server; a Baseten deployment serves the OpenAI routes under "/sync/v1".
    openai_path: str = "/v1"
    prompt: str
    new_tokens: int
    requests_per_client: int
    timeout_s: float = 600.0
    headers: dict[str, str] = pydantic.Field(default_factory=dict, exclude=True, repr=False)


def request_for(spec: MixedSpec, request_class: str, index: int) -> tuple[str, dict[str, Any], bool]:
    """(path, body, streamed) of one request of the class; ``index`` varies seeds between requests."""
    length = spec.new_tokens
    prompt = spec.prompt
    if request_class == "greedy":
        return spec.predict_path, {"prompt": prompt, "max_new_tokens": length, "min_new_tokens": length}, False
    if request_class == "fim":
        half = len(prompt) // 2
        body = {
            "prefix": prompt[:half],
            "suffix": prompt[half:],
            "do_sample": True,
            "temperature": 0.2,
            "top_p": 0.95,
            "stop": ["\n\n\n", "<file_sep>"],
            "max_new_tokens": length,
            "min_new_tokens": length,
        }
        return spec.predict_path, body, False
    if request_class == "min_tokens":
        return spec.predict_path, {"prompt": prompt, "max_new_tokens": length, "min_new_tokens": length}, False
    common = {"max_tokens": length, "min_tokens": length, "stream": True, "stream_options": {"include_usage": True}}
    if request_class == "nvidia":
        body = {
            "prompt": prompt,
            "seed": 1000 + index,
            "temperature": 0.1,
            "top_p": 0.7,
            "presence_penalty": 0,
            "frequency_penalty": 0,
            **common,
        }
        return spec.openai_path + "/completions", body, True
    if request_class == "chat":
        messages = [{"role": "user", "content": prompt}]
        return spec.openai_path + "/chat/completions", {"messages": messages, "presence_penalty": 0.5, **common}, True
    if request_class == "logprobs":
        return spec.openai_path + "/completions", {"prompt": prompt, "logprobs": 2, "temperature": 0, **common}, True
    raise ValueError(f"unknown request class {request_class!r}")


async def one_mixed_request(client: httpx.AsyncClient, spec: MixedSpec, request_class: str, index: int) -> MixedSample:
    path, body, streamed = request_for(spec, request_class, index)
    url = spec.base_url + path
    started = time.perf_counter()

    def failed(error: str) -> MixedSample:
        return MixedSample(request_class=request_class, ok=False, latency_s=time.perf_counter() - started, error=error)

    try:
        if not streamed:
            response = await client.post(url, json=body, headers=spec.headers)
            if response.status_code != 200:
                return failed(f"HTTP {response.status_code}: {response.text[:200]}")
            tokens = int(response.json()["data"]["completion_tokens"])
            return MixedSample(
                request_class=request_class,
                ok=True,
                latency_s=time.perf_counter() - started,
                completion_tokens=tokens,
            )
        first: float | None = None
        tokens = 0
        async with client.stream("POST", url, json=body, headers=spec.headers) as response:
            if response.status_code != 200:
                return failed(f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:200]}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: ") :])
                if "error" in event:
                    return failed(str(event["error"])[:200])
                if first is None and event.get("choices"):
                    first = time.perf_counter()
                if event.get("usage"):
                    tokens = int(event["usage"]["completion_tokens"])
    except httpx.HTTPError as exc:
        return failed(f"{type(exc).__name__}: {exc}")
    end = time.perf_counter()
    return MixedSample(
        request_class=request_class,
        ok=tokens > 0,
        latency_s=end - started,
        ttft_s=None if first is None else first - started,
        completion_tokens=tokens,
        error=None if tokens > 0 else "no usage in the stream",
    )


async def run_mixed_level(
    client: httpx.AsyncClient,
    spec: MixedSpec,
    concurrency: int,
    on_done: Callable[[MixedSample], None] | None = None,
) -> MixedLevel:
    """``concurrency`` clients; request k of client c is of class (c + k) mod 6, so all classes run together."""
    samples: list[MixedSample] = []

    async def client_loop(client_index: int) -> None:
        for k in range(spec.requests_per_client):
            request_class = CLASSES[(client_index + k) % len(CLASSES)]
            sample = await one_mixed_request(client, spec, request_class, client_index * 1000 + k)
            samples.append(sample)
            if on_done is not None:
                on_done(sample)

    started = time.perf_counter()
    await asyncio.gather(*(client_loop(c) for c in range(concurrency)))
    return summarize_mixed(concurrency, samples, time.perf_counter() - started)


def summarize_mixed(concurrency: int, samples: list[MixedSample], wall_s: float) -> MixedLevel:
    ok = [s for s in samples if s.ok]
    classes: list[ClassResult] = []
    for request_class in CLASSES:
        mine = [s for s in samples if s.request_class == request_class]
        good = [s for s in mine if s.ok]
        classes.append(
            ClassResult(
                request_class=request_class,
                requests=len(mine),
                failures=len(mine) - len(good),
                output_tokens=sum(s.completion_tokens for s in good),
                latency_s=Percentiles.of([s.latency_s for s in good]),
                ttft_s=Percentiles.of([s.ttft_s for s in good if s.ttft_s is not None]),
            )
        )
    greedy_p95 = next(c.latency_s.p95 for c in classes if c.request_class == "greedy")
    if greedy_p95:
        for result in classes:
            if result.latency_s.p95 is not None:
                result.p95_vs_greedy = result.latency_s.p95 / greedy_p95
    tokens = sum(s.completion_tokens for s in ok)
    return MixedLevel(
        concurrency=concurrency,
        requests=len(samples),
        failures=len(samples) - len(ok),
        wall_s=wall_s,
        output_tokens=tokens,
        output_tokens_per_s=tokens / wall_s if wall_s > 0 else 0.0,
        classes=classes,
        errors=sorted({s.error for s in samples if s.error})[:5],
    )


def mixed_table(runs: dict[str, list[MixedLevel]]) -> str:
    """Markdown: per server and level, overall throughput, then each class's latency and p95 vs greedy."""
    header = (
        "| server | clients | class | requests (failed) | output tokens | latency ms p50 / p95 | TTFT ms p50 / p95 "
        "| p95 / greedy p95 |"
    )
    lines = [header, "|---|---:|---|---:|---:|---:|---:|---:|"]

    def ms(value: float | None) -> str:
        return "–" if value is None else f"{value * 1000:.0f}"

    for server, levels in runs.items():
        for level in levels:
            lines.append(
                f"| {server} | {level.concurrency} | **all: {level.output_tokens_per_s:.1f} tok/s** | "
                f"{level.requests} ({level.failures}) | {level.output_tokens} | | | |"
            )
            for c in level.classes:
                ratio = "–" if c.p95_vs_greedy is None else f"{c.p95_vs_greedy:.2f}×"
                lines.append(
                    f"| {server} | {level.concurrency} | {c.request_class} | {c.requests} ({c.failures}) | "
                    f"{c.output_tokens} | {ms(c.latency_s.p50)} / {ms(c.latency_s.p95)} | "
                    f"{ms(c.ttft_s.p50)} / {ms(c.ttft_s.p95)} | {ratio} |"
                )
    return "\n".join(lines)
